#!/usr/bin/env python
"""The GA paper's ablation: train and evaluate the grid over several seeds, write a Markdown table.

    python tools/ablate.py --dataset css --seeds 3
    python tools/ablate.py --config configs/css_ablation.yaml --seeds 3 --out ablations/css \\
        --table docs/results/css_ablation.md --sweep eta,eps,gamma

Rows: L_CE; +L_S; +GA^A; +GA^I; +L_S+GA^A; +L_S+GA^I; +GA^A+GA^I; all four; and the FGSM, L1, L2
baselines. Columns: test R@1/5/10 and their average (Mt), training R@1 and average (Ms), WHM,
R@1 on the shifted test split (when data.dataset.shift is set), R@1 under Gaussian noise 8/255, FGSM
and PGD-10 at 4/255, the mean ||dL/dx||_1, L_GA^A / L_CE at the end of training, seconds per
step: mean ± standard deviation over seeds. A second table tests each row against L_CE with a
two-sided paired t-test over the seeds (difference, 95% interval, p; verdict at p < 0.05). Every (cell, seed) is a run
folder <out>/<cell>/seed<k>/; finished ones (metrics.json present) are skipped, so re-running the
same command resumes an interrupted ablation. --dataset css uses configs/css_ablation.yaml (the
ablation budget); the GA weights are that file's (--set overrides them).
"""

import argparse
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
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from keras_irtf.training import ablation as A
    from keras_irtf.config import ConfigError, repo_configs_dir
    from keras_irtf.data.base import DatasetError

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
    text = "## Ablation\n\n" + (A.ablation_table(grid) if grid else "(no finished grid runs)") + "\n"
    if sweeps:
        text += "\n## Weight sweep\n\n" + A.ablation_table({"ce": grid["ce"], **sweeps} if "ce" in grid else sweeps) + "\n"
    print(text)
    if args.table:
        from keras_irtf.utils import atomic_write_text

        atomic_write_text(args.table, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
