"""Image decoding shared by the datasets: parallel decode in tf.data, errors that name the file."""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from keras_irtf.data.base import DatasetError
from keras_irtf.image_limits import DEFAULT_MAX_PIXELS, ImageTooLarge, check_image_file
from keras_irtf.preprocessing import IMAGENET_MEAN, IMAGENET_STD, resize_and_center_crop
from keras_irtf.utils import Progress


def check_fits_in_memory(count: int, image_size: int, what: str, fraction: float = 0.8):
    """Refuse to hold `count` images of image_size^2 x 3 bytes in memory when that exceeds
    `fraction` of this machine's physical memory: a DatasetError naming data.image_size and the
    bytes, instead of a MemoryError (or the kernel's OOM killer) after minutes of decoding."""
    need = int(count) * int(image_size) ** 2 * 3
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: nothing to compare with
        return
    if need > fraction * total:
        raise DatasetError(
            f"{what}: {count} images at data.image_size={image_size} take {need / 2**30:.1f} GiB in memory, more than "
            f"{fraction:.0%} of this machine's {total / 2**30:.1f} GiB; lower data.image_size"
        )


def decode_files(paths, image_size: int, desc: str = "images", verbose: bool = True) -> np.ndarray:
    """Decode image files into a uint8 [N, size, size, 3] array, in parallel, in order, with the
    image encoders' geometry (shorter side to `size`, centre crop: see keras_irtf.preprocessing).

    A file that cannot be read or decoded raises DatasetError naming it.
    """
    paths = [str(p) for p in paths]
    check_fits_in_memory(len(paths), image_size, desc)
    for p in paths:
        if not tf.io.gfile.exists(p):
            raise DatasetError(f"image file {p} is missing")
        try:
            check_image_file(p, DEFAULT_MAX_PIXELS)  # header only: refuse a decompression bomb
        except ImageTooLarge as e:
            raise DatasetError(f"image file {e}") from None

    def load(path):
        raw = tf.io.read_file(path)
        img = tf.io.decode_image(raw, channels=3, expand_animations=False)
        img.set_shape([None, None, 3])
        return resize_and_center_crop(img, image_size)

    # batches of at most 512 images or ~256 MiB of float32 pixels, whichever is fewer
    per_batch = max(1, min(512, 2**28 // (image_size * image_size * 3 * 4)))
    ds = tf.data.Dataset.from_tensor_slices(paths).map(load, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(per_batch).prefetch(2)
    out = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)
    progress = Progress(len(paths), desc, unit="image") if verbose else None
    i = 0
    it = iter(ds)
    while i < len(paths):
        try:
            batch = next(it).numpy()
        except tf.errors.InvalidArgumentError:
            # find the culprit to name it (the batch error does not say which file)
            for p in paths[i : i + per_batch]:
                try:
                    load(tf.constant(p))
                except tf.errors.InvalidArgumentError:
                    raise DatasetError(f"image file {p} could not be decoded (corrupt or not an image)") from None
            raise
        out[i : i + len(batch)] = batch
        i += len(batch)
        if progress:
            progress.update(len(batch))
    return out


def normalize_images(images):
    """uint8/float [.., H, W, 3] in 0..255 -> float32 ImageNet-normalised (the reference's input;
    the built-in encoders' ImagePreprocessor.normalize)."""
    x = tf.cast(images, tf.float32) / 255.0
    return (x - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)
