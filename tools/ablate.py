#!/usr/bin/env python
"""The GA paper's ablation: train and evaluate the grid over several seeds, write a Markdown table.

    python tools/ablate.py --dataset css --seeds 3
    python tools/ablate.py --config configs/css_ablation.yaml --seeds 3 --out ablations/css \\
        --sweep eta,eps,gamma --json results.json
    python tools/ablate.py --from-json results.json --table results.md
    python tools/ablate.py --study configs/css_ga_study.yaml --out ablations/css_ga_study \\
        --json study.json --table study.md

Rows: L_CE; +L_S; +GA^A; +GA^I; +L_S+GA^A; +L_S+GA^I; +GA^A+GA^I; all four; and the FGSM, L1, L2
baselines. Columns: test R@1/5/10 and their average (Mt), training R@1 and average (Ms), WHM,
R@1 on the shifted test split (when data.dataset.shift is set), R@1 under Gaussian noise 8/255, FGSM
and PGD-10 at 4/255, the mean ||dL/dx||_1, L_GA^A / L_CE at the end of training, seconds per
step: mean ± standard deviation over seeds. A second table tests each row against L_CE with a
two-sided paired t-test over the seeds (difference, 95% interval, p; verdict at p < 0.05, and at
Holm-adjusted p < 0.05 over the tests of that table). --study FILE runs the rows, seeds and tables
of a config's `study:` block instead of the grid. Every (cell, seed) is a run
folder <out>/<cell>/seed<k>/; finished ones (metrics.json present) are skipped, so re-running the
same command resumes an interrupted ablation. --json keeps every run's values per seed (and the
machine's load while it trained) in one small file, and --from-json regenerates the tables from it
alone: publish the JSON beside the table and anyone can recompute it. --dataset css uses configs/css_ablation.yaml (the
ablation budget); the GA weights are that file's (--set overrides them).
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None):
    from keras_irtf import cli

    cli.preparse(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common(p)
    p.add_argument("--dataset", default="css", help="dataset (config: configs/<dataset>_ablation.yaml)")
    p.add_argument("--config", action="append", default=[], help="YAML config file(s), applied in order")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. N-1)")
    p.add_argument("--seed-ids", help="explicit comma-separated seeds instead of 0 .. N-1 (e.g. a second "
                   "worker on the same --out: workers skip what another is training)")
    p.add_argument("--cells", help="comma-separated subset of the grid (default: all; 'none': only the sweep)")
    p.add_argument("--sweep", default="", help="sweeps (one seed unless --sweep-seeds) over 1e-6..1e-2 of: "
                   "eta,eps,gamma,gamma_mean (gamma_mean: the authors' 1/size noise scale)")
    p.add_argument("--sweep-seeds", type=int, default=1, help="seeds 0 .. N-1 for every sweep value")
    p.add_argument("--no-robustness", action="store_true", help="skip the robustness columns (robustness.json)")
    p.add_argument("--sweep-values", default="", help="comma-separated weights for --sweep")
    p.add_argument("--out", help="ablation folder (default ablations/<dataset>)")
    p.add_argument("--table", help="also write the Markdown table to this file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    p.add_argument("--table-only", action="store_true", help="tabulate finished runs, train nothing")
    p.add_argument("--json", help="also write every run's values (per seed, with the machine's load) to this JSON "
                   "file: the evidence a table is regenerated from")
    p.add_argument("--from-json", metavar="FILE", help="print (and with --table write) the tables of a JSON "
                   "written by --json; reads no run folder and trains nothing")
    p.add_argument("--study", metavar="FILE", help="a config with a study: block: train its rows over its seeds "
                   "(--seed-ids: a worker's share) and write its tables, instead of the grid")
    p.add_argument("--rows", help="with --study: train only these comma-separated rows (a worker's share); the "
                   "tables show every finished row")
    p.add_argument("--runs-from", action="append", default=[], metavar="FOLDER", help="with --study: a folder of "
                   "finished runs of the same study (e.g. trained on another CPU) that the tables read besides --out "
                   "(never written); repeatable. Each table takes every seed's runs of all its rows from one folder, "
                   "--out first, so no pair crosses folders")
    p.add_argument("--keep-results", metavar="FOLDER", help="with --study: copy the result files of every finished "
                   "run in --out (config.yaml, metrics.json, robustness.json, machine.json; not the weights) into "
                   "FOLDER/<row>/seed<k>/, the small evidence a study commits; a file already there is never "
                   "overwritten (a run whose files differ there is named, and the tool exits with status 1)")
    p.add_argument("--complete", action="store_true", help="with --study: write only the tables each of whose rows "
                   "has finished every seed of the study (a table to publish; the others are named on stderr)")
    return p.parse_args(argv)


def _about(out, results: dict, argv) -> dict:
    """How and where the runs of a per-seed JSON were made (`out`: a run folder or a list of them)."""
    import platform
    import time

    import tensorflow as tf

    import keras_irtf

    cells = {cell for found in (results if isinstance(results, list) else [results]) for cell in found}
    stamps = [p.stat().st_mtime for folder in (out if isinstance(out, list) else [out]) for cell in cells
              for p in (folder / cell).glob("seed*/metrics.json")]
    utc = lambda t: time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))  # noqa: E731
    return {"command": "python tools/ablate.py " + " ".join(argv),
            "runs_finished": [utc(min(stamps)), utc(max(stamps))] if stamps else None,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(terse=True)},
            "versions": {"keras_irtf": keras_irtf.__version__, "tensorflow": tf.__version__}}


def main(argv=None):
    args = parse_args(argv)
    from keras_irtf.training import ablation as A
    from keras_irtf.config import ConfigError, repo_configs_dir
    from keras_irtf.data.base import DatasetError
    from keras_irtf.utils import atomic_write_text, read_json

    if args.from_json:
        try:
            text = A.tables_markdown(read_json(args.from_json), source=args.from_json)
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"error: {args.from_json} is not a per-seed JSON written by --json: {e}", file=sys.stderr)
            return 2
        print(text)
        if args.table:
            atomic_write_text(args.table, text)
        return 0
    if args.rows and not args.study:
        print("error: --rows is for --study (the grid's subset is --cells)", file=sys.stderr)
        return 2
    if args.keep_results and not args.study:
        print("error: --keep-results is for --study (it keeps the result files of the study's runs)", file=sys.stderr)
        return 2
    if args.runs_from and not args.study:
        print("error: --runs-from is for --study (its tables pair runs folder by folder)", file=sys.stderr)
        return 2
    if args.complete and not args.study:
        print("error: --complete is for --study (a study fixes the seeds every row must have)", file=sys.stderr)
        return 2
    if args.study:
        return _study(args, argv)
    configs = repo_configs_dir()
    paths = args.config or [configs / f"{args.dataset}_ablation.yaml"]
    for path in paths:
        if not Path(path).is_file():
            print(f"error: config {path} does not exist", file=sys.stderr)
            return 2
    out = Path(args.out or f"ablations/{args.dataset}")
    cells = [c.strip() for c in args.cells.split(",") if c.strip()] if args.cells else list(A.CELLS)
    if cells == ["none"]:
        cells = []
    unknown = [c for c in cells if c not in A.CELLS]
    if unknown:
        print(f"error: unknown cell(s) {unknown}; expected a subset of {list(A.CELLS)}", file=sys.stderr)
        return 2
    sweep = [w.strip() for w in args.sweep.split(",") if w.strip()]
    values = tuple(float(v) for v in args.sweep_values.split(",") if v.strip()) or A.SWEEP_VALUES
    try:
        if args.table_only:
            names = cells + [c for c, _, _ in A.sweep_cells(sweep, values)]
            results = A.collect(out, names)
        else:
            seeds = [int(s) for s in args.seed_ids.split(",")] if args.seed_ids else args.seeds
            results = A.run_ablation(paths, seeds=seeds, out=out, cells=cells, overrides=args.set,
                                     sweep=sweep, sweep_values=values, robustness=not args.no_robustness,
                                     sweep_seeds=range(args.sweep_seeds))
    except (ConfigError, DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.seed_ids or not cells:  # a worker's share: tabulate every finished run of the grid
        results = {**A.collect(out, list(A.CELLS)), **{k: v for k, v in results.items() if k.startswith("sweep_")}}
    grid = {k: v for k, v in results.items() if not k.startswith("sweep_")}
    sweeps = {k: v for k, v in results.items() if k.startswith("sweep_")}
    tables = {"Ablation": grid} if grid else {}
    if sweeps:
        tables["Weight sweep"] = {"ce": grid["ce"], **sweeps} if "ce" in grid else sweeps
    return _write_tables(args, argv, out, results, tables)


def _write_tables(args, argv, out, results, tables, **json_options):
    """Print the tables (and write them, and their per-seed JSON, where asked)."""
    from keras_irtf.training import ablation as A
    from keras_irtf.utils import atomic_write_text, write_json

    if not tables:
        print("(no table has every seed of each of its rows yet)" if args.complete
              else "(no finished runs)")
        return 0
    data = A.per_seed_json(tables, _about(out, results, sys.argv[1:] if argv is None else argv), **json_options)
    if args.json:
        write_json(args.json, data)
    text = A.tables_markdown(data, source=args.json or "(not saved: add --json FILE)")
    print(text)
    if args.table:
        atomic_write_text(args.table, text)
    return 0


def _study(args, argv):
    """--study FILE: the study's rows over its seeds (resumable), then its tables."""
    from keras_irtf.training import ablation as A
    from keras_irtf.config import ConfigError
    from keras_irtf.data.base import DatasetError

    if args.config or args.cells or args.sweep:
        print("error: --study takes its rows and configuration from its file; leave out --config, --cells and "
              "--sweep", file=sys.stderr)
        return 2
    out = Path(args.out or f"ablations/{Path(args.study).stem}")
    more = [Path(f) for f in args.runs_from]
    for folder in more:
        if not folder.is_dir() or folder.resolve() == out.resolve():
            print(f"error: --runs-from {folder}: expected a folder of finished runs other than --out "
                  f"({'it is --out' if folder.is_dir() else 'no such folder'})", file=sys.stderr)
            return 2
    try:
        study = A.load_study(args.study)
        if args.table_only:
            results = A.collect(out, list(study.rows))
        else:
            seeds = [int(s) for s in args.seed_ids.split(",")] if args.seed_ids else None
            rows = [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else None
            results = A.run_study(study, out, seeds=seeds, overrides=args.set, robustness=not args.no_robustness,
                                  rows=rows)
    except (ConfigError, DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kept_ok = True
    if args.keep_results:
        kept = A.keep_results(study, out, args.keep_results)
        print(f"kept in {args.keep_results}: {len(kept['copied'])} run(s) copied, {len(kept['kept'])} already there",
              file=sys.stderr)
        for conflict in kept["conflicts"]:
            print(f"not overwritten (the file in {args.keep_results} differs from --out's): {conflict}",
                  file=sys.stderr)
        kept_ok = not kept["conflicts"]
    if more:  # one {row: runs} per folder, --out first: a table takes each seed from one folder
        results = [results] + [A.collect(folder, list(study.rows)) for folder in more]
    tables = A.study_tables(study, results, complete=args.complete)
    if args.complete:
        for title, missing in A.missing_seeds(study, results).items():
            print(f"left out (seeds still to train): {title}: "
                  + "; ".join(f"{name} {', '.join(map(str, seeds))}" for name, seeds in missing.items()),
                  file=sys.stderr)
    status = _write_tables(args, argv, [out, *more] if more else out, results, tables, labels=study.labels,
                           shown=study.shown, tested=study.tested, baseline=study.baseline,
                           contrasts=study.contrasts, validation=study.validation)
    return status or (0 if kept_ok else 1)


def run(argv=None) -> int:
    """main, with Ctrl-C as one line: finished runs stay, the run in training is backed up (see
    keras_irtf.training.interrupt), and the same command resumes the ablation."""
    try:
        return main(argv)
    except KeyboardInterrupt as e:
        from keras_irtf import cli

        step = getattr(e, "step", None)
        at = f" (the run in training backed up at step {step})" if step is not None else ""
        command = cli.command_line(sys.argv[0] if argv is None else __file__, sys.argv[1:] if argv is None else argv)
        print(f"\nablation interrupted{at}; finished runs are kept; resume with `{command}`", file=sys.stderr)
        cli.exit_now(130)


if __name__ == "__main__":
    sys.exit(run())
