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

Baselines: FGSM adversarial training ((L(x) + L(x + eps * sign(dL/dx))) / 2), PGD-k adversarial
training (Madry et al.: (L(x) + L(x + delta_k)) / 2 with delta_k from k projected gradient steps)
and L1 / L2 weight regularisation.

GA^I's noise can be restricted to some of the variables (ga.isotropic.exclude / only, by kind:
kernel, bias, normalization, embedding, logit_scale; or by part: image_encoder, text_encoder,
composer), and it logs the ratio ||noise|| / ||gradient|| of every step (`ga_noise_ratio`).
Left unset (null), `exclude` is DEFAULT_EXCLUDE in the paper's mode, the groups whose noise alone
lowered validation recall on CSS (the GA study, docs/results/README.md), and nothing in the
reference mode (the authors' code noises every variable) or when `only` is given (`only` names the
variables itself); `exclude: []` noises every variable.

Under tf.distribute the optimizer SUMS the replicas' gradients: terms that are not per-example
(isotropic noise, weight regularisation) are divided by the number of replicas, so the sum is
the single-device value (the noise is drawn from one seeded generator, identical on every
replica).

Each method is a registered `GAMethod` (keras_irtf.registry.register_ga_method) with its own
settings under ga.<name> (ga.adversarial.eps, ga.isotropic.gamma, ga.fgsm.eps, ga.pgd.steps,
ga.l1.weight, ga.l2.weight); `ga.point` and `ga.mode` are shared. A method acts through three
hooks of ComposedRetrievalModel.train_step: `main_loss` (replace the loss, as FGSM and PGD do),
`loss_terms` (terms added to the differentiated loss, as GA^A and L1/L2 do) and
`transform_gradients` (as GA^I does). A method of your own is one module with a GAMethod
subclass, loaded with --import.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from keras_irtf.config import AT_LEAST_ONE, GA_OLD_KEYS, NON_NEGATIVE, choices, is_tuple_field
from keras_irtf.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from keras_irtf.losses import average_over_global_batch, replica_info
from keras_irtf.registry import GA_METHODS, register_ga_method

POINTS = choices("ga.point")
MODES = choices("ga.mode")
# What GA^I's ga.isotropic.exclude / only name. Every trainable variable has one kind (by the layer
# that owns it, see `variable_groups`) and, except the logit scale, one part of the model.
VARIABLE_KINDS = ("kernel", "bias", "normalization", "embedding", "logit_scale")
MODEL_PARTS = ("image_encoder", "text_encoder", "composer")
VARIABLE_GROUPS = VARIABLE_KINDS + MODEL_PARTS
# ga.isotropic.exclude when it is left unset, in the paper's mode. Chosen on the validation split
# by a rule fixed before the runs (configs/css_ga_study.yaml, H2): a group is excluded when the
# noise on it alone (gamma 1e-2 per element) lowered validation R@1 with its whole 95% interval
# below zero over 5 paired seeds: the kernels (-7.0 [-8.1, -5.8]) and the composer (-5.5 [-8.1, -2.9]).
DEFAULT_EXCLUDE = ("kernel", "composer")
_NORMALIZATION_LAYERS = (keras.layers.BatchNormalization, keras.layers.LayerNormalization,
                         keras.layers.GroupNormalization)


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

    model, batch, training; `x`: the clean tensor at ga.point; `grad_x`: dL/dx there (when a
    method needs it, else None); `terms`: the loss terms recorded so far; `f_target` / `target`:
    the target image's feature and normalised embedding; `loss_at(delta)`: the main loss with x
    shifted by delta (the query branch recomputed, its terms not recorded); `loss_scale`: the
    LossScaleOptimizer's scale under mixed_float16 (None otherwise): differentiate the loss times
    it, so that 16-bit gradients do not underflow.
    """

    def __init__(self, model, batch, training, terms, f_target, target, grad_x=None, loss_at=None, x=None,
                 loss_scale=None):
        self.model = model
        self.batch = batch
        self.training = training
        self.terms = terms
        self.f_target = f_target
        self.target = target
        self.grad_x = grad_x
        self.loss_at = loss_at
        self.x = x
        self.loss_scale = loss_scale


class GAMethod:
    """Base of gradient-augmentation methods (and regularisation baselines).

    Subclass it, register it with `@register_ga_method(name, config=SettingsDataclass)`, and
    override what the method does (all optional):
        needs_input_gradient  True when loss hooks need ctx.grad_x (an inner tape is recorded), or
                              differentiate the loss with respect to x at ga.point
        term_names            the loss terms it logs (Keras metrics, TensorBoard)
        metric_names          values it logs that are not loss terms (not added to `loss`)
        attach(model)         called once the model is built (to look at its variables)
        main_loss(ctx, main)  -> the main loss to use instead of `main`
        loss_terms(ctx)       -> {term: value} added to the differentiated loss
        transform_gradients(grads, variables) -> (grads, {term or metric: value} for logging)
    `self.settings` is the method's settings (ga.<name>), `self.ga` the model's
    GradientAugmentation layer (ga.point, ga.mode, the seeded noise generator, the pixel range).
    Logged values are this replica's share under tf.distribute (the replicas' shares sum to the
    value): the model's trackers multiply them by the number of replicas and average.
    """

    needs_input_gradient = False
    term_names = ()
    metric_names = ()

    def __init__(self, settings, ga):
        self.settings = settings
        self.ga = ga

    def attach(self, model):
        pass

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
    CHOICES = {"noise_scaling": ("per_element", "mean"), "exclude": VARIABLE_GROUPS, "only": VARIABLE_GROUPS,
               "reference_terms": ("noise_and_push", "noise", "push")}
    # Default: the authors' scale and gamma. Measured on CSS (docs/results/README.md):
    # no gamma helped; per_element at gamma >= 1e-2 hurt, mean at 1e-2 had no effect.
    gamma: float = 1e-2  # standard deviation of the gradient noise (per element, before the scaling)
    noise_scaling: str = "mean"  # mean (gamma * n / size, the authors') | per_element (gamma * n)
    # variables whose gradients get no noise: kinds and parts (VARIABLE_GROUPS); [] = none;
    # null = DEFAULT_EXCLUDE (kernel, composer) in the paper's mode, none in the reference mode or
    # when `only` is given
    exclude: Optional[tuple] = None
    # when given, only the variables of these kinds or parts get noise (then minus `exclude`)
    only: tuple = ()
    # ga.mode=reference: which of the authors' two terms are added, both (their code), the
    # (N - k)-counted noise alone, or the constant push alone
    reference_terms: str = "noise_and_push"


@dataclasses.dataclass
class FGSMConfig:
    DOMAINS = {"eps": NON_NEGATIVE}
    eps: float = 1e-2  # delta = eps * sign(dL/dx)


@dataclasses.dataclass
class PGDConfig:
    DOMAINS = {"eps": NON_NEGATIVE, "step_size": NON_NEGATIVE, "steps": AT_LEAST_ONE}
    CHOICES = {"attack_norm": AdversarialConfig.CHOICES["attack_norm"]}
    steps: int = 10  # k projected gradient steps
    # radius of the attack ball; at ga.point=input in [0, 1] pixel units (4/255 = the evaluation's)
    eps: float = 4 / 255
    step_size: float = 0.0  # alpha of each step; 0 = 2.5 * eps / steps (Madry et al.)
    attack_norm: str = "inf"  # the ball and the step: inf (sign steps) or 2 (normalised gradient steps)
    random_start: bool = True  # start from a uniform point of the ball (Madry et al.) or from x


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
    """Implicit isotropic GA: gamma * n added to every variable's gradient (those that
    ga.isotropic.exclude / only select), and the ratio of the two norms logged.

    ga_noise_ratio = ||noise|| / ||g|| of each step: the norms over all trainable variables
    together (the excluded ones contribute their gradient and no noise), g the gradient of the
    loss before the noise (unscaled under mixed precision, before clipping; under tf.distribute the
    summed gradient of the replicas, which costs one all-reduce of the gradients per step)."""

    term_names = ("ga_isotropic",)
    metric_names = ("ga_noise_ratio",)

    def __init__(self, settings, ga):
        super().__init__(settings, ga)
        self.only = _groups(settings.only, "only")
        exclude = settings.exclude
        if exclude is None:  # unset: the default, unless `only` names the variables itself
            exclude = () if self.only else default_exclude(ga.mode)
        self.exclude = _groups(exclude, "exclude")
        self._noised = None  # {id(variable): gets noise}, from attach(model)

    def attach(self, model):
        groups = variable_groups(model)
        self._noised = {key: self.selects(*kind_part) for key, kind_part in groups.items()}

    def selects(self, kind, part) -> bool:
        """Whether a variable of this kind and part gets noise."""
        names = {kind, part} - {None}
        if self.only and not names & set(self.only):
            return False
        return not names & set(self.exclude)

    def noised(self, variables) -> list:
        """Which of `variables` get noise (all when nothing is excluded)."""
        if not self.exclude and not self.only:
            return [True] * len(variables)
        if self._noised is None:
            raise ValueError("ga.isotropic.exclude / only need the model's variables: the method is attached to "
                             "a ComposedRetrievalModel when the model is built")
        missing = [v.path for v in variables if id(v) not in self._noised]
        if missing:
            raise ValueError(f"ga.isotropic: variables {missing[:3]} are not among the model's trainable variables "
                             f"that exclude / only were resolved for")
        return [self._noised[id(v)] for v in variables]

    def transform_gradients(self, grads, variables):
        noises, value = self.ga.isotropic_noise(variables, include=self.noised(variables))
        ratio = noise_to_gradient_ratio(noises, grads)
        grads = [g + n if g is not None and n is not None else g for g, n in zip(grads, noises)]
        replicas, _ = replica_info()
        return grads, {"ga_isotropic": value, "ga_noise_ratio": ratio / replicas}


def default_exclude(mode) -> tuple:
    """What ga.isotropic.exclude left unset means in `mode`: DEFAULT_EXCLUDE in the paper's mode,
    nothing in the reference mode (the authors' code noises every variable)."""
    return () if mode == "reference" else DEFAULT_EXCLUDE


def _groups(value, key) -> tuple:
    """exclude / only as a tuple of group names (a comma-separated text is split), checked."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    value = tuple(str(v) for v in (value or ()))
    unknown = [v for v in value if v not in VARIABLE_GROUPS]
    if unknown:
        raise ValueError(f"ga.isotropic.{key}: unknown variable kind(s) or part(s) {unknown}; valid: kinds "
                         f"{list(VARIABLE_KINDS)}, parts {list(MODEL_PARTS)}")
    return value


def authors_push(gamma, sizes) -> list:
    """The authors' GA^I coefficient of each of N variables of `sizes` elements (their running sum
    counts the k-th, from 0, N - k times, each term a mean): gamma (N - k) / size. It scales their
    noise and is their constant push on every element of the variable's gradient."""
    n = len(sizes)
    return [gamma * float(n - k) / size for k, size in enumerate(sizes)]


def variable_groups(model) -> dict:
    """{id(variable): (kind, part)} for every weight of a ComposedRetrievalModel (the frozen ones
    too, so that a part unfrozen after the model is built is classified).

    The kind comes from the layer that owns the variable (the layer that created it):
        logit_scale    the model's scaled L2 normalisation (its scale s; the logits are s^2 cos)
        normalization  batch, layer and group normalisation layers (their gammas and betas)
        embedding      embedding layers (and keras-hub's position and token embeddings, by their
                       variables' name, `...embeddings`)
        bias           a layer's `bias` (Dense, convolutions, LSTM cells; else a variable named
                       `bias`)
        kernel         every other weight: dense, convolution and recurrent kernels, a layer's own
                       weights (TIRG's mix)
    The part is the sub-model that holds it: image_encoder, text_encoder or composer (None for the
    logit scale)."""
    owner = {}
    for layer in model._flatten_layers(include_self=True):  # Keras 3: each layer's own variables
        for v in list(layer._trainable_variables) + list(layer._non_trainable_variables):
            owner.setdefault(id(v), layer)
    part_of = {}
    for part in MODEL_PARTS:
        for v in getattr(model, part).weights:
            part_of.setdefault(id(v), part)
    scale = {id(v) for v in model.normalization.weights}
    out = {}
    for v in model.weights:
        layer = owner.get(id(v))
        if id(v) in scale:
            kind = "logit_scale"
        elif isinstance(layer, _NORMALIZATION_LAYERS):
            kind = "normalization"
        elif isinstance(layer, keras.layers.Embedding) or v.name.endswith("embeddings"):
            kind = "embedding"
        elif (layer is not None and getattr(layer, "bias", None) is v) or v.name == "bias":
            kind = "bias"
        else:
            kind = "kernel"
        out[id(v)] = (kind, part_of.get(id(v)))
    return out


def noise_to_gradient_ratio(noises, grads):
    """||noise|| / ||g|| over all variables together (None entries are zeros), float32; under
    tf.distribute g is the sum of the replicas' gradients and the noise every replica's share
    times the number of replicas (each adds noise / replicas)."""
    replicas, _ = replica_info()
    present = [tf.cast(tf.convert_to_tensor(g), tf.float32) for g in grads if g is not None]
    if replicas > 1 and present:
        present = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, present)
    g_sq = tf.add_n([tf.reduce_sum(tf.square(g)) for g in present]) if present else tf.constant(0.0)
    drawn = [tf.cast(n, tf.float32) for n in noises if n is not None]
    n_sq = tf.add_n([tf.reduce_sum(tf.square(n)) for n in drawn]) if drawn else tf.constant(0.0)
    return tf.math.divide_no_nan(tf.sqrt(n_sq) * float(replicas), tf.sqrt(g_sq))


@register_ga_method("fgsm", config=FGSMConfig)
class FGSMTraining(GAMethod):
    """FGSM adversarial training: (L(x) + L(x + eps * sign(dL/dx))) / 2."""

    needs_input_gradient = True
    term_names = ("fgsm_loss",)

    def main_loss(self, ctx, main):
        adv = ctx.loss_at(self.ga.fgsm_delta(ctx.grad_x))
        ctx.terms["fgsm_loss"] = adv
        return 0.5 * (main + adv)


@register_ga_method("pgd", config=PGDConfig)
class PGDTraining(GAMethod):
    """PGD-k adversarial training (Madry et al., ICLR 2018), combined with the clean loss as FGSM
    training is:

        L = (L(x) + L(x + delta_k)) / 2
        delta_0 = uniform in the ball B = {||delta||_p <= eps} (random_start), else 0
        delta_{i+1} = Proj_{B and the pixel range}(delta_i + alpha * s(dL/dx at x + delta_i))
        s(g) = sign(g) (attack_norm inf), g / ||g_j||_2 per example (attack_norm 2)

    x is the query image at ga.point (the target image and the text stay clean). At ga.point=input
    the attack is in [0, 1] pixel units: x is the ImageNet-normalised image, the pixels are
    u = x * std + mean (the GA layer's pixel_mean / pixel_std, the image encoder's preprocessing),
    eps and alpha are pixel units, and u + delta stays in [0, 1] (a value already outside stays
    where it is). At a feature, eps and alpha are in the feature's units and nothing is clipped.
    With k = 1, no random start and alpha = eps, delta_1 = eps * sign(dL/dx): FGSM training's step
    (FGSM's eps is in the model's input units, PGD's in pixels at ga.point=input: the same step
    where the pixels' std is 1 and the range does not clip).

    L(.) is the main loss (L_CE, + eta L_S, + the composer's own terms), each the replica's share of
    the global-batch mean, so the training term needs nothing more under tf.distribute; the random
    start is drawn for the global batch and each replica takes its rows (2 replicas draw what one
    device does). delta_k is a constant for the weights' gradient (stop_gradient): the gradient of
    the term is d L(x + delta_k) / d theta. The k attack passes run in a keras.StatelessScope:
    they leave the batch-norm statistics and the dropout generators as they were (the clean pass
    and the pass at x + delta_k update them, as FGSM training's two passes do). Under
    mixed_float16 each step differentiates the scaled loss (ctx.loss_scale); the steps' directions
    do not depend on the scale.
    """

    needs_input_gradient = True  # differentiates at ga.point (a first step from x reuses ctx.grad_x)
    term_names = ("pgd_loss",)
    # a list to inspect the attack (tests, eager): each training step appends {"losses": the attack
    # loss before each of its k steps, "delta": delta_k in x's units, "loss": L(x + delta_k)}
    trace = None

    def step_size(self) -> float:
        s = self.settings
        return float(s.step_size) if float(s.step_size) > 0 else 2.5 * float(s.eps) / int(s.steps)

    def attack(self, ctx, record=None):
        """delta_k (in x's units, a constant) for the batch of ctx; `record`, a list, receives the
        attack loss L(x + delta_i) of each step i = 0 .. k-1 (before its update)."""
        s = self.settings
        eps, alpha, norm = float(s.eps), self.step_size(), str(s.attack_norm)
        dtype = tf.float64 if ctx.x.dtype == tf.float64 else tf.float32  # 16-bit inputs: float32
        x = tf.stop_gradient(tf.cast(ctx.x, dtype))
        to_x, lower, upper = self.ga.attack_space(x)  # x units per attack unit; the delta's range (or None)

        def project(delta):
            if norm == "inf":
                delta = tf.clip_by_value(delta, -eps, eps)
            else:
                delta = delta * tf.reshape(tf.minimum(1.0, eps / per_example_norm(delta, 2.0)),
                                           [-1] + [1] * (len(x.shape) - 1))
            if lower is not None:  # moves each element towards 0 only: stays in the L2 ball
                delta = tf.clip_by_value(delta, lower, upper)
            return delta

        def direction(g):
            if norm == "inf":
                return tf.sign(g)
            return g / tf.reshape(per_example_norm(g, 2.0), [-1] + [1] * (len(x.shape) - 1))

        if s.random_start:
            delta = project(self._random_start(x, eps, norm))
        else:
            delta = tf.zeros_like(x)
        scale = ctx.loss_scale
        for i in range(int(s.steps)):
            if i == 0 and not s.random_start and ctx.grad_x is not None and record is None:
                g = tf.cast(ctx.grad_x, dtype) * to_x  # dL/d(attack units) at x
            else:
                with keras.StatelessScope():  # the attack's passes leave the layers' state alone
                    with tf.GradientTape(watch_accessed_variables=False) as tape:
                        tape.watch(delta)
                        loss = ctx.loss_at(delta * to_x)
                        scaled = loss if scale is None else loss * tf.cast(scale, loss.dtype)
                    g = tf.cast(tape.gradient(scaled, delta), dtype)
                if record is not None:
                    record.append(loss)
            delta = project(delta + alpha * direction(g))
        return tf.stop_gradient(delta * to_x)

    def _random_start(self, x, eps, norm):
        """A uniform draw of the ball for the GLOBAL batch, this replica's rows."""
        replicas, rid = replica_info()
        local = tf.shape(x)[0]
        shape = tf.concat([[local * replicas], tf.shape(x)[1:]], 0)
        seed = stateless_seed(self.ga.noise_seed)
        if norm == "inf":
            draw = tf.random.stateless_uniform(shape, seed=seed, minval=-eps, maxval=eps, dtype=x.dtype)
        else:  # uniform in the L2 ball: a uniform direction, radius eps * U^(1/d)
            d = tf.cast(tf.reduce_prod(tf.shape(x)[1:]), x.dtype)
            n = tf.random.stateless_normal(shape, seed=seed, dtype=x.dtype)
            r = tf.random.stateless_uniform(shape[:1], seed=seed + 1, dtype=x.dtype)
            radius = eps * tf.pow(r, 1.0 / d) / per_example_norm(n, 2.0)
            draw = n * tf.reshape(radius, [-1] + [1] * (len(x.shape) - 1))
        return draw[rid * local:(rid + 1) * local]

    def main_loss(self, ctx, main):
        record = None if self.trace is None else []
        delta = self.attack(ctx, record)
        adv = ctx.loss_at(delta)
        if record is not None:
            self.trace.append({"losses": record, "delta": delta, "loss": adv})
        ctx.terms["pgd_loss"] = adv
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
        seed: seed of the isotropic noise (and of PGD's random start).
        pixel_mean, pixel_std: the image encoder's normalisation (x = (u - mean) / std for [0, 1]
            pixels u): what an attack at ga.point=input works in (PGD). Default ImageNet's.
    """

    def __init__(self, methods="", point="input", mode="paper", settings=None, seed=0, pixel_mean=IMAGENET_MEAN,
                 pixel_std=IMAGENET_STD, **kwargs):
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
        self.pixel_mean = tuple(float(m) for m in pixel_mean)
        self.pixel_std = tuple(float(v) for v in pixel_std)
        given = {m: dict(v) for m, v in (settings or {}).items()}
        for key, value in legacy.items():
            method, field = GA_OLD_KEYS[key]
            given.setdefault(method, {})[field] = value
        self._method_settings = {}
        # the built-in methods' settings always exist: the properties below read them
        for name in set(self.methods) | set(given) | set(GA_METHODS.builtin_names()):
            entry = GA_METHODS.get(name)
            values = entry.default_settings()
            tuple_keys = {f.name for f in dataclasses.fields(values) if is_tuple_field(f)} \
                if dataclasses.is_dataclass(values) else set()
            for key, value in given.get(name, {}).items():
                if not hasattr(values, key):
                    raise ValueError(f"GA method {name!r} has no setting {key!r}; its keys: {entry.keys}")
                if value is not None and key in tuple_keys:  # a list (from a .keras file) or "a,b"
                    value = tuple(v.strip() for v in value.split(",") if v.strip()) if isinstance(value, str) \
                        else tuple(value)
                setattr(values, key, value)
            for key, allowed in getattr(values, "CHOICES", {}).items():
                value = getattr(values, key)
                if value is None:  # an Optional key left unset: its default applies
                    continue
                if isinstance(value, tuple):  # a tuple key: every item is one of the allowed
                    bad = [v for v in value if str(v) not in allowed]
                    if bad:
                        raise ValueError(f"GA {name}.{key}: unknown item(s) {bad}; expected items among "
                                         f"{list(allowed)}")
                elif str(value) not in allowed:
                    raise ValueError(f"GA {name}.{key}={value!r}: expected one of {list(allowed)}")
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
        """The loss terms the active methods log."""
        return self._names("term_names")

    def metric_names(self) -> list:
        """The values the active methods log that are not loss terms (GA^I's ga_noise_ratio)."""
        return self._names("metric_names")

    def _names(self, attribute) -> list:
        names = []
        for m in self.active:
            names += [n for n in getattr(m, attribute) if n not in names]
        return names

    def attach(self, model):
        """Let the active methods see the built model (its variables)."""
        for m in self.active:
            m.attach(model)

    # ---- attacks on x (PGD) ----------------------------------------------------------------------
    def attack_space(self, x):
        """(to_x, lower, upper) of an attack on x at ga.point: x's units per attack unit, and the
        range of the shift (attack units) that keeps x in its valid range (None: unbounded).

        At ga.point=input the attack is in [0, 1] pixels u = x * std + mean: to_x = 1 / std per
        channel, and u + delta in [0, 1], widened to contain 0 where u is outside (a clean value
        is never moved). At a feature: x's own units, unbounded."""
        if self.point != "input":
            return 1.0, None, None
        mean = tf.constant(self.pixel_mean, x.dtype)
        std = tf.constant(self.pixel_std, x.dtype)
        u = x * std + mean
        return 1.0 / std, tf.minimum(-u, 0.0), tf.maximum(1.0 - u, 0.0)

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
    def isotropic_noise(self, variables, include=None):
        """The noise added to each variable's gradient this step (list, one per variable; None for
        a variable `include` leaves out), and this replica's share of L_GA^I = sum_v noise_v . v
        (for logging).

        One draw per step for the included variables together (`fused_standard_normals`): the
        same N(0, I) as one draw per variable, at about half the cost (docs/ga_overhead.md).
        In reference mode, k and N in the authors' (N - k) count are positions among ALL the
        variables (the excluded ones too), and ga.isotropic.reference_terms picks the noise, the
        constant push or both."""
        replicas, _ = replica_info()
        n_vars = len(variables)
        include = [True] * n_vars if include is None else list(include)
        sizes = [float(max(int(np.prod(v.shape)), 1)) for v in variables]
        terms = self._method_settings["isotropic"].reference_terms
        if self.mode != "reference" and terms != "noise_and_push":
            raise ValueError(f"ga.isotropic.reference_terms={terms!r} applies to ga.mode=reference (the authors' "
                             f"code); the paper's mode adds zero-mean noise only")
        if self.mode == "reference":
            # the authors' loss: sum over k of the running total -> counted (N - k) times, each
            # term gamma * mean(n * p + p): noise gamma * (N - k) / size * (n + 1)
            coefs = [c / replicas for c in authors_push(self.gamma, sizes)]
        elif self.noise_scaling == "mean":
            coefs = [self.gamma / size / replicas for size in sizes]
        else:
            coefs = [self.gamma / replicas] * n_vars
        push = self.mode == "reference" and terms in ("noise_and_push", "push")
        drawn = [k for k in range(n_vars) if include[k]]
        draws = [None] * n_vars
        if not (self.mode == "reference" and terms == "push"):
            # one draw for the included variables, the scale applied inside it (one pass over half
            # the elements when it is the same for every variable)
            for k, noise in zip(drawn, fused_standard_normals([tuple(variables[k].shape) for k in drawn],
                                                              self.noise_seed, scales=[coefs[k] for k in drawn])):
                draws[k] = noise
        noises, value = [], tf.constant(0.0)
        for k, (v, noise, coef) in enumerate(zip(variables, draws, coefs)):
            if not include[k]:
                noises.append(None)
                continue
            if push:  # the authors' constant gamma * (N - k) / size on every element
                noise = tf.fill(tuple(v.shape), coef) if noise is None else noise + coef
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

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        settings = {m: dict(v) for m, v in (config.get("settings") or {}).items()}
        # a file saved before ga.isotropic.exclude existed put GA^I's noise on every variable
        settings.setdefault("isotropic", {}).setdefault("exclude", ())
        config["settings"] = settings
        return cls(**config)

    def get_config(self):
        config = super().get_config()
        config.update(
            methods=",".join(self.methods),
            point=self.point,
            mode=self.mode,
            settings={m: dataclasses.asdict(self._method_settings[m]) for m in sorted(self._method_settings)},
            seed=self.seed,
            pixel_mean=list(self.pixel_mean),
            pixel_std=list(self.pixel_std),
        )
        return config
