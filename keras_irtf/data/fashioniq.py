"""FashionIQ (Wu et al., CVPR 2021), read in its published layout, with CLIP4Cir's validation protocol.

    <root>/captions/cap.<category>.<split>.json     [{"candidate": ASIN, "target": ASIN,
                                                      "captions": [c1, c2]}, ...]
    <root>/image_splits/split.<category>.<split>.json  [ASIN, ...]
    <root>/images/<ASIN>.jpg                        (.png, .jpeg, .webp, .gif accepted too)

categories: dress, shirt, toptee (data.dataset.categories selects some); splits train, val, test.
Only train and val are read: the published test captions have no targets, so, as every paper
does, numbers are reported on val. In keras_irtf's terms `train` is FashionIQ's train and `test`
is FashionIQ's **val**.

Each image is its own identity (its caption is its ASIN): a hit is retrieving the target image.
Training images are those the training triplets name; the test split holds every image of each
category's split.<category>.val.json (that category's gallery) and the images its queries name.

Texts. A triplet has two relative captions; CLIP4Cir's validation joins them as
    c1.strip('.?, ').capitalize() + " and " + c2.strip('.?, ')
Training (data.dataset.train_captions): `joined` uses that text; `both_orders` (default) draws
one of the two orders per query; `randomized` draws one of CLIP4Cir's four variants ("c1 and c2",
"c2 and c1", c1 alone, c2 alone, each stripped and capitalised the same way).

Protocol (`test_protocol`): per category, that category's val queries ranked against that
category's val images, the reference image NOT removed (CLIP4Cir's FashionIQ validation keeps
it); Recall@K per category ("dress_R@10") and the mean over the categories ("R@10"), plus
"avg_R@10_R@50" (the mean of the two averaged recalls the papers report). WHM uses R@10, R@50.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np

from keras_irtf.data.base import DatasetError
from keras_irtf.data.named_images import (NamedImageDataset, field, named_queries, named_split, read_json_file,
                                          report_dropped, unique)
from keras_irtf.data.protocols import QueryGroup, TestProtocol
from keras_irtf.data.safe_files import contained_path, report_outside
from keras_irtf.registry import register_dataset

log = logging.getLogger(__name__)

PUBLISHED_AT = "https://github.com/XiaoxiaoGuo/fashion-iq"
CATEGORIES = ("dress", "shirt", "toptee")
IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".webp", ".gif")
TRAIN_CAPTIONS = ("joined", "both_orders", "randomized")
# keras_irtf split -> FashionIQ split
SPLITS = {"train": "train", "test": "val"}


@dataclasses.dataclass
class FashionIQConfig:
    CHOICES = {"categories": CATEGORIES, "train_captions": TRAIN_CAPTIONS}
    # the categories read (train and evaluated); the protocol averages over them
    categories: tuple = CATEGORIES
    # how a training triplet's two captions become one text: joined | both_orders | randomized
    train_captions: str = "both_orders"

    def validate(self):
        if not self.categories:
            raise ValueError(f"categories is empty: give some of {list(CATEGORIES)}")
        if len(set(self.categories)) != len(self.categories):
            raise ValueError(f"categories={list(self.categories)} names a category twice")


def layout_help(root=None) -> str:
    where = f" under {root}" if root else ""
    return (
        f"FashionIQ is expected in its published layout{where}: captions/cap.<category>.{{train,val}}.json, "
        f"image_splits/split.<category>.val.json and images/<ASIN>.jpg (or .png, .jpeg, .webp, .gif), for "
        f"the categories {', '.join(CATEGORIES)}. Get the caption and split files from {PUBLISHED_AT} (the "
        f"images from the URLs listed there), and pass the folder that contains captions/ with --data-root DIR "
        f"(or --set data.root=DIR)."
    )


def caption_file(root, category, split) -> Path:
    return Path(root) / "captions" / f"cap.{category}.{split}.json"


def split_file(root, category, split) -> Path:
    return Path(root) / "image_splits" / f"split.{category}.{split}.json"


def check_layout(root, categories=CATEGORIES):
    """Cheap check (no TensorFlow) that `root` looks like FashionIQ; raises DatasetError if not."""
    if root is None:
        raise DatasetError("no dataset folder given (--data-root). " + layout_help())
    for sub in ("captions", "image_splits", "images"):
        if not (Path(root) / sub).is_dir():
            raise DatasetError(f"{Path(root) / sub} is not a folder. " + layout_help(root))
    for category in categories:
        for path in (caption_file(root, category, "train"), caption_file(root, category, "val"),
                     split_file(root, category, "val")):
            if not path.is_file():
                raise DatasetError(f"{path} not found. " + layout_help(root))


# ---- texts --------------------------------------------------------------------------------------
def _clean(caption: str) -> str:
    return caption.strip(".?, ")


def join_captions(first: str, second: str) -> str:
    """CLIP4Cir's validation text: "<first, stripped and capitalised> and <second, stripped>"."""
    return f"{_clean(first).capitalize()} and {_clean(second)}"


def caption_variants(c1: str, c2: str, mode: str) -> list:
    """The texts a training triplet may be shown with (one is drawn uniformly per query)."""
    if mode == "joined":
        return [join_captions(c1, c2)]
    if mode == "both_orders":
        return [join_captions(c1, c2), join_captions(c2, c1)]
    if mode == "randomized":
        return [join_captions(c1, c2), join_captions(c2, c1), _clean(c1).capitalize(), _clean(c2).capitalize()]
    raise ValueError(f"train_captions={mode!r}: expected one of {list(TRAIN_CAPTIONS)}")


# ---- files --------------------------------------------------------------------------------------
def read_triplets(root, category, split):
    """[(candidate, target, c1, c2, where)] of cap.<category>.<split>.json, checked entry by entry."""
    path = caption_file(root, category, split)
    data = read_json_file(path, layout_help(root))
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of triplets, got {type(data).__name__}. " + layout_help(root))
    out = []
    for n, entry in enumerate(data):
        where = f"{path}, entry {n}"
        candidate = field(entry, "candidate", str, where, layout_help(root))
        target = field(entry, "target", str, where, layout_help(root))
        captions = field(entry, "captions", list, where, layout_help(root))
        if len(captions) != 2 or not all(isinstance(c, str) for c in captions):
            raise DatasetError(f"{where}: key 'captions' must be a list of two strings, got {captions!r:.120}. "
                               + layout_help(root))
        out.append((candidate, target, captions[0], captions[1], where))
    return out


def read_image_split(root, category, split) -> list:
    path = split_file(root, category, split)
    data = read_json_file(path, layout_help(root))
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise DatasetError(f"{path}: expected a JSON list of image names (strings). " + layout_help(root))
    return unique(data)


def image_index(images_dir) -> dict:
    """ASIN -> [file names] of images/ with an accepted extension (one listing of the folder)."""
    index = {}
    with os.scandir(images_dir) as entries:
        for entry in entries:
            stem, ext = os.path.splitext(entry.name)
            if ext.lower() in IMAGE_EXTENSIONS and not entry.name.startswith("."):
                index.setdefault(stem, []).append(entry.name)
    return index


def resolve_images(root, names, index, on_bad_image="error", verbose=True):
    """{name: path} of the names whose image was found; an image with two
    files (dress1.jpg and dress1.png) is always an error, a missing one too unless
    on_bad_image="skip". Paths stay inside images/ (symlinks out of it are refused)."""
    images_dir = Path(root) / "images"
    found, missing, outside = {}, [], []
    for name in names:
        files = index.get(name, [])
        if len(files) > 1:
            raise DatasetError(f"image {name!r} is ambiguous: {images_dir} holds {', '.join(sorted(files))}. "
                               f"Keep one file per image name.")
        if not files:
            missing.append(name)
            continue
        path = contained_path(images_dir, files[0], f"{images_dir}: image of {name!r}", on_bad_image)
        if path is None:
            outside.append(f"{name}: {files[0]}")
            continue
        found[name] = path
    if missing and on_bad_image == "error":
        listing = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DatasetError(
            f"{len(missing)} FashionIQ image(s) not found in {images_dir}: {listing} (looked for <name>"
            f"{{{','.join(IMAGE_EXTENSIONS)}}}). Download the missing images, or run with --set "
            f"data.on_bad_image=skip to leave out the queries that need them."
        )
    if missing and verbose:
        log.warning(f"skipping {len(missing)} FashionIQ image(s) missing from {images_dir} "
                    f"(data.on_bad_image=skip): {', '.join(missing[:5])}")
    report_outside(outside, "FashionIQ images", verbose)
    return found


@register_dataset("fashioniq", config=FashionIQConfig)
class FashionIQDataset(NamedImageDataset):
    """FashionIQ: training triplets of the chosen categories; CLIP4Cir's per-category validation."""

    name = "fashioniq"
    whm_ks = (10, 50)

    @classmethod
    def check(cls, settings, cfg):
        check_layout(cfg.data.root, tuple(settings.categories))

    def __init__(self, root, settings: FashionIQConfig = None, image_size: int = 224, on_bad_image: str = "error",
                 file_cache=None, verbose: bool = True):
        settings = settings or FashionIQConfig()
        self.root = Path(root) if root is not None else None
        self.categories = tuple(settings.categories)
        self.train_captions = settings.train_captions
        check_layout(root, self.categories)
        index = image_index(self.root / "images")
        self.skipped_images = []
        self.dropped_queries = {"train": 0, "test": 0}
        self.galleries = {}  # category -> test image ids of its val gallery
        self.query_categories = None  # [Q] category of every test query
        for split_name, fiq_split in SPLITS.items():
            triplets = {c: read_triplets(self.root, c, fiq_split) for c in self.categories}
            gallery_names = {c: read_image_split(self.root, c, fiq_split) for c in self.categories} \
                if split_name == "test" else {}
            names = unique([n for c in self.categories for n in gallery_names.get(c, [])]
                           + [n for c in self.categories for t in triplets[c] for n in t[:2]])
            found = resolve_images(self.root, names, index, on_bad_image, verbose)
            names = [n for n in names if n in found]
            split, ids, bad = named_split(
                split_name, names, [found[n] for n in names], on_bad_image=on_bad_image, file_cache=file_cache,
                image_size=image_size, cache_name=f"fashioniq_{split_name}",
                desc=f"FashionIQ {fiq_split} split ({', '.join(self.categories)})", verbose=verbose)
            self.skipped_images += bad
            setattr(self, split_name, split)
            kept = {c: [t for t in triplets[c] if t[0] in ids and t[1] in ids] for c in self.categories}
            self.dropped_queries[split_name] = sum(len(triplets[c]) - len(kept[c]) for c in self.categories)
            report_dropped(self.dropped_queries[split_name], f"FashionIQ {fiq_split} triplet(s)", verbose)
            rows = [t for c in self.categories for t in kept[c]]
            if split_name == "train":
                variants = [caption_variants(t[2], t[3], self.train_captions) for t in rows]
                self._set_training_triplets([ids[t[0]] for t in rows], [ids[t[1]] for t in rows], variants)
            else:
                for c in self.categories:
                    if not kept[c]:
                        raise DatasetError(f"{caption_file(self.root, c, 'val')}: no validation query is left for "
                                           f"the category {c!r} (none in the file, or all skipped). "
                                           + layout_help(self.root))
                    self.galleries[c] = np.array([ids[n] for n in gallery_names[c] if n in ids], np.int64)
                split.test_queries = named_queries(split, ids, [t[0] for t in rows],
                                                   [join_captions(t[2], t[3]) for t in rows], [t[1] for t in rows])
                self.query_categories = np.array([c for c in self.categories for _ in kept[c]], dtype=object)
        if verbose:
            log.info(f"FashionIQ ({', '.join(self.categories)}): {self.num_training_triplets} training triplets over "
                     f"{self.train.num_images} images, {len(self.test.test_queries)} val queries, "
                     f"{self.test.num_images} val images")

    def test_protocol(self, split_name, queries):
        """Per category: its queries against its own val images, the reference kept (CLIP4Cir)."""
        if split_name != "test" or len(queries) != len(self.query_categories):
            return None
        groups = [QueryGroup(c, np.flatnonzero(self.query_categories == c), self.galleries[c], exclude_source=False)
                  for c in self.categories]
        return TestProtocol(groups, derived=average_of_reported)


def average_of_reported(results: dict) -> dict:
    """The papers' single FashionIQ number: the mean of the category-averaged R@10 and R@50."""
    if "R@10" in results and "R@50" in results:
        return {"avg_R@10_R@50": (results["R@10"] + results["R@50"]) / 2}
    return {}
