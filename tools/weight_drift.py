#!/usr/bin/env python
"""What moved between two trained runs' weights: for every trainable variable of RUN, the mean
of RUN minus BASE (the drift), its root mean square, the variable's kind and part, the largest
drifts first; then the mean absolute drift of each kind of variable.

    python tools/weight_drift.py BASE RUN                  # e.g. an L_CE run and a GA run, same seed
    python tools/weight_drift.py BASE RUN --top 30 --json drift.json

BASE and RUN are run folders written by tools/train.py or tools/ablate.py, of one architecture.
When RUN trained with the authors' GA^I code and its constant push (ga.mode=reference), with
SGD, each row also gives the drift the push alone predicts: gamma (N - k) / size on every
element of the k-th of the N trainable variables' gradients, moved by SGD with momentum over
the run's steps (keras_irtf.training.drift). Printed as a Markdown table; --json writes every
variable's row.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def drift_table(rows, top: int) -> str:
    """Markdown: the `top` variables of the largest absolute drift, then the mean absolute drift
    of each kind of variable (all of them)."""
    predicted = "push_drift" in rows[0] if rows else False
    n = len(rows)
    head = "| variable | k | kind | part | size | mean (BASE) | mean (RUN) | drift | RMS |"
    lines = [f"{n} trainable variables, k counting from 0 in the model's order (GA^I's); the {min(top, n)} "
             f"largest absolute drifts:", "", head + (" push alone predicts |" if predicted else ""),
             "|" + "---|" * (9 + predicted)]
    for r in sorted(rows, key=lambda r: -abs(r["drift"]))[:top]:
        line = (f"| {r['path']} | {r['k']} | {r['kind'] or '-'} | {r['part'] or '-'} | {r['size']} | "
                f"{r['base_mean']:.4g} | {r['run_mean']:.4g} | {r['drift']:+.4g} | {r['rms']:.4g} |")
        lines.append(line + (f" {r['push_drift']:+.4g} |" if predicted else ""))
    kinds = sorted({r["kind"] or "-" for r in rows})
    lines += ["", "| kind | variables | elements | mean abs drift | mean RMS |", "|---|---|---|---|---|"]
    for kind in kinds:
        of = [r for r in rows if (r["kind"] or "-") == kind]
        lines.append(f"| {kind} | {len(of)} | {sum(r['size'] for r in of)} | "
                     f"{sum(abs(r['drift']) for r in of) / len(of):.4g} | {sum(r['rms'] for r in of) / len(of):.4g} |")
    return "\n".join(lines)


def main(argv=None):
    from keras_irtf import cli

    cli.preparse(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common(p)
    p.add_argument("base", metavar="BASE", help="run folder compared against (e.g. the L_CE run)")
    p.add_argument("run", metavar="RUN", help="run folder whose weights moved (e.g. the same seed with a GA method)")
    p.add_argument("--top", type=int, default=15, help="variables shown, the largest absolute drift first (default 15)")
    p.add_argument("--json", metavar="FILE", help="also write every variable's row to this JSON file")
    args = p.parse_args(argv)
    if args.top < 1:
        p.error(f"--top must be 1 or more, got {args.top}")

    from keras_irtf.config import ConfigError
    from keras_irtf.experiment import Experiment
    from keras_irtf.training.drift import weight_drift
    from keras_irtf.utils import read_json, write_json

    try:
        _, base = Experiment.from_run(args.base, verbose=False, load_data=False)
        exp, run = Experiment.from_run(args.run, verbose=False, load_data=False)
        metrics = Path(args.run) / "metrics.json"
        steps = read_json(metrics).get("steps") if metrics.is_file() else None
        rows = weight_drift(base, run, cfg=exp.cfg, steps=steps or exp.cfg.train.steps)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(drift_table(rows, args.top))
    if args.json:
        write_json(args.json, {"base": str(args.base), "run": str(args.run), "variables": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
