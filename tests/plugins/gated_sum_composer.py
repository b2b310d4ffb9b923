"""A composer of a user's own, in one file: registered by name with its settings."""

import dataclasses

import keras

from keras_irtf.layers import Composer
from keras_irtf.registry import register_composer


@dataclasses.dataclass
class GatedSumConfig:
    hidden: int = 8  # model.composer.hidden


@register_composer("gated_sum", config=GatedSumConfig)
@keras.saving.register_keras_serializable(package="plugin_tests")
class GatedSum(Composer):
    """f = sigmoid(g([img, text])) * img + Dense(text)."""

    def __init__(self, output_dim=512, hidden=8, **kwargs):
        super().__init__(output_dim, **kwargs)
        self.hidden = int(hidden)
        self.gate_hidden = keras.layers.Dense(self.hidden, activation="relu", name="gate_hidden")
        self.gate = keras.layers.Dense(self.output_dim, name="gate")
        self.text_proj = keras.layers.Dense(self.output_dim, name="text_proj")

    def build(self, input_shapes):
        img, txt = input_shapes
        self.gate_hidden.build((img[0], img[-1] + txt[-1]))
        self.gate.build((img[0], self.hidden))
        self.text_proj.build(txt)

    def call(self, inputs, training=False):
        img, txt = inputs
        gate = self.gate(self.gate_hidden(keras.ops.concatenate([img, txt], axis=-1)))
        return keras.ops.sigmoid(gate) * img + self.text_proj(txt)

    def get_config(self):
        config = super().get_config()
        config.update(hidden=self.hidden)
        return config
