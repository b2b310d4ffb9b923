#!/usr/bin/env python
"""keras_irtf from your own script: config -> datasets -> model.fit with your callbacks ->
evaluate -> save and reload the .keras file (-> export for TF Serving).

    python examples/train_with_callbacks.py                           # built-in CSS, smoke preset
    python examples/train_with_callbacks.py --preset none --steps 2000 --out runs/my_css
    python examples/train_with_callbacks.py --set ga.methods=adversarial,isotropic --export

The run folder it writes (config.yaml, vocab.txt, model.keras, metrics.json, history.csv,
summary.json) is the one tools/train.py writes, so tools/evaluate.py, tools/export.py and
tools/query.py accept it.
"""

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a source checkout without installing

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_irtf as kirtf  # noqa: E402


class LossRecorder(keras.callbacks.Callback):
    """A user callback: keeps every batch's loss and stops early if the loss is no longer finite."""

    def __init__(self):
        super().__init__()
        self.batch_losses = []
        self.epochs_seen = []

    def on_train_batch_end(self, batch, logs=None):
        loss = float(logs["loss"])
        self.batch_losses.append(loss)
        if not math.isfinite(loss):
            print(f"loss became {loss} at batch {batch}: stopping")
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        self.epochs_seen.append(epoch)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "css.yaml"))
    p.add_argument("--preset", default="smoke", help="configs/presets/<name>.yaml, or 'none'")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--steps", type=int, help="training steps (default: the config's train.steps)")
    p.add_argument("--out", default="runs/example", help="run folder to write")
    p.add_argument("--export", action="store_true", help="also export a SavedModel to <out>/exported/")
    args = p.parse_args(argv)

    # 1. the config: YAML files, then overrides (the same layering as tools/train.py)
    paths = [args.config]
    if args.preset != "none":
        paths.append(REPO / "configs" / "presets" / f"{args.preset}.yaml")
    overrides = list(args.set) + ([f"train.steps={args.steps}"] if args.steps else [])
    cfg = kirtf.load_config(paths, overrides)
    keras.utils.set_random_seed(cfg.train.seed)

    # 2. the data: dataset + vocabulary + tf.data pipelines of dict batches
    bench = kirtf.load_benchmark(cfg, verbose=True)
    steps_per_epoch = min(cfg.train.steps_per_epoch, cfg.train.steps)
    epochs = math.ceil(cfg.train.steps / steps_per_epoch)
    train_ds = bench.train_dataset(steps=epochs * steps_per_epoch)

    # 3. the model, compiled with the config's optimizer, fitted with our callbacks
    model = kirtf.create_model(cfg, bench)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recorder = LossRecorder()
    history = model.fit(
        train_ds, epochs=epochs, steps_per_epoch=steps_per_epoch,
        validation_data=bench.validation_dataset(),
        callbacks=[recorder, keras.callbacks.CSVLogger(str(out / "history.csv")), keras.callbacks.TerminateOnNaN()],
        verbose=2, shuffle=False,  # the dataset is already in its seeded order
    )

    # 4. Recall@K and WHM with the paper's protocol
    metrics = bench.evaluate(model)
    print("test recall:", {k: round(v, 4) for k, v in metrics["test"].items()})
    print("WHM:", round(metrics["whm"]["value"], 4))

    # 5. save the run (model.keras + config + vocabulary), reload, check the embeddings
    run = kirtf.save_run(model, cfg, bench, out, metrics={**metrics, "steps": epochs * steps_per_epoch})
    reloaded = kirtf.load_model(run / "model.keras")
    batch = next(iter(bench.validation_dataset()))
    before = model.embed_queries(batch["source_image"], batch["text"]).numpy()
    after = reloaded.embed_queries(batch["source_image"], batch["text"]).numpy()
    roundtrip = float(np.max(np.abs(before - after)))
    print(f".keras round trip: max abs difference of query embeddings {roundtrip}")

    exported = None
    if args.export:
        exported = str(kirtf.export_run(run, out_root=out / "exported", verbose=True))

    summary = {
        "batch_losses": recorder.batch_losses,
        "epochs_seen": recorder.epochs_seen,
        "history": {k: [float(x) for x in v] for k, v in history.history.items()},
        "test": metrics["test"],
        "whm": metrics["whm"],
        "roundtrip_max_abs_diff": roundtrip,
        "exported": exported,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
