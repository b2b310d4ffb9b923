"""A GA method of a user's own, in one file: a penalty on the composed feature's gradient norm."""

import dataclasses

import tensorflow as tf

from keras_irtf.model.gradient_augmentation import GAMethod
from keras_irtf.registry import register_ga_method


@dataclasses.dataclass
class FeatureGradConfig:
    weight: float = 0.5  # ga.feature_grad.weight


@register_ga_method("feature_grad", config=FeatureGradConfig)
class FeatureGradPenalty(GAMethod):
    """weight * mean_i ||dL/dx_i||_2 with x at ga.point (double backprop)."""

    needs_input_gradient = True
    term_names = ("feature_grad_penalty",)

    def loss_terms(self, ctx):
        g = tf.reshape(ctx.grad_x, [tf.shape(ctx.grad_x)[0], -1])
        return {"feature_grad_penalty": self.settings.weight * tf.reduce_mean(tf.norm(g, axis=1))}
