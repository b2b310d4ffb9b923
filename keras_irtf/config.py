"""Typed experiment configuration: dataclass defaults <- YAML files <- command-line overrides.

A config is a tree of dataclasses. YAML files and `--set section.key=value` overrides are merged
into it in that order; an unknown section or key is an error that lists the valid ones, so a typo
never silently trains the wrong experiment.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import math
import os
from pathlib import Path
from typing import Optional

import yaml

from keras_irtf.registry import ConfigError  # noqa: F401  (raised by this module; defined there for plug-ins)
from keras_irtf.registry import GA_METHODS, REGISTRIES, RETRIEVAL_LOSSES, RegistryError


class OneOf:
    """The config section of a pluggable kind: the registered type's name and its own settings.

    In YAML, either the type alone (`image_encoder: resnet18`) or a mapping with `type` and that
    type's keys (`image_encoder: {type: resnet18, weights: /presets/resnet_18_imagenet}`); on the
    command line `--set model.image_encoder=resnet18` and `--set model.image_encoder.weights=DIR`.
    Each type's defaults live in the dataclass it was registered with (keras_irtf.registry), so
    switching the type switches the valid keys; settings given for one type are kept if the type
    changes and changes back.
    """

    def __init__(self, kind: str, type: str, **settings):
        self.kind = kind  # a key of keras_irtf.registry.REGISTRIES
        self.type = str(type)
        self._settings: dict = {}
        if settings:
            self.update(settings, where="OneOf")

    @property
    def registry(self):
        return REGISTRIES[self.kind]

    def entry(self):
        try:
            return self.registry.get(self.type)
        except RegistryError as e:
            raise ConfigError(str(e)) from None

    @property
    def settings(self):
        """The selected type's settings (a dataclass instance, or None for a type without keys)."""
        if self.type not in self._settings:
            self._settings[self.type] = self.entry().default_settings()
        return self._settings[self.type]

    def update(self, value, where: str, key: str = ""):
        """Apply a YAML/override value: a type name, or a mapping of `type` and settings."""
        if not isinstance(value, dict):
            if isinstance(value, _Typed):  # --set model.image_encoder=NAME: the name as typed
                value = value.text
            if value is None or isinstance(value, (list, tuple)):
                kind = self.registry.kind
                raise ConfigError(f"{where}: {key} expects {'an' if kind[0] in 'aeiou' else 'a'} {kind} name or a "
                                  f"mapping with 'type'")
            self.type = str(value)
            self.entry()  # an unknown name fails here, listing the registered ones
            return
        value = dict(value)
        if "type" in value:
            if isinstance(value["type"], dict):
                raise ConfigError(f"{where}: {key}.type is the {self.registry.kind}'s name, not a mapping; "
                                  f"its keys go next to it (type: NAME, KEY: VALUE)")
            self.update(value.pop("type"), where, key)
        for name, item in value.items():
            if name in self.registry and not isinstance(item, dict) and name not in self._fields():
                raise ConfigError(
                    f"{where}: {key}.{name} is the section of the {self.registry.kind} {name!r}: a mapping of "
                    f"its keys {self.registry.get(name).keys or '(none)'}, got {item!r}"
                )
            if isinstance(item, dict) and name in self.registry:
                # the explicit form: settings of a named type, selected or not
                saved, self.type = self.type, name
                try:
                    self.update(item, where, key)
                finally:
                    self.type = saved
                continue
            fields = self._fields()
            settings = self.settings
            if name not in fields:
                raise ConfigError(
                    f"{where}: unknown key {key}.{name} for the {self.registry.kind} {self.type!r}; its keys: "
                    f"{sorted(fields) or 'none'}" + _owners_hint(self.registry, name)
                )
            setattr(settings, name, _coerce(f"{key}", fields[name], item, where))

    def _fields(self) -> dict:
        settings = self.settings
        return {f.name: f for f in dataclasses.fields(settings)} if settings is not None else {}

    # cfg.model.image_encoder.filters reads (and sets) the selected type's key
    def __getattr__(self, name):
        if name.startswith("_") or name in ("kind", "type"):
            raise AttributeError(name)
        settings = self.settings
        if settings is not None and name in {f.name for f in dataclasses.fields(settings)}:
            return getattr(settings, name)
        raise AttributeError(f"the {self.kind} {self.type!r} has no key {name!r}")

    def __setattr__(self, name, value):
        if name in ("kind", "type", "_settings"):
            object.__setattr__(self, name, value)
            return
        settings = self.settings
        if settings is None or name not in {f.name for f in dataclasses.fields(settings)}:
            raise AttributeError(f"the {self.kind} {self.type!r} has no key {name!r}")
        setattr(settings, name, value)

    def to_dict(self):
        settings = self.settings
        out = {"type": self.type}
        if settings is not None:
            out.update(_to_plain(dataclasses.asdict(settings)))
        return out

    def __eq__(self, other):
        if isinstance(other, str):  # cfg.model.text_encoder == "bert_hub"
            return self.type == other
        return isinstance(other, OneOf) and self.kind == other.kind and self.to_dict() == other.to_dict()

    def __hash__(self):
        return hash((self.kind, self.type))

    def __str__(self):
        return self.type

    def __repr__(self):
        return f"OneOf({self.kind}, {self.to_dict()})"

    def __deepcopy__(self, memo):
        new = OneOf(self.kind, self.type)
        new._settings = copy.deepcopy(self._settings, memo)
        return new


# One-line meanings of the built-in registered types' own keys, by settings dataclass (the
# configuration reference shows them). A settings dataclass may instead carry its own
# HELP = {key: meaning} class attribute, as a plug-in's does; that one is read first.
SETTINGS_HELP = {
    "keras_irtf.data.css_generator.CSSConfig": {
        "size": "which built-in set: smoke (tests), small (the default) or full (the published counts)",
        "seed": "seed of the generated scenes and texts (the dataset itself, not the training)",
        "images": "read the PNGs (png), draw the scenes in memory (2d), or PNGs when images/ has any (auto)",
        "sampler": "training sampler: TIRG's (a modification record, then a pair) or uniform over pairs",
        "shift": "also evaluate on the test scenes drawn under a shift training never sees (test_shift)",
    },
    "keras_irtf.data.cirr.CIRRConfig": {
        "arrangement": "folder arrangement: CIRR's own, CLIP4Cir's, or detected (auto)",
    },
    "keras_irtf.data.fashioniq.FashionIQConfig": {
        "categories": "the categories trained and evaluated (the protocol averages over them)",
        "train_captions": "how a training triplet's two captions become one text",
    },
    "keras_irtf.layers.composers.ConcatConfig": {
        "dropout": "dropout before the last projection",
    },
    "keras_irtf.layers.composers.CombinerConfig": {
        "projection_dim": "width of the two feature projections (0 = 4x the feature width)",
        "hidden_dim": "width of the hidden layers of the mix and the residual (0 = 8x the feature width)",
        "dropout": "dropout after each projection and hidden layer",
    },
    "keras_irtf.layers.composeae.ComposeAEConfig": {
        "loss_weights": "weights of the image reconstruction, text reconstruction and rotational symmetry terms",
        "dropout": "dropout of the projections",
    },
    "keras_irtf.layers.composeae.RealSpaceConcatAEConfig": {
        "loss_weights": "weights of the image and text reconstruction terms (the third is unused)",
    },
    "keras_irtf.layers.image_encoders.SmallCNNConfig": {
        "filters": "filters of each convolution block (one block per entry)",
        "stem_stride": "stride of the first convolution",
    },
    "keras_irtf.layers.image_encoders.ResNet18Config": {
        "weights": "local keras-hub preset folder of pretrained weights (empty = random initialisation)",
    },
    "keras_irtf.layers.clip.PresetImageConfig": {
        "preset": "local keras-hub preset folder of the model (default: model.clip_preset)",
        "cache": "serve the frozen tower's features from the frozen-feature cache",
    },
    "keras_irtf.layers.text_encoders.LSTMConfig": {
        "word_embed_dim": "width of the word embeddings",
        "hidden_dim": "width of the LSTM state",
        "dropout": "dropout on the LSTM's output, before the projection",
    },
    "keras_irtf.layers.bert.HubBertConfig": {
        "preprocess": "local folder of the TF-Hub BERT preprocessing SavedModel",
        "encoder": "local folder of the TF-Hub BERT encoder SavedModel",
        "dim": "width of BERT's pooled output",
        "seq_length": "tokens per text (0 = the preprocessing model's default)",
        "cache": "embed each distinct text once per run instead of in every step",
    },
    "keras_irtf.layers.bert.KerasHubBertConfig": {
        "preset": "local keras-hub preset folder (BertBackbone and its preprocessor)",
        "dim": "width of BERT's pooled output",
        "seq_length": "tokens per text (0 = the preprocessor's default)",
        "cache": "embed each distinct text once per run instead of in every step",
    },
    "keras_irtf.layers.clip.PresetTextConfig": {
        "preset": "local keras-hub preset folder (default: model.clip_preset, else the image encoder's)",
        "sequence_length": "tokens per text, at most the tower's context (0 = the preset's)",
        "cache": "embed each distinct text once per run (frozen encoder only)",
    },
    "keras_irtf.model.gradient_augmentation.AdversarialConfig": {
        "eps": "weight of L_GA^A = eps x the mean per-example norm of dL/dx",
        "attack_norm": "the attack's norm p (inf: the penalty uses the L1 norm of dL/dx; 2: the L2 norm)",
    },
    "keras_irtf.model.gradient_augmentation.IsotropicConfig": {
        "gamma": "standard deviation of the Gaussian noise added to every gradient",
        "noise_scaling": "noise per element (gamma x n) or divided by the variable's size (mean, the authors')",
        "exclude": "variables whose gradient gets no noise, by kind (kernel, bias, normalization, embedding, "
                   "logit_scale) or part (image_encoder, text_encoder, composer); [] for none; null (the "
                   "default): kernel and composer in the paper's mode, none in the reference mode or with only",
        "only": "when given, only the variables of these kinds or parts get noise (minus exclude)",
        "reference_terms": "ga.mode=reference: the authors' (N - k)-counted noise and constant push, or one of them",
    },
    "keras_irtf.model.gradient_augmentation.FGSMConfig": {
        "eps": "step of the FGSM example x + eps x sign(dL/dx)",
    },
    "keras_irtf.model.gradient_augmentation.PGDConfig": {
        "steps": "projected gradient steps k of the attack in every training step",
        "eps": "radius of the attack's ball (at ga.point=input in [0, 1] pixel units)",
        "step_size": "step alpha of each attack step (0 = 2.5 x eps / steps)",
        "attack_norm": "the ball and the steps: inf (sign steps, clipped) or 2 (normalised gradient steps)",
        "random_start": "start each attack from a uniform point of the ball instead of from x",
    },
    "keras_irtf.model.gradient_augmentation.L1Config": {
        "weight": "weight of the L1 penalty on kernels and embeddings",
    },
    "keras_irtf.model.gradient_augmentation.L2Config": {
        "weight": "weight of the L2 penalty on kernels and embeddings",
    },
}


def _owners_hint(registry, key) -> str:
    owners = [e.name for e in registry.entries() if key in e.keys]
    return f" ({key!r} is a key of: {', '.join(owners)})" if owners else ""


def _one_of(kind: str, type: str):
    return dataclasses.field(default_factory=lambda: OneOf(kind, type))


@dataclasses.dataclass
class DataConfig:
    # The dataset (a name in keras_irtf.registry.DATASETS) and its own keys, e.g. data.dataset.size
    # for the built-in CSS.
    dataset: OneOf = _one_of("dataset", "css")
    # Folder of the dataset in its official layout. For CSS, None means: generate the built-in
    # benchmark (data.dataset.size) into `cache_dir` (once) and read it from there.
    root: Optional[str] = None
    cache_dir: Optional[str] = None  # default: $KERAS_IRTF_CACHE or ./data/cache
    image_size: int = 64  # the image encoder's input side S (its preprocessing makes S x S)
    train_recall_queries: int = 10000  # size of the seeded training-query sample for Ms
    # Keep only a seeded subset of this many training queries (None = all): a small training set
    # trained for many epochs over-fits, the regime in which a regulariser such as GA can help.
    max_train_queries: Optional[int] = None
    # Hold out this fraction of the training queries (seeded, whole source images) as a validation
    # split to choose settings on: not trained on; its recall is metrics.json's "val" (built-in CSS).
    validation_fraction: float = 0.0
    on_bad_image: str = "error"  # stop at an unreadable image, or skip (and count) it
    file_cache: Optional[str] = None  # folder for a tf.data file cache of decoded images
    # Features of frozen image encoders that allow it (CLIP / SigLIP, `cache: true`): stored under
    # this folder (default: <cache_dir>/features), keyed by the encoder's weights, its
    # preprocessing and each image file, and reused by later runs (keras_irtf.data.feature_cache)
    feature_cache: Optional[str] = None

    # the values a key may take (config validation, the tools' --help and the docs read them here)
    CHOICES = {"on_bad_image": ("error", "skip")}
    HELP = {
        "dataset": "the dataset to train and evaluate on (a registered type) and its own keys",
        "root": "folder of the dataset in its published layout; for CSS, empty means generate the built-in set",
        "cache_dir": "where generated data and caches go (default: $KERAS_IRTF_CACHE, else ./data/cache)",
        "image_size": "side S of the square images the image encoder reads (shorter side to S, centre crop)",
        "train_recall_queries": "training queries in the seeded sample behind Ms (CSS ranks every training query)",
        "max_train_queries": "keep only a seeded subset of this many training queries (built-in CSS; empty = all)",
        "validation_fraction": "hold out this fraction of the training queries as a validation split, recall in "
                               "metrics.json's val (built-in CSS; 0 = none)",
        "on_bad_image": "a missing or damaged image stops the run (error) or is reported and left out (skip)",
        "file_cache": "folder where every image is decoded once and read back in later epochs and runs",
        "feature_cache": "folder of the frozen-feature store (default: <cache_dir>/features)",
    }


@dataclasses.dataclass
class ModelConfig:
    # The three pluggable parts, each with its own keys (keras_irtf.registry).
    composer: OneOf = _one_of("composer", "tirg")
    image_encoder: OneOf = _one_of("image_encoder", "small_cnn")
    text_encoder: OneOf = _one_of("text_encoder", "lstm")
    embed_dim: int = 512
    max_text_length: int = 16
    # The scaled L2 normalisation's s (the batch classification's logits are s^2 * cosine):
    # TIRG learns it from 4; CLIP4Cir's Combiner fixes the logit scale at 100 (s = 10, learn_scale
    # false).
    initial_scale: float = 4.0
    learn_scale: bool = True
    # Which pretrained vision-language towers (CLIP / SigLIP encoders) train (CHOICES below). A
    # fine-tuned tower trains at optim.finetune_lr_multiplier times the learning rate and
    # is never served from the frozen-feature cache.
    finetune: str = "none"
    # The local keras-hub preset folder of the CLIP / SigLIP towers (both encoders read it unless
    # their own `preset` key is set; tools/train.py --clip-preset DIR)
    clip_preset: Optional[str] = None

    # the values a key may take (config validation, the tools' --help and the docs read them here)
    CHOICES = {"finetune": ("none", "text", "image", "both")}
    HELP = {
        "composer": "how the image and text features become the query feature (a registered type)",
        "image_encoder": "the image encoder (a registered type) and its own keys",
        "text_encoder": "the text encoder (a registered type) and its own keys",
        "embed_dim": "width of the joint embedding (vision-language encoders use their own feature width)",
        "max_text_length": "tokens kept per text by the vocabulary-based text input",
        "initial_scale": "starting value of s in the scaled L2 normalisation (logits are s^2 x cosine)",
        "learn_scale": "whether s is trained",
        "finetune": "which towers of a CLIP or SigLIP model train",
        "clip_preset": "local keras-hub preset folder read by the clip and siglip encoders (--clip-preset)",
    }

    @property
    def method(self) -> str:
        """The composer's name (what run names and metrics call the method)."""
        return self.composer.type


@dataclasses.dataclass
class LossConfig:
    kind: str = "batch_classification"  # a name in keras_irtf.registry.RETRIEVAL_LOSSES
    eta: float = 0.0  # weight of the similarity matching loss L_S (0 = off)
    similarity_reduction: str = "sum"  # sum over dims (paper: ||.||^2), or mean (the authors' code)

    # the values a key may take (config validation, the tools' --help and the docs read them here)
    CHOICES = {"similarity_reduction": ("sum", "mean")}
    HELP = {
        "kind": "the retrieval loss (a registered type): softmax over the batch's targets, or soft triplet",
        "eta": "weight of the similarity matching loss L_S (0 = off)",
        "similarity_reduction": "L_S as the squared distance summed over dimensions (sum) or averaged (mean)",
    }


@dataclasses.dataclass
class GAConfig:
    # Comma-separated names in keras_irtf.registry.GA_METHODS ("" = none).
    # Each method's own keys are under ga.<method> (e.g. ga.adversarial.eps, ga.isotropic.gamma).
    methods: str = ""
    point: str = "input"  # where x is taken for the methods that need dL/dx (adversarial, fgsm)
    mode: str = "paper"  # the paper's equations, or reference: the authors' code, departures included
    _settings: dict = dataclasses.field(default_factory=dict, repr=False)

    # the values a key may take (config validation, the tools' --help and the docs read them here)
    CHOICES = {"point": ("input", "image_feature", "text_feature", "composed"), "mode": ("paper", "reference")}
    HELP = {
        "methods": "comma-separated gradient-augmentation methods and baselines to apply (empty = none)",
        "point": "where x is taken for GA^A and FGSM: the query pixels or a feature",
        "mode": "the paper's formulas, or the authors' code with its departures",
    }

    def __getattr__(self, name):
        # cfg.ga.adversarial.eps: a registered GA method's settings
        if name.startswith("_"):
            raise AttributeError(name)
        if _is_ga_method(name):
            return self.settings(name)
        raise AttributeError(f"'GAConfig' has no key or GA method {name!r}")

    def settings(self, method: str):
        """The settings of a registered GA method (defaults unless configured)."""
        if method not in self._settings:
            try:
                self._settings[method] = GA_METHODS.get(method).default_settings()
            except RegistryError as e:
                raise ConfigError(str(e)) from None
        return self._settings[method]


@dataclasses.dataclass
class OptimConfig:
    optimizer: str = "sgd"
    learning_rate: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 1e-6
    decay_steps: tuple = ()  # steps at which the learning rate is multiplied by decay_factor
    decay_factor: float = 0.1
    backbone_lr_multiplier: float = 0.1  # pretrained image backbone layers (ResNet-18)
    finetune_lr_multiplier: float = 0.1  # fine-tuned CLIP / SigLIP towers (model.finetune)
    clipnorm: Optional[float] = None

    # the values a key may take (config validation, the tools' --help and the docs read them here)
    CHOICES = {"optimizer": ("sgd", "adam")}
    HELP = {
        "optimizer": "the optimizer",
        "learning_rate": "base learning rate",
        "momentum": "SGD momentum",
        "weight_decay": "decoupled weight decay of the optimizer (0 = none)",
        "decay_steps": "steps at which the learning rate is multiplied by decay_factor",
        "decay_factor": "factor applied to the learning rate at each of decay_steps",
        "backbone_lr_multiplier": "learning rate of a pretrained image backbone, times learning_rate",
        "finetune_lr_multiplier": "learning rate of fine-tuned CLIP or SigLIP towers, times learning_rate",
        "clipnorm": "clip each gradient to this norm (empty = no clipping)",
    }


@dataclasses.dataclass
class TrainConfig:
    batch_size: int = 32
    steps: int = 1000
    steps_per_epoch: int = 200
    seed: int = 0
    pairs_per_source: bool = True  # TIRG sampler: consecutive queries share a source image
    out: Optional[str] = None  # run folder; default runs/<dataset>_<method>[_<ga>][_<preset>]_s<seed>
    preset: Optional[str] = None  # the preset applied (tools/train.py --preset): part of the default run name
    jit_compile: bool = False
    # the Keras dtype policy of the encoders and the composer (keras_irtf.precision; CHOICES
    # below); mixed_float16 trains with dynamic loss scaling
    precision: str = "float32"
    backup_every_steps: int = 200
    log_every_steps: int = 50  # TensorBoard: loss terms and learning rate every N steps
    strategy: str = "auto"  # the tf.distribute strategy (keras_irtf.training.distribute)
    devices: Optional[str] = None
    # multi_worker: a collective that does not complete within this many seconds fails (a worker
    # stuck or gone) instead of waiting forever; generous, as the first one waits for every worker
    collective_timeout_seconds: float = 1800.0

    # the values a key may take (config validation, the tools' --help and the docs read them here)
    CHOICES = {"strategy": ("auto", "one_device", "mirrored", "multi_worker"),
               "precision": ("float32", "mixed_bfloat16", "mixed_float16")}
    HELP = {
        "batch_size": "global batch: all replicas together",
        "steps": "training steps (exactly this many are trained)",
        "steps_per_epoch": "steps per Keras epoch (the last epoch is shorter when they do not divide)",
        "seed": "seed of the data order, initialisation, dropout and gradient noise",
        "pairs_per_source": "the sampler draws queries in pairs that share a source image (TIRG's)",
        "out": "run folder (default: runs/<dataset>_<method>[_<ga>][_<preset>]_s<seed>)",
        "preset": "name of the preset applied (set by --preset; part of the default run name)",
        "jit_compile": "compile the training step with XLA",
        "precision": "Keras dtype policy of the encoders and the composer",
        "backup_every_steps": "write the resumable backup every N steps (0 = at epoch ends only)",
        "log_every_steps": "write the TensorBoard scalars every N steps",
        "strategy": "tf.distribute strategy (auto: mirrored when more than one GPU is visible)",
        "devices": "devices of the mirrored strategy: 'cpu:N' (N logical CPUs) or '/gpu:0,/gpu:1'",
        "collective_timeout_seconds": "multi-worker: a collective that does not finish in time stops training",
    }


@dataclasses.dataclass
class EvalConfig:
    ks: tuple = (1, 5, 10, 50)
    # The recalls averaged into Ms and Mt; empty = the dataset's reported Ks (Fashion200k: 1, 10, 50).
    whm_ks: tuple = ()
    alpha: float = 0.5
    batch_size: int = 256
    query_chunk: int = 1024
    gallery_chunk: int = 8192
    backend: str = "tf"  # exact top-k retrieval in TensorFlow, or faiss (needs faiss-cpu), or auto

    # the values a key may take (config validation, the tools' --help and the docs read them here)
    CHOICES = {"backend": ("tf", "faiss", "auto")}
    HELP = {
        "ks": "the K of the reported Recall@K",
        "whm_ks": "the recalls averaged into Ms and Mt (empty = the dataset's own)",
        "alpha": "alpha of the weighted harmonic mean WHM of Ms and Mt",
        "batch_size": "images or queries embedded per step",
        "query_chunk": "queries scored per block of the chunked top-k",
        "gallery_chunk": "gallery images scored per block of the chunked top-k",
        "backend": "exact top-k search: tf, faiss (the [faiss] extra) or auto (TensorFlow, measured faster here)",
    }


@dataclasses.dataclass
class Config:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    ga: GAConfig = dataclasses.field(default_factory=GAConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        out = {}
        for section in dataclasses.fields(self):
            sub = getattr(self, section.name)
            values = {}
            for f in dataclasses.fields(sub):
                if f.name.startswith("_"):
                    continue
                value = getattr(sub, f.name)
                values[f.name] = value.to_dict() if isinstance(value, OneOf) else _to_plain(value)
            if isinstance(sub, GAConfig):
                for method in parse_ga_methods(sub.methods):
                    settings = sub.settings(method)
                    if settings is not None:
                        values[method] = _to_plain(dataclasses.asdict(settings))
            out[section.name] = values
        return out

    def copy(self) -> "Config":
        return copy.deepcopy(self)

    @property
    def ga_methods(self) -> tuple:
        return parse_ga_methods(self.ga.methods)


def parse_ga_methods(text) -> tuple:
    """'adversarial,isotropic' (or a list) -> ('adversarial', 'isotropic'); each must be registered."""
    if isinstance(text, (list, tuple)):
        items = [str(t).strip() for t in text]
    else:
        items = [t.strip() for t in str(text or "").split(",")]
    items = [t for t in items if t and t != "none"]
    unknown = [t for t in items if t not in GA_METHODS]
    if unknown:
        raise ConfigError(
            f"ga.methods: unknown method(s) {unknown}; expected a comma-separated subset of "
            f"{GA_METHODS.names()}"
        )
    return tuple(dict.fromkeys(items))


# GA keys of earlier versions, under ga (config files) or as GradientAugmentation arguments (.keras
# files): old key -> (method, the method's key).
GA_OLD_KEYS = {"eps": ("adversarial", "eps"), "attack_norm": ("adversarial", "attack_norm"),
               "gamma": ("isotropic", "gamma"), "noise_scaling": ("isotropic", "noise_scaling"),
               "fgsm_eps": ("fgsm", "eps"), "l1": ("l1", "weight"), "l2": ("l2", "weight")}

# Keys of earlier versions -> where they live now (for an error that says where to go).
MOVED_KEYS = {
    "model.method": "model.composer (or --method)",
    "model.cnn_filters": "model.image_encoder.filters (small_cnn)",
    "model.cnn_stem_stride": "model.image_encoder.stem_stride (small_cnn)",
    "model.image_weights": "model.image_encoder.weights (resnet18)",
    "model.word_embed_dim": "model.text_encoder.word_embed_dim (lstm)",
    "model.text_hidden_dim": "model.text_encoder.hidden_dim (lstm)",
    "model.dropout": "model.text_encoder.dropout (lstm)",
    "model.bert_preprocess": "model.text_encoder.preprocess (bert_hub)",
    "model.bert_encoder": "model.text_encoder.encoder (bert_hub)",
    "model.bert_preset": "model.text_encoder.preset (bert_keras_hub)",
    "model.bert_dim": "model.text_encoder.dim (bert_hub, bert_keras_hub)",
    "model.bert_seq_length": "model.text_encoder.seq_length (bert_hub, bert_keras_hub)",
    "model.text_cache": "model.text_encoder.cache (bert_hub, bert_keras_hub)",
    "model.composeae_loss_weights": "model.composer.loss_weights (composeae, composeae_real)",
    "model.composeae_dropout": "model.composer.dropout (composeae)",
    "data.css_size": "data.dataset.size (css)",
    "data.css_seed": "data.dataset.seed (css)",
    "data.css_images": "data.dataset.images (css)",
    "data.css_shift": "data.dataset.shift (css)",
    "data.sampler": "data.dataset.sampler (css)",
    # the GA keys below (ga.l1 and ga.l2 are now the l1 and l2 methods' own sections)
    **{f"ga.{old}": f"ga.{method}.{key}" for old, (method, key) in GA_OLD_KEYS.items() if old != method},
}


def _to_plain(value):
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


class _Typed:
    """A `--set` value YAML read as a boolean, a number or a date, with the text as typed: a text
    key takes the text (`--set data.root=yes` is the folder 'yes', `train.out=010` is '010')."""

    __slots__ = ("value", "text")

    def __init__(self, value, text: str):
        self.value, self.text = value, text

    def __repr__(self):
        return repr(self.value)


def _type_name(field: dataclasses.Field) -> str:
    """The declared type as written: 'int', 'Optional[str]', 'tuple', ..."""
    typ = field.type
    if isinstance(typ, str):
        return typ
    if isinstance(typ, type):
        return typ.__name__
    return str(typ).replace("typing.", "")


def is_tuple_field(field: dataclasses.Field) -> bool:
    """Whether the config reads this settings field as a tuple (a YAML list, or "a,b" text)."""
    default = field.default if field.default is not dataclasses.MISSING else None
    return _kind(default, _type_name(field)) == "tuple"


def _kind(default, typ: str) -> Optional[str]:
    """bool | tuple | float | int | str, or None for a type the config does not convert."""
    if isinstance(default, bool) or "bool" in typ:
        return "bool"
    if isinstance(default, tuple) or "tuple" in typ:
        return "tuple"
    if isinstance(default, float) or "float" in typ:
        return "float"
    if (isinstance(default, int) and not isinstance(default, bool)) or "int" in typ:
        return "int"
    if isinstance(default, str) or "str" in typ:
        return "str"
    return None


_EXPECTED = {"int": "an int (a whole number)", "float": "a float (a number)", "str": "text (str)"}


def _a(value) -> str:
    """'a list', 'an int', ...: what a YAML value is, for an error message."""
    name = type(value).__name__
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


def _coerce(section: str, field: dataclasses.Field, value, where: str):
    """Convert a YAML/CLI value to the field's declared type, or explain what was expected."""
    default = field.default if field.default is not dataclasses.MISSING else None
    typ = _type_name(field)
    key = f"{section}.{field.name}"
    text = None
    if isinstance(value, _Typed):
        value, text = value.value, value.text
    if value is None:
        if "Optional" in typ:
            return None
        raise ConfigError(f"{where}: {key} cannot be null (expected {typ})")
    kind = _kind(default, typ)
    if kind is None:
        return value
    if isinstance(value, dict):
        raise ConfigError(f"{where}: {key} is a single value ({typ}), not a section of keys; got {value!r}. "
                          f"Set it as {key}=VALUE")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        low = str(value).lower() if isinstance(value, (str, int)) else None
        if low in ("true", "yes", "1", "on"):
            return True
        if low in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{where}: {key}={value!r}: expected true or false (or 1 / 0)")
    if kind == "str" and text is not None:
        return text
    if isinstance(value, bool) and kind in _EXPECTED:
        # YAML reads an unquoted true/false/yes/no/on/off as a boolean, which Python would turn
        # into 1 / 0 (`train.steps: yes` training 1 step) or the text 'True'
        hint = "; YAML reads an unquoted yes/no/on/off/true/false as a boolean: quote the text ('yes')" \
            if kind == "str" else ""
        raise ConfigError(f"{where}: {key}={value!r} is a boolean; expected {_EXPECTED[kind]}{hint}")
    if isinstance(value, (list, tuple)) and kind in _EXPECTED:
        raise ConfigError(f"{where}: {key}={value!r} is a list; expected {_EXPECTED[kind]}")
    try:
        if kind == "tuple":
            if isinstance(value, str):
                items = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
                value = [_yaml_item(v) for v in items]
            if not isinstance(value, (list, tuple)):
                value = [value]
            return tuple(value)
        if kind == "float":
            return float(value)
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        return str(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{where}: {key}={value!r} is not a valid {typ}") from None


def _yaml_item(text: str):
    """One item of a comma-separated tuple value, read as YAML (the text itself if it is not YAML)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text.strip()


def merge_dict(cfg: Config, updates: dict, where: str = "config") -> Config:
    """Apply a nested dict {section: {key: value}} onto `cfg` (in place) and return it."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {type(updates).__name__}")
    sections = {f.name: f for f in dataclasses.fields(cfg)}
    for section, values in updates.items():
        if section not in sections:
            raise ConfigError(
                f"{where}: unknown config section {section!r}; valid sections: {sorted(sections)}"
            )
        if values is None:  # a section whose keys are all commented out
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping of keys, got {_a(values)} "
                              f"({values!r}); write it as {section}: {{key: value}} or one key a line below it")
        sub = getattr(cfg, section)
        fields = {f.name: f for f in dataclasses.fields(sub) if not f.name.startswith("_")}
        for key, value in values.items():
            if isinstance(sub, GAConfig) and key == "methods" and isinstance(value, (list, tuple)):
                value = ",".join(str(v) for v in value)  # methods: [adversarial, isotropic]
            current = getattr(sub, key, None) if key in fields else None
            if isinstance(current, OneOf):
                current.update(value, where, f"{section}.{key}")
            elif key in fields:
                setattr(sub, key, _coerce(section, fields[key], value, where))
            elif isinstance(sub, GAConfig) and _is_ga_method(key):
                _update_settings(sub.settings(key), value, where, f"ga.{key}")
            else:
                moved = MOVED_KEYS.get(f"{section}.{key}")
                hint = f"; it moved to {moved}" if moved else ""
                extra = ""
                if isinstance(sub, GAConfig):
                    extra = f", or a GA method's section {GA_METHODS.names()}"
                raise ConfigError(
                    f"{where}: unknown config key {section}.{key}{hint}; valid keys in {section!r}: "
                    f"{sorted(fields)}{extra}"
                )
    return cfg


def _is_ga_method(name) -> bool:
    return name in GA_METHODS


def _update_settings(settings, value, where, key):
    fields = {f.name: f for f in dataclasses.fields(settings)} if settings is not None else {}
    if value is None:  # a section whose keys are all commented out
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key} must be a mapping of its keys {sorted(fields) or '(none)'}")
    for name, item in value.items():
        if name not in fields:
            raise ConfigError(f"{where}: unknown key {key}.{name}; its keys: {sorted(fields) or 'none'}")
        setattr(settings, name, _coerce(key, fields[name], item, where))


def parse_override(text: str) -> dict:
    """'train.steps=100' -> {'train': {'steps': 100}}; deeper keys nest
    ('model.image_encoder.weights=D' -> {'model': {'image_encoder': {'weights': 'D'}}}).
    The value is read as YAML."""
    return _parse_override(text, keep_text=False)


def _parse_override(text: str, keep_text: bool = True) -> dict:
    """parse_override; with `keep_text`, a value YAML reads as a boolean, number or date also
    keeps the text typed, which a text key takes as it is (see _Typed)."""
    if not isinstance(text, str):
        raise ConfigError(f"override {text!r}: expected a 'section.key=value' string")
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    path, raw = text.split("=", 1)
    parts = path.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {text!r}: expected section.key=value (e.g. train.steps=100)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if keep_text and isinstance(value, (bool, int, float, datetime.date)):
        value = _Typed(value, raw.strip())
    for part in reversed(parts[1:]):
        value = {part: value}
    return {parts[0]: value}


class _ConfigLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key written twice in one mapping (YAML would keep the last
    silently: `steps: 100` further down overriding `steps: 5000`). Keys merged in with `<<:` may
    still be overridden."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = key_node.value
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} is written twice in one mapping (first on line {seen[key] + 1}); "
                        f"keep one", key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong and where."""
    problem = getattr(e, "problem", None)
    if not problem:
        return " ".join(str(e).split())
    context = getattr(e, "context", None)
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{context}: {problem}{where}" if context else f"{problem}{where}"


def load_yaml(path) -> dict:
    """A config file's top-level mapping ({} for an empty file)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = yaml.load(f, Loader=_ConfigLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (an invalid byte at offset {e.start}); "
                          f"save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path}: expected a mapping of sections (data:, model:, train:, ...) at the top level, "
            f"got {_a(data)}"
        )
    return data


def repo_configs_dir() -> Path:
    """The `configs/` folder next to the package (a source checkout or editable install)."""
    return Path(__file__).resolve().parent.parent / "configs"


def load_config(paths=(), overrides=(), base: Optional[Config] = None) -> Config:
    """Defaults <- each YAML in `paths` (a file may name `base:` files to include) <- overrides."""
    cfg = base.copy() if base is not None else Config()
    for path in paths:
        _apply_file(cfg, Path(path))
    for item in overrides:
        update = _parse_override(item) if isinstance(item, str) else item
        merge_dict(cfg, update, where=f"--set {item}" if isinstance(item, str) else "override")
    validate(cfg)
    return cfg


def _apply_file(cfg: Config, path: Path, including: tuple = ()):
    """Apply a config file after its `base:` files; `including` is the chain of files that
    include it (a file may be the base of several, but never of itself)."""
    resolved = path.resolve()
    if resolved in including:
        raise ConfigError(f"config file {path} includes itself (through {' -> '.join(p.name for p in including)})")
    data = load_yaml(path)
    data.pop("study", None)  # a study's rows (tools/ablate.py --study, keras_irtf.training.ablation): not training keys
    bases = data.pop("base", None)
    if bases is None or bases == "":
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"config file {path}: base: expected a file name or a list of file names, got {bases!r}")
    for b in bases:
        _apply_file(cfg, (path.parent / b).resolve(), including + (resolved,))
    merge_dict(cfg, data, where=str(path))


# Choices of the plain keys, from each section's CHOICES. The registered kinds' keys declare theirs
# in their settings dataclass (a class attribute CHOICES = {key: (...)}; a tuple key's every item),
# and may add a validate(self) method.
_SECTIONS = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "ga": GAConfig, "optim": OptimConfig,
             "train": TrainConfig, "eval": EvalConfig}
_CHOICES = {(section, key): values for section, cls in _SECTIONS.items() for key, values in cls.CHOICES.items()}


def choices(key: str) -> tuple:
    """The values a plain key ("train.precision", "ga.point", ...) may take."""
    section, _, name = key.partition(".")
    return _SECTIONS[section].CHOICES[name]


def _check_settings(settings, key: str):
    if settings is None:
        return
    for name, domain in getattr(settings, "DOMAINS", {}).items():
        value = getattr(settings, name)
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                _check_number(f"{key}.{name}[{i}]", item, domain)
        elif value is not None:
            _check_number(f"{key}.{name}", value, domain)
    for name, choices in getattr(settings, "CHOICES", {}).items():
        value = getattr(settings, name)
        if value is None:  # an Optional key left unset: its default applies
            continue
        if isinstance(value, (list, tuple)):  # a tuple key: every item is one of the choices
            for i, item in enumerate(value):
                if str(item) not in choices:
                    raise ConfigError(f"{key}.{name}[{i}]={item!r}: expected items among {list(choices)}")
        elif str(value) not in choices:
            raise ConfigError(f"{key}.{name}={str(value)!r}: expected one of {list(choices)}")
    check = getattr(settings, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None


def validate(cfg: Config):
    """Every value in its domain; every named composer, encoder, dataset, loss and GA method
    registered (keras_irtf.registry)."""
    for (section, key), choices in _CHOICES.items():
        value = str(getattr(getattr(cfg, section), key))
        if value not in choices:
            raise ConfigError(f"{section}.{key}={value!r}: expected one of {list(choices)}")
    for key, one_of in (("data.dataset", cfg.data.dataset), ("model.composer", cfg.model.composer),
                        ("model.image_encoder", cfg.model.image_encoder),
                        ("model.text_encoder", cfg.model.text_encoder)):
        one_of.settings  # noqa: B018  (the selected type's, defaults included)
        for type_name, settings in one_of._settings.items():  # and every type given keys
            _check_settings(settings, key if type_name == one_of.type else f"{key}.{type_name}")
    if cfg.loss.kind not in RETRIEVAL_LOSSES:
        raise ConfigError(f"loss.kind={cfg.loss.kind!r}: expected one of {RETRIEVAL_LOSSES.names()}")
    for method in parse_ga_methods(cfg.ga.methods):
        cfg.ga.settings(method)
    for method, settings in cfg.ga._settings.items():  # the selected methods and any given keys
        _check_settings(settings, f"ga.{method}")
    if cfg.train.batch_size < 2:
        raise ConfigError("train.batch_size must be >= 2 (the batch supplies the negatives)")
    if cfg.train.steps < 1:
        raise ConfigError("train.steps must be >= 1")
    validate_numeric_domains(cfg)


# ---- numeric domains -----------------------------------------------------------------------------
# (section, key) -> (lowest, lowest allowed?, highest, highest allowed?[, why]); None = unbounded.
# Every float must also be finite, and no number may be a boolean. None values of Optional keys
# are not checked. `why`, when given, is shown with the limits: the upper bounds of sizes keep a
# typo (an extra zero) from making numpy or TensorFlow try to allocate terabytes, and are far
# above anything a real experiment uses.
# A registered kind's settings dataclass declares its own as a class attribute
# DOMAINS = {key: domain} (tuples: every item).
POSITIVE, NON_NEGATIVE = (0, False, None, False), (0, True, None, False)
FRACTION = (0, True, 1, False)  # [0, 1)
AT_LEAST_ONE = (1, True, None, False)
_POSITIVE, _NON_NEGATIVE, _FRACTION = POSITIVE, NON_NEGATIVE, FRACTION
MAX_IMAGE_SIZE = 4096
MAX_EMBED_DIM = 16384
MAX_TEXT_LENGTH = 4096
MAX_BATCH_SIZE = 65536
MAX_K = 10000
MAX_SEED = 2**32 - 1
# one batch of images as the encoder sees them: batch x side^2 x 3 channels x 4 bytes (float32)
MAX_IMAGE_BATCH_BYTES = 64 * 2**30
# one block of similarity scores in retrieval: query_chunk x gallery_chunk float32
MAX_SCORE_BLOCK = 2**32
NUMERIC_DOMAINS = {
    # and at least the encoder's minimum (below)
    ("data", "image_size"): (1, True, MAX_IMAGE_SIZE, True,
                             f"the side of the square image the encoder reads; one {MAX_IMAGE_SIZE} x "
                             f"{MAX_IMAGE_SIZE} image is already 192 MiB as float32"),
    ("data", "train_recall_queries"): (1, True, None, False),
    ("data", "max_train_queries"): (2, True, None, False),
    ("data", "validation_fraction"): _FRACTION,
    ("model", "embed_dim"): (1, True, MAX_EMBED_DIM, True,
                             f"the width of the joint embedding; a {MAX_EMBED_DIM} x {MAX_EMBED_DIM} float32 "
                             f"weight matrix is already 1 GiB"),
    ("model", "max_text_length"): (1, True, MAX_TEXT_LENGTH, True,
                                   "tokens kept per text; BERT reads at most 512, CLIP 77"),
    ("model", "initial_scale"): _POSITIVE,
    ("loss", "eta"): _NON_NEGATIVE,
    ("optim", "learning_rate"): _POSITIVE,
    ("optim", "momentum"): _FRACTION,
    ("optim", "weight_decay"): _NON_NEGATIVE,
    ("optim", "decay_factor"): _POSITIVE,
    ("optim", "backbone_lr_multiplier"): _NON_NEGATIVE,
    ("optim", "finetune_lr_multiplier"): _NON_NEGATIVE,
    ("optim", "clipnorm"): _POSITIVE,
    ("train", "batch_size"): (2, True, MAX_BATCH_SIZE, True,
                              "the batch classification scores every pair of the batch: batch_size^2 "
                              f"logits, 16 GiB at {MAX_BATCH_SIZE}"),
    ("train", "steps"): (1, True, None, False),
    ("train", "steps_per_epoch"): (1, True, None, False),
    ("train", "seed"): (0, True, MAX_SEED, True, "the range of Keras' random seeds"),
    ("train", "backup_every_steps"): _NON_NEGATIVE,  # 0 = only at epoch ends
    ("train", "log_every_steps"): (1, True, None, False),
    ("train", "collective_timeout_seconds"): _POSITIVE,
    ("eval", "alpha"): _NON_NEGATIVE,
    ("eval", "batch_size"): (1, True, MAX_BATCH_SIZE, True, "images or texts embedded per step"),
    ("eval", "query_chunk"): (1, True, None, False),
    ("eval", "gallery_chunk"): (1, True, None, False),
}
# tuple keys whose every item has a domain
NUMERIC_ITEM_DOMAINS = {
    ("optim", "decay_steps"): (1, True, None, False),
    ("eval", "ks"): (1, True, MAX_K, True, "recall at K keeps K gallery ids and scores per query"),
    ("eval", "whm_ks"): (1, True, MAX_K, True, "recall at K keeps K gallery ids and scores per query"),
}


def _domain_text(domain) -> str:
    low, low_in, high, high_in = domain[:4]
    parts = []
    if low is not None:
        parts.append(f"{'>=' if low_in else '>'} {low}")
    if high is not None:
        parts.append(f"{'<=' if high_in else '<'} {high}")
    why = f" ({domain[4]})" if len(domain) > 4 and domain[4] else ""
    return "a finite number " + " and ".join(parts) + why


def _check_number(key: str, value, domain):
    low, low_in, high, high_in = domain[:4]
    if isinstance(value, bool):  # Python would take True for 1
        raise ConfigError(f"{key}={value!r} is a boolean; expected {_domain_text(domain)}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r}: expected {_domain_text(domain)}") from None
    bad = not math.isfinite(number)
    bad = bad or (low is not None and (number < low or (number == low and not low_in)))
    bad = bad or (high is not None and (number > high or (number == high and not high_in)))
    if bad:
        raise ConfigError(f"{key}={value!r}: expected {_domain_text(domain)}")


def min_image_size(cfg: Config) -> int:
    """The smallest data.image_size the configured image encoder turns into a feature (its
    classmethod `min_image_size(settings)`)."""
    encoder = cfg.model.image_encoder
    return int(encoder.entry().obj.min_image_size(encoder.settings))


def validate_numeric_domains(cfg: Config):
    """Refuse numbers outside their domain (NaN, infinite, negative rates, ...) at config time,
    naming the key and what was expected, instead of failing later with an unrelated message."""
    for (section, key), domain in NUMERIC_DOMAINS.items():
        value = getattr(getattr(cfg, section), key)
        if value is not None:
            _check_number(f"{section}.{key}", value, domain)
    for (section, key), domain in NUMERIC_ITEM_DOMAINS.items():
        for i, item in enumerate(getattr(getattr(cfg, section), key) or ()):
            _check_number(f"{section}.{key}[{i}]", item, domain)
    side = cfg.data.image_size
    for section in ("train", "eval"):
        batch = getattr(cfg, section).batch_size
        size = batch * side * side * 3 * 4
        if size > MAX_IMAGE_BATCH_BYTES:
            raise ConfigError(
                f"{section}.batch_size={batch} images of data.image_size={side} are {size / 2**30:.1f} GiB per batch "
                f"(batch x side^2 x 3 channels x 4 bytes of float32); at most {MAX_IMAGE_BATCH_BYTES // 2**30} GiB: "
                f"lower data.image_size or {section}.batch_size"
            )
    block = cfg.eval.query_chunk * cfg.eval.gallery_chunk
    if block > MAX_SCORE_BLOCK:
        raise ConfigError(
            f"eval.query_chunk={cfg.eval.query_chunk} x eval.gallery_chunk={cfg.eval.gallery_chunk} = {block} "
            f"similarity scores per retrieval step ({block * 4 / 2**30:.1f} GiB of float32); at most "
            f"{MAX_SCORE_BLOCK} ({MAX_SCORE_BLOCK * 4 // 2**30} GiB): lower either"
        )
    need = min_image_size(cfg)
    if cfg.data.image_size < need:
        settings = {k: v for k, v in cfg.model.image_encoder.to_dict().items() if k != "type"}
        raise ConfigError(
            f"data.image_size={cfg.data.image_size} is below what model.image_encoder="
            f"{cfg.model.image_encoder.type!r} accepts (>= {need}" + (f" with {settings})" if settings else ")")
        )


def default_cache_dir(cfg: Config) -> Path:
    return Path(cfg.data.cache_dir or os.environ.get("KERAS_IRTF_CACHE") or "data/cache")


def default_run_name(cfg: Config) -> str:
    ga = "+".join(cfg.ga_methods)
    parts = [cfg.data.dataset.type, cfg.model.method]
    if cfg.loss.eta > 0:
        parts.append("ls")
    if ga:
        parts.append(ga.replace("+", "-"))
    if cfg.train.preset:  # the smoke run and the full run must not share a folder
        parts.append(str(cfg.train.preset))
    parts.append(f"s{cfg.train.seed}")
    return "_".join(parts)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
