"""Run folders never lose or misreport a result (issue #15 items 4, 5, 6): a finished run is not
replaced without --overwrite, one training at a time per folder, and a backup is resumed only by
the experiment that wrote it."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_config
from keras_irtf.safety import mark_owned
from keras_irtf.run_folder import record_run_files

ROOT = Path(__file__).resolve().parent.parent


def _train_cli(*args, timeout=120):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    start = time.time()
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), "--dataset", "css", *args],
                       capture_output=True, text=True, timeout=timeout, env=env)
    return r, time.time() - start


def _fake_backup(run, step=5):
    """A backup that latest_backup() accepts (its files exist; their content is not read here)."""
    backup = run / "backup"
    mark_owned(backup, "training backup")  # as TrainingBackup creates it
    (backup / "w.weights.h5").write_bytes(b"x")
    (backup / "r.rng.npz").write_bytes(b"x")
    (backup / "state.json").write_text(json.dumps({"step": step, "weights": "w.weights.h5", "rng": "r.rng.npz",
                                                   "train_seconds": 1.0}))


def test_default_run_name_includes_the_preset():
    from keras_irtf.config import default_run_name, load_config

    assert default_run_name(load_config([], [])) == "css_tirg_s0"
    assert default_run_name(load_config([], ["train.preset=smoke"])) == "css_tirg_smoke_s0"


def test_finished_run_is_refused_without_overwrite(css_smoke_root, tmp_path):
    run = tmp_path / "done"
    run.mkdir()
    (run / "model.keras").write_bytes(b"old model")
    (run / "metrics.json").write_text('{"old": true}')
    mark_owned(run / "logs", "run logs")
    record_run_files(run, "model.keras", "metrics.json")  # as training does: --overwrite may then remove them
    r, seconds = _train_cli("--preset", "smoke", "--data-root", str(css_smoke_root), "--out", str(run), "--quiet")
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"{run} holds a finished run (model.keras, metrics.json" in r.stderr and "--overwrite" in r.stderr
    assert (run / "model.keras").read_bytes() == b"old model"

    from keras_irtf.run_folder import RunFolderError, run_folder_guard

    cfg = tiny_config(css_smoke_root, f"train.out={run}")
    with pytest.raises(RunFolderError, match="holds a finished run"):
        with run_folder_guard(run, cfg, verbose=False):
            pass
    with run_folder_guard(run, cfg, overwrite=True, verbose=False):
        assert not (run / "model.keras").exists() and not (run / "logs").exists()
    assert not (run / ".lock").exists()


def test_second_training_into_a_locked_folder_stops_at_once(css_smoke_root, tmp_path):
    run = tmp_path / "busy"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (run / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "since": "now"}))
        r, seconds = _train_cli("--preset", "smoke", "--data-root", str(css_smoke_root), "--out", str(run), "--quiet")
        assert r.returncode == 2, r.stderr[-2000:]
        assert f"is being written by another training (pid {holder.pid}" in r.stderr
        assert not (run / "config.yaml").exists()  # the other run's config was not touched
    finally:
        holder.kill()
        holder.wait()

    from keras_irtf.run_folder import run_folder_guard

    # the holder is dead now: its lock is stale and taken over, then released
    cfg = tiny_config(css_smoke_root, f"train.out={run}")
    with run_folder_guard(run, cfg, verbose=False):
        owner = json.loads((run / ".lock").read_text())
        assert owner["pid"] == os.getpid()
        with pytest.raises(RuntimeError, match="being written by another training"):
            _other_process_lock(run)
    assert not (run / ".lock").exists()


def _other_process_lock(run):
    """Try to take the lock from a second process (as a second training would)."""
    code = ("import sys; from keras_irtf.run_folder import RunLock; "
            "RunLock(sys.argv[1]).acquire()")
    r = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    raise RuntimeError(r.stderr[-1000:]) if r.returncode else AssertionError("second lock was granted")


def test_resume_with_another_config_lists_the_keys(css_smoke_root, tmp_path):
    from keras_irtf.run_folder import RunFolderError, run_folder_guard

    run = tmp_path / "resume"
    cfg = tiny_config(css_smoke_root, f"train.out={run}")
    with run_folder_guard(run, cfg, verbose=False):  # a fresh start stores the fingerprint
        pass
    _fake_backup(run)
    changed = tiny_config(css_smoke_root, f"train.out={run}", "optim.learning_rate=0.5", "train.seed=3",
                          "model.embed_dim=32")
    with pytest.raises(RunFolderError) as e:
        with run_folder_guard(run, changed, verbose=False):
            pass
    message = str(e.value)
    for key in ("optim.learning_rate: backup 0.01, now 0.5", "train.seed: backup 0, now 3", "model.embed_dim"):
        assert key in message, message
    assert "--fresh" in message
    # keys that may change on resume do not count
    longer = tiny_config(css_smoke_root, f"train.out={run}", "train.steps=400", "train.log_every_steps=7",
                         "eval.batch_size=8")
    with run_folder_guard(run, longer, verbose=False):
        pass
    # --fresh discards the backup and starts over with the new config
    with run_folder_guard(run, changed, fresh=True, verbose=False):
        assert not (run / "backup" / "state.json").exists()
    _fake_backup(run)
    with run_folder_guard(run, changed, verbose=False):
        pass


def test_train_cli_reports_a_config_mismatch(css_smoke_root, tmp_path):
    run = tmp_path / "cli"
    from keras_irtf.run_folder import run_folder_guard

    with run_folder_guard(run, tiny_config(css_smoke_root, f"train.out={run}", "train.preset=smoke"),
                          verbose=False):
        pass
    _fake_backup(run)
    r, _ = _train_cli("--preset", "smoke", "--data-root", str(css_smoke_root), "--out", str(run), "--quiet",
                      "--set", "optim.learning_rate=0.2")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "optim.learning_rate: backup 0.01, now 0.2" in r.stderr
    assert not (run / "config.yaml").exists()  # config.yaml does not claim the new settings
