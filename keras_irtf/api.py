"""Stable entry points for user scripts: config -> data -> model -> `model.fit` -> evaluate -> save.

    import keras
    import keras_irtf as kirtf

    cfg = kirtf.load_config(["configs/css.yaml", "configs/presets/smoke.yaml"])
    bench = kirtf.load_benchmark(cfg)                 # the dataset, its vocabulary, tf.data pipelines
    model = kirtf.create_model(cfg, bench)            # built and compiled as tools/train.py does
    model.fit(bench.train_dataset(steps=40), epochs=2, steps_per_epoch=20, shuffle=False,
              validation_data=bench.validation_dataset(),
              callbacks=[keras.callbacks.CSVLogger("log.csv")])
    metrics = bench.evaluate(model)                   # Recall@K (test, train) and WHM
    run = kirtf.save_run(model, cfg, bench, "runs/mine")    # tools/evaluate.py and tools/export.py read it
    model = kirtf.load_model(run / "model.keras")

Everything here is what `keras_irtf.training.loop.train` (and so tools/train.py) uses: a model fitted
from a user script trains with the same loss, gradient augmentation and data order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from keras_irtf.config import Config, to_yaml


class Benchmark:
    """A loaded dataset with its text vectoriser, and the tf.data pipelines over it.

    Batches are dicts: "source_image", "target_image" float32 [B, S, S, 3] (ImageNet-normalised),
    "text" int32 [B, L], and int64 "source_id", "target_id", "target_caption" [B].
    """

    def __init__(self, cfg: Config, dataset, vectorizer):
        self.cfg = cfg
        self.dataset = dataset
        self.vectorizer = vectorizer

    @property
    def vocab_size(self) -> int:
        return self.vectorizer.vocab_size

    def train_dataset(self, steps: Optional[int] = None, batch_size: Optional[int] = None,
                      seed: Optional[int] = None, start_step: int = 0):
        """Exactly `steps` (default train.steps) training batches, drawn by the dataset's reference
        sampler from `seed` (default train.seed): the same seed gives the same batches. Pass it
        to `model.fit(ds, epochs=E, steps_per_epoch=S)` with E * S <= steps."""
        from keras_irtf.data.pipeline import training_dataset

        c = self.cfg
        return training_dataset(
            self.dataset, self.vectorizer, int(batch_size or c.train.batch_size), int(steps or c.train.steps),
            c.train.seed if seed is None else int(seed), c.data.image_size, c.train.pairs_per_source,
            start_step=start_step,
        )

    def validation_dataset(self, batch_size: Optional[int] = None):
        """The test queries with their target images, in order (full batches only: the batch is
        the loss's set of negatives). For `model.fit(validation_data=...)` / `model.evaluate`."""
        from keras_irtf.data.pipeline import queries_dataset

        c = self.cfg
        split = self.dataset.test
        bs = int(batch_size or c.train.batch_size)
        if len(split.test_queries) < bs:
            raise ValueError(f"the test split has {len(split.test_queries)} queries, fewer than one batch of {bs}")
        return queries_dataset(split, split.test_queries, self.vectorizer, bs, c.data.image_size,
                               drop_remainder=True, with_target=True)

    def gallery_dataset(self, split: str = "test", batch_size: Optional[int] = None):
        """Every image of a split, in id order, as normalised float32 batches (for indexing)."""
        import numpy as np

        from keras_irtf.data.pipeline import images_dataset

        s = getattr(self.dataset, split)
        return images_dataset(s, np.arange(s.num_images), int(batch_size or self.cfg.eval.batch_size),
                              self.cfg.data.image_size)

    def evaluate(self, model, verbose: bool = False) -> dict:
        """Test recall Mt, training recall Ms and their WHM, with the config's evaluation settings
        (the same numbers tools/train.py writes to metrics.json)."""
        from keras_irtf.evaluation.protocol import evaluate

        c = self.cfg
        return evaluate(
            model, self.dataset, self.vectorizer, ks=c.eval.ks, whm_ks=c.eval.whm_ks or self.dataset.whm_ks,
            alpha=c.eval.alpha, train_queries=c.data.train_recall_queries, seed=c.train.seed,
            batch_size=c.eval.batch_size, image_size=c.data.image_size, query_chunk=c.eval.query_chunk,
            gallery_chunk=c.eval.gallery_chunk, verbose=verbose,
        )


def load_benchmark(cfg: Config, vocabulary=None, verbose: bool = False) -> Benchmark:
    """The dataset named by the config and a text vectoriser: built from the training texts, or
    read from `vocabulary` (a run's vocab.txt) to reproduce a trained model's token ids."""
    from keras_irtf.data import load_dataset
    from keras_irtf.data.text import TextVectorizer

    dataset = load_dataset(cfg, verbose=verbose)
    if vocabulary is not None:
        vectorizer = TextVectorizer.load(vocabulary, cfg.model.max_text_length)
    else:
        vectorizer = TextVectorizer.from_texts(dataset.training_texts(), cfg.model.max_text_length)
    return Benchmark(cfg, dataset, vectorizer)


def create_model(cfg: Config, vocab, compile: bool = True):
    """A ComposedRetrievalModel as the config describes, built, and compiled with the config's
    optimizer unless `compile=False`. `vocab` is a Benchmark, a TextVectorizer or a vocabulary
    size."""
    from keras_irtf.training.loop import build_model, make_optimizer

    vocab_size = int(getattr(vocab, "vocab_size", vocab))
    model = build_model(cfg, vocab_size)
    if compile:
        model.compile(optimizer=make_optimizer(cfg), jit_compile=cfg.train.jit_compile)
    return model


def save_run(model, cfg: Config, benchmark: Benchmark, run_dir, metrics: Optional[dict] = None) -> Path:
    """Write a run folder (config.yaml, vocab.txt, model.keras[, metrics.json]) like
    tools/train.py does, so tools/evaluate.py, tools/export.py and tools/query.py accept it."""
    from keras_irtf.training.loop import save_model
    from keras_irtf.utils import atomic_write_text, write_json

    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / "config.yaml", to_yaml(cfg))
    benchmark.vectorizer.save(run / "vocab.txt")
    save_model(model, run / "model.keras")
    if metrics is not None:
        write_json(run / "metrics.json", metrics)
    return run


def save_model(model, path):
    """Save a .keras file (atomically)."""
    from keras_irtf.training.loop import save_model as _save

    _save(model, path)


def load_model(path):
    """Load a .keras file saved by keras_irtf (every keras_irtf class registered first)."""
    from keras_irtf.training.loop import load_model as _load

    return _load(path)


def export_run(run_dir, out_root="exported", name=None, gallery=None, version=None, force=False,
               verbose=True) -> Path:
    """Export a run folder as a TF Serving SavedModel (see keras_irtf.serving.export)."""
    from keras_irtf.serving.export import export_run as _export

    return _export(run_dir, out_root=out_root, name=name, gallery=gallery, version=version, force=force,
                   verbose=verbose)


__all__ = ["Benchmark", "create_model", "export_run", "load_benchmark", "load_model", "save_model", "save_run"]
