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
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import keras
import numpy as np

from keras_irtf.config import load_config
from keras_irtf.evaluation.robustness import ABLATION_LEVELS, robustness_of
from keras_irtf.evaluation.stats import paired_t_test
from keras_irtf.experiment import Experiment
from keras_irtf.training.loop import train
from keras_irtf.utils import read_json, write_json

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

    dataset = None
    spent, done = 0.0, 0  # this process's seconds per finished job, for the ETA
    for i, (cell, seed, ov) in enumerate(jobs):
        run = out / cell / f"seed{seed}"
        need_train = not (run / "metrics.json").is_file()
        need_robust = robustness and not (run / "robustness.json").is_file()
        if not need_train and not need_robust:
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
                                                  "cpus": os.cpu_count()})
                log(f"[{i + 1}/{len(jobs)}] {cell} seed {seed}: test R@1 {metrics['test']['R@1']:.3f}, "
                    f"WHM {metrics['whm']['value']:.3f} ({time.time() - start:.0f} s)")
            if need_robust:
                start = time.time()
                rob = run_robustness(run, cfg, dataset)
                log(f"[{i + 1}/{len(jobs)}] {cell} seed {seed}: robustness: PGD 4/255 R@1 "
                    f"{rob['pgd'][ATTACK_KEY]['R@1']:.3f}, ||dL/dx||_1 {rob['input_grad_l1']:.3g} "
                    f"({time.time() - start:.0f} s)")
            spent, done = spent + time.time() - job_start, done + 1
            left = len(jobs) - i - 1
            log(f"[{i + 1}/{len(jobs)}] {left} job(s) left, at most ~{spent / done * left / 60:.0f} min "
                f"(other workers may take some)")
        finally:
            lock.unlink(missing_ok=True)  # owned: the lock _claim created for this process
    return collect(out, [j[0] for j in jobs])


def _load():
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def run_robustness(run, cfg, dataset) -> dict:
    """The ablation's robustness columns of one finished run -> <run>/robustness.json."""
    run = Path(run)
    exp, model = Experiment.from_run(run, verbose=False, dataset=dataset)  # the ablation's shared dataset
    result = robustness_of(exp, model, levels=ABLATION_LEVELS)
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
                pid = int(lock.read_text().strip() or 0)
                os.kill(pid, 0)
                return None  # alive
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # owned: a stale claim lock (its process is gone)
                continue
            except PermissionError:
                return None
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
    "noise R@1": ("noise 8/255 R@1", lambda m: _get(m, "robustness", "noise", NOISE_KEY, "R@1")),
    "fgsm R@1": ("FGSM 4/255 R@1", lambda m: _get(m, "robustness", "fgsm", ATTACK_KEY, "R@1")),
    "pgd R@1": ("PGD 4/255 R@1", lambda m: _get(m, "robustness", "pgd", ATTACK_KEY, "R@1")),
    "grad L1": ("‖dL/dx‖₁", lambda m: _get(m, "robustness", "input_grad_l1", scale=1.0)),
    "GA ratio": ("L_GA^A / L_CE", _ga_ratio),
    "s/step": ("s/step", lambda m: _get(m, "seconds_per_step", scale=1.0)),
}
SIGNIFICANT = {"grad L1": 3, "GA ratio": 2, "s/step": 2}  # significant digits; the others: 1 decimal
# the columns tested against L_CE (paired by seed)
TESTED = ("R@1", "WHM", "shift R@1", "noise R@1", "pgd R@1")


def record(m: dict) -> dict:
    """One run's table entry: its seed and every column's value (None where the run has none),
    with the machine's 1-minute load before and after training when the run recorded it. A
    record passed in is returned as it is, so the table functions take either."""
    if "test" not in m:
        return m
    rec = {"seed": m.get("seed")}
    for name, (_, fn) in COLUMNS.items():
        v = fn(m)
        rec[name] = None if np.isnan(v) else round(v, 6)
    machine = m.get("machine") or {}
    if machine:
        rec["load_1min"] = [machine.get("load_1min_start"), machine.get("load_1min_end")]
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


def ablation_table(results: dict, baseline="ce", alpha=0.05) -> str:
    """Markdown: one row per cell, every column mean ± sample standard deviation over seeds;
    then, for every cell sharing seeds with the baseline (L_CE), the two-sided paired t-test of
    the tested columns (keras_irtf.evaluation.stats.paired_t_test): mean difference in points,
    its 95% confidence interval, p, and the verdict at `alpha`."""
    cols = _shown(results)
    lines = ["| loss | seeds | " + " | ".join(COLUMNS[c][0] for c in cols) + " |",
             "|" + "---|" * (len(cols) + 2)]
    for name, runs in results.items():
        s = summarize(runs)
        lines.append(f"| {_label(name)} | {s['n']} | " + " | ".join(_fmt(s[c], SIGNIFICANT.get(c)) for c in cols) + " |")
    tests = paired_tests(results, baseline, alpha)
    if not tests:
        return "\n".join(lines)
    tested = [c for c in TESTED if c in cols]
    lines += ["", f"Paired t-tests against {_label(baseline)} (runs paired by seed; difference of the means in "
              f"points, its 95% confidence interval, two-sided p; verdict at p < {alpha}):", "",
              "| loss | pairs | " + " | ".join(f"Δ {COLUMNS[c][0]}" for c in tested) + " | verdict |",
              "|" + "---|" * (len(tested) + 3)]
    for name, t in tests.items():
        cells = []
        for c in tested:
            r = t[c]
            if r["n"] == 0:
                cells.append("–")
            elif r["n"] < 2 or np.isnan(r["p"]):
                cells.append(f"{r['mean']:+.1f}")
            else:
                cells.append(f"{r['mean']:+.1f} [{r['ci'][0]:+.1f}, {r['ci'][1]:+.1f}] p={r['p']:.2g}")
        lines.append(f"| {_label(name)} | {t['pairs']} | " + " | ".join(cells) + f" | {t['verdict']} |")
    return "\n".join(lines)


def paired_tests(results: dict, baseline="ce", alpha=0.05) -> dict:
    """{cell: {column: paired_t_test(...), "pairs": n, "verdict": text}} against the baseline,
    runs paired by seed; a cell sharing fewer than 2 seeds with it gets no verdict."""
    if baseline not in results:
        return {}
    base = {r.get("seed"): r for r in map(record, results[baseline])}
    out = {}
    for name, runs in results.items():
        if name == baseline:
            continue
        pairs = [(r, base[r.get("seed")]) for r in sorted(map(record, runs), key=lambda r: r.get("seed") or 0)
                 if r.get("seed") in base]
        entry = {"pairs": len(pairs)}
        found = []
        for c in TESTED:
            a = np.array([_value(r, c) for r, _ in pairs], np.float64)
            b = np.array([_value(r, c) for _, r in pairs], np.float64)
            ok = ~(np.isnan(a) | np.isnan(b))
            r = paired_t_test(a[ok], b[ok])
            entry[c] = r
            if r["n"] >= 2 and not np.isnan(r["p"]) and r["p"] < alpha:
                found.append(f"{COLUMNS[c][0]} {'higher' if r['mean'] > 0 else 'lower'}")
        if len(pairs) < 2:
            entry["verdict"] = "(one seed: no test)"
        else:
            entry["verdict"] = "; ".join(found) if found else "no measurable effect"
        out[name] = entry
    return out


GENERATED = "<!-- generated by tools/ablate.py --from-json {source}: edit the JSON's runs, not this file -->"


def per_seed_json(tables: dict, about: dict) -> dict:
    """The committed evidence behind published tables: {"about": how and where the runs were
    made, "columns": {column: header}, "tables": {title: {cell: {"label", "runs": [record per
    seed]}}}}. `tables` maps a table's title to {cell: [metrics or records per seed]}."""
    return {"about": about, "columns": {c: COLUMNS[c][0] for c in COLUMNS},
            "tables": {title: {cell: {"label": _label(cell), "runs": [record(m) for m in sorted(
                runs, key=lambda m: m.get("seed") or 0)]} for cell, runs in cells.items()}
                for title, cells in tables.items()}}


def tables_markdown(data: dict, source: str) -> str:
    """The Markdown of every table of a per-seed JSON (per_seed_json), under one comment naming
    the JSON it was generated from; `tools/ablate.py --from-json` writes it."""
    unknown = sorted(set(data.get("columns", {})) ^ set(COLUMNS))
    if unknown:
        raise ValueError(f"{source}: columns {unknown} differ from the ones this version tabulates "
                         f"({list(COLUMNS)})")
    parts = [GENERATED.format(source=source), ""]
    about = data.get("about", {})
    if about.get("summary"):
        parts += [about["summary"], ""]
    for title, cells in data["tables"].items():
        results = {cell: entry["runs"] for cell, entry in cells.items()}
        parts += [f"## {title}", "", ablation_table(results), ""]
    return "\n".join(parts)


def seconds(results) -> float:
    return float(sum(m["train_seconds"] for runs in results.values() for m in runs))


__all__ = ["CELLS", "COLUMNS", "GRID", "SWEEPS", "SWEEP_VALUES", "ablation_table", "cell_overrides", "collect",
           "paired_tests", "per_seed_json", "record", "run_ablation", "run_robustness", "summarize", "sweep_cells",
           "tables_markdown"]

