"""Run by tests/test_distributed_ga.py in its own process: two logical CPU devices must be set up
before TensorFlow initialises. Trains the tiny model with GA^A, GA^I and L_S for a few steps on
one device and with MirroredStrategy over 2 replicas, from the same weights on the same global
batches, and prints a JSON summary."""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import contextlib  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ga_tiny import tiny_batch, tiny_model  # noqa: E402

METHODS = sys.argv[1] if len(sys.argv) > 1 else "adversarial,isotropic"
GLOBAL_BATCH, STEPS = 8, 3


def dataset():
    parts = [tiny_batch(GLOBAL_BATCH, dtype="float32", seed=s) for s in range(STEPS)]
    data = {k: tf.concat([p[k] for p in parts], 0) for k in parts[0]}
    return tf.data.Dataset.from_tensor_slices(data).batch(GLOBAL_BATCH)


def train(strategy, start=None):
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = tiny_model(METHODS, eta=0.05, eps=0.5, gamma=0.05, dtype="float32", seed=0)
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    if start is not None:
        for v, value in zip(model.trainable_variables, start):
            v.assign(value)
    begin = [v.numpy() for v in model.trainable_variables]
    history = model.fit(dataset(), epochs=1, verbose=0)
    return begin, [v.numpy() for v in model.trainable_variables], {k: float(v[-1]) for k, v in history.history.items()}


single_begin, single_end, single_logs = train(None)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
mirrored_begin, mirrored_end, mirrored_logs = train(strategy, start=single_begin)
print(json.dumps({
    "replicas": strategy.num_replicas_in_sync,
    "moved": max(float(np.abs(a - b).max()) for a, b in zip(single_end, single_begin)),
    "max_weight_diff": max(float(np.abs(a - b).max()) for a, b in zip(single_end, mirrored_end)),
    "single_logs": single_logs,
    "mirrored_logs": mirrored_logs,
}))
