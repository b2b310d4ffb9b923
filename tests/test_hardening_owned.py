"""Writers delete or replace only what keras_irtf wrote; runs record what was really trained.

Each test reproduces a way the project once lost a user's files or recorded a run that differed
from what it trained, and checks the refusal (a one-line error naming the path and the way out)
or the true record.
"""

import ast
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import pytest

from keras_irtf.data.css_generator import OWNED_KIND, ensure_generated, generate
from keras_irtf.safety import MARKER_NAME, NotOwnedError, OutsideRootError, owned_kind, resolve_under
from keras_irtf.run_folder import (MANIFEST_NAME, BackupError, DamagedRunFile, RunFolderError,
                                            check_not_finished, latest_backup, record_run_files, run_folder_guard)
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="-1", TF_CPP_MIN_LOG_LEVEL="3")


# ---- generated datasets -----------------------------------------------------------------------
def test_generator_never_deletes_a_folder_it_did_not_write(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "thesis.tex").write_text("x")
    with pytest.raises(NotOwnedError, match=r"d is a folder keras_irtf did not write \(holds thesis.tex\)"):
        generate(d, size="smoke", write_png=False, verbose=False)
    with pytest.raises(NotOwnedError):
        generate(d, size="smoke", write_png=False, verbose=False, overwrite=True)  # --overwrite is no licence
    assert (d / "thesis.tex").read_text() == "x" and sorted(p.name for p in d.iterdir()) == ["thesis.tex"]
    assert not list(tmp_path.glob(".d.partial-*"))  # refused before any work


def test_generator_cli_refuses_the_working_folder_in_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    r = subprocess.run([sys.executable, "-m", "keras_irtf.data.css_generator", "--size", "smoke", "--no-png",
                        "--out", "."], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and r.stderr.strip().startswith("error: . is a folder keras_irtf did not write")
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_generator_replaces_only_its_own_output_and_only_when_asked(tmp_path):
    out = generate(tmp_path / "css", size="smoke", write_png=False, verbose=False)
    assert owned_kind(out) == OWNED_KIND
    with pytest.raises(NotOwnedError, match="pass --overwrite to replace it"):
        generate(out, size="smoke", seed=1, write_png=False, verbose=False)
    before = (out / "css_toy_dataset_novel2_small.dup.npy").read_bytes()
    generate(out, size="smoke", seed=1, write_png=False, verbose=False, overwrite=True)
    assert (out / "css_toy_dataset_novel2_small.dup.npy").read_bytes() != before  # seed 1 written
    assert owned_kind(out) == OWNED_KIND and not list(tmp_path.glob(".css.*"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (generate(empty, size="smoke", write_png=False, verbose=False) / MARKER_NAME).is_file()


def test_the_cache_never_regenerates_over_a_user_folder(tmp_path):
    user = tmp_path / "css_smoke_s0"
    user.mkdir()
    (user / "mine.txt").write_text("x")
    with pytest.raises(NotOwnedError):
        ensure_generated(tmp_path, "smoke", 0, verbose=False)
    assert (user / "mine.txt").read_text() == "x"


# ---- run folders --------------------------------------------------------------------------------
def test_training_refuses_a_user_backup_folder_and_keeps_it(css_smoke_root, tmp_path):
    run = tmp_path / "u"
    (run / "backup").mkdir(parents=True)
    (run / "backup" / "t.tex").write_text("x")
    cfg = tiny_config(css_smoke_root, f"train.out={run}")
    for fresh in (False, True):
        with pytest.raises(NotOwnedError, match=r"u/backup is a folder keras_irtf did not write \(holds t.tex\)"):
            with run_folder_guard(run, cfg, fresh=fresh, verbose=False):
                pass
    assert (run / "backup" / "t.tex").read_text() == "x"
    assert sorted(p.name for p in (run / "backup").iterdir()) == ["t.tex"]  # no fingerprint written into it


def test_training_refuses_a_user_logs_folder(css_smoke_root, tmp_path):
    run = tmp_path / "u"
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "notes.md").write_text("x")
    with pytest.raises(NotOwnedError, match="logs"):
        with run_folder_guard(run, tiny_config(css_smoke_root, f"train.out={run}"), verbose=False):
            pass
    assert (run / "logs" / "notes.md").read_text() == "x"


def _finished_run(run):
    run.mkdir(parents=True)
    for name in ("model.keras", "metrics.json", "config.yaml", "vocab.txt"):
        (run / name).write_text(name)
    record_run_files(run, "model.keras", "metrics.json", "config.yaml", "vocab.txt")
    return run


def test_an_empty_backup_folder_does_not_disable_the_finished_run_guard(tmp_path):
    run = _finished_run(tmp_path / "run")
    (run / "backup").mkdir()
    with pytest.raises(RunFolderError, match="holds a finished run"):
        check_not_finished(run, overwrite=False, verbose=False)
    (run / "backup" / "state.json").write_text('{"step": 5, "weights": "gone.h5", "rng": "gone.npz"}')
    with pytest.raises(RunFolderError, match="holds a finished run"):  # a broken backup is no reason either
        check_not_finished(run, overwrite=False, verbose=False)


def test_overwrite_removes_only_files_the_manifest_proves(tmp_path):
    run = _finished_run(tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    (run / "vocab.txt").write_text("edited by the user")  # no longer what the run wrote
    with pytest.raises(NotOwnedError, match=r"vocab.txt is a file keras_irtf did not write"):
        check_not_finished(run, overwrite=True, verbose=False)
    assert all((run / n).is_file() for n in ("model.keras", "metrics.json", "config.yaml", "vocab.txt"))
    (run / "vocab.txt").write_text("vocab.txt")  # restored: the manifest proves every file again
    check_not_finished(run, overwrite=True, verbose=False)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_out_naming_a_file_is_one_line(css_smoke_root, tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    r = subprocess.run([sys.executable, "tools/train.py", "--dataset", "css", "--preset", "smoke", "--data-root",
                        str(css_smoke_root), "--out", str(f / "run"), "--quiet"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{f} is a file" in r.stderr and f.read_text() == "x"


# ---- what is trained is what is recorded ----------------------------------------------------------
def test_fit_segments_train_exactly_the_steps_asked():
    from keras_irtf.training.loop import fit_segments

    for start, total, spe in [(0, 50, 20), (0, 60, 20), (45, 50, 20), (30, 60, 20), (7, 7, 3), (0, 1, 200)]:
        segments = fit_segments(start, total, spe)
        covered = [s for first, last, _, _ in segments for s in range(first, last)]
        assert covered == list(range(start, total))
        for first, last, epoch, per_epoch in segments:
            assert epoch == first // spe and (last - first) % per_epoch == 0 and per_epoch <= spe


class _StopAt(keras.callbacks.Callback):
    """Interrupt training (like Ctrl-C) once the optimizer has taken `step` steps."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) >= self.step:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def interrupted_run(css_smoke_root, tmp_path_factory):
    """A run folder interrupted at step 20 with a complete backup at step 20 (train.steps=40)."""
    from keras_irtf.training.loop import train

    run = tmp_path_factory.mktemp("interrupted") / "run"
    cfg = tiny_config(css_smoke_root, f"train.out={run}", "train.steps=40", "train.steps_per_epoch=100",
                      "train.backup_every_steps=10")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, verbose=0, callbacks=[_StopAt(20)])
    assert int(latest_backup(run / "backup")["step"]) == 20
    return run


def _copy(run, tmp_path):
    dest = tmp_path / "run"
    shutil.copytree(run, dest)
    return dest


def test_training_runs_exactly_the_steps_asked(css_smoke_root, tmp_path):
    import yaml

    from keras_irtf.experiment import load_model
    from keras_irtf.training.loop import train

    cfg = tiny_config(css_smoke_root, f"train.out={tmp_path / 'run'}", "train.steps=25", "train.steps_per_epoch=10")
    run, metrics = train(cfg, verbose=0)
    assert metrics["steps"] == 25
    assert int(load_model(run / "model.keras").optimizer.iterations.numpy()) == 25
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 25
    manifest = json.loads((run / MANIFEST_NAME).read_text())["files"]
    assert {"config.yaml", "vocab.txt", "model.keras", "metrics.json"} <= set(manifest)
    assert not (run / "backup").exists() and owned_kind(run / "logs") == "run logs"


def test_resuming_a_backup_beyond_the_steps_asked_is_refused(interrupted_run, tmp_path, css_smoke_root):
    from keras_irtf.training.loop import train

    run = _copy(interrupted_run, tmp_path)
    cfg = tiny_config(css_smoke_root, f"train.out={run}", "train.steps=10", "train.steps_per_epoch=100",
                      "train.backup_every_steps=10")
    with pytest.raises(BackupError, match=r"at step 20, beyond train.steps=10.*--fresh"):
        train(cfg, verbose=0)
    assert not (run / "metrics.json").exists() and not (run / "model.keras").exists()
    assert int(latest_backup(run / "backup")["step"]) == 20  # kept


def test_a_backup_missing_its_random_state_is_not_resumed_quietly(interrupted_run, tmp_path, css_smoke_root):
    from keras_irtf.training.loop import train

    run = _copy(interrupted_run, tmp_path)
    next((run / "backup").glob("step-*.rng.npz")).unlink()
    with pytest.raises(BackupError, match=r"incomplete: state.json names rng file 'step-000000020.rng.npz'.*--fresh"):
        latest_backup(run / "backup")
    cfg = tiny_config(css_smoke_root, f"train.out={run}", "train.steps=40", "train.steps_per_epoch=100",
                      "train.backup_every_steps=10")
    with pytest.raises(BackupError):
        train(cfg, verbose=0)
    assert not (run / "model.keras").exists()
    _, metrics = train(cfg, verbose=0, fresh=True)  # the way out the message names
    assert metrics["resumed_from_step"] is None and metrics["steps"] == 40


def test_a_truncated_backup_names_the_file_and_fresh(interrupted_run, tmp_path, css_smoke_root):
    run = _copy(interrupted_run, tmp_path)
    weights = next((run / "backup").glob("step-*.weights.h5"))
    weights.write_bytes(weights.read_bytes()[:3000])
    r = subprocess.run([sys.executable, "tools/train.py", "--dataset", "css", "--preset", "smoke", "--data-root",
                        str(css_smoke_root), "--out", str(run), "--steps", "40", "--set", "train.steps_per_epoch=100",
                        "--set", "train.backup_every_steps=10", "--quiet"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"backup file {weights} is damaged" in r.stderr and "--fresh" in r.stderr


def test_a_full_disk_stops_training_and_keeps_the_last_good_backup(css_smoke_root, tmp_path, monkeypatch):
    from keras_irtf.model.retrieval_model import ComposedRetrievalModel
    from keras_irtf.training.backup import BackupWriteError
    from keras_irtf.training.loop import train

    calls = []
    real = ComposedRetrievalModel.save_weights

    def save_weights(self, path, *args, **kwargs):
        calls.append(path)
        if len(calls) >= 2:  # the second backup meets a full disk half-way through the file
            Path(path).write_bytes(b"\x89HDF partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(ComposedRetrievalModel, "save_weights", save_weights)
    run = tmp_path / "run"
    cfg = tiny_config(css_smoke_root, f"train.out={run}", "train.steps=30", "train.steps_per_epoch=100",
                      "train.backup_every_steps=5")
    with pytest.raises(BackupWriteError, match=r"step 10 .*disk full.*last complete backup \(step 5\) is kept"):
        train(cfg, verbose=0)
    assert int(latest_backup(run / "backup")["step"]) == 5
    assert sorted(p.name for p in (run / "backup").iterdir() if p.name.startswith(("step", ".step"))) == [
        "step-000000005.rng.npz", "step-000000005.weights.h5"]  # no partial or unreferenced file left


def test_a_changed_vocabulary_is_reported_at_load(css_smoke_root, tmp_path):
    from keras_irtf.experiment import Experiment
    from keras_irtf.training.loop import train

    cfg = tiny_config(css_smoke_root, f"train.out={tmp_path / 'run'}", "train.steps=2")
    run, _ = train(cfg, verbose=0)
    Experiment.from_run(run, verbose=False, load_data=False)  # as written: loads
    lines = (run / "vocab.txt").read_text().splitlines(keepends=True)
    (run / "vocab.txt").write_text("".join(lines[:3] + lines[4:]))  # one line lost
    with pytest.raises(DamagedRunFile, match=r"vocab.txt differs from the file training wrote"):
        Experiment.from_run(run, verbose=False, load_data=False)
    r = subprocess.run([sys.executable, "tools/export.py", "--run", str(run), "--out", str(tmp_path / "exp")],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "vocab.txt differs" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_sigterm_stops_with_the_resume_line(css_smoke_root, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "tools/train.py", "--dataset", "css", "--preset", "smoke", "--data-root",
                             str(css_smoke_root), "--out", str(run), "--steps", "400", "--set",
                             "train.backup_every_steps=5", "--quiet"], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state, deadline = run / "backup" / "state.json", time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["step"] >= 5:  # written atomically
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]  # still training
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    match = re.fullmatch(rf"stopped by SIGTERM at step (\d+) \(backed up in {re.escape(str(run))}\); resume with `.+`", last)
    assert match, last
    assert int(match.group(1)) == json.loads(state.read_text())["step"]  # the step it stopped after, backed up


# ---- containment ----------------------------------------------------------------------------------
def test_resolve_under_refuses_links_and_dots_out_of_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(b"x")
    (root / "out.png").symlink_to("/etc/passwd")
    assert resolve_under(root, "sub/a.png") == (root / "sub" / "a.png").resolve()
    for name in ("out.png", "../root2", "/etc/passwd", "sub/../../x", "a\x00b"):
        with pytest.raises(OutsideRootError):
            resolve_under(root, name)


# ---- every delete is guarded ----------------------------------------------------------------------
DELETES = {"rmtree", "unlink", "remove", "rmdir", "removedirs"}


def _delete_calls(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in DELETES:
            base = node.func.value
            if node.func.attr == "remove" and not (isinstance(base, ast.Name) and base.id == "os"):
                continue  # list.remove, set.remove
            yield node.lineno, node.func.attr


def test_every_delete_call_site_states_its_guard():
    """Every rmtree / unlink / os.remove / rmdir in the package, tools and benchmarks carries a
    `# owned:` comment saying why the path is the project's own; recursive deletes in the
    package happen only in keras_irtf/safety.py (remove_owned, behind the ownership marker)."""
    files = [p for d in ("keras_irtf", "tools", "benchmarks") for p in sorted((ROOT / d).rglob("*.py"))]
    unguarded, recursive = [], []
    for path in files:
        lines = path.read_text().splitlines()
        for lineno, name in _delete_calls(path):
            here = lines[lineno - 1] + (lines[lineno] if lineno < len(lines) else "")
            if "# owned:" not in here:
                unguarded.append(f"{path.relative_to(ROOT)}:{lineno} {name}")
            if name == "rmtree" and path.parts[-2:] != ("keras_irtf", "safety.py") and "keras_irtf" in \
                    path.relative_to(ROOT).parts[:1]:
                recursive.append(f"{path.relative_to(ROOT)}:{lineno}")
    assert not unguarded, "delete calls without an '# owned:' guard comment: " + ", ".join(unguarded)
    assert not recursive, "recursive deletes outside keras_irtf/safety.py: " + ", ".join(recursive)
    assert len(files) > 50  # the scan saw the tree


def test_a_failed_save_of_the_step_already_backed_up_keeps_that_backup(tmp_path, monkeypatch):
    """An epoch that ends on a backup step asked for the same step twice; on a nearly full disk the
    second save failed and its clean-up removed the files state.json names: the only backup."""
    import keras
    import numpy as np

    from keras_irtf.training.backup import BackupWriteError, TrainingBackup

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(np.ones((4, 4)), np.ones((4, 3)), verbose=0)
    backup = TrainingBackup(tmp_path / "backup", every_steps=1)
    backup.set_model(model)
    model.optimizer.iterations.assign(5)
    backup.on_train_batch_end(0, {"loss": 1.0})  # step 5 backed up
    saved = sorted(p.name for p in (tmp_path / "backup").iterdir())

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model, "save_weights", full_disk)
    backup.on_epoch_end(0, {"loss": 1.0})  # the same step again: nothing to write
    assert sorted(p.name for p in (tmp_path / "backup").iterdir()) == saved
    model.optimizer.iterations.assign(6)
    with pytest.raises(BackupWriteError, match=r"step 6 .*last complete backup \(step 5\) is kept"):
        backup.on_train_batch_end(0, {"loss": 1.0})
    assert sorted(p.name for p in (tmp_path / "backup").iterdir()) == saved
    assert int(latest_backup(tmp_path / "backup")["step"]) == 5


def test_replace_folder_puts_the_previous_folder_back_when_the_move_fails(tmp_path, monkeypatch):
    from keras_irtf import safety

    final, new = tmp_path / "data", tmp_path / ".data.new"
    for folder, text in ((final, "old"), (new, "new")):
        folder.mkdir()
        (folder / "f.txt").write_text(text)
        safety.mark_owned(folder, "CSS benchmark")
    real = os.replace
    calls = []

    def failing(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # the move of the new folder into place
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst)

    monkeypatch.setattr(safety.os, "replace", failing)
    with pytest.raises(OSError, match="cross-device"):
        safety.replace_folder(new, final, "CSS benchmark")
    assert (final / "f.txt").read_text() == "old" and (new / "f.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".data.new", "data"]  # nothing hidden left behind
