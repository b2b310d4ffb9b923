"""Building models and optimizers from a config, and the training run behind tools/train.py.

    from keras_irtf import load_config, train
    run_dir, metrics = train(load_config(["configs/css.yaml"], ["train.steps=500"]))

A run folder holds: config.yaml (resolved), vocab.txt, model.keras, metrics.json, logs/
(TensorBoard) and backup/ (for resuming an interrupted run).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import keras

from keras_irtf.config import Config, default_run_name, to_yaml
from keras_irtf.utils import atomic_write_text, write_json


def build_model(cfg: Config, vocab_size: int):
    """A ComposedRetrievalModel as the config describes (not yet built or compiled)."""
    from keras_irtf.config import ConfigError
    from keras_irtf.gradient_augmentation import GradientAugmentation
    from keras_irtf.layers import COMPOSERS, LSTMTextEncoder, ResNet18Encoder, ScaledL2Normalization, SmallCNNEncoder
    from keras_irtf.model import ComposedRetrievalModel

    m = cfg.model
    if m.image_encoder == "small_cnn":
        image_encoder = SmallCNNEncoder(m.cnn_filters, m.embed_dim, m.cnn_stem_stride, name="image_encoder")
    elif m.image_encoder == "resnet18":
        image_encoder = ResNet18Encoder(m.embed_dim, name="image_encoder")
    else:
        raise ConfigError(f"model.image_encoder={m.image_encoder!r}: expected 'small_cnn' or 'resnet18'")
    if m.text_encoder != "lstm":
        raise ConfigError(f"model.text_encoder={m.text_encoder!r}: expected 'lstm'")
    ga_point_text = cfg.ga.point == "text_feature" and bool(set(cfg.ga_methods) & {"adversarial", "fgsm"})
    text_encoder = LSTMTextEncoder(
        vocab_size, m.word_embed_dim, m.text_hidden_dim, m.embed_dim, m.dropout,
        use_cudnn=False if ga_point_text else "auto", name="text_encoder",
    )
    if m.method not in COMPOSERS:
        raise ConfigError(f"model.method={m.method!r}: expected one of {sorted(COMPOSERS)}")
    composer_cls = COMPOSERS[m.method]
    composer = composer_cls(output_dim=m.embed_dim, name="composer")
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


def make_optimizer(cfg: Config):
    o = cfg.optim
    lr = o.learning_rate
    if o.decay_steps:
        bounds = [int(s) for s in o.decay_steps]
        lr = keras.optimizers.schedules.PiecewiseConstantDecay(
            bounds, [o.learning_rate * o.decay_factor**i for i in range(len(bounds) + 1)]
        )
    extra = {"clipnorm": o.clipnorm} if o.clipnorm else {}
    if o.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=o.momentum, weight_decay=o.weight_decay or None, **extra)
    return keras.optimizers.Adam(lr, weight_decay=o.weight_decay or None, **extra)


def sample_batch(dataset, vectorizer, cfg: Config, batch_size=None):
    """One training batch (for building a model before loading weights, and for tests)."""
    from keras_irtf.data.pipeline import training_dataset

    ds = training_dataset(dataset, vectorizer, batch_size or cfg.train.batch_size, 1, cfg.train.seed,
                          cfg.data.image_size, cfg.train.pairs_per_source)
    return next(iter(ds))


def run_dir_for(cfg: Config) -> Path:
    return Path(cfg.train.out or os.path.join("runs", default_run_name(cfg)))


def train(cfg: Config, verbose: int = 1, callbacks=()):
    """Train, save, evaluate. Returns (run folder, metrics dict)."""
    import tensorflow as tf

    from keras_irtf.data import load_dataset
    from keras_irtf.data.pipeline import training_dataset
    from keras_irtf.data.text import TextVectorizer
    from keras_irtf.evaluation import evaluate

    run = run_dir_for(cfg)
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / "config.yaml", to_yaml(cfg))
    keras.utils.set_random_seed(cfg.train.seed)

    dataset = load_dataset(cfg, verbose=bool(verbose))
    vectorizer = TextVectorizer.from_texts(dataset.training_texts(), cfg.model.max_text_length)
    vectorizer.save(run / "vocab.txt")

    model = build_model(cfg, vectorizer.vocab_size)
    model.compile(optimizer=make_optimizer(cfg), jit_compile=cfg.train.jit_compile)

    spe = min(cfg.train.steps_per_epoch, cfg.train.steps)
    epochs = math.ceil(cfg.train.steps / spe)
    ds = training_dataset(dataset, vectorizer, cfg.train.batch_size, epochs * spe, cfg.train.seed,
                          cfg.data.image_size, cfg.train.pairs_per_source)
    from keras_irtf.callbacks import TrainingScalars

    every = cfg.train.log_every_steps
    cbs = [keras.callbacks.TensorBoard(log_dir=str(run / "logs"), update_freq=every),
           TrainingScalars(run / "logs" / "train", every_n_steps=every)] + list(callbacks)
    start = time.time()
    history = model.fit(ds, epochs=epochs, steps_per_epoch=spe, callbacks=cbs, verbose=verbose, shuffle=False)
    train_seconds = time.time() - start

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
        "steps": epochs * spe,
        "batch_size": cfg.train.batch_size,
        "train_seconds": round(train_seconds, 2),
        "seconds_per_step": round(train_seconds / (epochs * spe), 4),
        "final_losses": {k: float(v[-1]) for k, v in history.history.items()},
        "seed": cfg.train.seed,
    }
    write_json(run / "metrics.json", metrics)
    _write_eval_summary(run, tf, metrics)
    return run, metrics


def save_model(model, path):
    """Save a .keras file atomically (a crash never leaves a truncated model)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial.keras")
    model.save(tmp)
    os.replace(tmp, path)


def load_model(path):
    import keras_irtf.layers  # noqa: F401  (registers the classes)
    import keras_irtf.model  # noqa: F401

    return keras.saving.load_model(path)


def _write_eval_summary(run, tf, metrics):
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
    for split in ("test", "train"):
        rows.append(f"| {split} | " + " | ".join(f"{100 * metrics[split][k]:.1f}" for k in ks) + " |")
    w = metrics["whm"]
    rows.append("")
    rows.append(f"Mt = {100 * w['Mt']:.1f}, Ms = {100 * w['Ms']:.1f}, WHM(alpha={w['alpha']}) = {100 * w['value']:.1f}")
    return "\n".join(rows)

