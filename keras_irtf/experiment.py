"""The assembler: one resolved config -> every object a run needs, built in one place.

    from keras_irtf.config import load_config
    from keras_irtf.experiment import Experiment

    exp = Experiment(load_config(["configs/css.yaml"]))
    model = exp.create_model()                    # dataset, text input, model, optimizer
    model.fit(exp.train_dataset(), epochs=5, steps_per_epoch=200)
    metrics = exp.evaluate(model)                 # Recall@K, training recall, WHM
    exp.save_run(model, "runs/mine", metrics)
    exp, model = Experiment.from_run("runs/mine") # a run folder back, ready to evaluate or export

The config names every pluggable part (keras_irtf.registry); this module looks each up and asks
it to build itself from its own settings: the dataset (`from_settings`), the image encoder's
preprocessing (`preprocessor`), the text input (a vocabulary for "tokens" encoders, the frozen
encoder's text-embedding cache for "strings" encoders), the model, the optimizer with the
pretrained layers' learning-rate multiplier, the tf.data pipelines, the evaluation, and run
folders. tools/*.py, keras_irtf.api, keras_irtf.training, keras_irtf.serving, the examples and
the benchmarks all go through it; nothing else turns config strings into objects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Optional

import keras
import numpy as np

from keras_irtf.config import Config, ConfigError, default_cache_dir, load_config, to_yaml
from keras_irtf.data import check_dataset, load_dataset
from keras_irtf.data.feature_cache import CachedFeatureInput, ImageFeatureCache, TextFeatureStore
from keras_irtf.data.pipeline import images_dataset, queries_dataset, training_dataset
from keras_irtf.data.text import TextVectorizer
from keras_irtf.data.text_cache import prepare_text_input, texts_of_run
from keras_irtf.evaluation.protocol import evaluate
from keras_irtf.evaluation.robustness import robustness_of
from keras_irtf.layers.normalization import ScaledL2Normalization
from keras_irtf.layers.pretrained import resolve_preset_dir
from keras_irtf.model.gradient_augmentation import GradientAugmentation
from keras_irtf.model.optimizers import pretrained_learning_rate_groups, with_learning_rate_multipliers
from keras_irtf.model.retrieval_model import ComposedRetrievalModel
from keras_irtf.precision import policy_scope, wrap_optimizer
from keras_irtf.registry import GA_METHODS, import_modules, load_builtins
from keras_irtf.run_folder import check_model_file, read_manifest, record_run_files, verify_run_files
from keras_irtf.utils import atomic_write_text, read_json, write_json

RUN_FILES = ("config.yaml", "model.keras")  # what every run folder holds (+ vocab.txt for token encoders)


class Experiment:
    """Builds and holds the objects of one configured run.

    Args:
        cfg: a resolved keras_irtf.config.Config.
        dataset: an already loaded dataset for cfg.data (saves reloading it when several runs
            share one, as tools/ablate.py does); loaded on first use otherwise.
        verbose: progress output while loading and evaluating.
    """

    def __init__(self, cfg: Config, dataset=None, verbose: bool = True):
        self.cfg = cfg
        self.verbose = verbose
        self._dataset = dataset
        self._preprocessor = None
        # what the pipelines apply to the raw texts: a TextVectorizer (token encoders), the
        # text cache's row ids or the strings themselves (string encoders); set by
        # build_text_input / attach_text_input
        self.vectorizer = None
        # the frozen-feature cache's stand-in for the preprocessor (attach_image_input), or None
        self.image_input = None

    # ---- the registered parts ------------------------------------------------------------------
    @property
    def image_encoder_class(self):
        return self.cfg.model.image_encoder.entry().obj

    @property
    def text_encoder_class(self):
        return self.cfg.model.text_encoder.entry().obj

    @property
    def text_input_kind(self) -> str:
        """'tokens' (a vocabulary over the training texts) or 'strings' (the encoder reads text)."""
        return getattr(self.text_encoder_class, "input_kind", "tokens")

    @property
    def preprocessor(self):
        """The image encoder's preprocessing (keras_irtf.preprocessing.ImagePreprocessor):
        what the pipelines, the evaluation, the export and the query tool apply to every image."""
        if self._preprocessor is None:
            m = self.cfg.model.image_encoder
            self._preprocessor = self.image_encoder_class.preprocessor(m.settings, **self.part_context("image_encoder"))
        return self._preprocessor

    def check(self):
        """Fail fast, before any heavy work: the dataset's files, the local folders the encoders
        read (an encoder class may define `check(settings, cfg)`), and what the frozen-feature
        cache cannot serve (DatasetError / ConfigError; the image size is checked with the config)."""
        check_dataset(self.cfg)
        m = self.cfg.model
        for role, cls in (("image_encoder", self.image_encoder_class), ("text_encoder", self.text_encoder_class)):
            check = getattr(cls, "check", None)  # e.g. a CLIP preset folder that is not there
            if check is not None:
                check(getattr(m, role).settings, **self.part_context(role))
        self.check_feature_cache()
        weights = getattr(self.cfg.model.image_encoder.settings, "weights", None)
        if weights:
            resolve_preset_dir(weights)

    # ---- data ----------------------------------------------------------------------------------
    @property
    def dataset(self):
        if self._dataset is None:
            self._dataset = load_dataset(self.cfg, image_size=self.preprocessor.size, verbose=self.verbose)
        return self._dataset

    def build_text_input(self, vocabulary=None, save_to=None) -> int:
        """Token encoders: the vectoriser over the training texts (or read from `vocabulary`, a
        run's vocab.txt), saved to `save_to` if given; returns the vocabulary size. String
        encoders: nothing yet (their input needs the model, see attach_text_input); returns 0."""
        if self.text_input_kind != "tokens":
            return 0
        n = self.cfg.model.max_text_length
        if vocabulary is not None:
            self.vectorizer = TextVectorizer.load(vocabulary, n)
        else:
            self.vectorizer = TextVectorizer.from_texts(self.dataset.training_texts(), n)
        if save_to is not None:
            self.vectorizer.save(save_to)
        return self.vectorizer.vocab_size

    def attach_text_input(self, model, verbose: Optional[bool] = None):
        """String encoders: embed each distinct text of the run once (when the encoder's
        settings have `cache: true`) and feed the pipelines the cache's row ids; otherwise the
        raw strings. Token encoders: nothing to do."""
        if self.text_input_kind != "strings":
            return self.vectorizer
        use_cache = bool(getattr(self.cfg.model.text_encoder.settings, "cache", False))
        if not _frozen(model.text_encoder):  # a fine-tuned tower: its features change every step
            use_cache = False
        show = self.verbose if verbose is None else verbose
        store = None
        if use_cache and getattr(model.text_encoder, "persistent_cache", False):
            extra = getattr(model.text_encoder, "fingerprint_extra", dict)()  # e.g. the tokenizer's vocabulary
            store = TextFeatureStore(self.feature_cache_dir, model.text_encoder, extra)
        self.vectorizer = prepare_text_input(model.text_encoder, texts_of_run(self.dataset), use_cache,
                                             verbose=show, store=store)
        return self.vectorizer

    # ---- the frozen-feature cache ----------------------------------------------------------------
    @property
    def feature_cache_dir(self) -> Path:
        """Where frozen features are stored across runs: data.feature_cache, else
        <data.cache_dir>/features."""
        return Path(self.cfg.data.feature_cache) if self.cfg.data.feature_cache else default_cache_dir(self.cfg) / "features"

    def uses_feature_cache(self, model=None) -> bool:
        """True when the image encoder can serve cached features (it has `attach_cache` and
        `encode_images`), its settings allow it (`cache: true`) and it is frozen
        (model.finetune is not image/both)."""
        cls = self.image_encoder_class
        if not (hasattr(cls, "attach_cache") and hasattr(cls, "encode_images")):
            return False
        if not getattr(self.cfg.model.image_encoder.settings, "cache", False):
            return False
        if self.cfg.model.finetune in ("image", "both"):
            return False
        return model is None or _frozen(model.image_encoder)

    def check_feature_cache(self):
        """ConfigError when the config asks for what cached features cannot give: gradients at
        the input pixels (GA^A / FGSM at ga.point=input)."""
        if not self.uses_feature_cache() or self.cfg.ga.point != "input":
            return
        pixel = [m for m in self.cfg.ga_methods if getattr(GA_METHODS.get(m).obj, "needs_input_gradient", False)]
        if pixel:
            t = self.cfg.model.image_encoder.type
            raise ConfigError(
                f"ga.methods={','.join(pixel)} at ga.point=input needs the gradient with respect to the input "
                f"pixels, but the frozen {t!r} image encoder is served from the frozen-feature cache (features, "
                f"not pixels, enter the model). Set ga.point=image_feature (GA^A on the frozen image feature: "
                f"the usual choice here), text_feature or composed; or model.image_encoder.{t}.cache=false to "
                f"run the frozen tower on pixels in every step (much slower)."
            )

    def attach_image_input(self, model, verbose: Optional[bool] = None):
        """With a frozen, cacheable image encoder: embed every image of the dataset's splits once
        (reading what the on-disk store already holds), attach the table to the encoder and feed
        the pipelines cache rows instead of pixels. Otherwise nothing."""
        if not self.uses_feature_cache(model):
            self.image_input = None
            return None
        self.check_feature_cache()
        show = self.verbose if verbose is None else verbose
        cache = ImageFeatureCache(model.image_encoder, self.preprocessor, self.feature_cache_dir,
                                  batch_size=self.cfg.eval.batch_size, verbose=show)
        data = self.dataset
        # (CIRR's test1, read only for a submission, is embedded on pixels by the submission writer)
        cache.add_splits({name: getattr(data, name, None) for name in ("train", "test", "test_shift")})
        model.image_encoder.attach_cache(cache)
        self.image_input = CachedFeatureInput(cache)
        return self.image_input

    @property
    def pipeline_input(self):
        """What the pipelines and the evaluation turn image ids into: the frozen-feature cache's
        rows when attached, else pixels through the encoder's preprocessor."""
        return self.image_input if self.image_input is not None else self.preprocessor

    # ---- model and optimizer -------------------------------------------------------------------
    def part_context(self, role: str, **known) -> dict:
        """The named arguments a model part (role: "image_encoder", "text_encoder", "composer")
        gets besides its own settings section: what it needs to know about the rest of the run,
        computed here from the whole config (keras_irtf.layers.base lists them). `known`: values
        only the build knows (vocab_size; the encoders' widths image_dim and text_dim)."""
        cfg, m = self.cfg, self.cfg.model
        if role == "composer":
            return {"output_dim": known["image_dim"], **known}
        shared = [("model.clip_preset", m.clip_preset)]
        context = {"output_dim": m.embed_dim}
        if role == "image_encoder":
            context.update(image_size=cfg.data.image_size, finetune=m.finetune in ("image", "both"))
        elif role == "text_encoder":
            if m.image_encoder.type == m.text_encoder.type:  # one family: the image tower's preset serves both
                shared.append(("model.image_encoder.preset", getattr(m.image_encoder.settings, "preset", None)))
            context.update(finetune=m.finetune in ("text", "both"), double_backprop=cfg.ga.point == "text_feature"
                           and any(getattr(GA_METHODS.get(name).obj, "needs_input_gradient", False) for name in cfg.ga_methods))
        else:
            raise ValueError(f"part_context: role must be image_encoder, text_encoder or composer, got {role!r}")
        context["shared_presets"] = tuple((key, folder) for key, folder in shared if folder)
        return {**context, **known}

    def build_model(self, vocab_size: Optional[int] = None):
        """The ComposedRetrievalModel of the config, built (not compiled). `vocab_size`: the
        token encoder's vocabulary (default: the vectoriser's).

        train.precision is applied here and nowhere else: the encoders and the composer are
        built under that Keras dtype policy (set and restored around building, so it does not
        leak into other runs of the process); the normalisation and the GA layer are float32
        (see keras_irtf.precision for every part kept in float32)."""
        cfg, m = self.cfg, self.cfg.model
        if vocab_size is None:
            tokens = self.text_input_kind == "tokens" and self.vectorizer is not None
            vocab_size = self.vectorizer.vocab_size if tokens else 0
        precision = cfg.train.precision
        with policy_scope(precision):
            image_encoder = self.image_encoder_class.from_settings(
                m.image_encoder.settings, **self.part_context("image_encoder"))
            text_encoder = self.text_encoder_class.from_settings(
                m.text_encoder.settings, **self.part_context("text_encoder", vocab_size=int(vocab_size)))
            # the composed query lives in the image-feature space (the targets are image features):
            # a composer is built to the image encoder's width (model.embed_dim for the built-in
            # encoders, the projection width of a pretrained CLIP / SigLIP tower)
            composer = m.composer.entry().obj.from_settings(m.composer.settings, **self.part_context(
                "composer", image_dim=int(getattr(image_encoder, "output_dim", m.embed_dim)),
                text_dim=int(getattr(text_encoder, "output_dim", m.embed_dim))))
        ga = GradientAugmentation(
            methods=cfg.ga_methods, point=cfg.ga.point, mode=cfg.ga.mode, seed=cfg.train.seed,
            settings={name: dataclasses.asdict(s) for name in cfg.ga_methods
                      if (s := cfg.ga.settings(name)) is not None},
            pixel_mean=self.preprocessor.mean, pixel_std=self.preprocessor.std,  # PGD's pixel range
            name="gradient_augmentation", dtype="float32",
        )
        return ComposedRetrievalModel(
            image_encoder, text_encoder, composer,
            normalization=ScaledL2Normalization(m.initial_scale, learn_scale=m.learn_scale, name="normalization",
                                                dtype="float32"),
            gradient_augmentation=ga, retrieval_loss=cfg.loss.kind, eta=cfg.loss.eta,
            similarity_reduction=cfg.loss.similarity_reduction, image_size=self.preprocessor.size,
            max_text_length=m.max_text_length, precision=precision, name=f"{m.method}_retrieval",
        )

    def make_optimizer(self, model=None):
        """The optimizer of `cfg.optim`; given the model, its pretrained layers (the encoders'
        `pretrained_variables()`) train at `optim.backbone_lr_multiplier` times the rate (fine-tuned
        CLIP / SigLIP towers at `optim.finetune_lr_multiplier`).
        Under train.precision=mixed_float16 it is wrapped in Keras' LossScaleOptimizer (dynamic
        loss scaling; the model's train_step scales the loss)."""
        o = self.cfg.optim
        lr = learning_rate_schedule(o)
        extra = {"clipnorm": o.clipnorm} if o.clipnorm else {}
        if o.optimizer == "sgd":
            optimizer = keras.optimizers.SGD(lr, momentum=o.momentum, weight_decay=o.weight_decay or None, **extra)
        else:
            optimizer = keras.optimizers.Adam(lr, weight_decay=o.weight_decay or None, **extra)
        if model is not None:
            groups = pretrained_learning_rate_groups(model, o.backbone_lr_multiplier, o.finetune_lr_multiplier)
            if groups:
                optimizer = with_learning_rate_multipliers(optimizer, groups)
        return wrap_optimizer(optimizer, self.cfg.train.precision)

    def compile(self, model):
        """Compile `model` with the configured optimizer (multipliers included) and build the
        optimizer's state now (a backup restores into it)."""
        model.compile(optimizer=self.make_optimizer(model), jit_compile=self.cfg.train.jit_compile)
        model.optimizer.build(model.trainable_variables)
        return model

    def create_model(self, strategy=None, compile: bool = True, vocabulary=None, vocab_out=None):
        """Text input + model (+ optimizer), under `strategy`'s scope when given: what a run
        trains. `vocabulary` / `vocab_out`: read / write the vocabulary file (token encoders)."""
        vocab_size = self.build_text_input(vocabulary=vocabulary, save_to=vocab_out)
        self.check_feature_cache()
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            model = self.build_model(vocab_size)
            if compile:
                self.compile(model)
        self.attach_text_input(model)
        self.attach_image_input(model)
        return model

    # ---- pipelines -----------------------------------------------------------------------------
    def train_dataset(self, steps: Optional[int] = None, start_step: int = 0, shard=(0, 1),
                      batch_size: Optional[int] = None, seed: Optional[int] = None):
        """Training batches `start_step` .. steps - 1 (default train.steps), drawn by the dataset's
        reference sampler from `seed` (default train.seed): the same seed, the same batches.
        `shard=(i, n)`: this worker's slice of every global batch."""
        c = self.cfg.train
        return training_dataset(
            self.dataset, self._text_input(), int(batch_size or c.batch_size), int(steps or c.steps),
            c.seed if seed is None else int(seed), self.pipeline_input, c.pairs_per_source,
            start_step=start_step, shard=shard,
        )

    def sample_batch(self, batch_size: Optional[int] = None):
        """One training batch (for building a model before loading weights, and for tests)."""
        return next(iter(self.train_dataset(steps=1, batch_size=batch_size)))

    def validation_dataset(self, batch_size: Optional[int] = None):
        """The test queries with their target images, in order, full batches only (the batch is
        the loss's set of negatives): for `model.fit(validation_data=...)` / `model.evaluate`."""
        split = self.dataset.test
        bs = int(batch_size or self.cfg.train.batch_size)
        if len(split.test_queries) < bs:
            raise ValueError(f"the test split has {len(split.test_queries)} queries, fewer than one batch of {bs}")
        return queries_dataset(split, split.test_queries, self._text_input(), bs, self.pipeline_input,
                               drop_remainder=True, with_target=True)

    def gallery_dataset(self, split: str = "test", batch_size: Optional[int] = None):
        """Every image of a split, in id order, preprocessed (for indexing)."""
        s = getattr(self.dataset, split)
        return images_dataset(s, np.arange(s.num_images), int(batch_size or self.cfg.eval.batch_size),
                              self.pipeline_input)

    def _text_input(self):
        if self.vectorizer is None:
            if self.text_input_kind == "tokens":
                self.build_text_input()
            else:
                raise ValueError("the text input of a string text encoder needs the model: call "
                                 "create_model() or attach_text_input(model) first")
        return self.vectorizer

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self, model, verbose: Optional[bool] = None, backend: Optional[str] = None) -> dict:
        """Test recall Mt, training recall Ms and their WHM with the config's evaluation settings
        (what metrics.json holds)."""
        e = self.cfg.eval
        return evaluate(
            model, self.dataset, self._text_input(), ks=e.ks, whm_ks=e.whm_ks or self.dataset.whm_ks,
            alpha=e.alpha, train_queries=self.cfg.data.train_recall_queries, seed=self.cfg.train.seed,
            batch_size=e.batch_size, preprocessor=self.pipeline_input, query_chunk=e.query_chunk,
            gallery_chunk=e.gallery_chunk, verbose=self.verbose if verbose is None else verbose,
            backend=backend or e.backend,
        )

    # ---- run folders ---------------------------------------------------------------------------
    def save_run(self, model, run_dir, metrics: Optional[dict] = None) -> Path:
        """Write a run folder: config.yaml, vocab.txt (token encoders), model.keras and, given,
        metrics.json. tools/evaluate.py, tools/export.py and tools/query.py read it."""
        run = Path(run_dir)
        run.mkdir(parents=True, exist_ok=True)
        written = ["config.yaml", "model.keras"]
        atomic_write_text(run / "config.yaml", to_yaml(self.cfg))
        if self.text_input_kind == "tokens" and self.vectorizer is not None:
            self.vectorizer.save(run / "vocab.txt")
            written.append("vocab.txt")
        save_model(model, run / "model.keras")
        if metrics is not None:
            write_json(run / "metrics.json", metrics)
            written.append("metrics.json")
        record_run_files(run, *written)
        return run

    @classmethod
    def from_run(cls, run_dir, overrides=(), verbose: bool = True, load_data: bool = True, dataset=None,
                 image_cache: bool = True):
        """(Experiment, model) of a run folder: its config (plus `overrides`), its vocabulary and
        its model; with `load_data`, the dataset and the text input too (ready to evaluate), and
        the frozen-feature cache unless `image_cache=False` (callers that feed pixels anyway:
        the robustness evaluation, the CIRR submission). `dataset`: an already loaded dataset of
        the run's config (saves reloading it). The image preprocessing is the one the model
        recorded when it was built, when its encoder records one (a CLIP / SigLIP preset's: the
        preset folder is then not needed)."""
        run = Path(run_dir)
        for name in RUN_FILES:
            if not (run / name).is_file():
                raise FileNotFoundError(f"{run / name} not found: --run must be a run folder written by tools/train.py")
        verify_run_files(run, ("config.yaml", "vocab.txt", "model.keras"), verbose=verbose)
        cfg = load_config([run / "config.yaml"], list(overrides))
        exp = cls(cfg, dataset=dataset, verbose=verbose)
        if exp.text_input_kind == "tokens":
            vocab = run / "vocab.txt"
            if not vocab.is_file():
                raise FileNotFoundError(f"{vocab} not found: the {cfg.model.text_encoder.type!r} text encoder needs "
                                        f"the run's vocabulary (written by training)")
            exp.build_text_input(vocabulary=vocab)
        model = load_model(run / "model.keras")
        own = getattr(model.image_encoder, "own_preprocessor", None)
        if own is not None and own() is not None:
            exp._preprocessor = own()
        if load_data:
            exp.attach_text_input(model)
            if image_cache:
                exp.attach_image_input(model)
        return exp, model


def _frozen(layer) -> bool:
    """A layer none of whose variables train."""
    return not layer.trainable or not layer.trainable_variables


# ---- the same, as functions of a config (for scripts and tests that need one object) ----------
def build_model(cfg: Config, vocab_size: int = 0):
    """The configured ComposedRetrievalModel, built, not compiled (Experiment.build_model)."""
    return Experiment(cfg, verbose=False).build_model(vocab_size)


def make_optimizer(cfg: Config, model=None):
    """The configured optimizer; given the model, with the pretrained layers' multiplier."""
    return Experiment(cfg, verbose=False).make_optimizer(model)


def sample_batch(dataset, vectorizer, cfg: Config, batch_size: Optional[int] = None):
    """One training batch of `dataset` through `vectorizer` with the config's pipeline."""
    exp = Experiment(cfg, dataset=dataset, verbose=False)
    exp.vectorizer = vectorizer
    return exp.sample_batch(batch_size)


def learning_rate_schedule(optim):
    """The learning rate of `optim` (a config's optim section) as the optimizer takes it: the base
    rate, or a piecewise-constant schedule multiplied by decay_factor after each of decay_steps."""
    if not optim.decay_steps:
        return optim.learning_rate
    bounds = [int(s) for s in optim.decay_steps]
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        bounds, [optim.learning_rate * optim.decay_factor**i for i in range(len(bounds) + 1)])


def save_model(model, path):
    """Save a .keras file atomically (a crash never leaves a truncated model)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial.keras")
    model.save(tmp)
    os.replace(tmp, path)


def load_model(path):
    """Load a .keras file saved by keras_irtf, every keras_irtf class registered first.

    (`keras.saving.load_model` alone cannot find keras_irtf's classes until keras_irtf's modules
    are imported: call this, or `import keras_irtf.layers, keras_irtf.model.retrieval_model`
    first.)"""
    load_builtins()
    check_model_file(path)  # a truncated file is "damaged", not "not found" or a Keras traceback
    return keras.saving.load_model(path)


def evaluate_run(run, alpha=None, out=None, verbose=True, backend=None, overrides=()) -> dict:
    """Reload a run folder's model, re-evaluate it, and write its metrics.json (or `out`).

    backend: the retrieval backend (one of eval.backend's choices; default: the run's eval.backend)."""
    run = Path(run)
    overrides = list(overrides) + ([f"eval.alpha={float(alpha)}"] if alpha is not None else [])
    exp, model = Experiment.from_run(run, overrides, verbose=verbose)
    result = exp.evaluate(model, backend=backend)
    previous = read_json(run / "metrics.json") if (run / "metrics.json").is_file() else {}
    metrics = {**previous, "dataset": exp.cfg.data.dataset.type, "method": exp.cfg.model.method, **result}
    write_json(Path(out) if out else run / "metrics.json", metrics)
    if not out and read_manifest(run):  # keep the manifest true to the folder (one without stays without)
        record_run_files(run, "metrics.json")
    return metrics


def robustness_run(run, levels=None, out=None, verbose=True, backend=None, input_grad=True) -> dict:
    """Evaluate a run folder's robustness (keras_irtf.evaluation.robustness) and write
    `<run>/robustness.json` (or `out`)."""
    exp, model = Experiment.from_run(run, verbose=verbose, image_cache=False)  # perturbs pixels: no feature cache
    result = robustness_of(exp, model, levels=levels, backend=backend, input_grad=input_grad, verbose=verbose)
    write_json(Path(out) if out else Path(run) / "robustness.json", result)
    return result


def experiment_from_args(config_paths=(), overrides=(), imports=(), verbose: bool = True) -> Experiment:
    """The tools' entry: import the user's modules (their registrations), resolve the config,
    build the Experiment."""
    import_modules(imports)
    return Experiment(load_config(config_paths, overrides), verbose=verbose)
