"""A frozen image encoder of a user's own that the frozen-feature cache can serve.

What makes an image encoder cacheable (keras_irtf.data.feature_cache): `encode_images(images)`
runs the network on preprocessed pixels, `attach_cache(cache)` makes integer inputs row ids of the
cache, and a `cache` key in its settings. The CLIP / SigLIP encoders are built the same way.
"""

import dataclasses

import keras
import tensorflow as tf

from keras_irtf.layers.base import ImageEncoder
from keras_irtf.registry import register_image_encoder


@dataclasses.dataclass
class FrozenCNNConfig:
    width: int = 8
    seed: int = 0
    cache: bool = True


@register_image_encoder("frozen_cnn", config=FrozenCNNConfig)
@keras.saving.register_keras_serializable(package="tests")
class FrozenCNN(ImageEncoder):
    @classmethod
    def from_settings(cls, settings, *, output_dim, **context):
        return cls(width=settings.width, seed=settings.seed, output_dim=output_dim, name="image_encoder")

    def __init__(self, width=8, seed=0, output_dim=16, **kwargs):
        kwargs.pop("trainable", None)
        super().__init__(**kwargs)
        self.width, self.seed, self.output_dim = int(width), int(seed), int(output_dim)
        init = keras.initializers.GlorotUniform(seed=self.seed)
        self.conv = keras.layers.Conv2D(self.width, 3, strides=2, kernel_initializer=init, name="conv")
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.projection = keras.layers.Dense(self.output_dim, kernel_initializer=init, name="projection")
        self._cache = None
        self.tower_runs = tf.Variable(0, dtype=tf.int64, trainable=False)  # images through the network
        self.trainable = False  # after the sub-layers exist: the setter freezes them too

    def build(self, input_shape):
        self.conv.build(input_shape)
        self.projection.build((None, self.width))
        self.built = True

    def attach_cache(self, cache):
        self._cache = cache

    def encode_images(self, images):
        self.tower_runs.assign_add(tf.cast(tf.shape(images)[0], tf.int64))
        return tf.stop_gradient(self.projection(self.pool(keras.ops.relu(self.conv(images)))))

    def call(self, images, training=False):
        images = tf.convert_to_tensor(images)
        if images.dtype.is_integer:
            return self._cache.gather(images)
        return self.encode_images(images)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.output_dim)

    def get_config(self):
        config = super().get_config()
        config.update(width=self.width, seed=self.seed, output_dim=self.output_dim)
        config.pop("trainable", None)
        return config
