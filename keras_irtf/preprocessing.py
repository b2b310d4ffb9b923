"""Image preprocessing, owned by the image encoder: decoded uint8 pixels -> the encoder's input.

Every image the model sees passes through its encoder's `ImagePreprocessor`, wherever it comes
from: the training and evaluation pipelines (keras_irtf.data.pipeline), the exported SavedModel
(keras_irtf.serving.export) and `tools/query.py`. It has two parts:

- geometry, `resize`: the shorter side to S (bilinear, antialiased), then the centre S x S crop
  (torchvision's Resize(S) + CenterCrop(S), what the TIRG reference applies to MIT-States and
  Fashion200k in training and evaluation alike; a square image is simply resized, one already
  S x S is left as it is). Datasets that hold decoded images (CSS in memory, the file cache of
  keras_irtf.data.image_files) decode with this same function;
- normalisation, `normalize`: /255, then the encoder's per-channel mean and standard deviation
  (ImageNet's for the built-in encoders; an encoder with other statistics, e.g. a CLIP tower,
  returns a preprocessor with its own).

An image encoder states its preprocessing through its classmethod `preprocessor(settings, **context)`
(keras_irtf.layers.base.ImageEncoder). This module needs TensorFlow only, not Keras: the data
pipelines, the export and the readers of exported images use it without the layers.
"""

from __future__ import annotations

import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_and_center_crop(image, size: int):
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: shorter side to `size`, centre crop."""
    image = tf.convert_to_tensor(image)
    shape = tf.shape(image)
    same = tf.logical_and(tf.equal(shape[0], size), tf.equal(shape[1], size))

    def resample():
        h = tf.cast(shape[0], tf.float64)
        w = tf.cast(shape[1], tf.float64)
        short = tf.minimum(h, w)
        # the long side is floor(size * long / short), the shorter side exactly `size`
        new_h = tf.cast(tf.where(h <= w, tf.constant(size, tf.float64), tf.floor(size * h / short)), tf.int32)
        new_w = tf.cast(tf.where(h <= w, tf.floor(size * w / short), tf.constant(size, tf.float64)), tf.int32)
        resized = tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear", antialias=True)
        top = tf.cast(tf.round(tf.cast(new_h - size, tf.float32) / 2.0), tf.int32)
        left = tf.cast(tf.round(tf.cast(new_w - size, tf.float32) / 2.0), tf.int32)
        crop = tf.image.crop_to_bounding_box(resized, top, left, size, size)
        return tf.cast(tf.clip_by_value(tf.round(crop), 0, 255), tf.uint8)

    out = tf.cond(same, lambda: tf.cast(image, tf.uint8), resample)
    return tf.ensure_shape(out, (size, size, 3))


class ImagePreprocessor:
    """How an image encoder wants its images: S x S, normalised with its mean and std."""

    def __init__(self, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, name: str = "center_crop_imagenet"):
        if int(size) < 1:
            raise ValueError(f"image size must be >= 1, got {size}")
        self.size = int(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.name = name

    def resize(self, image):
        """uint8 [H, W, 3] of any size -> uint8 [S, S, 3]."""
        return resize_and_center_crop(image, self.size)

    def normalize(self, images):
        """uint8 or float pixels in 0..255 [..., S, S, 3] -> float32 model input."""
        x = tf.cast(images, tf.float32) / 255.0
        return (x - tf.constant(self.mean)) / tf.constant(self.std)

    def __call__(self, image):
        """One decoded image uint8 [H, W, 3] -> float32 [S, S, 3]."""
        return self.normalize(self.resize(image))

    def describe(self) -> dict:
        return {"name": self.name, "size": self.size, "mean": list(self.mean), "std": list(self.std)}

    def __repr__(self):
        return f"ImagePreprocessor({self.describe()})"
