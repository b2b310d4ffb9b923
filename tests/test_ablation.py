"""The ablation tool: the grid's overrides, resuming (finished runs are skipped), the table."""

import json
import os

import numpy as np
import pytest

from keras_irtf.training import ablation as A
from keras_irtf.config import repo_configs_dir


def _metrics(r1, ms=0.9, seconds=0.5, seed=0, pgd=None):
    test = {"R@1": r1, "R@5": r1 + 0.2, "R@10": r1 + 0.3}
    mt = np.mean(list(test.values()))
    m = {"test": test, "train": {"R@1": ms - 0.1, "R@5": ms, "R@10": ms + 0.05},
         "whm": {"alpha": 0.5, "value": 1.5 * ms * mt / (0.5 * mt + ms), "Mt": mt, "Ms": ms},
         "seconds_per_step": seconds, "train_seconds": 10.0, "seed": seed,
         "final_losses": {"retrieval_loss": 0.5, "ga_adversarial": 0.1}}
    if pgd is not None:
        m["robustness"] = {"pgd": {A.ATTACK_KEY: {"R@1": pgd}}, "noise": {A.NOISE_KEY: {"R@1": r1}},
                           "input_grad_l1": 4.0}
    return m


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
                             log=logged.append, robustness=False)
    assert logged == []  # nothing trained
    assert sorted(results) == ["ce", "gaa"] and len(results["ce"]) == 2


def test_table_reports_mean_std_and_a_paired_t_test_verdict():
    results = {
        "ce": [_metrics(0.30, seed=0, pgd=0.10), _metrics(0.32, seed=1, pgd=0.12), _metrics(0.31, seed=2, pgd=0.11)],
        # PGD recall higher by 0.20 +- 0.001 on every seed: a paired difference far from zero
        "gaa": [_metrics(0.30, seed=0, pgd=0.30), _metrics(0.32, seed=1, pgd=0.321), _metrics(0.31, seed=2, pgd=0.309)],
        # R@1 differences +0.03, -0.03, +0.01: no effect
        "ls": [_metrics(0.33, seed=0, pgd=0.10), _metrics(0.29, seed=1, pgd=0.12), _metrics(0.32, seed=2, pgd=0.11)],
        "gai": [_metrics(0.5, seed=0)],  # one seed: shown, not tested
    }
    table = A.ablation_table(results)
    lines = table.splitlines()
    assert lines[0].startswith("| loss | seeds | R@1 | R@5 |") and "PGD 4/255 R@1" in lines[0]
    assert lines[2].startswith("| L_CE | 3 | 31.0 ± 1.0 |")
    assert sum(line.startswith("| L_CE + L_GA^I | 1 | 50.0 |") for line in lines) == 1  # every row shown
    tests = A.paired_tests(results)
    assert tests["gaa"]["pgd R@1"]["p"] < 1e-3 and tests["gaa"]["verdict"] == "PGD 4/255 R@1 higher"
    assert tests["gaa"]["pgd R@1"]["ci"][0] > 19.0
    assert tests["ls"]["verdict"] == "no measurable effect" and tests["ls"]["R@1"]["p"] > 0.5
    assert tests["gai"]["verdict"] == "(one seed: no test)"
    row = next(line for line in lines if line.startswith("| L_CE + L_GA^A | 3 | +0.0"))
    assert "PGD 4/255 R@1 higher" in row and "p=" in row


def test_runs_are_paired_by_seed_not_by_order():
    results = {"ce": [_metrics(0.30, seed=1), _metrics(0.50, seed=0)],
               "gaa": [_metrics(0.51, seed=0), _metrics(0.31, seed=1)]}
    t = A.paired_tests(results)["gaa"]["R@1"]
    np.testing.assert_allclose(t["mean"], 1.0)
    assert t["sd"] < 1e-9


def test_t_distribution_matches_tables():
    from keras_irtf.evaluation.stats import paired_t_test, t_cdf, t_quantile

    # two-sided 5% critical values of Student's t: df 1, 2, 4, 10
    for df, crit in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281)):
        np.testing.assert_allclose(t_cdf(crit, df), 0.975, atol=2e-5)
        np.testing.assert_allclose(t_quantile(0.975, df), crit, atol=2e-4)
    np.testing.assert_allclose(t_cdf(-1.0, 3), 0.195501, atol=1e-6)
    np.testing.assert_allclose(t_cdf(0.0, 5), 0.5)
    r = paired_t_test([1.0, 2.0, 3.5], [0.0, 0.5, 1.0])  # differences 1, 1.5, 2.5
    np.testing.assert_allclose(r["t"], (5 / 3) / (np.std([1, 1.5, 2.5], ddof=1) / np.sqrt(3)))
    np.testing.assert_allclose(r["p"], 0.0634, atol=1e-3)
    assert r["ci"][0] < 0 < r["ci"][1]


def test_equal_differences_on_every_seed_are_no_test_not_p_zero():
    """Recall moves in steps (1/2400 on CSS), so with few seeds every pair can differ by the same
    amount by chance: the t statistic is undefined there, and the test reports no p (shown as the
    mean alone, left out of the Holm family), not p = 0 and a verdict."""
    from keras_irtf.evaluation.stats import paired_t_test

    r = paired_t_test([0.885, 0.870], [0.889, 0.874])
    assert r["mean"] == pytest.approx(-0.004) and np.isnan(r["p"]) and np.isnan(r["ci"][0]) and np.isnan(r["t"])
    # recall in points as the tables compute it (a fraction of 2,400 queries times 100): two equal
    # steps differ by float rounding, which is no spread either
    for k1, k2, step in ((2131, 2098, -10), (1999, 2205, 3), (2400, 1700, -1)):
        r = paired_t_test([(k1 + step) / 2400 * 100, (k2 + step) / 2400 * 100], [k1 / 2400 * 100, k2 / 2400 * 100])
        assert np.isnan(r["p"]) and r["mean"] == pytest.approx(step / 24), (k1, k2, step, r)
    assert paired_t_test([88.75, 88.0], [88.7, 88.0])["p"] > 0.3  # a real spread is still tested
    assert paired_t_test([0.5, 0.6], [0.5, 0.6])["p"] == 1.0  # identical pairs: no difference at all
    ce = [_metrics(0.889, seed=0, pgd=0.2), _metrics(0.874, seed=1, pgd=0.25)]
    gai = [_metrics(0.885, seed=0, pgd=0.1), _metrics(0.870, seed=1, pgd=0.2)]
    tests = A.paired_tests({"ce": ce, "gai": gai}, tested=["R@1", "pgd R@1"])
    assert "p_holm" not in tests["gai"]["R@1"] and "p_holm" in tests["gai"]["pgd R@1"]
    assert tests["gai"]["verdict"] == "no measurable effect"
    table = A.ablation_table({"ce": ce, "gai": gai}, tested=["R@1", "pgd R@1"])
    assert "| L_CE + L_GA^I | 2 | -0.4 | -7.5 [" in table and "the family being the 1 tests" in table


def test_sweeps_include_the_authors_noise_scale():
    cells = A.sweep_cells(["gamma_mean", "gamma"], (1e-2,))
    assert "ga.isotropic.noise_scaling=mean" in cells[0][2] and "ga.isotropic.noise_scaling=per_element" in cells[1][2]


def test_a_live_workers_lock_is_respected_and_a_dead_ones_taken_over(tmp_path):
    run = tmp_path / "cell" / "seed0"
    lock = A._claim(run)
    assert lock is not None and lock.read_text() == str(os.getpid())
    assert A._claim(run) is None  # held by a live process (this one)
    lock.write_text("999999999")  # a process that does not exist
    assert A._claim(run) is not None


def test_tables_regenerate_from_the_per_seed_json_alone(tmp_path):
    results = {"ce": [_metrics(0.30, seed=0, pgd=0.10), _metrics(0.32, seed=1, pgd=0.12)],
               "gaa": [_metrics(0.29, seed=1, pgd=0.33), _metrics(0.31, seed=0, pgd=0.30)]}
    data = A.per_seed_json({"Ablation": results}, {"command": "python tools/ablate.py --seeds 2"})
    data = json.loads(json.dumps(data))  # what a reader of the committed file gets
    runs = data["tables"]["Ablation"]["gaa"]["runs"]
    assert [r["seed"] for r in runs] == [0, 1]  # in seed order
    np.testing.assert_allclose(runs[0]["pgd R@1"], 30.0)
    assert runs[0]["shift R@1"] is None  # no value, not a made-up one
    text = A.tables_markdown(data, source="x.json")
    assert text.splitlines()[0] == A.GENERATED.format(source="x.json")
    assert A.ablation_table(results) in text  # the same table as from the run folders

    src, out = tmp_path / "r.json", tmp_path / "r.md"
    src.write_text(json.dumps(data))
    import subprocess
    import sys

    tool = repo_configs_dir().parent / "tools" / "ablate.py"
    done = subprocess.run([sys.executable, str(tool), "-q", "--from-json", str(src), "--table", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_text() == A.tables_markdown(data, source=str(src))
    data["columns"]["made up"] = "x"
    src.write_text(json.dumps(data))
    done = subprocess.run([sys.executable, str(tool), "-q", "--from-json", str(src)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "made up" in done.stderr and str(src) in done.stderr


def test_sweep_rows_are_labelled_by_weight_and_value():
    assert A._label("sweep_gamma_mean_100") == "L_CE + L_GA^I, gamma 100 / size"
    assert A._label("sweep_gamma_0.03") == "L_CE + L_GA^I, gamma 0.03 per element"
    assert A._label("sweep_eps_0.1") == "L_CE + L_GA^A, eps 0.1"


def test_holm_adjustment_by_hand():
    from keras_irtf.evaluation.stats import holm_adjust

    # sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> 0.06 (monotone)
    got = holm_adjust([0.01, 0.04, 0.03, 0.005, float("nan")])
    np.testing.assert_allclose(got[:4], [0.03, 0.06, 0.06, 0.02])
    assert np.isnan(got[4])
    np.testing.assert_allclose(holm_adjust([0.5, 0.4]), [0.8, 0.8])  # capped at 1 before the max: 0.8, 0.8
    np.testing.assert_allclose(holm_adjust([0.9, 0.8]), [1.0, 1.0])


def test_paired_tables_correct_over_the_rows_and_columns_of_one_table():
    """The Holm column: every p of the table (3 rows x 2 tested columns = 6 tests) adjusted as one
    family; a p below 0.05 alone is not a Holm verdict once multiplied by its rank's factor."""
    from keras_irtf.evaluation.stats import paired_t_test

    ce = [_metrics(0.30 + 0.01 * s, seed=s, pgd=0.10 + 0.01 * s) for s in range(4)]
    rows = {
        "gaa": [_metrics(0.30 + 0.01 * s, seed=s, pgd=0.30 + 0.01 * s + 0.001 * (-1) ** s) for s in range(4)],
        "ls": [_metrics(0.30 + 0.01 * s + (0.01, 0.025, 0.01, 0.02)[s], seed=s, pgd=0.10 + 0.01 * s + 0.003 * (s % 2))
               for s in range(4)],
        "gai": [_metrics(0.30 + 0.01 * s + 0.01 * (s == 3), seed=s, pgd=0.10 + 0.01 * s) for s in range(4)],
    }
    results = {"ce": ce, **rows}
    tested = ["R@1", "pgd R@1"]
    tests = A.paired_tests(results, tested=tested)
    ps, where = [], []
    for name in rows:
        for c in tested:
            a = np.array([A.record(m)[c] for m in rows[name]])
            b = np.array([A.record(m)[c] for m in ce])
            p = paired_t_test(a, b)["p"]
            if not np.isnan(p):
                ps.append(p)
                where.append((name, c))
    # Holm by hand: sort, multiply by (m - rank), running maximum, capped at 1
    m, order = len(ps), np.argsort(ps)
    want, running = {}, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        want[where[i]] = running
    for (name, c), value in want.items():
        np.testing.assert_allclose(tests[name][c]["p_holm"], value, rtol=1e-12)
    assert tests["gaa"]["holm_verdict"].startswith("PGD 4/255 R@1 higher (Holm p=")
    # "ls": R@1 +1, +2.5, +1, +2 points: p = 0.023 alone, not after the correction
    assert tests["ls"]["R@1"]["p"] < 0.05 <= tests["ls"]["R@1"]["p_holm"]
    assert "R@1 higher" in tests["ls"]["verdict"] and tests["ls"]["holm_verdict"] == "no measurable effect"
    table = A.ablation_table(results, tested=tested)
    assert f"the family being the {m} tests of this table: 3 rows x 2 columns" in table
    assert "| verdict | Holm verdict |" in table


def test_the_noise_to_gradient_column_reads_the_mean_over_training():
    m = _metrics(0.3)
    m["training_means"] = {"from_step": 0, "ga_noise_ratio": 0.25, "loss": 1.0}
    assert A.record(m)["noise/grad"] == 0.25
    assert A.record(_metrics(0.3))["noise/grad"] is None
    table = A.ablation_table({"ce": [_metrics(0.3, seed=0)], "gai": [m]})
    assert "‖noise‖ / ‖∇L‖" in table.splitlines()[0] and "| 0.25 |" in table


def test_training_means_weight_each_epoch_by_its_steps():
    from keras_irtf.training.loop import training_means

    got = training_means([(100, {"loss": 1.0, "ga_noise_ratio": 0.5}), (50, {"loss": 4.0, "ga_noise_ratio": 0.2})])
    np.testing.assert_allclose(got["loss"], (100 * 1.0 + 50 * 4.0) / 150)
    np.testing.assert_allclose(got["ga_noise_ratio"], (100 * 0.5 + 50 * 0.2) / 150)
    assert training_means([]) == {}


def test_the_time_left_counts_each_row_at_its_own_pace():
    durations = {"ce": [60.0, 120.0], "pgd": [600.0]}
    np.testing.assert_allclose(A.eta_minutes(durations, ["ce", "pgd", "pgd", "gaa"]),
                               (90 + 600 + 600 + np.mean([60, 120, 600])) / 60)
    assert np.isnan(A.eta_minutes({}, ["ce"]))


def _study_file(tmp_path, rows_extra=""):
    path = tmp_path / "study.yaml"
    path.write_text(f"""base: {repo_configs_dir() / 'css_ablation.yaml'}
study:
  seeds: [0, 1]
  baseline: ce
  columns: [R@1, pgd R@1, WHM]
  tested: [pgd R@1]
  rows:
    ce: {{label: plain, set: ["ga.methods="]}}
    strong: {{label: the strong one, set: [ga.methods=pgd, ga.pgd.steps=2]}}
    weak: {{label: the weak one, set: [ga.methods=fgsm]}}{rows_extra}
  tables:
    "First": [strong]
    "Second": [strong, weak]
""")
    return path


def _finished_runs(tmp_path, pgd_of):
    """A study's output folder with a finished run (metrics.json) of rows ce, strong and weak for
    seeds 0 and 1, PGD R@1 = pgd_of(row, seed)."""
    out = tmp_path / "runs"
    for name in ("ce", "strong", "weak"):
        for seed in (0, 1):
            run = out / name / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "metrics.json").write_text(json.dumps(_metrics(0.3, seed=seed, pgd=pgd_of(name, seed))))
    return out


def _tables_by_the_tool(study_path, out, tmp_path):
    """tools/ablate.py --study ... --table-only: (the Markdown it wrote, the path of its JSON)."""
    import subprocess
    import sys

    tool = repo_configs_dir().parent / "tools" / "ablate.py"
    js, md = tmp_path / "s.json", tmp_path / "s.md"
    done = subprocess.run([sys.executable, str(tool), "-q", "--study", str(study_path), "--out", str(out),
                           "--table-only", "--json", str(js), "--table", str(md)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return md.read_text(), js


def test_a_study_file_names_its_rows_seeds_and_tables(tmp_path):
    from keras_irtf.config import ConfigError, load_config

    study = A.load_study(_study_file(tmp_path))
    assert study.seeds == [0, 1] and study.baseline == "ce"
    assert study.tables == {"First": ["ce", "strong"], "Second": ["ce", "strong", "weak"]}
    assert study.jobs()[:3] == [("ce", 0, ["ga.methods="]), ("strong", 0, ["ga.methods=pgd", "ga.pgd.steps=2"]),
                                ("weak", 0, ["ga.methods=fgsm"])]
    assert len(study.jobs()) == 6 and [j[1] for j in study.jobs(seeds=[4])] == [4, 4, 4]
    # a share of the rows, in the study's order whatever the order asked
    assert [(r, k) for r, k, _ in study.jobs(rows=["weak", "ce"])] == [("ce", 0), ("weak", 0), ("ce", 1), ("weak", 1)]
    with pytest.raises(ValueError, match=r"unknown row\(s\) \['wek'\]"):
        study.jobs(rows=["wek"])
    # training reads the same file as a config (its study: block ignored)
    assert load_config([study.path]).train.steps == 300
    with pytest.raises(ConfigError, match=r"study.rows.typo: .*unknown key ga.pgd.stepz"):
        A.load_study(_study_file(tmp_path, '\n    typo: {label: x, set: ["ga.methods=pgd", "ga.pgd.stepz=2"]}'))
    path = _study_file(tmp_path)
    path.write_text(path.read_text().replace("tested: [pgd R@1]", "tested: [PGD]"))
    with pytest.raises(ConfigError, match=r"study.tested: unknown column\(s\) \['PGD'\]"):
        A.load_study(path)


def test_a_finished_study_is_tabulated_not_retrained(tmp_path):
    study_path = _study_file(tmp_path)
    out = _finished_runs(tmp_path, lambda name, seed: {"ce": 0.10, "strong": 0.30, "weak": 0.12}[name] + 0.01 * seed)
    logged = []
    results = A.run_study(A.load_study(study_path), out, robustness=False, log=logged.append)
    assert logged == [] and sorted(results) == ["ce", "strong", "weak"]
    text, js = _tables_by_the_tool(study_path, out, tmp_path)
    assert "## First" in text and "## Second" in text
    assert "| loss | seeds | R@1 | PGD 4/255 R@1 | WHM |" in text  # the study's columns only
    assert "| the strong one | 2 |" in text and "| Δ PGD 4/255 R@1 | verdict | Holm verdict |" in text
    assert "1 rows x 1 columns" in text and "2 rows x 1 columns" in text
    # the JSON alone regenerates the same tables
    assert A.tables_markdown(json.loads(js.read_text()), source=str(js)) == text


def test_a_table_with_no_finished_row_beside_the_baseline_is_left_out(tmp_path):
    """A study trained a share of rows at a time: a table whose rows have no finished run but
    the baseline's is not written (it would be a lone L_CE row); the others show their finished
    rows only."""
    study = A.load_study(_study_file(tmp_path))
    ce, weak = [_metrics(0.30, seed=0, pgd=0.1)], [_metrics(0.31, seed=0, pgd=0.12)]
    assert A.study_tables(study, {"ce": ce, "weak": weak}) == {"Second": {"ce": ce, "weak": weak}}
    assert A.study_tables(study, {"ce": ce}) == {}
    assert list(A.study_tables(study, {"weak": weak})) == ["Second"]  # no baseline yet: shown, untested


def test_only_complete_tables_are_published_and_the_missing_seeds_named(tmp_path):
    """--complete: a table is written only when each of its rows (the baseline too) has every
    seed of the study; the tables left out are named with the seeds still to train."""
    import shutil
    import subprocess
    import sys

    study_path = _study_file(tmp_path)
    out = _finished_runs(tmp_path, lambda name, seed: {"ce": 0.10, "strong": 0.30, "weak": 0.12}[name] + 0.01 * seed)
    shutil.rmtree(out / "weak" / "seed1")  # "Second" (strong, weak) misses weak's seed 1; "First" is complete
    study = A.load_study(study_path)
    results = A.collect(out, list(study.rows))
    assert A.missing_seeds(study, results) == {"Second": {"weak": [1]}}
    assert list(A.study_tables(study, results)) == ["First", "Second"]
    assert list(A.study_tables(study, results, complete=True)) == ["First"]
    shutil.rmtree(out / "ce" / "seed0")  # the baseline misses a seed: no table is complete
    results = A.collect(out, list(study.rows))
    assert A.study_tables(study, results, complete=True) == {}
    assert A.missing_seeds(study, results) == {"First": {"ce": [0]}, "Second": {"ce": [0], "weak": [1]}}
    tool = repo_configs_dir().parent / "tools" / "ablate.py"
    done = subprocess.run([sys.executable, str(tool), "-q", "--study", str(study_path), "--out", str(out),
                           "--table-only", "--complete"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(no table has every seed of each of its rows yet)"
    assert "left out (seeds still to train): First: ce 0" in done.stderr
    assert "left out (seeds still to train): Second: ce 0; weak 1" in done.stderr
    done = subprocess.run([sys.executable, str(tool), "-q", "--config", str(study_path), "--complete"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--complete is for --study" in done.stderr


def test_a_study_adds_attacks_beside_the_ablations_own(tmp_path):
    from keras_irtf.config import ConfigError

    path = _study_file(tmp_path)
    plain = A.load_study(path)
    assert plain.robustness == A.ABLATION_LEVELS
    path.write_text(path.read_text() + "  robustness:\n    apgd: [4/255]\n    pgd: [0.0157, 8/255]\n"
                    "    apgd_queries: 800\n")
    study = A.load_study(path)
    assert study.robustness["apgd"] == (4 / 255,) and study.apgd_queries == 800 and plain.apgd_queries is None
    # 0.0157 is 4/255 as robustness.json names it: one level, not two
    assert study.robustness["pgd"] == (4 / 255, 8 / 255) and study.robustness["noise"] == A.ABLATION_LEVELS["noise"]
    for bad, match in (("    apgd: [fast]\n", r"study.robustness.apgd: expected a list of levels"),
                       ("    apgd: [4/0]\n", r"study.robustness.apgd: expected a list of levels"),
                       ("    blur: [1]\n", r"study.robustness: unknown kind 'blur'"),
                       ("    apgd_queries: 0\n", r"study.robustness.apgd_queries: expected a number")):
        path.write_text(_study_file(tmp_path).read_text() + "  robustness:\n" + bad)
        with pytest.raises(ConfigError, match=match):
            A.load_study(path)


def _finished_run(run, pgd=0.2):
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(_metrics(0.3, pgd=pgd)))
    rob = {"pgd": {A.ATTACK_KEY: {"R@1": pgd}}, "input_grad_l1": 4.0, "input_grad_l2": 1.0,
           "settings": {"levels": {"pgd": [A.ATTACK_KEY]}, "pgd_steps": 10}}
    (run / "robustness.json").write_text(json.dumps(rob))
    return rob


def test_a_missing_attack_is_added_to_a_finished_run_and_the_rest_kept(tmp_path, monkeypatch):
    run = tmp_path / "ce" / "seed0"
    before = _finished_run(run)
    levels = {"pgd": (4 / 255,), "apgd": (4 / 255,)}
    assert A.missing_robustness(run, levels) == {"apgd": [4 / 255]}
    assert A.missing_robustness(tmp_path / "nothing", levels) == {"pgd": [4 / 255], "apgd": [4 / 255],
                                                                   "input_grad": [True]}
    (run / "model.keras").write_bytes(b"weights")
    calls = []

    def evaluate(exp, model, levels, input_grad, apgd_queries):
        calls.append((levels, input_grad, apgd_queries))
        return {"clean": {"R@1": 0.3}, "apgd": {A.ATTACK_KEY: {"R@1": 0.05}},
                "settings": {"levels": {"apgd": [A.ATTACK_KEY]}, "apgd_steps": 50}}

    monkeypatch.setattr(A.Experiment, "from_run", classmethod(lambda cls, *a, **k: (None, None)))
    monkeypatch.setattr(A, "robustness_of", evaluate)
    merged = A.run_robustness(run, None, None, levels)
    assert calls == [({"apgd": [4 / 255]}, False, None)]  # only what was missing; the gradient norms kept
    assert merged["pgd"] == before["pgd"] and merged["input_grad_l1"] == 4.0
    assert merged["apgd"][A.ATTACK_KEY]["R@1"] == 0.05
    assert merged["settings"]["levels"] == {"pgd": [A.ATTACK_KEY], "apgd": [A.ATTACK_KEY]}
    assert merged["settings"]["pgd_steps"] == 10 and merged["settings"]["apgd_steps"] == 50
    assert json.loads((run / "robustness.json").read_text()) == merged
    assert A.missing_robustness(run, levels) == {}
    assert A.run_robustness(run, None, None, levels) == merged and len(calls) == 1  # nothing left to add
    # APGD over every query is not APGD over 800: asking for the subset evaluates it again
    assert A.missing_robustness(run, levels, apgd_queries=800) == {"apgd": [4 / 255]}


def test_a_run_without_its_weights_is_named_not_retrained(tmp_path):
    path = _study_file(tmp_path)
    path.write_text(path.read_text() + "  robustness:\n    apgd: [4/255]\n")
    out = tmp_path / "runs"
    kept = {}
    for name in ("ce", "strong", "weak"):
        for seed in (0, 1):
            _finished_run(out / name / f"seed{seed}")
            kept[(name, seed)] = (out / name / f"seed{seed}" / "robustness.json").read_text()
    logged = []
    results = A.run_study(A.load_study(path), out, log=logged.append)
    assert len(logged) == 6 and sorted(results) == ["ce", "strong", "weak"]
    assert all("lacks [" in line and "'apgd'" in line and "weights are not in its folder" in line for line in logged)
    assert all((out / n / f"seed{k}" / "robustness.json").read_text() == text for (n, k), text in kept.items())
    assert not any(out.rglob(".running"))


def test_ablate_ctrl_c_is_one_line_naming_the_backup_and_the_command(monkeypatch, capsys):
    """tools/ablate.py stopped by Ctrl-C mid-training: no traceback, exit status 130, one line with
    the step the run in training was backed up at and the command that resumes."""
    from conftest import load_tool
    from keras_irtf import cli
    from keras_irtf.training.interrupt import TrainingInterrupted

    tool = load_tool("ablate")

    def interrupted(argv):
        raise TrainingInterrupted("SIGINT", step=1900, backup_step=1900, backup_dir="ablations/x/ce/seed1/backup")

    def exit_now(code):
        raise SystemExit(code)

    monkeypatch.setattr(tool, "main", interrupted)
    monkeypatch.setattr(cli, "exit_now", exit_now)
    with pytest.raises(SystemExit) as stopped:
        tool.run(["--study", "configs/css_ga_study.yaml", "--rows", "ce"])
    assert stopped.value.code == 130
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith("ablation interrupted (the run in training backed up at step 1900); finished runs are kept")
    assert err.endswith("ablate.py --study configs/css_ga_study.yaml --rows ce`")


def test_a_runs_record_names_the_cpu_it_trained_on():
    m = _metrics(0.3)
    m["machine"] = {"load_1min_start": 1.5, "load_1min_end": 2.0, "cpus": 2, "cpu": "Some CPU, AVX-512"}
    rec = A.record(m)
    assert rec["cpu"] == "Some CPU, AVX-512" and rec["load_1min"] == [1.5, 2.0]
    assert "cpu" not in A.record(_metrics(0.3))
    model = A.cpu_model()
    assert model is None or (model and "\n" not in model)


def test_pairs_across_cpus_are_named_under_the_table():
    def run(r1, seed, cpu):
        m = _metrics(r1, seed=seed, pgd=0.2)
        m["machine"] = {"load_1min_start": 1.0, "load_1min_end": 1.0, "cpus": 2, "cpu": cpu}
        return m

    same = {"ce": [run(0.30, k, "A") for k in range(3)], "gaa": [run(0.32 + 0.01 * k, k, "A") for k in range(3)]}
    assert "different CPUs" not in A.ablation_table(same)
    mixed = {"ce": same["ce"], "gaa": [run(0.32, 0, "A"), run(0.33, 1, "B"), run(0.34, 2, "B")]}
    assert A.paired_tests(mixed)["gaa"]["cross_cpu_seeds"] == [1, 2]
    assert A.ablation_table(mixed).endswith("trained on different CPUs (a seed is reproducible on one CPU only): "
                                            "L_CE + L_GA^A: seeds 1, 2.")


def test_rows_tested_against_each_other_are_their_own_holm_family():
    """contrast_tests: the first row minus the second, paired by seed (not by order), each pair's
    p-values adjusted over the pairs x the tested columns only, not with the baseline tests."""
    from keras_irtf.evaluation.stats import holm_adjust, paired_t_test

    ce = [_metrics(0.30, seed=s, pgd=0.10 + 0.01 * s) for s in range(4)]
    gaa = [_metrics(0.30 + 0.002 * s, seed=s, pgd=0.30 + 0.01 * s + 0.004 * (-1) ** s) for s in range(4)]
    pgd = [_metrics(0.29, seed=s, pgd=0.33 + 0.01 * s + 0.002 * (s % 2)) for s in (3, 1, 0, 2)]  # out of order
    fgsm = [_metrics(0.30, seed=s, pgd=0.25 + 0.01 * s + 0.003 * (s == 2)) for s in range(4)]
    results = {"ce": ce, "gaa": gaa, "pgd": pgd, "fgsm": fgsm}
    tested = ["R@1", "pgd R@1"]
    got = A.contrast_tests(results, [("gaa", "pgd"), ("gaa", "fgsm")], tested=tested)
    assert list(got) == [("gaa", "pgd"), ("gaa", "fgsm")]
    by_seed = {name: {m["seed"]: A.record(m) for m in runs} for name, runs in results.items()}
    ps = []
    for a, b in got:
        for c in tested:
            want = paired_t_test(np.array([by_seed[a][s][c] for s in range(4)]),
                                 np.array([by_seed[b][s][c] for s in range(4)]))
            assert got[(a, b)][c]["mean"] == pytest.approx(want["mean"])
            assert got[(a, b)][c]["p"] == pytest.approx(want["p"])
            ps.append(want["p"])
    # by hand: -3 + 0.4 (-1)^s - 0.2 (s % 2) points = -2.6, -3.6, -2.6, -3.6 on seeds 0-3
    assert got[("gaa", "pgd")]["pgd R@1"]["mean"] == pytest.approx(-3.1)
    assert got[("gaa", "pgd")]["R@1"]["mean"] == pytest.approx(1.3)  # +1.0, +1.2, +1.4, +1.6 points
    assert got[("gaa", "fgsm")]["pgd R@1"]["mean"] > 0
    # Holm over the 2 pairs x 2 columns, not with the 3 rows' tests against L_CE
    np.testing.assert_allclose([got[k][c]["p_holm"] for k in got for c in tested], holm_adjust(ps))
    assert A.paired_tests(results, tested=tested)["gaa"]["pgd R@1"]["p_holm"] != pytest.approx(
        got[("gaa", "pgd")]["pgd R@1"]["p_holm"])
    assert got[("gaa", "pgd")]["holm_verdict"].startswith("R@1 higher (Holm p=")
    assert "PGD 4/255 R@1 lower (Holm p=" in got[("gaa", "pgd")]["holm_verdict"]
    with pytest.raises(ValueError, match=r"row\(s\) \['pgd_half'\] have no runs"):
        A.contrast_tests(results, [("gaa", "pgd_half")], tested=tested)
    table = A.ablation_table(results, tested=tested, contrasts=[("gaa", "pgd"), ("gaa", "fgsm"), ("gaa", "absent")])
    assert "Row against row (the first row minus the second" in table
    assert "the family being these 4 tests: 2 pairs x 2 columns" in table
    assert "| L_CE + L_GA^A minus pgd | 4 |" in table and "absent" not in table


def test_a_study_names_its_contrasts_and_tabulates_them_under_the_tables_holding_both(tmp_path):
    from keras_irtf.config import ConfigError

    path = _study_file(tmp_path)
    path.write_text(path.read_text() + "  contrasts: [[strong, weak]]\n")
    study = A.load_study(path)
    assert study.contrasts == [("strong", "weak")]
    for bad, message in (("[[strong, wek]]", r"\[strong, wek\]: .*unknown row\(s\) \['wek'\]"),
                         ("[[strong, strong]]", r"\[strong, strong\]: expected two different rows"),
                         ("[strong, weak]", r"study.contrasts: expected a list of row pairs")):
        wrong = tmp_path / "wrong.yaml"
        wrong.write_text(path.read_text().replace("contrasts: [[strong, weak]]", f"contrasts: {bad}"))
        with pytest.raises(ConfigError, match=message):
            A.load_study(wrong)
    # strong minus weak: +17 points on seed 0, +19 on seed 1
    out = _finished_runs(tmp_path, lambda name, seed: {"ce": 0.10, "strong": 0.30, "weak": 0.13}[name]
                         + (0.01 + 0.02 * (name == "strong")) * seed)
    text, js = _tables_by_the_tool(path, out, tmp_path)
    first, second = text.split("## Second")
    assert "Row against row" not in first  # "First" holds only the strong row
    assert "Row against row" in second and "| the strong one minus the weak one | 2 | +18.0 [" in second
    assert json.loads(js.read_text())["contrasts"] == [["strong", "weak"]]
    assert A.tables_markdown(json.loads(js.read_text()), source=str(js)) == text


def test_validation_columns_get_paired_differences_with_intervals_and_no_test():
    """validation=[val R@1]: each row's paired difference to the baseline on the validation split,
    mean and 95% interval as paired_t_test gives them, with no p-value, verdict or Holm family
    (settings are chosen there, not tested)."""
    from keras_irtf.evaluation.stats import paired_t_test

    def run(r1, val, seed):
        m = _metrics(r1, seed=seed, pgd=0.2)
        m["val"] = {"R@1": val}
        return m

    ce = [run(0.30, 0.80 + 0.01 * s, s) for s in range(4)]
    # validation R@1 below L_CE's by 5, 6, 5, 7 points (seed order; given out of order)
    noisy = [run(0.30, 0.80 + 0.01 * s - d, s) for s, d in ((2, 0.05), (0, 0.05), (3, 0.07), (1, 0.06))]
    mild = [run(0.31, 0.80 + 0.01 * s + 0.01 * (-1) ** s, s) for s in range(4)]
    results = {"ce": ce, "noisy": noisy, "mild": mild}
    tested = ["R@1", "pgd R@1"]
    plain = A.ablation_table(results, tested=tested)
    table = A.ablation_table(results, tested=tested, validation=["val R@1"])
    # the tables before it are the same with or without it (no new member of their Holm family)
    assert "validation split" not in plain and table.startswith(plain)
    extra = table[len(plain):]
    want = paired_t_test(np.array([0.75, 0.75, 0.77, 0.76]) * 100, np.array([0.80, 0.81, 0.82, 0.83]) * 100)
    assert want["mean"] == pytest.approx(-5.75) and want["ci"][1] < 0
    assert f"| noisy | 4 | {want['mean']:+.1f} [{want['ci'][0]:+.1f}, {want['ci'][1]:+.1f}] |" in extra
    assert "| mild | 4 | +0.0 [" in extra
    rows = [line for line in extra.splitlines() if line.startswith("|")]
    assert rows[0] == "| loss | pairs | Δ val R@1 |" and len(rows) == 4
    assert not any("p=" in line or "lower" in line or "higher" in line for line in rows)
    with pytest.raises(ValueError, match=r"validation: unknown column\(s\) \['val R@5'\]"):
        A.ablation_table(results, validation=["val R@5"])


def test_a_study_names_its_validation_columns_and_the_tool_keeps_them_in_the_json(tmp_path):
    from keras_irtf.config import ConfigError

    path = _study_file(tmp_path)
    path.write_text(path.read_text() + "  validation: [R@1]\n")
    assert A.load_study(path).validation == ["R@1"]
    for bad, message in (("validation: R@1", r"study.validation: expected a list of column names"),
                         ("validation: [R@2]", r"study.validation: unknown column\(s\) \['R@2'\]"),
                         ("validation: [pgd R@1]", r"study.validation: \['pgd R@1'\] also tested")):
        wrong = tmp_path / "wrong.yaml"
        wrong.write_text(path.read_text().replace("validation: [R@1]", bad))
        with pytest.raises(ConfigError, match=message):
            A.load_study(wrong)
    out = _finished_runs(tmp_path, lambda name, seed: 0.2 + 0.1 * seed)
    text, js = _tables_by_the_tool(path, out, tmp_path)
    assert text.count("On the validation split, for choosing settings") == 2  # under both tables
    assert "| the weak one | 2 | +0.0 [+0.0, +0.0] |" in text  # the same R@1 as L_CE on both seeds
    data = json.loads(js.read_text())
    assert data["validation"] == ["R@1"]
    assert A.tables_markdown(data, source=str(js)) == text


def _runs_folder(folder, runs):
    """Finished runs {(row, seed): PGD R@1} in `folder`, each with the CPU named after the folder."""
    for (name, seed), pgd in runs.items():
        run = folder / name / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps(_metrics(0.3, seed=seed, pgd=pgd)))
        (run / "machine.json").write_text(json.dumps({"cpu": folder.name, "cpus": 2}))
    return folder


def test_tables_across_run_folders_take_each_seed_of_a_table_from_one_folder(tmp_path):
    """Several run folders (one per CPU): for each table and seed, every row's run comes from the
    first folder that has them all, so no pair crosses folders; a seed no folder has whole is missing."""
    study = A.load_study(_study_file(tmp_path))
    first = A.collect(_runs_folder(tmp_path / "cpuA", {("ce", 0): 0.10, ("strong", 0): 0.30, ("weak", 0): 0.15,
                                                       ("ce", 1): 0.12, ("strong", 1): 0.33}), list(study.rows))
    second = A.collect(_runs_folder(tmp_path / "cpuB", {("ce", 1): 0.50, ("strong", 1): 0.70, ("weak", 1): 0.55,
                                                        ("strong", 0): 0.99}), list(study.rows))

    def chosen(tables, title):
        return {name: [(A.record(m)["seed"], A.record(m)["cpu"]) for m in runs] for name, runs in tables[title].items()}

    tables = A.study_tables(study, [first, second], complete=True)
    # "First" (ce, strong) has both seeds whole in cpuA, the first folder; "Second" lacks weak seed 1 there
    assert chosen(tables, "First") == {"ce": [(0, "cpuA"), (1, "cpuA")], "strong": [(0, "cpuA"), (1, "cpuA")]}
    assert chosen(tables, "Second") == {name: [(0, "cpuA"), (1, "cpuB")] for name in ("ce", "strong", "weak")}
    tests = A.paired_tests(tables["Second"], tested=["pgd R@1"])
    assert all(t["cross_cpu_seeds"] == [] for t in tests.values())
    assert tests["strong"]["pgd R@1"]["mean"] == pytest.approx(20.0)  # +20 points on both seeds, each within its CPU
    assert A.missing_seeds(study, [first, second]) == {}
    # one folder alone: "Second" misses weak's seed 1 and is not published; the other order prefers cpuB
    assert A.missing_seeds(study, [first]) == {"Second": {"weak": [1]}}
    assert list(A.study_tables(study, [first], complete=True)) == ["First"]
    assert chosen(A.study_tables(study, [second, first], complete=True), "First")["strong"] == [(0, "cpuA"),
                                                                                             (1, "cpuB")]
    # without complete, a seed no folder has whole comes from the folder with the most rows of it
    partial = A.study_tables(study, [second, first], complete=False)
    assert chosen(partial, "Second") == {"ce": [(0, "cpuA"), (1, "cpuB")], "strong": [(0, "cpuA"), (1, "cpuB")],
                                         "weak": [(0, "cpuA"), (1, "cpuB")]}
    assert chosen(A.study_tables(study, [second], complete=False), "Second") == {
        "ce": [(1, "cpuB")], "strong": [(0, "cpuB"), (1, "cpuB")], "weak": [(1, "cpuB")]}


def test_the_tool_reads_more_run_folders_and_keeps_the_pairs_within_each(tmp_path):
    import subprocess
    import sys

    path = _study_file(tmp_path)
    out = _runs_folder(tmp_path / "cpuA", {("ce", 0): 0.10, ("strong", 0): 0.30, ("weak", 0): 0.15,
                                           ("ce", 1): 0.12, ("strong", 1): 0.33})
    more = _runs_folder(tmp_path / "cpuB", {("ce", 1): 0.50, ("strong", 1): 0.70, ("weak", 1): 0.55})
    tool = repo_configs_dir().parent / "tools" / "ablate.py"

    def ablate(*extra):
        return subprocess.run([sys.executable, str(tool), "-q", "--study", str(path), "--out", str(out), "--table-only",
                               "--complete", *extra], capture_output=True, text=True, timeout=300)

    alone = ablate()
    assert alone.returncode == 0 and "## Second" not in alone.stdout
    assert "left out (seeds still to train): Second: weak 1" in alone.stderr
    js = tmp_path / "both.json"
    both = ablate("--runs-from", str(more), "--json", str(js))
    assert both.returncode == 0, both.stderr
    assert "## Second" in both.stdout and "left out" not in both.stderr and "different CPUs" not in both.stdout
    data = json.loads(js.read_text())
    assert [r["cpu"] for r in data["tables"]["Second"]["weak"]["runs"]] == ["cpuA", "cpuB"]
    assert "--runs-from" in data["about"]["command"]
    for bad, message in (([str(out)], "other than --out (it is --out)"),
                         ([str(tmp_path / "nowhere")], "(no such folder)")):
        wrong = ablate("--runs-from", *bad)
        assert wrong.returncode == 2 and message in wrong.stderr


def test_keep_results_copies_finished_runs_result_files_and_never_overwrites(tmp_path):
    import subprocess
    import sys

    from keras_irtf.evaluation.robustness import level_key

    path = _study_file(tmp_path)
    study = A.load_study(path)
    out = tmp_path / "runs"

    def run(name, seed, robust=True):
        folder = out / name / f"seed{seed}"
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(_metrics(0.3, seed=seed)))
        (folder / "config.yaml").write_text(f"train:\n  seed: {seed}\n")
        (folder / "machine.json").write_text(json.dumps({"cpu": "A"}))
        (folder / "model.keras").write_bytes(b"weights")
        if robust:
            done = {kind: {level_key(kind, v): {"R@1": 0.1} for v in levels} for kind, levels in study.robustness.items()}
            (folder / "robustness.json").write_text(json.dumps({**done, "input_grad_l1": 1.0}))

    run("ce", 0), run("strong", 0), run("weak", 0, robust=False), run("strong", 1)
    dest = tmp_path / "evidence"
    (dest / "strong" / "seed1").mkdir(parents=True)
    (dest / "strong" / "seed1" / "metrics.json").write_text("{}\n")  # someone else's file
    got = A.keep_results(study, out, dest)
    assert got == {"copied": ["ce/seed0", "strong/seed0"], "kept": [], "conflicts": ["strong/seed1: metrics.json"]}
    assert sorted(p.name for p in (dest / "ce" / "seed0").iterdir()) == sorted(A.RESULT_FILES)  # no weights
    assert (dest / "ce" / "seed0" / "metrics.json").read_bytes() == (out / "ce" / "seed0" / "metrics.json").read_bytes()
    assert not (dest / "weak").exists()  # its robustness columns are missing: not finished
    assert (dest / "strong" / "seed1" / "metrics.json").read_text() == "{}\n"  # not overwritten
    assert sorted(p.name for p in (dest / "strong" / "seed1").iterdir()) == ["metrics.json"]  # nothing else copied
    assert A.keep_results(study, out, dest)["kept"] == ["ce/seed0", "strong/seed0"]
    # the tool: exit status 1 and the conflict named; 0 once the conflict is gone
    tool = repo_configs_dir().parent / "tools" / "ablate.py"
    cmd = [sys.executable, str(tool), "-q", "--study", str(path), "--out", str(out), "--table-only",
           "--keep-results", str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "not overwritten (the file in" in done.stderr and "strong/seed1: metrics.json" in done.stderr
    (dest / "strong" / "seed1" / "metrics.json").unlink()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "1 run(s) copied, 2 already there" in done.stderr
