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

import numpy as np

from keras_irtf.utils import read_json

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
# weight swept -> (config key, ga.methods, L_S on?)
SWEEPS = {
    "eta": ("loss.eta", "", True),
    "eps": ("ga.adversarial.eps", "adversarial", False),
    "gamma": ("ga.isotropic.gamma", "isotropic", False),
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
        key, methods, _ = SWEEPS[w]
        for v in values:
            out.append((f"sweep_{w}_{v:g}", f"{w} = {v:g}", [f"{key}={v}", f"ga.methods={methods}"]
                        + ([] if w == "eta" else ["loss.eta=0.0"])))
    return out


def _label(name):
    for cell, label, _, _ in GRID:
        if cell == name:
            return label
    return name


def run_ablation(config_paths, seeds=3, out="ablations/css", cells=CELLS, overrides=(), sweep=(),
                 sweep_values=SWEEP_VALUES, sweep_seed=0, verbose=True, log=print):
    """Train and evaluate the grid (and the optional sweep); returns {cell: [metrics per seed]}.

    `overrides` apply to every run (e.g. "train.steps=300"); the L_S weight of the cells that use
    L_S is the config's loss.eta (1e-3 if the config leaves it at 0)."""
    import keras

    from keras_irtf.config import load_config
    from keras_irtf.experiment import Experiment
    from keras_irtf.training.loop import train

    out = Path(out)
    base = load_config(config_paths, list(overrides))
    eta = base.loss.eta or 1e-3
    jobs = []
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    for seed in seed_list:
        for cell in cells:
            jobs.append((cell, seed, cell_overrides(cell, eta)))
    for cell, _, ov in sweep_cells(sweep, sweep_values) if sweep else []:
        jobs.append((cell, sweep_seed, ov))

    dataset = None
    for i, (cell, seed, ov) in enumerate(jobs):
        run = out / cell / f"seed{seed}"
        if (run / "metrics.json").is_file():
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
            start = time.time()
            log(f"[{i + 1}/{len(jobs)}] {cell} seed {seed}: training ({' '.join(ov)})")
            _, metrics = train(cfg, verbose=0, dataset=dataset)
            log(f"[{i + 1}/{len(jobs)}] {cell} seed {seed}: test R@1 {metrics['test']['R@1']:.3f}, "
                f"WHM {metrics['whm']['value']:.3f} ({time.time() - start:.0f} s)")
        finally:
            lock.unlink(missing_ok=True)
    return collect(out, [j[0] for j in jobs])


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
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            except PermissionError:
                return None
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return lock
    return None


def collect(out, cells=None) -> dict:
    """{cell: [metrics.json of each finished seed]} from an ablation folder."""
    out = Path(out)
    names = list(dict.fromkeys(cells)) if cells else sorted(p.name for p in out.iterdir() if p.is_dir())
    results = {}
    for name in names:
        runs = sorted((out / name).glob("seed*/metrics.json"))
        if runs:
            results[name] = [read_json(p) for p in runs]
    return results


def summarize(runs: list) -> dict:
    """Means and sample standard deviations (in %) of one cell's runs."""
    def arr(fn):
        return np.asarray([fn(m) for m in runs], dtype=np.float64) * 100.0

    s = {"n": len(runs)}
    for k in ("R@1", "R@5", "R@10"):
        s[k] = arr(lambda m: m["test"][k])
    s["Mt"] = arr(lambda m: m["whm"]["Mt"])
    s["Ms"] = arr(lambda m: m["whm"]["Ms"])
    s["train R@1"] = arr(lambda m: m["train"]["R@1"])
    s["WHM"] = arr(lambda m: m["whm"]["value"])
    s["s/step"] = np.asarray([m["seconds_per_step"] for m in runs], dtype=np.float64)
    return s


def _fmt(values, digits=1):
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def ablation_table(results: dict, baseline="ce") -> str:
    """Markdown: one row per cell; test R@1/5/10 and their average Mt, training average Ms and
    R@1, WHM (alpha from the runs), seconds per training step; mean ± std over seeds; and the
    difference of Mt and WHM to the baseline row with a verdict against the seed spread."""
    head = ("| loss | seeds | R@1 | R@5 | R@10 | avg (Mt) | train R@1 | train avg (Ms) | WHM | "
            "s/step | ΔMt vs L_CE | ΔWHM vs L_CE |")
    lines = [head, "|" + "---|" * 12]
    base = summarize(results[baseline]) if baseline in results else None
    for name, runs in results.items():
        s = summarize(runs)
        dmt = dwhm = ""
        if base is not None and name != baseline:
            dmt = _delta(s["Mt"], base["Mt"])
            dwhm = _delta(s["WHM"], base["WHM"])
        lines.append(
            f"| {_label(name)} | {s['n']} | {_fmt(s['R@1'])} | {_fmt(s['R@5'])} | {_fmt(s['R@10'])} | "
            f"{_fmt(s['Mt'])} | {_fmt(s['train R@1'])} | {_fmt(s['Ms'])} | {_fmt(s['WHM'])} | "
            f"{_fmt(s['s/step'], 3)} | {dmt} | {dwhm} |"
        )
    return "\n".join(lines)


def _delta(values, base_values) -> str:
    """Difference of means, and whether it exceeds the spread: the larger of the two rows'
    standard deviations (with one seed on either side there is no spread to compare with)."""
    d = values.mean() - base_values.mean()
    if len(values) < 2 or len(base_values) < 2:
        return f"{d:+.1f}"
    spread = max(values.std(ddof=1), base_values.std(ddof=1))
    verdict = "no measurable effect" if abs(d) <= spread else ("better" if d > 0 else "worse")
    return f"{d:+.1f} ({verdict})"


def seconds(results) -> float:
    return float(sum(m["train_seconds"] for runs in results.values() for m in runs))


__all__ = ["CELLS", "GRID", "SWEEPS", "SWEEP_VALUES", "ablation_table", "cell_overrides", "collect",
           "run_ablation", "summarize", "sweep_cells"]

