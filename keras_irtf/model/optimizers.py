"""Optimizers with per-variable learning-rate multipliers (pretrained layers at 0.1x, as TIRG does).

Keras optimizers have one learning rate. The reference trains the pretrained ResNet layers at a
tenth of it and the new layers at the full rate. `with_learning_rate_multipliers(optimizer,
{variable: multiplier})` returns the same optimizer (same class, same config) that scales the
learning rate of the given variables in every update step. Variables are matched the way Keras
matches them internally (`_var_key`), which holds under tf.distribute.

Decoupled weight decay (Keras' `weight_decay`) is still applied at the full rate to every
variable; with the reference's 1e-6 .. 5e-5 that difference is negligible.
The multipliers belong to a training run: they are not stored in a saved model's optimizer
config (a reloaded model used to train further must have them set again; `train` does).
"""

from __future__ import annotations

import keras


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
