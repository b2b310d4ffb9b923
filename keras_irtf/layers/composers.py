"""Composers: (image feature, text feature) -> composed query feature.

- TIRGComposer (Vo et al., CVPR 2019): a gated residual. The gate keeps the parts of the image
  feature the text leaves alone; the residual adds what the text changes:
      gate = Dense(ReLU(BN([f_img, f_text])))
      res  = Dense(ReLU(Dense(ReLU(BN([f_img, f_text])))))
      f    = sigmoid(gate) * f_img * a0 + res * a1,   learnable a = (1, 10)
- ConcatComposer: the MLP over [f_img, f_text] baseline.
- ImageOnlyComposer / TextOnlyComposer: the single-modality baselines.
- CombinerComposer (CLIP4Cir, Baldrati et al.): a learned dynamic mix of vision-language
  features plus a residual; SumComposer: their plain sum (the zero-training baseline).

A composer's call takes a list [f_img, f_text] and returns a feature of f_img's width.

Batch normalisation is synchronized across replicas (a no-op on one device), so that a
multi-replica step normalises with the global batch's statistics exactly as one device does.
"""

import dataclasses

import keras
from keras import ops

from keras_irtf.config import FRACTION
from keras_irtf.layers.base import Composer
from keras_irtf.layers.dropout import Dropout
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
        self.dropout = Dropout(self.dropout_rate)
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



@dataclasses.dataclass
class CombinerConfig:
    DOMAINS = {"dropout": FRACTION, "projection_dim": (0, True, None, False), "hidden_dim": (0, True, None, False)}
    # widths of the two feature projections and of the hidden layers; 0 = 4x and 8x the feature
    # width (CLIP4Cir: 2560 and 5120 on RN50x4's 640-d features)
    projection_dim: int = 0
    hidden_dim: int = 0
    dropout: float = 0.5


@register_composer("combiner", config=CombinerConfig)
@keras.saving.register_keras_serializable(package="keras_irtf")
class CombinerComposer(Composer):
    """CLIP4Cir's Combiner (Baldrati et al.): a learned, input-dependent convex mix of the text
    and image features plus a learned residual, in the image-feature space.

        t = Dropout(ReLU(W_t f_text)),  v = Dropout(ReLU(W_v f_img))        (projection_dim each)
        lambda = sigmoid(W_2 Dropout(ReLU(W_1 [t, v])))                    (one scalar a query)
        r = W_o Dropout(ReLU(W_c [t, v]))                                 (back to the feature width)
        f = r + lambda * f_text + (1 - lambda) * f_img

    The features are the frozen CLIP / SigLIP image and text embeddings (same width); the
    model's normalisation then L2-normalises f, and with model.initial_scale=10,
    model.learn_scale=false the batch classification loss is CLIP4Cir's cross-entropy over the
    in-batch targets at logit scale 100. `mix(...)` returns lambda (how much a query leans on
    the text) and the residual.
    """

    def __init__(self, output_dim=512, projection_dim=0, hidden_dim=0, dropout=0.5, **kwargs):
        super().__init__(output_dim, **kwargs)
        self.projection_dim = int(projection_dim) or 4 * self.output_dim
        self.hidden_dim = int(hidden_dim) or 8 * self.output_dim
        self.dropout_rate = float(dropout)
        p, h = self.projection_dim, self.hidden_dim
        self.text_projection = keras.layers.Dense(p, name="text_projection")
        self.image_projection = keras.layers.Dense(p, name="image_projection")
        self.combiner_layer = keras.layers.Dense(h, name="combiner_layer")
        self.output_layer = keras.layers.Dense(self.output_dim, name="output_layer")
        self.mix_hidden = keras.layers.Dense(h, name="mix_hidden")
        self.mix_output = keras.layers.Dense(1, name="mix_output")
        self.dropouts = [Dropout(self.dropout_rate) for _ in range(4)]

    def build(self, input_shapes):
        img_shape, txt_shape = input_shapes
        if img_shape[-1] is not None and int(img_shape[-1]) != self.output_dim:
            raise ValueError(f"the Combiner mixes the image feature itself into its output: its width "
                             f"{img_shape[-1]} must equal output_dim {self.output_dim}")
        if img_shape[-1] is not None and txt_shape[-1] is not None and img_shape[-1] != txt_shape[-1]:
            raise ValueError(f"the Combiner mixes the text and image features: their widths must be equal "
                             f"(image {img_shape[-1]}, text {txt_shape[-1]}); use a vision-language encoder pair "
                             f"(model.image_encoder=clip, model.text_encoder=clip) or a TIRG composer")
        b = img_shape[0]
        self.text_projection.build(txt_shape)
        self.image_projection.build(img_shape)
        cat = (b, 2 * self.projection_dim)
        self.combiner_layer.build(cat)
        self.output_layer.build((b, self.hidden_dim))
        self.mix_hidden.build(cat)
        self.mix_output.build((b, self.hidden_dim))

    def mix(self, inputs, training=False):
        """(lambda [B, 1], the residual [B, D]) of a batch."""
        f_img, f_text = inputs
        d = self.dropouts
        t = d[0](ops.relu(self.text_projection(f_text)), training=training)
        v = d[1](ops.relu(self.image_projection(f_img)), training=training)
        cat = ops.concatenate([t, v], axis=-1)
        residual = self.output_layer(d[2](ops.relu(self.combiner_layer(cat)), training=training))
        lam = ops.sigmoid(self.mix_output(d[3](ops.relu(self.mix_hidden(cat)), training=training)))
        return lam, residual

    def call(self, inputs, training=False):
        f_img, f_text = inputs
        lam, residual = self.mix(inputs, training)
        lam = ops.cast(lam, f_img.dtype)
        return residual + lam * f_text + (1.0 - lam) * f_img

    def get_config(self):
        config = super().get_config()
        config.update(projection_dim=self.projection_dim, hidden_dim=self.hidden_dim, dropout=self.dropout_rate)
        return config


@register_composer("sum")
@keras.saving.register_keras_serializable(package="keras_irtf")
class SumComposer(Composer):
    """f_img + f_text, nothing learned: CLIP4Cir's zero-training baseline (the model's
    normalisation L2-normalises the sum). With model.finetune=text it is CLIP4Cir's first stage
    (the text tower learns to move the image feature towards the target)."""

    def build(self, input_shapes):
        img_shape, txt_shape = input_shapes
        if img_shape[-1] is not None and txt_shape[-1] is not None and img_shape[-1] != txt_shape[-1]:
            raise ValueError(f"the sum composer adds the text and image features: their widths must be equal "
                             f"(image {img_shape[-1]}, text {txt_shape[-1]})")
        self.built = True

    def call(self, inputs, training=False):
        f_img, f_text = inputs
        return f_img + ops.cast(f_text, f_img.dtype)
