"""A folder of your own (source image, modification text, target image) triplets.

    <root>/train.jsonl     one {"source": "path", "text": "...", "target": "path"} a line
    <root>/test.jsonl      the same: the evaluation queries
    <root>/gallery.txt     optional: the test gallery, one image path a line (default: every
                           image test.jsonl names)

Paths are relative to the folder and may not leave it (no absolute paths, no "..", no symlink
out of it): such a line is an error naming it, or, with data.on_bad_image=skip, dropped with a
warning, as are the lines whose images are missing or damaged. Each image is its own identity
(its caption is its path, normalised: "a/./b.jpg" and "a/b.jpg" are one image), so a hit is
retrieving the target image itself.

Training queries are the train.jsonl lines drawn uniformly (seeded). Protocol: every test query
against the gallery with its source image excluded (when the gallery holds it), Recall@1/5/10/50;
a test target absent from gallery.txt is an error naming its line (it could never be retrieved).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from keras_irtf.data.base import DatasetError
from keras_irtf.data.named_images import (NamedImageDataset, field, json_lines, named_queries, named_split,
                                          report_dropped, unique)
from keras_irtf.data.protocols import QueryGroup, TestProtocol
from keras_irtf.data.safe_files import contained_path, report_outside
from keras_irtf.registry import register_dataset

log = logging.getLogger(__name__)

FILES = ("train.jsonl", "test.jsonl")
GALLERY = "gallery.txt"


def layout_help(root=None) -> str:
    where = f" under {root}" if root else ""
    return (
        f"A triplets folder{where} holds train.jsonl and test.jsonl, one JSON object a line "
        f'{{"source": "images/a.jpg", "text": "make it red", "target": "images/b.jpg"}} with image paths relative '
        f"to the folder, and optionally gallery.txt (one image path a line: the test gallery; default: every "
        f"image of test.jsonl). Pass the folder with --data-root DIR (or --set data.root=DIR)."
    )


def check_layout(root):
    """Cheap check (no TensorFlow) that `root` holds the two files; raises DatasetError if not."""
    if root is None:
        raise DatasetError("no dataset folder given (--data-root). " + layout_help())
    for name in FILES:
        if not (Path(root) / name).is_file():
            raise DatasetError(f"{Path(root) / name} not found. " + layout_help(root))


def identity(rel: str) -> str:
    """The image's name: its relative path, normalised."""
    return os.path.normpath(rel)


def read_triplet_file(root, name, on_outside="error", verbose=True):
    """[(source, text, target, where)] of a .jsonl file (names normalised), each path contained
    in `root`; with on_outside="skip", a line with a path outside is dropped with a warning."""
    path = Path(root) / name
    out, outside = [], []
    for n, entry in json_lines(path, layout_help(root)):
        where = f"{path}, line {n}"
        source = field(entry, "source", str, where, layout_help(root))
        text = field(entry, "text", str, where, layout_help(root))
        target = field(entry, "target", str, where, layout_help(root))
        if any(contained_path(root, p, where, on_outside) is None for p in (source, target)):
            outside.append(f"{where}: {source} -> {target}")
            continue
        out.append((identity(source), text, identity(target), where))
    report_outside(outside, str(path), verbose)
    return out


def read_gallery(root, on_outside="error", verbose=True):
    """[(name, where)] of gallery.txt (blank lines skipped), or None without the file."""
    path = Path(root) / GALLERY
    if not path.is_file():
        return None
    out, outside = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            rel = line.strip()
            if not rel:
                continue
            if contained_path(root, rel, f"{path}, line {n}", on_outside) is None:
                outside.append(f"{path}, line {n}: {rel}")
                continue
            out.append((identity(rel), f"{path}, line {n}"))
    report_outside(outside, str(path), verbose)
    return out


@register_dataset("triplets")
class TripletsDataset(NamedImageDataset):
    """Your own triplets (train.jsonl, test.jsonl, optional gallery.txt); Recall@K, source excluded."""

    name = "triplets"
    whm_ks = (1, 5, 10)

    @classmethod
    def check(cls, settings, cfg):
        check_layout(cfg.data.root)

    def __init__(self, root, settings=None, image_size: int = 224, on_bad_image: str = "error", file_cache=None,
                 verbose: bool = True):
        self.root = Path(root) if root is not None else None
        check_layout(root)
        self.skipped_images = []
        self.dropped_queries = {"train": 0, "test": 0}
        self.gallery_ids = None  # test image ids of gallery.txt (None: every test image)
        for split_name, file_name in zip(("train", "test"), FILES):
            triplets = read_triplet_file(self.root, file_name, on_bad_image, verbose)
            if not triplets:
                raise DatasetError(f"{self.root / file_name} has no triplet. " + layout_help(self.root))
            gallery = read_gallery(self.root, on_bad_image, verbose) if split_name == "test" else None
            if gallery is not None:
                listed = {g for g, _ in gallery}
                for _, _, target, where in triplets:
                    if target not in listed:
                        raise DatasetError(f"{where}: target {target!r} is not in {self.root / GALLERY}, so it could "
                                           f"never be retrieved. Add it to the gallery (or drop the line).")
            names = unique([g for g, _ in gallery or ()] + [n for t in triplets for n in (t[0], t[2])])
            split, ids, bad = named_split(
                split_name, names, [self.root / n for n in names], on_bad_image=on_bad_image, file_cache=file_cache,
                image_size=image_size, cache_name=f"triplets_{split_name}", desc=f"{self.root / file_name}",
                verbose=verbose)
            self.skipped_images += bad
            setattr(self, split_name, split)
            kept = [t for t in triplets if t[0] in ids and t[2] in ids]
            self.dropped_queries[split_name] = len(triplets) - len(kept)
            report_dropped(self.dropped_queries[split_name], f"{file_name} line(s)", verbose)
            if split_name == "train":
                self._set_training_triplets([ids[t[0]] for t in kept], [ids[t[2]] for t in kept],
                                            [t[1] for t in kept])
            else:
                if not kept:
                    raise DatasetError(f"{self.root / file_name}: no test query is left (every one names a skipped "
                                       f"image).")
                split.test_queries = named_queries(split, ids, [t[0] for t in kept], [t[1] for t in kept],
                                                   [t[2] for t in kept])
                if gallery is not None:
                    self.gallery_ids = np.array([ids[g] for g in unique(g for g, _ in gallery) if g in ids], np.int64)
        if verbose:
            log.info(f"triplets under {self.root}: {self.num_training_triplets} training triplets over "
                     f"{self.train.num_images} images, {len(self.test.test_queries)} test queries, gallery of "
                     f"{self.test.num_images if self.gallery_ids is None else len(self.gallery_ids)} images")

    def test_protocol(self, split_name, queries):
        """gallery.txt's images, the source excluded; without it the default (every test image)."""
        if split_name != "test" or self.gallery_ids is None:
            return None
        return TestProtocol([QueryGroup("", np.arange(len(queries)), self.gallery_ids, exclude_source=True)])
