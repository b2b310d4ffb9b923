"""Clear errors instead of tracebacks (issue #15 item 11): a damaged model.keras, a query image that
is not an image, and Ctrl-C during training."""

import importlib.util
import io
import json
import os
import re
import signal
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


def _smoke_cli(root, out, *extra):
    return [sys.executable, str(ROOT / "tools" / "train.py"), "--dataset", "css", "--preset", "smoke",
            "--data-root", str(root), "--out", str(out), "--steps", "400", "--set", "train.backup_every_steps=2",
            "--quiet", *extra]


@pytest.mark.slow
def test_ctrl_c_prints_one_line_and_the_rerun_resumes(css_smoke_root, tmp_path):
    run = tmp_path / "interrupted"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(_smoke_cli(css_smoke_root, run), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    state = run / "backup" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["step"] >= 4:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    step = int(re.fullmatch(rf"interrupted at step (\d+) \(the last backup in {re.escape(str(run))}\); "
                            r"run the same command to resume", line).group(1))
    assert step == json.loads(state.read_text())["step"] >= 4
    assert not (run / ".lock").exists()  # released: the same command can resume
