"""Strategy choice, per-worker input sharding, and the Keras 3.15 multi-worker work-arounds.

    --strategy auto          MirroredStrategy when more than one GPU is visible, else one device
    --strategy one_device    the default (no distribution)
    --strategy mirrored      MirroredStrategy over --devices (e.g. "cpu:2" = two logical CPUs,
                             or "/gpu:0,/gpu:1"; default: every visible GPU)
    --strategy multi_worker  MultiWorkerMirroredStrategy; the cluster comes from TF_CONFIG

The configured batch size is the GLOBAL batch: each replica gets batch / replicas.

Keras 3.15's `fit` does not work with MultiWorkerMirroredStrategy as shipped (keras#20585):
its symbolic build all-reduces a whole data batch (rejected by collective all-reduce) and it
reduces scalar metrics along axis 0. `ComposedRetrievalModel` skips the symbolic build when it is
already built (it always is, see model.py) and `patch_keras_multi_worker()` reduces scalars with
axis=None. Both are guarded by the Keras version: remove them when upstream is fixed.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import socket

import keras
import tensorflow as tf
from keras.src import tree
from keras.src.backend.tensorflow import trainer as tf_trainer

from keras_irtf.config import ConfigError, choices
from keras_irtf.run_folder import BackupError, latest_backup

log = logging.getLogger(__name__)

PATCHED_KERAS = ("3.15",)  # Keras minor versions the multi-worker patch was checked against


def parse_devices(devices):
    """'cpu:2' -> ('cpu', 2) logical CPUs; '/gpu:0,/gpu:1' -> ('list', [...]); None -> None."""
    if not devices:
        return None
    devices = str(devices).strip()
    if devices.lower().startswith("cpu:") and devices[4:].isdigit():
        return ("cpu", int(devices[4:]))
    items = [d.strip() for d in devices.split(",") if d.strip()]
    if not items:
        raise ConfigError(f"train.devices={devices!r}: expected 'cpu:N' or a comma-separated device list")
    return ("list", items)


def configure_logical_cpus(n: int):
    """Split the CPU into n logical devices (must run before TensorFlow initialises its devices)."""
    cpus = tf.config.list_physical_devices("CPU")
    current = tf.config.get_logical_device_configuration(cpus[0])
    if current and len(current) == n:
        return
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError as e:
        raise ConfigError(
            f"train.devices=cpu:{n}: TensorFlow was already initialised with "
            f"{len(tf.config.list_logical_devices('CPU'))} CPU device(s); set the devices before any "
            f"TensorFlow computation (a fresh process)"
        ) from e


def tf_config() -> dict:
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({e}): {raw[:200]}") from None


def localhost_tf_configs(num_workers: int) -> list:
    """TF_CONFIG values (JSON strings, worker 0 = chief) for `num_workers` workers on free ports
    of this machine: how the tests and benchmarks try multi-worker training on one host."""
    socks = [socket.socket() for _ in range(num_workers)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        cluster = {"worker": [f"127.0.0.1:{s.getsockname()[1]}" for s in socks]}
    finally:
        for s in socks:
            s.close()
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}) for i in range(num_workers)]


def worker_info():
    """(index of this worker, number of workers, is_chief) from TF_CONFIG (0, 1, True without)."""
    cfg = tf_config()
    cluster = cfg.get("cluster", {})
    task = cfg.get("task", {})
    n = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
    kind, index = task.get("type", "worker"), int(task.get("index", 0))
    if kind == "chief":
        return 0, max(n, 1), True
    offset = len(cluster.get("chief", []))
    is_chief = offset == 0 and index == 0
    return index + offset, max(n, 1), is_chief


def check_devices_exist(names):
    """Raise ConfigError when a device of `names` (e.g. '/gpu:1', 'cpu:1') does not exist here:
    MirroredStrategy over a missing device waits forever in its first step instead of failing."""
    available = tf.config.list_logical_devices()
    have = {(d.device_type.upper(), tf.DeviceSpec.from_string(d.name).device_index) for d in available}
    missing = []
    for name in names:
        text = str(name).strip()
        spec = tf.DeviceSpec.from_string(text if text.startswith("/") else "/" + text)
        if spec.device_type is None or (spec.device_type.upper(), spec.device_index or 0) not in have:
            missing.append(text)
    if missing:
        listing = ", ".join(d.name for d in available)
        raise ConfigError(
            f"train.devices: {', '.join(missing)} do(es) not exist on this machine; available devices: {listing}. "
            f"For N logical CPU devices use --devices cpu:N (e.g. cpu:2: 'cpu:1' is not a device unless the CPU "
            f"is split)."
        )


def make_strategy(name: str = "auto", devices=None, collective_timeout_seconds=None):
    """A tf.distribute strategy as --strategy/--devices describe (the default strategy for one
    device). `collective_timeout_seconds`: multi-worker collectives that do not complete within
    it fail (DeadlineExceeded) instead of waiting forever for a stuck or lost worker."""
    parsed = parse_devices(devices)
    if parsed and parsed[0] == "cpu":
        configure_logical_cpus(parsed[1])
    if name == "multi_worker":
        if not tf_config().get("cluster"):
            raise ConfigError(
                "--strategy multi_worker needs TF_CONFIG with the cluster, e.g. "
                '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}} '
                "(see docs/distributed-and-resuming.md)"
            )
        patch_keras_multi_worker()
        options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=float(collective_timeout_seconds) if collective_timeout_seconds else None)
        # Creating the strategy waits for every worker of the cluster to connect, outside any
        # collective (so the timeout above does not apply): a worker that never starts would
        # leave this one waiting forever. A watchdog ends the process after the same timeout.
        with _join_watchdog(collective_timeout_seconds):
            return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    if name == "mirrored" or (name == "auto" and len(tf.config.list_physical_devices("GPU")) > 1):
        if parsed and parsed[0] == "cpu":
            names = [d.name for d in tf.config.list_logical_devices("CPU")]
        elif parsed:
            names = parsed[1]
            check_devices_exist(names)
        else:
            names = [d.name for d in tf.config.list_logical_devices("GPU")] or None
        return tf.distribute.MirroredStrategy(names)
    if name in ("auto", "one_device"):
        return tf.distribute.get_strategy()
    raise ConfigError(f"train.strategy={name!r}: expected one of {list(choices('train.strategy'))}")


class _join_watchdog:
    """End the process when the block it guards has not finished within `seconds`. The wait for
    the cluster happens in C++ and holds the interpreter, so no Python thread or signal handler
    can run meanwhile: the watchdog is faulthandler's C-level timer, which exits the process
    (status 1) on its own. The message is printed before the wait, as it cannot be printed after.
    None or 0: no watchdog."""

    def __init__(self, seconds):
        self.seconds = float(seconds or 0)
        self.sink = None

    def __enter__(self):
        if self.seconds > 0:
            workers = tf_config().get("cluster", {}).get("worker", [])
            # a warning, shown under -q too: when the timeout expires the process ends with no other word
            log.warning(f"waiting for the workers of TF_CONFIG's cluster ({', '.join(map(str, workers))}) to connect; "
                        f"if they have not all connected within {self.seconds:.0f} s (train.collective_timeout_seconds) "
                        f"this process stops: start the same command on every worker, each with its own task index")
            self.sink = open(os.devnull, "w")  # the thread dump faulthandler writes on expiry
            faulthandler.dump_traceback_later(self.seconds, exit=True, file=self.sink)
        return self

    def __exit__(self, *exc):
        if self.sink is not None:
            faulthandler.cancel_dump_traceback_later()
            self.sink.close()
        return False


def check_batch(global_batch: int, strategy):
    n = strategy.num_replicas_in_sync
    if global_batch % n:
        raise ConfigError(
            f"train.batch_size={global_batch} is the global batch and must divide evenly over the "
            f"{n} replicas (per-replica batch = global / replicas); use a multiple of {n}"
        )
    return global_batch // n


def is_multi_worker(strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def patch_keras_multi_worker():
    """Reduce scalar step outputs with axis=None under collective all-reduce (keras#20585)."""
    if not keras.__version__.startswith(PATCHED_KERAS):
        return False  # a Keras we have not checked: leave it alone
    if getattr(tf_trainer.reduce_per_replica, "_keras_irtf_patch", False):
        return True
    original = tf_trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and tf_trainer._collective_all_reduce_multi_worker(strategy):
            return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original(values, strategy, reduction)

    reduce_per_replica._keras_irtf_patch = True
    tf_trainer.reduce_per_replica = reduce_per_replica
    return True


def worker_dataset(strategy, make_dataset, global_batch: int):
    """Each worker builds only its own share of every global batch (its replicas' slices).

    make_dataset(shard_index, num_shards, per_shard_batch) must return a dataset of batches of
    `per_shard_batch` whose k-th batch is slice `shard_index` of the k-th global batch.
    """
    def fn(ctx: tf.distribute.InputContext):
        per_replica = ctx.get_per_replica_batch_size(global_batch)
        return make_dataset(ctx.input_pipeline_id, ctx.num_input_pipelines, per_replica * (
            strategy.num_replicas_in_sync // ctx.num_input_pipelines))

    return strategy.distribute_datasets_from_function(fn)


COLLECTIVE_ERRORS = ("DeadlineExceededError", "UnavailableError", "CancelledError", "AbortedError")


def collective_failure_message(error, timeout_seconds, run=None):
    """A one-paragraph explanation when `error` is a multi-worker collective that timed out or lost
    its peer, else None."""
    if type(error).__name__ not in COLLECTIVE_ERRORS:
        return None
    try:
        info = latest_backup(os.path.join(str(run), "backup")) if run is not None else None
    except BackupError:
        info = None
    resume = (f"the last backup is at step {int(info['step'])}; restart every worker with the same command to "
              f"resume from it" if info else "no backup was written yet; restart every worker to start again")
    return (f"a multi-worker collective operation failed ({type(error).__name__}): a worker is stuck, gone or "
            f"unreachable, or did not join within train.collective_timeout_seconds={timeout_seconds}. {resume}. "
            f"({str(error).strip().splitlines()[0][:300] if str(error).strip() else ''})")


def is_chief_process(cfg) -> bool:
    """Only the chief of a multi-worker run writes (and so locks) the run folder."""
    return cfg.train.strategy != "multi_worker" or worker_info()[2]
