"""Distributed training fails fast instead of hanging (issue #15 item 12): devices that do not exist
are refused with the list of those that do; a multi-worker collective that fails (timeout, lost
peer) is reported with a clear, resumable message; a worker whose peers never connect gives up
after train.collective_timeout_seconds instead of waiting forever."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def _worker_args(css_root, out, steps, *extra):
    return [sys.executable, str(ROOT / "tools" / "train.py"), "--dataset", "css", "--preset", "smoke",
            "--data-root", str(css_root), "--out", str(out), "--quiet", "--strategy", "multi_worker",
            "--steps", str(steps), "--set", f"train.steps_per_epoch={steps}", "--set", "train.backup_every_steps=5",
            *extra]


def _wait_for_backup(run, step, procs, deadline):
    import json

    state = Path(run) / "backup" / "state.json"
    while time.time() < deadline:
        if state.is_file():
            try:
                if json.loads(state.read_text())["step"] >= step:
                    return
            except (ValueError, KeyError):
                pass  # being replaced
        if any(p.poll() is not None for p in procs):
            raise AssertionError("a worker ended before the first backup: "
                                 + " | ".join((p.communicate()[1] or "")[-1500:] for p in procs))
        time.sleep(0.5)
    raise AssertionError(f"no backup at step >= {step} before the deadline")


@pytest.mark.slow
def test_a_worker_lost_mid_training_fails_its_peer_clearly_and_the_run_resumes(css_smoke_root, tmp_path):
    """Two workers train; worker 1 is killed after the first backups. Worker 0's next collective
    cannot complete: it must end (not hang) within train.collective_timeout_seconds, naming the
    failure and the backup to resume from; both workers restarted with the same command resume
    from that backup and finish."""
    import signal

    from keras_irtf.training.distribute import localhost_tf_configs

    run = tmp_path / "mw"
    steps, timeout = 400, 20
    configs = localhost_tf_configs(2)
    args = _worker_args(css_smoke_root, run, steps, "--set", f"train.collective_timeout_seconds={timeout}")
    procs = [subprocess.Popen(args, env=_env(TF_CONFIG=c), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in configs]
    try:
        _wait_for_backup(run, 5, procs, time.time() + 600)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        out, err = procs[0].communicate(timeout=timeout + 240)
        waited = time.time() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode not in (0, None), err[-3000:]
    assert waited < timeout + 200, waited  # ended by itself: no hang
    assert "collective operation failed" in err and "restart every worker with the same command" in err, err[-3000:]
    import json

    backup_step = json.loads((run / "backup" / "state.json").read_text())["step"]
    assert f"the last backup is at step {backup_step}" in err
    assert not (run / "metrics.json").exists()

    # restart both workers with a shorter run: they resume from the backup and finish
    args = _worker_args(css_smoke_root, run, backup_step + 5, "--set", f"train.collective_timeout_seconds={timeout}")
    procs = [subprocess.Popen(args, env=_env(TF_CONFIG=c), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in localhost_tf_configs(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == backup_step and metrics["steps"] == backup_step + 5
