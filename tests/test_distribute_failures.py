"""Distributed training fails fast instead of hanging (issue #15 item 12): devices that do not exist
are refused with the list of those that do; a multi-worker collective that fails (timeout, lost
peer) is reported with a clear, resumable message; a worker whose peers never connect gives up
after train.collective_timeout_seconds instead of waiting forever."""

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _env(**extra):
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="-1", PYTHONPATH=str(ROOT), **extra)


def test_missing_devices_fail_fast_with_the_available_list(css_smoke_root, tmp_path):
    start = time.time()
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), "--dataset", "css", "--preset", "smoke",
                        "--data-root", str(css_smoke_root), "--out", str(tmp_path / "gpus"), "--quiet",
                        "--strategy", "mirrored", "--devices", "/gpu:0,/gpu:1"],
                       capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 2, r.stderr[-2000:]
    assert "/gpu:0, /gpu:1 do(es) not exist on this machine; available devices: /device:CPU:0" in r.stderr
    assert "--devices cpu:N" in r.stderr
    assert time.time() - start < 90  # it used to wait forever at "Epoch 1/2"
    code = ("from keras_irtf.training.distribute import make_strategy\n"
            "try:\n    make_strategy('mirrored', 'cpu:0,cpu:1')\nexcept Exception as e:\n    print(e)\n"
            "s = make_strategy('mirrored', '/cpu:0')\nprint('replicas', s.num_replicas_in_sync)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    assert "train.devices: cpu:1 do(es) not exist" in r.stdout and "cpu:2" in r.stdout, r.stdout + r.stderr[-2000:]
    assert "replicas 1" in r.stdout


def test_collective_failure_message_is_clear_and_resumable(tmp_path):
    import tensorflow as tf

    from keras_irtf.training.distribute import collective_failure_message

    run = tmp_path / "run"
    (run / "backup").mkdir(parents=True)
    for name in ("w.weights.h5", "r.rng.npz"):
        (run / "backup" / name).write_bytes(b"x")
    (run / "backup" / "state.json").write_text('{"step": 12, "weights": "w.weights.h5", "rng": "r.rng.npz", '
                                               '"train_seconds": 1}')
    error = tf.errors.DeadlineExceededError(None, None, "Collective ops timed out")
    message = collective_failure_message(error, 20.0, run)
    assert "collective operation failed (DeadlineExceededError)" in message
    assert "train.collective_timeout_seconds=20.0" in message
    assert "the last backup is at step 12; restart every worker with the same command" in message
    assert collective_failure_message(ValueError("x"), 20.0, run) is None


def test_a_worker_whose_peers_never_connect_gives_up(css_smoke_root, tmp_path):
    """Worker 0 of a two-worker cluster started alone: creating the strategy waits for the other
    worker outside any collective; the watchdog ends it after the timeout (faulthandler's exit
    status 1), having said beforehand that it would."""
    from keras_irtf.training.distribute import localhost_tf_configs

    start = time.time()
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), "--dataset", "css", "--preset", "smoke",
                        "--data-root", str(css_smoke_root), "--out", str(tmp_path / "alone"), "--quiet",
                        "--strategy", "multi_worker", "--set", "train.collective_timeout_seconds=15"],
                       capture_output=True, text=True, timeout=240,
                       env=_env(TF_CONFIG=localhost_tf_configs(2)[0]))
    assert r.returncode == 1, r.stderr[-2000:]
    assert "if they have not all connected within 15 s (train.collective_timeout_seconds)" in r.stderr
    assert time.time() - start < 200
