"""What every dataset gives the pipeline: per split, its images, their captions, and its queries.

A query is (source image id, modification text, target image id, target caption id). Recall
compares captions, not image ids: a retrieved image whose caption equals the target's is a hit
(the TIRG protocol; duplicated scenes therefore count).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np

from keras_irtf.config import ConfigError


class DatasetError(ValueError):
    """A dataset folder that is missing, partial or malformed (the message says what to do)."""


@dataclasses.dataclass
class Queries:
    source_ids: np.ndarray  # int64 [Q] image ids in the split
    texts: np.ndarray  # object [Q] modification texts
    target_ids: np.ndarray  # int64 [Q] one target image per query (a representative)
    target_captions: np.ndarray  # int64 [Q] caption id of the target

    def __len__(self):
        return len(self.source_ids)

    def subset(self, idx) -> "Queries":
        return Queries(
            self.source_ids[idx], self.texts[idx], self.target_ids[idx], self.target_captions[idx]
        )


@dataclasses.dataclass
class Split:
    """One split of a dataset: images (by path or by in-memory array) and their captions."""

    name: str
    captions: list  # caption string per image
    caption_ids: np.ndarray  # int64 [N] index into `caption_vocab`
    caption_vocab: list  # distinct captions of the split
    image_paths: Optional[list] = None  # one path per image, when read from disk
    images: Optional[np.ndarray] = None  # uint8 [N, H, W, 3], when held in memory (or a file cache)
    test_queries: Optional[Queries] = None
    on_bad_image: str = "error"  # images streamed from disk: error | skip an unreadable file

    @property
    def num_images(self) -> int:
        return len(self.captions)


def index_captions(captions: Sequence[str]):
    vocab = sorted(set(captions))
    lookup = {c: i for i, c in enumerate(vocab)}
    return np.array([lookup[c] for c in captions], dtype=np.int64), vocab


# keys that only the built-in CSS supports (keras_irtf.data.css_generator applies them)
CSS_ONLY_KEYS = ("max_train_queries", "validation_fraction")


def refuse_css_only_keys(cfg, name: str):
    """ConfigError when a CSS-only data key is set for dataset `name`."""
    for key in CSS_ONLY_KEYS:
        if getattr(cfg.data, key):
            raise ConfigError(f"data.{key} is available for the built-in CSS, not {name!r}")


class RetrievalDataset:
    """Base class: `train` and `test` splits, a training-query sampler, evaluation queries.

    A dataset registered with keras_irtf.registry.register_dataset(name, config=...) is built by
    the assembler through `from_settings(settings, cfg, image_size, verbose)`; the default reads
    `data.root` and the disk options (`data.on_bad_image`, `data.file_cache`). `check(settings,
    cfg)` runs first, before TensorFlow starts, to fail fast on a missing download.
    Images are decoded to S x S (S = `image_size`, the image encoder's input side) with the
    shared geometry (keras_irtf.preprocessing.resize_and_center_crop); normalisation is
    the image encoder's and happens in the pipeline.
    """

    name = "base"
    # Recalls averaged into Ms/Mt for the weighted harmonic mean (the dataset's reported Ks).
    whm_ks = (1, 5, 10)
    # Gallery of the training recall Ms: "targets" (the sampled queries' target images: TIRG's
    # protocol for MIT-States and Fashion200k) or "split" (every training image, the source
    # excluded, as for the test split: TIRG's protocol for CSS).
    train_recall_gallery = "targets"

    train: Split
    test: Split
    # training queries held out from training (data.validation_fraction, built-in CSS): the run's
    # validation recall is theirs, ranked as Ms ranks the training queries; None = no validation
    validation_queries: Optional[Queries] = None

    @classmethod
    def from_settings(cls, settings, cfg, image_size: int, verbose: bool = True):
        refuse_css_only_keys(cfg, cls.name)
        return cls(cfg.data.root, image_size=image_size, on_bad_image=cfg.data.on_bad_image,
                   file_cache=cfg.data.file_cache, verbose=verbose)

    @classmethod
    def check(cls, settings, cfg):
        """Fail fast (DatasetError naming the expected layout) when the data is not there."""

    def training_texts(self) -> list:
        """Texts the vocabulary is built from."""
        raise NotImplementedError

    def sample_training_queries(self, n: int, rng: np.random.Generator, paired: bool = True) -> Queries:
        """n training queries following the dataset's reference sampling."""
        raise NotImplementedError

    def train_recall_queries(self, n: int, seed: int) -> Queries:
        """A fixed, seeded sample of training queries for the training recall Ms."""
        return self.sample_training_queries(n, np.random.default_rng(seed + 7919), paired=False)

    def extra_recalls(self) -> dict:
        """name -> function(retrieved caption ids [Q, K], queries) -> hit matrix [Q, K] (test
        splits evaluated as one gallery; reported as "<name>_R@K")."""
        return {}

    def test_protocol(self, split_name: str, queries: Queries):
        """The evaluation of a test split when it is not the TIRG default (every query against
        every image of the split, the source excluded): a
        keras_irtf.evaluation.protocol.TestProtocol (query groups with their own galleries,
        extra metrics), or None for the default."""
        return None

    def extra_texts(self) -> list:
        """Texts the model may be asked to embed beyond the training and test queries' (CIRR's
        test1 captions for the submission): a frozen text encoder's cache includes them."""
        return []


def image_loader_from_arrays(images: np.ndarray) -> Callable:
    return lambda ids: images[ids]
