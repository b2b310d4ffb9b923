#!/usr/bin/env python
"""Distributed training on this machine: steps per second with 1 and 2 logical-CPU replicas
(MirroredStrategy), and the wall time of a two-worker MultiWorkerMirroredStrategy run on localhost
against the same run in one process.

    python benchmarks/distributed.py            # configs/css.yaml, batch 64, 20 timed steps
    python benchmarks/distributed.py --quick    # the smoke preset, fewer steps

1. Replicas: the default CSS model (configs/css.yaml, GA off, batch 64 = the GLOBAL batch) trained
   with model.fit on one device and on MirroredStrategy over 2 logical CPU devices, each in a fresh
   process (logical devices are fixed when TensorFlow starts), in alternating rounds. Step time is
   measured between the ends of consecutive steps after warm-up steps (tracing excluded); the
   median over the timed steps of all rounds. Logical CPU devices share the same cores, so this
   measures the cost of the replica machinery (per-replica copies, all-reduce, all-gather of the
   batch-softmax targets, synchronized batch norm), not a speed-up: on real GPUs each replica has
   its own device.
2. Workers: `tools/train.py --strategy multi_worker` started twice on localhost (free ports,
   TF_CONFIG per worker) against the same command with --strategy one_device; wall time of the
   whole command (start-up, data, training, the chief's evaluation), GA^A + GA^I + L_S on.
3. Drift: TIRG on the CSS smoke set (the smoke preset, dropout on, GA off) trained for 40 steps
   on one device, on 2 logical-CPU replicas from the same state, and on one device from weights
   perturbed by 1e-7 (relative, each element), on the same batches: how far each run is from the
   one-device run, as a fraction of the one-device run's travel from its initial weights.
4. Final recall (--recall-seeds N): for each training seed 0 .. N-1, `tools/train.py` trains the
   same config twice, once with --strategy one_device and once with --strategy mirrored over 2
   logical CPU devices (same global batch, steps and seed), and evaluates test R@1 / R@10 (TIRG's
   protocol, as metrics.json records them). The per-seed recalls go to docs/distributed_recall.json
   (next to --out); the report shows each seed's paired difference beside the seed-to-seed spread
   of the one-device recall, with a paired t-test of the difference. Without --recall-seeds the
   report shows that file's last measurement.

    nice -n 10 python benchmarks/distributed.py --recall-only --recall-seeds 3   # only section 4
    python benchmarks/distributed.py --recall-only        # re-render section 4 from the .json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "distributed"

# What a multi-replica run reproduces, written at the top of the report (the tests named here
# measure it; the sections after it are this machine's timings).
CLAIM = """## What a multi-replica run reproduces

Under `MirroredStrategy` (several devices of one machine) and `MultiWorkerMirroredStrategy`
(several machines), training reads the same global batches as one device, in the same order
(replica r gets rows r·b to (r+1)·b − 1 of each, b = batch / replicas), starts from the same
initial weights and follows the same learning-rate schedule and step counter.

**One step agrees within float32 rounding, from any state.** From the same weights, batch-norm
statistics, random-generator states and optimizer state, one step on 2 replicas and one step on
one device differ only in the order of float32 sums (each replica's partial sums of the
gradients, the batch-norm statistics all-reduced): a few 1e-5 of the step, and up to a few 1e-3
of it where a rounding flips a ReLU or max-pool choice at one pixel. Under `mixed_bfloat16` and
`mixed_float16` the two steps differ by no more than a few times what the policy's own rounding
does to the step (the one-device 16-bit step against the same step in float32; measured 0.2 to
2 times it). tests/test_distributed_equivalence.py checks this from several states along a
trajectory, against a control (each replica's loss divided by its local batch) that misses by a
whole gradient step; tests/test_mixed_precision.py does the same under the 16-bit policies.

**Trajectories diverge like any perturbed run.** Training is chaotic: over many steps the two
runs drift apart as a one-device run drifts from itself when its initial weights are perturbed
by 1e-7 (the drift table below). A mirrored run therefore does not end on the one-device run's
final weights or final recall to the digit; it is another sample of the same training, and its
final recall differs from the one-device run's as runs under rounding-sized perturbations do.
The last section compares the final test recall of the two over several training seeds.

**Dropout.** Every dropout layer of the encoders and composers (`keras_irtf.layers.Dropout`)
draws the mask of the whole global batch from the same generator state on every replica and
keeps its replica's rows: the masks are independent across the global batch and equal to the
masks one device draws. A plug-in that uses `keras.layers.Dropout` itself gets Keras' behaviour
under a strategy: every replica draws the same mask, so rows i and i + b share it.

**Gradient clipping.** `optim.clipnorm` (and a Keras optimizer's `clipnorm`, `global_clipnorm`
or `clipvalue`) clips the global, summed gradient, as on one device: the training step
all-reduces the gradients, clips the sum with the optimizer's own rule and applies it once
(one more all-reduce of the gradients per step, only when clipping is set). Keras 3.15 on its
own clips each replica's gradient before the sum, which lets an update reach N times the
clipping norm on N replicas.
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the smoke preset and fewer steps")
    p.add_argument("--steps", type=int, help="timed steps per round (default 10; quick 5)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--worker-steps", type=int, help="training steps of the two-worker run (default 20; quick 4)")
    p.add_argument("--out", default=str(REPO / "docs" / f"{NAME}.md"))
    p.add_argument("--drift-steps", type=int, default=40, help="training steps of the drift comparison")
    p.add_argument("--recall-seeds", type=int, default=0,
                   help="train seeds 0 .. N-1 on one device and on 2 logical-CPU replicas and compare final test "
                        "recall (N >= 2; 0 = show the last measurement from the .json)")
    p.add_argument("--recall-steps", type=int, help="training steps of each recall run (default 800; quick 40)")
    p.add_argument("--recall-image-size", type=int, default=32, help="data.image_size of the recall runs")
    p.add_argument("--recall-only", action="store_true",
                   help="skip the timing, worker and drift sections: measure (or, with --recall-seeds 0, re-render "
                        "from the .json) only the recall section and replace it in the existing report")
    p.add_argument("--recall-json", help="per-seed recall data (default: <out stem>_recall.json next to --out)")
    p.add_argument("--replica-worker", choices=["1", "2"], help=argparse.SUPPRESS)
    p.add_argument("--drift-worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _config_files(quick):
    configs = REPO / "configs"
    return [configs / "css.yaml"] + ([configs / "presets" / "smoke.yaml"] if quick else [])


def replica_worker(args):
    """In a fresh process: time model.fit steps with 1 or 2 logical-CPU replicas; print JSON."""
    n = int(args.replica_worker)
    C.quiet_tensorflow()
    from keras_irtf.training.distribute import configure_logical_cpus

    configure_logical_cpus(n)
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_irtf.config import load_config
    from keras_irtf.experiment import Experiment

    cfg = load_config(_config_files(args.quick), [])
    exp = Experiment(cfg, verbose=False)
    strategy = (tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(n)]) if n > 1
                else tf.distribute.OneDeviceStrategy("/cpu:0"))
    keras.utils.set_random_seed(0)
    model = exp.create_model(strategy)
    steps = args.warmup + args.steps
    ds = exp.train_dataset(steps=steps, seed=0)
    ends = []

    class Timer(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            ends.append(time.perf_counter())

    model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[Timer()], shuffle=False)
    times = np.diff(ends)[args.warmup - 1:]
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "batch": cfg.train.batch_size,
                      "step_times": [float(t) for t in times]}))


DRIFT_CHECKPOINTS = (1, 5, 10, 20, 40)


def drift_worker(args):
    """In a fresh process with 2 logical CPUs: one device, 2 replicas and a perturbed one device
    trained on the same batches from the same state; print JSON distances at checkpoints."""
    C.quiet_tensorflow()
    from keras_irtf.training.distribute import configure_logical_cpus

    configure_logical_cpus(2)
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_irtf.config import load_config
    from keras_irtf.experiment import Experiment

    steps = args.drift_steps
    cfg = load_config(_config_files(True), [f"train.steps={steps}"])
    exp = Experiment(cfg, verbose=False)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

    def create(s=None):
        keras.utils.set_random_seed(0)
        return exp.create_model(s)

    single, perturbed, mirrored = create(), create(), create(strategy)
    weights = [v.numpy() for v in single.variables]
    slots = [v.numpy() for v in single.optimizer.variables]
    rng = np.random.default_rng(0)
    for model, noise in ((mirrored, 0.0), (perturbed, 1e-7)):
        for v, w in zip(model.variables, weights):
            if noise and np.issubdtype(w.dtype, np.floating) and v.trainable:
                w = (w * (1 + noise * rng.standard_normal(w.shape))).astype(w.dtype)
            v.assign(w)
        for v, w in zip(model.optimizer.variables, slots):
            v.assign(w)
    batches = list(exp.train_dataset(steps=steps, seed=0))
    stacked = {k: tf.concat([b[k] for b in batches], 0) for k in batches[0]}
    start = [v.numpy() for v in single.trainable_variables]

    def l2(a, b):
        return float(np.sqrt(sum(float(np.sum(np.square(x.astype(np.float64) - y))) for x, y in zip(a, b))))

    rows, done = [], 0
    for t in [c for c in DRIFT_CHECKPOINTS if c <= steps]:
        for model in (single, perturbed, mirrored):
            ds = tf.data.Dataset.from_tensor_slices(stacked).batch(cfg.train.batch_size).skip(done).take(t - done)
            model.fit(ds, epochs=1, verbose=0, shuffle=False)
        done = t
        now = [v.numpy() for v in single.trainable_variables]
        travel = l2(now, start)
        rows.append({"step": t, "travel": travel,
                     "perturbed": l2([v.numpy() for v in perturbed.trainable_variables], now) / travel,
                     "mirrored": l2([v.numpy() for v in mirrored.trainable_variables], now) / travel})
    print(json.dumps({"batch": cfg.train.batch_size, "rows": rows}))


def drift_markdown(d):
    lines = [
        f"## Drift over many steps: 2 replicas and a perturbed run against one device "
        f"(TIRG, CSS smoke set, global batch {d['batch']}, dropout on, GA off)",
        "",
        f"Measured {time.strftime('%Y-%m-%d', time.gmtime())}. Distance of each run's weights from the one-device "
        "run's (Euclidean, all trainable weights), as a fraction of the one-device run's travel from its initial "
        "weights. All three runs start from the same state and read the same batches; the perturbed run is one "
        "device from weights multiplied by 1 + 1e-7 N(0, 1) element by element.",
        "",
        "| step | travel | 2 replicas | one device, perturbed by 1e-7 |",
        "|---|---|---|---|",
    ]
    for r in d["rows"]:
        lines.append(f"| {r['step']} | {r['travel']:.3f} | {r['mirrored']:.2e} | {r['perturbed']:.2e} |")
    lines += [
        "",
        "The mirrored run and the perturbed run part from the one-device run at similar rates: rounding-sized "
        "differences grow alike, whatever their source.",
    ]
    return lines


# ---- 4. final recall over seeds: one device against 2 replicas -----------------------------------

RECALL_KS = ("R@1", "R@10")
RECALL_BEGIN = "<!-- recall section: written by benchmarks/distributed.py from the recall .json -->"
RECALL_END = "<!-- end of the recall section -->"


def _betacf(a, b, x):
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a, b, x):
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t, df):
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    t = abs(t)
    if math.isinf(t):
        return 0.0
    return min(1.0, betainc(df / 2.0, 0.5, df / (df + t * t)))


def t_critical(df, level=0.95):
    """The t with P(|T| >= t) = 1 - level."""
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > 1.0 - level:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > 1.0 - level else (lo, mid)
    return (lo + hi) / 2.0


def paired_t_test(diffs, level=0.95):
    """Two-sided one-sample t-test of the paired differences against 0, and the `level` interval of
    their mean."""
    import statistics

    n = len(diffs)
    if n < 2:
        raise ValueError("a paired t-test needs at least 2 pairs")
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    se, df = sd / math.sqrt(n), n - 1
    if se == 0.0:
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    else:
        t = mean / se
    half = t_critical(df, level) * se
    return {"n": n, "df": df, "mean": mean, "sd": sd, "t": t, "p": 1.0 if t == 0.0 else t_two_sided_p(t, df),
            "interval": [mean - half, mean + half], "level": level}


def _ratio(a, b):
    return a / b if b else (0.0 if a == 0 else math.inf)


def _dof(n):
    return f"{n} degree{'' if n == 1 else 's'} of freedom"


def recall_stats(runs):
    """Per recall K: the per-seed points of both runs, their differences, the seed-to-seed spreads and
    the paired t-test (all in points of recall)."""
    import statistics

    out = {}
    for k in RECALL_KS:
        one = [100.0 * r["one_device"]["test"][k] for r in runs]
        mir = [100.0 * r["mirrored"]["test"][k] for r in runs]
        diff = [m - o for m, o in zip(mir, one)]
        seed_sd = statistics.stdev(one)
        out[k] = {"one_device": one, "mirrored": mir, "difference": diff, "seed_sd_one_device": seed_sd,
                  "seed_sd_mirrored": statistics.stdev(mir), "test": paired_t_test(diff),
                  "max_abs_difference_over_seed_sd": _ratio(max(abs(d) for d in diff), seed_sd)}
    return out


def recall_json_path(args) -> Path:
    if args.recall_json:
        return Path(args.recall_json)
    out = Path(args.out)
    return out.with_name(f"{out.stem}_recall.json")


class _LoadSampler:
    """The 1-minute load average, sampled every `every` seconds in a background thread."""

    def __init__(self, every=10.0):
        import threading

        self.samples, self.every = [], every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append(round(os.getloadavg()[0], 2))
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def recall_runs(args, path: Path) -> dict:
    """Train seeds 0 .. N-1 once on one device and once on 2 logical-CPU replicas (tools/train.py,
    fresh processes, one after the other); write the per-seed test recalls to `path` after every
    seed (complete: false until the last one)."""
    import tempfile

    from keras_irtf.data.css_generator import SIZES_PRESETS

    steps = args.recall_steps or (40 if args.quick else 800)
    size = "smoke" if args.quick else "small"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="-1")
    common = ["--dataset", "css", *(["--preset", "smoke"] if args.quick else []), "--steps", str(steps),
              "--set", f"train.steps_per_epoch={steps}", "--set", f"data.image_size={args.recall_image_size}",
              "--quiet"]
    strategies = {"one_device": ["--strategy", "one_device"], "mirrored": ["--strategy", "mirrored", "--devices", "cpu:2"]}
    result = {
        "command": C.command_line(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "config": "configs/css.yaml" + (" + configs/presets/smoke.yaml" if args.quick else ""),
        "train_args": ["tools/train.py", *common],
        "strategy_args": {k: v for k, v in strategies.items()},
        "dataset_size": size, "test_queries": SIZES_PRESETS[size]["test"], "steps": steps,
        "image_size": args.recall_image_size, "complete": False, "load_1min": {"before": round(os.getloadavg()[0], 2)},
        "machine": C.machine_info(), "seeds": [],
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, _LoadSampler() as load:
        for seed in range(args.recall_seeds):
            row = {"seed": seed}
            for name, extra in strategies.items():
                out = Path(tmp) / f"{name}_s{seed}"
                cmd = [sys.executable, str(REPO / "tools" / "train.py"), *common, "--seed", str(seed), *extra,
                       "--out", str(out)]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
                if proc.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
                m = json.loads((out / "metrics.json").read_text())
                row[name] = {"test": m["test"], "replicas": m["replicas"], "batch_size": m["batch_size"],
                             "steps": m["steps"], "seed": m["seed"], "train_seconds": m["train_seconds"],
                             "seconds_per_step": m["seconds_per_step"],
                             "wall_seconds": round(time.perf_counter() - t0, 1),
                             "load_1min_after": round(os.getloadavg()[0], 2)}
                print(f"seed {seed} {name}: test R@1 {100 * m['test']['R@1']:.2f}, R@10 {100 * m['test']['R@10']:.2f} "
                      f"({row[name]['wall_seconds']:.0f} s)", flush=True)
            one, mir = row["one_device"], row["mirrored"]
            if (one["replicas"], mir["replicas"]) != (1, 2) or one["batch_size"] != mir["batch_size"] \
                    or {one["steps"], mir["steps"]} != {steps} or {one["seed"], mir["seed"]} != {seed}:
                raise RuntimeError(f"the paired runs of seed {seed} differ in more than the strategy: {row}")
            result["batch_size"] = one["batch_size"]
            result["seeds"].append(row)
            result["wall_seconds"] = round(time.perf_counter() - start, 1)
            result["load_1min"]["samples"] = list(load.samples)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=1) + "\n")
    result["load_1min"].update(samples=list(load.samples), after=round(os.getloadavg()[0], 2))
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    result["complete"] = True
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _points(values):
    return ", ".join(f"{v:+.2f}" for v in values)


def recall_markdown(r) -> list:
    """The recall section, generated from the .json alone."""
    import statistics

    runs, n = r["seeds"], len(r["seeds"])
    if n < 2:
        return [RECALL_BEGIN, "## Final recall: one device against 2 replicas over seeds", "",
                "Not measured yet (fewer than 2 seeds): run `nice -n 10 python benchmarks/distributed.py "
                "--recall-only --recall-seeds 3`.", "", RECALL_END]
    st = recall_stats(runs)
    load = r["load_1min"]
    samples = load.get("samples") or [load["before"]]
    batch, q = r["batch_size"], r["test_queries"]
    lines = [
        RECALL_BEGIN,
        f"## Final recall: one device against 2 replicas over {n} seeds (TIRG, CSS {r['dataset_size']}, "
        f"{r['steps']} steps)",
        "",
        f"Measured {r['date']} with `{r['command']}`" + ("" if r.get("complete") else " (incomplete: the run stopped "
                                                            "before its last seed)") + ": "
        f"{r['wall_seconds'] / 60:.0f} min for the {2 * n} trainings with their evaluations, on "
        f"{r['machine']['logical_cpus']} logical CPUs ({r['machine']['cpu']}) shared with other jobs; 1-minute load "
        f"average {statistics.fmean(samples):.1f} on average during the run ({min(samples):.1f} to "
        f"{max(samples):.1f}, sampled every 10 s).",
        "",
        f"Each training seed (`train.seed`: initial weights, data order, dropout) trains {r['config']} (TIRG, "
        f"dropout on, GA off) for {r['steps']} steps at global batch {batch} and image size {r['image_size']}, twice: "
        "on one device (`--strategy one_device`) and under MirroredStrategy over 2 logical CPU devices "
        f"(`--strategy mirrored --devices cpu:2`, {batch // 2} rows per replica); nothing else differs. Each run is "
        f"then evaluated on the {q} test queries of the generated CSS {r['dataset_size']} set with TIRG's protocol "
        f"(each query ranked against every test image; one query is {100 / q:.2f} points of recall). Recall in "
        "points; difference = 2 replicas − one device.",
        "",
        "| seed | R@1 one device | R@1 2 replicas | R@1 difference | R@10 one device | R@10 2 replicas "
        "| R@10 difference |",
        "|---|---|---|---|---|---|---|",
    ]
    a, b = st["R@1"], st["R@10"]
    for i, row in enumerate(runs):
        lines.append(f"| {row['seed']} | {a['one_device'][i]:.2f} | {a['mirrored'][i]:.2f} | {a['difference'][i]:+.2f} "
                     f"| {b['one_device'][i]:.2f} | {b['mirrored'][i]:.2f} | {b['difference'][i]:+.2f} |")
    lines.append("| mean | " + " | ".join(
        f"{statistics.fmean(s['one_device']):.2f} | {statistics.fmean(s['mirrored']):.2f} | {s['test']['mean']:+.2f}"
        for s in (a, b)) + " |")
    lines.append("| std over seeds | " + " | ".join(
        f"{s['seed_sd_one_device']:.2f} | {s['seed_sd_mirrored']:.2f} | {s['test']['sd']:.2f}" for s in (a, b)) + " |")
    level = round(100 * a["test"]["level"])
    lines += [
        "",
        "| | R@1 | R@10 |",
        "|---|---|---|",
        "| seed-to-seed spread: std over seeds of the one-device recall | "
        + " | ".join(f"{s['seed_sd_one_device']:.2f}" for s in (a, b)) + " |",
        "| mean difference (2 replicas − one device) | " + " | ".join(f"{s['test']['mean']:+.2f}" for s in (a, b)) + " |",
        f"| {level}% interval of the mean difference (t, {_dof(n - 1)}) | "
        + " | ".join(f"{s['test']['interval'][0]:+.2f} .. {s['test']['interval'][1]:+.2f}" for s in (a, b)) + " |",
        "| largest per-seed abs(difference) / seed-to-seed spread | "
        + " | ".join(f"{s['max_abs_difference_over_seed_sd']:.2f}" for s in (a, b)) + " |",
        "| paired t-test of the difference against 0 (two-sided) | "
        + " | ".join(f"t({n - 1}) = {s['test']['t']:+.2f}, p = {s['test']['p']:.2f}" for s in (a, b)) + " |",
        "",
    ]
    reading = (
        f"Over the {n} seeds, the 2-replica test R@1 differs from the one-device test R@1 by "
        f"{_points(a['difference'])} points (mean {a['test']['mean']:+.2f}, {level}% interval "
        f"{a['test']['interval'][0]:+.2f} to {a['test']['interval'][1]:+.2f}), while the one-device R@1 varies from "
        f"seed to seed with a standard deviation of {a['seed_sd_one_device']:.2f} points; R@10 differs by "
        f"{_points(b['difference'])} points (mean {b['test']['mean']:+.2f}, interval {b['test']['interval'][0]:+.2f} "
        f"to {b['test']['interval'][1]:+.2f}) against a seed-to-seed standard deviation of "
        f"{b['seed_sd_one_device']:.2f}. A paired t-test of the differences gives p = {a['test']['p']:.2f} for R@1 "
        f"and p = {b['test']['p']:.2f} for R@10 ({_dof(n - 1)}). Counted in test queries, the largest per-seed "
        f"difference is {round(max(map(abs, a['difference'])) * q / 100)} of {q} for R@1 and "
        f"{round(max(map(abs, b['difference'])) * q / 100)} for R@10. ")
    significant = [k for k, s in (("R@1", a), ("R@10", b)) if s["test"]["p"] < 0.05]
    within = [k for k, s in (("R@1", a), ("R@10", b)) if s["max_abs_difference_over_seed_sd"] <= 1.0]
    if significant:
        reading += (f"At the 5% level the difference is significant for {' and '.join(significant)}: in this "
                    "measurement the 2-replica runs end with a different recall from the one-device runs. ")
    else:
        reading += "At the 5% level neither difference is significant. "
    if len(within) == 2:
        reading += ("No seed's difference is larger than the seed-to-seed standard deviation of the one-device "
                    "recall, for R@1 or R@10.")
    elif within:
        other = "R@10" if within == ["R@1"] else "R@1"
        s = b if other == "R@10" else a
        reading += (f"No seed's {within[0]} difference is larger than the seed-to-seed standard deviation; the "
                    f"largest {other} difference is {s['max_abs_difference_over_seed_sd']:.2f} times it.")
    else:
        reading += (f"The largest per-seed difference is {a['max_abs_difference_over_seed_sd']:.2f} (R@1) and "
                    f"{b['max_abs_difference_over_seed_sd']:.2f} (R@10) times the seed-to-seed standard deviation.")
    lines += [reading, "", RECALL_END]
    return lines


def recall_summary(r) -> list:
    if len(r["seeds"]) < 2:
        return ["recall over seeds: not measured"]
    st = recall_stats(r["seeds"])
    return [f"final test {k}, 2 replicas − one device over {len(r['seeds'])} seeds: mean {s['test']['mean']:+.2f} "
            f"points (p = {s['test']['p']:.2f}, paired t); seed-to-seed std {s['seed_sd_one_device']:.2f}"
            for k, s in st.items()]


def load_recall(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {"seeds": []}


def replace_recall_section(text: str, section: str) -> str:
    """The report with its recall section replaced (inserted before '## Machine', or appended, when
    it has none)."""
    if RECALL_BEGIN in text and RECALL_END in text:
        i, j = text.index(RECALL_BEGIN), text.index(RECALL_END) + len(RECALL_END)
        return text[:i] + section + text[j:]
    k = text.find("\n## Machine")
    if k < 0:
        return text.rstrip() + "\n\n" + section + "\n"
    return text[:k] + "\n" + section + "\n" + text[k:]


def _run_json(cmd, env=None):
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _train_args(steps, quick, out):
    preset = ["--preset", "smoke"] if quick else []
    return [sys.executable, str(REPO / "tools" / "train.py"), "--dataset", "css", *preset, "--steps", str(steps),
            "--set", f"train.steps_per_epoch={steps}", "--ga", "adversarial,isotropic", "--set", "loss.eta=0.001",
            "--set", "ga.isotropic.exclude=",  # GA^I's noise on every variable, as measured
            "--quiet", "--out", str(out)]


def two_workers(steps, quick, work):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="-1")
    from keras_irtf.training.distribute import localhost_tf_configs

    start = time.perf_counter()
    procs = [subprocess.Popen(_train_args(steps, quick, work / "mw") + ["--strategy", "multi_worker"],
                              env=dict(env, TF_CONFIG=tf_config), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=str(REPO))
             for tf_config in localhost_tf_configs(2)]
    outs = [p.communicate() for p in procs]
    mw_seconds = time.perf_counter() - start
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"a worker failed:\n{err[-3000:]}")
    start = time.perf_counter()
    single = subprocess.run(_train_args(steps, quick, work / "single") + ["--strategy", "one_device"],
                            env=env, capture_output=True, text=True, cwd=str(REPO))
    single_seconds = time.perf_counter() - start
    if single.returncode != 0:
        raise RuntimeError(f"the single-process run failed:\n{single.stderr[-3000:]}")
    mw = json.loads((work / "mw" / "metrics.json").read_text())
    one = json.loads((work / "single" / "metrics.json").read_text())
    return dict(mw_seconds=mw_seconds, single_seconds=single_seconds, mw_train_seconds=mw.get("train_seconds"),
                single_train_seconds=one.get("train_seconds"), mw_r1=mw["test"]["R@1"], single_r1=one["test"]["R@1"])


def main(argv=None):
    args = parse_args(argv)
    if args.steps is None:
        args.steps = 5 if args.quick else 10
    if args.replica_worker:
        replica_worker(args)
        return 0
    if args.drift_worker:
        drift_worker(args)
        return 0
    import statistics
    import tempfile

    json_path = recall_json_path(args)
    if args.recall_seeds == 1 or args.recall_seeds < 0:
        raise SystemExit("--recall-seeds needs at least 2 seeds (3 or more for a meaningful spread), or 0")
    if args.recall_only:
        recall = recall_runs(args, json_path) if args.recall_seeds else load_recall(json_path)
        section = "\n".join(recall_markdown(recall))
        out = Path(args.out)
        if out.exists():
            out.write_text(replace_recall_section(out.read_text(), section))
        else:
            C.write_doc(NAME, f"# Distributed training on this machine ({NAME})\n\n{section}\n", out=out)
        C.print_summary(NAME, recall_summary(recall) + [f"data: {json_path}", f"report: {out}"])
        return 0
    load_before = os.getloadavg()
    base = [sys.executable, str(Path(__file__).resolve()), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    base += ["--quick"] if args.quick else []
    times = {1: [], 2: []}
    for _ in range(args.rounds):
        for n in (1, 2):
            r = _run_json(base + ["--replica-worker", str(n)], env=dict(os.environ, CUDA_VISIBLE_DEVICES="-1"))
            times[n] += r["step_times"]
            batch = r["batch"]
    med = {n: statistics.median(t) for n, t in times.items()}
    worker_steps = args.worker_steps or (4 if args.quick else 20)
    with tempfile.TemporaryDirectory() as tmp:
        w = two_workers(worker_steps, args.quick, Path(tmp))
    drift = _run_json([sys.executable, str(Path(__file__).resolve()), "--drift-worker", "--drift-steps",
                       str(args.drift_steps)], env=dict(os.environ, CUDA_VISIBLE_DEVICES="-1"))
    load_after = os.getloadavg()
    recall = recall_runs(args, json_path) if args.recall_seeds else load_recall(json_path)

    config = "configs/css.yaml + presets/smoke.yaml" if args.quick else "configs/css.yaml"
    lines = [
        f"# Distributed training on this machine ({NAME})",
        "",
        f"Command: `{C.command_line()}`",
        "",
        CLAIM,
        f"## Replicas: MirroredStrategy over logical CPU devices ({config}, global batch {batch}, GA off)",
        "",
        "| replicas | s/step (median) | steps/s | min .. max | timed steps |",
        "|---|---|---|---|---|",
    ]
    for n in (1, 2):
        lines.append(f"| {n} | {med[n]:.3f} | {1 / med[n]:.2f} | {min(times[n]):.3f} .. {max(times[n]):.3f} | {len(times[n])} |")
    lines += [
        "",
        f"2 replicas / 1 replica step time: **{med[2] / med[1]:.2f}x**. Both logical devices run on the same "
        "2 cores: the ratio weighs the replica machinery (per-replica graphs, all-reduce of the gradients, "
        "all-gather of the batch-softmax targets, synchronized batch norm) against the better use of the "
        "cores by two half-batch graphs running side by side; it is not the speed-up of two real devices.",
        "",
        f"## Two workers on localhost (MultiWorkerMirroredStrategy), {worker_steps} steps, GA^A + GA^I + L_S",
        "",
        "| run | wall time of the command (s) | training time (s) | test R@1 |",
        "|---|---|---|---|",
        f"| 2 worker processes | {w['mw_seconds']:.1f} | {w['mw_train_seconds']:.1f} | {w['mw_r1'] * 100:.1f} |",
        f"| 1 process, one device | {w['single_seconds']:.1f} | {w['single_train_seconds']:.1f} | {w['single_r1'] * 100:.1f} |",
        "",
        f"Two workers / one process, wall time: **{w['mw_seconds'] / w['single_seconds']:.2f}x** (two TensorFlow "
        "processes start, exchange every gradient over gRPC, and share the 2 cores). "
        + ("The test recalls agree. " if abs(w["mw_r1"] - w["single_r1"]) < 5e-4 else
           f"The test recalls differ by {abs(w['mw_r1'] - w['single_r1']) * 100:.1f} points: one paired run, whose "
           "trajectories drift apart as described above. ")
        + "tests/test_multi_worker.py checks the weights themselves after two steps.",
        "",
        *drift_markdown(drift),
        "",
        f"Load average before / after (the sections above): {load_before[0]:.1f} / {load_after[0]:.1f}.",
        "",
        *recall_markdown(recall),
        "",
        "## Machine",
        "",
        C.machine_markdown(),
    ]
    path = C.write_doc(NAME, "\n".join(lines) + "\n", out=args.out)
    C.print_summary(NAME, [
        f"1 replica {1 / med[1]:.2f} steps/s, 2 logical-CPU replicas {1 / med[2]:.2f} steps/s "
        f"(2 / 1 step time {med[2] / med[1]:.2f}x; same 2 cores)",
        f"two localhost workers, {worker_steps} steps: {w['mw_seconds']:.0f} s wall vs {w['single_seconds']:.0f} s "
        f"in one process ({w['mw_seconds'] / w['single_seconds']:.2f}x)",
        *recall_summary(recall),
        f"report: {path}",
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
