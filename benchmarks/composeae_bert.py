#!/usr/bin/env python
"""ComposeAE and TIRG-BERT on the built-in CSS benchmark with a tiny random BERT, and the cost of a
training step with and without the text-embedding cache.

    nice -n 10 python benchmarks/composeae_bert.py                       # results -> docs/composeae_bert.md
    nice -n 10 python benchmarks/composeae_bert.py --steps 400 --timing-steps 8

1. Recall: train TIRG-BERT and ComposeAE (configs/css_tirg_bert.yaml, configs/css_composeae.yaml)
   for --steps steps with a tiny random TF-Hub BERT pair (1 layer, 768-d, written to a temporary
   folder; no network) and report test/train recall and WHM. A random BERT gives each distinct
   text a fixed, distinct embedding but no language knowledge, so these figures measure the
   composers, not BERT.
2. Speed: seconds per training step, same model, same batches, with the cache (BERT runs once
   per distinct text before training) and without it (BERT runs inside every step), for the tiny
   BERT and for a BERT-Base-sized keras-hub backbone (12 layers, 768-d, random weights). Reported
   as ratios measured in the same run; the first steps (graph tracing) are excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="training steps of each recall run")
    p.add_argument("--timing-steps", type=int, default=6, help="steps timed per setting (after 2 warm-up steps)")
    p.add_argument("--methods", default="tirg,composeae")
    p.add_argument("--skip-recall", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    p.add_argument("--out", default="docs/composeae_bert.md")
    p.add_argument("--work", default=None, help="folder for runs and the tiny models (default: a temp folder)")
    return p.parse_args(argv)


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


def time_steps(cfg, dataset, use_cache, steps, warmup=2):
    """Median and mean seconds per step over `steps` steps after `warmup` steps."""
    import keras
    import numpy as np

    from keras_irtf.data.pipeline import training_dataset
    from keras_irtf.text_cache import prepare_text_input, texts_of_run
    from keras_irtf.training import build_model, make_optimizer

    keras.utils.set_random_seed(cfg.train.seed)
    model = build_model(cfg, 0)
    t0 = time.perf_counter()
    vectorizer = prepare_text_input(model.text_encoder, texts_of_run(dataset), use_cache)
    fill_seconds = time.perf_counter() - t0
    model.compile(optimizer=make_optimizer(cfg))
    total = steps + warmup
    ds = training_dataset(dataset, vectorizer, cfg.train.batch_size, total, cfg.train.seed, cfg.data.image_size)
    timer = StepTimer()
    runs = model.text_encoder.encoder_runs
    model.fit(ds, epochs=1, steps_per_epoch=total, verbose=0, callbacks=[timer.callback])
    t = np.array(timer.times[warmup:])
    return {"median": float(np.median(t)), "mean": float(t.mean()), "steps": int(len(t)),
            "cache_fill_seconds": round(fill_seconds, 2) if use_cache else 0.0,
            "bert_runs_during_training": model.text_encoder.encoder_runs - runs}


def main(argv=None):
    args = parse_args(argv)
    import keras_hub

    from keras_irtf.data import load_dataset
    from keras_irtf.text_cache import texts_of_run
    from keras_irtf.tiny_bert import make_tiny_hub_bert, word_vocabulary
    from keras_irtf.training import format_results, train

    work = Path(args.work or tempfile.mkdtemp(prefix="composeae_bert_"))
    work.mkdir(parents=True, exist_ok=True)
    base_cfg = config_for("tirg", args.set)
    dataset = load_dataset(base_cfg, verbose=True)
    texts = texts_of_run(dataset)
    print(f"{len(texts)} distinct texts in the run", flush=True)
    pre, enc = make_tiny_hub_bert(work / "tiny_hub_bert", texts, hidden_size=768)
    hub = [f"model.bert_preprocess={pre}", f"model.bert_encoder={enc}", "model.bert_dim=768"]
    results = {"steps": args.steps, "overrides": args.set, "distinct_texts": len(texts), "recall": {}, "timing": {}}

    if not args.skip_recall:
        for method in args.methods.split(","):
            cfg = config_for(method, hub + [f"train.steps={args.steps}", f"train.out={work / ('run_' + method)}"] + args.set)
            print(f"== {method}: {args.steps} steps", flush=True)
            run, metrics = train(cfg, verbose=2)
            results["recall"][method] = {k: metrics[k] for k in ("test", "train", "whm", "steps", "batch_size",
                                                                  "train_seconds", "seconds_per_step",
                                                                  "bert_encoder_runs", "text_cache_size")}
            results["recall"][method]["table"] = format_results(metrics)
            print(format_results(metrics), flush=True)
            _write(args.out, results)

    if not args.skip_timing:
        # a BERT-Base-sized keras-hub backbone (random weights) as a local preset
        base_dir = work / "bert_base_sized"
        if not (base_dir / "config.json").is_file():
            tok = keras_hub.models.BertTokenizer(vocabulary=word_vocabulary(texts), lowercase=True)
            keras_hub.models.BertTextClassifierPreprocessor(tok, sequence_length=32).save_to_preset(str(base_dir))
            keras_hub.models.BertBackbone(vocabulary_size=30522, num_layers=12, num_heads=12, hidden_dim=768,
                                          intermediate_dim=3072).save_to_preset(str(base_dir))
        sources = {
            "tiny TF-Hub BERT (1 layer, 768-d)": hub,
            "BERT-Base-sized keras-hub backbone (12 layers, 768-d)": [
                "model.text_encoder=bert_keras_hub", f"model.bert_preset={base_dir}", "model.bert_dim=768"],
        }
        for label, src in sources.items():
            cfg = config_for("composeae", src + args.set)
            row = {}
            for use_cache in (True, False):
                print(f"== timing {label}, cache={use_cache}", flush=True)
                row["cached" if use_cache else "uncached"] = time_steps(cfg, dataset, use_cache, args.timing_steps)
            row["ratio_uncached_over_cached"] = row["uncached"]["median"] / row["cached"]["median"]
            results["timing"][label] = row
            print(json.dumps(row, indent=1), flush=True)
            _write(args.out, results)
    print(f"results: {args.out}")
    return 0


def _write(out, results):
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    lines = ["# ComposeAE and TIRG-BERT on the built-in CSS benchmark (`small`), tiny random BERT", "",
             "Written by `benchmarks/composeae_bert.py` " + " ".join(results["overrides"]) + ".", ""]
    for method, r in results["recall"].items():
        lines += [f"## {method} ({r['steps']} steps, batch {r['batch_size']}, {r['seconds_per_step']} s/step)", "",
                  r["table"], "",
                  f"BERT encoder runs in the whole run: {r['bert_encoder_runs']} (cache of {r['text_cache_size']} texts)", ""]
    if results["timing"]:
        lines += ["## Seconds per training step with and without the text-embedding cache (ComposeAE)", "",
                  "| BERT | cached s/step | uncached s/step | uncached / cached | cache fill (s, once) |",
                  "|---|---|---|---|---|"]
        for label, row in results["timing"].items():
            c, u = row["cached"], row["uncached"]
            lines.append(f"| {label} | {c['median']:.3f} | {u['median']:.3f} | {row['ratio_uncached_over_cached']:.2f} | "
                         f"{c['cache_fill_seconds']} |")
        lines.append("")
        lines.append("Medians over the timed steps, first 2 steps (tracing) excluded; both settings in the same process.")
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
