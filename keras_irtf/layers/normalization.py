"""Scaled L2 normalisation: x / ||x|| * s with one learnable scale s (TIRG's NormalizationLayer).

One instance is shared by the query and the target branch, so both live on the same sphere.
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_irtf")
class ScaledL2Normalization(keras.layers.Layer):
    def __init__(self, initial_scale=4.0, learn_scale=True, epsilon=1e-12, **kwargs):
        super().__init__(**kwargs)
        self.initial_scale = float(initial_scale)
        self.learn_scale = bool(learn_scale)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        self.scale = self.add_weight(
            name="scale",
            shape=(),
            initializer=keras.initializers.Constant(self.initial_scale),
            trainable=self.learn_scale,
        )

    def call(self, x):
        norm = ops.sqrt(ops.maximum(ops.sum(ops.square(x), axis=-1, keepdims=True), self.epsilon))
        return self.scale * x / norm

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(initial_scale=self.initial_scale, learn_scale=self.learn_scale, epsilon=self.epsilon)
        return config
