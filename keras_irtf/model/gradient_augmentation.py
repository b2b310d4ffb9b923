"""Gradient augmentation (GA): the method of Huang, Zhang, Zhou and Gao (IEEE TMM 2022), and the
baselines the paper compares it with.

Explicit adversarial gradient augmentation, L_GA^A
    Adversarial training minimises (L(x) + L(x + delta)) / 2 over ||delta||_p <= eps. To first
    order the worst delta adds eps * ||dL/dx||_q (q the dual norm of p), so
        L_GA^A = eps * mean_i ||dL/dx_i||_q
    is a loss term: no adversarial sample is built, and training differentiates a gradient
    (double backprop: an inner GradientTape gives dL/dx, the outer tape differentiates
    L + L_GA^A with respect to the weights). See `ComposedRetrievalModel.train_step`.
    x is the query image's input pixels by default ("input"); "image_feature", "text_feature"
    and "composed" take it at the features instead.

Implicit isotropic gradient augmentation, L_GA^I
    L_GA^I = gamma * r . Theta with r an isotropic random vector: its gradient is gamma * r, i.e.
    isotropic noise added to the gradient of every trainable variable, fresh every step:
        g_v <- g_v + gamma * n_v,  n_v ~ N(0, I)   ("per_element")
        g_v <- g_v + gamma * n_v / size(v)          ("mean", the authors' code's scale)

Modes: "paper" (the mathematics above, the default) and "reference" (the authors' public code,
departures included, for comparison):
    - adversarial: coefficient eps * d^(1 - 1/q) / 2 (d = elements of one example's x);
    - isotropic: the loss sum_k gamma * mean(n_k * p_k + p_k) accumulated inside the loop over
      parameters, so parameter k of N (0-based) is counted N - k times and also gets a constant,
      non-random push gamma * (N - k) / size(p_k).

Baselines: FGSM adversarial training ((L(x) + L(x + eps * sign(dL/dx))) / 2) and L1 / L2 weight
regularisation.

Under tf.distribute the optimizer SUMS the replicas' gradients: terms that are not per-example
(isotropic noise, weight regularisation) are divided by the number of replicas, so the sum is
the single-device value (the noise is drawn from one seeded generator, identical on every
replica).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from keras_irtf.config import parse_ga_methods
from keras_irtf.model.losses import average_over_global_batch, replica_info

POINTS = ("input", "image_feature", "text_feature", "composed")


def dual_norm(attack_norm) -> float:
    """q with 1/p + 1/q = 1: p = inf -> 1, p = 2 -> 2, p = 1 -> inf."""
    p = str(attack_norm).lower()
    if p in ("inf", "infinity"):
        return 1.0
    p = float(p)
    if p == 1.0:
        return float("inf")
    if p <= 1.0:
        raise ValueError(f"attack norm p must be >= 1 or 'inf', got {attack_norm!r}")
    return p / (p - 1.0)


def per_example_norm(x, q: float):
    """||x_i||_q over all but the first axis."""
    flat = tf.reshape(x, [tf.shape(x)[0], -1])
    if q == 1.0:
        return tf.reduce_sum(tf.abs(flat), axis=1)
    if q == float("inf"):
        return tf.reduce_max(tf.abs(flat), axis=1)
    if q == 2.0:
        # the epsilon keeps the second derivative finite where the gradient vanishes
        return tf.sqrt(tf.reduce_sum(tf.square(flat), axis=1) + 1e-20)
    return tf.pow(tf.reduce_sum(tf.pow(tf.abs(flat) + 1e-20, q), axis=1), 1.0 / q)


def fused_standard_normals(shapes, seed_generator):
    """Independent N(0, 1) float32 tensors of the given shapes, from ONE seed of the generator.

    The Box-Muller transform (the method TensorFlow's own normal sampler uses, element by
    element) applied to one vectorised uniform draw for the total size, then split per shape:
    for u1, u2 ~ U[0, 1) independent, sqrt(-2 log(1 - u1)) * (cos, sin)(2 pi u2) are two
    independent standard normals. The same distribution as a `keras.random.normal` per shape
    (tests/test_gradient_augmentation.py checks the moments, the quantiles and the
    independence); about twice as fast on a CPU, where TensorFlow's sampler transforms one pair
    at a time, and one seed instead of one per variable. The largest |value| is
    sqrt(-2 log 2^-24) = 5.77, as in TensorFlow's float sampler.
    """
    sizes = [max(int(np.prod(s)), 0) for s in shapes]
    total = int(sum(sizes))
    if total == 0:
        return [tf.zeros(s, tf.float32) for s in shapes]
    half = (total + 1) // 2
    seed = seed_generator.next()  # what keras.random.normal(seed=generator) draws too
    seed = tf.cast(tf.math.floormod(tf.cast(seed, tf.int64), tf.int32.max - 1), tf.int32)
    u = tf.random.stateless_uniform((2, half), seed=seed, dtype=tf.float32)
    radius = tf.sqrt(-2.0 * tf.math.log1p(-u[0]))
    angle = (2.0 * np.pi) * u[1]
    normals = tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], axis=0)
    if 2 * half != total:
        normals = normals[:total]
    parts = tf.split(normals, sizes) if len(sizes) > 1 else [normals]
    return [tf.reshape(p, s) for p, s in zip(parts, shapes)]


@keras.saving.register_keras_serializable(package="keras_irtf")
class GradientAugmentation(keras.layers.Layer):
    """The GA settings of a model, and the random state of its isotropic noise.

    A layer so that the noise generator's state is saved with the model and its checkpoints
    (a resumed run continues the same noise sequence).
    """

    def __init__(self, methods="", eps=1e-3, attack_norm="inf", point="input", gamma=1e-3,
                 noise_scaling="per_element", mode="paper", fgsm_eps=1e-2, l1=1e-6, l2=1e-4,
                 seed=0, **kwargs):
        super().__init__(**kwargs)
        self.methods = parse_ga_methods(methods)
        if point not in POINTS:
            raise ValueError(f"GA point must be one of {POINTS}, got {point!r}")
        if noise_scaling not in ("per_element", "mean"):
            raise ValueError(f"noise_scaling must be 'per_element' or 'mean', got {noise_scaling!r}")
        if mode not in ("paper", "reference"):
            raise ValueError(f"GA mode must be 'paper' or 'reference', got {mode!r}")
        self.eps = float(eps)
        self.attack_norm = str(attack_norm)
        self.q = dual_norm(attack_norm)
        self.point = point
        self.gamma = float(gamma)
        self.noise_scaling = noise_scaling
        self.mode = mode
        self.fgsm_eps = float(fgsm_eps)
        self.l1 = float(l1)
        self.l2 = float(l2)
        self.seed = int(seed)
        self.noise_seed = keras.random.SeedGenerator(self.seed, name="isotropic_noise_seed")
        self.built = True  # no weights of its own besides the generator state

    @property
    def adversarial(self) -> bool:
        return "adversarial" in self.methods

    @property
    def isotropic(self) -> bool:
        return "isotropic" in self.methods

    @property
    def fgsm(self) -> bool:
        return "fgsm" in self.methods

    @property
    def needs_input_gradient(self) -> bool:
        return self.adversarial or self.fgsm

    # ---- explicit adversarial GA -------------------------------------------------------------
    def adversarial_penalty(self, grad_x):
        """L_GA^A from g = dL/dx of the (global-batch-averaged) loss.

        Each example's own gradient is g_i times the global batch size (the loss is a mean), and
        the norms are averaged over the GLOBAL batch.
        """
        n = tf.cast(tf.shape(grad_x)[0], grad_x.dtype)
        replicas, _ = replica_info()
        per_example_grad = grad_x * n * replicas
        norms = per_example_norm(per_example_grad, self.q)
        coef = self.eps
        if self.mode == "reference":
            d = float(np.prod(grad_x.shape[1:]))  # elements of one example's x (static)
            coef = self.eps * d ** (1.0 - 1.0 / self.q) / 2.0
        return coef * average_over_global_batch(norms)

    # ---- FGSM baseline ------------------------------------------------------------------------
    def fgsm_delta(self, grad_x):
        return tf.stop_gradient(self.fgsm_eps * tf.sign(grad_x))

    # ---- implicit isotropic GA ----------------------------------------------------------------
    def isotropic_noise(self, variables):
        """The noise added to each variable's gradient this step (list, one per variable), and
        this replica's share of L_GA^I = sum_v noise_v . v (for logging).

        One draw per step for all variables together (`fused_standard_normals`): the same
        N(0, I) as one draw per variable, at about half the cost (docs/ga_overhead.md)."""
        replicas, _ = replica_info()
        n_vars = len(variables)
        draws = fused_standard_normals([tuple(v.shape) for v in variables], self.noise_seed)
        noises, value = [], tf.constant(0.0)
        for k, (v, n) in enumerate(zip(variables, draws)):
            size = float(max(int(np.prod(v.shape)), 1))
            if self.mode == "reference":
                # the authors' loss: sum over k of the running total -> counted (N - k) times,
                # each term gamma * mean(n * p + p)
                count = float(n_vars - k)
                noise = (self.gamma * count / size / replicas) * (n + 1.0)
            else:
                scale = self.gamma / size if self.noise_scaling == "mean" else self.gamma
                noise = (scale / replicas) * n  # one pass: scale and replica share folded
            noise = tf.cast(noise, v.dtype)
            noises.append(noise)
            flat = tf.reshape(tf.cast(noise, tf.float32), [-1])
            value = value + tf.tensordot(flat, tf.reshape(tf.cast(v, tf.float32), [-1]), 1)
        return noises, value  # this replica's share; the replicas' shares sum to L_GA^I

    # ---- L1 / L2 baselines --------------------------------------------------------------------
    def weight_regularization(self, variables):
        """L1 and/or L2 penalty over the kernels (variables of rank >= 2), per replica."""
        replicas, _ = replica_info()
        kernels = [tf.convert_to_tensor(v) for v in variables if len(v.shape) >= 2]
        if not kernels:
            return tf.constant(0.0)
        dtype = kernels[0].dtype
        total = tf.constant(0.0, dtype)
        if "l1" in self.methods:
            total += self.l1 * tf.add_n([tf.reduce_sum(tf.abs(tf.cast(v, dtype))) for v in kernels])
        if "l2" in self.methods:
            total += self.l2 * tf.add_n([tf.reduce_sum(tf.square(tf.cast(v, dtype))) for v in kernels])
        return total / replicas

    def get_config(self):
        config = super().get_config()
        config.update(
            methods=",".join(self.methods),
            eps=self.eps,
            attack_norm=self.attack_norm,
            point=self.point,
            gamma=self.gamma,
            noise_scaling=self.noise_scaling,
            mode=self.mode,
            fgsm_eps=self.fgsm_eps,
            l1=self.l1,
            l2=self.l2,
            seed=self.seed,
        )
        return config
