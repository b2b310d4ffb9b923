"""Mixed precision (train.precision): which parts of a model compute in 16 bits and which stay in
float32, decided here and applied by the assembler (keras_irtf.experiment) in one place.

    float32         every layer in float32 (the default)
    mixed_bfloat16  encoders and composer compute in bfloat16, variables in float32
    mixed_float16   the same in float16, trained with dynamic loss scaling (Keras'
                    LossScaleOptimizer; see ComposedRetrievalModel.train_step)

Computed in the policy: the image encoder, the text encoder and the composer (their variables
stay float32: Keras' mixed policies keep variables in float32 and cast them at each call).

Kept in float32, always:
    - the scaled L2 normalisation and its learnable scale: a norm of a 512-d feature in float16
      loses digits, and its output feeds the softmax logits (ScaledL2Normalization, built with
      dtype float32; the features are cast to float32 before it);
    - the batch-softmax logits, every loss and L_S: they are computed from the normalised float32
      embeddings (keras_irtf.losses);
    - batch-norm statistics: Keras' BatchNormalization computes the moments of 16-bit inputs in
      float32 and keeps float32 moving statistics under a mixed policy (tested);
    - gradient augmentation: the GradientAugmentation layer is float32, dL/dx is cast to float32
      before its norm, and the isotropic noise is drawn in float32 and added to the UNSCALED
      float32 gradients;
    - the optimizer's variables (slots, the loss scale), which follow the float32 variables.

Policies are given to each layer at construction. Keras passes a layer's dtype policy to the
sub-layers it creates only through the global policy, so `policy_scope` sets the global policy
around building (and around loading a .keras file: ComposedRetrievalModel.from_config) and
restores it afterwards; no other run in the process sees it.
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from keras_irtf.config import choices

PRECISIONS = choices("train.precision")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return precision


def uses_loss_scaling(precision: str) -> bool:
    """float16 has a narrow exponent range: small gradients underflow without loss scaling."""
    return precision == "mixed_float16"


@contextlib.contextmanager
def policy_scope(precision: str):
    """The global Keras dtype policy set to `precision` while building (or loading) layers, then
    restored to what it was."""
    check_precision(precision)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def at_least_float32(x):
    """A 16-bit float tensor cast to float32; float32 and float64 tensors as they are (the
    finite-difference tests run whole models in float64)."""
    x = tf.convert_to_tensor(x)
    return tf.cast(x, tf.float32) if x.dtype in (tf.float16, tf.bfloat16) else x


def wrap_optimizer(optimizer, precision: str):
    """`optimizer` wrapped in Keras' LossScaleOptimizer when the precision needs loss scaling."""
    if uses_loss_scaling(precision) and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
