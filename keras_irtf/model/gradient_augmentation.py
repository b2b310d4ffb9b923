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

Each method is a registered `GAMethod` (keras_irtf.registry.register_ga_method) with its own
settings under ga.<name> (ga.adversarial.eps, ga.isotropic.gamma, ga.fgsm.eps, ga.l1.weight,
ga.l2.weight); `ga.point` and `ga.mode` are shared. A method acts through three hooks of
ComposedRetrievalModel.train_step: `main_loss` (replace the loss, as FGSM does), `loss_terms`
(terms added to the differentiated loss, as GA^A and L1/L2 do) and `transform_gradients` (as
GA^I does). A method of your own is one module with a GAMethod subclass, loaded with --import.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from keras_irtf.config import GA_OLD_KEYS, NON_NEGATIVE, choices
from keras_irtf.losses import average_over_global_batch, replica_info
from keras_irtf.registry import GA_METHODS, register_ga_method

POINTS = choices("ga.point")
MODES = choices("ga.mode")


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


class GAContext:
    """What a GA method's loss hooks see of one training step (built by the model's train_step).

    model, batch, training; `grad_x`: dL/dx at ga.point (when a method needs it, else None);
    `terms`: the loss terms recorded so far; `f_target` / `target`: the target image's feature
    and normalised embedding; `loss_at(delta)`: the main loss with x shifted by delta (the query
    branch recomputed, its terms not recorded).
    """

    def __init__(self, model, batch, training, terms, f_target, target, grad_x=None, loss_at=None):
        self.model = model
        self.batch = batch
        self.training = training
        self.terms = terms
        self.f_target = f_target
        self.target = target
        self.grad_x = grad_x
        self.loss_at = loss_at


class GAMethod:
    """Base of gradient-augmentation methods (and regularisation baselines).

    Subclass it, register it with `@register_ga_method(name, config=SettingsDataclass)`, and
    override what the method does (all optional):
        needs_input_gradient  True when loss hooks need ctx.grad_x (an inner tape is recorded)
        term_names            the loss terms it logs (Keras metrics, TensorBoard)
        main_loss(ctx, main)  -> the main loss to use instead of `main`
        loss_terms(ctx)       -> {term: value} added to the differentiated loss
        transform_gradients(grads, variables) -> (grads, {term: value} for logging)
    `self.settings` is the method's settings (ga.<name>), `self.ga` the model's
    GradientAugmentation layer (ga.point, ga.mode, the seeded noise generator).
    """

    needs_input_gradient = False
    term_names = ()

    def __init__(self, settings, ga):
        self.settings = settings
        self.ga = ga

    def main_loss(self, ctx, main):
        return main

    def loss_terms(self, ctx) -> dict:
        return {}

    def transform_gradients(self, grads, variables):
        return grads, {}


@dataclasses.dataclass
class AdversarialConfig:
    DOMAINS = {"eps": NON_NEGATIVE}
    CHOICES = {"attack_norm": ("inf", "2")}
    eps: float = 1e-3  # L_GA^A = eps * mean_i ||dL/dx_i||_q
    attack_norm: str = "inf"  # the attack's p: inf -> q = 1, 2 -> q = 2


@dataclasses.dataclass
class IsotropicConfig:
    DOMAINS = {"gamma": NON_NEGATIVE}
    CHOICES = {"noise_scaling": ("per_element", "mean")}
    # Default: the authors' scale and gamma. Measured on CSS (docs/results/README.md):
    # no gamma helped; per_element at gamma >= 1e-2 hurt, mean at 1e-2 had no effect.
    gamma: float = 1e-2  # standard deviation of the gradient noise (per element, before the scaling)
    noise_scaling: str = "mean"  # mean (gamma * n / size, the authors') | per_element (gamma * n)


@dataclasses.dataclass
class FGSMConfig:
    DOMAINS = {"eps": NON_NEGATIVE}
    eps: float = 1e-2  # delta = eps * sign(dL/dx)


@dataclasses.dataclass
class L1Config:
    DOMAINS = {"weight": NON_NEGATIVE}
    weight: float = 1e-6  # weight * sum |W| over kernels and embeddings


@dataclasses.dataclass
class L2Config:
    DOMAINS = {"weight": NON_NEGATIVE}
    weight: float = 1e-4  # weight * sum W^2 over kernels and embeddings


@register_ga_method("adversarial", config=AdversarialConfig)
class AdversarialGA(GAMethod):
    """Explicit adversarial GA: + eps * mean_i ||dL/dx_i||_q (double backprop)."""

    needs_input_gradient = True
    term_names = ("ga_adversarial",)

    def loss_terms(self, ctx):
        return {"ga_adversarial": self.ga.adversarial_penalty(ctx.grad_x)}


@register_ga_method("isotropic", config=IsotropicConfig)
class IsotropicGA(GAMethod):
    """Implicit isotropic GA: gamma * n added to every variable's gradient."""

    term_names = ("ga_isotropic",)

    def transform_gradients(self, grads, variables):
        noises, value = self.ga.isotropic_noise(variables)
        grads = [g + n if g is not None else None for g, n in zip(grads, noises)]
        return grads, {"ga_isotropic": value}


@register_ga_method("fgsm", config=FGSMConfig)
class FGSMTraining(GAMethod):
    """FGSM adversarial training: (L(x) + L(x + eps * sign(dL/dx))) / 2."""

    needs_input_gradient = True
    term_names = ("fgsm_loss",)

    def main_loss(self, ctx, main):
        adv = ctx.loss_at(self.ga.fgsm_delta(ctx.grad_x))
        ctx.terms["fgsm_loss"] = adv
        return 0.5 * (main + adv)


class _WeightPenalty(GAMethod):
    term_names = ("weight_regularization",)

    def loss_terms(self, ctx):
        return {"weight_regularization": self.ga.weight_regularization(ctx.model.trainable_variables, self.name)}


@register_ga_method("l1", config=L1Config)
class L1Regularization(_WeightPenalty):
    """L1 weight regularisation baseline."""

    name = "l1"


@register_ga_method("l2", config=L2Config)
class L2Regularization(_WeightPenalty):
    """L2 weight regularisation baseline."""

    name = "l2"




def stateless_seed(seed_generator):
    """The generator's next seed as the int32 pair that tf.random.stateless_* ops take (the
    generator moves on, as for keras.random.normal(seed=generator))."""
    seed = tf.cast(seed_generator.next(), tf.int64)
    return tf.cast(tf.math.floormod(seed, tf.int32.max - 1), tf.int32)


def fused_standard_normals(shapes, seed_generator, scales=None):
    """Independent N(0, scale_k^2) float32 tensors of the given shapes, from ONE seed of the
    generator (scales: one float per shape, default 1).

    The Box-Muller transform (the method TensorFlow's own normal sampler uses, element by
    element) applied to one vectorised uniform draw for the total size: for u1, u2 ~ U[0, 1)
    independent, sqrt(-2 log(1 - u1)) * (cos, sin)(2 pi u2) are two independent standard
    normals. Element i of the flattened, concatenated shapes takes the cosine member of pair i
    for i < half and the sine member of pair i - half after it, so each tensor is a slice of one
    of the two halves (one concatenation where a tensor straddles the middle) and the halves are
    never joined into one buffer. When every scale is the same it multiplies the radius (half
    the elements) instead of each output. The same distribution as a `keras.random.normal` per
    shape (tests/test_gradient_augmentation.py checks the moments, the quantiles, the
    independence and this layout); with the scaling, the addition to the gradients and the logged
    value, half the time of one TensorFlow normal draw per variable on a CPU (docs/ga_overhead.md),
    and one seed instead of one per variable. The largest |value| / scale is
    sqrt(-2 log 2^-24) = 5.77, as in TensorFlow's float sampler.
    """
    sizes = [max(int(np.prod(s)), 0) for s in shapes]
    scales = [1.0] * len(shapes) if scales is None else [float(s) for s in scales]
    total = int(sum(sizes))
    if total == 0:
        return [tf.zeros(s, tf.float32) for s in shapes]
    half = (total + 1) // 2
    u = tf.random.stateless_uniform((2, half), seed=stateless_seed(seed_generator), dtype=tf.float32)
    radius = tf.sqrt(-2.0 * tf.math.log1p(-u[0]))
    common = len(set(scales)) == 1
    if common and scales[0] != 1.0:
        radius = radius * scales[0]
    angle = (2.0 * np.pi) * u[1]
    cos_half, sin_half = radius * tf.cos(angle), radius * tf.sin(angle)
    out, start = [], 0
    for shape, size, scale in zip(shapes, sizes, scales):
        end = start + size
        if end <= half:
            flat = cos_half[start:end]
        elif start >= half:
            flat = sin_half[start - half:end - half]
        else:
            flat = tf.concat([cos_half[start:], sin_half[:end - half]], axis=0)
        if not common:
            flat = flat * scale
        out.append(tf.reshape(flat, shape))
        start = end
    return out


@keras.saving.register_keras_serializable(package="keras_irtf")
class GradientAugmentation(keras.layers.Layer):
    """The GA settings of a model, its active methods, and the random state of its isotropic noise.

    A layer so that the noise generator's state is saved with the model and its checkpoints
    (a resumed run continues the same noise sequence).

    Args:
        methods: registered GA method names ("adversarial,isotropic" or a list).
        point: where x is taken for the methods that need dL/dx.
        mode: "paper" or "reference" (the authors' code).
        settings: {method: {key: value}} (each method's ga.<method> keys; defaults otherwise).
        seed: seed of the isotropic noise.
    """

    def __init__(self, methods="", point="input", mode="paper", settings=None, seed=0, **kwargs):
        legacy = {k: kwargs.pop(k) for k in list(kwargs) if k in GA_OLD_KEYS}  # .keras files before 0.2
        super().__init__(**kwargs)
        if isinstance(methods, str):
            methods = [m.strip() for m in methods.split(",")]
        self.methods = tuple(dict.fromkeys(m for m in methods if m and m != "none"))
        unknown = [m for m in self.methods if m not in GA_METHODS]
        if unknown:
            raise ValueError(f"GA: unknown method(s) {unknown}; registered: {GA_METHODS.names()}")
        if point not in POINTS:
            raise ValueError(f"GA point must be one of {POINTS}, got {point!r}")
        if mode not in MODES:
            raise ValueError(f"GA mode must be one of {MODES}, got {mode!r}")
        self.point = point
        self.mode = mode
        self.seed = int(seed)
        given = {m: dict(v) for m, v in (settings or {}).items()}
        for key, value in legacy.items():
            method, field = GA_OLD_KEYS[key]
            given.setdefault(method, {})[field] = value
        self._method_settings = {}
        # the built-in methods' settings always exist: the properties below read them
        for name in set(self.methods) | set(given) | set(GA_METHODS.builtin_names()):
            entry = GA_METHODS.get(name)
            values = entry.default_settings()
            for key, value in given.get(name, {}).items():
                if not hasattr(values, key):
                    raise ValueError(f"GA method {name!r} has no setting {key!r}; its keys: {entry.keys}")
                setattr(values, key, value)
            for key, choices in getattr(values, "CHOICES", {}).items():
                if str(getattr(values, key)) not in choices:
                    raise ValueError(f"GA {name}.{key}={getattr(values, key)!r}: expected one of {list(choices)}")
            self._method_settings[name] = values
        self.active = [GA_METHODS.get(m).obj(self._method_settings[m], self) for m in self.methods]
        self.q = dual_norm(self.attack_norm)
        self.noise_seed = keras.random.SeedGenerator(self.seed, name="isotropic_noise_seed")
        self.built = True  # no weights of its own besides the generator state

    def method_settings(self, name):
        return self._method_settings[name]

    # the built-in methods' settings, read where the mathematics is written
    eps = property(lambda self: float(self._method_settings["adversarial"].eps))
    attack_norm = property(lambda self: str(self._method_settings["adversarial"].attack_norm))
    gamma = property(lambda self: float(self._method_settings["isotropic"].gamma))
    noise_scaling = property(lambda self: self._method_settings["isotropic"].noise_scaling)
    fgsm_eps = property(lambda self: float(self._method_settings["fgsm"].eps))
    l1 = property(lambda self: float(self._method_settings["l1"].weight))
    l2 = property(lambda self: float(self._method_settings["l2"].weight))

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
        return any(m.needs_input_gradient for m in self.active)

    def term_names(self) -> list:
        names = []
        for m in self.active:
            names += [n for n in m.term_names if n not in names]
        return names

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
        sizes = [float(max(int(np.prod(v.shape)), 1)) for v in variables]
        if self.mode == "reference":
            # the authors' loss: sum over k of the running total -> counted (N - k) times, each
            # term gamma * mean(n * p + p): noise gamma * (N - k) / size * (n + 1)
            coefs = [self.gamma * float(n_vars - k) / size / replicas for k, size in enumerate(sizes)]
        elif self.noise_scaling == "mean":
            coefs = [self.gamma / size / replicas for size in sizes]
        else:
            coefs = [self.gamma / replicas] * n_vars
        # one draw for all variables, the scale applied inside it (one pass over half the
        # elements when it is the same for every variable)
        draws = fused_standard_normals([tuple(v.shape) for v in variables], self.noise_seed, scales=coefs)
        noises, value = [], tf.constant(0.0)
        for v, noise, coef in zip(variables, draws, coefs):
            if self.mode == "reference":
                noise = noise + coef
            noise = tf.cast(noise, v.dtype)
            noises.append(noise)
            # the logged value; multiply-and-sum (a tensordot of the flattened pair is 3x slower)
            value = value + tf.reduce_sum(tf.cast(noise, tf.float32) * tf.cast(v, tf.float32))
        return noises, value  # this replica's share; the replicas' shares sum to L_GA^I

    # ---- L1 / L2 baselines --------------------------------------------------------------------
    def weight_regularization(self, variables, kind: str):
        """The L1 ("l1") or L2 ("l2") penalty over the kernels (variables of rank >= 2), per replica."""
        replicas, _ = replica_info()
        kernels = [tf.convert_to_tensor(v) for v in variables if len(v.shape) >= 2]
        if not kernels:
            return tf.constant(0.0)
        dtype = kernels[0].dtype
        if kind == "l1":
            total = self.l1 * tf.add_n([tf.reduce_sum(tf.abs(tf.cast(v, dtype))) for v in kernels])
        else:
            total = self.l2 * tf.add_n([tf.reduce_sum(tf.square(tf.cast(v, dtype))) for v in kernels])
        return total / replicas

    def get_config(self):
        config = super().get_config()
        config.update(
            methods=",".join(self.methods),
            point=self.point,
            mode=self.mode,
            settings={m: dataclasses.asdict(self._method_settings[m]) for m in sorted(self._method_settings)},
            seed=self.seed,
        )
        return config
