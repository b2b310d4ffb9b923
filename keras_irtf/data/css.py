"""CSS (TIRG's synthetic "CSS3D" set), read in the layout its authors publish.

    <root>/css_toy_dataset_novel2_small.dup.npy   pickled dict {'train': ..., 'test': ...}
    <root>/images/css_<split>_<index:06d>.png      one rendering per scene

Each split holds 'objects_img' (per image, a list of objects with 'shape', 'color', 'size' and
'pos' = normalised [y, x]), 'mods' (records with 'from' and 'to' image-id lists and the text
'to_str') and optionally 'labels' (duplicate scenes share a label; an image's caption is
str(label)). Images can also be drawn in 2D from the object lists (`images="2d"`), which is what
happens when the PNGs are absent.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from keras_irtf.data.base import DatasetError, Queries, RetrievalDataset, Split, index_captions

log = logging.getLogger(__name__)

NPY_NAME = "css_toy_dataset_novel2_small.dup.npy"
IMAGE_PATTERN = "css_{split}_{index:06d}.png"

COLORS = {
    "gray": (87, 87, 87),
    "red": (244, 35, 35),
    "blue": (42, 75, 215),
    "green": (29, 205, 20),
    "brown": (129, 74, 25),
    "purple": (129, 38, 192),
    "cyan": (41, 208, 208),
    "yellow": (255, 238, 51),
}
SHAPES = ("rectangle", "circle", "triangle")
SIZES = ("small", "large")
CANVAS = 64
CSS_SAMPLERS = ("reference", "uniform_pairs")


def render_2d(objects, size: int = CANVAS) -> np.ndarray:
    """Draw a scene's object list on a white canvas (the reference's 2D rendering), uint8 HxWx3."""
    img = np.full((CANVAS, CANVAS, 3), 255, dtype=np.uint8)
    for obj in objects:
        color = np.array(COLORS[obj["color"]], dtype=np.uint8)
        s = 8 if obj["size"] == "large" else 4
        y = int(round(float(obj["pos"][0]) * CANVAS))
        x = int(round(float(obj["pos"][1]) * CANVAS))
        shape = obj["shape"]
        for y0 in range(max(0, y - s), min(CANVAS, y + s + 1)):
            if shape == "rectangle":
                half = s
            elif shape == "circle":
                half = s - abs(y0 - y)
            elif shape == "triangle":
                half = (y0 - y + s) // 2
            else:
                raise DatasetError(f"CSS object has unknown shape {shape!r}; expected {SHAPES}")
            x0, x1 = max(0, x - half), min(CANVAS, x + half + 1)
            if x1 > x0:
                img[y0, x0:x1] = color
    if size != CANVAS:
        from PIL import Image

        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
    return img


def _layout_help(root) -> str:
    return (
        f"expected the CSS dataset in its published layout under {root}: "
        f"{NPY_NAME} (a pickled dict with 'train' and 'test', each with 'objects_img' and 'mods') "
        f"and images/css_<split>_<index:06d>.png. Generate the built-in benchmark with "
        f"`python tools/train.py --dataset css` (no --data-root), or "
        f"`python -m keras_irtf.data.css_generator --out DIR`."
    )


def read_css_npy(root) -> dict:
    root = Path(root)
    path = root / NPY_NAME
    if not path.is_file():
        raise DatasetError(f"{path} not found; " + _layout_help(root))
    from keras_irtf.data.safe_files import UnsafeFileError, load_pickled_npy

    try:
        # a crafted pickle runs code when loaded: unpickle plain data only
        data = load_pickled_npy(path)
    except UnsafeFileError:
        raise
    except Exception as e:  # a truncated or foreign file
        raise DatasetError(f"{path} could not be read as a pickled dict ({e}); " + _layout_help(root)) from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path} holds a {type(data).__name__}, not a pickled dict; " + _layout_help(root))
    for split in ("train", "test"):
        if split not in data:
            raise DatasetError(f"{path}: key {split!r} missing; " + _layout_help(root))
        for key in ("objects_img", "mods"):
            if key not in data[split]:
                raise DatasetError(f"{path}: key {split}.{key!r} missing; " + _layout_help(root))
        for i, mod in enumerate(data[split]["mods"][:50]):
            missing = [k for k in ("from", "to", "to_str") if k not in mod]
            if missing:
                raise DatasetError(f"{path}: {split}.mods[{i}] lacks {missing}; " + _layout_help(root))
    return data


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
                    + _layout_help(self.root)
                )
        self.image_mode[split] = "png" if use_png else "2d"
        # imported here: the demo reads NPY_NAME from this module without loading keras
        from keras_irtf.data.images import check_fits_in_memory

        check_fits_in_memory(n, image_size, f"CSS {split} split")
        if use_png:
            from keras_irtf.data.images import decode_files

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
            from keras_irtf.data.sampling import Groups

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
