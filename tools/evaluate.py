#!/usr/bin/env python
"""Re-evaluate trained runs: Recall@K on the test queries (TIRG protocol), training recall Ms on
a fixed seeded sample, and the weighted harmonic mean WHM; optionally draw WHM against alpha.

    python tools/evaluate.py --run runs/css_tirg_s0 [--alpha 0.5] [--out metrics.json]
    python tools/evaluate.py --run runs/css_tirg_s0 --backend faiss        # exact faiss search
    python tools/evaluate.py --run runs/a --run runs/b --whm-plot whm.png   # + whm.json, whm.csv
    python tools/evaluate.py --run runs/a --run runs/b --whm-plot whm.png --reuse-metrics
    python tools/evaluate.py --run runs/css_tirg_s0 --robustness          # -> robustness.json
    python tools/evaluate.py --run runs/cirr_tirg_s0 --submission out/    # CIRR test-server files

Reads runs/<name>/config.yaml, vocab.txt and model.keras; rewrites metrics.json (or --out, with
one run) with the new recalls, keeping the training fields (steps, train_seconds) it already had.
--whm-plot draws WHM = (1 + alpha) Ms Mt / (alpha Mt + Ms) for alpha in [0, 2], one curve per
run, and writes the numbers beside the PNG (same name, .json and .csv). --reuse-metrics plots
from each run's existing metrics.json instead of evaluating again (WHM depends on Ms and Mt only).
--submission DIR (a CIRR run): rank CIRR's test1 queries and write the two files its evaluation
server takes (recall_submission.json, recall_subset_submission.json) into DIR, instead of
evaluating.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run_labels(runs):
    """Short, distinct curve labels: the folder names, or the paths when two names collide."""
    names = [Path(r).name or str(r) for r in runs]
    return names if len(set(names)) == len(names) else [str(r) for r in runs]


def main(argv=None):
    from keras_irtf import cli
    from keras_irtf.config import choices

    cli.preparse(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common(p)
    p.add_argument("--run", required=True, action="append", help="run folder written by tools/train.py (repeatable)")
    p.add_argument("--alpha", type=float, help="WHM weight of the training recall (default: the run's, 0.5)")
    p.add_argument("--out", help="where to write the metrics (default: <run>/metrics.json; one --run only)")
    p.add_argument("--backend", choices=choices("eval.backend"), help="retrieval backend (default: the run's eval.backend, tf)")
    p.add_argument("--whm-plot", metavar="OUT.png", help="draw WHM against alpha in [0, 2] for the runs")
    p.add_argument("--reuse-metrics", action="store_true",
                   help="with --whm-plot: read each run's metrics.json instead of evaluating again")
    p.add_argument("--robustness", action="store_true",
                   help="instead: perturbed test queries (noise, JPEG, FGSM, PGD, APGD, text) -> <run>/robustness.json")
    p.add_argument("--robustness-kinds", help="with --robustness: a comma-separated subset of "
                   "noise,jpeg,fgsm,pgd,apgd,text (default all; apgd costs about 100 gradient passes per query)")
    p.add_argument("--submission", metavar="DIR",
                   help="instead: a CIRR run's test1 rankings in the evaluation server's two JSON files, into DIR")
    args = p.parse_args(argv)
    if args.submission:
        if len(args.run) > 1:
            p.error("--submission writes one run's files: give a single --run")
        return submission_main(args)
    if args.robustness:
        return robustness_main(args)
    if args.out and len(args.run) > 1:
        p.error("--out names one metrics file: use it with a single --run (each run otherwise gets <run>/metrics.json)")
    if args.reuse_metrics and not args.whm_plot:
        p.error("--reuse-metrics only applies to --whm-plot")

    from keras_irtf.config import ConfigError
    from keras_irtf.data.base import DatasetError
    from keras_irtf.experiment import evaluate_run
    from keras_irtf.training.loop import format_results
    from keras_irtf.utils import read_json

    results = {}
    try:
        for run, label in zip(args.run, run_labels(args.run)):
            metrics_file = Path(run) / "metrics.json"
            if args.reuse_metrics:
                if not metrics_file.is_file():
                    raise FileNotFoundError(
                        f"{metrics_file} not found: --reuse-metrics needs an evaluated run "
                        "(drop --reuse-metrics to evaluate it now)"
                    )
                metrics = read_json(metrics_file)
            else:
                metrics = evaluate_run(run, alpha=args.alpha, out=args.out, verbose=not args.quiet,
                                       backend=args.backend)
            results[label] = metrics
            if len(args.run) > 1:
                print(f"## {label}")
            print(format_results(metrics))
        if args.whm_plot:
            from keras_irtf.evaluation.plots import write_whm_plot

            written = write_whm_plot(results, args.whm_plot)
            print(f"WHM plot: {written['png']} (numbers: {written['json']}, {written['csv']})")
    except (ConfigError, DatasetError, FileNotFoundError, ImportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def robustness_main(args):
    """--robustness: keras_irtf.evaluation.robustness on each run; a table per run on stdout."""
    from keras_irtf.config import ConfigError
    from keras_irtf.data.base import DatasetError
    from keras_irtf.evaluation import robustness as R
    from keras_irtf.experiment import robustness_run

    levels = None
    if args.robustness_kinds:
        kinds = [k.strip() for k in args.robustness_kinds.split(",") if k.strip()]
        levels = {k: R.DEFAULT_LEVELS[k] for k in kinds if k in R.DEFAULT_LEVELS}
        if len(levels) != len(kinds):
            print(f"error: --robustness-kinds expects a subset of {list(R.KINDS)}", file=sys.stderr)
            return 2
    try:
        for run, label in zip(args.run, run_labels(args.run)):
            result = robustness_run(run, levels=levels, out=args.out, verbose=not args.quiet, backend=args.backend)
            print(f"## {label}: robustness ({result['settings']['gallery']})")
            print(R.format_robustness(result))
    except (ConfigError, DatasetError, FileNotFoundError, ImportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def submission_main(args):
    """--submission DIR: keras_irtf.evaluation.cirr_submission on a CIRR run."""
    from keras_irtf.config import ConfigError, load_config
    from keras_irtf.data.base import DatasetError

    try:
        config = Path(args.run[0]) / "config.yaml"
        if config.is_file():  # refuse another dataset before loading anything
            dataset = load_config([config]).data.dataset.type
            if dataset != "cirr":
                raise DatasetError(f"--submission writes CIRR's test-server files; {args.run[0]} was trained on "
                                   f"{dataset!r} (data.dataset=cirr runs only)")
        from keras_irtf.evaluation.cirr_submission import write_submission
        from keras_irtf.experiment import Experiment

        # test1 is embedded on pixels: the frozen-feature cache of train/val is not needed
        exp, model = Experiment.from_run(args.run[0], verbose=not args.quiet, image_cache=False)
        written = write_submission(exp, model, args.submission, backend=args.backend)
        print(f"wrote {written['recall']} and {written['recall_subset']}")
    except (ConfigError, DatasetError, FileNotFoundError, ImportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
