#!/usr/bin/env python
"""Seconds per training step of PGD-k adversarial training, FGSM training and GA^A, in one process.

    python benchmarks/adversarial_training_cost.py           # the study's rows -> docs/adversarial_training_cost.md
    python benchmarks/adversarial_training_cost.py --quick   # 2 rounds of 2 steps, for a smoke test

The variants are rows of a study config (default configs/css_ga_study.yaml: L_CE, GA^A eps 0.1,
FGSM eps 0.2, PGD-10, GA^A + FGSM), with that file's model and batch, so the figures are those
of the settings the study trains. Every variant is its own model (same architecture, same
synthetic batch, compiled train_step, no input pipeline); after a warm-up, the variants are timed
in interleaved rounds (each round times `steps` steps of every variant in turn, so machine load
hits all of them alike) and the MEDIAN round is reported with its ratio to L_CE's, and the 1-minute
load average before and after the timing.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(1, str(Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import _common as C  # noqa: E402

NAME = "adversarial_training_cost"
ROWS = ("ce", "gaa", "fgsm", "pgd", "gaa_fgsm")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="configs/css_ga_study.yaml", help="the study config whose rows are timed")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows of the study (the first is the "
                   "baseline of the ratios)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="1 warm-up step, 2 rounds of 2 steps (a smoke test)")
    p.add_argument("--vocab", type=int, default=100)
    p.add_argument("--out", help="report path (default docs/adversarial_training_cost.md)")
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.steps, args.rounds = 1, min(args.steps, 2), min(args.rounds, 2)
    return args


def main(argv=None):
    args = parse_args(argv)
    import numpy as np
    import tensorflow as tf

    from keras_irtf.config import load_config
    from keras_irtf.experiment import build_model, make_optimizer
    from keras_irtf.training.ablation import load_study

    study = load_study(args.study)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    base = load_config([study.path])
    b, s = base.train.batch_size, base.data.image_size
    batch = C.synthetic_batch(base, args.vocab)
    steps = {}
    for row in rows:
        cfg = load_config([study.path], study.rows[row][1])
        model = build_model(cfg, args.vocab)
        model.compile(optimizer=make_optimizer(cfg))
        fn = tf.function(model.train_step)
        for _ in range(args.warmup):
            fn(batch)["loss"].numpy()
        steps[row] = fn
    load_before = round(os.getloadavg()[0], 2)
    times = C.interleaved_rounds(steps, batch, args.rounds, args.steps)
    load_after = round(os.getloadavg()[0], 2)
    med = {row: float(np.median(t)) for row, t in times.items()}
    ratio = {row: med[row] / med[rows[0]] for row in rows}
    table = ["| row | settings | s/step (median round) | min .. max over rounds | ratio to " + rows[0] + " |",
             "|---|---|---|---|---|"]
    for row in rows:
        settings = " ".join(f"`{o}`" for o in study.rows[row][1])
        table.append(f"| {study.rows[row][0]} | {settings} | {med[row]:.3f} | {min(times[row]):.3f} .. "
                     f"{max(times[row]):.3f} | {ratio[row]:.2f}x |")
    body = f"""# Adversarial training against GA^A: seconds per training step

Command: `{C.command_line()}`

Model and batch: `{args.study}` ({base.model.method}, {base.model.image_encoder}, batch {b}, {s}x{s}
images); compiled `train_step` on one fixed synthetic batch (no input pipeline), {args.warmup}
warm-up step(s) per variant, then {args.rounds} interleaved rounds of {args.steps} steps of every
variant in turn ({args.rounds * args.steps} timed steps each); each variant's figure is its median
round. 1-minute load average {load_before} before the timed rounds, {load_after} after (on
{os.cpu_count()} logical CPUs).

## Results

{chr(10).join(table)}

A PGD-k step runs the query branch forward and backward k more times than L_CE (each attack step
is a forward pass and a gradient with respect to the input, without the target branch), plus the
pass at the attacked query that the training term differentiates; FGSM training adds one
gradient with respect to the input and one such pass; GA^A adds a second-order pass through the
image encoder instead.

## Machine

{C.machine_markdown()}
"""
    print(body)
    path = C.write_doc(NAME, body, args.out)
    print(f"[{NAME}] wrote {path}")
    C.print_summary(NAME, [
        f"{base.model.method}, batch {b}, {s}x{s}; {args.rounds} rounds x {args.steps} steps, median round; "
        f"load {load_before} -> {load_after}",
        ", ".join(f"{row} {med[row]:.3f} s/step ({ratio[row]:.2f}x)" for row in rows),
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
