"""Known queries over the export's gallery, for the page's ground-truth marker.

A query is known when its reference is a gallery image and its text is one of that image's
modification texts in a queries file (case and spacing ignored). The page then marks the results
that are a target. Where this comes from, first found wins:

1. `--queries PATH` given to the demo: a queries file (below) or a CSS dataset folder;
2. `queries.jsonl` in the export's `assets.extra/` or in the gallery folder;
3. CSS: the dataset's `css_toy_dataset_novel2_small.dup.npy` in the gallery folder or its parent
   (the gallery `<css root>/images`, as the built-in benchmark is laid out).

Otherwise the page shows no marker. A queries file has one JSON object a line, paths relative to
the gallery folder as in the export's gallery list (FashionIQ and CIRR captions fit it directly):

    {"image": "dress/B000ABC.jpg", "text": "is longer and red", "targets": ["dress/B00XYZ.jpg"]}

For CSS the targets follow the evaluation protocol: every gallery image of the query's split
showing the target scene (the target's caption), so duplicates of the scene count.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path, PurePosixPath
from typing import Optional

from keras_irtf.demo.limits import DemoError

log = logging.getLogger("keras_irtf.demo")
QUERIES_FILE = "queries.jsonl"
_CSS_NAME = re.compile(r"^css_(train|test)_(\d+)\.png$")


def normalize_text(text: str) -> str:
    return " ".join(text.lower().split())


class GroundTruth:
    """(reference gallery id, text) -> target gallery ids, and each reference's known texts."""

    def __init__(self, source: str, protocol: str):
        self.source = source  # what it was read from, shown on the page
        self.protocol = protocol  # what counts as a target, a noun phrase for the page
        self._targets = {}  # (gallery id, normalised text) -> set of target gallery ids
        self._texts = {}  # gallery id -> known texts, in file order, no duplicates

    def add(self, reference_id: int, text: str, target_ids):
        key = (int(reference_id), normalize_text(text))
        if key not in self._targets:
            self._targets[key] = set()
            self._texts.setdefault(int(reference_id), []).append(text)
        self._targets[key].update(int(t) for t in target_ids)

    def __len__(self):
        return len(self._targets)

    @property
    def reference_ids(self) -> set:
        return set(self._texts)

    def texts_for(self, reference_id: int) -> list:
        return list(self._texts.get(int(reference_id), ()))

    def targets(self, reference_id: int, text: str) -> Optional[set]:
        """The target ids of a known query, None when the query is not known."""
        return self._targets.get((int(reference_id), normalize_text(text)))


def _index(gallery_paths) -> dict:
    return {PurePosixPath(p).as_posix(): i for i, p in enumerate(gallery_paths)}


def from_jsonl(path, gallery_paths) -> GroundTruth:
    path = Path(path)
    index = _index(gallery_paths)
    gt = GroundTruth(str(path), "an image listed as a target in the queries file")
    skipped = 0
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            image, text, targets = rec["image"], rec["text"], rec["targets"]
            if not isinstance(text, str) or not isinstance(targets, list):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise DemoError(f'{path}, line {n}: expected {{"image": PATH, "text": TEXT, "targets": [PATH, ...]}}') from None
        ref = index.get(PurePosixPath(image).as_posix())
        target_ids = [index[t] for t in targets if t in index]
        if ref is None or not target_ids:
            skipped += 1
            continue
        gt.add(ref, text, target_ids)
    if skipped:
        log.warning("%s: %d queries skipped (reference or every target not in the export's gallery)", path, skipped)
    return gt


def from_css(root, gallery_paths) -> Optional[GroundTruth]:
    """Known queries of a CSS dataset folder (train and test modifications) whose images are in
    the gallery under their published names (css_<split>_<index>.png)."""
    from keras_irtf.data.css import NPY_NAME, read_css_npy

    root = Path(root)
    by_name = {}
    for gid, p in enumerate(gallery_paths):
        m = _CSS_NAME.match(PurePosixPath(p).name)
        if m:
            by_name[(m.group(1), int(m.group(2)))] = gid
    if not by_name:
        return None
    data = read_css_npy(root)
    gt = GroundTruth(str(root / NPY_NAME),
                     "an image of the target scene (the CSS protocol: every image with the target's caption)")
    for split in ("train", "test"):
        raw = data[split]
        labels = list(raw.get("labels", range(len(raw["objects_img"]))))
        scene_images = {}  # label -> gallery ids of the split's images with that label
        for index, label in enumerate(labels):
            gid = by_name.get((split, index))
            if gid is not None:
                scene_images.setdefault(label, []).append(gid)
        for mod in raw["mods"]:
            for f, t in zip(mod["from"], mod["to"]):
                ref = by_name.get((split, int(f)))
                targets = scene_images.get(labels[int(t)])
                if ref is not None and targets:
                    gt.add(ref, mod["to_str"], targets)
    return gt if len(gt) else None


def find_ground_truth(model, queries=None) -> Optional[GroundTruth]:
    """The known queries for a keras_irtf.demo.served.ServedModel (see the module docstring)."""
    from keras_irtf.data.css import NPY_NAME

    paths = model.gallery_paths
    if not paths:
        return None
    if queries is not None:
        queries = Path(queries)
        if queries.is_file() and queries.suffix == ".jsonl":
            return from_jsonl(queries, paths)
        css = queries if queries.is_dir() else queries.parent
        if (css / NPY_NAME).is_file():
            gt = from_css(css, paths)
            if gt is None:
                raise DemoError(f"{css}: no CSS query has its reference image in the export's gallery")
            return gt
        raise DemoError(f"--queries {queries}: expected a {QUERIES_FILE}-style file (.jsonl) or a CSS dataset "
                        f"folder holding {NPY_NAME}")
    folders = [model.path / "assets.extra"] + ([model.gallery_root] if model.gallery_root else [])
    for folder in folders:
        if (folder / QUERIES_FILE).is_file():
            return from_jsonl(folder / QUERIES_FILE, paths)
    if model.gallery_root is not None:
        for folder in (model.gallery_root, model.gallery_root.parent):
            if (folder / NPY_NAME).is_file():
                return from_css(folder, paths)
    return None
