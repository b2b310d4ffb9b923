"""Optimizers with per-variable learning-rate multipliers (pretrained layers at 0.1x, as TIRG does).

Keras optimizers have one learning rate. The reference trains the pretrained ResNet layers at a
tenth of it and the new layers at the full rate. `with_learning_rate_multipliers(optimizer,
{variable: multiplier})` returns the same optimizer (same class, same config) that scales the
learning rate of the given variables in every update step. Variables are matched the way Keras
matches them internally (`_var_key`), which holds under tf.distribute.

Decoupled weight decay (Keras' `weight_decay`) is still applied at the full rate to every
variable; with the reference's 1e-6 .. 5e-5 that difference is negligible.
The multipliers belong to a training run: they are not stored in a saved model's optimizer
config (a reloaded model that trains further must have them set again; `train` does).

`clip_global_gradients` (called by ComposedRetrievalModel.train_step): under a multi-replica
strategy, the optimizer's clipping (clipnorm, global_clipnorm, clipvalue) of the summed
gradient, as one device clips it, instead of Keras' clipping of each replica's share.
"""

from __future__ import annotations

import keras
import tensorflow as tf


class _LearningRateMultipliers:
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lr_multipliers = {}

    def set_learning_rate_multiplier(self, variables, multiplier: float):
        for v in variables:
            self._lr_multipliers[self._var_key(v)] = float(multiplier)

    def learning_rate_multiplier(self, variable) -> float:
        return self._lr_multipliers.get(self._var_key(variable), 1.0)

    def update_step(self, gradient, variable, learning_rate):
        m = self._lr_multipliers.get(self._var_key(variable), 1.0)
        if m != 1.0:
            learning_rate = learning_rate * m
        return super().update_step(gradient, variable, learning_rate)


@keras.saving.register_keras_serializable(package="keras_irtf")
class MultiplierSGD(_LearningRateMultipliers, keras.optimizers.SGD):
    """SGD with per-variable learning-rate multipliers."""


@keras.saving.register_keras_serializable(package="keras_irtf")
class MultiplierAdam(_LearningRateMultipliers, keras.optimizers.Adam):
    """Adam with per-variable learning-rate multipliers."""


_CLASSES = {keras.optimizers.SGD: MultiplierSGD, keras.optimizers.Adam: MultiplierAdam}


def with_learning_rate_multipliers(optimizer, groups):
    """`optimizer` rebuilt as its multiplier-aware twin; groups = [(variables, multiplier)]."""
    cls = _CLASSES.get(type(optimizer), type(optimizer) if isinstance(optimizer, _LearningRateMultipliers) else None)
    if cls is None:
        raise ValueError(f"learning-rate multipliers are available for SGD and Adam, not {type(optimizer).__name__}")
    out = cls.from_config(optimizer.get_config())
    for variables, multiplier in groups:
        out.set_learning_rate_multiplier(variables, multiplier)
    return out


def pretrained_learning_rate_groups(model, multiplier, finetune_multiplier=None):
    """[(pretrained variables, multiplier)] for a model whose encoders hold pretrained layers
    (each encoder lists them through `pretrained_variables()`). An encoder whose class sets
    `lr_multiplier_key = "finetune_lr_multiplier"` (the CLIP / SigLIP towers) gets
    `finetune_multiplier` (default: `multiplier`); the others get `multiplier`."""
    by_multiplier = {}
    for part in (getattr(model, "image_encoder", None), getattr(model, "text_encoder", None)):
        if part is None or not hasattr(part, "pretrained_variables"):
            continue
        m = multiplier
        if getattr(part, "lr_multiplier_key", "backbone_lr_multiplier") == "finetune_lr_multiplier":
            m = multiplier if finetune_multiplier is None else finetune_multiplier
        if float(m) == 1.0:
            continue
        by_multiplier.setdefault(float(m), []).extend(v for v in part.pretrained_variables() if v.trainable)
    return [(variables, m) for m, variables in by_multiplier.items() if variables]


# ---- gradient clipping of the global gradient under tf.distribute ---------------------------------
_CLIP_SETTINGS = ("clipnorm", "global_clipnorm", "clipvalue")


def gradient_clipping_optimizer(optimizer):
    """The optimizer that clips (a LossScaleOptimizer's inner optimizer, which Keras has clip) when
    any of clipnorm / global_clipnorm / clipvalue is set on it, else None."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return inner if any(getattr(inner, key, None) for key in _CLIP_SETTINGS) else None


def _replicas_in_sync() -> int:
    ctx = tf.distribute.get_replica_context()
    return 1 if ctx is None else ctx.num_replicas_in_sync


def _defer_clipping_to_the_model(optimizer):
    """Turn off `optimizer`'s own clipping in a multi-replica replica context (on one device it
    clips as before). Keras 3.15 clips in `_clip_gradients`, called on each replica's gradients
    before the all-reduce sums them; `clip_global_gradients` has clipped the sum already. The
    check is stateless (no flag to set and reset around `apply`): Keras may run the update of
    each replica in another thread than the one that computed its gradients (a
    LossScaleOptimizer's merge_call)."""
    if "_clip_gradients" in vars(optimizer):  # installed already
        return
    own = type(optimizer)._clip_gradients

    def _clip_gradients(grads):
        if _replicas_in_sync() > 1:
            return list(grads)
        return own(optimizer, grads)

    optimizer._clip_gradients = _clip_gradients


def _scale_gradient(g, factor):
    if isinstance(g, tf.IndexedSlices):
        return tf.IndexedSlices(g.values * tf.cast(factor, g.values.dtype), g.indices, g.dense_shape)
    return g * tf.cast(factor, g.dtype)


def clip_global_gradients(optimizer, grads):
    """`grads` (this replica's share of the gradient) replaced so that the optimizer's update is
    that of the clipped GLOBAL gradient, as one device clips it.

    Keras 3.15 clips (clipnorm, global_clipnorm, clipvalue) each replica's gradient before the
    all-reduce sums them: with 2 replicas each half is clipped to the norm, and the update can be
    twice one device's. Here, under a multi-replica strategy with clipping set, the gradients are
    summed across replicas first (the sum the optimizer would form), clipped with the optimizer's
    own `_clip_gradients` (the same arithmetic as on one device), and handed to replica 0, the
    other replicas contributing zeros: the optimizer's sum is then the clipped global gradient
    exactly (g + 0 = g). The optimizer's per-replica clipping is turned off for that context
    (`_defer_clipping_to_the_model`). Costs one extra all-reduce of the gradients per step, only
    when clipping is set. On one device, without clipping, or with Keras' gradient accumulation,
    `grads` are returned unchanged."""
    clipper = gradient_clipping_optimizer(optimizer)
    if clipper is None or _replicas_in_sync() == 1 or getattr(clipper, "gradient_accumulation_steps", None):
        return grads  # (with gradient accumulation Keras clips the accumulated sum: left to Keras)
    _defer_clipping_to_the_model(clipper)
    ctx = tf.distribute.get_replica_context()
    present = [i for i, g in enumerate(grads) if g is not None]
    if not present:
        return grads
    summed = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [grads[i] for i in present])
    clipped = type(clipper)._clip_gradients(clipper, summed)
    keep = tf.cast(tf.equal(ctx.replica_id_in_sync_group, 0), tf.float32)
    out = list(grads)
    for i, g in zip(present, clipped):
        out[i] = _scale_gradient(g, keep)
    return out
