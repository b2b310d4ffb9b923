"""Imported first by the check scripts that run in a process of their own
(tests/distributed_*_check.py): TensorFlow with two logical CPU devices, which must be configured
before TensorFlow initialises its devices; the checkout and tests/ on sys.path; and what those
scripts share."""

import contextlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf  # noqa: E402
import numpy as np  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (HERE, os.path.dirname(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)


def mirrored():
    """MirroredStrategy over the two logical CPUs."""
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def scope(strategy):
    """`strategy.scope()`, or nothing for one device (strategy None)."""
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def max_diff(a, b):
    """The largest absolute difference between two lists of arrays."""
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))
