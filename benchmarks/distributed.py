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
"""

from __future__ import annotations

import argparse
import json
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


def _run_json(cmd, env=None):
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _train_args(steps, quick, out):
    preset = ["--preset", "smoke"] if quick else []
    return [sys.executable, str(REPO / "tools" / "train.py"), "--dataset", "css", *preset, "--steps", str(steps),
            "--set", f"train.steps_per_epoch={steps}", "--ga", "adversarial,isotropic", "--set", "loss.eta=0.001",
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
        f"Load average before / after: {load_before[0]:.1f} / {load_after[0]:.1f}.",
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
        f"report: {path}",
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
