"""A tiny composed-retrieval model without batch normalisation or dropout, for exact GA checks.

Examples do not interact inside the encoders (no batch statistics), so each query's loss depends
on its own source image only, the per-example gradient is well defined, and a 2-replica run can
match one device exactly. Any float dtype (float64 for finite differences).
"""

import keras
import numpy as np
import tensorflow as tf

from keras_irtf.model.gradient_augmentation import GradientAugmentation
from keras_irtf.layers.normalization import ScaledL2Normalization
from keras_irtf.model.retrieval_model import ComposedRetrievalModel


class TinyImageEncoder(keras.layers.Layer):
    def __init__(self, dim=6, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.dense = keras.layers.Dense(dim, activation="tanh", dtype=self.dtype_policy)

    def build(self, shape):
        self.dense.build((shape[0], int(np.prod(shape[1:]))))

    def call(self, x, training=False):
        return self.dense(tf.reshape(x, [tf.shape(x)[0], -1]))

    def compute_output_shape(self, shape):
        return (shape[0], self.dim)


class TinyTextEncoder(keras.layers.Layer):
    def __init__(self, vocab=7, dim=6, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.embedding = keras.layers.Embedding(vocab, 4, dtype=self.dtype_policy)
        self.dense = keras.layers.Dense(dim, activation="tanh", dtype=self.dtype_policy)

    def build(self, shape):
        self.embedding.build(shape)
        self.dense.build((shape[0], 4))

    def call(self, tokens, training=False):
        return self.dense(tf.reduce_mean(self.embedding(tokens), axis=1))

    def compute_output_shape(self, shape):
        return (shape[0], self.dim)


class TinyComposer(keras.layers.Layer):
    """A gated residual like TIRG's, without batch normalisation."""

    def __init__(self, dim=6, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.gate = keras.layers.Dense(dim, dtype=self.dtype_policy)
        self.res = keras.layers.Dense(dim, activation="tanh", dtype=self.dtype_policy)

    def build(self, shapes):
        cat = (None, shapes[0][-1] + shapes[1][-1])
        self.gate.build(cat)
        self.res.build(cat)

    def call(self, inputs, training=False):
        f_img, f_text = inputs
        x = tf.concat([f_img, f_text], axis=-1)
        return tf.sigmoid(self.gate(x)) * f_img + self.res(x)

    def compute_output_shape(self, shapes):
        return (shapes[0][0], self.dim)


def tiny_model(methods="", eta=0.0, dtype="float64", image_size=3, text_length=3, seed=0, **ga):
    """A tiny ComposedRetrievalModel. GA^I's noise reaches every variable unless `settings` say
    otherwise (ga.isotropic.exclude: []); the library's default exclusion has tests of its own."""
    keras.utils.set_random_seed(seed)
    settings = {m: dict(v) for m, v in (ga.pop("settings", None) or {}).items()}
    settings.setdefault("isotropic", {}).setdefault("exclude", ())
    ga["settings"] = settings
    kw = dict(dtype=dtype)
    model = ComposedRetrievalModel(
        TinyImageEncoder(name="img", **kw), TinyTextEncoder(name="txt", **kw), TinyComposer(name="comp", **kw),
        normalization=ScaledL2Normalization(4.0, name="norm", **kw),
        gradient_augmentation=GradientAugmentation(methods=methods, seed=seed, name="ga", **ga),
        eta=eta, image_size=image_size, max_text_length=text_length,
    )
    return model


def tiny_batch(batch=6, image_size=3, text_length=3, dtype="float64", seed=0):
    rng = np.random.default_rng(seed)
    return {
        "source_image": tf.constant(rng.normal(size=(batch, image_size, image_size, 3)), dtype),
        "text": tf.constant(rng.integers(1, 7, size=(batch, text_length)), tf.int32),
        "target_image": tf.constant(rng.normal(size=(batch, image_size, image_size, 3)), dtype),
    }
