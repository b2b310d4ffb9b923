#!/usr/bin/env python
"""Training throughput of TIRG steps on this CPU, with and without XLA, and the input pipeline's share.

    python benchmarks/train_throughput.py            # both models, 20 / 4 timed steps
    python benchmarks/train_throughput.py --quick    # fewer steps
    python benchmarks/train_throughput.py --skip-main --precisions float32,mixed_bfloat16 \\
        --ga none,adversarial+isotropic --cases small_cnn_64,resnet18_64,resnet18_224
                                                     # the mixed-precision table only
    (mixed_float16 is accepted too, but on a CPU it ran the small CNN at 0.24x float32
    (docs/train_throughput_float16.md): time it on GPUs.)

Configurations (--cases), batch 32, TIRG composer with the LSTM text encoder, SGD with momentum:
- small CNN at 64x64 on the built-in CSS set (images held in memory, as the CSS loader does);
- ResNet-18 at 64x64 on the same in-memory images (for the precision table; not a default case);
- ResNet-18 at 224x224 (TIRG's encoder for MIT-States and Fashion200k) fed by the file pipeline
  those datasets use: JPEG files on disk decoded and resized to 224 inside tf.data (the CSS
  scenes are written as 300x300 JPEGs for this).

For each configuration and for jit_compile off / on (XLA), in a fresh subprocess:
- step time with the REAL input pipeline (model.fit on the tf.data pipeline);
- step time on ONE batch held in memory (the same fit, the pipeline replaced by a repeated
  tensor): the compute alone;
- share of step time spent waiting on the input pipeline = 1 - in-memory time / real time (on 2
  cores the pipeline's threads also compete with the step for the CPU, which this includes);
- the pipeline alone (iterating the tf.data pipeline without training), in batches per second.
Step times are measured between the ends of consecutive steps after warm-up steps (graph tracing
and XLA compilation are not timed); real-pipeline and in-memory timings alternate in rounds.

Precision (--precisions) and GA (--ga: "none", or methods joined by "+") dimensions: for each
configuration and GA setting ONE subprocess builds a model per train.precision policy (the
assembler gives each its own policy; nothing global) and alternates in-memory timing rounds over
them, so that the steps/s ratio to float32 is measured under the same load. No XLA; the input
pipeline does not depend on the precision. --skip-main leaves out the table above (XLA, pipeline).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "train_throughput"
BATCH = 32
CASES = {
    "small_cnn_64": dict(
        label="small CNN, 64x64, CSS (in-memory images)",
        overrides=["model.image_encoder=small_cnn", "data.image_size=64"],
        files=False,
    ),
    "resnet18_64": dict(
        label="ResNet-18, 64x64, CSS (in-memory images)",
        overrides=["model.image_encoder=resnet18", "data.image_size=64", "model.text_encoder.word_embed_dim=512",
                   "model.text_encoder.hidden_dim=512"],
        files=False,
    ),
    "resnet18_224": dict(
        label="ResNet-18, 224x224, JPEG files decoded in tf.data",
        overrides=["model.image_encoder=resnet18", "data.image_size=224", "model.text_encoder.word_embed_dim=512",
                   "model.text_encoder.hidden_dim=512"],
        files=True,
    ),
}


def _jpeg_split(split, folder, size=300):
    """The split's images written as JPEG files, and a Split that reads them from disk."""
    import dataclasses

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, arr in enumerate(split.images):
        p = folder / f"{split.name}_{i:06d}.jpg"
        Image.fromarray(arr).resize((size, size), Image.BILINEAR).save(p, quality=90)
        paths.append(str(p))
    return dataclasses.replace(split, images=None, image_paths=paths)


class StepTimer:
    """Times the ends of training steps (a Keras callback, built lazily to import keras late)."""

    def __new__(cls):
        import keras

        class _Timer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.ends = []

            def on_train_batch_end(self, batch, logs=None):
                self.ends.append(time.perf_counter())

        return _Timer()


def _case_config(args):
    """(CSS smoke root, generated once in the worker's temporary folder; a function of extra
    overrides -> the case's config at batch BATCH): what both workers start from."""
    from keras_irtf.config import load_config, repo_configs_dir
    from keras_irtf.data.css_generator import generate

    case = CASES[args.worker]
    root = Path(args.tmp) / "css"
    if not root.exists():
        generate(root, size="smoke", seed=0, verbose=False)

    def config_for(*extra):
        return load_config([repo_configs_dir() / "css.yaml"],
                           case["overrides"] + [f"data.root={root}", f"train.batch_size={BATCH}", *extra])

    return root, config_for


def worker(args):
    C.quiet_tensorflow()
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_irtf.data.css import CSSDataset
    from keras_irtf.experiment import Experiment

    case = CASES[args.worker]
    tmp = Path(args.tmp)
    root, config_for = _case_config(args)
    cfg = config_for(f"train.jit_compile={args.xla}")
    keras.utils.set_random_seed(0)
    dataset = CSSDataset(root, image_size=cfg.data.image_size, verbose=False)
    if case["files"]:
        dataset.train = _jpeg_split(dataset.train, tmp / "jpeg")
    exp = Experiment(cfg, dataset=dataset, verbose=False)
    model = exp.create_model()  # compiled with train.jit_compile = --xla
    ds = exp.train_dataset(steps=8 * (args.warmup + args.steps) + 16, seed=0)
    result = {"case": args.worker, "xla": args.xla, "params": None}

    def step_intervals(data, steps):
        """Intervals between the ends of consecutive steps, from the end of the first step (the
        first step of a fit also fills the pipeline's prefetch buffer)."""
        timer = StepTimer()
        model.fit(data, epochs=1, steps_per_epoch=steps + 1, verbose=0, callbacks=[timer])
        return list(np.diff(timer.ends))

    try:  # warm-up: tracing and XLA compilation, not timed
        step_intervals(ds, args.warmup)
    except Exception as e:  # XLA may refuse a model: report, do not crash the suite
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        print(json.dumps(result))
        return
    result["params"] = int(model.count_params())
    memory = tf.data.Dataset.from_tensors(next(iter(ds))).repeat()
    # real pipeline and in-memory batch alternate in rounds, so that a change in the machine's
    # load during the run affects both alike
    rounds = max(1, min(args.rounds, args.steps))
    real, mem = [], []
    for r in range(rounds):
        n = args.steps // rounds + (1 if r < args.steps % rounds else 0)
        real += step_intervals(ds, n)
        mem += step_intervals(memory, n)
    t_real, t_mem = float(np.mean(real)), float(np.mean(mem))
    it = iter(exp.train_dataset(steps=args.steps + 2, seed=1))
    next(it)
    start = time.perf_counter()
    n = 0
    for _ in it:
        n += 1
    t_pipe = (time.perf_counter() - start) / max(n, 1)
    result.update(step_s_real=t_real, step_s_memory=t_mem, pipeline_s_per_batch=t_pipe,
                  examples_per_s=BATCH / t_real, examples_per_s_memory=BATCH / t_mem,
                  pipeline_wait_share=max(0.0, 1.0 - t_mem / t_real), timed_steps=args.steps)
    print(json.dumps(result))


def precision_worker(args):
    """One configuration and GA setting, a model per precision policy, timed in alternating
    rounds on one batch held in memory."""
    C.quiet_tensorflow()
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_irtf.data.css import CSSDataset
    from keras_irtf.experiment import Experiment

    root, config_for = _case_config(args)
    ga = "none" if args.ga_methods == "none" else args.ga_methods.replace("+", ",")
    dataset = None
    models, batch = {}, None
    for precision in args.precision_set.split(","):
        # GA^I's noise on every variable: the paper's GA^I, its largest cost
        cfg = config_for(f"train.precision={precision}", f"ga.methods={ga}", "ga.isotropic.exclude=")
        keras.utils.set_random_seed(0)
        if dataset is None:
            dataset = CSSDataset(root, image_size=cfg.data.image_size, verbose=False)
        exp = Experiment(cfg, dataset=dataset, verbose=False)
        models[precision] = exp.create_model()
        if batch is None:
            batch = exp.sample_batch()
    memory = tf.data.Dataset.from_tensors(batch).repeat()

    def step_intervals(model, steps):
        timer = StepTimer()
        model.fit(memory, epochs=1, steps_per_epoch=steps + 1, verbose=0, callbacks=[timer])
        return list(np.diff(timer.ends))

    for model in models.values():  # warm-up: tracing, not timed
        step_intervals(model, args.warmup)
    times = {p: [] for p in models}
    loads = []
    rounds = max(1, min(args.rounds, args.steps))
    for r in range(rounds):
        n = args.steps // rounds + (1 if r < args.steps % rounds else 0)
        for p, model in models.items():
            times[p] += step_intervals(model, n)
        loads.append(os.getloadavg()[0])
    result = {"case": args.worker, "ga": args.ga_methods, "timed_steps": args.steps, "rounds": rounds,
              "load_average": [round(x, 2) for x in loads], "policies": {}}
    for p, ts in times.items():
        skipped = models[p].get_metrics_result().get("skipped_steps")
        result["policies"][p] = {"step_s_memory": float(np.mean(ts)), "examples_per_s_memory": BATCH / float(np.mean(ts)),
                                 "skipped_steps_last_round": None if skipped is None else float(skipped)}
    print(json.dumps(result))


def run_precision_case(case, ga, precisions, args, tmp):
    steps = args.steps_for[case]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", case, "--precision-set", ",".join(precisions),
           "--ga-methods", ga, "--steps", str(steps), "--warmup", str(args.warmup),
           "--rounds", str(args.precision_rounds), "--tmp", tmp]
    print(f"[{NAME}] {case}, GA {ga}, {'/'.join(precisions)}: {steps} timed steps each in "
          f"{args.precision_rounds} alternating rounds ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        print(f"[{NAME}]   not measured: exit {proc.returncode}: {tail[0][:300]}", flush=True)
        return {"case": case, "ga": ga, "error": f"exit {proc.returncode}: {tail[0][:300]}"}
    r = json.loads(lines[-1])
    base = r["policies"].get("float32")
    for p, v in r["policies"].items():
        ratio = f", {v['examples_per_s_memory'] / base['examples_per_s_memory']:.2f}x float32" if base else ""
        print(f"[{NAME}]   {p}: {v['examples_per_s_memory']:.1f} examples/s{ratio}", flush=True)
    print(f"[{NAME}]   load average {r['load_average']}", flush=True)
    return r


def _precision_rows(results, cases, gas, precisions):
    rows = ["| configuration | GA | precision | examples/s (batch in memory) | step (s) | vs float32 | load average (per round) |",
            "|---|---|---|---|---|---|---|"]
    for case in cases:
        for ga in gas:
            r = results.get((case, ga), {})
            label = CASES[case]["label"]
            if "error" in r:
                rows.append(f"| {label} | {ga} | all | not measured: {r['error']} | | | |")
                continue
            base = r["policies"].get("float32")
            for p in precisions:
                v = r["policies"][p]
                ratio = f"{v['examples_per_s_memory'] / base['examples_per_s_memory']:.2f}x" if base else "n/a"
                rows.append(f"| {label} | {ga} | {p} | {v['examples_per_s_memory']:.1f} | {v['step_s_memory']:.3f} | "
                            f"{ratio} | {', '.join(str(x) for x in r['load_average'])} |")
    return rows


def run_case(case, xla, args, tmp):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", case, "--xla", str(xla),
           "--steps", str(args.steps_for[case]), "--warmup", str(args.warmup), "--rounds", str(args.rounds), "--tmp", tmp]
    print(f"[{NAME}] {case}, jit_compile={xla}: {args.steps_for[case]} timed steps ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"case": case, "xla": xla, "error": f"exit {proc.returncode}: {tail[0][:300]}"}
    r = json.loads(lines[-1])
    if "error" not in r:
        print(f"[{NAME}]   {r['examples_per_s']:.1f} examples/s, waiting on input "
              f"{100 * r['pipeline_wait_share']:.0f}%", flush=True)
    else:
        print(f"[{NAME}]   not possible: {r['error']}", flush=True)
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer timed steps (8 small CNN, 2 ResNet-18)")
    p.add_argument("--cases", default="small_cnn_64,resnet18_224", help=f"comma-separated subset of {list(CASES)}")
    p.add_argument("--steps-small", type=int, default=20)
    p.add_argument("--steps-resnet", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="alternations of real-pipeline and in-memory timing")
    p.add_argument("--no-xla", action="store_true", help="skip the jit_compile=True runs")
    p.add_argument("--precisions", default="float32",
                   help="comma-separated train.precision policies for the precision table (float32 first)")
    p.add_argument("--ga", default="none", help="comma-separated GA settings for the precision table: none, or "
                                                "methods joined by + (adversarial+isotropic)")
    p.add_argument("--precision-rounds", type=int, default=2, help="alternations over the policies")
    p.add_argument("--skip-main", action="store_true", help="only the precision table (no XLA / pipeline table)")
    p.add_argument("--out", help="report path (default docs/train_throughput.md)")
    p.add_argument("--worker", choices=list(CASES), help=argparse.SUPPRESS)
    p.add_argument("--xla", type=lambda s: s == "True", default=False, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--precision-set", help=argparse.SUPPRESS)
    p.add_argument("--ga-methods", default="none", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker and args.precision_set:
        return precision_worker(args)
    if args.worker:
        return worker(args)
    if args.quick:
        args.steps_small, args.steps_resnet = min(args.steps_small, 8), min(args.steps_resnet, 2)
    args.steps_for = {"small_cnn_64": args.steps_small, "resnet18_64": args.steps_small,
                      "resnet18_224": args.steps_resnet}
    precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
    gas = [x.strip() for x in args.ga.split(",") if x.strip()]
    from keras_irtf.config import choices

    known = choices("train.precision")
    if any(x not in known for x in precisions):
        p.error(f"--precisions: expected a subset of {list(known)}")
    if "float32" in precisions:
        precisions = ["float32"] + [x for x in precisions if x != "float32"]
    study = len(precisions) > 1 or gas != ["none"]
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"--cases: unknown {unknown}; expected a subset of {list(CASES)}")

    results, study_results = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            if not args.skip_main:
                for xla in ([False] if args.no_xla else [False, True]):
                    results[(case, xla)] = run_case(case, xla, args, tmp)
            if study:
                for ga in gas:
                    study_results[(case, ga)] = run_precision_case(case, ga, precisions, args, tmp)

    rows = ["| configuration | XLA | examples/s (real pipeline) | step (s) | examples/s (batch in memory) | "
            "step in memory (s) | waiting on input | pipeline alone (batches/s) |",
            "|---|---|---|---|---|---|---|---|"]
    summary = []
    for (case, xla), r in results.items():
        label = CASES[case]["label"]
        if "error" in r:
            rows.append(f"| {label} | {'on' if xla else 'off'} | not possible: {r['error']} | | | | | |")
            continue
        rows.append(f"| {label} | {'on' if xla else 'off'} | {r['examples_per_s']:.1f} | {r['step_s_real']:.3f} | "
                    f"{r['examples_per_s_memory']:.1f} | {r['step_s_memory']:.3f} | "
                    f"{100 * r['pipeline_wait_share']:.0f}% | {1 / r['pipeline_s_per_batch']:.1f} |")
    ratio_rows = ["| configuration | XLA speed-up (examples/s with / without) | input-pipeline share (no XLA) |",
                  "|---|---|---|"]
    for case in cases:
        off, on = results.get((case, False), {}), results.get((case, True), {})
        if "examples_per_s" not in off:
            continue
        speed = f"{on['examples_per_s'] / off['examples_per_s']:.2f}x" if "examples_per_s" in on else (
            "not measured" if args.no_xla else "XLA not possible")
        ratio_rows.append(f"| {CASES[case]['label']} | {speed} | {100 * off['pipeline_wait_share']:.0f}% |")
        summary.append(f"{case}: {off['examples_per_s']:.1f} examples/s without XLA"
                       + (f", {on['examples_per_s']:.1f} with XLA ({speed})" if "examples_per_s" in on else f" ({speed})")
                       + f"; {100 * off['pipeline_wait_share']:.0f}% of step time waiting on input")
    params = {case: r.get("params") for (case, _), r in results.items() if r.get("params")}
    if results:
        intro = (f"Batch {BATCH}; TIRG composer, LSTM text encoder, SGD with momentum, plain cross-entropy over the\n"
                 f"batch (no gradient augmentation: benchmarks/ga_overhead.py measures its cost). Parameters:\n"
                 f"{', '.join(f'{c} {n:,}' for c, n in params.items()) or 'n/a'}. Timed steps: {args.steps_small} "
                 f"(small CNN),\n{args.steps_resnet} (ResNet-18), after {args.warmup} warm-up steps.")
    else:
        intro = (f"Batch {BATCH}; TIRG composer, LSTM text encoder, SGD with momentum, cross-entropy over the batch\n"
                 f"(+ GA where the GA column says so).")
    main_md = (f"{chr(10).join(rows)}\n\n{chr(10).join(ratio_rows)}\n" if results else
               "(--skip-main: the XLA and input-pipeline tables were not measured in this run)\n")
    precision_md = ""
    if study:
        precision_md = f"""
## Mixed precision and gradient augmentation

`train.precision` policies, one batch held in memory (compute only: the ResNet-18 224x224 rows
too, without the JPEG pipeline of the table above), no XLA. For each configuration and
GA setting one process holds a model per policy and alternates {args.precision_rounds} timing rounds
over them ({'/'.join(str(args.steps_for[c]) for c in cases)} timed steps per policy for
{'/'.join(cases)}, after {args.warmup} warm-up steps), so "vs float32" compares steps/s measured
under the same load; the 1-minute load average after each round is listed (the machine is shared:
absolute figures move with it, the ratios much less). GA^A+GA^I: `ga.methods=adversarial,isotropic`
with their defaults. mixed_float16 includes dynamic loss scaling (an overflowing step is skipped,
not cheaper).

{chr(10).join(_precision_rows(study_results, cases, gas, precisions))}
"""
        for (case, ga), r in study_results.items():
            base = r.get("policies", {}).get("float32")
            for p, v in r.get("policies", {}).items():
                if base and p != "float32":
                    summary.append(f"{case}, GA {ga}: {p} {v['examples_per_s_memory'] / base['examples_per_s_memory']:.2f}x "
                                   f"float32 (load {r['load_average']})")
    body = f"""# Training throughput: TIRG steps on this CPU

Command: `{C.command_line()}`

{intro}

## Results

{main_md}{precision_md}
## Method

- Each configuration and XLA setting runs in a fresh subprocess (`model.fit`, `jit_compile` as
  listed). Step time = mean interval between the ends of consecutive steps after warm-up (the
  first step of every fit, which also fills the prefetch buffer, is left out). Real-pipeline and
  in-memory timings alternate in {args.rounds} rounds so that a change of load affects both.
- "Batch in memory": the same fit on one batch repeated from memory, i.e. the step without any
  input work. "Waiting on input" = 1 - (in-memory step time / real step time).
- "Pipeline alone": iterating the training tf.data pipeline without a model.
- The small-CNN case reads CSS images from memory (the CSS loader decodes them once); the
  ResNet-18 case decodes 300x300 JPEG files and resizes them to 224 in tf.data, as the
  MIT-States and Fashion200k loaders do.
- Other work on the machine slows every figure: compare the ratios, which were measured back
  to back, rather than absolute figures across reports (the load average at the end of the
  run is in the table below).

## Machine

{C.machine_markdown()}
"""
    path = C.write_doc(NAME, body, args.out)
    print(f"[{NAME}] wrote {path}")
    C.print_summary(NAME, summary or ["no configuration could be measured (see the report)"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
