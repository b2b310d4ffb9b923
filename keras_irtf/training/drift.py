"""What moved between two trained models' weights, variable by variable, and how far the
authors' GA^I push alone would move each one.

The authors' code (ga.mode=reference) adds, beside its noise, a constant gamma (N - k) / size to
every element of the gradient of the k-th of the model's N trainable variables. Under a constant
gradient g, Keras' SGD with momentum m (v <- m v - lr_t g, w <- w + v) moves a weight by

    -g sum_t lr_t (1 - m^(T - t + 1)) / (1 - m)        over the steps t = 1 .. T,

about -lr g T / (1 - m) for a constant rate: `push_drift` is that figure for each variable, to
set beside the drift measured between a run with the push and one without (`weight_drift`)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from keras_irtf.experiment import learning_rate_schedule
from keras_irtf.model.gradient_augmentation import authors_push, variable_groups


def momentum_displacement(learning_rates, momentum: float) -> float:
    """How far SGD with momentum moves a weight under a constant gradient of 1, over steps whose
    learning rates are `learning_rates` (the sum above, without the sign)."""
    lr = np.asarray(learning_rates, np.float64)
    steps = len(lr)
    if steps == 0:
        return 0.0
    if momentum == 0:
        return float(lr.sum())
    remaining = steps - np.arange(steps)  # T - t + 1 for t = 1 .. T
    return float(np.sum(lr * (1.0 - momentum ** remaining)) / (1.0 - momentum))


def learning_rates(cfg, steps: int) -> np.ndarray:
    """The base learning rate of each of `steps` steps of training under `cfg`: the optimizer's
    own schedule (keras_irtf.experiment.learning_rate_schedule) at iterations 0 .. steps - 1."""
    schedule = learning_rate_schedule(cfg.optim)
    if not callable(schedule):
        return np.full(steps, float(schedule))
    return np.array([float(schedule(i)) for i in range(steps)])


def push_gradients(cfg, sizes) -> Optional[list]:
    """The constant the authors' GA^I push adds to every element of each variable's gradient
    (gamma (N - k) / size, k = 0 .. N - 1 in the order of the model's trainable variables), or
    None when `cfg` does not train with the push."""
    ga = cfg.ga
    methods = [m.strip() for m in ga.methods.split(",") if m.strip()]
    if "isotropic" not in methods or ga.mode != "reference":
        return None
    iso = ga.isotropic
    if iso.reference_terms not in ("noise_and_push", "push"):
        return None
    return authors_push(float(iso.gamma), [float(max(int(size), 1)) for size in sizes])


def push_drift(cfg, sizes, steps: int) -> Optional[list]:
    """Per variable, the mean drift the push alone causes in `steps` steps of SGD with momentum
    (None when `cfg` trains without the push, or with another optimizer or gradient clipping,
    under which the figure does not hold). Variables trained at a multiple of the base rate (a
    pretrained backbone's) move that multiple of it."""
    pushes = push_gradients(cfg, sizes)
    if pushes is None or cfg.optim.optimizer != "sgd" or cfg.optim.clipnorm:
        return None
    moved = momentum_displacement(learning_rates(cfg, steps), cfg.optim.momentum)
    return [-g * moved for g in pushes]


def weight_drift(base, run, cfg=None, steps: Optional[int] = None) -> list:
    """Every trainable variable of `run` (a ComposedRetrievalModel) against the same variable of
    `base` (the same architecture), in the order of `run.trainable_variables` (GA^I's k): a dict
    with "k", "path", "kind", "part", "size", "base_mean", "run_mean", "drift" (mean of run -
    base), "rms" (root mean square of run - base) and, when `cfg` (the run's config) trained with
    the authors' push for `steps` steps, "push_drift" (`push_drift`'s figure)."""
    a_vars, b_vars = list(base.trainable_variables), list(run.trainable_variables)
    if [tuple(v.shape) for v in a_vars] != [tuple(v.shape) for v in b_vars]:
        raise ValueError(f"the two models differ: {len(a_vars)} and {len(b_vars)} trainable variables, or their "
                         f"shapes differ; compare runs of one architecture")
    groups = variable_groups(run)
    sizes = [max(int(np.prod(v.shape)), 1) for v in b_vars]
    predicted = push_drift(cfg, sizes, steps) if cfg is not None and steps else None
    rows = []
    for k, (a, b) in enumerate(zip(a_vars, b_vars)):
        x, y = np.asarray(a.numpy(), np.float64), np.asarray(b.numpy(), np.float64)
        kind, part = groups.get(id(b), (None, None))
        row = {"k": k, "path": b.path, "kind": kind, "part": part, "size": sizes[k],
               "base_mean": float(x.mean()), "run_mean": float(y.mean()), "drift": float((y - x).mean()),
               "rms": float(np.sqrt(np.mean((y - x) ** 2)))}
        if predicted is not None:
            row["push_drift"] = predicted[k]
        rows.append(row)
    return rows


__all__ = ["learning_rates", "momentum_displacement", "push_drift", "push_gradients", "weight_drift"]
