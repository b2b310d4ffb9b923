"""Stable entry points for user scripts: config -> data -> model -> `model.fit` -> evaluate -> save.

    import keras
    import keras_irtf as kirtf

    cfg = kirtf.load_config(["configs/css.yaml", "configs/presets/smoke.yaml"])
    bench = kirtf.load_benchmark(cfg)                 # the dataset, its text input, tf.data pipelines
    model = kirtf.create_model(cfg, bench)            # built and compiled as tools/train.py does
    model.fit(bench.train_dataset(steps=40), epochs=2, steps_per_epoch=20, shuffle=False,
              validation_data=bench.validation_dataset(),
              callbacks=[keras.callbacks.CSVLogger("log.csv")])
    metrics = bench.evaluate(model)                   # Recall@K (test, train) and WHM
    run = kirtf.save_run(model, cfg, bench, "runs/mine")    # tools/evaluate.py and tools/export.py read it
    model = kirtf.load_model(run / "model.keras")

A Benchmark is the assembler (keras_irtf.experiment.Experiment) that `keras_irtf.training.train`
and tools/train.py use: a model fitted from a user script trains with the same model, optimizer
(pretrained layers' learning-rate multiplier included), loss, gradient augmentation and data order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from keras_irtf.config import Config
from keras_irtf.experiment import Experiment, load_model, save_model
from keras_irtf.serving.export import export_run as _export

Benchmark = Experiment  # the name user scripts know it by


def load_benchmark(cfg: Config, vocabulary=None, verbose: bool = False) -> Experiment:
    """The dataset named by the config and its text input: a vocabulary built from the training
    texts, or read from `vocabulary` (a run's vocab.txt) to reproduce a trained model's token ids.
    (A frozen BERT's text input is made by create_model, which needs the encoder.)"""
    bench = Experiment(cfg, verbose=verbose)
    bench.dataset  # noqa: B018  (load it now: a missing dataset fails here, not inside fit)
    bench.build_text_input(vocabulary=vocabulary)
    return bench


def create_model(cfg: Config, vocab, compile: bool = True):
    """A ComposedRetrievalModel as the config describes, built, and compiled with the config's
    optimizer (pretrained layers at optim.backbone_lr_multiplier) unless `compile=False`.
    `vocab` is a Benchmark (whose text input it completes: a frozen BERT's text cache), a
    TextVectorizer or a vocabulary size."""
    if isinstance(vocab, Experiment):
        bench = vocab
        model = bench.build_model()
    else:
        bench = Experiment(cfg, verbose=False)
        model = bench.build_model(int(getattr(vocab, "vocab_size", vocab)))
    if compile:
        bench.compile(model)
    if isinstance(vocab, Experiment):
        bench.attach_text_input(model)
    return model


def save_run(model, cfg: Config, benchmark: Experiment, run_dir, metrics: Optional[dict] = None) -> Path:
    """Write a run folder (config.yaml, vocab.txt, model.keras[, metrics.json]) like
    tools/train.py does, so tools/evaluate.py, tools/export.py and tools/query.py accept it."""
    if benchmark.cfg is not cfg:  # the config to record is the one given
        other = Experiment(cfg, dataset=benchmark._dataset, verbose=False)
        other.vectorizer = benchmark.vectorizer
        benchmark = other
    return benchmark.save_run(model, run_dir, metrics)


def export_run(run_dir, out_root="exported", name=None, gallery=None, version=None, force=False,
               verbose=True) -> Path:
    """Export a run folder as a TF Serving SavedModel (see keras_irtf.serving.export)."""
    return _export(run_dir, out_root=out_root, name=name, gallery=gallery, version=version, force=force,
                   verbose=verbose)


__all__ = ["Benchmark", "create_model", "export_run", "load_benchmark", "load_model", "save_model", "save_run"]
