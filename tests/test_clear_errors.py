"""Clear errors instead of tracebacks (issue #15 item 11): a damaged model.keras, a query image that
is not an image, and Ctrl-C during training."""

import importlib.util
import io
import json
import os
import re
import shlex
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _damaged_runs(tmp_path, css_smoke_root):
    from keras_irtf.config import to_yaml

    cfg = tiny_config(css_smoke_root)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("config.json", "{}" * 2000)
        z.writestr("model.weights.h5", os.urandom(20000))
    whole = buf.getvalue()
    for name, content in (("empty", b""), ("truncated", whole[: len(whole) // 2])):
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(to_yaml(cfg))
        (run / "vocab.txt").write_text("a\nb\n")
        (run / "model.keras").write_bytes(content)
        yield name, run


def test_damaged_model_file_is_named_as_damaged(tmp_path, css_smoke_root, capsys):
    from keras_irtf.experiment import load_model
    from keras_irtf.run_folder import DamagedModelFile

    for name, run in _damaged_runs(tmp_path, css_smoke_root):
        with pytest.raises(DamagedModelFile, match=rf"{run / 'model.keras'} is damaged"):
            load_model(run / "model.keras")
        assert _tool("export").main(["--run", str(run), "--out", str(tmp_path / "exp"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"error: {run / 'model.keras'} is damaged" in err, err
        assert _tool("evaluate").main(["--run", str(run), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"error: {run / 'model.keras'} is damaged" in err and "not found" not in err, err
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "nothing.keras")


def _last_logged_step(folder) -> int:
    """The highest step of the TensorBoard events in `folder` (a file being written may end in a
    partial record: it is left out)."""
    from tensorboard.compat.proto.event_pb2 import Event

    last = 0
    for path in Path(folder).glob("events.out.tfevents.*"):
        data, i = path.read_bytes(), 0
        while i + 12 <= len(data):  # a record: length (8 bytes), its crc (4), the event, its crc (4)
            length = struct.unpack("<Q", data[i:i + 8])[0]
            if i + 16 + length > len(data):
                break
            last = max(last, Event.FromString(data[i + 12:i + 12 + length]).step)
            i += 16 + length
    return last


@pytest.mark.slow
def test_ctrl_c_stops_after_the_step_backs_it_up_and_names_the_resume_command(css_smoke_root, tmp_path):
    """Ctrl-C mid-run, with no periodic backup due before step 2000: the step in progress is the
    last one trained, it is backed up, the one line names it and the command that resumes (the
    same, less --fresh), and that command resumes from it."""
    run = tmp_path / "interrupted"
    args = ["tools/train.py", "--dataset", "css", "--preset", "smoke", "--data-root", str(css_smoke_root), "--out",
            str(run), "--steps", "2000", "--set", "train.steps_per_epoch=2000", "--set", "train.backup_every_steps=0",
            "--set", "train.log_every_steps=1", "--quiet"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, *args, "--fresh"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    logs = run / "logs" / "train"  # the loss terms of every step, written as each step ends
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and _last_logged_step(logs) < 10:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    seen = _last_logged_step(logs)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    lines = err.strip().splitlines()
    # heard at once: a line says so before the step in progress has finished
    assert "SIGINT: stopping after the step in progress and backing it up (Ctrl-C again stops at once)" in lines[:-1]
    line = lines[-1]
    match = re.fullmatch(rf"interrupted at step (\d+) \(backed up in {re.escape(str(run))}\); resume with `(.+)`", line)
    assert match, line
    step = int(match.group(1))
    assert step == json.loads((run / "backup" / "state.json").read_text())["step"]
    assert step == _last_logged_step(logs)  # the last step trained is the one backed up
    assert seen <= step <= seen + 10  # stopped after the step in progress, not at the next backup (2000)
    assert not (run / ".lock").exists()  # released: the same command can resume
    command = shlex.split(match.group(2))
    assert command[1:] == args  # the command as run, less --fresh (which would discard the backup)
    resumed = subprocess.run(command + ["--steps", str(step + 3)], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == step and metrics["steps"] == step + 3
    assert metrics["seconds_per_step"] > 0  # measured over the 3 steps of the resumed process
