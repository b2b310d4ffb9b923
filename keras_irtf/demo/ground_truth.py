"""Known queries over the export's gallery, for the page's ground-truth marker.

A query is known when its reference is a gallery image and its text is one of that image's
modification texts in the dataset (case, spacing and punctuation at either end ignored). The
page then marks the results that are a target. Where this comes from, first found wins:

1. `--queries PATH` given to the demo: a queries file (below), a triplets `.jsonl` file, or a
   dataset folder (or a file inside one, such as a caption file): CSS, FashionIQ, CIRR (either
   published arrangement) or a triplets folder;
2. `queries.jsonl` in the export's `assets.extra/` or in the gallery folder;
3. a dataset found from the gallery folder: the gallery folder itself, its parent or its
   grandparent holding CSS's `css_toy_dataset_novel2_small.dup.npy`, FashionIQ's `captions/`,
   CIRR's `captions/` or `cirr/captions/`, or a triplets folder's `train.jsonl` / `test.jsonl`
   (so a gallery exported from `<fashioniq>/images`, `<cirr>/img_raw/dev`, `<cirr>/dev` or
   `<css root>/images` finds its dataset).

Otherwise the page shows no marker. A queries file has one JSON object a line, paths relative to
the gallery folder as in the export's gallery list:

    {"image": "dress/B000ABC.jpg", "text": "is longer and red", "targets": ["dress/B00XYZ.jpg"]}

A triplets file (keras_irtf.data.triplets: train.jsonl, test.jsonl) has lines
`{"source": PATH, "text": TEXT, "target": PATH}` with paths relative to the file's folder.

What counts as a target follows each dataset's evaluation protocol:
- CSS: every gallery image of the query's split showing the target scene (the target's caption),
  so duplicates of the scene count;
- FashionIQ: the triplet's target image. The known texts of a triplet are its two relative
  captions joined as the evaluation joins them ("Is darker and has longer sleeves"), in either
  order, and each caption alone; the first is the one the page suggests. Splits train and val
  (test has no targets);
- CIRR: the caption's `target_hard` image (the image Recall@K counts), splits train and val;
- a triplets folder or file: the triplet's target image.

A dataset image is found in the gallery by its path relative to the gallery folder, else by the
file it resolves to, else (FashionIQ and CIRR, whose image names are unique) by its name: the
one gallery entry whose file name without the extension is the ASIN or CIRR image name.
Dataset files are read by keras_irtf.data's readers of the published layouts, which import
neither TensorFlow nor keras (the demo runs without keras).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path, PurePosixPath
from typing import Optional

from keras_irtf.data import cirr, fashioniq
from keras_irtf.data.base import DatasetError
from keras_irtf.data.css_scenes import NPY_NAME, read_css_npy
from keras_irtf.demo.limits import DemoError

log = logging.getLogger("keras_irtf.demo")
QUERIES_FILE = "queries.jsonl"
TRIPLET_FILES = ("test.jsonl", "train.jsonl")
_CSS_NAME = re.compile(r"^css_(train|test)_(\d+)\.png$")
_EDGE_PUNCTUATION = " .?,!;:"


def normalize_text(text: str) -> str:
    """The form texts are compared in: lower case, runs of white space as one space, and no spaces
    or punctuation (.?,!;:) at either end ("Is blue? " and "is blue" are one text)."""
    return " ".join(text.lower().split()).strip(_EDGE_PUNCTUATION).strip()


class GroundTruth:
    """(reference gallery id, text) -> target gallery ids, and each reference's known texts."""

    def __init__(self, source: str, protocol: str):
        self.source = source  # what it was read from, shown on the page
        self.protocol = protocol  # what counts as a target, a noun phrase for the page
        self._targets = {}  # (gallery id, normalised text) -> set of target gallery ids
        self._texts = {}  # gallery id -> known texts to suggest, in file order, no duplicates
        self._queries = set()  # the (gallery id, normalised text) of the suggested texts

    def add(self, reference_id: int, text: str, target_ids, suggest: bool = True):
        """Record a known query. `suggest=False`: another wording of a query already added (a
        FashionIQ caption alone, or the two in the other order), known but not suggested."""
        key = (int(reference_id), normalize_text(text))
        self._targets.setdefault(key, set()).update(int(t) for t in target_ids)
        if suggest and key not in self._queries:
            self._queries.add(key)
            self._texts.setdefault(int(reference_id), []).append(text)

    def __len__(self):
        """The number of known queries (reference image and suggested text)."""
        return len(self._queries)

    @property
    def reference_ids(self) -> set:
        return set(self._texts)

    def texts_for(self, reference_id: int) -> list:
        return list(self._texts.get(int(reference_id), ()))

    def targets(self, reference_id: int, text: str) -> Optional[set]:
        """The target ids of a known query, None when the query is not known."""
        return self._targets.get((int(reference_id), normalize_text(text)))


class GalleryNames:
    """Finds a dataset image among the export's gallery entries (see the module docstring)."""

    def __init__(self, gallery_paths, gallery_root=None):
        self.paths = {}
        self.stems = {}
        for i, p in enumerate(gallery_paths):
            posix = PurePosixPath(p)
            self.paths.setdefault(posix.as_posix(), i)
            self.stems.setdefault(posix.stem, []).append(i)
        self.gallery_paths = list(gallery_paths)
        self.root = Path(gallery_root) if gallery_root is not None else None
        self._files = None  # the real path of every gallery file -> id, built on first need

    def _real_files(self) -> dict:
        if self._files is None:
            self._files = {}
            if self.root is not None and self.root.is_dir():
                root = os.path.realpath(self.root)
                for i, p in enumerate(self.gallery_paths):
                    self._files.setdefault(os.path.realpath(os.path.join(root, p)), i)
        return self._files

    def find(self, rel=None, file=None, stem=None) -> Optional[int]:
        """The gallery id of the image whose path relative to the gallery folder is `rel`, or
        whose file is `file`, or, failing both, the one entry named `stem` (no extension): given
        only for datasets whose image names are unique (FashionIQ's ASINs, CIRR's names), never
        for paths (images/train/img0.jpg and images/test/img0.jpg are two images)."""
        if rel is not None:
            found = self.paths.get(PurePosixPath(os.path.normpath(str(rel))).as_posix())
            if found is not None:
                return found
        if file is not None and self.root is not None:
            found = self._real_files().get(os.path.realpath(file))
            if found is not None:
                return found
        ids = self.stems.get(stem, ()) if stem is not None else ()
        return ids[0] if len(ids) == 1 else None


def _names(gallery_paths, gallery_root=None) -> GalleryNames:
    return gallery_paths if isinstance(gallery_paths, GalleryNames) else GalleryNames(gallery_paths, gallery_root)


def _skipped(source, skipped: int, what: str = "queries"):
    if skipped:
        log.warning("%s: %d %s skipped (reference or every target not in the export's gallery)", source, skipped, what)


def _read_jsonl(path: Path, names: GalleryNames, gt: GroundTruth) -> int:
    """Add the queries of a queries file or a triplets file to `gt`; the number skipped."""
    skipped = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise TypeError
            text = rec["text"]
            if "image" in rec:
                image, targets = rec["image"], rec["targets"]
            else:
                image, targets = rec["source"], [rec["target"]]
            if not isinstance(text, str) or not isinstance(image, str) or not isinstance(targets, list) \
                    or not all(isinstance(t, str) for t in targets):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise DemoError(f'{path}, line {n}: expected {{"image": PATH, "text": TEXT, "targets": [PATH, ...]}} '
                            f'(a queries file) or {{"source": PATH, "text": TEXT, "target": PATH}} '
                            f'(a triplets file)') from None
        ref = names.find(rel=image, file=path.parent / image)
        target_ids = [t for t in (names.find(rel=p, file=path.parent / p) for p in targets) if t is not None]
        if ref is None or not target_ids:
            skipped += 1
            continue
        gt.add(ref, text, target_ids)
    return skipped


def from_jsonl(path, gallery_paths, gallery_root=None) -> GroundTruth:
    """The known queries of a queries file or a triplets .jsonl file (see the module docstring)."""
    path = Path(path)
    gt = GroundTruth(str(path), "an image listed as a target in the queries file")
    _skipped(path, _read_jsonl(path, _names(gallery_paths, gallery_root), gt))
    return gt


def from_triplets(root, gallery_paths, gallery_root=None) -> GroundTruth:
    """The known queries of a triplets folder: its test.jsonl and train.jsonl."""
    root = Path(root)
    names = _names(gallery_paths, gallery_root)
    gt = GroundTruth(f"{root} (triplets: {', '.join(n for n in TRIPLET_FILES if (root / n).is_file())})",
                     "the triplet's target image")
    for name in TRIPLET_FILES:
        if (root / name).is_file():
            _skipped(root / name, _read_jsonl(root / name, names, gt))
    return gt


def _dataset_error(e) -> DemoError:
    return DemoError(f"cannot read the known queries: {e}")


def fashioniq_caption_files(root) -> list:
    """(category, split, file) of the FashionIQ caption files with targets (train, val) under `root`."""
    folder = Path(root) / "captions"
    out = []
    if folder.is_dir():
        for path in sorted(folder.glob("cap.*.*.json")):
            parts = path.name.split(".")
            if len(parts) == 4 and parts[1] != "rc2" and parts[2] in ("val", "train"):
                out.append((parts[1], parts[2], path))
    return sorted(out, key=lambda c: (c[1] != "val", c[0]))  # val (the evaluated split) first


def from_fashioniq(root, gallery_paths, gallery_root=None) -> GroundTruth:
    """The known queries of a FashionIQ folder (captions/cap.<category>.{train,val}.json): each
    triplet whose candidate and target images are in the gallery (found by ASIN)."""
    root = Path(root)
    names = _names(gallery_paths, gallery_root)
    files = fashioniq_caption_files(root)
    gt = GroundTruth(f"{root / 'captions'} (FashionIQ: {', '.join(f'{c}.{s}' for c, s, _ in files)})",
                     "the triplet's target image (FashionIQ)")
    skipped = 0
    for category, split, _ in files:
        try:
            triplets = fashioniq.read_triplets(root, category, split)
        except DatasetError as e:
            raise _dataset_error(e) from None
        for candidate, target, c1, c2, _ in triplets:
            ref, tgt = names.find(stem=candidate), names.find(stem=target)
            if ref is None or tgt is None:
                skipped += 1
                continue
            # the evaluated text first (the one suggested), then CLIP4Cir's other wordings
            texts = fashioniq.caption_variants(c1, c2, "randomized")
            gt.add(ref, texts[0], [tgt])
            for text in texts[1:]:
                gt.add(ref, text, [tgt], suggest=False)
    _skipped(root / "captions", skipped, "triplets")
    return gt


def cirr_arrangement(root) -> Optional[str]:
    """The CIRR arrangement whose caption files (train or val) are under `root`, else None;
    DemoError when both are."""
    present = [a for a in cirr.ARRANGEMENTS
               if any((cirr.arrangement_dirs(root, a)[0] / "captions" / f"cap.rc2.{s}.json").is_file()
                      for s in ("train", "val"))]
    if len(present) > 1:
        raise DemoError(f"{root} holds both CIRR arrangements (captions/ and cirr/captions/): pass --queries the "
                        f"caption folder's dataset root of the one the gallery comes from")
    return present[0] if present else None


def from_cirr(root, gallery_paths, gallery_root=None) -> GroundTruth:
    """The known queries of a CIRR folder (either arrangement; splits val and train): each
    caption whose reference and target_hard images are in the gallery."""
    root = Path(root)
    names = _names(gallery_paths, gallery_root)
    arrangement = cirr_arrangement(root)
    if arrangement is None:
        raise DemoError(f"{root} holds no CIRR caption files. " + cirr.layout_help(root))
    meta, images = cirr.arrangement_dirs(root, arrangement)
    splits = [s for s in ("val", "train") if (meta / "captions" / f"cap.rc2.{s}.json").is_file()]
    gt = GroundTruth(f"{meta / 'captions'} (CIRR: {', '.join(splits)})",
                     "the caption's target image (CIRR's target_hard)")
    skipped = 0
    for split in splits:
        try:
            files = cirr.read_image_split(root, arrangement, split, on_outside="skip", verbose=False) \
                if (meta / "image_splits" / f"split.rc2.{split}.json").is_file() else {}
            queries = cirr.read_captions(root, arrangement, split)
        except DatasetError as e:
            raise _dataset_error(e) from None

        def find(name):
            file = files.get(name)
            rel = os.path.relpath(file, images) if file is not None else None
            return names.find(rel=rel, file=file, stem=name)

        for q in queries:
            ref, tgt = find(q["reference"]), find(q["target"])
            if ref is None or tgt is None:
                skipped += 1
                continue
            gt.add(ref, q["caption"], [tgt])
    _skipped(meta / "captions", skipped, "captions")
    return gt


def from_css(root, gallery_paths) -> Optional[GroundTruth]:
    """Known queries of a CSS dataset folder (train and test modifications) whose images are in
    the gallery under their published names (css_<split>_<index>.png)."""
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


def dataset_kind(folder) -> Optional[str]:
    """Which dataset's query files `folder` holds: "css", "fashioniq", "cirr", "triplets" or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if (folder / NPY_NAME).is_file():
        return "css"
    if fashioniq_caption_files(folder):
        return "fashioniq"
    if cirr_arrangement(folder) is not None:
        # CLIP4Cir's <root>/cirr/captions/ belongs to <root> (whose images are <root>/dev, ...), unless
        # <root>/cirr has CIRR README's img_raw/ beside its captions/
        if folder.name == "cirr" and not (folder / "img_raw").is_dir() \
                and cirr_arrangement(folder.parent) == "clip4cir":
            return None
        return "cirr"
    if any((folder / n).is_file() for n in TRIPLET_FILES):
        return "triplets"
    return None


def _from_dataset(kind: str, folder: Path, model) -> Optional[GroundTruth]:
    paths, root = model.gallery_paths, model.gallery_root
    if kind == "css":
        return from_css(folder, paths)
    reader = {"fashioniq": from_fashioniq, "cirr": from_cirr, "triplets": from_triplets}[kind]
    return reader(folder, paths, root)


def find_ground_truth(model, queries=None) -> Optional[GroundTruth]:
    """The known queries for a keras_irtf.demo.served.ServedModel (`gallery_paths`,
    `gallery_root`, `path`; see the module docstring). An explicit `queries` that yields no
    known query over the gallery is refused (DemoError); a dataset found by looking is used only
    when it does."""
    paths = model.gallery_paths
    if not paths:
        return None
    gallery_root = getattr(model, "gallery_root", None)
    if queries is not None:
        queries = Path(queries)
        if not queries.exists():
            raise DemoError(f"--queries {queries}: no such file or folder")
        if queries.is_file() and queries.suffix == ".jsonl":
            return from_jsonl(queries, paths, gallery_root)
        start = queries if queries.is_dir() else queries.parent
        for folder in (start, start.parent, start.parent.parent):  # a file inside the dataset (a caption file)
            kind = dataset_kind(folder)
            if kind is None:
                continue
            gt = _from_dataset(kind, folder, model)
            if gt is None or not len(gt):
                raise DemoError(f"{folder}: no {kind} query has its reference image and a target in the export's "
                                f"gallery ({len(paths)} images{f' under {gallery_root}' if gallery_root else ''})")
            return gt
        raise DemoError(f"--queries {queries}: expected a {QUERIES_FILE}-style or triplets file (.jsonl), or a "
                        f"dataset folder: CSS (holding {NPY_NAME}), FashionIQ (captions/cap.<category>.val.json), "
                        f"CIRR (captions/cap.rc2.val.json or cirr/captions/...) or triplets (test.jsonl)")
    folders = [model.path / "assets.extra"] + ([gallery_root] if gallery_root else [])
    for folder in folders:
        if (folder / QUERIES_FILE).is_file():
            return from_jsonl(folder / QUERIES_FILE, paths, gallery_root)
    if gallery_root is None:
        return None
    root = Path(gallery_root)
    for folder in (root, root.parent, root.parent.parent):
        try:
            kind = dataset_kind(folder)
            gt = _from_dataset(kind, folder, model) if kind is not None else None
        except DemoError as e:  # a damaged file of a dataset nobody named: no marker, the server starts
            log.warning("ground truth: %s not used: %s", folder, e)
            continue
        if gt is not None and len(gt):
            return gt
    return None
