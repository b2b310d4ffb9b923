"""Composers: (image feature, text feature) -> composed query feature.

- TIRGComposer (Vo et al., CVPR 2019): a gated residual. The gate keeps the parts of the image
  feature the text leaves alone; the residual adds what the text changes:
      gate = Dense(ReLU(BN([f_img, f_text])))
      res  = Dense(ReLU(Dense(ReLU(BN([f_img, f_text])))))
      f    = sigmoid(gate) * f_img * a0 + res * a1,   learnable a = (1, 10)
- ConcatComposer: the MLP over [f_img, f_text] baseline.
- ImageOnlyComposer / TextOnlyComposer: the single-modality baselines.

A composer's call takes a list [f_img, f_text] and returns a feature of f_img's width.

Batch normalisation is synchronized across replicas (a no-op on one device), so that a
multi-replica step normalises with the global batch's statistics exactly as one device does.
"""

import dataclasses

import keras
from keras import ops

from keras_irtf.config import FRACTION
from keras_irtf.layers.base import Composer
from keras_irtf.layers.normalization import SyncBatchNormalization
from keras_irtf.registry import register_composer


@register_composer("tirg")
@keras.saving.register_keras_serializable(package="keras_irtf")
class TIRGComposer(Composer):
    def __init__(self, output_dim=512, initial_weights=(1.0, 10.0), **kwargs):
        super().__init__(output_dim, **kwargs)
        self.initial_weights = tuple(float(w) for w in initial_weights)
        d = self.output_dim
        self.gate_bn = SyncBatchNormalization(name="gate_bn")
        self.gate_dense = keras.layers.Dense(d, name="gate_dense")
        self.res_bn = SyncBatchNormalization(name="res_bn")
        self.res_dense1 = keras.layers.Dense(2 * d, name="res_dense1")
        self.res_dense2 = keras.layers.Dense(d, name="res_dense2")

    def build(self, input_shapes):
        img_shape, txt_shape = input_shapes
        cat = (img_shape[0], img_shape[-1] + txt_shape[-1])
        self.gate_bn.build(cat)
        self.gate_dense.build(cat)
        self.res_bn.build(cat)
        self.res_dense1.build(cat)
        self.res_dense2.build((img_shape[0], 2 * self.output_dim))
        self.mix = self.add_weight(
            name="mix", shape=(2,), initializer=keras.initializers.Constant(list(self.initial_weights))
        )

    def call(self, inputs, training=False):
        f_img, f_text = inputs
        x = ops.concatenate([f_img, f_text], axis=-1)
        gate = self.gate_dense(ops.relu(self.gate_bn(x, training=training)))
        res = self.res_dense2(ops.relu(self.res_dense1(ops.relu(self.res_bn(x, training=training)))))
        return ops.sigmoid(gate) * f_img * self.mix[0] + res * self.mix[1]

    def get_config(self):
        config = super().get_config()
        config.update(initial_weights=list(self.initial_weights))
        return config


@dataclasses.dataclass
class ConcatConfig:
    DOMAINS = {"dropout": FRACTION}
    dropout: float = 0.1  # before the last projection


@register_composer("concat", config=ConcatConfig)
@keras.saving.register_keras_serializable(package="keras_irtf")
class ConcatComposer(Composer):
    def __init__(self, output_dim=512, dropout=0.1, **kwargs):
        super().__init__(output_dim, **kwargs)
        self.dropout_rate = float(dropout)
        d = self.output_dim
        self.bn1 = SyncBatchNormalization(name="bn1")
        self.dense1 = keras.layers.Dense(2 * d, name="dense1")
        self.bn2 = SyncBatchNormalization(name="bn2")
        self.dropout = keras.layers.Dropout(self.dropout_rate)
        self.dense2 = keras.layers.Dense(d, name="dense2")

    def build(self, input_shapes):
        img_shape, txt_shape = input_shapes
        cat = (img_shape[0], img_shape[-1] + txt_shape[-1])
        self.bn1.build(cat)
        self.dense1.build(cat)
        self.bn2.build((img_shape[0], 2 * self.output_dim))
        self.dense2.build((img_shape[0], 2 * self.output_dim))

    def call(self, inputs, training=False):
        x = ops.concatenate(list(inputs), axis=-1)
        x = self.dense1(ops.relu(self.bn1(x, training=training)))
        x = self.dropout(ops.relu(self.bn2(x, training=training)), training=training)
        return self.dense2(x)

    def get_config(self):
        config = super().get_config()
        config.update(dropout=self.dropout_rate)
        return config


@register_composer("image_only")
@keras.saving.register_keras_serializable(package="keras_irtf")
class ImageOnlyComposer(Composer):
    def call(self, inputs, training=False):
        return inputs[0]


@register_composer("text_only")
@keras.saving.register_keras_serializable(package="keras_irtf")
class TextOnlyComposer(Composer):
    def call(self, inputs, training=False):
        return inputs[1]

