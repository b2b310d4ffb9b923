"""The WHM-against-alpha figure from two smoke runs, through tools/evaluate.py --whm-plot."""

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from keras_irtf.evaluation import metrics as M
from keras_irtf.utils import read_json
from tests.conftest import tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="module")
def two_smoke_runs(css_smoke_root, tmp_path_factory):
    from keras_irtf.training.loop import train

    base = tmp_path_factory.mktemp("whm_runs")
    # the first run also exercises the TensorBoard logging of train(): a GA term and a schedule
    settings = {
        "tirg_isotropic_s0": ["model.composer=tirg", "train.seed=0", "ga.methods=isotropic", "ga.isotropic.gamma=0.0001",
                              "train.steps=8", "train.steps_per_epoch=4", "train.log_every_steps=4",
                              "optim.decay_steps=[5]"],
        "concat_s1": ["model.composer=concat", "train.seed=1", "train.steps=6", "train.steps_per_epoch=6"],
    }
    runs = []
    for name, items in settings.items():
        run, _ = train(tiny_config(css_smoke_root, f"train.out={base / name}", *items), verbose=0)
        runs.append(run)
    return runs


def test_train_logs_loss_terms_and_learning_rate(two_smoke_runs):
    from test_callbacks import read_scalars

    scalars = read_scalars(Path(two_smoke_runs[0]) / "logs" / "train")
    for name in ("loss", "retrieval_loss", "ga_isotropic"):
        assert sorted(scalars[f"loss_terms/{name}"]) == [4, 8], name
    assert scalars["loss_terms/retrieval_loss"][4] > 0
    lr = scalars["optimizer/learning_rate"]
    assert lr[4] == pytest.approx(0.01) and lr[8] == pytest.approx(0.001)  # x 0.1 after step 5
    # the evaluation recalls go beside them
    assert (Path(two_smoke_runs[0]) / "logs" / "eval").is_dir()


def test_whm_plot_from_two_runs(two_smoke_runs, tmp_path):
    import evaluate as evaluate_tool
    from PIL import Image

    from keras_irtf.evaluation.plots import COLORS

    out = tmp_path / "figs" / "whm.png"
    argv = sum((["--run", str(r)] for r in two_smoke_runs), []) + ["--whm-plot", str(out), "--quiet"]
    assert evaluate_tool.main(argv) == 0

    img = Image.open(out)
    assert img.format == "PNG" and img.size == (960, 600)
    pixels = set(img.convert("RGB").getdata())
    assert COLORS[0] in pixels and COLORS[1] in pixels  # one curve per run

    side = json.loads(out.with_suffix(".json").read_text())
    alphas = np.asarray(side["alphas"])
    assert alphas[0] == 0.0 and alphas[-1] == 2.0 and len(alphas) == 41
    assert [r["label"] for r in side["runs"]] == [Path(r).name for r in two_smoke_runs]
    for run, series in zip(two_smoke_runs, side["runs"]):
        w = read_json(Path(run) / "metrics.json")["whm"]  # rewritten by the tool's evaluation
        assert series["Ms"] == pytest.approx(w["Ms"]) and series["Mt"] == pytest.approx(w["Mt"])
        assert 0 < w["Mt"] <= 1 and 0 < w["Ms"] <= 1
        expected = [M.weighted_harmonic_mean(w["Ms"], w["Mt"], a) for a in alphas]
        np.testing.assert_allclose(series["whm"], expected, rtol=1e-12)
        assert series["whm"][0] == pytest.approx(w["Mt"])  # alpha = 0 is the test recall
        i_half = int(np.argmin(np.abs(alphas - 0.5)))
        assert series["whm"][i_half] == pytest.approx(w["value"])  # the run's own alpha = 0.5

    with open(out.with_suffix(".csv")) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["alpha"] + [r["label"] for r in side["runs"]]
    table = np.array(rows[1:], dtype=float)
    np.testing.assert_allclose(table[:, 0], alphas)
    np.testing.assert_allclose(table[:, 1:].T, [r["whm"] for r in side["runs"]], rtol=1e-12)


def test_whm_plot_reuses_metrics_without_evaluating(two_smoke_runs, tmp_path, monkeypatch):
    import evaluate as evaluate_tool

    import keras_irtf.evaluation.protocol

    def fail(*a, **k):
        raise AssertionError("--reuse-metrics must not evaluate")

    monkeypatch.setattr(keras_irtf.experiment, "evaluate_run", fail)
    out = tmp_path / "again.png"
    argv = sum((["--run", str(r)] for r in two_smoke_runs), []) + ["--whm-plot", str(out), "--reuse-metrics"]
    assert evaluate_tool.main(argv) == 0
    side = json.loads(out.with_suffix(".json").read_text())
    ms = read_json(Path(two_smoke_runs[0]) / "metrics.json")["whm"]["Ms"]
    assert side["runs"][0]["Ms"] == pytest.approx(ms)


def test_whm_plot_errors_are_actionable(tmp_path, capsys):
    import evaluate as evaluate_tool

    from keras_irtf.evaluation.plots import write_whm_plot

    empty = tmp_path / "not_a_run"
    empty.mkdir()
    assert evaluate_tool.main(["--run", str(empty), "--whm-plot", str(tmp_path / "x.png"), "--reuse-metrics"]) == 2
    assert "metrics.json not found" in capsys.readouterr().err
    with pytest.raises(ValueError, match="ending in .png"):
        write_whm_plot({"a": {"whm": {"Ms": 0.5, "Mt": 0.4}}}, tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="no 'whm' entry"):
        write_whm_plot({"a": {"test": {}}}, tmp_path / "x.png")
