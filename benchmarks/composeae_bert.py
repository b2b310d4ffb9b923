#!/usr/bin/env python
"""ComposeAE and TIRG-BERT on the built-in CSS benchmark with a tiny random BERT, and the cost of a
training step with and without the text-embedding cache.

    nice -n 10 python benchmarks/composeae_bert.py           # -> docs/composeae_bert.md (+ .json)
    python benchmarks/composeae_bert.py --quick              # 40 steps, 2-layer "big" BERT: a smoke test
    python benchmarks/composeae_bert.py --steps 1000 --timing-rounds 5

1. Recall: train TIRG-BERT and ComposeAE (configs/css_tirg_bert.yaml, configs/css_composeae.yaml)
   for --steps steps with a tiny random TF-Hub BERT pair (1 layer, 768-d, written to a temporary
   folder; no network) and report test/train recall and WHM. A random BERT gives each distinct
   text a fixed, distinct embedding but no language knowledge, so these figures measure the
   composers, not BERT.
2. Speed: seconds per ComposeAE training step, same model, same batches, with the cache (BERT runs
   once per distinct text before training) and without it (BERT runs inside every step), for the
   tiny BERT and for a BERT-Base-sized keras-hub backbone (12 layers, 768-d, 12 heads, random
   weights). Both models are built side by side and timed in alternating rounds (cached first in
   even rounds, uncached first in odd ones), so that a change of machine load hits both alike;
   the figure of each setting is the median step over all its rounds, and the ratio is
   uncached / cached. Graph tracing (the warm-up fit) and the first step of every round (which
   also waits for the input pipeline to start) are left out.

Both parts go into one report, docs/composeae_bert.md, with the raw figures in docs/composeae_bert.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(1, str(Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import _common as C  # noqa: E402

NAME = "composeae_bert"
TINY = "tiny TF-Hub BERT (1 layer, 768-d)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="training steps of each recall run")
    p.add_argument("--timing-steps", type=int, default=3, help="steps timed per setting in each round")
    p.add_argument("--timing-rounds", type=int, default=3, help="alternating rounds of cached / uncached timing")
    p.add_argument("--warmup", type=int, default=2, help="steps of the untimed first fit of each model (tracing)")
    p.add_argument("--big-layers", type=int, default=12, help="layers of the BERT-Base-sized backbone")
    p.add_argument("--quick", action="store_true",
                   help="40 training steps, 2 rounds of 2 steps, a 2-layer 'big' backbone (a smoke test)")
    p.add_argument("--methods", default="tirg,composeae")
    p.add_argument("--skip-recall", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    p.add_argument("--out", help="report path (default docs/composeae_bert.md; the .json next to it)")
    p.add_argument("--work", default=None, help="folder for runs and the tiny models (default: a temp folder)")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite the report from the .json of an earlier run (no measurement)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 40)
        args.timing_steps, args.timing_rounds = min(args.timing_steps, 2), min(args.timing_rounds, 2)
        args.warmup, args.big_layers = min(args.warmup, 1), min(args.big_layers, 2)
    return args


def config_for(method, overrides):
    from keras_irtf.config import load_config, repo_configs_dir

    name = "css_composeae.yaml" if method == "composeae" else "css_tirg_bert.yaml"
    return load_config([repo_configs_dir() / name], overrides)


class StepTimer:
    """Keras callback: wall time of every training batch."""

    def __init__(self):
        import keras

        class _CB(keras.callbacks.Callback):
            def on_train_batch_begin(cb, batch, logs=None):
                cb.t0 = time.perf_counter()

            def on_train_batch_end(cb, batch, logs=None):
                self.times.append(time.perf_counter() - cb.t0)

        self.times = []
        self.callback = _CB()


class TimedSetting:
    """One model (cached or uncached text input) with its own fixed batches, ready to be timed."""

    def __init__(self, cfg, dataset, use_cache, batches):
        import keras

        from keras_irtf.experiment import Experiment

        keras.utils.set_random_seed(cfg.train.seed)
        cfg = cfg.copy()
        cfg.model.text_encoder.cache = bool(use_cache)
        exp = Experiment(cfg, dataset=dataset, verbose=False)
        self.model = exp.build_model(0)
        t0 = time.perf_counter()
        exp.attach_text_input(self.model)
        self.fill_seconds = time.perf_counter() - t0 if use_cache else 0.0
        exp.compile(self.model)
        # the same batches in every round: each fit iterates this dataset from its start
        self.ds = exp.train_dataset(steps=batches)
        self.times = []  # seconds of every timed step
        self.round_medians = []
        self.bert_runs = 0

    def fit(self, steps, record=True):
        """One fit of `steps` + 1 steps; the first is not recorded."""
        import numpy as np

        timer = StepTimer()
        runs = self.model.text_encoder.encoder_runs
        self.model.fit(self.ds, epochs=1, steps_per_epoch=steps + 1, verbose=0, shuffle=False,
                       callbacks=[timer.callback])
        if record:
            t = timer.times[1:]  # the first step of a fit also waits for the pipeline's first batch
            self.times += t
            self.round_medians.append(float(np.median(t)))
            self.bert_runs += self.model.text_encoder.encoder_runs - runs


def time_cache(cfg, dataset, args):
    """Interleaved rounds of cached and uncached ComposeAE steps; medians and their ratio."""
    import numpy as np

    settings = {}
    for use_cache in (True, False):
        key = "cached" if use_cache else "uncached"
        settings[key] = TimedSetting(cfg, dataset, use_cache, max(args.timing_steps, args.warmup) + 1)
        print(f"   {key}: built" + (f", cache filled in {settings[key].fill_seconds:.1f} s" if use_cache else ""),
              flush=True)
    for s in settings.values():  # tracing
        s.fit(args.warmup, record=False)
    loads = []  # 1-minute load average after each round
    for r in range(args.timing_rounds):
        order = ("cached", "uncached") if r % 2 == 0 else ("uncached", "cached")
        for key in order:
            settings[key].fit(args.timing_steps)
        loads.append(round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None)
        print(f"   round {r + 1}: cached {settings['cached'].round_medians[-1]:.3f} s/step, "
              f"uncached {settings['uncached'].round_medians[-1]:.3f} s/step", flush=True)
    row = {}
    for key, s in settings.items():
        row[key] = {"median": float(np.median(s.times)), "mean": float(np.mean(s.times)), "steps": len(s.times),
                    "round_medians": [round(x, 4) for x in s.round_medians],
                    "cache_fill_seconds": round(s.fill_seconds, 2),
                    "bert_runs_during_timed_steps": s.bert_runs}
    row["ratio_uncached_over_cached"] = row["uncached"]["median"] / row["cached"]["median"]
    per_round = [u / c for u, c in zip(settings["uncached"].round_medians, settings["cached"].round_medians)]
    row["ratio_per_round"] = [round(x, 3) for x in per_round]
    row["load_1min_per_round"] = loads
    del settings
    gc.collect()
    return row


def big_backbone(folder: Path, texts, layers: int) -> Path:
    """A BERT-Base-sized keras-hub preset (random weights, `layers` layers) saved to `folder`."""
    import keras_hub

    from keras_irtf.testing.tiny_bert import word_vocabulary

    if not (folder / "config.json").is_file():
        tok = keras_hub.models.BertTokenizer(vocabulary=word_vocabulary(texts), lowercase=True)
        keras_hub.models.BertTextClassifierPreprocessor(tok, sequence_length=32).save_to_preset(str(folder))
        keras_hub.models.BertBackbone(vocabulary_size=30522, num_layers=layers, num_heads=12, hidden_dim=768,
                                      intermediate_dim=3072).save_to_preset(str(folder))
    return folder


def main(argv=None):
    args = parse_args(argv)
    if args.render_only:
        return C.render_only(NAME, args.out, write_report, summary_lines)
    from keras_irtf.data.text_cache import texts_of_run
    from keras_irtf.experiment import Experiment
    from keras_irtf.testing.tiny_bert import make_tiny_hub_bert
    from keras_irtf.training.loop import format_results, train

    started = time.time()
    work = Path(args.work or tempfile.mkdtemp(prefix="composeae_bert_"))
    work.mkdir(parents=True, exist_ok=True)
    base_cfg = config_for("tirg", args.set)
    dataset = Experiment(base_cfg).dataset
    texts = texts_of_run(dataset)
    print(f"{len(texts)} distinct texts in the run", flush=True)
    pre, enc = make_tiny_hub_bert(work / "tiny_hub_bert", texts, hidden_size=768)
    hub = [f"model.text_encoder.preprocess={pre}", f"model.text_encoder.encoder={enc}", "model.text_encoder.dim=768"]
    results = {"command": C.command_line(), "steps": args.steps, "quick": args.quick, "overrides": args.set,
               "distinct_texts": len(texts), "batch_size": base_cfg.train.batch_size,
               "timing_steps": args.timing_steps, "timing_rounds": args.timing_rounds,
               "skipped": [part for part, skip in (("recall", args.skip_recall), ("timing", args.skip_timing)) if skip],
               "recall": {}, "timing": {}}

    if not args.skip_recall:
        for method in args.methods.split(","):
            cfg = config_for(method, hub + [f"train.steps={args.steps}", f"train.out={work / ('run_' + method)}"]
                             + args.set)
            print(f"== {method}: {args.steps} steps", flush=True)
            run, metrics = train(cfg, verbose=2, dataset=dataset, overwrite=True)  # --work may hold an earlier run
            results["recall"][method] = {k: metrics[k] for k in ("test", "train", "whm", "steps", "batch_size",
                                                                  "train_seconds", "seconds_per_step",
                                                                  "bert_encoder_runs", "text_cache_size")}
            results["recall"][method]["table"] = format_results(metrics)
            print(format_results(metrics), flush=True)
            write_report(args.out, results)

    if not args.skip_timing:
        big = big_backbone(work / f"bert_base_sized_{args.big_layers}l", texts, args.big_layers)
        big_label = (f"BERT-Base-sized keras-hub backbone ({args.big_layers} layers, 768-d)" if args.big_layers == 12
                     else f"BERT-Base-width keras-hub backbone ({args.big_layers} layers, 768-d; --quick)")
        sources = {
            TINY: hub,
            big_label: ["model.text_encoder=bert_keras_hub", f"model.text_encoder.preset={big}", "model.text_encoder.dim=768"],
        }
        for label, src in sources.items():
            cfg = config_for("composeae", src + args.set)
            print(f"== timing {label}: {args.timing_rounds} rounds of {args.timing_steps} steps", flush=True)
            row = time_cache(cfg, dataset, args)
            results["timing"][label] = row
            print(json.dumps(row, indent=1), flush=True)
            write_report(args.out, results)
    results["seconds"] = round(time.time() - started, 1)
    results["machine"] = C.machine_markdown()  # as measured at the end of the run (kept by --render-only)
    path = write_report(args.out, results)
    print(f"[{NAME}] wrote {path} in {results['seconds'] / 60:.1f} min")
    C.print_summary(NAME, summary_lines(results))
    return 0


def summary_lines(results):
    out = []
    for method, r in results["recall"].items():
        name = "TIRG-BERT" if method == "tirg" else "ComposeAE" if method == "composeae" else method
        out.append(f"{name} on CSS small, tiny random BERT, {r['steps']} steps (batch {r['batch_size']}): "
                   f"test R@1 {100 * r['test']['R@1']:.1f}, WHM {100 * r['whm']['value']:.1f}; "
                   f"{r['seconds_per_step']} s/step with the cache")
    for label, row in results["timing"].items():
        c, u = row["cached"], row["uncached"]
        out.append(f"ComposeAE step, {label}: {c['median']:.3f} s cached, {u['median']:.3f} s uncached: "
                   f"uncached / cached = {row['ratio_uncached_over_cached']:.2f}x "
                   f"(per round {min(row['ratio_per_round']):.2f}..{max(row['ratio_per_round']):.2f})")
    for part in results["skipped"]:
        out.append(f"{part} part skipped (--skip-{part})")
    return out


def write_report(out, results) -> Path:
    path = Path(out) if out else C.DOCS / f"{NAME}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    done = "seconds" in results
    lines = [
        "# ComposeAE and TIRG-BERT on the built-in CSS benchmark (`small`), with and without the text cache",
        "",
        f"Command: `{results['command']}`" + ("" if done else " (partial report: the run was still going)"),
        "",
        f"Batch {results['batch_size']}; {results['distinct_texts']} distinct texts in the run (training and test "
        "queries). The BERT models are random (no network here): a random BERT gives each distinct text a "
        "fixed, distinct embedding without any language knowledge, so the recalls measure the composers, not "
        "BERT, and are not comparable with published BERT figures.",
        "",
    ]
    if results["recall"]:
        lines += [f"## Recall after {results['steps']} training steps (tiny random TF-Hub BERT, 1 layer, 768-d)", ""]
        for method, r in results["recall"].items():
            name = "TIRG-BERT" if method == "tirg" else "ComposeAE" if method == "composeae" else method
            cfg = "configs/css_composeae.yaml" if method == "composeae" else "configs/css_tirg_bert.yaml"
            lines += [f"### {name} (`{cfg}`): {r['steps']} steps, batch {r['batch_size']}, "
                      f"{r['seconds_per_step']} s/step, {r['train_seconds']:.0f} s of training", "",
                      r["table"], "",
                      f"BERT encoder calls in the whole run (cache fill and evaluation included): "
                      f"{r['bert_encoder_runs']}; cache of {r['text_cache_size']} texts.", ""]
    elif "recall" in results["skipped"]:
        lines += ["Recall part skipped (`--skip-recall`).", ""]
    if results["timing"]:
        lines += [
            "## Seconds per ComposeAE training step with and without the text-embedding cache",
            "",
            f"Same model, same batches; {results['timing_rounds']} alternating rounds of {results['timing_steps']} "
            "timed steps per setting (cached first in even rounds, uncached first in odd ones); the median step of "
            "each setting over all rounds. Cached: the step gathers precomputed rows (BERT ran once per distinct "
            "text before training: 'cache fill'). Uncached: BERT tokenizes and encodes the batch's texts inside "
            "every step.",
            "",
            "| BERT | cached s/step | uncached s/step | uncached / cached | per-round ratios | BERT calls during the "
            "timed rounds (cached / uncached) | cache fill (s, once) |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, row in results["timing"].items():
            c, u = row["cached"], row["uncached"]
            lines.append(
                f"| {label} | {c['median']:.3f} | {u['median']:.3f} | {row['ratio_uncached_over_cached']:.2f}x | "
                f"{', '.join(f'{x:.2f}' for x in row['ratio_per_round'])} | "
                f"{c['bert_runs_during_timed_steps']} / {u['bert_runs_during_timed_steps']} | "
                f"{c['cache_fill_seconds']} |")
        loads = {label: row["load_1min_per_round"] for label, row in results["timing"].items()
                 if row.get("load_1min_per_round")}
        if loads:
            lines.append("1-minute load average after each round: " + "; ".join(
                f"{label}: {', '.join(C.fmt(x, 2) for x in v)}" for label, v in loads.items()) + ".")
        lines.append("")
        tiny = results["timing"].get(TINY)
        big = [(label, row) for label, row in results["timing"].items() if label != TINY]
        if tiny:
            t = tiny["ratio_uncached_over_cached"]
            lo, hi = min(tiny["ratio_per_round"]), max(tiny["ratio_per_round"])
            spread = f"per-round ratios {lo:.2f}..{hi:.2f}"
            if t < 1.0:
                lines.append(
                    f"Reading: with the 1-layer tiny BERT the cache made no measurable difference ({t:.2f}x, {spread}): "
                    "the cached step does strictly less work, so a ratio below 1 is the timing noise of this run.")
            else:
                lines.append(
                    f"Reading: with the 1-layer tiny BERT, encoding a batch of short texts is a small part of a "
                    f"step: over all rounds the cache saves {100 * (1 - 1 / t):.0f}% of a step ({spread}"
                    + (f"; the rounds disagree, so the saving is only known to lie between "
                       f"{max(0.0, 100 * (1 - 1 / lo)):.0f}% and {100 * (1 - 1 / hi):.0f}%)." if hi - lo > 0.15 else ")."))
        for label, b in big:
            fill_steps = b["cached"]["cache_fill_seconds"] / max(b["uncached"]["median"], 1e-9)
            lines.append(
                f"With the {label}, running BERT inside every step makes a step "
                f"{b['ratio_uncached_over_cached']:.1f}x slower; the cache's one-off fill took "
                f"{b['cached']['cache_fill_seconds']} s, the time of {fill_steps:.1f} uncached steps, after which "
                "a step only gathers rows of the cache.")
        cached = [row["cached"]["median"] for row in results["timing"].values()]
        if len(cached) > 1 and max(cached) > 1.2 * min(cached):
            lines.append(
                f"The cached step does the same work in every row, yet its median ranged over "
                f"{min(cached):.3f}..{max(cached):.3f} s between rows: the machine's load changed between them "
                "(other jobs), so compare the ratios within a row, whose rounds alternate, not seconds across rows.")
        lines.append("")
    elif "timing" in results["skipped"]:
        lines += ["Timing part skipped (`--skip-timing`).", ""]
    if done:
        lines += [f"Whole benchmark: {results['seconds'] / 60:.1f} min.", ""]
    lines += ["## Machine", "", results.get("machine") or C.machine_markdown(), ""]
    return C.write_doc(NAME, "\n".join(lines), path)


if __name__ == "__main__":
    sys.exit(main())
