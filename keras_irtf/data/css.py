"""CSS (TIRG's synthetic "CSS3D" set), read in the layout its authors publish.

    <root>/css_toy_dataset_novel2_small.dup.npy   pickled dict {'train': ..., 'test': ...}
    <root>/images/css_<split>_<index:06d>.png      one rendering per scene

Each split holds 'objects_img' (per image, a list of objects with 'shape', 'color', 'size' and
'pos' = normalised [y, x]), 'mods' (records with 'from' and 'to' image-id lists and the text
'to_str') and optionally 'labels' (duplicate scenes share a label; an image's caption is
str(label)). Images can also be drawn in 2D from the object lists (`images="2d"`), which is what
happens when the PNGs are absent.

This module registers the `css` dataset (`CSSBenchmark`): the published set under data.root, or
the benchmark keras_irtf.data.css_generator generates when no root is given; and it loads the
test split under a rendering shift (`attach_shift`, keras_irtf.data.css_shift). The layout's
names and the 2D renderer, which need no TensorFlow, are keras_irtf.data.css_scenes.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from keras_irtf.config import ConfigError, default_cache_dir
from keras_irtf.data.base import DatasetError, Queries, RetrievalDataset, Split, index_captions
from keras_irtf.data.css_generator import CSSConfig, ensure_generated
# the layout's and the scenes' names, importable from here as well
from keras_irtf.data.css_scenes import (CANVAS, COLORS, IMAGE_PATTERN, NPY_NAME, SHAPES, SIZES,  # noqa: F401
                                        layout_help, read_css_npy, render_2d)
from keras_irtf.data.css_shift import SHIFTS, resize_canvases, shift_folder, shifted_canvases
from keras_irtf.data.images import check_fits_in_memory, decode_files
from keras_irtf.data.sampling import Groups
from keras_irtf.registry import register_dataset

log = logging.getLogger(__name__)

CSS_SAMPLERS = ("reference", "uniform_pairs")


class CSSDataset(RetrievalDataset):
    """CSS with the TIRG protocol: enumerated test queries, paired training sampling."""

    name = "css"
    whm_ks = (1, 5, 10)

    def __init__(self, root, images: str = "auto", image_size: int = CANVAS, verbose: bool = True):
        self.root = Path(root)
        if images not in ("auto", "png", "2d"):
            raise ValueError(f"images must be 'auto', 'png' or '2d', not {images!r}")
        data = read_css_npy(self.root)
        images = self._choose_image_mode(images, verbose)
        self.image_mode = {}
        self._mods = {}
        self._by_source = {}
        self._records = {}  # split -> modification record (index into 'mods') of every query
        self.sampler = "reference"  # training sampler: reference (TIRG) | uniform_pairs
        for split in ("train", "test"):
            raw = data[split]
            n = len(raw["objects_img"])
            labels = raw.get("labels", list(range(n)))
            if len(labels) != n:
                raise DatasetError(
                    f"{self.root / NPY_NAME}: {split}.labels has {len(labels)} entries for {n} images"
                )
            captions = [str(label) for label in labels]
            caption_ids, vocab = index_captions(captions)
            arrays = self._load_images(split, raw["objects_img"], images, image_size, verbose)
            mods = raw["mods"]
            src, txt, tgt, rec = [], [], [], []
            by_source = {}
            for m, mod in enumerate(mods):
                if len(mod["from"]) != len(mod["to"]):
                    raise DatasetError(
                        f"{self.root / NPY_NAME}: {split}.mods[{m}] has {len(mod['from'])} 'from' "
                        f"ids but {len(mod['to'])} 'to' ids"
                    )
                for f, t in zip(mod["from"], mod["to"]):
                    if not (0 <= f < n and 0 <= t < n):
                        raise DatasetError(
                            f"{self.root / NPY_NAME}: {split}.mods[{m}] refers to image {max(f, t)} "
                            f"but the split has {n} images"
                        )
                    src.append(f)
                    txt.append(mod["to_str"])
                    tgt.append(t)
                    rec.append(m)
                    by_source.setdefault(int(f), []).append(len(src) - 1)
            queries = Queries(
                np.array(src, dtype=np.int64),
                np.array(txt, dtype=object),
                np.array(tgt, dtype=np.int64),
                caption_ids[np.array(tgt, dtype=np.int64)] if tgt else np.zeros(0, np.int64),
            )
            self._mods[split] = queries
            self._by_source[split] = by_source
            self._records[split] = np.array(rec, dtype=np.int64)
            setattr(
                self,
                split,
                Split(
                    name=split,
                    captions=captions,
                    caption_ids=caption_ids,
                    caption_vocab=vocab,
                    images=arrays,
                    test_queries=queries,
                ),
            )

    def _choose_image_mode(self, mode, verbose):
        """'png' or '2d' for the whole dataset. `auto` draws in 2D only when the dataset has no
        PNGs at all (no images/css_*.png), and says so; when PNGs are there, every one must be:
        a missing file is an error naming it, never a silent switch of one split to 2D."""
        if mode != "auto":
            return mode
        folder = self.root / "images"
        if folder.is_dir() and any(True for _ in folder.glob("css_*.png")):
            return "png"
        if verbose:
            log.info(f"CSS: {folder} holds no PNGs; drawing every scene in 2D (--css-images 2d)")
        return "2d"

    def _load_images(self, split, objects_img, mode, image_size, verbose):
        n = len(objects_img)
        folder = self.root / "images"
        paths = [folder / IMAGE_PATTERN.format(split=split, index=i) for i in range(n)]
        use_png = mode == "png"
        if use_png:
            missing = [p for p in paths if not p.is_file()]
            if missing:
                listing = ", ".join(p.name for p in missing[:5]) + (
                    f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                raise DatasetError(
                    f"CSS {split} split: {len(missing)} of {n} PNG(s) missing in {folder}: {listing}. Restore "
                    f"them, or draw every scene in 2D with --css-images 2d (--set data.dataset.images=2d); "
                    + layout_help(self.root)
                )
        self.image_mode[split] = "png" if use_png else "2d"
        check_fits_in_memory(n, image_size, f"CSS {split} split")
        if use_png:
            return decode_files(paths, image_size, desc=f"CSS {split} PNGs", verbose=verbose)
        return np.stack([render_2d(objs, image_size) for objs in objects_img]) if n else np.zeros(
            (0, image_size, image_size, 3), np.uint8
        )

    def training_texts(self):
        return list(self._mods["train"].texts)

    def sample_training_queries(self, n, rng, paired=True):
        """Training queries as `self.sampler` says, in pairs sharing a source image when `paired`.

        reference (TIRG's CSSDataset, the default): the first query of a pair draws a
            modification RECORD uniformly, then one of its (from, to) pairs; the second takes
            the same source image with a (mod, target) of a DIFFERENT record, uniformly among
            that image's others (a fresh first query when it has none; TIRG's loop would not end).
            Records differ in size (a "remove <cell> object" record holds many pairs, an "add
            <object> to <cell>" record few), so this favours the texts of small records.
        uniform_pairs: the first query uniformly over all (from, to) pairs; the second as
            above, a different text on the same source.
        """
        if self.sampler not in CSS_SAMPLERS:
            raise ValueError(f"CSS sampler must be one of {CSS_SAMPLERS}, got {self.sampler!r}")
        mods = self._mods["train"]
        by_source = self._by_source["train"]
        records = self._records["train"]
        reference = self.sampler == "reference"
        if reference:
            groups = Groups([list(np.flatnonzero(records == r)) for r in np.unique(records)])

        def first():
            if reference:
                g = int(rng.integers(len(groups.counts)))
                return int(groups.items[groups.offsets[g] + int(rng.integers(groups.counts[g]))])
            return int(rng.integers(len(mods)))

        out = np.empty(n, dtype=np.int64)
        i = 0
        while i < n:
            q = first()
            out[i] = q
            i += 1
            if paired and i < n:
                same = by_source[int(mods.source_ids[q])]
                if reference:
                    others = [o for o in same if records[o] != records[q]]
                else:
                    others = [o for o in same if mods.texts[o] != mods.texts[q]]
                out[i] = others[int(rng.integers(len(others)))] if others else first()
                i += 1
        return mods.subset(out)

    def limit_training_queries(self, n, seed):
        """Keep a seeded subset of `n` training queries (modifications): the sampler and the
        training recall Ms then only see those. Returns self."""
        mods = self._mods["train"]
        if n is None or n >= len(mods):
            return self
        if n < 2:
            raise ValueError(f"data.max_train_queries must be >= 2, got {n}")
        self._keep_training_queries(np.sort(np.random.default_rng(seed + 104729).choice(len(mods), int(n),
                                                                                         replace=False)))
        return self

    def hold_out_validation(self, fraction, seed):
        """Move a seeded `fraction` of the training queries into `validation_queries`, whole source
        images at a time (every query of a held-out source image goes; the sampler's pairs on one
        source stay together): the sampler and Ms no longer see them, and their recall against
        every training image, the source excluded (Ms's protocol), is the run's validation recall.
        Their images stay in the training split (a held-out source may be another query's target).
        Returns self."""
        if not fraction:
            return self
        if not 0.0 < float(fraction) < 1.0:
            raise ValueError(f"data.validation_fraction must be in [0, 1), got {fraction}")
        mods = self._mods["train"]
        by_source = self._by_source["train"]
        wanted = float(fraction) * len(mods)
        held, count = set(), 0
        for source in np.random.default_rng(seed + 15485863).permutation(sorted(by_source)):
            if count >= wanted:
                break
            held.add(int(source))
            count += len(by_source[int(source)])
        is_val = np.array([int(s) in held for s in mods.source_ids], dtype=bool)
        if is_val.all() or len(mods) - count < 2:
            raise ValueError(f"data.validation_fraction={fraction} leaves fewer than 2 of the {len(mods)} training "
                             f"queries to train on")
        self.validation_queries = mods.subset(np.flatnonzero(is_val))
        self._keep_training_queries(np.flatnonzero(~is_val))
        return self

    def _keep_training_queries(self, idx):
        """The training queries (and their records and by-source index) reduced to rows `idx`."""
        kept = self._mods["train"].subset(idx)
        self._records["train"] = self._records["train"][idx]
        by_source = {}
        for i, s in enumerate(kept.source_ids):
            by_source.setdefault(int(s), []).append(i)
        self._mods["train"] = kept
        self._by_source["train"] = by_source

    # Training recall Ms as TIRG's test() computes it on CSS: every training query (TIRG
    # enumerates them, as for the test split) against EVERY training image, its source excluded.
    train_recall_gallery = "split"

    def train_recall_queries(self, n, seed):
        """Every training query (TIRG's protocol on CSS; `n` and `seed` are not used: the other
        datasets sample n queries against their targets)."""
        return self._mods["train"]


# ---- the test split under a rendering shift (keras_irtf.data.css_shift) ---------------------


def load_shifted_images(dataset, name: str, seed: int, verbose: bool = True) -> np.ndarray:
    """uint8 [N, S, S, 3] for the dataset's test split under `name` at the dataset's image size:
    the PNGs of `<root>/shift_<name>/` when present, else rendered now."""
    size = int(dataset.test.images.shape[1])
    objects_img = read_css_npy(dataset.root)["test"]["objects_img"]
    n = len(objects_img)
    folder = shift_folder(dataset.root, name)
    paths = [folder / IMAGE_PATTERN.format(split="test", index=i) for i in range(n)]
    if n and paths[0].is_file() and paths[-1].is_file():
        return decode_files(paths, size, desc=f"CSS test PNGs ({name} shift)", verbose=verbose)
    clean = None
    if name == "noise" and dataset.image_mode.get("test") == "png":
        clean = decode_files([dataset.root / "images" / IMAGE_PATTERN.format(split="test", index=i)
                              for i in range(n)], CANVAS, desc="CSS test PNGs (for the noise shift)", verbose=verbose)
    return resize_canvases(shifted_canvases(objects_img, name, seed, clean), size)


def attach_shift(dataset, name: str, seed: int, verbose: bool = True):
    """Give a CSSDataset `test_shift`: its test split (scenes, captions, queries) under `name`."""
    if name not in SHIFTS:
        raise ConfigError(f"data.css_shift={name!r}: expected one of {list(SHIFTS)}")
    images = load_shifted_images(dataset, name, seed, verbose)
    dataset.test_shift = dataclasses.replace(dataset.test, name="test_shift", images=images)
    dataset.shift_name = name
    return dataset


# ---- the `css` dataset: the published set, or the built-in benchmark -------------------------


@register_dataset("css", config=CSSConfig)
class CSSBenchmark(CSSDataset):
    """The `css` dataset: the published CSS under data.root, or, without a root, the built-in
    benchmark generated once into the cache folder (data.dataset.size, data.dataset.seed)."""

    @classmethod
    def from_settings(cls, settings, cfg, image_size, verbose=True):
        root = cfg.data.root
        if root is None:
            root = ensure_generated(default_cache_dir(cfg), settings.size, settings.seed, verbose)
        dataset = cls(root, images=settings.images, image_size=image_size, verbose=verbose)
        if cfg.data.max_train_queries:
            dataset.limit_training_queries(cfg.data.max_train_queries, settings.seed)
        if cfg.data.validation_fraction:  # carved from the queries kept above
            dataset.hold_out_validation(cfg.data.validation_fraction, settings.seed)
        dataset.sampler = settings.sampler
        if settings.shift:
            attach_shift(dataset, settings.shift, settings.seed, verbose=verbose)
        return dataset
