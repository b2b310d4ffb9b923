"""Crash-safe training: exact resumption after SIGKILL, a stop on a non-finite loss, batch checks."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from keras_irtf.config import ConfigError
from tests.conftest import tiny_config

ARGS = ["--preset", "smoke", "--ga", "isotropic", "--steps", "30", "--set", "train.steps_per_epoch=12",
        "--set", "train.backup_every_steps=5", "--quiet"]


def _cli(root, out):
    return [sys.executable, "tools/train.py", "--dataset", "css", "--data-root", str(root), "--out", str(out), *ARGS]


def _weights(run):
    from keras_irtf.experiment import load_model

    return load_model(run / "model.keras").get_weights()


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted(css_smoke_root, tmp_path):
    """Kill -9 part-way (mid-epoch), re-run the same command: the same final weights."""
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    subprocess.run(_cli(css_smoke_root, ref), check=True, timeout=600, capture_output=True)
    proc = subprocess.Popen(_cli(css_smoke_root, crashed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = crashed / "backup" / "state.json"
    deadline = time.time() + 600
    while time.time() < deadline:
        if state.is_file() and json.loads(state.read_text())["step"] >= 15:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step = json.loads(state.read_text())["step"]
    assert 15 <= step < 30 and not (crashed / "model.keras").exists()
    r = subprocess.run(_cli(css_smoke_root, crashed) + ["--set", "train.backup_every_steps=5"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((crashed / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == step and metrics["steps"] == 30  # exactly --steps
    assert not (crashed / "backup").exists()  # removed once the run is complete
    for a, b in zip(_weights(ref), _weights(crashed)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_non_finite_loss_stops_with_the_terms(css_smoke_root, tmp_path):
    from keras_irtf.training.backup import TrainingDiverged
    from keras_irtf.training.loop import train

    cfg = tiny_config(css_smoke_root, f"train.out={tmp_path / 'nan'}", "optim.learning_rate=1e12",
                      "optim.momentum=0.0", "train.steps=40", "loss.eta=0.001")
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step \d+: .*retrieval_loss=.*similarity_loss="):
        train(cfg, verbose=0)
    state = tmp_path / "nan" / "backup" / "state.json"
    if state.is_file():  # any backup written holds finite weights only
        from keras_irtf.training.backup import latest_backup

        import h5py

        with h5py.File(latest_backup(tmp_path / "nan" / "backup")["weights"]) as f:
            arrays = []
            f.visititems(lambda name, obj: arrays.append(obj[()]) if hasattr(obj, "shape") else None)
        assert all(np.all(np.isfinite(a)) for a in arrays if np.issubdtype(np.asarray(a).dtype, np.floating))


def test_a_signal_stops_after_the_step_backs_it_up_and_the_rerun_resumes_there(css_smoke_root, tmp_path):
    """SIGINT at the end of step 7, with periodic backups every 100 steps (none would exist yet):
    training stops after that step, raising TrainingInterrupted that names it; the backup holds
    step 7; the process's own SIGINT handler is back. The re-run resumes at 7 and measures its
    seconds per step over the steps it trained itself. Then SIGTERM, twice in one step: the
    second stops at once, naming no step, and the backup stays at the last one written."""
    import keras

    from keras_irtf.run_folder import latest_backup
    from keras_irtf.training.interrupt import TrainingInterrupted
    from keras_irtf.training.loop import train

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("Python runs signal handlers in the main thread only")

    class SignalAfter(keras.callbacks.Callback):
        def __init__(self, step, signum, times=1):
            super().__init__()
            self.step, self.signum, self.times = step, signum, times

        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations.numpy()) == self.step:
                for _ in range(self.times):
                    signal.raise_signal(self.signum)

    run = tmp_path / "run"
    cfg = tiny_config(css_smoke_root, f"train.out={run}", "train.steps=12", "train.steps_per_epoch=12",
                      "train.backup_every_steps=100", "data.train_recall_queries=16")
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(cfg, verbose=0, callbacks=[SignalAfter(7, signal.SIGINT)])
    assert (stopped.value.signal_name, stopped.value.step, stopped.value.backup_step) == ("SIGINT", 7, 7)
    assert int(latest_backup(run / "backup")["step"]) == 7
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert isinstance(stopped.value, KeyboardInterrupt)  # what a script that catches Ctrl-C catches

    with pytest.raises(TrainingInterrupted) as at_once:
        train(cfg, verbose=0, callbacks=[SignalAfter(9, signal.SIGTERM, times=2)])
    assert (at_once.value.signal_name, at_once.value.step) == ("SIGTERM", None)
    assert int(latest_backup(run / "backup")["step"]) == 7  # nothing was written by the stop at once
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before

    _, metrics = train(cfg, verbose=0)
    assert metrics["resumed_from_step"] == 7 and metrics["steps"] == 12
    assert metrics["training_means"]["from_step"] == 7
    assert isinstance(metrics["seconds_per_step"], float) and metrics["seconds_per_step"] > 0
    assert metrics["seconds_per_step"] * 5 <= metrics["train_seconds"]  # 5 steps of this process, within all


def test_global_batch_must_split_over_replicas():
    import tensorflow as tf

    from keras_irtf.training.distribute import check_batch, parse_devices

    class Two:
        num_replicas_in_sync = 2

    assert check_batch(16, Two()) == 8
    with pytest.raises(ConfigError, match=r"batch_size=15 is the global batch.*2 replicas.*multiple of 2"):
        check_batch(15, Two())
    assert check_batch(15, tf.distribute.get_strategy()) == 15
    assert parse_devices("cpu:2") == ("cpu", 2)
    assert parse_devices("/gpu:0, /gpu:1") == ("list", ["/gpu:0", "/gpu:1"])


def test_worker_info_reads_tf_config(monkeypatch):
    from keras_irtf.training.distribute import make_strategy, worker_info

    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}}))
    assert worker_info() == (1, 2, False)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}}))
    assert worker_info() == (0, 2, True)
    monkeypatch.delenv("TF_CONFIG")
    assert worker_info() == (0, 1, True)
    with pytest.raises(ConfigError, match="needs TF_CONFIG"):
        make_strategy("multi_worker")


def test_worker_shards_partition_each_global_batch(css_smoke, smoke_vectorizer):
    from keras_irtf.data.pipeline import training_dataset

    full = list(training_dataset(css_smoke, smoke_vectorizer, 8, 3, seed=1, preprocessor=64))
    shards = [list(training_dataset(css_smoke, smoke_vectorizer, 8, 3, seed=1, preprocessor=64, shard=(i, 2)))
              for i in range(2)]
    for step in range(3):
        joined = np.concatenate([shards[0][step]["source_id"], shards[1][step]["source_id"]])
        np.testing.assert_array_equal(joined, full[step]["source_id"])
