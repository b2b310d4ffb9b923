"""2 replicas (MirroredStrategy on 2 logical CPUs) == one device, with GA^A, GA^I and L_S on.

Runs tests/distributed_ga_check.py in a separate process: logical devices must be configured
before TensorFlow initialises, which this pytest process has already done.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "distributed_ga_check.py"


def _run(methods):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="-1")
    out = subprocess.run([sys.executable, str(SCRIPT), methods], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_replicas_match_one_device_with_ga_and_ls():
    r = _run("adversarial,isotropic")
    assert r["replicas"] == 2
    assert r["moved"] > 1e-2  # the three steps changed the weights
    for key in ("ga_adversarial", "ga_isotropic", "similarity_loss"):
        assert key in r["single_logs"] and key in r["mirrored_logs"]
    assert r["single_logs"]["ga_adversarial"] > 0
    # Same weights after training, within float32 rounding relative to how far they moved: the
    # tiny model has no batch statistics and no dropout, so the two runs differ only in the order
    # of summing the per-example gradients (per-replica partial sums), ~1e-7 relative a step on
    # any IEEE float32 machine (measured 3e-7 of the movement after the three steps). A penalty or
    # noise counted twice moves them by ~1e-2 in absolute terms, over 1e-3 of the movement.
    assert r["max_weight_diff"] < 1e-5 * r["moved"], r
    # logged terms: float32 values summed in another order (measured 1e-7 relative apart); 1e-4
    # relative leaves a margin of 1000x over that, on any float32 machine
    for key in ("loss", "retrieval_loss", "ga_adversarial", "similarity_loss"):
        assert abs(r["single_logs"][key] - r["mirrored_logs"][key]) < 1e-4 * max(1.0, abs(r["single_logs"][key])), key


@pytest.mark.slow
def test_two_replicas_match_one_device_with_pgd_training_and_the_noise_ratio():
    """PGD-10 training (random start drawn for the global batch, each replica its rows) and GA^I
    with its logged ||noise|| / ||g|| (the summed gradient's norm): the single-device run."""
    r = _run("pgd,isotropic")
    assert r["replicas"] == 2 and r["moved"] > 1e-2
    assert r["single_logs"]["pgd_loss"] > r["single_logs"]["retrieval_loss"]  # the attack did something
    assert r["max_weight_diff"] < 1e-5 * r["moved"], r
    for key in ("loss", "retrieval_loss", "pgd_loss", "ga_noise_ratio"):
        assert abs(r["single_logs"][key] - r["mirrored_logs"][key]) < 1e-4 * max(1.0, abs(r["single_logs"][key])), key


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tirg", "composeae"])
def test_real_models_on_two_replicas_match_one_device(method, css_smoke_root):
    """TIRG and ComposeAE as built for training (small CNN with batch norm, LSTM, GA^A + GA^I +
    L_S): one step on 2 logical CPUs lands on the single-device weights. Not bit-exact: the
    synchronized batch norm sums each replica's half of a channel before adding the halves, and
    that float32 reordering moves the weights by ~1e-3 of a step; the check's negative control
    (each replica's loss averaged over its local batch, the classic replica bug) moves them ~100x
    further, so the tolerance separates the two."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="-1", CHECK_STEPS="1")
    out = subprocess.run([sys.executable, str(SCRIPT.parent / "distributed_model_check.py"), str(css_smoke_root), method],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["replicas"] == 2 and r["moved"] > 1e-2, r
    assert r["buggy_weight_diff"] > 0.5 * r["moved"], r  # the control is detectable at all
    assert r["max_weight_diff"] < 0.05 * r["buggy_weight_diff"], r
    assert r["max_weight_diff"] < 0.1 * r["moved"], r
    # Logged loss terms: the bound is a fraction of the control's distance, not a figure measured
    # on one CPU (the float32 error of the terms depends on the CPU's kernels: the GA^A term's
    # input-gradient norm was 2e-4 relative apart on one machine, under 1e-4 on another). The
    # control changes every term that depends on the loss's scale by O(1) relative; a mirrored
    # step within 0.1% of that distance on each of them computes the same terms (measured: TIRG and
    # ComposeAE within 0.004% of it, so the bound holds with a margin of about 25x).
    single, mirrored, buggy = r["single_logs"], r["mirrored_logs"], r["buggy_logs"]
    assert set(single) == set(mirrored)
    keys = ["loss", "retrieval_loss", "ga_adversarial", "similarity_loss"]
    if method == "composeae":
        keys += ["reconstruction_image_loss", "reconstruction_text_loss", "rotational_symmetry_loss"]
    for key in keys:
        control = abs(single[key] - buggy[key])
        assert control > 1e-2 * max(1.0, abs(single[key])), (key, single, buggy)  # the control shows here
        assert abs(single[key] - mirrored[key]) <= 1e-3 * control, (key, single, mirrored, buggy)
    # L_GA^I = sum_v noise_v . v: the same noise on the same weights, whatever the loss's scale
    assert abs(single["ga_isotropic"] - mirrored["ga_isotropic"]) <= 1e-4 * max(1.0, abs(single["ga_isotropic"]))


_BN_CHECK = r"""
import json, os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
from keras_irtf.layers import SyncBatchNormalization
# channels whose mean is large against their spread (a conv over a uniform background)
x = (300.0 + np.random.default_rng(0).normal(size=(16, 8, 8, 4))).astype("float32")
def out(make, strategy=None):
    if strategy is None:
        return make()(x, training=True).numpy()
    with strategy.scope():
        layer = make()
        layer.build(x.shape)
    ds = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices(x).batch(16))
    y = strategy.run(tf.function(lambda b: layer(b, training=True)), args=(next(iter(ds)),))
    return np.concatenate([t.numpy() for t in strategy.experimental_local_results(y)], 0)
ms = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
ours = lambda: SyncBatchNormalization()
theirs = lambda: keras.layers.BatchNormalization(synchronized=True)
print(json.dumps({"ours": float(np.abs(out(ours) - out(ours, ms)).max()),
                  "keras": float(np.abs(out(theirs) - out(theirs, ms)).max())}))
"""


def test_sync_batch_norm_matches_one_device_where_keras_sync_does_not():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="-1")
    out = subprocess.run([sys.executable, "-c", _BN_CHECK], capture_output=True, text=True, env=env, timeout=300,
                         cwd=str(SCRIPT.parent.parent))
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["ours"] < 1e-3, r  # normalised outputs are O(1): float rounding of two-pass moments
    assert r["keras"] > 10 * max(r["ours"], 1e-5), r  # E[x^2] - E[x]^2 in float32 loses the variance
