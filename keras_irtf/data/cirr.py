"""CIRR (Liu et al., ICCV 2021; images from NLVR2), read in either published arrangement.

    CIRR's README ("cirr")                      CLIP4Cir's ("clip4cir")
      captions/cap.rc2.<split>.json               cirr/captions/cap.rc2.<split>.json
      image_splits/split.rc2.<split>.json         cirr/image_splits/split.rc2.<split>.json
      img_raw/train/<0..99>/*.png                 train/<0..99>/*.png
      img_raw/dev/*.png, img_raw/test1/*.png      dev/*.png, test1/*.png

splits: train, val, test1. `split.rc2.<split>.json` maps image names to paths relative to the
arrangement's image root ("./train/34/train-10108-0-img0.png", "./dev/...", "./test1/..."):
img_raw/ for CIRR's, the root itself for CLIP4Cir's. Paths may not leave that root (symlinks
included). data.dataset.arrangement=auto detects which one a folder has.

`cap.rc2.<split>.json`: [{"pairid", "reference", "target_hard", "target_soft", "caption",
"img_set": {"id", "members": [6 names]}}, ...]; test1 has no targets.

In keras_irtf's terms `train` is CIRR's train and `test` is its **val** (test1's targets are not
public: `test1()` and keras_irtf.evaluation.cirr_submission write the files the evaluation
server takes). Each image is its own identity (its caption is its name).

Protocol (val): Recall@1/5/10/50 over every val image with the reference removed; Recall_subset@1/2/3
ranked only among the query's img_set.members with the reference removed ("R_subset@K"); and the
paper's headline (R@5 + R_subset@1) / 2 ("avg_R@5_R_subset@1"). WHM uses R@1, R@5, R@10.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from keras_irtf.data.base import DatasetError, Queries
from keras_irtf.data.named_images import (NamedImageDataset, field, named_queries, named_split, read_json_file,
                                          report_dropped, unique)
from keras_irtf.data.protocols import QueryGroup, TestProtocol, rank_within
from keras_irtf.data.safe_files import contained_path, report_outside
from keras_irtf.registry import register_dataset

log = logging.getLogger(__name__)

PUBLISHED_AT = "https://github.com/Cuberick-Orion/CIRR"
IMAGES_AT = "https://github.com/lil-lab/nlvr/tree/master/nlvr2 (NLVR2 raw images; see CIRR's README)"
ARRANGEMENTS = ("cirr", "clip4cir")
SPLITS = {"train": "train", "test": "val"}
SUBSET_KS = (1, 2, 3)
SUBMISSION_K = 50
SUBMISSION_SUBSET_K = 3


@dataclasses.dataclass
class CIRRConfig:
    CHOICES = {"arrangement": ("auto",) + ARRANGEMENTS}
    # auto (detect) | cirr (CIRR's README: captions/, image_splits/, img_raw/) | clip4cir
    # (CLIP4Cir's: cirr/captions/, cirr/image_splits/, images directly under the root)
    arrangement: str = "auto"


def arrangement_dirs(root, arrangement: str):
    """(folder of captions/ and image_splits/, image root) of an arrangement."""
    root = Path(root)
    if arrangement == "cirr":
        return root, root / "img_raw"
    return root / "cirr", root


def layout_help(root=None) -> str:
    where = f" under {root}" if root else ""
    return (
        f"CIRR is expected{where} in one of its two published arrangements: CIRR's README (captions/cap.rc2."
        f"{{train,val,test1}}.json, image_splits/split.rc2.{{train,val,test1}}.json, images under img_raw/train/, "
        f"img_raw/dev/, img_raw/test1/) or CLIP4Cir's (cirr/captions/..., cirr/image_splits/..., images under "
        f"train/, dev/, test1/ in the root). Get the annotation files from {PUBLISHED_AT} and the images from "
        f"{IMAGES_AT}, and pass the dataset folder with --data-root DIR (or --set data.root=DIR)."
    )


def detect_arrangement(root, wanted: str = "auto") -> str:
    """The arrangement of `root` (DatasetError naming both when neither is there)."""
    if root is None:
        raise DatasetError("no dataset folder given (--data-root). " + layout_help())
    present = [a for a in ARRANGEMENTS
               if (arrangement_dirs(root, a)[0] / "captions" / "cap.rc2.train.json").is_file()]
    if wanted != "auto":
        if wanted not in present:
            meta, _ = arrangement_dirs(root, wanted)
            raise DatasetError(f"data.dataset.arrangement={wanted}: {meta / 'captions' / 'cap.rc2.train.json'} "
                               f"not found. " + layout_help(root))
        return wanted
    if not present:
        raise DatasetError(
            f"{root} holds neither CIRR arrangement: no {Path(root) / 'captions' / 'cap.rc2.train.json'} (CIRR's "
            f"README) and no {Path(root) / 'cirr' / 'captions' / 'cap.rc2.train.json'} (CLIP4Cir's). " + layout_help(root))
    if len(present) > 1:
        raise DatasetError(f"{root} holds both CIRR arrangements (captions/ and cirr/captions/): choose one with "
                           f"--set data.dataset.arrangement=cirr or =clip4cir.")
    return present[0]


def check_layout(root, wanted: str = "auto") -> str:
    """Cheap check (no TensorFlow): the arrangement, and its train/val files present."""
    arrangement = detect_arrangement(root, wanted)
    meta, images = arrangement_dirs(root, arrangement)
    for split in ("train", "val"):
        for path in (meta / "captions" / f"cap.rc2.{split}.json", meta / "image_splits" / f"split.rc2.{split}.json"):
            if not path.is_file():
                raise DatasetError(f"{path} not found ({arrangement} arrangement). " + layout_help(root))
    if not images.is_dir():
        raise DatasetError(f"{images} (the image root of the {arrangement} arrangement) is not a folder. "
                           + layout_help(root))
    return arrangement


def read_image_split(root, arrangement, split, on_outside="error", verbose=True) -> dict:
    """{name: path} of split.rc2.<split>.json, each path inside the arrangement's image root."""
    meta, images = arrangement_dirs(root, arrangement)
    path = meta / "image_splits" / f"split.rc2.{split}.json"
    data = read_json_file(path, layout_help(root))
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object {{image name: relative path}}, got "
                           f"{type(data).__name__}. " + layout_help(root))
    out, outside = {}, []
    for name, rel in data.items():
        if not isinstance(rel, str):
            raise DatasetError(f"{path}, key {name!r}: the path must be a string, got {rel!r:.80}. " + layout_help(root))
        resolved = contained_path(images, rel, f"{path}, key {name!r}", on_outside)
        if resolved is None:
            outside.append(f"{name}: {rel}")
            continue
        out[name] = resolved
    report_outside(outside, f"CIRR {split} image split", verbose)
    return out


def read_captions(root, arrangement, split, with_target: bool = True) -> list:
    """[{pairid, reference, target (None without), caption, members, where}] of cap.rc2.<split>.json."""
    meta, _ = arrangement_dirs(root, arrangement)
    path = meta / "captions" / f"cap.rc2.{split}.json"
    data = read_json_file(path, layout_help(root))
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of queries, got {type(data).__name__}. " + layout_help(root))
    out = []
    for n, entry in enumerate(data):
        where = f"{path}, entry {n}"
        pairid = field(entry, "pairid", int, where)
        where = f"{path}, entry {n} (pairid {pairid})"
        members = field(field(entry, "img_set", dict, where), "members", list, where + ", img_set")
        if not all(isinstance(m, str) for m in members):
            raise DatasetError(f"{where}: img_set.members must be a list of image names (strings)")
        out.append({
            "pairid": pairid,
            "reference": field(entry, "reference", str, where),
            "target": field(entry, "target_hard", str, where) if with_target else None,
            "caption": field(entry, "caption", str, where),
            "members": unique(members),
            "where": where,
        })
    return out


def check_named(queries, paths: dict, split_file, keys=("reference", "target")):
    """Every image a query names must be listed in the split file (DatasetError naming it)."""
    for q in queries:
        for key in keys:
            if q[key] is not None and q[key] not in paths:
                raise DatasetError(f"{q['where']}: {key} image {q[key]!r} is not listed in {split_file}")


def members_matrix(queries, ids: dict) -> np.ndarray:
    """[Q, M] image ids of each query's img_set members (-1: padding or a skipped image)."""
    width = max((len(q["members"]) for q in queries), default=0)
    out = np.full((len(queries), width), -1, np.int64)
    for i, q in enumerate(queries):
        row = [ids.get(m, -1) for m in q["members"]]
        out[i, : len(row)] = row
    return out


def subset_recalls(query_emb, image_ids, image_emb, members, source_ids, target_ids, ks=SUBSET_KS) -> dict:
    """Recall_subset@K: the target among the first K of the query's img_set members ranked by
    score, the reference removed."""
    ranked = rank_within(query_emb, image_ids, image_emb, members, source_ids)
    target_ids = np.asarray(target_ids, np.int64)[:, None]
    return {f"R_subset@{k}": float((ranked[:, :k] == target_ids).any(1).mean()) if len(ranked) else 0.0
            for k in ks}


def headline(results: dict) -> dict:
    """The CIRR paper's single number: (R@5 + R_subset@1) / 2."""
    if "R@5" in results and "R_subset@1" in results:
        return {"avg_R@5_R_subset@1": (results["R@5"] + results["R_subset@1"]) / 2}
    return {}


@dataclasses.dataclass
class CIRRTest1:
    """test1 (no targets), ready to embed: its split, queries (targets = the references, as
    placeholders), pair ids and img_set members [Q, M] (image ids)."""

    split: object
    queries: Queries
    pairids: np.ndarray
    members: np.ndarray


@register_dataset("cirr", config=CIRRConfig)
class CIRRDataset(NamedImageDataset):
    """CIRR: training triplets; val with Recall@K (reference removed) and Recall_subset@K."""

    name = "cirr"
    whm_ks = (1, 5, 10)

    @classmethod
    def check(cls, settings, cfg):
        check_layout(cfg.data.root, settings.arrangement)

    def __init__(self, root, settings: CIRRConfig = None, image_size: int = 224, on_bad_image: str = "error",
                 file_cache=None, verbose: bool = True):
        settings = settings or CIRRConfig()
        self.root = Path(root) if root is not None else None
        self.arrangement = check_layout(root, settings.arrangement)
        self.meta_dir, self.image_root = arrangement_dirs(self.root, self.arrangement)
        self.image_size, self.on_bad_image, self.file_cache = image_size, on_bad_image, file_cache
        self.skipped_images = []
        self.dropped_queries = {"train": 0, "test": 0}
        self._test1 = None
        for split_name, cirr_split in SPLITS.items():
            paths = read_image_split(self.root, self.arrangement, cirr_split, on_bad_image, verbose)
            queries = read_captions(self.root, self.arrangement, cirr_split)
            split_path = self.meta_dir / "image_splits" / f"split.rc2.{cirr_split}.json"
            if on_bad_image == "error":
                check_named(queries, paths, split_path)
            # train: the images its triplets name; val: every image of the split (the gallery)
            names = list(paths) if split_name == "test" else unique(
                n for q in queries for n in (q["reference"], q["target"]) if n in paths)
            split, ids, bad = named_split(
                split_name, names, [paths[n] for n in names], on_bad_image=on_bad_image, file_cache=file_cache,
                image_size=image_size, cache_name=f"cirr_{split_name}", desc=f"CIRR {cirr_split} split",
                verbose=verbose)
            self.skipped_images += bad
            setattr(self, split_name, split)
            kept = [q for q in queries if q["reference"] in ids and q["target"] in ids]
            self.dropped_queries[split_name] = len(queries) - len(kept)
            report_dropped(self.dropped_queries[split_name], f"CIRR {cirr_split} queries", verbose)
            if split_name == "train":
                self._set_training_triplets([ids[q["reference"]] for q in kept], [ids[q["target"]] for q in kept],
                                            [q["caption"] for q in kept])
            else:
                if not kept:
                    raise DatasetError(f"{self.meta_dir / 'captions' / 'cap.rc2.val.json'}: no validation query is "
                                       f"left (none in the file, or all skipped). " + layout_help(self.root))
                split.test_queries = named_queries(split, ids, [q["reference"] for q in kept],
                                                   [q["caption"] for q in kept], [q["target"] for q in kept])
                self.test_members = members_matrix(kept, ids)
        test1 = self.meta_dir / "captions" / "cap.rc2.test1.json"
        self._test1_texts = [q["caption"] for q in read_captions(self.root, self.arrangement, "test1", False)] \
            if test1.is_file() else []
        if verbose:
            log.info(f"CIRR ({self.arrangement} arrangement): {self.num_training_triplets} training triplets over "
                     f"{self.train.num_images} images, {len(self.test.test_queries)} val queries, "
                     f"{self.test.num_images} val images"
                     + (f", {len(self._test1_texts)} test1 queries" if self._test1_texts else ""))

    def extra_texts(self):
        """test1's captions: the submission embeds them (a frozen text encoder's cache needs them)."""
        return list(self._test1_texts)

    def test_protocol(self, split_name, queries):
        """Every val image, the reference removed; Recall_subset within img_set.members; the headline."""
        if split_name != "test" or len(queries) != len(self.test_members):
            return None

        def subset(query_emb, image_ids, image_emb, q):
            return subset_recalls(query_emb, image_ids, image_emb, self.test_members, q.source_ids, q.target_ids)

        group = QueryGroup("", np.arange(len(queries)), np.arange(self.test.num_images), exclude_source=True)
        members = self.test_members[self.test_members >= 0]
        return TestProtocol([group], extra_metrics=subset, extra_image_ids=members, derived=headline)

    def test1(self, verbose: bool = True) -> CIRRTest1:
        """The test1 split (loaded on first use): every image must be readable, as the server
        expects a ranking for every pair."""
        if self._test1 is not None:
            return self._test1
        captions = self.meta_dir / "captions" / "cap.rc2.test1.json"
        split_path = self.meta_dir / "image_splits" / "split.rc2.test1.json"
        for path in (captions, split_path):
            if not path.is_file():
                raise DatasetError(f"{path} not found: the test-server submission needs CIRR's test1 files. "
                                   + layout_help(self.root))
        paths = read_image_split(self.root, self.arrangement, "test1", "error", verbose)
        queries = read_captions(self.root, self.arrangement, "test1", with_target=False)
        check_named(queries, paths, split_path, keys=("reference",))
        for q in queries:
            for m in q["members"]:
                if m not in paths:
                    raise DatasetError(f"{q['where']}: img_set member {m!r} is not listed in {split_path}")
        names = list(paths)
        split, ids, bad = named_split("test1", names, [paths[n] for n in names], on_bad_image="skip",
                                      file_cache=self.file_cache, image_size=self.image_size, cache_name="cirr_test1",
                                      desc="CIRR test1 split", verbose=False)
        if bad:
            listing = "; ".join(f"{p}: {r}" for p, r in bad[:5])
            raise DatasetError(f"{len(bad)} unreadable test1 image(s): {listing}. The evaluation server needs a "
                               f"ranking for every pair: replace the files.")
        refs = [q["reference"] for q in queries]
        qs = named_queries(split, ids, refs, [q["caption"] for q in queries], refs)
        self._test1 = CIRRTest1(split, qs, np.array([q["pairid"] for q in queries], np.int64),
                                members_matrix(queries, ids))
        return self._test1
