#!/usr/bin/env python
"""Seconds per training step of TIRG with and without gradient augmentation, in one process.

    python benchmarks/ga_overhead.py                       # configs/css.yaml model, batch 64
    python benchmarks/ga_overhead.py --rounds 5 --steps 5 --out docs/ga_overhead.md

Variants: TIRG; +GA^A, +GA^I, +GA^A+GA^I, +FGSM with x = the query image input; +GA^A and
+GA^A+GA^I with x = the image feature and the composed feature. Every variant is its own model
(same architecture, same synthetic batch, compiled train_step, no input pipeline); after a
warm-up, the variants are timed in interleaved rounds (each round times `steps` steps of every
variant in turn, so machine load hits all of them alike) and the MEDIAN round is reported, with
the ratio to the baseline's median. Targets (issue 3): GA^A+GA^I at the input <= 1.5x, at the
features <= 1.1x, GA^I alone <= 1.05x. --profile DIR also writes a TensorBoard profile of a few
steps of each variant.
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

VARIANTS = (
    ("TIRG", "", "input"),
    ("+GA^A (x = input)", "adversarial", "input"),
    ("+GA^I", "isotropic", "input"),
    ("+GA^A+GA^I (x = input)", "adversarial,isotropic", "input"),
    ("+FGSM (x = input)", "fgsm", "input"),
    ("+GA^A (x = image feature)", "adversarial", "image_feature"),
    ("+GA^A+GA^I (x = image feature)", "adversarial,isotropic", "image_feature"),
    ("+GA^A+GA^I (x = composed)", "adversarial,isotropic", "composed"),
)
TARGETS = {
    "+GA^I": 1.05,
    "+GA^A+GA^I (x = input)": 1.5,
    "+GA^A+GA^I (x = image feature)": 1.1,
    "+GA^A+GA^I (x = composed)": 1.1,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/css.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--batch", type=int, help="batch size (default: the config's)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--vocab", type=int, default=100)
    p.add_argument("--out", help="Markdown file to write (e.g. docs/ga_overhead.md)")
    p.add_argument("--profile", help="write a TensorBoard profile of each variant here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import numpy as np
    import tensorflow as tf

    from keras_irtf.config import load_config
    from keras_irtf.training import build_model, make_optimizer

    overrides = list(args.set) + ([f"train.batch_size={args.batch}"] if args.batch else [])
    base = load_config([args.config], overrides)
    b, s, n = base.train.batch_size, base.data.image_size, base.model.max_text_length
    rng = np.random.default_rng(0)
    batch = {
        "source_image": tf.constant(rng.normal(size=(b, s, s, 3)), tf.float32),
        "text": tf.constant(rng.integers(1, args.vocab, size=(b, n)), tf.int32),
        "target_image": tf.constant(rng.normal(size=(b, s, s, 3)), tf.float32),
    }
    steps = {}
    for name, methods, point in VARIANTS:
        cfg = base.copy()
        cfg.ga.methods, cfg.ga.point = methods, point
        model = build_model(cfg, args.vocab)
        model.compile(optimizer=make_optimizer(cfg))
        fn = tf.function(model.train_step)
        for _ in range(args.warmup):
            fn(batch)["loss"].numpy()
        steps[name] = fn
        if args.profile:
            tf.profiler.experimental.start(os.path.join(args.profile, name.replace(" ", "_").replace("/", "")))
            for _ in range(3):
                fn(batch)["loss"].numpy()
            tf.profiler.experimental.stop()
    # profile of GA^I: drawing the noise alone (one normal per trainable parameter)
    ga_model = build_model(base, args.vocab)
    from keras_irtf.gradient_augmentation import GradientAugmentation

    ga = GradientAugmentation("isotropic", gamma=1e-3)
    variables = ga_model.trainable_variables
    draw = tf.function(lambda: tf.add_n([tf.reduce_sum(x) for x in ga.isotropic_noise(variables)[0]]))
    for _ in range(args.warmup):
        draw().numpy()
    steps["(profile) GA^I noise draw alone"] = lambda _batch: {"loss": draw()}
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, fn in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                out = fn(batch)
            out["loss"].numpy()
            times[name].append((time.perf_counter() - start) / args.steps)
    med = {name: float(np.median(t)) for name, t in times.items()}
    base_t = med["TIRG"]
    params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    lines = [
        "# Gradient augmentation: training-step overhead",
        "",
        f"`python benchmarks/ga_overhead.py {' '.join(argv if argv is not None else sys.argv[1:])}`".replace("  ", " "),
        "",
        f"Model: `{args.config}` ({base.model.method}, {base.model.image_encoder}, {params:,} trainable "
        f"parameters), batch {b}, {s}x{s} images; compiled train_step on a fixed synthetic batch (no "
        f"input pipeline), {args.warmup} warm-up steps, then {args.rounds} interleaved rounds of "
        f"{args.steps} steps per variant; the median round. CPU: {os.cpu_count()} cores, shared.",
        "",
        "| variant | s/step (median) | min .. max over rounds | ratio to TIRG | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for name in steps:
        ratio = med[name] / base_t
        target = TARGETS.get(name)
        met = "" if target is None else ("yes" if ratio <= target else "NO")
        lines.append(
            f"| {name} | {med[name]:.4f} | {min(times[name]):.4f} .. {max(times[name]):.4f} | {ratio:.2f}x | "
            f"{'' if target is None else f'<= {target}x'} | {met} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        from keras_irtf.utils import atomic_write_text

        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
