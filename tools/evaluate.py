#!/usr/bin/env python
"""Re-evaluate a trained run: Recall@K on the test queries (TIRG protocol), training recall Ms on
a fixed seeded sample, and the weighted harmonic mean WHM.

    python tools/evaluate.py --run runs/css_tirg_s0 [--alpha 0.5] [--out metrics.json]

Reads runs/<name>/config.yaml, vocab.txt and model.keras; rewrites metrics.json (or --out) with
the new recalls, keeping the training fields (steps, train_seconds) it already had.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder written by tools/train.py")
    p.add_argument("--alpha", type=float, help="WHM weight of the training recall (default: the run's, 0.5)")
    p.add_argument("--out", help="where to write the metrics (default: <run>/metrics.json)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    from keras_irtf.config import ConfigError
    from keras_irtf.data.base import DatasetError
    from keras_irtf.evaluation import evaluate_run
    from keras_irtf.training import format_results

    try:
        metrics = evaluate_run(args.run, alpha=args.alpha, out=args.out, verbose=not args.quiet)
    except (ConfigError, DatasetError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_results(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
