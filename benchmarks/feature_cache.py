#!/usr/bin/env python
"""Seconds per Combiner training step on frozen CLIP towers, with and without the frozen-feature
cache, for a tiny random CLIP and a random CLIP with ViT-B/16's shapes.

    nice -n 10 python benchmarks/feature_cache.py          # -> docs/feature_cache.md (+ .json)
    python benchmarks/feature_cache.py --quick             # tiny CLIP only, fewer steps (a smoke test)

For each preset (written to a temporary folder by keras_irtf.testing.tiny_clip; random weights,
no network), the built-in CSS benchmark (`smoke` size, rendered at the tower's input side) trains
the Combiner (configs/fashioniq_combiner.yaml's model, batch --batch) in two settings, built side
by side on the same batches:
- cached: the assembler embeds every image and text once (the "fill", timed and reported
  separately, with its images per second), and a step runs the Combiner on gathered features;
- uncached: `cache: false` on both encoders: every step runs both frozen towers on the batch's
  source and target images and texts.
Both are timed in alternating rounds (cached first in even rounds, uncached first in odd ones) so
that a change of machine load hits both alike; each setting's figure is its median step, and the
ratio uncached / cached is the speed-up. The first step of every round and the tracing fit are
left out. The cached step is also timed at the reference batch (4096), and from it and the fill
rate the report projects the wall time of a Combiner training on FashionIQ-sized data on this
machine.
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

NAME = "feature_cache"
# FashionIQ (Wu et al.): ~77.7K images in the three categories' train + val splits, ~36K training
# triplets; CLIP4Cir trains the Combiner 300 epochs at batch 4096 (configs/fashioniq_combiner.yaml)
FIQ_IMAGES, FIQ_STEPS, FIQ_BATCH = 77_700, 2_700, 4096


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--timing-steps", type=int, default=3)
    p.add_argument("--timing-rounds", type=int, default=3)
    p.add_argument("--presets", default="tiny,vit_b16")
    p.add_argument("--quick", action="store_true", help="tiny preset only, 2 rounds of 2 steps")
    p.add_argument("--out", help="report path (default docs/feature_cache.md; the .json next to it)")
    p.add_argument("--work", help="folder for the presets and the feature store (default: a temp folder)")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite the report from the .json of an earlier run (no measurement)")
    args = p.parse_args(argv)
    if args.quick:
        args.presets, args.timing_steps, args.timing_rounds = "tiny", 2, 2
    return args


class Setting:
    """One model (cached or not) with its fixed batches, timed fit by fit."""

    def __init__(self, cfg, dataset, cached: bool, batches: int):
        import keras

        from keras_irtf.experiment import Experiment

        keras.utils.set_random_seed(cfg.train.seed)
        cfg = cfg.copy()
        for one_of in (cfg.model.image_encoder, cfg.model.text_encoder):
            one_of.settings.cache = bool(cached)
        self.exp = Experiment(cfg, dataset=dataset, verbose=False)
        self.model = self.exp.build_model(0)
        self.exp.compile(self.model)
        t0 = time.perf_counter()
        self.exp.attach_text_input(self.model)
        self.exp.attach_image_input(self.model)
        self.fill_seconds = time.perf_counter() - t0 if cached else 0.0
        cache = self.exp.image_input.cache if self.exp.image_input is not None else None
        self.images_encoded = cache.images_encoded if cache is not None else 0
        self.ds = self.exp.train_dataset(steps=batches)
        self.times, self.round_medians = [], []

    def fit(self, steps, record=True):
        import numpy as np

        from composeae_bert import StepTimer

        timer = StepTimer()
        self.model.fit(self.ds, epochs=1, steps_per_epoch=steps + 1, verbose=0, shuffle=False,
                       callbacks=[timer.callback])
        if record:
            t = timer.times[1:]
            self.times += t
            self.round_medians.append(float(np.median(t)))


def time_preset(label, cfg, dataset, args) -> dict:
    import numpy as np

    settings = {}
    for cached in (True, False):
        key = "cached" if cached else "uncached"
        settings[key] = Setting(cfg, dataset, cached, args.timing_steps + 2)
        print(f"   {key}: built" + (f", fill {settings[key].fill_seconds:.1f} s for {settings[key].images_encoded} "
                                    f"images" if cached else ""), flush=True)
    for s in settings.values():
        s.fit(1, record=False)  # tracing
    loads = []
    for r in range(args.timing_rounds):
        for key in (("cached", "uncached") if r % 2 == 0 else ("uncached", "cached")):
            settings[key].fit(args.timing_steps)
        loads.append(round(os.getloadavg()[0], 2))
        print(f"   round {r + 1}: cached {settings['cached'].round_medians[-1]:.4f} s, uncached "
              f"{settings['uncached'].round_medians[-1]:.4f} s", flush=True)
    c, u = settings["cached"], settings["uncached"]
    # the cached step at the reference batch (4096), measured: the Combiner's update of its ~40M
    # parameters does not scale with the batch, so scaling the batch-32 step would overstate it
    big_cfg = cfg.copy()
    big_cfg.train.batch_size = FIQ_BATCH
    big = Setting(big_cfg, dataset, True, args.timing_steps + 2)
    big.fit(1, record=False)
    big.fit(args.timing_steps)
    del big.model
    row = {
        "cached_median": float(np.median(c.times)), "uncached_median": float(np.median(u.times)),
        "cached_round_medians": c.round_medians, "uncached_round_medians": u.round_medians,
        "ratio": float(np.median(u.times) / np.median(c.times)),
        "ratio_per_round": [round(a / b, 2) for a, b in zip(u.round_medians, c.round_medians)],
        "fill_seconds": round(c.fill_seconds, 2), "fill_images": c.images_encoded,
        "load_per_round": loads,
    }
    rate = c.images_encoded / c.fill_seconds if c.fill_seconds else float("nan")
    row["fill_images_per_second"] = round(rate, 2)
    row["cached_median_at_4096"] = float(np.median(big.times))
    row["projected_fashioniq_hours"] = {
        "cached": round((FIQ_IMAGES / rate + FIQ_STEPS * row["cached_median_at_4096"]) / 3600, 2),
        # the towers dominate an uncached step, and their cost grows with the batch
        "uncached": round(FIQ_STEPS * row["uncached_median"] * FIQ_BATCH / args.batch / 3600, 1),
    }
    del settings
    gc.collect()
    return row


def main(argv=None):
    args = parse_args(argv)
    if args.render_only:
        return C.render_only(NAME, args.out, write_report, summary_lines)
    from keras_irtf.config import load_config, repo_configs_dir
    from keras_irtf.experiment import Experiment
    from keras_irtf.testing import tiny_clip

    started = time.time()
    work = Path(args.work or tempfile.mkdtemp(prefix="feature_cache_"))
    results = {"command": C.command_line(), "batch": args.batch, "timing_steps": args.timing_steps,
               "timing_rounds": args.timing_rounds, "load_before": round(os.getloadavg()[0], 2), "presets": {}}
    labels = {"tiny": "tiny random CLIP", "vit_b16": "random CLIP with ViT-B/16's shapes"}
    for name in args.presets.split(","):
        folder = work / f"clip_{name}"
        if not (folder / "config.json").is_file():
            if name == "tiny":
                tiny_clip.make_tiny_clip_preset(folder)
            else:
                tiny_clip.make_random_clip_preset(folder, size=name)
        overrides = [f"model.clip_preset={folder}", f"data.feature_cache={work / 'features'}",
                     "data.dataset=css", "data.dataset.size=smoke", f"data.cache_dir={work / 'data'}",
                     f"train.batch_size={args.batch}", "train.seed=0", "data.train_recall_queries=100"]
        cfg = load_config([repo_configs_dir() / "fashioniq_combiner.yaml"], overrides)
        dataset = Experiment(cfg, verbose=False).dataset
        print(f"== {labels.get(name, name)}: {args.timing_rounds} rounds of {args.timing_steps} steps", flush=True)
        results["presets"][labels.get(name, name)] = time_preset(name, cfg, dataset, args)
        write_report(args.out, results)
    results["seconds"] = round(time.time() - started, 1)
    results["machine"] = C.machine_markdown()
    path = write_report(args.out, results)
    print(f"[{NAME}] wrote {path}")
    C.print_summary(NAME, summary_lines(results))
    return 0


def summary_lines(results):
    return [f"Combiner step, {label}: {r['cached_median']:.4f} s cached, {r['uncached_median']:.3f} s uncached: "
            f"{r['ratio']:.1f}x (per round {min(r['ratio_per_round'])}..{max(r['ratio_per_round'])}); fill "
            f"{r['fill_images_per_second']} images/s" for label, r in results["presets"].items()]


def write_report(out, results) -> Path:
    path = Path(out) if out else C.DOCS / f"{NAME}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [
        "# Frozen CLIP towers: a Combiner training step with and without the frozen-feature cache", "",
        f"Command: `{results['command']}`" + ("" if "seconds" in results else " (partial: still running)"), "",
        f"Built-in CSS (`smoke`), batch {results['batch']}, the Combiner of configs/fashioniq_combiner.yaml; random "
        "CLIP weights (no network here: the timing does not depend on the weights). Medians of "
        f"{results['timing_rounds']} alternating rounds of {results['timing_steps']} timed steps per setting; "
        f"1-minute load average before the run: {results['load_before']}.", "",
        "| preset | cached s/step | uncached s/step | uncached / cached | per-round ratios | cache fill (once) | "
        "load per round |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in results["presets"].items():
        lines.append(f"| {label} | {r['cached_median']:.4f} | {r['uncached_median']:.3f} | {r['ratio']:.1f}x | "
                     f"{', '.join(str(x) for x in r['ratio_per_round'])} | {r['fill_images']} images in "
                     f"{r['fill_seconds']} s ({r['fill_images_per_second']} images/s) | "
                     f"{', '.join(str(x) for x in r['load_per_round'])} |")
    lines += ["", "The fill includes its fixed start-up (tracing, the text cache): a lower bound of the tower's rate.", ""]
    for label, r in results["presets"].items():
        if label.startswith("tiny"):  # a 1-layer tower: its fill is start-up, its projection meaningless
            continue
        p = r["projected_fashioniq_hours"]
        epoch = 9 * r["cached_median_at_4096"]
        lines.append(f"With the {label}, one FashionIQ epoch (9 steps of {FIQ_BATCH}) takes {epoch:.0f} s of "
                     f"training on the cached features against {9 * r['uncached_median'] * FIQ_BATCH / results['batch'] / 3600:.1f} h "
                     f"with the towers in every step; at the reference size the Combiner's own layers "
                     f"(4096 x 4096 hidden matrices at batch 4096) are then what costs.")
        lines.append(f"Projected on this machine for a FashionIQ Combiner training ({FIQ_IMAGES:,} images, "
                     f"{FIQ_STEPS:,} steps of {FIQ_BATCH}) with the {label}: {p['cached']} h with the cache (the fill at "
                     f"{r['fill_images_per_second']} images/s, then {FIQ_STEPS:,} cached steps measured at batch "
                     f"{FIQ_BATCH}: {r['cached_median_at_4096']:.3f} s each), {p['uncached']} h without it (the "
                     f"batch-{results['batch']} step scaled linearly to {FIQ_BATCH}: the towers' cost grows with the "
                     f"batch).")
    if "machine" in results:
        lines += ["", results["machine"]]
    return C.write_doc(NAME, "\n".join(lines), path)


if __name__ == "__main__":
    sys.exit(main())
