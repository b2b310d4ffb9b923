"""Frozen-feature cache: each image (and text) through a frozen pretrained tower once, ever.

A frozen CLIP / SigLIP tower gives an image the same feature in every step of every run, and it
is by far the most expensive part of a step (ViT-B/16: ~17 GFLOPs an image, against under 0.1
GFLOP a query for a reference-size Combiner on 512-d features). So when the image encoder is
frozen and its settings allow it (`cache: true`), the assembler
(keras_irtf.experiment.Experiment.attach_image_input)

1. computes a fingerprint of the encoder from what its features depend on, never from where
   files are (`encoder_fingerprint`): its class, its configuration (the towers' architecture; the
   preset folder it was read from is left out), every weight's bytes and the preprocessing it is
   fed (sizes and statistics, not their display name). Two runs with the same weights and
   preprocessing share it, wherever the preset folder is (copied, moved, renamed); another
   preset, a changed weight, a fine-tuned tower or another image size do not;
2. keys every image of the run: a file by its path relative to the split's image folder, its
   size and its modification time (a dataset moved with `mv`, or copied with its times kept,
   keeps its keys; a replaced file is a new key); an image held in memory (the built-in CSS) by
   its pixels (`image_keys`);
3. looks the keys up in the on-disk store of that fingerprint (`FeatureStore`, under
   `data.feature_cache`, default `<data.cache_dir>/features`), runs the tower only on the images
   it does not hold, and appends them;
4. puts the run's features in one table (`ImageFeatureCache`), attaches it to the encoder
   (`encoder.attach_cache`), and gives the pipelines a `CachedFeatureInput` instead of the pixel
   preprocessor: batches then carry cache row ids in place of images, and a training step runs
   the composer only.

The texts of a frozen text tower go through the same store (`TextFeatureStore`, keyed by the text
itself), in front of the per-run keras_irtf.data.text_cache.TextEmbeddingCache.

The cache changes nothing but speed: the features are the tower's own (tests compare them with
the uncached path). What it cannot serve: gradients with respect to the pixels (GA^A or FGSM at
ga.point=input) and pixel perturbations (the robustness evaluation embeds perturbed queries
through the tower); the assembler refuses the first and the robustness evaluation uses pixels.

The store is append-only and safe against interruption: rows are written before their keys, a
key line is the commit record, and readers take the rows that have both; appends are serialised
with a lock file, so parallel runs can share one store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import tensorflow as tf

from keras_irtf.data.pipeline import images_dataset
from keras_irtf.utils import Progress

try:
    import fcntl  # POSIX: concurrent appends to the store are serialised with a file lock
except ImportError:  # pragma: no cover  (not POSIX: appends are not serialised)
    fcntl = None

log = logging.getLogger(__name__)

# 2: fingerprints and image keys carry no file location (a store of format 1 is not read; its
# folder under the store root may be deleted)
STORE_FORMAT = 2

# Configuration keys that say where an encoder was read from (a preset folder, recorded for
# reference), not what computes its features: left out of the fingerprint.
LOCATION_KEYS = ("preset",)


# ---- fingerprints and keys ---------------------------------------------------------------------
def _digest_config(digest, obj):
    digest.update(json.dumps(obj, sort_keys=True, default=str).encode())


def preprocessing_content(preprocessor) -> dict:
    """What a preprocessor computes: its class and its description without the display name
    (a CLIP preset's preprocessing is named after its folder, which is not content)."""
    described = {k: v for k, v in preprocessor.describe().items() if k != "name"}
    return {"class": f"{type(preprocessor).__module__}.{type(preprocessor).__qualname__}", **described}


def encoder_fingerprint(encoder, extra: dict | None = None) -> str:
    """A hex digest of what the encoder's features depend on: its class, its configuration, the
    bytes of every weight it holds, and `extra` (the preprocessing it is fed, the tokenizer's
    vocabulary, the sequence length ...). Nothing in it names a file or a folder: the layer's
    name and LOCATION_KEYS (the preset folder) are left out of the configuration, and so is the
    display name of a recorded preprocessing; the configuration's architecture (the serialised
    towers) stays.

    The weights are digested from the encoder itself, as loaded, not from the preset's weights
    file: that is exactly what computes the features (a tower read from a copied preset, from a
    reloaded .keras file or built in memory is keyed the same, and a changed weight anywhere is a
    new fingerprint), and it needs no record of files between runs that could go stale. It costs
    one pass over the weights in memory, measured at about 0.4 s for ViT-B/16's vision tower (86M
    parameters, 343 MB) on one CPU core: small next to loading the preset, and nothing next to
    encoding a dataset. A digest of model.weights.h5 memoised by (path, size, mtime, inode) would
    save those seconds but key the features on a file's identity rather than on the weights in use.
    """
    digest = hashlib.sha1(f"keras_irtf-features:{STORE_FORMAT}:".encode())
    digest.update(f"{type(encoder).__module__}.{type(encoder).__qualname__}".encode())
    config = dict(encoder.get_config())
    for key in ("name", "trainable", "dtype", *LOCATION_KEYS):
        config.pop(key, None)
    recorded = config.get("image_preprocessing")  # a CLIP / SigLIP encoder's own preprocessing
    if isinstance(recorded, dict):
        config["image_preprocessing"] = {k: v for k, v in recorded.items() if k != "name"}
    _digest_config(digest, config)
    _digest_config(digest, extra or {})
    for w in encoder.weights:
        value = np.asarray(w.numpy() if hasattr(w, "numpy") else w)
        digest.update(f"{value.dtype}:{value.shape}:".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()[:20]


def file_key(path, root=None) -> str:
    """A file's key: its path relative to `root` (absolute without one), its size and its
    modification time (a replaced file is a new key; a folder moved as a whole keeps them)."""
    p = os.path.abspath(str(path))
    st = os.stat(p)
    name = os.path.relpath(p, root).replace(os.sep, "/") if root else p
    return hashlib.sha1(f"file:{name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()


def images_root(paths):
    """The deepest folder holding every one of `paths` (absolute), or None (no paths, or paths
    on different drives)."""
    folders = {os.path.dirname(p) for p in paths}
    try:
        return os.path.commonpath(sorted(folders)) if folders else None
    except ValueError:
        return None


def image_keys(split) -> list:
    """Keys of a split's images, in id order: by file when the split has paths (relative to the
    split's image folder, `images_root`, so that a moved dataset keeps its keys), else by pixels."""
    if split.image_paths is not None:
        paths = [os.path.abspath(str(p)) for p in split.image_paths]
        root = images_root(paths)
        keys = []
        for p in paths:
            try:
                keys.append(file_key(p, root))
            except OSError:  # an unreadable file: a key of its own, never shared
                keys.append(hashlib.sha1(f"missing:{p}".encode()).hexdigest())
        return keys
    images = split.images
    return [hashlib.sha1(b"pixels:" + np.ascontiguousarray(images[i]).tobytes()).hexdigest()
            for i in range(len(images))]


def text_key(text: str) -> str:
    return hashlib.sha1(b"text:" + str(text).encode("utf-8")).hexdigest()


# ---- the on-disk store -------------------------------------------------------------------------
class _Lock:
    def __init__(self, path):
        self.path = path

    def __enter__(self):
        self.f = open(self.path, "a+")
        if fcntl is not None:
            fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if fcntl is not None:
            fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


class FeatureStore:
    """key -> float32 feature [dim], on disk under `root/<fingerprint>/`, append-only.

    Files: `features.f32` (rows, raw float32), `keys.txt` (one key a line, row order),
    `meta.json` (what made them). A row counts once its key line is complete.
    """

    def __init__(self, root, fingerprint: str, dim: int, describe: dict | None = None):
        self.folder = Path(root) / fingerprint
        self.dim = int(dim)
        self.describe = describe or {}
        self.keys_path = self.folder / "keys.txt"
        self.rows_path = self.folder / "features.f32"
        self._index = None
        self._rows = 0

    @property
    def row_bytes(self) -> int:
        return 4 * self.dim

    def _load(self):
        """(key -> row, committed rows): the rows that have both their bytes and a complete key
        line (a torn last line or a torn last row, left by an interrupted append, does not
        count); a key listed twice keeps its first row."""
        lines = []
        if self.keys_path.is_file():
            text = self.keys_path.read_text()
            lines = text.split("\n")[:-1]  # the part after the last newline is torn (or empty)
        rows = self.rows_path.stat().st_size // self.row_bytes if self.rows_path.is_file() else 0
        lines = lines[:rows]
        index = {}
        for i, k in enumerate(lines):
            if k:
                index.setdefault(k, i)
        return index, len(lines)

    @property
    def index(self) -> dict:
        if self._index is None:
            self._index, self._rows = self._load()
        return self._index

    def __len__(self):
        return len(self.index)

    def lookup(self, keys) -> np.ndarray:
        """Row of each key in the store, -1 when absent."""
        index = self.index
        return np.array([index.get(k, -1) for k in keys], np.int64)

    def read(self, rows) -> np.ndarray:
        """Features of committed rows (whatever another run is appending meanwhile)."""
        rows = np.asarray(rows, np.int64)
        if not len(rows):
            return np.zeros((0, self.dim), np.float32)
        count = self.rows_path.stat().st_size // self.row_bytes  # whole rows only: one may be half-written
        if rows.max() >= count:
            raise ValueError(f"{self.rows_path}: row {int(rows.max())} asked, the file holds {count}; the "
                             f"feature store is damaged: delete {self.folder} to rebuild it")
        data = np.memmap(self.rows_path, dtype=np.float32, mode="r", shape=(count, self.dim))
        return np.array(data[rows])

    def append(self, keys, features):
        """Add rows (keys already present, or repeated in `keys`, are written once). Interrupted,
        it leaves the store valid."""
        features = np.asarray(features, np.float32).reshape(len(keys), self.dim)
        self.folder.mkdir(parents=True, exist_ok=True)
        with _Lock(self.folder / "lock"):
            self._index, n = self._load()  # another run may have appended meanwhile
            first = {}
            for i, k in enumerate(keys):
                if k not in self._index:
                    first.setdefault(k, i)
            new = list(first.values())
            if not new:
                self._rows = n
                return 0
            meta = self.folder / "meta.json"
            if not meta.is_file():
                meta.write_text(json.dumps({"format": STORE_FORMAT, "dim": self.dim, **self.describe},
                                           indent=1, default=str) + "\n")
            with open(self.rows_path, "ab") as f:
                f.truncate(n * self.row_bytes)  # drop rows an interrupted append left without keys
                f.write(np.ascontiguousarray(features[new]).tobytes())
                f.flush()
                os.fsync(f.fileno())
            text = self.keys_path.read_text() if self.keys_path.is_file() else ""
            lines = text.split("\n")[:-1][:n]
            committed = "".join(f"{k}\n" for k in lines)  # drops a torn line and keys without rows
            with open(self.keys_path, "a" if text == committed else "w") as f:
                if text != committed:
                    f.write(committed)
                f.write("".join(f"{keys[i]}\n" for i in new))
                f.flush()
                os.fsync(f.fileno())
            for j, i in enumerate(new):
                self._index[keys[i]] = n + j
            self._rows = n + len(new)
        return len(new)


# ---- the run's image features ------------------------------------------------------------------
class ImageFeatureCache:
    """The image features of a run's splits in one [N, D] table (a non-trainable variable).

    `add_splits({"train": split, ...})` fills it (from the store, running `encoder.encode_images`
    on what the store lacks); `rows(split)` maps a split's image ids to table rows; `gather(ids)`
    is what the encoder layer calls on row ids.
    """

    def __init__(self, encoder, preprocessor, store_root=None, batch_size: int = 64, verbose: bool = True):
        self.encoder = encoder
        self.preprocessor = preprocessor
        self.batch_size = int(batch_size)
        self.verbose = verbose
        self.fingerprint = encoder_fingerprint(encoder, {"preprocessing": preprocessing_content(preprocessor)})
        self.dim = int(encoder.output_dim)
        self.store = None
        if store_root is not None:
            describe = {"encoder": type(encoder).__name__, "preprocessing": preprocessor.describe(),
                        "preset": getattr(encoder, "preset", None)}
            self.store = FeatureStore(store_root, self.fingerprint, self.dim, describe)
        self._rows = {}  # id(split) -> np.int64 rows
        self._table = np.zeros((0, self.dim), np.float32)
        self.table = None
        self.images_encoded = 0  # images this cache ran through the tower
        self.images_from_store = 0
        self._encode_fn = None

    flush_every = 1024  # images between two appends to the store while filling

    def _encode(self, split, ids, name, keys):
        """Run the tower on the split's images `ids`; every `flush_every` images the new rows go
        to the store, so an interrupted fill (hours for a large dataset) keeps what it did."""
        if self._encode_fn is None:  # traced once for every split
            self._encode_fn = tf.function(self.encoder.encode_images, reduce_retracing=True)
        encode = self._encode_fn
        progress = Progress(len(ids), f"caching {name} image features", enabled=self.verbose, unit="image")
        out, pending, stored, done = [], [], 0, 0

        def flush():
            nonlocal pending, stored
            if self.store is not None and pending:
                self.store.append([keys[i] for i in ids[stored:done]], np.concatenate(pending))
            pending, stored = [], done

        for images in images_dataset(split, ids, self.batch_size, self.preprocessor):
            out.append(np.asarray(encode(images), np.float32))
            pending.append(out[-1])
            done += len(out[-1])
            progress.update(len(out[-1]))
            if done - stored >= self.flush_every:
                flush()
        flush()
        progress.close()
        features = np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)
        self.images_encoded += len(ids)
        return features

    def add_splits(self, splits: dict):
        """Features of every image of each split (name -> Split), encoded once."""
        chunks = [self._table]
        n = len(self._table)
        for name, split in splits.items():
            if split is None or id(split) in self._rows:
                continue
            keys = image_keys(split)
            features = np.zeros((len(keys), self.dim), np.float32)
            found = self.store.lookup(keys) if self.store is not None else np.full(len(keys), -1)
            have = found >= 0
            if have.any():
                features[have] = self.store.read(found[have])
                self.images_from_store += int(have.sum())
            missing = np.flatnonzero(~have)
            if len(missing):
                features[missing] = self._encode(split, missing, name, keys)
            if self.verbose:
                log.info(f"feature cache: {name} split, {len(keys)} image(s): {int(have.sum())} from "
                         f"{self.store.folder if self.store is not None else 'memory'}, {len(missing)} encoded")
            self._rows[id(split)] = np.arange(n, n + len(keys), dtype=np.int64)
            chunks.append(features)
            n += len(keys)
        self._table = np.concatenate(chunks).astype(np.float32)
        if self.table is None:
            self.table = tf.Variable(self._table, shape=tf.TensorShape([None, self.dim]), trainable=False,
                                     name="image_feature_cache")
        else:
            self.table.assign(self._table)
        return self

    def rows(self, split) -> np.ndarray:
        if id(split) not in self._rows:
            raise KeyError(f"the {getattr(split, 'name', '?')!r} split's images are not in the feature cache; "
                           f"add them with ImageFeatureCache.add_splits first")
        return self._rows[id(split)]

    def gather(self, ids):
        """Graph-friendly: int row ids [B] -> float32 [B, D]."""
        return tf.gather(self.table, tf.cast(tf.reshape(ids, [-1]), tf.int32))


class CachedFeatureInput:
    """What the pipelines take in place of the image preprocessor when features are cached:
    an image id of a split becomes its row in the cache (keras_irtf.data.pipeline)."""

    serves_cached_features = True  # what the pipeline looks for

    def __init__(self, cache: ImageFeatureCache):
        self.cache = cache
        self.size = cache.preprocessor.size

    def rows(self, split) -> np.ndarray:
        return self.cache.rows(split)


# ---- texts -------------------------------------------------------------------------------------
class TextFeatureStore:
    """The on-disk store in front of a frozen text tower: texts -> features, keyed by the text."""

    def __init__(self, root, encoder, extra: dict | None = None):
        self.encoder = encoder
        fingerprint = encoder_fingerprint(encoder, extra)
        self.store = FeatureStore(root, fingerprint, int(encoder.output_dim),
                                  {"encoder": type(encoder).__name__, "kind": "text",
                                   "preset": getattr(encoder, "preset", None)})

    def lookup(self, texts):
        """(found mask, features of the found texts)."""
        rows = self.store.lookup([text_key(t) for t in texts])
        have = rows >= 0
        return have, self.store.read(rows[have])

    def append(self, texts, features):
        return self.store.append([text_key(t) for t in texts], features)
