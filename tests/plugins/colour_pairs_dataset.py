"""A dataset of a user's own, in one file: coloured squares; the text names the target colour."""

import dataclasses

import numpy as np

from keras_irtf.data import Queries, RetrievalDataset, Split
from keras_irtf.data.base import index_captions
from keras_irtf.registry import register_dataset

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (240, 230, 40),
           "black": (10, 10, 10), "white": (245, 245, 245)}


@dataclasses.dataclass
class ColourPairsConfig:
    images_per_colour: int = 6  # data.dataset.images_per_colour


@register_dataset("colour_pairs", config=ColourPairsConfig)
class ColourPairs(RetrievalDataset):
    name = "colour_pairs"

    @classmethod
    def from_settings(cls, settings, cfg, image_size, verbose=True):
        return cls(settings.images_per_colour, image_size, seed=cfg.train.seed)

    def __init__(self, per_colour, image_size, seed=0):
        rng = np.random.default_rng(seed)
        self.train = self._split("train", per_colour, image_size, rng)
        self.test = self._split("test", per_colour, image_size, rng)
        self.test.test_queries = self._queries(self.test, rng, 24)

    def _split(self, name, per_colour, size, rng):
        captions, images = [], []
        for colour, rgb in COLOURS.items():
            for _ in range(per_colour):
                noise = rng.normal(0, 12, (size, size, 3))
                images.append(np.clip(np.array(rgb)[None, None] + noise, 0, 255).astype(np.uint8))
                captions.append(colour)
        ids, vocab = index_captions(captions)
        return Split(name, captions, ids, vocab, images=np.stack(images))

    def _queries(self, split, rng, n):
        src = rng.integers(0, split.num_images, n)
        tgt = rng.integers(0, split.num_images, n)
        texts = np.array([f"make it {split.captions[t]}" for t in tgt], dtype=object)
        return Queries(src.astype(np.int64), texts, tgt.astype(np.int64), split.caption_ids[tgt])

    def training_texts(self):
        return [f"make it {c}" for c in COLOURS]

    def sample_training_queries(self, n, rng, paired=True):
        return self._queries(self.train, rng, n)
