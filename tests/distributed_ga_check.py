"""Run by tests/test_distributed_ga.py in its own process: two logical CPU devices must be set up
before TensorFlow initialises. Trains the tiny model with GA^A, GA^I and L_S for a few steps on
one device and with MirroredStrategy over 2 replicas, from the same weights on the same global
batches, and prints a JSON summary."""

import json
import sys

from two_cpus import mirrored, scope  # first: two logical CPUs before TensorFlow starts

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from ga_tiny import tiny_batch, tiny_model  # noqa: E402

METHODS = sys.argv[1] if len(sys.argv) > 1 else "adversarial,isotropic"
GLOBAL_BATCH, STEPS = 8, 3


def dataset():
    parts = [tiny_batch(GLOBAL_BATCH, dtype="float32", seed=s) for s in range(STEPS)]
    data = {k: tf.concat([p[k] for p in parts], 0) for k in parts[0]}
    return tf.data.Dataset.from_tensor_slices(data).batch(GLOBAL_BATCH)


def train(strategy, start=None):
    with scope(strategy):
        model = tiny_model(METHODS, eta=0.05, eps=0.5, gamma=0.05, dtype="float32", seed=0)
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    if start is not None:
        for v, value in zip(model.trainable_variables, start):
            v.assign(value)
    begin = [v.numpy() for v in model.trainable_variables]
    history = model.fit(dataset(), epochs=1, verbose=0)
    return begin, [v.numpy() for v in model.trainable_variables], {k: float(v[-1]) for k, v in history.history.items()}


single_begin, single_end, single_logs = train(None)
strategy = mirrored()
mirrored_begin, mirrored_end, mirrored_logs = train(strategy, start=single_begin)
print(json.dumps({
    "replicas": strategy.num_replicas_in_sync,
    "moved": max(float(np.abs(a - b).max()) for a, b in zip(single_end, single_begin)),
    "max_weight_diff": max(float(np.abs(a - b).max()) for a, b in zip(single_end, mirrored_end)),
    "single_logs": single_logs,
    "mirrored_logs": mirrored_logs,
}))
