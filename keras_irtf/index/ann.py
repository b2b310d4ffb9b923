"""Approximate nearest-neighbour indexes over a gallery's embeddings, with faiss.

A gallery of millions does not fit the exact scan of an export's stored gallery. An index
folder holds the gallery's embeddings in a faiss index, the ids of its rows, and a manifest:

    <folder>/index.faiss   the faiss index (inner product: the embeddings are L2-normalised)
    <folder>/ids.txt       one id a line, row order (an image path relative to images_root)
    <folder>/sha256.txt    (with an images folder) the sha256 of each row's image bytes, row
                           order: a file is served for a row only when its bytes still match
    <folder>/index.json    kind, parameters, size, dimension, the export's fingerprint, the
                           images' root, recall@10 against exact search on held-out queries,
                           build time, and checksums of the two files above

Three kinds: `flat` (exact, every row scored), `hnsw` (a navigable small-world graph over the
full vectors) and `ivfpq` (inverted lists of product-quantised codes, re-ranked on the full
vectors). `choose_kind` picks by size. An index is tied to the export that embedded its gallery:
`GalleryIndex.load(folder, fingerprint)` refuses one built for another export.

    index = build_index(embeddings, ids, "indexes/css", fingerprint=export_fingerprint(export))
    scores, rows = GalleryIndex.load("indexes/css", fingerprint).search(queries, k=10)
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import tensorflow as tf

from keras_irtf.safety import NotOwnedError, OutsideRootError, is_empty_folder, mark_owned, owned_kind, \
    resolve_under
from keras_irtf.utils import file_sha256, optional_import

KINDS = ("flat", "hnsw", "ivfpq")
INDEX_KIND = "gallery index"  # the ownership marker's kind (keras_irtf.safety)
MANIFEST_NAME, INDEX_NAME, IDS_NAME, HASHES_NAME = "index.json", "index.faiss", "ids.txt", "sha256.txt"
FLAT_BELOW = 100_000  # exact search scores 100k 512-d rows in about 10 ms on two cores
HNSW_BELOW = 5_000_000  # HNSW keeps the full vectors and its graph in memory (~2.2 GB a million)

# The defaults of each kind's parameters (`params` of build_index overrides any of them).
# hnsw: M neighbours a node, ef_construction candidates while building, ef_search while searching.
# ivfpq: nlist inverted lists (0: 4 sqrt(n)), m sub-quantisers of nbits bits (0: dim / 8), nprobe
# lists searched, refine re-ranks nprobe's best refine * k candidates on the full vectors (0: off).
# The search defaults are the smallest that kept recall@10 >= 0.99 of exact search on a million
# CSS embeddings in docs/gallery_index.md (HNSW ef_search 128 gave 0.989 there, 256 0.995).
DEFAULT_PARAMS = {
    "flat": {},
    "hnsw": {"M": 32, "ef_construction": 200, "ef_search": 256},
    "ivfpq": {"nlist": 0, "m": 0, "nbits": 8, "nprobe": 32, "refine": 50},
}
SEARCH_PARAMS = {"flat": (), "hnsw": ("ef_search",), "ivfpq": ("nprobe", "refine")}


class GalleryIndexError(ValueError):
    """An index folder that cannot be used as asked (missing, damaged, another export's); one line."""


def _faiss():
    return optional_import("faiss", "faiss", "a gallery index")


# ---- the export an index belongs to -------------------------------------------------------------
def export_fingerprint(export_dir) -> dict:
    """The SavedModel fingerprint of the export version folder `export_dir` (TensorFlow writes
    fingerprint.pb beside saved_model.pb) and the folder's resolved path."""
    path = Path(export_dir)
    if not (path / "fingerprint.pb").is_file():
        raise GalleryIndexError(f"{path} holds no fingerprint.pb: pass an export version folder such as "
                                f"exported/<name>/1")
    fp = tf.saved_model.experimental.read_fingerprint(str(path))
    return {"saved_model_checksum": str(fp.saved_model_checksum),
            "graph_def_program_hash": str(fp.graph_def_program_hash),
            "signature_def_hash": str(fp.signature_def_hash),
            "export": str(path.resolve())}


def fingerprints_match(a: dict, b: dict) -> bool:
    """Whether two fingerprints name the same SavedModel (the same checksum; the folder may have
    been copied or moved)."""
    return bool(a) and bool(b) and a.get("saved_model_checksum") == b.get("saved_model_checksum")


# ---- exact search and recall --------------------------------------------------------------------
def exact_topk(gallery: np.ndarray, queries: np.ndarray, k: int, chunk: int = 65536):
    """The exact top-k rows of `gallery` for each query by inner product: (scores [m, k],
    rows [m, k]), best first, scanning the gallery in chunks."""
    gallery = np.asarray(gallery, np.float32)
    queries = np.asarray(queries, np.float32)
    k = min(k, len(gallery))
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_r = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(gallery), chunk):
        s = queries @ gallery[start:start + chunk].T
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        best_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], 1)
        best_r = np.concatenate([best_r, part + start], 1)
        if best_s.shape[1] > k:
            keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
            best_s, best_r = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_r, keep, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_r, order, 1)


def recall_at_k(gallery: np.ndarray, queries: np.ndarray, rows: np.ndarray, exact_scores: np.ndarray,
                k: int = 10, tolerance: float = 1e-5) -> float:
    """Recall@k of approximate results `rows` [m, >=k] against exact search, ties counted: a
    returned row whose true score is at least the exact k-th score (less `tolerance`) is a hit,
    so that two rows tied at the k-th place are both right. True scores are recomputed from
    `gallery`, not taken from the index (a quantised index reports approximate ones)."""
    rows = np.asarray(rows)[:, :k]
    kth = np.asarray(exact_scores)[:, k - 1:k] - tolerance
    valid = rows >= 0
    true = np.einsum("mkd,md->mk", np.asarray(gallery, np.float32)[np.where(valid, rows, 0)],
                     np.asarray(queries, np.float32))
    hits = (true >= kth) & valid
    return float(hits.sum() / (len(rows) * k))


def holdout_queries(embeddings: np.ndarray, count: int, seed: int = 0, noise: float = 0.1) -> np.ndarray:
    """`count` queries that are not gallery rows: random rows with isotropic Gaussian noise of
    relative norm `noise` added, normalised again (a query near the gallery, as a composed query
    is, but never identical to a row)."""
    rng = np.random.default_rng(seed)
    picked = embeddings[rng.choice(len(embeddings), size=min(count, len(embeddings)), replace=False)]
    d = embeddings.shape[1]
    q = picked + rng.normal(scale=noise / np.sqrt(d), size=picked.shape).astype(np.float32) * \
        np.linalg.norm(picked, axis=1, keepdims=True)
    return (q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)).astype(np.float32)


# ---- building -----------------------------------------------------------------------------------
def choose_kind(n: int) -> str:
    """flat below FLAT_BELOW rows, hnsw below HNSW_BELOW, ivfpq above."""
    return "flat" if n < FLAT_BELOW else "hnsw" if n < HNSW_BELOW else "ivfpq"


def resolve_params(kind: str, n: int, dim: int, params: Optional[dict] = None) -> dict:
    """The kind's defaults with `params` over them (unknown keys refused), sizes filled in."""
    if kind not in KINDS:
        raise GalleryIndexError(f"unknown index kind {kind!r}; expected one of {list(KINDS)} or auto")
    out = dict(DEFAULT_PARAMS[kind])
    unknown = sorted(set(params or {}) - set(out))
    if unknown:
        raise GalleryIndexError(f"index kind {kind}: unknown parameter(s) {unknown}; its parameters: {sorted(out)}")
    for key, value in (params or {}).items():
        try:
            out[key] = int(value)
        except (TypeError, ValueError):
            raise GalleryIndexError(f"index parameter {key}={value!r}: expected an integer") from None
    if kind == "ivfpq":
        out["nlist"] = out["nlist"] or max(1, min(int(4 * np.sqrt(n)), n // 39 or 1))
        out["m"] = out["m"] or max(1, dim // 8)
        if dim % out["m"]:
            raise GalleryIndexError(f"index parameter m={out['m']} must divide the dimension {dim}")
        least = max(out["nlist"], 2 ** out["nbits"])
        if n < least:  # k-means needs a training point per centroid
            raise GalleryIndexError(f"an ivfpq index of nlist={out['nlist']} and nbits={out['nbits']} needs at least "
                                    f"{least} embeddings to train on, and the gallery has {n}: use --kind flat or hnsw "
                                    f"(ivfpq is for millions), or smaller nlist / nbits")
    return out


def _new_faiss_index(kind: str, dim: int, p: dict):
    faiss = _faiss()
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, p["M"], ip)
        index.hnsw.efConstruction = p["ef_construction"]
        return index
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, p["nlist"], p["m"], p["nbits"], ip)
    if p["refine"]:
        index = faiss.IndexRefineFlat(index)
    return index


def _apply_search_params(index, kind: str, p: dict):
    faiss = _faiss()
    if kind == "hnsw":
        index.hnsw.efSearch = p["ef_search"]
    elif kind == "ivfpq":
        if isinstance(index, faiss.IndexRefineFlat):
            faiss.extract_index_ivf(index.base_index).nprobe = p["nprobe"]
            index.k_factor = float(max(p["refine"], 1))
        else:
            faiss.extract_index_ivf(index).nprobe = p["nprobe"]


def _check_hashes(hashes, n):
    if hashes is None:
        return None
    hashes = [str(h) for h in hashes]
    if len(hashes) != n or not all(len(h) == 64 and all(c in "0123456789abcdef" for c in h) for h in hashes):
        raise GalleryIndexError(f"expected one sha256 (64 hex digits) for each of the {n} rows")
    return hashes


def _check_embeddings(embeddings, ids):
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise GalleryIndexError(f"expected embeddings of shape [n, d] with n > 0, got {embeddings.shape}")
    if len(ids) != len(embeddings):
        raise GalleryIndexError(f"{len(ids)} ids for {len(embeddings)} embeddings")
    if len(set(ids)) != len(ids):
        raise GalleryIndexError("the ids are not unique")
    bad = [i for i in ids if not isinstance(i, str) or not i or "\n" in i or "\r" in i]
    if bad:
        raise GalleryIndexError(f"ids must be non-empty one-line texts; e.g. {bad[0]!r}")
    if not np.isfinite(embeddings).all():
        raise GalleryIndexError("the embeddings hold non-finite values")
    return embeddings


def _prepare(folder: Path):
    """`folder` may take an index: missing, empty, or a gallery index folder keras_irtf wrote."""
    if folder.exists() or folder.is_symlink():
        if owned_kind(folder) == INDEX_KIND:
            return
        if not is_empty_folder(folder):
            raise NotOwnedError(f"{folder} is a folder keras_irtf did not write as a {INDEX_KIND}, so it will not "
                                f"write an index into it; choose another folder")
    mark_owned(folder, INDEX_KIND)


def build_index(embeddings, ids, out, *, fingerprint: dict, kind: str = "auto", params: Optional[dict] = None,
                images_root=None, hashes=None, holdout: int = 200, seed: int = 0,
                extra_manifest: Optional[dict] = None, log=None) -> "GalleryIndex":
    """Build an index of `kind` ("auto": `choose_kind`) over `embeddings` [n, d] (rows named by
    `ids`) into the folder `out`, measure its recall@10 against exact search on `holdout`
    queries that are not gallery rows (`holdout_queries`), and write its manifest last, each
    file under a temporary name first: an interrupted build leaves complete files only, and
    never a mixed index that loads (old manifest, new files: refused as damaged; build again).
    `images_root`: the folder the ids name files in; `hashes`: the sha256 of each file's bytes as
    embedded (GalleryIndex.image_bytes serves a file only while its bytes match)."""
    ids = list(ids)
    embeddings = _check_embeddings(embeddings, ids)
    n, dim = embeddings.shape
    hashes = _check_hashes(hashes, n)
    kind = choose_kind(n) if kind == "auto" else kind
    p = resolve_params(kind, n, dim, params)
    out = Path(out)
    _prepare(out)
    faiss = _faiss()
    start = time.perf_counter()
    index = _new_faiss_index(kind, dim, p)
    if kind == "ivfpq":
        train = embeddings
        if n > 256 * p["nlist"]:
            train = embeddings[np.random.default_rng(seed).choice(n, 256 * p["nlist"], replace=False)]
        faiss.extract_index_ivf(index).cp.seed = seed  # the k-means of the inverted lists
        index.train(train)
    index.add(embeddings)
    build_seconds = time.perf_counter() - start
    _apply_search_params(index, kind, p)
    measured = {}
    if holdout:
        queries = holdout_queries(embeddings, holdout, seed=seed)
        k = min(10, n)
        exact_scores, _ = exact_topk(embeddings, queries, k)
        _, rows = index.search(queries, k)
        measured = {"recall_at_10": round(recall_at_k(embeddings, queries, rows, exact_scores, k), 4),
                    "queries": len(queries),
                    "queries_are": "gallery embeddings with Gaussian noise of relative norm 0.1, renormalised"}
        if log:
            log(f"{kind} index of {n} rows: recall@10 {measured['recall_at_10']:.4f} against exact search")
    tmp_index, tmp_ids = out / f".{INDEX_NAME}.tmp-{os.getpid()}", out / f".{IDS_NAME}.tmp-{os.getpid()}"
    faiss.write_index(index, str(tmp_index))
    tmp_ids.write_text("".join(i + "\n" for i in ids), encoding="utf-8")
    files = {INDEX_NAME: {"bytes": tmp_index.stat().st_size}, IDS_NAME: {"sha256": file_sha256(tmp_ids)}}
    tmp_hashes = out / f".{HASHES_NAME}.tmp-{os.getpid()}"
    if hashes is not None:
        tmp_hashes.write_text("".join(h + "\n" for h in hashes))
        files[HASHES_NAME] = {"sha256": file_sha256(tmp_hashes)}
    manifest = {
        "kind": kind, "params": p, "size": n, "dim": dim, "metric": "inner product",
        "fingerprint": fingerprint, "images_root": str(Path(images_root).resolve()) if images_root else None,
        "holdout": measured, "build_seconds": round(build_seconds, 3),
        "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "files": files,
        "faiss": getattr(faiss, "__version__", "unknown"), **(extra_manifest or {}),
    }
    os.replace(tmp_index, out / INDEX_NAME)
    os.replace(tmp_ids, out / IDS_NAME)
    if hashes is not None:
        os.replace(tmp_hashes, out / HASHES_NAME)
    tmp_manifest = out / f".{MANIFEST_NAME}.tmp-{os.getpid()}"
    tmp_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp_manifest, out / MANIFEST_NAME)
    return GalleryIndex(out, manifest, index, ids, hashes)


def _lines(path) -> list:
    """The lines of a file written one item a line with "\n" (split on "\n" only: an id may hold
    characters str.splitlines also breaks on, such as a form feed)."""
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n") if text else []


# ---- loading and searching ----------------------------------------------------------------------
class GalleryIndex:
    """An index folder read back (see the module's docstring); `search` answers queries."""

    def __init__(self, folder, manifest: dict, index, ids: list, hashes: Optional[list] = None):
        self.folder = Path(folder)
        self.manifest = manifest
        self.kind = manifest["kind"]
        self.params = dict(manifest["params"])
        self.dim = int(manifest["dim"])
        self.size = int(manifest["size"])
        self.ids = ids
        self.hashes = hashes  # the sha256 of each row's image bytes (None: not recorded)
        self.images_root = Path(manifest["images_root"]) if manifest.get("images_root") else None
        self._index = index

    @classmethod
    def load(cls, folder, fingerprint: Optional[dict] = None) -> "GalleryIndex":
        """Read the index folder `folder`. With `fingerprint` (export_fingerprint of the export
        that embeds the queries), an index built from another export's embeddings is refused:
        its scores would compare vectors of two different models."""
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not path.is_file():
            raise GalleryIndexError(f"{folder} holds no {MANIFEST_NAME}: pass a folder written by tools/index.py")
        try:
            manifest = json.loads(path.read_text())
            kind, size, dim = manifest["kind"], int(manifest["size"]), int(manifest["dim"])
            recorded = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise GalleryIndexError(f"damaged index: {path}: {e}") from None
        if kind not in KINDS:
            raise GalleryIndexError(f"damaged index: {path}: unknown kind {kind!r}")
        if fingerprint is not None and not fingerprints_match(manifest.get("fingerprint") or {}, fingerprint):
            built = (manifest.get("fingerprint") or {}).get("export", "an unknown export")
            raise GalleryIndexError(
                f"{folder} was built from the embeddings of another export ({built}, checksum "
                f"{(manifest.get('fingerprint') or {}).get('saved_model_checksum')}), not of {fingerprint.get('export')} "
                f"(checksum {fingerprint.get('saved_model_checksum')}); build an index for this export with "
                f"tools/index.py")
        ids_path, index_path = folder / IDS_NAME, folder / INDEX_NAME
        for p in (ids_path, index_path):
            if not p.is_file():
                raise GalleryIndexError(f"damaged index: {p} is missing")
        if file_sha256(ids_path) != recorded.get(IDS_NAME, {}).get("sha256"):
            raise GalleryIndexError(f"damaged index: {ids_path} differs from the one {MANIFEST_NAME} records")
        if index_path.stat().st_size != recorded.get(INDEX_NAME, {}).get("bytes"):
            raise GalleryIndexError(f"damaged index: {index_path} differs in size from the one {MANIFEST_NAME} "
                                    f"records")
        ids = _lines(ids_path)
        hashes = None
        if HASHES_NAME in recorded:
            hashes_path = folder / HASHES_NAME
            if not hashes_path.is_file() or file_sha256(hashes_path) != recorded[HASHES_NAME].get("sha256"):
                raise GalleryIndexError(f"damaged index: {hashes_path} is missing or differs from the one "
                                        f"{MANIFEST_NAME} records")
            hashes = _lines(hashes_path)
        faiss = _faiss()
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as e:
            raise GalleryIndexError(f"damaged index: {index_path}: {str(e).splitlines()[0]}") from None
        if index.ntotal != size or index.d != dim or len(ids) != size or (hashes is not None and len(hashes) != size):
            raise GalleryIndexError(f"damaged index: {folder}: {index.ntotal} rows of dimension {index.d} and "
                                    f"{len(ids)} ids, the manifest says {size} of {dim}")
        loaded = cls(folder, manifest, index, ids, hashes)
        _apply_search_params(index, kind, loaded.params)
        return loaded

    def set_search_params(self, **params):
        """Change the search-time parameters (hnsw: ef_search; ivfpq: nprobe, refine)."""
        allowed = SEARCH_PARAMS[self.kind]
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise GalleryIndexError(f"a {self.kind} index has no search parameter(s) {unknown}; "
                                    f"its search parameters: {list(allowed)}")
        self.params.update({k: int(v) for k, v in params.items()})
        _apply_search_params(self._index, self.kind, self.params)

    def search(self, queries, k: int = 10):
        """(scores [m, k] float32, rows [m, k] int64) of the best `k` rows for each query
        ([m, dim], L2-normalised), best first; rows are -1 where the index holds fewer than k."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise GalleryIndexError(f"queries of dimension {queries.shape[1]}, the index holds {self.dim}")
        scores, rows = self._index.search(queries, int(k))
        return scores.astype(np.float32), rows.astype(np.int64)

    def image_path(self, row: int) -> Path:
        """The image file of `row`, resolved under the index's images root (a link leading out
        of it raises GalleryIndexError and is not followed)."""
        if self.images_root is None:
            raise GalleryIndexError(f"{self.folder} has no images folder (it was built from TFRecords): its "
                                    f"results are ids only")
        if not 0 <= row < self.size:
            raise GalleryIndexError(f"row {row} is not in the index (0 .. {self.size - 1})")
        try:
            return resolve_under(self.images_root, self.ids[row], "gallery image")
        except OutsideRootError as e:
            raise GalleryIndexError(str(e)) from None

    def image_bytes(self, row: int, trust_folder: bool = False) -> bytes:
        """The bytes of `row`'s image file (image_path), only when they are the bytes that were
        embedded (their sha256 is the recorded one), so that an index.json naming another folder
        cannot make a server hand out other files. `trust_folder`: the operator named the images
        folder and vouches for it; an index without recorded checksums needs it."""
        path = self.image_path(row)
        if self.hashes is None and not trust_folder:
            raise GalleryIndexError(f"{self.folder} records no checksums of its images, so its files are served only "
                                    f"from a folder the operator names (the demo's --gallery)")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise GalleryIndexError(f"gallery image {self.ids[row]!r} cannot be read ({e.strerror or e})") from None
        if self.hashes is not None and hashlib.sha256(data).hexdigest() != self.hashes[row]:
            raise GalleryIndexError(f"gallery image {self.ids[row]!r} differs from the one embedded into "
                                    f"{self.folder} (its sha256 changed): rebuild the index with tools/index.py")
        return data


__all__ = ["DEFAULT_PARAMS", "GalleryIndex", "GalleryIndexError", "INDEX_KIND", "KINDS", "build_index",
           "choose_kind", "exact_topk", "export_fingerprint", "fingerprints_match", "holdout_queries",
           "recall_at_k", "resolve_params"]
