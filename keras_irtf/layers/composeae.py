"""ComposeAE (Anwaar, Labintcev, Kleinsteuber, WACV 2021) and its real-space ablation.

ComposeAE composes in a complex space: the image feature is projected to an amplitude x1 and the
text to a per-dimension angle delta, and the text ROTATES the image,

    re = x1 * cos(delta),   im = c * x1 * sin(delta)      (c = +1 query, c = -1 conjugate)

Two independent copies of this projection feed two mappings back to the image space: a linear
one rho over [re, im], and a convolutional one rho_conv over the five vectors (x1, delta, f_img,
re, im) stacked as channels. The composed feature is

    theta = a1 * rho(...) + a0 * rho_conv(...),   learnable a = (a0, a1) = (1, 10).

Two decoders map theta back to the query image feature and to the text feature. Extra loss terms
(weights 0.1 / 0.1 / 0.01, the reference main.py):

    L_rec_img  = mean_i mean_d (dec_img(theta_i)  - f_img_i)^2
    L_rec_text = mean_i mean_d (dec_text(theta_i) - f_text_i)^2
    L_rot_sym  = base loss( norm(compose(f_target, f_text, c = -1)), norm(f_img) )

The rotational-symmetry term rotates the TARGET back with the conjugate text and asks that the
result retrieves the query image, with the model's own base loss (batch classification or soft
triplet) and its shared scaled L2 normalisation. `auxiliary_losses` is the hook the
ComposedRetrievalModel calls, so GA and L_S work with these composers unchanged.

RealSpaceConcatAEComposer is the ablation without complex space: the same mappings over the
concatenation [f_img, f_text] (conv over that vector as a single channel, pooled to 20), the
same decoders and reconstruction terms, no rotational symmetry.

BatchNorm uses PyTorch's defaults (momentum 0.1 there = 0.9 here, epsilon 1e-5), as the
reference does, and is synchronized across replicas (a no-op on one device) so that a
MirroredStrategy run normalises with the global batch's statistics, as one device does.
"""

from __future__ import annotations

import dataclasses

import keras
from keras import ops

from keras_irtf.config import FRACTION, NON_NEGATIVE
from keras_irtf.layers.base import Composer
from keras_irtf.layers.dropout import Dropout
from keras_irtf.layers.normalization import SyncBatchNormalization
from keras_irtf.losses import average_over_global_batch, retrieval_loss
from keras_irtf.precision import at_least_float32 as f32  # float32 losses under a mixed policy
from keras_irtf.registry import register_composer


def _bn(name):
    return SyncBatchNormalization(momentum=0.9, epsilon=1e-5, name=name)


@keras.saving.register_keras_serializable(package="keras_irtf")
class ComplexProjection(keras.layers.Layer):
    """(f_img, f_text, conjugate sign) -> ([re, im], x1, delta, re, im).

    image branch: BN -> Dense(dim) -> Dropout(0.5) -> ReLU -> Dense(dim)
    text branch:  BN -> Dense(dim) -> ReLU -> Dense(dim)   (the angle delta)
    """

    def __init__(self, dim=512, dropout=0.5, **kwargs):
        super().__init__(**kwargs)
        self.dim = int(dim)
        self.dropout_rate = float(dropout)
        self.img_bn = _bn("img_bn")
        self.img_dense1 = keras.layers.Dense(self.dim, name="img_dense1")
        self.img_dropout = Dropout(self.dropout_rate)
        self.img_dense2 = keras.layers.Dense(self.dim, name="img_dense2")
        self.text_bn = _bn("text_bn")
        self.text_dense1 = keras.layers.Dense(self.dim, name="text_dense1")
        self.text_dense2 = keras.layers.Dense(self.dim, name="text_dense2")

    def build(self, input_shapes):
        img_shape, txt_shape = input_shapes[0], input_shapes[1]
        hidden = (img_shape[0], self.dim)
        self.img_bn.build(img_shape)
        self.img_dense1.build(img_shape)
        self.img_dense2.build(hidden)
        self.text_bn.build(txt_shape)
        self.text_dense1.build(txt_shape)
        self.text_dense2.build(hidden)

    def call(self, inputs, conjugate=1.0, training=False):
        f_img, f_text = inputs[0], inputs[1]
        x1 = self.img_dense1(self.img_bn(f_img, training=training))
        x1 = self.img_dense2(ops.relu(self.img_dropout(x1, training=training)))
        delta = self.text_dense2(ops.relu(self.text_dense1(self.text_bn(f_text, training=training))))
        re = x1 * ops.cos(delta)
        im = conjugate * x1 * ops.sin(delta)
        return ops.concatenate([re, im], axis=-1), x1, delta, re, im

    def get_config(self):
        config = super().get_config()
        config.update(dim=self.dim, dropout=self.dropout_rate)
        return config


@keras.saving.register_keras_serializable(package="keras_irtf")
class MappingMLP(keras.layers.Layer):
    """rho: BN -> ReLU -> Dense(dim) -> ReLU -> Dense(dim) (also the decoders' shape)."""

    def __init__(self, hidden_dim=512, output_dim=512, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = int(hidden_dim)
        self.output_dim = int(output_dim)
        self.bn = _bn("bn")
        self.dense1 = keras.layers.Dense(self.hidden_dim, name="dense1")
        self.dense2 = keras.layers.Dense(self.output_dim, name="dense2")

    def build(self, input_shape):
        self.bn.build(input_shape)
        self.dense1.build(input_shape)
        self.dense2.build((input_shape[0], self.hidden_dim))

    def call(self, x, training=False):
        x = self.dense1(ops.relu(self.bn(x, training=training)))
        return self.dense2(ops.relu(x))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.output_dim)

    def get_config(self):
        config = super().get_config()
        config.update(hidden_dim=self.hidden_dim, output_dim=self.output_dim)
        return config


def adaptive_max_pool_1d(x, bins: int):
    """PyTorch's AdaptiveMaxPool1d over axis 1 of [B, L, C]: bin i covers
    [floor(i L / bins), ceil((i + 1) L / bins))."""
    length = x.shape[1]
    if length is None:
        raise ValueError("adaptive_max_pool_1d needs a static length")
    pooled = []
    for i in range(bins):
        start = (i * length) // bins
        end = -((-(i + 1) * length) // bins)
        pooled.append(ops.max(x[:, start:end, :], axis=1))
    return ops.stack(pooled, axis=1)  # [B, bins, C]


@keras.saving.register_keras_serializable(package="keras_irtf")
class ConvMapping(keras.layers.Layer):
    """rho_conv: vectors stacked as channels [B, L, C_in] -> Conv1D(filters, 3, same) ->
    adaptive max-pool to `bins` -> flatten channel-major (filters * bins) -> MappingMLP."""

    def __init__(self, output_dim=512, filters=64, bins=16, **kwargs):
        super().__init__(**kwargs)
        self.output_dim = int(output_dim)
        self.filters = int(filters)
        self.bins = int(bins)
        self.conv = keras.layers.Conv1D(self.filters, 3, padding="same", name="conv")
        self.mlp = MappingMLP(self.output_dim, self.output_dim, name="mlp")

    def build(self, input_shape):
        if input_shape[1] is not None and input_shape[1] < self.bins:
            raise ValueError(f"ConvMapping: vectors of length {input_shape[1]} cannot be pooled to {self.bins} bins")
        self.conv.build(input_shape)
        self.mlp.build((input_shape[0], self.filters * self.bins))

    def call(self, stacked, training=False):
        x = adaptive_max_pool_1d(self.conv(stacked), self.bins)  # [B, bins, filters]
        x = ops.reshape(ops.transpose(x, (0, 2, 1)), (-1, self.filters * self.bins))
        return self.mlp(x, training=training)

    def get_config(self):
        config = super().get_config()
        config.update(output_dim=self.output_dim, filters=self.filters, bins=self.bins)
        return config


class _AutoencoderComposer(Composer):
    """Shared parts: the mixing weights a, the two decoders and the reconstruction losses."""

    def __init__(self, output_dim=512, initial_weights=(1.0, 10.0), conv_filters=64,
                 loss_weights=(0.1, 0.1, 0.01), **kwargs):
        super().__init__(output_dim, **kwargs)
        self.initial_weights = tuple(float(w) for w in initial_weights)
        self.conv_filters = int(conv_filters)
        self.loss_weights = tuple(float(w) for w in loss_weights)
        if len(self.loss_weights) != 3 or len(self.initial_weights) != 2:
            raise ValueError(
                "loss_weights must be (image reconstruction, text reconstruction, rotational symmetry) "
                f"and initial_weights (a0, a1); got {loss_weights}, {initial_weights}"
            )
        self.image_decoder = MappingMLP(self.output_dim, self.output_dim, name="image_decoder")
        self.text_decoder = None  # width of the text feature, known at build

    def _check_widths(self, img_shape):
        if img_shape[-1] is not None and img_shape[-1] != self.output_dim:
            raise ValueError(
                f"{type(self).__name__}: the image feature is {img_shape[-1]}-d but output_dim is "
                f"{self.output_dim}; ComposeAE needs them equal (set model.embed_dim)"
            )

    def _build_decoders(self, batch, text_dim):
        self.text_dim = int(text_dim)
        self.text_decoder = MappingMLP(self.text_dim, self.text_dim, name="text_decoder")
        self.image_decoder.build((batch, self.output_dim))
        self.text_decoder.build((batch, self.output_dim))
        self.mix = self.add_weight(
            name="mix", shape=(2,), initializer=keras.initializers.Constant(list(self.initial_weights))
        )

    def call(self, inputs, training=False):
        return self.compose(inputs[0], inputs[1], training=training)

    def decode(self, theta, training=False):
        """theta -> (reconstructed image feature, reconstructed text feature)."""
        return self.image_decoder(theta, training=training), self.text_decoder(theta, training=training)

    @property
    def auxiliary_loss_names(self):
        return ("reconstruction_image_loss", "reconstruction_text_loss")

    def reconstruction_losses(self, theta, f_img, f_text, training=False):
        """Unweighted (L_rec_img, L_rec_text): per-example mean squared error over the feature,
        averaged over the GLOBAL batch (= torch's mse_loss on one device)."""
        rec_img, rec_text = self.decode(theta, training=training)
        l_img = average_over_global_batch(ops.mean(ops.square(f32(rec_img) - f32(f_img)), axis=-1))
        l_text = average_over_global_batch(ops.mean(ops.square(f32(rec_text) - f32(f_text)), axis=-1))
        return l_img, l_text

    def auxiliary_losses(self, model, batch, features, composed, target_features, query, target, training=False):
        """The composer's weighted extra loss terms (ComposedRetrievalModel's hook)."""
        l_img, l_text = self.reconstruction_losses(composed, features["image"], features["text"], training)
        return {
            "reconstruction_image_loss": self.loss_weights[0] * l_img,
            "reconstruction_text_loss": self.loss_weights[1] * l_text,
        }

    def get_config(self):
        config = super().get_config()
        config.update(initial_weights=list(self.initial_weights), conv_filters=self.conv_filters,
                      loss_weights=list(self.loss_weights))
        return config


@dataclasses.dataclass
class ComposeAEConfig:
    DOMAINS = {"loss_weights": NON_NEGATIVE, "dropout": FRACTION}
    # weights of (image reconstruction, text reconstruction, rotational symmetry)
    loss_weights: tuple = (0.1, 0.1, 0.01)
    dropout: float = 0.5  # dropout of the projections (the reference's 0.5)


@dataclasses.dataclass
class RealSpaceConcatAEConfig:
    DOMAINS = {"loss_weights": NON_NEGATIVE}
    loss_weights: tuple = (0.1, 0.1, 0.0)  # no rotational symmetry in the real-space variant


@register_composer("composeae", config=ComposeAEConfig)
@keras.saving.register_keras_serializable(package="keras_irtf")
class ComposeAEComposer(_AutoencoderComposer):
    """ComposeAE: complex projection + rotation by the text, linear and convolutional mappings.

    Args:
        output_dim: width of the image feature and of theta (512 in the paper).
        initial_weights: initial (a0, a1): theta = a1 * rho + a0 * rho_conv.
        conv_filters, conv_bins: Conv1D filters and adaptive max-pool length of rho_conv (64, 16).
        dropout: dropout of the projections' image branch (0.5).
        loss_weights: (image reconstruction, text reconstruction, rotational symmetry) weights.
    """

    def __init__(self, output_dim=512, initial_weights=(1.0, 10.0), conv_filters=64, conv_bins=16,
                 dropout=0.5, loss_weights=(0.1, 0.1, 0.01), **kwargs):
        super().__init__(output_dim, initial_weights, conv_filters, loss_weights, **kwargs)
        self.conv_bins = int(conv_bins)
        self.dropout_rate = float(dropout)
        d = self.output_dim
        self.projection_linear = ComplexProjection(d, self.dropout_rate, name="projection_linear")
        self.projection_conv = ComplexProjection(d, self.dropout_rate, name="projection_conv")
        self.linear_mapping = MappingMLP(d, d, name="linear_mapping")
        self.conv_mapping = ConvMapping(d, self.conv_filters, self.conv_bins, name="conv_mapping")

    def build(self, input_shapes):
        img_shape, txt_shape = tuple(input_shapes[0]), tuple(input_shapes[1])
        self._check_widths(img_shape)
        b, d = img_shape[0], self.output_dim
        self.projection_linear.build([img_shape, txt_shape])
        self.projection_conv.build([img_shape, txt_shape])
        self.linear_mapping.build((b, 2 * d))
        self.conv_mapping.build((b, d, 5))
        self._build_decoders(b, txt_shape[-1])

    def call(self, inputs, training=False, conjugate=1.0):
        return self.compose(inputs[0], inputs[1], conjugate=conjugate, training=training)

    def compose(self, f_img, f_text, conjugate=1.0, training=False):
        """theta for (image feature, text feature); conjugate = -1 rotates the other way."""
        concat, _, _, _, _ = self.projection_linear([f_img, f_text], conjugate=conjugate, training=training)
        theta_linear = self.linear_mapping(concat, training=training)
        _, x1, delta, re, im = self.projection_conv([f_img, f_text], conjugate=conjugate, training=training)
        stacked = ops.stack([x1, delta, f_img, re, im], axis=-1)  # [B, d, 5]: five channels
        theta_conv = self.conv_mapping(stacked, training=training)
        return self.mix[1] * theta_linear + self.mix[0] * theta_conv

    @property
    def auxiliary_loss_names(self):
        return super().auxiliary_loss_names + ("rotational_symmetry_loss",)

    def rotational_symmetry_loss(self, model, f_text, target_features, source_features, training=False):
        """Unweighted L_rot_sym: the conjugate composition of the (unnormalised) target feature
        with the text, normalised, against the normalised query image feature, under the model's
        base loss."""
        # through __call__ (not compose): under a mixed precision policy Keras casts the inputs
        # and the variables to the compute dtype only there
        back = model.normalization(self([target_features, f_text], conjugate=-1.0, training=training))
        return retrieval_loss(model.retrieval_loss)(back, model.normalization(source_features))

    def auxiliary_losses(self, model, batch, features, composed, target_features, query, target, training=False):
        terms = super().auxiliary_losses(model, batch, features, composed, target_features, query, target, training)
        rot = self.rotational_symmetry_loss(model, features["text"], target_features, features["image"], training)
        terms["rotational_symmetry_loss"] = self.loss_weights[2] * rot
        return terms

    def get_config(self):
        config = super().get_config()
        config.update(conv_bins=self.conv_bins, dropout=self.dropout_rate)
        return config


@register_composer("composeae_real", config=RealSpaceConcatAEConfig)
@keras.saving.register_keras_serializable(package="keras_irtf")
class RealSpaceConcatAEComposer(_AutoencoderComposer):
    """The real-space ablation: mappings over [f_img, f_text]; conv over that vector as one
    channel, pooled to `conv_bins` (20); reconstruction losses, no rotational symmetry."""

    def __init__(self, output_dim=512, initial_weights=(1.0, 10.0), conv_filters=64, conv_bins=20,
                 loss_weights=(0.1, 0.1, 0.0), **kwargs):
        super().__init__(output_dim, initial_weights, conv_filters, loss_weights, **kwargs)
        self.conv_bins = int(conv_bins)
        d = self.output_dim
        self.linear_mapping = MappingMLP(d, d, name="linear_mapping")
        self.conv_mapping = ConvMapping(d, self.conv_filters, self.conv_bins, name="conv_mapping")

    def build(self, input_shapes):
        img_shape, txt_shape = tuple(input_shapes[0]), tuple(input_shapes[1])
        self._check_widths(img_shape)
        b, width = img_shape[0], img_shape[-1] + txt_shape[-1]
        self.linear_mapping.build((b, width))
        self.conv_mapping.build((b, width, 1))
        self._build_decoders(b, txt_shape[-1])

    def compose(self, f_img, f_text, training=False):
        x = ops.concatenate([f_img, f_text], axis=-1)
        theta_linear = self.linear_mapping(x, training=training)
        theta_conv = self.conv_mapping(ops.expand_dims(x, -1), training=training)
        return self.mix[1] * theta_linear + self.mix[0] * theta_conv

    def get_config(self):
        config = super().get_config()
        config.update(conv_bins=self.conv_bins)
        return config

