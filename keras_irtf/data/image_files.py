"""Images read from disk: checks, the reference preprocessing, and a file cache of decoded images.

Datasets of 50K-200K photographs (MIT-States, Fashion200k) are never held in memory. Their
images are

- checked when the dataset is opened (`check_image_files`): a cheap look at each file's head and
  tail finds missing, empty, non-image and truncated files. Each is reported with its path; the
  run stops (`data.on_bad_image=error`) or the image is left out and counted (`skip`);
- decoded in parallel inside tf.data and brought to the model's size as the reference does for
  both training and evaluation: the shorter side resized to S (bilinear, antialiased), then the
  centre S x S crop (`resize_and_center_crop`);
- optionally decoded once into a file cache (`data.file_cache=DIR`, `ImageFileCache`): a raw
  uint8 [N, S, S, 3] file that later epochs, runs and evaluations read instead of the JPEGs.
  Filling it decodes every image, so it also finds the damaged files a header check cannot see.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow as tf

from keras_irtf.data.base import DatasetError
from keras_irtf.image_limits import DEFAULT_MAX_PIXELS, image_dimensions
from keras_irtf.preprocessing import resize_and_center_crop  # noqa: F401  (the shared geometry)
from keras_irtf.safety import mark_owned, not_owned_error, owned_kind
from keras_irtf.utils import Progress

log = logging.getLogger(__name__)

OWNED_KIND = "image file cache"
CACHE_FORMAT = 1  # bump when the preprocessing changes: old caches are then not reused

_JPEG = b"\xff\xd8\xff"
_PNG = b"\x89PNG\r\n\x1a\n"
_TAIL = 1024
_HEAD = 4096  # holds the dimensions of a PNG, GIF or BMP, and of most JPEGs
_JPEG_HEAD = 1 << 18
MAX_PIXELS = DEFAULT_MAX_PIXELS


def _check_one(path) -> str | None:
    """None when the file looks like a whole image, else the reason it does not."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return "missing or unreadable"
    if size == 0:
        return "empty file"
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD)
            if head.startswith(_JPEG) and image_dimensions(head) is None:
                head += f.read(_JPEG_HEAD - _HEAD)  # EXIF segments can precede the frame header
            f.seek(max(0, size - _TAIL))
            tail = f.read()
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    dims = image_dimensions(head)
    if dims is not None and dims[0] * dims[1] > MAX_PIXELS:
        return (f"{dims[0]} x {dims[1]} pixels, over the limit of {MAX_PIXELS} "
                f"(keras_irtf.image_limits.DEFAULT_MAX_PIXELS): decoding it would exhaust memory")
    if head.startswith(_JPEG):
        # every complete JPEG ends with the EOI marker (a few writers pad after it)
        return None if b"\xff\xd9" in tail else "truncated JPEG (no end-of-image marker)"
    if head.startswith(_PNG):
        return None if b"IEND" in tail else "truncated PNG (no IEND chunk)"
    if head[:4] in (b"GIF8",) or head[:2] == b"BM" or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return None
    return "not an image (unknown file format)"


def check_image_files(paths, on_bad_image: str = "error", desc: str = "images", verbose: bool = True):
    """Look at every file's head and tail; returns (keep mask [N] bool, [(path, reason)] of bad files).

    on_bad_image="error" raises DatasetError naming the first bad files; "skip" reports them and
    returns them excluded from the mask.
    """
    paths = [str(p) for p in paths]
    workers = 8 if len(paths) > 256 else 1
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            reasons = list(pool.map(_check_one, paths, chunksize=256))
    else:
        reasons = [_check_one(p) for p in paths]
    bad = [(p, r) for p, r in zip(paths, reasons) if r is not None]
    keep = np.array([r is None for r in reasons], dtype=bool)
    report_bad_images(bad, on_bad_image, desc, verbose)
    return keep, bad


def report_bad_images(bad, on_bad_image: str, desc: str, verbose: bool = True):
    if not bad:
        return
    listing = "; ".join(f"{p}: {r}" for p, r in bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
    if on_bad_image == "error":
        raise DatasetError(
            f"{len(bad)} unreadable image(s) in {desc}: {listing}. Replace the files, or run with "
            f"--set data.on_bad_image=skip to leave them out (they are counted and reported)."
        )
    if verbose:
        log.warning(f"skipping {len(bad)} unreadable image(s) in {desc} (data.on_bad_image=skip): {listing}")


# ---- decoding (TensorFlow) -------------------------------------------------------------------
def decode_and_resize(path, size: int):
    """A file path (string tensor) -> uint8 [size, size, 3]. Raises inside tf.data if unreadable."""
    raw = tf.io.read_file(path)
    img = tf.io.decode_image(raw, channels=3, expand_animations=False)
    img.set_shape([None, None, 3])
    return resize_and_center_crop(img, size)


def safe_decode_dataset(path, size: int):
    """A one-element dataset: (image uint8 [size, size, 3], ok bool). A file that cannot be read or
    decoded gives a black image and ok=False instead of an error, so the caller can name it."""
    good = tf.data.Dataset.from_tensors(path).map(lambda p: (decode_and_resize(p, size), tf.constant(True)))
    bad = tf.data.Dataset.from_tensors((tf.zeros([size, size, 3], tf.uint8), tf.constant(False)))
    return good.ignore_errors().concatenate(bad).take(1)


# ---- the file cache --------------------------------------------------------------------------
class CachedImages:
    """Rows of a memory-mapped image cache, indexed like an in-memory image array."""

    def __init__(self, array: np.ndarray, rows: np.ndarray):
        self.array = array
        self.rows = np.asarray(rows, dtype=np.int64)

    @property
    def shape(self):
        return (len(self.rows),) + tuple(self.array.shape[1:])

    @property
    def dtype(self):
        return self.array.dtype

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, ids):
        return np.asarray(self.array[self.rows[np.asarray(ids, dtype=np.int64)]])


class ImageFileCache:
    """Decoded, resized images of a list of files, in one raw uint8 file on disk.

    The folder name carries a hash of the file list, the image size and the cache format, so a
    cache is only reused for exactly the images and preprocessing it was made from. Filling is
    resumable: the state of every row (0 = not yet, 1 = decoded, 2 = unreadable) is saved as it
    goes, and an interrupted fill continues where it stopped. Unreadable rows are tried again on
    every fill, so replacing a damaged file is enough.
    """

    def __init__(self, root, name: str, paths, size: int):
        self.paths = [str(p) for p in paths]
        self.size = int(size)
        digest = hashlib.sha1()
        digest.update(f"{CACHE_FORMAT}:{self.size}:".encode())
        for p in self.paths:
            digest.update(os.path.abspath(p).encode() + b"\n")
        self.folder = Path(root) / f"{name}_{self.size}px_{digest.hexdigest()[:12]}"
        self.data_path = self.folder / "images.u8"
        self.state_path = self.folder / "state.npy"

    @property
    def row_bytes(self) -> int:
        return self.size * self.size * 3

    def _claim_folder(self):
        """Create the cache folder with its ownership marker; an existing one must be ours (its
        marker, or only the cache's own files), since opening it may truncate images.u8."""
        if owned_kind(self.folder) == OWNED_KIND:
            return
        if self.folder.exists() or self.folder.is_symlink():
            own = {"images.u8", "state.npy", "meta.json"}
            names = {p.name for p in self.folder.iterdir()} if self.folder.is_dir() and not self.folder.is_symlink() else {"?"}
            if not names <= own:
                raise not_owned_error(self.folder, OWNED_KIND, "move it away or choose another data.file_cache folder")
        mark_owned(self.folder, OWNED_KIND)

    def _open(self):
        self._claim_folder()
        n = len(self.paths)
        shape = (n, self.size, self.size, 3)
        if not self.data_path.is_file() or self.data_path.stat().st_size != n * self.row_bytes:
            with open(self.data_path, "wb") as f:
                f.truncate(n * self.row_bytes)
            state = np.zeros(n, np.int8)
            np.save(self.state_path, state)
            meta = {"format": CACHE_FORMAT, "size": self.size, "images": n, "first": self.paths[:1]}
            (self.folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        else:
            state = np.load(self.state_path) if self.state_path.is_file() else np.zeros(n, np.int8)
        data = np.memmap(self.data_path, dtype=np.uint8, mode="r+", shape=shape)
        return data, state

    def fill(self, verbose: bool = True, flush_every: int = 2048):
        """Decode every image not yet cached. Returns (memmap [N, S, S, 3], bad [(path, reason)])."""
        data, state = self._open()
        todo = np.flatnonzero(state != 1)  # unreadable ones are retried (a replaced file is picked up)
        if len(todo):
            if verbose:
                log.info(f"file cache: decoding {len(todo)} image(s) into {self.folder} "
                         f"({len(self.paths) * self.row_bytes / 2**30:.2f} GiB)")
            progress = Progress(len(todo), "caching images", enabled=verbose)
            paths = tf.constant(self.paths)
            size = self.size
            ds = tf.data.Dataset.from_tensor_slices(todo.astype(np.int64))
            ds = ds.interleave(
                lambda i: tf.data.Dataset.zip((tf.data.Dataset.from_tensors(i), safe_decode_dataset(paths[i], size))),
                cycle_length=16, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False,
            ).batch(64).prefetch(2)
            done = 0
            for ids, (images, ok) in ds:
                ids, images, ok = ids.numpy(), images.numpy(), ok.numpy()
                data[ids[ok]] = images[ok]
                state[ids] = np.where(ok, 1, 2)
                done += len(ids)
                progress.update(len(ids))
                if done % flush_every < len(ids):
                    data.flush()
                    np.save(self.state_path, state)
            data.flush()
            np.save(self.state_path, state)
        bad = [(self.paths[i], "could not be decoded (corrupt image)") for i in np.flatnonzero(state == 2)]
        return np.memmap(self.data_path, dtype=np.uint8, mode="r", shape=data.shape), bad


def prepare_split_images(paths, *, on_bad_image="error", file_cache=None, image_size=224, name="images",
                         desc=None, verbose=True):
    """Check a split's image files and, with a file cache, decode them into it.

    Returns (keep mask over `paths`, images or None, bad [(path, reason)]): `images` is a
    CachedImages over the kept images (in order) when a cache folder is given, else None (the
    pipeline then streams the files).
    """
    desc = desc or name
    keep, bad = check_image_files(paths, on_bad_image, desc, verbose)
    if not file_cache:
        return keep, None, bad
    kept_idx = np.flatnonzero(keep)
    cache = ImageFileCache(file_cache, name, [paths[i] for i in kept_idx], image_size)
    array, bad_decoded = cache.fill(verbose)
    report_bad_images(bad_decoded, on_bad_image, desc, verbose)
    if bad_decoded:
        bad_set = {p for p, _ in bad_decoded}
        ok_rows = np.array([str(paths[i]) not in bad_set for i in kept_idx], dtype=bool)
        keep[kept_idx[~ok_rows]] = False
        rows = np.flatnonzero(ok_rows)
    else:
        rows = np.arange(len(kept_idx))
    return keep, CachedImages(array, rows), bad + bad_decoded
