"""The training run behind tools/train.py: fit with backups, save, evaluate.

    from keras_irtf import load_config, train
    run_dir, metrics = train(load_config(["configs/css.yaml"], ["train.steps=500"]))

The objects come from the assembler (keras_irtf.experiment.Experiment); this module adds the
strategy, the crash-safe backups, the callbacks and the run folder around `model.fit`.

A run folder holds: config.yaml (resolved), vocab.txt, model.keras, metrics.json, logs/
(TensorBoard) and backup/ (for resuming an interrupted run).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from keras_irtf.config import Config, default_run_name, to_yaml
from keras_irtf.experiment import Experiment, save_model
from keras_irtf.run_folder import (BACKUP_KIND, LOGS_KIND, BackupError, ensure_owned_dir, latest_backup,
                                   record_run_files, run_folder_guard)
from keras_irtf.safety import remove_owned
from keras_irtf.training.backup import StopOnNonFiniteLoss, TrainingBackup, restore_backup
from keras_irtf.training.callbacks import TrainingScalars
from keras_irtf.training.distribute import (check_batch, is_chief_process, is_multi_worker, make_strategy,
                                            worker_dataset, worker_info)
from keras_irtf.training.interrupt import StopOnRequest, StopRequest, TrainingInterrupted
from keras_irtf.utils import atomic_write_text, write_json

log = logging.getLogger(__name__)


def run_dir_for(cfg: Config) -> Path:
    return Path(cfg.train.out or os.path.join("runs", default_run_name(cfg)))


def train(cfg: Config, verbose: int = 1, callbacks=(), dataset=None, overwrite: bool = False, fresh: bool = False):
    """Train, save, evaluate. Returns (run folder, metrics dict); metrics is None on a
    multi-worker run's non-chief workers (the chief writes the run folder).

    `dataset`: an already loaded dataset for `cfg.data` (saves reloading it when many runs share
    one, as tools/ablate.py does); by default it is loaded from the config.

    Re-running the same config after a crash continues from `<run>/backup/` (exactly: same
    batches, optimizer state, learning-rate schedule and random generators). While it trains,
    Ctrl-C (SIGINT) or SIGTERM finishes the step in progress, backs that step up and raises
    keras_irtf.training.interrupt.TrainingInterrupted (a KeyboardInterrupt) naming it; a second
    signal stops at once. The run folder is
    locked while training; a folder holding a finished run is refused unless `overwrite`, and a
    backup written with another config unless `fresh` discards it (run_folder.py).
    """
    with run_folder_guard(run_dir_for(cfg), cfg, overwrite=overwrite, fresh=fresh, verbose=bool(verbose),
                          chief=is_chief_process(cfg)):
        return _train(cfg, verbose, callbacks, dataset)


def _train(cfg: Config, verbose: int, callbacks, dataset):
    strategy = make_strategy(cfg.train.strategy, cfg.train.devices, cfg.train.collective_timeout_seconds)
    check_batch(cfg.train.batch_size, strategy)
    multi_worker = is_multi_worker(strategy)
    _, _, chief = worker_info() if multi_worker else (0, 1, True)

    run = run_dir_for(cfg)
    if chief:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run / "config.yaml", to_yaml(cfg))
        record_run_files(run, "config.yaml")
    keras.utils.set_random_seed(cfg.train.seed)

    exp = Experiment(cfg, dataset=dataset, verbose=bool(verbose) and chief)
    model = exp.create_model(strategy, vocab_out=run / "vocab.txt" if chief else None)
    if chief and (run / "vocab.txt").is_file() and exp.text_input_kind == "tokens":
        record_run_files(run, "vocab.txt")

    # exactly train.steps steps, in epochs of train.steps_per_epoch (the last one may be shorter)
    total = cfg.train.steps
    spe = min(cfg.train.steps_per_epoch, total)
    start, prior_seconds = 0, 0.0
    resume = latest_backup(run / "backup")
    if resume is not None:
        if int(resume["step"]) > total:
            raise BackupError(
                f"the backup in {run / 'backup'} is at step {int(resume['step'])}, beyond train.steps={total}: "
                f"resuming it would keep weights trained for more steps than asked. Ask for at least "
                f"{int(resume['step'])} steps (--steps) to resume it, or pass --fresh to discard it and train {total}"
            )
        start, prior_seconds = restore_backup(model, resume), resume["train_seconds"]
        if verbose and chief:
            log.info(f"resuming {run} from its backup at step {start} of {total}")

    def batches(first, last):
        def make(index, num_shards, _per_shard):
            return exp.train_dataset(steps=last, start_step=first, shard=(index, num_shards))

        return worker_dataset(strategy, make, cfg.train.batch_size) if multi_worker else make(0, 1, None)

    backup = TrainingBackup(run / "backup", cfg.train.backup_every_steps, enabled=chief, prior_seconds=prior_seconds)
    cbs = [StopOnNonFiniteLoss(backup), backup]
    every = cfg.train.log_every_steps
    if chief:
        ensure_owned_dir(run / "logs", LOGS_KIND)
        tensorboard = keras.callbacks.TensorBoard(log_dir=str(run / "logs"), update_freq=every)
        cbs.append(tensorboard)
    # on every worker: its reads of the trackers are collectives under multi-worker training
    cbs.append(TrainingScalars(run / "logs" / "train", every_n_steps=every, write=chief))
    cbs += list(callbacks)
    stop_request = StopRequest()
    cbs.append(StopOnRequest(stop_request, backup))  # last: every other callback has seen the step
    # Keras' progress bar on a terminal; one line an epoch in a log file or a pipe (its bar's
    # control codes would fill the file). Either way on standard error: standard output carries
    # the results only.
    fit_kw = dict(callbacks=cbs, verbose=(1 if sys.stderr.isatty() else 2) if verbose and chief else 0, shuffle=False)
    history = None
    epochs = []  # (steps, {term: that epoch's mean}) of every epoch trained here
    try:
        with stop_request.handling_signals():
            for first, last, epoch, steps_per_epoch in fit_segments(start, total, spe):
                with contextlib.redirect_stdout(sys.stderr):
                    history = model.fit(batches(first, last), initial_epoch=epoch,
                                        epochs=epoch + (last - first) // steps_per_epoch,
                                        steps_per_epoch=steps_per_epoch, **fit_kw)
                for e in range(len(history.epoch)):
                    epochs.append((steps_per_epoch, {k: float(v[e]) for k, v in history.history.items()}))
        if stop_request.signum is not None:  # it came after the last step's end: that step is backed up
            raise TrainingInterrupted(stop_request.signal_name, step=total, backup_step=backup.last_good_step,
                                      backup_dir=backup.backup_dir)
    except BaseException:
        if chief:
            release_tensorboard(tensorboard)
        raise
    train_seconds = backup.seconds()
    seconds_here = train_seconds - prior_seconds  # the steps start .. total-1, trained in this process
    if multi_worker:
        # every worker prints a digest of its final weights: in lock-step they are bit-identical
        index, count, _ = worker_info()
        log.info(f"worker {index} of {count}: final weights sha256 {weights_digest(model)}")
    if not chief:
        return run, None

    save_model(model, run / "model.keras")
    record_run_files(run, "model.keras")
    result = exp.evaluate(model, verbose=bool(verbose))
    metrics = {
        "dataset": cfg.data.dataset.type,
        "method": cfg.model.method,
        "ga": list(cfg.ga_methods),
        "eta": cfg.loss.eta,
        **result,
        "steps": total,
        "batch_size": cfg.train.batch_size,
        "replicas": strategy.num_replicas_in_sync,
        "train_seconds": round(train_seconds, 2),
        # measured over the steps this process trained (after the resumed step on a resumed run)
        "seconds_per_step": round(seconds_here / (total - start), 4) if total > start else None,
        "resumed_from_step": start or None,
        "final_losses": {k: float(v[-1]) for k, v in (history.history if history else {}).items()},
        # each logged term's mean over the steps trained (from step `from_step`: a resumed run
        # averages the steps after it resumed), e.g. GA^I's ga_noise_ratio
        "training_means": {"from_step": start, **training_means(epochs)},
        "seed": cfg.train.seed,
        "precision": cfg.train.precision,
    }
    if hasattr(model.text_encoder, "encoder_runs"):  # frozen BERT: how often it really ran
        metrics["bert_encoder_runs"] = model.text_encoder.encoder_runs
        cache = model.text_encoder.cache
        metrics["text_cache_size"] = len(cache) if cache is not None else 0
        if cache is not None and getattr(cache, "store", None) is not None:
            metrics["text_cache_from_store"] = cache.texts_from_store
    if exp.image_input is not None:  # the frozen-feature cache: how many images the tower really ran on
        c = exp.image_input.cache
        metrics["feature_cache"] = {"images": int(len(c._table)), "images_encoded": c.images_encoded,
                                    "images_from_store": c.images_from_store,
                                    "folder": str(c.store.folder) if c.store is not None else None}
    write_json(run / "metrics.json", metrics)
    record_run_files(run, "metrics.json")
    _write_eval_summary(run, metrics)
    remove_owned(run / "backup", BACKUP_KIND)  # the run is complete: model.keras holds it
    return run, metrics


def training_means(epochs) -> dict:
    """{term: mean over steps} from [(steps, {term: the epoch's mean})]: each epoch's mean weighted
    by its number of steps, so the result is the mean of every step's value."""
    sums, counts = {}, {}
    for steps, values in epochs:
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v * steps
            counts[k] = counts.get(k, 0) + steps
    return {k: sums[k] / counts[k] for k in sums if counts[k]}


def fit_segments(start: int, total: int, steps_per_epoch: int):
    """The `model.fit` calls that train steps start .. total-1 in epochs of `steps_per_epoch`:
    [(first step, end step, initial epoch, steps per epoch of that call)]. A run resumed
    mid-epoch first completes that epoch; whole epochs then run in one call; a last epoch
    shorter than the others (total not a multiple) runs on its own, so exactly `total` steps
    are trained."""
    spe = int(steps_per_epoch)
    segments, step = [], int(start)
    head = min(-(-step // spe) * spe, total)  # the first epoch boundary at or after start
    if step < head:
        segments.append((step, head, step // spe, head - step))
        step = head
    body = total // spe * spe
    if step < body:
        segments.append((step, body, step // spe, spe))
        step = body
    if step < total:
        segments.append((step, total, step // spe, total - step))
    return segments


def weights_digest(model) -> str:
    """sha256 of every weight's bytes, in the model's order (compares runs bit for bit)."""
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


def _write_eval_summary(run, metrics):
    writer = tf.summary.create_file_writer(str(run / "logs" / "eval"))
    with writer.as_default():
        for split in ("test", "train"):
            for k, v in metrics[split].items():
                tf.summary.scalar(f"{split}/{k}", v, step=metrics["steps"])
        tf.summary.scalar("whm", metrics["whm"]["value"], step=metrics["steps"])
    writer.flush()


def release_tensorboard(callback):
    """Leave TensorFlow's summary state as it was before `callback` (a keras TensorBoard) began.
    Its on_train_begin makes its writer the process's default summary writer, with a
    record-every-N-steps condition, and only on_train_end restores them: a fit that raises (a
    non-finite loss, a full disk, Ctrl-C) skips that, and every later summary of the process
    (another training, a user's own) would be filtered by the dead run's step counter. Keras
    3.15's callback keeps them in _prev_summary_state."""
    while getattr(callback, "_prev_summary_state", None):
        callback._pop_writer()
    if hasattr(callback, "_close_writers"):
        callback._close_writers()


def format_results(metrics: dict) -> str:
    """A Markdown table of a run's recalls and WHM."""
    ks = [k for k in metrics["test"] if k.startswith("R@")]
    head = "| split | " + " | ".join(ks) + " |"
    rows = [head, "|" + "---|" * (len(ks) + 1)]
    for split in [s for s in ("test", "test_shift", "train") if s in metrics]:
        rows.append(f"| {split} | " + " | ".join(f"{100 * metrics[split][k]:.1f}" for k in ks) + " |")
    other = [k for k in metrics["test"] if not k.startswith("R@")]
    if other:  # per-group recalls (FashionIQ's categories), CIRR's subset recall, headlines
        rows.append("")
        rows.append("test: " + ", ".join(f"{k} {100 * metrics['test'][k]:.1f}" for k in other))
    w = metrics["whm"]
    rows.append("")
    rows.append(f"Mt = {100 * w['Mt']:.1f}, Ms = {100 * w['Ms']:.1f}, WHM(alpha={w['alpha']}) = {100 * w['value']:.1f}")
    return "\n".join(rows)

