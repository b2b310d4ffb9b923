"""The ablation tool: the grid's overrides, resuming (finished runs are skipped), the table."""

import json
import os

import numpy as np
import pytest

from keras_irtf.training import ablation as A
from keras_irtf.config import repo_configs_dir


def _metrics(r1, ms=0.9, seconds=0.5):
    test = {"R@1": r1, "R@5": r1 + 0.2, "R@10": r1 + 0.3}
    mt = np.mean(list(test.values()))
    return {"test": test, "train": {"R@1": ms - 0.1, "R@5": ms, "R@10": ms + 0.05},
            "whm": {"alpha": 0.5, "value": 1.5 * ms * mt / (0.5 * mt + ms), "Mt": mt, "Ms": ms},
            "seconds_per_step": seconds, "train_seconds": 10.0}


def test_grid_cells_switch_the_right_terms():
    assert A.cell_overrides("ce", 1e-3) == ["loss.eta=0.0", "ga.methods="]
    assert A.cell_overrides("all", 1e-3) == ["loss.eta=0.001", "ga.methods=adversarial,isotropic"]
    assert A.cell_overrides("ls_gai", 0.5) == ["loss.eta=0.5", "ga.methods=isotropic"]
    assert len(A.CELLS) == 11
    with pytest.raises(ValueError, match="unknown ablation cell"):
        A.cell_overrides("dropout", 1e-3)
    sweep = A.sweep_cells(["eps"], (1e-6, 1e-2))
    assert [c[0] for c in sweep] == ["sweep_eps_1e-06", "sweep_eps_0.01"]
    assert "ga.adversarial.eps=0.01" in sweep[1][2] and "ga.methods=adversarial" in sweep[1][2]


def test_finished_runs_are_not_rerun(tmp_path):
    out = tmp_path / "abl"
    for cell in ("ce", "gaa"):
        for seed in (0, 1):
            run = out / cell / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "metrics.json").write_text(json.dumps(_metrics(0.3 + 0.1 * seed)))
    logged = []
    results = A.run_ablation([repo_configs_dir() / "css_ablation.yaml"], seeds=2, out=out, cells=("ce", "gaa"),
                             log=logged.append)
    assert logged == []  # nothing trained
    assert sorted(results) == ["ce", "gaa"] and len(results["ce"]) == 2


def test_table_reports_mean_std_and_a_verdict_against_the_spread():
    results = {
        "ce": [_metrics(0.30), _metrics(0.32), _metrics(0.31)],
        "gai": [_metrics(0.40), _metrics(0.41), _metrics(0.42)],  # clearly better
        "ls": [_metrics(0.29), _metrics(0.33), _metrics(0.31)],  # within the spread
    }
    table = A.ablation_table(results)
    lines = table.splitlines()
    assert lines[2].startswith("| L_CE | 3 | 31.0 ± 1.0 |")
    assert "(better)" in lines[3] and "L_CE + L_GA^I" in lines[3]
    assert "(no measurable effect)" in lines[4]


def test_a_live_workers_lock_is_respected_and_a_dead_ones_taken_over(tmp_path):
    run = tmp_path / "cell" / "seed0"
    lock = A._claim(run)
    assert lock is not None and lock.read_text() == str(os.getpid())
    assert A._claim(run) is None  # held by a live process (this one)
    lock.write_text("999999999")  # a process that does not exist
    assert A._claim(run) is not None
