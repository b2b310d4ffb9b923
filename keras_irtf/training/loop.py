"""Building models and optimizers from a config, and the training run behind tools/train.py.

    from keras_irtf import load_config, train
    run_dir, metrics = train(load_config(["configs/css.yaml"], ["train.steps=500"]))

A run folder holds: config.yaml (resolved), vocab.txt, model.keras, metrics.json, logs/
(TensorBoard) and backup/ (for resuming an interrupted run).
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import keras

from keras_irtf.config import Config, default_run_name, to_yaml
from keras_irtf.utils import atomic_write_text, write_json


def build_model(cfg: Config, vocab_size: int):
    """A ComposedRetrievalModel as the config describes (not yet built or compiled)."""
    from keras_irtf.config import ConfigError
    from keras_irtf.model.gradient_augmentation import GradientAugmentation
    from keras_irtf.layers import COMPOSERS, LSTMTextEncoder, ResNet18Encoder, ScaledL2Normalization, SmallCNNEncoder
    from keras_irtf.model.retrieval_model import ComposedRetrievalModel

    m = cfg.model
    if m.image_encoder == "small_cnn":
        image_encoder = SmallCNNEncoder(m.cnn_filters, m.embed_dim, m.cnn_stem_stride, name="image_encoder")
    elif m.image_encoder == "resnet18" and m.image_weights:
        from keras_irtf.layers.pretrained import PretrainedImageEncoder

        image_encoder = PretrainedImageEncoder.from_preset(m.image_weights, m.embed_dim, name="image_encoder")
        print(f"image encoder: pretrained keras-hub backbone from {image_encoder.preset}", flush=True)
    elif m.image_encoder == "resnet18":
        print("image encoder: ResNet-18 from random initialisation (no --image-weights / model.image_weights)",
              flush=True)
        image_encoder = ResNet18Encoder(m.embed_dim, name="image_encoder")
    else:
        raise ConfigError(f"model.image_encoder={m.image_encoder!r}: expected 'small_cnn' or 'resnet18'")
    if m.image_weights and m.image_encoder != "resnet18":
        raise ConfigError(f"model.image_weights is set but model.image_encoder={m.image_encoder!r}: pretrained "
                          f"weights need model.image_encoder=resnet18")
    if m.text_encoder == "lstm":
        ga_point_text = cfg.ga.point == "text_feature" and bool(set(cfg.ga_methods) & {"adversarial", "fgsm"})
        text_encoder = LSTMTextEncoder(
            vocab_size, m.word_embed_dim, m.text_hidden_dim, m.embed_dim, m.dropout,
            use_cudnn=False if ga_point_text else "auto", name="text_encoder",
        )
    elif m.text_encoder in ("bert_hub", "bert_keras_hub"):
        text_encoder = build_bert_encoder(cfg)
    else:
        raise ConfigError(f"model.text_encoder={m.text_encoder!r}: expected 'lstm', 'bert_hub' or 'bert_keras_hub'")
    if m.method not in COMPOSERS:
        raise ConfigError(f"model.method={m.method!r}: expected one of {sorted(COMPOSERS)}")
    composer_cls = COMPOSERS[m.method]
    extra = {"loss_weights": tuple(m.composeae_loss_weights)} if m.method.startswith("composeae") else {}
    if m.method == "composeae":
        extra["dropout"] = float(m.composeae_dropout)
    composer = composer_cls(output_dim=m.embed_dim, name="composer", **extra)
    g = cfg.ga
    ga = GradientAugmentation(
        methods=g.methods, eps=g.eps, attack_norm=g.attack_norm, point=g.point, gamma=g.gamma,
        noise_scaling=g.noise_scaling, mode=g.mode, fgsm_eps=g.fgsm_eps, l1=g.l1, l2=g.l2,
        seed=cfg.train.seed, name="gradient_augmentation",
    )
    return ComposedRetrievalModel(
        image_encoder, text_encoder, composer,
        normalization=ScaledL2Normalization(m.initial_scale, name="normalization"),
        gradient_augmentation=ga, retrieval_loss=cfg.loss.kind, eta=cfg.loss.eta,
        similarity_reduction=cfg.loss.similarity_reduction, image_size=cfg.data.image_size,
        max_text_length=m.max_text_length, name=f"{m.method}_retrieval",
    )


def build_bert_encoder(cfg: Config):
    """The frozen BERT text encoder of model.text_encoder = bert_hub | bert_keras_hub."""
    from keras_irtf.config import ConfigError
    from keras_irtf.layers.bert import HubBertEncoder, KerasHubBertEncoder

    m = cfg.model
    try:
        if m.text_encoder == "bert_hub":
            return HubBertEncoder(m.bert_preprocess, m.bert_encoder, m.bert_dim, m.bert_seq_length or None,
                                  name="text_encoder")
        return KerasHubBertEncoder(m.bert_preset, m.bert_dim, m.bert_seq_length or None, name="text_encoder")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def text_input_for(cfg: Config, dataset, run=None, verbose=True):
    """(vectorizer for the pipelines, vocabulary size) of the configured text encoder.

    LSTM: a TextVectorizer over the training texts (saved as run/vocab.txt). BERT: (None, 0);
    the vectorizer comes from `keras_irtf.data.text_cache.prepare_text_input` once the model exists.
    """
    from keras_irtf.data.text import TextVectorizer

    if cfg.model.text_encoder != "lstm":
        return None, 0
    vectorizer = TextVectorizer.from_texts(dataset.training_texts(), cfg.model.max_text_length)
    if run is not None:
        vectorizer.save(run / "vocab.txt")
    return vectorizer, vectorizer.vocab_size


def make_optimizer(cfg: Config, model=None):
    """The optimizer of `cfg.optim`; given the model, its pretrained image layers train at
    `optim.backbone_lr_multiplier` times the learning rate."""
    o = cfg.optim
    lr = o.learning_rate
    if o.decay_steps:
        bounds = [int(s) for s in o.decay_steps]
        lr = keras.optimizers.schedules.PiecewiseConstantDecay(
            bounds, [o.learning_rate * o.decay_factor**i for i in range(len(bounds) + 1)]
        )
    extra = {"clipnorm": o.clipnorm} if o.clipnorm else {}
    if o.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(lr, momentum=o.momentum, weight_decay=o.weight_decay or None, **extra)
    else:
        optimizer = keras.optimizers.Adam(lr, weight_decay=o.weight_decay or None, **extra)
    if model is not None:
        from keras_irtf.model.optimizers import pretrained_learning_rate_groups, with_learning_rate_multipliers

        groups = pretrained_learning_rate_groups(model, o.backbone_lr_multiplier)
        if groups:
            optimizer = with_learning_rate_multipliers(optimizer, groups)
    return optimizer


def sample_batch(dataset, vectorizer, cfg: Config, batch_size=None):
    """One training batch (for building a model before loading weights, and for tests)."""
    from keras_irtf.data.pipeline import training_dataset

    ds = training_dataset(dataset, vectorizer, batch_size or cfg.train.batch_size, 1, cfg.train.seed,
                          cfg.data.image_size, cfg.train.pairs_per_source)
    return next(iter(ds))


def run_dir_for(cfg: Config) -> Path:
    return Path(cfg.train.out or os.path.join("runs", default_run_name(cfg)))


def train(cfg: Config, verbose: int = 1, callbacks=(), dataset=None):
    """Train, save, evaluate. Returns (run folder, metrics dict); metrics is None on a
    multi-worker run's non-chief workers (the chief writes the run folder).

    `dataset`: an already loaded dataset for `cfg.data` (saves reloading it when many runs share
    one, as tools/ablate.py does); by default it is loaded from the config.

    Re-running the same config after a crash continues from `<run>/backup/` (exactly: same
    batches, optimizer state, learning-rate schedule and random generators).
    """
    from keras_irtf.training.backup import StopOnNonFiniteLoss, TrainingBackup, latest_backup, restore_backup
    from keras_irtf.data import load_dataset
    from keras_irtf.data.pipeline import training_dataset
    from keras_irtf.training.distribute import check_batch, is_multi_worker, make_strategy, worker_dataset, worker_info
    from keras_irtf.evaluation.protocol import evaluate

    strategy = make_strategy(cfg.train.strategy, cfg.train.devices)
    check_batch(cfg.train.batch_size, strategy)
    multi_worker = is_multi_worker(strategy)
    _, _, chief = worker_info() if multi_worker else (0, 1, True)

    run = run_dir_for(cfg)
    if chief:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run / "config.yaml", to_yaml(cfg))
    keras.utils.set_random_seed(cfg.train.seed)

    if dataset is None:
        dataset = load_dataset(cfg, verbose=bool(verbose) and chief)
    vectorizer, vocab_size = text_input_for(cfg, dataset, run if chief else None, verbose)

    with strategy.scope():
        model = build_model(cfg, vocab_size)
        model.compile(optimizer=make_optimizer(cfg, model), jit_compile=cfg.train.jit_compile)
        model.optimizer.build(model.trainable_variables)
    if vectorizer is None:  # frozen BERT: embed each distinct text of the run once (text_cache)
        from keras_irtf.data.text_cache import prepare_text_input, texts_of_run

        vectorizer = prepare_text_input(model.text_encoder, texts_of_run(dataset), cfg.model.text_cache,
                                        verbose=bool(verbose) and chief)

    spe = min(cfg.train.steps_per_epoch, cfg.train.steps)
    total = math.ceil(cfg.train.steps / spe) * spe
    start, prior_seconds = 0, 0.0
    resume = latest_backup(run / "backup")
    if resume is not None:
        start, prior_seconds = restore_backup(model, resume), resume["train_seconds"]
        if verbose and chief:
            print(f"resuming {run} from its backup at step {start} of {total}", flush=True)

    def batches(first, last):
        def make(index, num_shards, _per_shard):
            return training_dataset(dataset, vectorizer, cfg.train.batch_size, last, cfg.train.seed,
                                    cfg.data.image_size, cfg.train.pairs_per_source, start_step=first,
                                    shard=(index, num_shards))

        return worker_dataset(strategy, make, cfg.train.batch_size) if multi_worker else make(0, 1, None)

    backup = TrainingBackup(run / "backup", cfg.train.backup_every_steps, enabled=chief, prior_seconds=prior_seconds)
    cbs = [StopOnNonFiniteLoss(), backup]
    from keras_irtf.training.callbacks import TrainingScalars

    every = cfg.train.log_every_steps
    if chief:
        cbs.append(keras.callbacks.TensorBoard(log_dir=str(run / "logs"), update_freq=every))
    # on every worker: its reads of the trackers are collectives under multi-worker training
    cbs.append(TrainingScalars(run / "logs" / "train", every_n_steps=every, write=chief))
    cbs += list(callbacks)
    fit_kw = dict(callbacks=cbs, verbose=verbose if chief else 0, shuffle=False)
    history = None
    # a run resumed mid-epoch first completes that epoch, then continues epoch by epoch
    partial = (spe - start % spe) % spe
    if partial:
        history = model.fit(batches(start, start + partial), epochs=1, steps_per_epoch=partial, **fit_kw)
    if start + partial < total:
        history = model.fit(batches(start + partial, total), initial_epoch=(start + partial) // spe,
                            epochs=total // spe, steps_per_epoch=spe, **fit_kw)
    train_seconds = backup.seconds()
    if multi_worker:
        # every worker prints a digest of its final weights: in lock-step they are bit-identical
        index, count, _ = worker_info()
        print(f"worker {index} of {count}: final weights sha256 {weights_digest(model)}", flush=True)
    if not chief:
        return run, None

    save_model(model, run / "model.keras")
    result = evaluate(
        model, dataset, vectorizer, ks=cfg.eval.ks, whm_ks=cfg.eval.whm_ks or dataset.whm_ks,
        alpha=cfg.eval.alpha, train_queries=cfg.data.train_recall_queries, seed=cfg.train.seed,
        batch_size=cfg.eval.batch_size, image_size=cfg.data.image_size,
        query_chunk=cfg.eval.query_chunk, gallery_chunk=cfg.eval.gallery_chunk, verbose=bool(verbose),
        backend=cfg.eval.backend,
    )
    metrics = {
        "dataset": cfg.data.dataset,
        "method": cfg.model.method,
        "ga": list(cfg.ga_methods),
        "eta": cfg.loss.eta,
        **result,
        "steps": total,
        "batch_size": cfg.train.batch_size,
        "replicas": strategy.num_replicas_in_sync,
        "train_seconds": round(train_seconds, 2),
        "seconds_per_step": round(train_seconds / max(total - start, 1), 4) if start == 0 else None,
        "resumed_from_step": start or None,
        "final_losses": {k: float(v[-1]) for k, v in (history.history if history else {}).items()},
        "seed": cfg.train.seed,
    }
    if hasattr(model.text_encoder, "encoder_runs"):  # frozen BERT: how often it really ran
        metrics["bert_encoder_runs"] = model.text_encoder.encoder_runs
        cache = model.text_encoder.cache
        metrics["text_cache_size"] = len(cache) if cache is not None else 0
    write_json(run / "metrics.json", metrics)
    _write_eval_summary(run, metrics)
    shutil.rmtree(run / "backup", ignore_errors=True)  # the run is complete: model.keras holds it
    return run, metrics


def save_model(model, path):
    """Save a .keras file atomically (a crash never leaves a truncated model)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial.keras")
    model.save(tmp)
    os.replace(tmp, path)


def weights_digest(model) -> str:
    """sha256 of every weight's bytes, in the model's order (compares runs bit for bit)."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


def load_model(path):
    import keras_irtf.layers  # noqa: F401  (registers the classes)
    import keras_irtf.model.retrieval_model  # noqa: F401  (registers the model class)
    import keras_irtf.model.optimizers  # noqa: F401

    return keras.saving.load_model(path)


def _write_eval_summary(run, metrics):
    import tensorflow as tf

    writer = tf.summary.create_file_writer(str(run / "logs" / "eval"))
    with writer.as_default():
        for split in ("test", "train"):
            for k, v in metrics[split].items():
                tf.summary.scalar(f"{split}/{k}", v, step=metrics["steps"])
        tf.summary.scalar("whm", metrics["whm"]["value"], step=metrics["steps"])
    writer.flush()


def format_results(metrics: dict) -> str:
    """A Markdown table of a run's recalls and WHM."""
    ks = [k for k in metrics["test"] if k.startswith("R@")]
    head = "| split | " + " | ".join(ks) + " |"
    rows = [head, "|" + "---|" * (len(ks) + 1)]
    for split in [s for s in ("test", "test_shift", "train") if s in metrics]:
        rows.append(f"| {split} | " + " | ".join(f"{100 * metrics[split][k]:.1f}" for k in ks) + " |")
    w = metrics["whm"]
    rows.append("")
    rows.append(f"Mt = {100 * w['Mt']:.1f}, Ms = {100 * w['Ms']:.1f}, WHM(alpha={w['alpha']}) = {100 * w['value']:.1f}")
    return "\n".join(rows)

