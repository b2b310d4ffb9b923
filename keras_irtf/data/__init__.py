"""Datasets in their official layouts, the built-in CSS generator, and the tf.data pipelines."""

from __future__ import annotations

from keras_irtf.data.base import DatasetError, Queries, RetrievalDataset, Split

DATASETS = ("css", "mitstates", "fashion200k")


def load_dataset(cfg, verbose: bool = True) -> RetrievalDataset:
    """The dataset named by `cfg.data.dataset` (a keras_irtf.config.Config)."""
    from keras_irtf.config import ConfigError, default_cache_dir

    name = cfg.data.dataset
    if name == "css":
        from keras_irtf.data.css import CSSDataset
        from keras_irtf.data.css_generator import ensure_generated

        root = cfg.data.root
        if root is None:
            root = ensure_generated(default_cache_dir(cfg), cfg.data.css_size, cfg.data.css_seed, verbose)
        dataset = CSSDataset(root, images=cfg.data.css_images, image_size=cfg.data.image_size, verbose=verbose)
        if cfg.data.max_train_queries:
            dataset.limit_training_queries(cfg.data.max_train_queries, cfg.data.css_seed)
        dataset.sampler = _sampler(cfg, ("reference", "uniform_pairs"))
        if cfg.data.css_shift:
            from keras_irtf.data.css_shift import attach_shift

            attach_shift(dataset, cfg.data.css_shift, cfg.data.css_seed, verbose=verbose)
        return dataset
    if name in ("mitstates", "fashion200k"):
        _sampler(cfg, ("reference",))
        if cfg.data.css_shift:
            raise ConfigError(f"data.css_shift is for the built-in CSS only, not {name!r}")
        if name == "mitstates":
            from keras_irtf.data.mitstates import MITStatesDataset as cls
        else:
            from keras_irtf.data.fashion200k import Fashion200kDataset as cls
        return cls(cfg.data.root, image_size=cfg.data.image_size, on_bad_image=cfg.data.on_bad_image,
                   file_cache=cfg.data.file_cache, verbose=verbose)
    raise ConfigError(f"unknown dataset {name!r}; expected one of {list(DATASETS)}")


def _sampler(cfg, allowed):
    from keras_irtf.config import ConfigError

    sampler = getattr(cfg.data, "sampler", "reference")
    if sampler not in allowed:
        raise ConfigError(f"data.sampler={sampler!r} for {cfg.data.dataset}: expected one of {list(allowed)}")
    return sampler


def check_dataset(cfg):
    """Fail fast, before TensorFlow is imported, when a dataset that must be downloaded is absent:
    DatasetError names the expected layout, where the dataset is published and the flag to use."""
    name = cfg.data.dataset
    if name == "mitstates":
        from keras_irtf.data.mitstates import check_layout
    elif name == "fashion200k":
        from keras_irtf.data.fashion200k import check_layout
    else:
        return
    check_layout(cfg.data.root)


__all__ = ["check_dataset", "DATASETS", "DatasetError", "Queries", "RetrievalDataset", "Split", "load_dataset"]
