"""Datasets in their official layouts, the built-in CSS generator, and the tf.data pipelines.

Datasets are registered by name (keras_irtf.registry.register_dataset): css, mitstates,
fashion200k, fashioniq, cirr, triplets, and any a user's module adds.
"""

from __future__ import annotations

from keras_irtf.data.base import DatasetError, Queries, RetrievalDataset, Split


def load_dataset(cfg, image_size=None, verbose: bool = True) -> RetrievalDataset:
    """The dataset named by `cfg.data.dataset` (a keras_irtf.config.Config), with its images at
    `image_size` (default: data.image_size; the assembler passes the image encoder's size)."""
    entry = cfg.data.dataset.entry()
    size = int(image_size or cfg.data.image_size)
    return entry.obj.from_settings(cfg.data.dataset.settings, cfg, size, verbose)


def check_dataset(cfg):
    """Fail fast, before TensorFlow is imported, when a dataset that must be downloaded is absent:
    DatasetError names the expected layout, where the dataset is published and the flag to use."""
    cfg.data.dataset.entry().obj.check(cfg.data.dataset.settings, cfg)


__all__ = ["check_dataset", "DatasetError", "Queries", "RetrievalDataset", "Split", "load_dataset"]
