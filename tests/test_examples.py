"""The user-script example runs end to end on the CSS smoke set."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def test_train_with_callbacks_example(css_smoke_root, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    cmd = [sys.executable, str(REPO / "examples" / "train_with_callbacks.py"), "--set", f"data.root={css_smoke_root}",
           "--set", "data.train_recall_queries=16", "--set", "train.steps_per_epoch=2", "--steps", "4",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    # the user callback saw every batch of both epochs
    assert len(summary["batch_losses"]) == 4 and all(np.isfinite(summary["batch_losses"]))
    assert summary["epochs_seen"] == [0, 1]
    assert len(summary["history"]["val_loss"]) == 2  # validation on the test queries ran
    assert summary["roundtrip_max_abs_diff"] == 0.0  # .keras round trip: identical embeddings
    assert 0.0 <= summary["whm"]["value"] <= 1.0
    for name in ("config.yaml", "vocab.txt", "model.keras", "metrics.json", "history.csv"):
        assert (out / name).is_file(), name
    assert len((out / "history.csv").read_text().strip().splitlines()) == 3  # header + 2 epochs
