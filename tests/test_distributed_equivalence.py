"""MirroredStrategy over 2 logical CPUs against one device, part by part: dropout masks, gradient
clipping, the global batch each replica reads, and one training step from several states along a
trajectory.

The claim these tests pin down: both runs read identical global batches and start from identical
weights, schedule and step counter; from any state, one step on 2 replicas agrees with one step
on one device within float32 rounding (dropout and optim.clipnorm included); over many steps the
two trajectories drift apart as any two runs whose weights differ by rounding do (training is
chaotic), so equality is asserted per step, never of a long run's final weights.

Each check runs tests/distributed_equivalence_check.py in its own process: logical devices must
be configured before TensorFlow initialises, which this pytest process has already done.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parent / "distributed_equivalence_check.py"


def run_check(css_root, parts, *overrides, **env):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="-1", CHECK_PARTS=parts, **env)
    out = subprocess.run([sys.executable, str(SCRIPT), str(css_root), "tirg", *overrides], capture_output=True,
                         text=True, env=env, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["replicas"] == 2
    return r


@pytest.fixture(scope="module")
def replica_checks(css_smoke_root):
    return run_check(css_smoke_root, "masks,clip,batches")


def test_model_dropouts_are_the_replica_aware_layer():
    """Every dropout the built-in encoders and composers hold is keras_irtf's Dropout (the
    per-replica repetition of keras.layers.Dropout is fixed at the layer, not per model)."""
    from keras_irtf.layers import (CombinerComposer, ComposeAEComposer, ConcatComposer, Dropout,
                                   LSTMTextEncoder)

    parts = [LSTMTextEncoder(20, 8, 8, 8, dropout=0.1), ConcatComposer(8), CombinerComposer(8), ComposeAEComposer(8)]
    found = [layer for part in parts for layer in part._flatten_layers(include_self=False)
             if isinstance(layer, keras.layers.Dropout)]
    assert len(found) == 1 + 1 + 4 + 2
    assert all(isinstance(layer, Dropout) for layer in found), [type(la) for la in found]


def test_dropout_masks_are_independent_across_replicas_and_equal_one_device(replica_checks):
    """Each model's dropout layers called on a 16-row global batch under 2 replicas. With one
    generator state per replica (keras.layers.Dropout), rows i and i + 8 shared their mask: all 8
    pairs did. Here the masks are those of the global batch: no pair repeats (by chance a pair
    of 64-wide rows repeats with probability < 1e-5 at rate 0.1, 1e-19 at 0.5) and the 16 masks
    are exactly those one device draws from the same generator state."""
    masks = replica_checks["masks"]
    assert {name.split("/")[0] for name in masks} == {"lstm_text_encoder", "concat", "combiner", "composeae"}
    for name, m in masks.items():
        assert m["rows_repeating_across_replicas"] == 0, (name, m)
        assert m["equal_to_one_device"], (name, m)
        assert abs(m["kept_fraction"] - (1 - m["rate"])) < 0.1, (name, m)  # a dropout mask at all


def test_clipnorm_clips_the_global_gradient(replica_checks):
    """One SGD step of the tiny model (no batch statistics, so the two runs differ only in the
    float32 order of summing the per-example gradients, ~1e-7 relative) with every variable's
    gradient clipped. The control is Keras 3.15's own behaviour under a strategy, clipping each
    replica's half before the sum: each half is clipped to the norm, so the update is up to twice
    one device's (measured: the control misses the one-device update by its whole size). The
    bound, 1e-3 of the control's distance, is float32 rounding with a margin of 100x and more
    (measured 7e-6 of it), and clipping is a smooth rescaling of the summed gradient that does not
    amplify it."""
    clip = replica_checks["clip"]
    c = clip["clipnorm"]
    assert c["moved"] > 0 and c["control_diff"] > 0.5 * c["moved"], c  # the control shows
    assert max(c["update_norms_over_lr_clip"]) == pytest.approx(1.0, abs=1e-3), c  # clipping acted
    assert c["mirrored_diff"] <= 1e-3 * c["control_diff"], c
    # global_clipnorm and clipnorm under a LossScaleOptimizer (the train_step unscales, clips the
    # summed gradient, rescales by a power of two): the same bound, against the step itself
    # (per-replica clipping missed the global_clipnorm update by half its size)
    for key in ("global_clipnorm", "clipnorm_loss_scaled"):
        assert clip[key]["moved"] > 0 and clip[key]["mirrored_diff"] <= 1e-3 * clip[key]["moved"], (key, clip[key])


def test_each_step_reads_the_same_global_batch(replica_checks):
    """The training pipeline through model.fit on 2 replicas: at step k replica 0 received rows
    0-7 and replica 1 rows 8-15 of global batch k as one device reads it (texts equal, image sums
    equal), for every step; the batches differ from step to step."""
    b = replica_checks["batches"]
    assert b["steps_seen"] == list(range(b["steps"])) and b["replicas_seen"] == [0, 1], b
    assert b["distinct_global_batches"] == b["steps"], b
    assert b["all_match"], b


@pytest.mark.slow
def test_one_step_from_states_along_a_trajectory(css_smoke_root):
    """TIRG (small CNN with synchronized batch norm, LSTM with dropout 0.1) trained on one device;
    from its state after 0, 3 and 6 steps (weights, batch-norm statistics, dropout generator
    states, momentum, step counter), one step on one device, on 2 replicas, and on 2 replicas
    with the replica bug of the negative control (each replica's loss over its local batch, so
    the summed gradient is twice too large).

    Bound: the Euclidean distance between the mirrored and one-device updates is at most 2% of
    the control's. The control adds a whole gradient step (its distance is the size of
    lr * gradient). The mirrored step computes the same sums in another order (per-replica
    partial sums, all-reduced batch statistics); float32 rounding of those sums changes the
    gradient by ~1e-5 relative, and now and then flips a ReLU or max-pool choice at one pixel
    (a rounding-sized change of a batch-norm output decides it), which moves the first conv's
    kernel by ~3e-3 of its step. Neither depends on the CPU beyond float32 arithmetic. Measured:
    5e-5, 2.3e-3 (such a flip) and 4e-5 of the control's distance at the three states; with
    dropout masks repeated across replicas (keras.layers.Dropout) it was 0.12 to 0.40."""
    r = run_check(css_smoke_root, "trajectory", CHECK_STATES="0,3,6")
    states = r["trajectory"]
    assert [s["state"] for s in states] == [0, 3, 6] and [s["optimizer_iterations"] for s in states] == [0, 3, 6]
    for s in states:
        assert s["moved_l2"] > 0 and s["control_l2"] > 0.1 * s["moved_l2"], s  # the control is visible
        assert s["mirrored_l2"] <= 2e-2 * s["control_l2"], s
        for key in ("loss", "retrieval_loss"):  # the logged terms (before the update): as close
            single, mirrored, control = (s[f"{run}_logs"][key] for run in ("single", "mirrored", "control"))
            assert abs(single - mirrored) <= 1e-2 * abs(single - control), (key, s)
    assert np.isfinite([s["mirrored_l2"] for s in states]).all()
