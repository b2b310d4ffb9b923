"""The embeddings of an index folder, in shards: what tools/index.py embedded, by which export.

    <out>/embeddings/part-00000-of-00002.npz   arrays `ids` (str [n]), `embeddings` (float32
    <out>/embeddings/part-00001-of-00002.npz   [n, d], L2-normalised) and `sha256` (str [n], the
                                               image bytes' checksums), ids sorted within a shard
    <out>/embeddings/manifest.json             the export's fingerprint, the images embedded
                                               (spec, kind, images_root), count, dim, and each
                                               shard with its row count and when it was added

A later run over the same export adds shards for the ids not embedded yet: shard numbers go on
from the last one, and a shard is named `part-<number>-of-<shards after the run that wrote it>`,
so a shard file never changes once written. The manifest is written last (atomically): a run
interrupted before it leaves the previous shards and manifest as they were (a shard file it had
moved in is not listed and is ignored; the next run numbers its shards after it).

Needs numpy only; the index (keras_irtf.index.ann.build_index) is built from `read_all`.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Optional

import numpy as np

from keras_irtf.utils import read_json, write_json

EMBEDDINGS_DIR = "embeddings"
MANIFEST_NAME = "manifest.json"
DEAD_LETTER_NAME = "dead_letter.jsonl"  # beside embeddings/: one JSON line per image not embedded
SHARD_NAME = re.compile(r"part-(\d{5,})-of-(\d{5,})\.npz")
MANIFEST_FORMAT = "keras_irtf embeddings 1"


class EmbeddingsError(ValueError):
    """Embeddings that cannot be used as asked (damaged, another export's, other images); one line."""


def shard_name(number: int, total: int) -> str:
    return f"part-{number:05d}-of-{total:05d}.npz"


def write_shard(path, ids, embeddings, sha256=None):
    """One shard file: `ids` sorted, their rows of `embeddings` (and `sha256`, the checksums of
    the images' bytes) with them; written under a temporary name first, so that a shard file is
    complete or absent."""
    order = np.argsort(np.asarray(ids, dtype=str), kind="stable")
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}.npz"
    arrays = {"ids": np.asarray(ids, dtype=str)[order], "embeddings": np.asarray(embeddings, np.float32)[order]}
    if sha256 is not None:
        arrays["sha256"] = np.asarray(sha256, dtype=str)[order]
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def read_shard_hashes(path) -> Optional[list]:
    """The sha256 of each row's image bytes, in the shard's row order, or None when the shard
    records none (embeddings written from Python without them)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            hashes = z["sha256"] if "sha256" in z.files else None
    except (OSError, ValueError) as e:
        raise EmbeddingsError(f"damaged embeddings: {path}: {e}") from None
    return None if hashes is None else [str(h) for h in hashes]


def read_shard(path):
    """(ids list, embeddings float32 [n, d]) of a shard file; EmbeddingsError naming it when it is
    not one."""
    try:
        with np.load(path, allow_pickle=False) as z:
            ids, emb = z["ids"], z["embeddings"]
    except (OSError, ValueError, KeyError) as e:
        raise EmbeddingsError(f"damaged embeddings: {path}: {e}") from None
    if ids.ndim != 1 or emb.ndim != 2 or len(ids) != len(emb) or emb.dtype != np.float32:
        raise EmbeddingsError(f"damaged embeddings: {path}: expected ids [n] and float32 embeddings [n, d], found "
                              f"{ids.shape} and {emb.dtype} {emb.shape}")
    return [str(i) for i in ids], emb


class EmbeddingStore:
    """The `embeddings/` folder of an index folder `out` (it may not exist yet: `manifest` is None)."""

    def __init__(self, out):
        self.out = Path(out)
        self.folder = self.out / EMBEDDINGS_DIR
        self.manifest: Optional[dict] = None
        path = self.folder / MANIFEST_NAME
        if path.is_file():
            try:
                manifest = read_json(path)
                shards = manifest["shards"]
                well_formed = (isinstance(manifest["fingerprint"], dict) and isinstance(manifest["images"], dict)
                               and all(SHARD_NAME.fullmatch(s["file"]) and int(s["count"]) >= 0 for s in shards))
            except (OSError, ValueError, KeyError, TypeError) as e:
                well_formed, manifest = False, f"{type(e).__name__}: {e}"
            if not well_formed:
                raise EmbeddingsError(f"damaged embeddings: {path}: not a manifest written by tools/index.py"
                                      + (f" ({manifest})" if isinstance(manifest, str) else ""))
            for s in shards:
                if not (self.folder / s["file"]).is_file():
                    raise EmbeddingsError(f"damaged embeddings: {self.folder / s['file']} is missing ({MANIFEST_NAME} "
                                          f"lists it); embed the images anew with --replace")
            self.manifest = manifest

    @property
    def fingerprint(self) -> dict:
        return self.manifest["fingerprint"] if self.manifest else {}

    @property
    def images(self) -> dict:
        return self.manifest["images"] if self.manifest else {}

    @property
    def count(self) -> int:
        return int(self.manifest["count"]) if self.manifest else 0

    @property
    def shards(self) -> list:
        return [s["file"] for s in self.manifest["shards"]] if self.manifest else []

    def _read(self, entry):
        ids, emb = read_shard(self.folder / entry["file"])
        if len(ids) != int(entry["count"]) or (self.manifest.get("dim") and emb.shape[1] != self.manifest["dim"]):
            raise EmbeddingsError(f"damaged embeddings: {self.folder / entry['file']}: {len(ids)} rows of dimension "
                                  f"{emb.shape[1]}, {MANIFEST_NAME} says {entry['count']} of "
                                  f"{self.manifest.get('dim')}")
        return ids, emb

    def embedded_ids(self) -> set:
        """The ids of every shard (read from the shard files)."""
        done = set()
        for entry in (self.manifest["shards"] if self.manifest else []):
            done.update(self._read(entry)[0])
        return done

    def read_all(self):
        """(ids, embeddings [n, d]) of every shard, in shard order."""
        if not self.manifest or not self.manifest["shards"]:
            raise EmbeddingsError(f"{self.folder} holds no embeddings")
        ids, parts = [], []
        for entry in self.manifest["shards"]:
            shard_ids, emb = self._read(entry)
            ids.extend(shard_ids)
            parts.append(emb)
        if len(set(ids)) != len(ids):
            raise EmbeddingsError(f"damaged embeddings: {self.folder}: an id is in two shards")
        return ids, np.concatenate(parts)

    def read_hashes(self) -> Optional[list]:
        """The sha256 of every row's image bytes, in `read_all`'s order, or None when a shard
        records none."""
        hashes = []
        for entry in (self.manifest["shards"] if self.manifest else []):
            shard = read_shard_hashes(self.folder / entry["file"])
            if shard is None or len(shard) != int(entry["count"]):
                return None
            hashes.extend(shard)
        return hashes

    def next_number(self) -> int:
        """The number of the next shard: after every listed shard and any left by an interrupted run."""
        numbers = [int(SHARD_NAME.fullmatch(f).group(1)) for f in self.shards]
        if self.folder.is_dir():
            numbers += [int(m.group(1)) for m in map(SHARD_NAME.fullmatch, os.listdir(self.folder)) if m]
        return max(numbers, default=-1) + 1

    def add(self, staged: list, *, fingerprint: dict, images: dict, dim: Optional[int]) -> list:
        """Move the complete shard files `staged` ([(path, count)]) into the store under their new
        names, then write the manifest listing them after the shards already there. Returns the
        new shard names."""
        self.folder.mkdir(parents=True, exist_ok=True)
        first = self.next_number()
        total = first + len(staged)
        now = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        entries = list(self.manifest["shards"]) if self.manifest else []
        added = []
        for offset, (path, count) in enumerate(staged):
            name = shard_name(first + offset, total)
            os.replace(path, self.folder / name)
            entries.append({"file": name, "count": int(count), "added": now})
            added.append(name)
        manifest = {
            "format": MANIFEST_FORMAT,
            "fingerprint": fingerprint,
            "images": images,
            "count": sum(e["count"] for e in entries),
            "dim": dim if dim is not None else (self.manifest or {}).get("dim"),
            "normalised": True,
            "shards": entries,
            "created": (self.manifest or {}).get("created", now),
            "updated": now,
        }
        write_json(self.folder / MANIFEST_NAME, manifest)
        self.manifest = manifest
        return added
