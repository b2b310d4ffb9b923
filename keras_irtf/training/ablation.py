"""The GA paper's ablation grid: train and evaluate every cell over several seeds, then tabulate.

    from keras_irtf.training.ablation import run_ablation, ablation_table
    results = run_ablation(["configs/css_ablation.yaml"], seeds=3, out="ablations/css")
    print(ablation_table(results))

Each (cell, seed) is one training run in `<out>/<cell>/seed<k>/` (config.yaml, model.keras,
metrics.json, logs/). A cell whose metrics.json exists is not re-run, so an interrupted ablation
resumes where it stopped. Runs go seed-major (every cell for seed 0, then seed 1, ...) so that a
partial ablation already has every row.

Cells (the paper's Table: TIRG on CSS):
    ce            L_CE
    ls            L_CE + L_S
    gaa           L_CE + L_GA^A
    gai           L_CE + L_GA^I
    ls_gaa        L_CE + L_S + L_GA^A
    ls_gai        L_CE + L_S + L_GA^I
    gaa_gai       L_CE + L_GA^A + L_GA^I
    all           L_CE + L_S + L_GA^A + L_GA^I
    fgsm, l1, l2  the paper's baselines (FGSM adversarial training, L1 / L2 weight penalties)
and optionally a one-seed sweep of each GA weight over the paper's range (1e-6 .. 1e-2).

A study is a list of rows of one's own instead of the grid: a training config with a `study:`
block (training ignores it) names the seeds, the baseline row, each row's label and overrides,
the tables (each a family for the Holm correction) and the columns shown and tested;
`load_study` reads it, `run_study` trains it, `study_tables` tabulates it (tools/ablate.py
--study FILE). configs/css_ga_study.yaml is one.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path
from typing import Optional

import keras
import numpy as np

from keras_irtf.config import ConfigError, load_config, load_yaml
from keras_irtf.evaluation.robustness import ABLATION_LEVELS, KINDS, level_key, robustness_of
from keras_irtf.evaluation.stats import holm_adjust, paired_t_test
from keras_irtf.experiment import Experiment
from keras_irtf.training.loop import train
from keras_irtf.utils import atomic_write_text, process_alive, read_json, write_json

# (name, label, loss.eta on?, ga.methods)
GRID = (
    ("ce", "L_CE", False, ""),
    ("ls", "L_CE + L_S", True, ""),
    ("gaa", "L_CE + L_GA^A", False, "adversarial"),
    ("gai", "L_CE + L_GA^I", False, "isotropic"),
    ("ls_gaa", "L_CE + L_S + L_GA^A", True, "adversarial"),
    ("ls_gai", "L_CE + L_S + L_GA^I", True, "isotropic"),
    ("gaa_gai", "L_CE + L_GA^A + L_GA^I", False, "adversarial,isotropic"),
    ("all", "L_CE + L_S + L_GA^A + L_GA^I", True, "adversarial,isotropic"),
    ("fgsm", "L_CE + FGSM (baseline)", False, "fgsm"),
    ("l1", "L_CE + L1 (baseline)", False, "l1"),
    ("l2", "L_CE + L2 (baseline)", False, "l2"),
)
CELLS = tuple(c[0] for c in GRID)
SWEEP_VALUES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
# weight swept -> (config key, ga.methods, L_S on?, further overrides)
SWEEPS = {
    "eta": ("loss.eta", "", True, ()),
    "eps": ("ga.adversarial.eps", "adversarial", False, ()),
    "gamma": ("ga.isotropic.gamma", "isotropic", False, ("ga.isotropic.noise_scaling=per_element",)),
    "gamma_mean": ("ga.isotropic.gamma", "isotropic", False, ("ga.isotropic.noise_scaling=mean",)),  # the authors' 1/size
}


def cell_overrides(name: str, eta: float) -> list:
    """The config overrides of a grid cell; `eta` is the L_S weight used where L_S is on."""
    for cell, _, ls, methods in GRID:
        if cell == name:
            return [f"loss.eta={eta if ls else 0.0}", f"ga.methods={methods}"]
    raise ValueError(f"unknown ablation cell {name!r}; expected one of {list(CELLS)}")


def sweep_cells(weights=tuple(SWEEPS), values=SWEEP_VALUES):
    """[(cell name, label, overrides)] of the one-seed weight sweep."""
    out = []
    for w in weights:
        if w not in SWEEPS:
            raise ValueError(f"unknown sweep weight {w!r}; expected one of {list(SWEEPS)}")
        key, methods, _, extra = SWEEPS[w]
        for v in values:
            out.append((f"sweep_{w}_{v:g}", f"{w} = {v:g}", [f"{key}={v}", f"ga.methods={methods}"]
                        + ([] if w == "eta" else ["loss.eta=0.0"]) + list(extra)))
    return out


SWEEP_LABELS = {"eta": "L_CE + L_S, eta {v}", "eps": "L_CE + L_GA^A, eps {v}",
                "gamma": "L_CE + L_GA^I, gamma {v} per element", "gamma_mean": "L_CE + L_GA^I, gamma {v} / size"}


def _label(name):
    for cell, label, _, _ in GRID:
        if cell == name:
            return label
    for weight in sorted(SWEEPS, key=len, reverse=True):  # gamma_mean before gamma
        prefix = f"sweep_{weight}_"
        if name.startswith(prefix):
            return SWEEP_LABELS[weight].format(v=name[len(prefix):])
    return name


def run_ablation(config_paths, seeds=3, out="ablations/css", cells=CELLS, overrides=(), sweep=(),
                 sweep_values=SWEEP_VALUES, sweep_seed=0, verbose=True, log=print, robustness=True,
                 sweep_seeds=None):
    """Train and evaluate the grid (and the optional sweep); returns {cell: [metrics per seed]}.

    `overrides` apply to every run (e.g. "train.steps=300"); the L_S weight of the cells that use
    L_S is the config's loss.eta (1e-3 if the config leaves it at 0). `robustness`: also write
    each run's robustness.json (keras_irtf.evaluation.robustness, ABLATION_LEVELS: noise 8/255,
    FGSM and PGD-10 at 4/255, the input-gradient norms); a finished run without it gets only
    that. `sweep_seeds`: the seeds of the sweep's runs (default: [sweep_seed])."""
    out = Path(out)
    base = load_config(config_paths, list(overrides))
    eta = base.loss.eta or 1e-3
    jobs = []
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    for seed in seed_list:
        for cell in cells:
            jobs.append((cell, seed, cell_overrides(cell, eta)))
    sweep_seed_list = list(sweep_seeds) if sweep_seeds is not None else [sweep_seed]
    for seed in sweep_seed_list:
        for cell, _, ov in sweep_cells(sweep, sweep_values) if sweep else []:
            jobs.append((cell, seed, ov))

    _run_jobs(config_paths, jobs, out, overrides, robustness, verbose, log)
    return collect(out, [j[0] for j in jobs])


def missing_robustness(run, levels=ABLATION_LEVELS, apgd_queries=None) -> dict:
    """{kind: [levels]} of `levels` that <run>/robustness.json does not hold yet (all of them when
    there is no such file; "input_grad": [True] when the input-gradient norms are missing). APGD
    levels evaluated on another number of queries than `apgd_queries` count as missing."""
    path = Path(run) / "robustness.json"
    if not path.is_file():
        return {**{k: list(v) for k, v in levels.items()}, "input_grad": [True]}
    done = read_json(path)
    if done.get("settings", {}).get("apgd_queries_asked", None) != apgd_queries:
        done.pop("apgd", None)
    missing = {k: [v for v in vs if level_key(k, v) not in done.get(k, {})] for k, vs in levels.items()}
    missing = {k: vs for k, vs in missing.items() if vs}
    if "input_grad_l1" not in done:
        missing["input_grad"] = [True]
    return missing


def _run_jobs(config_paths, jobs, out, overrides=(), robustness=True, verbose=True, log=print,
              levels=ABLATION_LEVELS, apgd_queries=None):
    """Train (and evaluate the robustness of) each (cell, seed, overrides) job that has not been
    done yet, in order, logging progress and an estimate of the time left: each remaining job is
    counted at its own row's mean duration so far in this process (the mean of all finished jobs
    for a row not seen yet). A finished run whose robustness.json lacks some of `levels` gets
    only those evaluated and added, when its weights are in its folder."""
    out = Path(out)
    unable = set()  # runs whose missing columns cannot be added (no weights kept)

    def needed(cell, seed):
        run = out / cell / f"seed{seed}"
        return (not (run / "metrics.json").is_file(),
                robustness and (cell, seed) not in unable and bool(missing_robustness(run, levels, apgd_queries)))

    dataset = None
    durations = {}  # row -> [seconds of each job this process finished]
    for i, (cell, seed, ov) in enumerate(jobs):
        run = out / cell / f"seed{seed}"
        need_train, need_robust = needed(cell, seed)
        if not need_train and not need_robust:
            continue
        if not need_train and not _has_weights(run):
            unable.add((cell, seed))
            log(f"[{i + 1}/{len(jobs)}] {cell} seed {seed}: {run / 'robustness.json'} lacks "
                f"{sorted(missing_robustness(run, levels, apgd_queries))}, and the run's weights are not in its "
                f"folder to add them: move the folder away to train the run again, or leave the column empty")
            continue
        lock = _claim(run)
        if lock is None:
            log(f"[{i + 1}/{len(jobs)}] {cell} seed {seed}: another worker is training it, skipped")
            continue
        try:
            cfg = load_config(config_paths, list(overrides) + ov + [f"train.seed={seed}", f"train.out={run}"])
            if dataset is None:  # every cell shares the dataset (and its preprocessing)
                dataset = Experiment(cfg, verbose=verbose).dataset
            keras.backend.clear_session()
            job_start = start = time.time()
            if need_train:
                log(f"[{i + 1}/{len(jobs)}] {cell} seed {seed}: training ({' '.join(ov)})")
                load = _load()
                _, metrics = train(cfg, verbose=0, dataset=dataset)
                write_json(run / "machine.json", {"load_1min_start": load, "load_1min_end": _load(),
                                                  "cpus": os.cpu_count(), "cpu": cpu_model()})
                log(f"[{i + 1}/{len(jobs)}] {cell} seed {seed}: test R@1 {metrics['test']['R@1']:.3f}, "
                    f"WHM {metrics['whm']['value']:.3f} ({time.time() - start:.0f} s)")
            if need_robust:
                start = time.time()
                rob = run_robustness(run, cfg, dataset, levels, apgd_queries)
                log(f"[{i + 1}/{len(jobs)}] {cell} seed {seed}: robustness: PGD 4/255 R@1 "
                    f"{rob['pgd'][ATTACK_KEY]['R@1']:.3f}, ||dL/dx||_1 {rob['input_grad_l1']:.3g} "
                    f"({time.time() - start:.0f} s)")
            durations.setdefault(cell, []).append(time.time() - job_start)
            left = [c for c, k, _ in jobs[i + 1:] if any(needed(c, k))]
            log(f"[{i + 1}/{len(jobs)}] {len(left)} job(s) left, about {eta_minutes(durations, left):.0f} min "
                f"at this process's pace (other workers may take some)")
        finally:
            lock.unlink(missing_ok=True)  # owned: the lock _claim created for this process


def eta_minutes(durations: dict, left: list) -> float:
    """Minutes for the jobs of rows `left`: each at its row's mean duration in `durations` {row:
    [seconds]}, a row without one at the mean of every finished job."""
    every = [d for ds in durations.values() for d in ds]
    if not every:
        return float("nan")
    overall = float(np.mean(every))
    return sum(float(np.mean(durations[c])) if c in durations else overall for c in left) / 60.0


def cpu_model() -> Optional[str]:
    """The processor's model name and whether it has AVX-512 (Linux's /proc/cpuinfo), or None:
    training is deterministic for a seed on one CPU, but another CPU's kernels round differently,
    so runs are compared within one machine."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    name = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    wide = flags is not None and "avx512f" in flags.group(1).split()
    return f"{name.group(1).strip() if name else 'unknown'}{', AVX-512' if wide else ''}"


def _load():
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _has_weights(run) -> bool:
    return (Path(run) / "model.keras").is_file()


def run_robustness(run, cfg, dataset, levels=ABLATION_LEVELS, apgd_queries=None) -> dict:
    """The robustness columns `levels` of one finished run -> <run>/robustness.json; the levels
    that file holds already are kept and not evaluated again (APGD's when it attacked as many
    queries as `apgd_queries` asks)."""
    run = Path(run)
    missing = missing_robustness(run, levels, apgd_queries)
    input_grad = bool(missing.pop("input_grad", None))
    result = read_json(run / "robustness.json") if (run / "robustness.json").is_file() else {}
    if not missing and not input_grad:
        return result
    if "apgd" in missing:  # evaluated again in full: another query count's figures are dropped
        result.pop("apgd", None)
        result.pop("apgd_subset_clean", None)
        result.get("settings", {}).get("levels", {}).pop("apgd", None)
    exp, model = Experiment.from_run(run, verbose=False, dataset=dataset)  # the ablation's shared dataset
    new = robustness_of(exp, model, levels=missing, input_grad=input_grad, apgd_queries=apgd_queries)
    settings = {**result.get("settings", {}), **new["settings"]}
    settings["levels"] = {**result.get("settings", {}).get("levels", {})}
    for kind, keys in new["settings"]["levels"].items():
        settings["levels"][kind] = sorted(set(settings["levels"].get(kind, [])) | set(keys), key=float)
    for key, value in new.items():
        if key == "settings":
            continue
        if key in KINDS:
            result.setdefault(key, {}).update(value)
        else:  # clean recall (the same on every evaluation), the gradient norms, APGD's queries' clean recall
            result[key] = value
    result["settings"] = settings
    write_json(run / "robustness.json", result)
    return result


def _claim(run: Path):
    """A lock file for one (cell, seed), so that several workers can share an ablation folder;
    None if a live process holds it (a dead holder's lock is taken over)."""
    run.mkdir(parents=True, exist_ok=True)
    lock = run / ".running"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                text = lock.read_text().strip()
            except FileNotFoundError:  # released meanwhile: try again
                continue
            if not text or (text.isdigit() and process_alive(int(text))):
                return None  # alive, or just created by a worker that is writing its id
            lock.unlink(missing_ok=True)  # owned: a stale claim lock (its process is gone)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return lock
    return None


def collect(out, cells=None) -> dict:
    """{cell: [metrics.json of each finished seed, with its robustness.json as "robustness"]}."""
    out = Path(out)
    names = list(dict.fromkeys(cells)) if cells else sorted(p.name for p in out.iterdir() if p.is_dir())
    results = {}
    for name in names:
        runs = sorted((out / name).glob("seed*/metrics.json"))
        if runs:
            results[name] = []
            for p in runs:
                m = read_json(p)
                for extra in ("robustness", "machine"):
                    if (p.parent / f"{extra}.json").is_file():
                        m[extra] = read_json(p.parent / f"{extra}.json")
                m.setdefault("seed", int(p.parent.name[4:]))
                results[name].append(m)
    return results


NOISE_KEY, ATTACK_KEY = "0.0314", "0.0157"  # 8/255 and 4/255, as robustness.level_key writes them


def _get(m, *path, scale=100.0):
    for key in path:
        if not isinstance(m, dict) or key not in m or m[key] is None:
            return float("nan")
        m = m[key]
    return float(m) * scale


def _ga_ratio(m):
    losses = m.get("final_losses", {})
    if "ga_adversarial" not in losses or not losses.get("retrieval_loss"):
        return float("nan")
    return losses["ga_adversarial"] / losses["retrieval_loss"]


# column -> (header, value of one run); percentages except the norm, the ratio and s/step
COLUMNS = {
    "R@1": ("R@1", lambda m: _get(m, "test", "R@1")),
    "R@5": ("R@5", lambda m: _get(m, "test", "R@5")),
    "R@10": ("R@10", lambda m: _get(m, "test", "R@10")),
    "Mt": ("avg (Mt)", lambda m: _get(m, "whm", "Mt")),
    "train R@1": ("train R@1", lambda m: _get(m, "train", "R@1")),
    "Ms": ("train avg (Ms)", lambda m: _get(m, "whm", "Ms")),
    "WHM": ("WHM", lambda m: _get(m, "whm", "value")),
    "shift R@1": ("shift R@1", lambda m: _get(m, "test_shift", "R@1")),
    "val R@1": ("val R@1", lambda m: _get(m, "val", "R@1")),  # held-out training queries (validation)
    "noise R@1": ("noise 8/255 R@1", lambda m: _get(m, "robustness", "noise", NOISE_KEY, "R@1")),
    "fgsm R@1": ("FGSM 4/255 R@1", lambda m: _get(m, "robustness", "fgsm", ATTACK_KEY, "R@1")),
    "pgd R@1": ("PGD 4/255 R@1", lambda m: _get(m, "robustness", "pgd", ATTACK_KEY, "R@1")),
    # the strongest attack: APGD on the cross-entropy and on the DLR margin, the worse per query
    "apgd R@1": ("APGD-CE/DLR 4/255 R@1", lambda m: _get(m, "robustness", "apgd", ATTACK_KEY, "R@1")),
    "grad L1": ("‖dL/dx‖₁", lambda m: _get(m, "robustness", "input_grad_l1", scale=1.0)),
    "GA ratio": ("L_GA^A / L_CE", _ga_ratio),
    "s/step": ("s/step", lambda m: _get(m, "seconds_per_step", scale=1.0)),
    # GA^I: ||noise|| / ||gradient|| of each step, averaged over training
    "noise/grad": ("‖noise‖ / ‖∇L‖", lambda m: _get(m, "training_means", "ga_noise_ratio", scale=1.0)),
}
SIGNIFICANT = {"grad L1": 3, "GA ratio": 2, "s/step": 2, "noise/grad": 2}  # significant digits; others: 1 decimal
# the columns tested against L_CE (paired by seed)
TESTED = ("R@1", "WHM", "shift R@1", "noise R@1", "pgd R@1")


def record(m: dict) -> dict:
    """One run's table entry: its seed and every column's value (None where the run has none),
    with the machine's 1-minute load before and after training and its CPU when the run recorded
    them. A record passed in is returned as it is, so the table functions take either."""
    if "test" not in m:
        return m
    rec = {"seed": m.get("seed")}
    for name, (_, fn) in COLUMNS.items():
        v = fn(m)
        rec[name] = None if np.isnan(v) else round(v, 6)
    machine = m.get("machine") or {}
    if machine:
        rec["load_1min"] = [machine.get("load_1min_start"), machine.get("load_1min_end")]
        if machine.get("cpu"):
            rec["cpu"] = machine["cpu"]
    return rec


def _value(rec, column):
    v = rec.get(column)
    return float("nan") if v is None else float(v)


def summarize(runs: list) -> dict:
    """Each column's values over a cell's runs, in seed order, and the seeds."""
    runs = sorted((record(m) for m in runs), key=lambda r: r.get("seed") or 0)
    s = {"n": len(runs), "seeds": [r.get("seed") for r in runs]}
    for name in COLUMNS:
        s[name] = np.asarray([_value(r, name) for r in runs], dtype=np.float64)
    return s


def _fmt(values, significant=None):
    values = np.asarray(values, np.float64)
    values = values[~np.isnan(values)]  # a run without that column (e.g. no robustness.json yet)
    if values.size == 0:
        return "–"

    def f(v):
        return f"{v:.{significant}g}" if significant else f"{v:.1f}"

    if len(values) == 1:
        return f(values[0])
    return f"{f(values.mean())} ± {f(values.std(ddof=1))}"


def _shown(results):
    """The columns with a value in at least one run."""
    sums = [summarize(runs) for runs in results.values()]
    return [c for c in COLUMNS if any(not np.isnan(s[c]).all() for s in sums)]


def _check_columns(names, what):
    unknown = [c for c in names if c not in COLUMNS]
    if unknown:
        raise ValueError(f"{what}: unknown column(s) {unknown}; the columns: {list(COLUMNS)}")
    return list(names)


def ablation_table(results: dict, baseline="ce", alpha=0.05, columns=None, tested=None, labels=None,
                   contrasts=(), validation=()) -> str:
    """Markdown: one row per cell, every column mean ± sample standard deviation over seeds;
    then, for every cell sharing seeds with the baseline (L_CE), the two-sided paired t-test of
    the tested columns (keras_irtf.evaluation.stats.paired_t_test): mean difference in points,
    its 95% confidence interval, p, and the verdict at `alpha`; and the verdict at Holm-adjusted
    p < `alpha`, the family being every test of that table (its rows x its tested columns).

    columns: the columns shown (default: every column with a value); tested: the columns tested
    (default TESTED, those shown); labels: {cell: row label} (default: the grid's and sweeps');
    contrasts: [(row, other row)] tested against each other the same way (the first minus the
    second, paired by seed), a Holm family of their own; a pair with a row not in `results` is
    left out; validation: columns of a validation split, on which settings are chosen: each row's
    paired difference to the baseline with its 95% interval, in a table of their own with no
    p-value and no verdict (choosing is not testing, and they join no Holm family)."""
    cols = _shown(results) if columns is None else _check_columns(columns, "columns")
    labels = labels or {}

    def label(name):
        return labels.get(name) or _label(name)

    lines = ["| loss | seeds | " + " | ".join(COLUMNS[c][0] for c in cols) + " |",
             "|" + "---|" * (len(cols) + 2)]
    for name, runs in results.items():
        s = summarize(runs)
        lines.append(f"| {label(name)} | {s['n']} | " + " | ".join(_fmt(s[c], SIGNIFICANT.get(c)) for c in cols) + " |")
    tested = [c for c in (TESTED if tested is None else _check_columns(tested, "tested")) if c in cols]
    tests = paired_tests(results, baseline, alpha, tested=tested)
    if tests:
        lines += [""] + _tests_markdown(
            tests, tested, {name: label(name) for name in tests}, "loss",
            f"Paired t-tests against {label(baseline)} (runs paired by seed; difference of the means in "
            f"points, its 95% confidence interval, two-sided p; verdict at p < {alpha}; Holm verdict at "
            f"Holm-adjusted p < {alpha}, the family being the {{family}} tests of this table: "
            f"{len(tests)} rows x {len(tested)} columns):")
    pairs = [(a, b) for a, b in contrasts if a in results and b in results]
    if pairs:
        between = contrast_tests(results, pairs, alpha, tested=tested)
        lines += [""] + _tests_markdown(
            between, tested, {(a, b): f"{label(a)} minus {label(b)}" for a, b in between}, "rows",
            f"Row against row (the first row minus the second, runs paired by seed; difference of the "
            f"means in points, its 95% confidence interval, two-sided p; verdict at p < {alpha}; Holm verdict "
            f"at Holm-adjusted p < {alpha}, the family being these {{family}} tests: {len(between)} pairs x "
            f"{len(tested)} columns):")
    chosen_on = _check_columns(validation, "validation")
    if chosen_on and baseline in results:
        lines += [""] + _validation_markdown(paired_tests(results, baseline, alpha, tested=chosen_on), chosen_on,
                                             label, label(baseline))
    return "\n".join(lines)


def _validation_markdown(tests: dict, columns: list, label, baseline: str) -> list:
    """The lines of the table of paired differences on the validation columns (no p, no verdict)."""
    lines = [f"On the validation split, for choosing settings (not a test: no p-value, no verdict): each row "
             f"minus {baseline}, runs paired by seed; the mean difference in points and its 95% confidence "
             f"interval:", "",
             "| loss | pairs | " + " | ".join(f"Δ {COLUMNS[c][0]}" for c in columns) + " |",
             "|" + "---|" * (len(columns) + 2)]
    for name, t in tests.items():
        lines.append(f"| {label(name)} | {t['pairs']} | " + " | ".join(_difference(t[c], p=False) for c in columns)
                     + " |")
    return lines


def _difference(r: dict, p=True) -> str:
    """One paired_t_test result as a cell: the mean difference, its 95% interval and (p=True) p;
    the mean alone where there is no interval, "–" where there are no pairs."""
    if r["n"] == 0:
        return "–"
    if r["n"] < 2 or np.isnan(r["p"]) or np.isnan(r["ci"][0]):
        return f"{r['mean']:+.1f}"
    return f"{r['mean']:+.1f} [{r['ci'][0]:+.1f}, {r['ci'][1]:+.1f}]" + (f" p={r['p']:.2g}" if p else "")


def _tests_markdown(tests: dict, tested: list, names: dict, first: str, caption: str) -> list:
    """The lines of one table of paired tests (paired_tests or contrast_tests); {family} in the
    caption becomes the number of tests with a Holm-adjusted p."""
    family = sum(1 for t in tests.values() for c in tested if not np.isnan(t[c].get("p_holm", np.nan)))
    header = f"| {first} | pairs | " + " | ".join(f"Δ {COLUMNS[c][0]}" for c in tested) + " | verdict | Holm verdict |"
    lines = [caption.format(family=family), "", header, "|" + "---|" * (len(tested) + 4)]
    for key, t in tests.items():
        lines.append(f"| {names[key]} | {t['pairs']} | " + " | ".join(_difference(t[c]) for c in tested)
                     + f" | {t['verdict']} | {t['holm_verdict']} |")
    crossed = {key: t["cross_cpu_seeds"] for key, t in tests.items() if t.get("cross_cpu_seeds")}
    if crossed:
        lines += ["", "Pairs whose two runs trained on different CPUs (a seed is reproducible on one CPU only): "
                  + "; ".join(f"{names[key]}: seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}"
                              for key, seeds in crossed.items()) + "."]
    return lines


def paired_tests(results: dict, baseline="ce", alpha=0.05, tested=TESTED) -> dict:
    """{cell: {column: paired_t_test(...) with "p_holm", "pairs": n, "verdict": text,
    "holm_verdict": text}} against the baseline, runs paired by seed; a cell sharing fewer than 2
    seeds with it gets no verdict. "p_holm" is Holm-adjusted over every test of this call (every
    cell x every tested column with a p-value: one table's family)."""
    if baseline not in results:
        return {}
    return _paired(results, [(name, name, baseline) for name in results if name != baseline], alpha, tested)


def contrast_tests(results: dict, contrasts, alpha=0.05, tested=TESTED) -> dict:
    """{(row, other): tests as paired_tests gives them} of the first row minus the second, runs
    paired by seed, for each pair of `contrasts` (both rows in `results`); "p_holm" is adjusted
    over every test of this call (the pairs x the tested columns)."""
    missing = sorted({name for pair in contrasts for name in pair} - set(results))
    if missing:
        raise ValueError(f"contrasts: row(s) {missing} have no runs; the rows with runs: {list(results)}")
    return _paired(results, [((a, b), a, b) for a, b in contrasts], alpha, tested)


def _paired(results: dict, comparisons: list, alpha, tested) -> dict:
    """{key: tests} for each (key, row, base row) of `comparisons`: row minus base row, paired by seed."""
    out = {}
    for key, name, other in comparisons:
        base = {r.get("seed"): r for r in map(record, results[other])}
        pairs = [(r, base[r.get("seed")]) for r in sorted(map(record, results[name]), key=lambda r: r.get("seed") or 0)
                 if r.get("seed") in base]
        entry = {"pairs": len(pairs),
                 # seeds whose two runs name different CPUs: their difference carries the CPUs' rounding too
                 "cross_cpu_seeds": [r.get("seed") for r, b in pairs if r.get("cpu") and b.get("cpu")
                                     and r["cpu"] != b["cpu"]]}
        for c in tested:
            a = np.array([_value(r, c) for r, _ in pairs], np.float64)
            b = np.array([_value(r, c) for _, r in pairs], np.float64)
            ok = ~(np.isnan(a) | np.isnan(b))
            entry[c] = paired_t_test(a[ok], b[ok])
        out[key] = entry
    family = [(name, c) for name, entry in out.items() for c in tested
              if entry[c]["n"] >= 2 and not np.isnan(entry[c]["p"])]
    for (name, c), adjusted in zip(family, holm_adjust([out[name][c]["p"] for name, c in family])):
        out[name][c]["p_holm"] = float(adjusted)
    for name, entry in out.items():
        if entry["pairs"] < 2:
            entry["verdict"] = entry["holm_verdict"] = "(one seed: no test)"
            continue
        found, holm = [], []
        for c in tested:
            r = entry[c]
            if r["n"] < 2 or np.isnan(r["p"]):
                continue
            effect = f"{COLUMNS[c][0]} {'higher' if r['mean'] > 0 else 'lower'}"
            if r["p"] < alpha:
                found.append(effect)
            if r["p_holm"] < alpha:
                holm.append(f"{effect} (Holm p={r['p_holm']:.2g})")
        entry["verdict"] = "; ".join(found) if found else "no measurable effect"
        entry["holm_verdict"] = "; ".join(holm) if holm else "no measurable effect"
    return out


# ---- studies: rows of one's own, from a config's `study:` block -----------------------------------
@dataclasses.dataclass
class Study:
    """A study read from a config file's `study:` block (see `load_study`)."""

    path: Path
    seeds: list
    baseline: str
    rows: dict  # name -> (label, [overrides])
    tables: dict  # title -> [row names] (the baseline first)
    shown: Optional[list] = None
    tested: Optional[list] = None
    robustness: dict = dataclasses.field(default_factory=lambda: dict(ABLATION_LEVELS))  # kind -> levels
    apgd_queries: Optional[int] = None  # APGD attacks this many test queries (None: all)
    contrasts: list = dataclasses.field(default_factory=list)  # [(row, other row)] tested against each other
    validation: list = dataclasses.field(default_factory=list)  # columns settings are chosen on (not tested)

    @property
    def labels(self) -> dict:
        return {name: label for name, (label, _) in self.rows.items()}

    def jobs(self, seeds=None, rows=None) -> list:
        """[(row, seed, overrides)], seed-major: every row of seed 0, then of seed 1, ... (so a
        partial study already pairs every row with the baseline). `rows`: only these (a worker's
        or a session's share, in the study's order)."""
        if rows is not None:
            unknown = [r for r in rows if r not in self.rows]
            if unknown:
                raise ValueError(f"{self.path}: unknown row(s) {unknown}; the study's rows: {list(self.rows)}")
        return [(name, seed, list(ov)) for seed in (self.seeds if seeds is None else seeds)
                for name, (_, ov) in self.rows.items() if rows is None or name in rows]


STUDY_KEYS = ("seeds", "baseline", "rows", "tables", "columns", "tested", "robustness", "contrasts", "validation")


def _level(value):
    """A perturbation level from a study file: a non-negative number or a fraction "4/255"; None if neither."""
    if isinstance(value, str) and value.count("/") == 1:
        top, bottom = value.split("/")
        try:
            value = float(top) / float(bottom)
        except (ValueError, ZeroDivisionError):
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        return None
    return float(value)


def load_study(path) -> Study:
    """The `study:` block of a config file:

        study:
          seeds: [0, 1, 2, 3, 4]         # the paired seeds of every row
          baseline: ce                   # the row every other row is tested against
          columns: [R@1, WHM, ...]       # the columns shown (names of ablation.COLUMNS; default all)
          tested: [R@1, WHM, ...]        # the columns tested (default ablation.TESTED)
          rows:                          # name: {label, set: [overrides on top of this file]}
            ce: {label: L_CE, set: [ga.methods=]}
            pgd: {label: L_CE + PGD-10, set: [ga.methods=pgd, ga.pgd.steps=10]}
          tables:                        # title: [rows]; each table is one Holm family
            "H4: adversarial training": [pgd]
          robustness:                    # perturbations evaluated beside the ablation's own
            apgd: [4/255]                # (keras_irtf.evaluation.robustness: kind -> levels)
            apgd_queries: 800            # APGD on these many test queries, the same for every run
          contrasts:                     # pairs of rows tested against each other (first minus
            - [pgd, fgsm]                # second), under each table that holds both
          validation: [val R@1]          # columns settings are chosen on: paired differences to the
                                         # baseline with their 95% intervals, no test

    Every row's overrides are checked against the config here (a typo fails before any training)."""
    path = Path(path)
    block = load_yaml(path).get("study")
    if not isinstance(block, dict):
        raise ConfigError(f"{path}: no study: block (a mapping with {list(STUDY_KEYS)})")
    unknown = sorted(set(block) - set(STUDY_KEYS))
    if unknown:
        raise ConfigError(f"{path}: study: unknown key(s) {unknown}; its keys: {list(STUDY_KEYS)}")
    seeds = block.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(k, int) and k >= 0 for k in seeds):
        raise ConfigError(f"{path}: study.seeds: expected a list of seeds (non-negative integers), got {seeds!r}")
    rows = {}
    for name, row in (block.get("rows") or {}).items():
        if not isinstance(row, dict) or set(row) - {"label", "set"}:
            raise ConfigError(f"{path}: study.rows.{name}: expected {{label: text, set: [KEY=VALUE, ...]}}, "
                              f"got {row!r}")
        overrides = row.get("set") or []
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise ConfigError(f"{path}: study.rows.{name}.set: expected a list of KEY=VALUE texts")
        try:
            load_config([path], overrides)
        except ConfigError as e:
            raise ConfigError(f"{path}: study.rows.{name}: {e}") from None
        rows[str(name)] = (str(row.get("label") or name), overrides)
    baseline = str(block.get("baseline", "ce"))
    if baseline not in rows:
        raise ConfigError(f"{path}: study.baseline={baseline!r} is not one of its rows {list(rows)}")
    tables = {}
    for title, names in (block.get("tables") or {"Study": list(rows)}).items():
        names = [str(n) for n in (names or [])]
        missing = [n for n in names if n not in rows]
        if missing:
            raise ConfigError(f"{path}: study.tables[{title!r}]: unknown row(s) {missing}; the rows: {list(rows)}")
        tables[str(title)] = [baseline] + [n for n in names if n != baseline]
    try:
        shown = _check_columns(block["columns"], "study.columns") if "columns" in block else None
        tested = _check_columns(block["tested"], "study.tested") if "tested" in block else None
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    levels = dict(ABLATION_LEVELS)
    extra = dict(block.get("robustness") or {}) if isinstance(block.get("robustness") or {}, dict) else None
    if extra is None:
        raise ConfigError(f"{path}: study.robustness: expected a mapping kind -> [levels], got {block['robustness']!r}")
    apgd_queries = extra.pop("apgd_queries", None)
    if apgd_queries is not None and (isinstance(apgd_queries, bool) or not isinstance(apgd_queries, int)
                                     or apgd_queries < 1):
        raise ConfigError(f"{path}: study.robustness.apgd_queries: expected a number of test queries >= 1, "
                          f"got {apgd_queries!r}")
    for kind, values in extra.items():
        if kind not in KINDS or kind == "text":
            raise ConfigError(f"{path}: study.robustness: unknown kind {kind!r}; the pixel kinds: "
                              f"{[k for k in KINDS if k != 'text']}")
        parsed = [_level(v) for v in values] if isinstance(values, list) and values else [None]
        if None in parsed:
            raise ConfigError(f"{path}: study.robustness.{kind}: expected a list of levels (pixels in [0, 1]: "
                              f"non-negative numbers or fractions such as 4/255), got {values!r}")
        by_key = {}
        for v in (*levels.get(kind, ()), *parsed):  # a level the ablation has already keeps its value
            by_key.setdefault(level_key(kind, v), v)
        levels[kind] = tuple(sorted(by_key.values()))
    contrasts = block.get("contrasts") or []
    if not isinstance(contrasts, list) or not all(isinstance(c, list) and len(c) == 2 for c in contrasts):
        raise ConfigError(f"{path}: study.contrasts: expected a list of row pairs such as [[gaa, pgd]], "
                          f"got {contrasts!r}")
    contrasts = [(str(a), str(b)) for a, b in contrasts]
    for a, b in contrasts:
        missing = [n for n in (a, b) if n not in rows]
        if missing or a == b:
            raise ConfigError(f"{path}: study.contrasts: [{a}, {b}]: expected two different rows of the study"
                              + (f"; unknown row(s) {missing}; the rows: {list(rows)}" if missing else ""))
    validation = block.get("validation") or []
    if not isinstance(validation, list) or not all(isinstance(c, str) for c in validation):
        raise ConfigError(f"{path}: study.validation: expected a list of column names such as [val R@1], "
                          f"got {validation!r}")
    try:
        validation = _check_columns(validation, "study.validation")
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    clash = sorted(set(validation) & set(tested if tested is not None else TESTED))
    if clash:
        raise ConfigError(f"{path}: study.validation: {clash} also tested: settings are chosen on one split and "
                          f"tested on another")
    return Study(path, seeds, baseline, rows, tables, shown, tested, levels, apgd_queries, contrasts, validation)


def run_study(study: Study, out, seeds=None, overrides=(), robustness=True, verbose=True, log=print,
              rows=None) -> dict:
    """Train and evaluate every row of the study over its seeds (or `seeds`), resumably (a
    finished run is skipped; several workers may share `out`); returns {row: [metrics per seed]}
    of every finished run of the study in `out`."""
    jobs = study.jobs(seeds, rows)
    _run_jobs([study.path], jobs, out, overrides, robustness, verbose, log, levels=study.robustness,
              apgd_queries=study.apgd_queries)
    return collect(out, list(study.rows))


def study_tables(study: Study, results, complete=False) -> dict:
    """{title: {row: runs}} of the study's tables, from `results` {row: runs}: the runs of the
    study's seeds (a run of another seed is not the study's), rows without a finished run left out, and a table with no finished row beside the baseline (nothing to
    compare yet: a study trained a share of rows at a time) left out whole. complete=True: only
    the tables none of whose rows misses a seed of the study (`missing_seeds`), the ones to publish.

    `results` may also be a list of such dicts, one per run folder (one per CPU: a seed's runs
    pair only with runs of the same CPU), in order of preference: each table takes every seed's
    runs of all its rows from one folder, the first that has them all (without `complete`, the
    first with the most of them), so seeds trained on different CPUs join a table without any
    pair crossing CPUs."""
    folders, tables = _folders(results), {}
    for title, names in study.tables.items():
        rows = {name: [] for name in names}
        for seed in study.seeds:
            for name, run in _seed_runs(names, seed, folders, complete).items():
                rows[name].append(run)
        if complete and any(len(runs) < len(study.seeds) for runs in rows.values()):
            continue  # a seed no folder has for every row: not publishable
        tables[title] = {name: runs for name, runs in rows.items() if runs}
    return {title: rows for title, rows in tables.items() if any(name != study.baseline for name in rows)}


def _folders(results) -> list:
    """`results` as a list of {row: runs}, one per run folder."""
    return [results] if isinstance(results, dict) else list(results)


def _seed_runs(names, seed, folders, complete) -> dict:
    """{row: run} of one seed for the rows `names`, all from one folder: the first that has every
    row's run of the seed; else ({} if complete) the first with the most of them."""
    found = [{name: run for name in names for run in folder.get(name, []) if run.get("seed") == seed}
             for folder in folders]
    best = max(found, key=len, default={})  # max keeps the first of equals
    return best if len(best) == len(names) or not complete else {}


def missing_seeds(study: Study, results) -> dict:
    """{title: {row: [seeds of the study it has no finished run for]}} of the tables with such
    rows; with several run folders (see `study_tables`), a seed counts for a table when one folder
    has it for every row of the table, and the rows named are those the fullest folder lacks."""
    folders, out = _folders(results), {}
    for title, names in study.tables.items():
        rows = {}
        for seed in study.seeds:
            runs = _seed_runs(names, seed, folders, complete=False)
            for name in names:
                if name not in runs:
                    rows.setdefault(name, []).append(seed)
        rows = {name: rows[name] for name in names if name in rows}
        if rows:
            out[title] = rows
    return out


# What a study keeps of each finished run as its evidence: the resolved settings, the metrics, the
# robustness columns and the machine (CPU, load); not the weights
RESULT_FILES = ("config.yaml", "metrics.json", "robustness.json", "machine.json")


def keep_results(study: Study, out, dest) -> dict:
    """Copy the result files (RESULT_FILES) of every finished run of the study in `out` into
    `dest`/<row>/seed<k>/, the folder of small files a study commits as its evidence (no weights).
    A run counts as finished when its metrics.json and every robustness column the study asks
    for are there. A file already in `dest` is never overwritten: with the same bytes it counts as
    kept; with other bytes the run is a conflict and none of its files is copied. Returns
    {"copied": [...], "kept": [...], "conflicts": [...]}: "row/seed<k>" of each run (a conflict
    also names its differing files)."""
    out, dest = Path(out), Path(dest)
    report = {"copied": [], "kept": [], "conflicts": []}
    for seed in study.seeds:
        for name in study.rows:
            run, there = out / name / f"seed{seed}", dest / name / f"seed{seed}"
            if not (run / "metrics.json").is_file() or missing_robustness(run, study.robustness, study.apgd_queries):
                continue
            found = {f: (run / f).read_bytes() for f in RESULT_FILES if (run / f).is_file()}
            differ = [f for f, data in found.items() if (there / f).is_file() and (there / f).read_bytes() != data]
            label = f"{name}/seed{seed}"
            if differ:
                report["conflicts"].append(f"{label}: {', '.join(differ)}")
                continue
            new = [f for f in found if not (there / f).is_file()]
            for f in new:
                atomic_write_text(there / f, found[f].decode())
            report["copied" if new else "kept"].append(label)
    return report


GENERATED = "<!-- generated by tools/ablate.py --from-json {source}: edit the JSON's runs, not this file -->"


def per_seed_json(tables: dict, about: dict, labels=None, shown=None, tested=None, baseline="ce",
                  contrasts=(), validation=()) -> dict:
    """The committed evidence behind published tables: {"about": how and where the runs were
    made, "columns": {column: header}, "tables": {title: {cell: {"label", "runs": [record per
    seed]}}}} (and, for a study, the "shown" and "tested" columns and the "baseline" row).
    `tables` maps a table's title to {cell: [metrics or records per seed]}; `labels` {cell: row
    label} (default: the grid's and sweeps'); `contrasts`: a study's pairs of rows tested against
    each other; `validation`: its columns reported for choosing settings, untested."""
    labels = labels or {}
    data = {"about": about, "columns": {c: COLUMNS[c][0] for c in COLUMNS},
            "tables": {title: {cell: {"label": labels.get(cell) or _label(cell), "runs": [record(m) for m in sorted(
                runs, key=lambda m: m.get("seed") or 0)]} for cell, runs in cells.items()}
                for title, cells in tables.items()}}
    for key, value in (("shown", shown), ("tested", tested)):
        if value is not None:
            data[key] = list(value)
    if baseline != "ce":
        data["baseline"] = baseline
    if contrasts:
        data["contrasts"] = [list(pair) for pair in contrasts]
    if validation:
        data["validation"] = list(validation)
    return data


def tables_markdown(data: dict, source: str) -> str:
    """The Markdown of every table of a per-seed JSON (per_seed_json), under one comment naming
    the JSON it was generated from; `tools/ablate.py --from-json` writes it. A JSON written
    before a column was added lacks it (its runs have no value there); a column this version
    does not know is an error."""
    unknown = sorted(set(data.get("columns", {})) - set(COLUMNS))
    if unknown:
        raise ValueError(f"{source}: columns {unknown} differ from the ones this version tabulates "
                         f"({list(COLUMNS)})")
    parts = [GENERATED.format(source=source), ""]
    about = data.get("about", {})
    if about.get("summary"):
        parts += [about["summary"], ""]
    for title, cells in data["tables"].items():
        results = {cell: entry["runs"] for cell, entry in cells.items()}
        labels = {cell: entry.get("label") for cell, entry in cells.items()}
        parts += [f"## {title}", "", ablation_table(results, baseline=data.get("baseline", "ce"),
                                                    columns=data.get("shown"), tested=data.get("tested"),
                                                    labels=labels, contrasts=data.get("contrasts", ()),
                                                    validation=data.get("validation", ())), ""]
    return "\n".join(parts)


def seconds(results) -> float:
    return float(sum(m["train_seconds"] for runs in results.values() for m in runs))


__all__ = ["CELLS", "COLUMNS", "GRID", "RESULT_FILES", "SWEEPS", "SWEEP_VALUES", "Study", "ablation_table",
           "cell_overrides", "collect", "contrast_tests", "cpu_model", "eta_minutes", "keep_results", "load_study",
           "missing_robustness", "missing_seeds", "paired_tests", "per_seed_json", "record", "run_ablation",
           "run_robustness", "run_study", "study_tables", "summarize", "sweep_cells", "tables_markdown"]

