"""Keras callbacks for training curves in TensorBoard.

`TrainingScalars` writes, every `every_n_steps` optimizer steps,
- `loss_terms/<name>`: each loss term the model tracks (retrieval loss, similarity matching
  loss L_S, the GA terms `ga_adversarial` / `ga_isotropic`, composer terms, the total `loss`),
  as the exact MEAN OVER THE LAST `every_n_steps` STEPS. Keras' own TensorBoard callback logs
  `batch_<name>`, the running mean since the start of the epoch, which flattens late changes;
  here the window mean is recovered from the trackers' running totals, so no step is missed
  and nothing is computed twice.
- `optimizer/learning_rate`: the learning rate in effect after that step (schedules included).

Steps left over at the end of training (fewer than `every_n_steps`) are written as a last,
shorter window. `keras_irtf.training.loop.train` adds this callback (logs/train of the run folder,
every `train.log_every_steps` steps); the evaluation recalls go to logs/eval.

    model.fit(ds, callbacks=[TrainingScalars("runs/x/logs/train", every_n_steps=50)])
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


def _tracker_state(metric):
    """(total, count) of a Mean-style tracker, or None for metrics without them."""
    total, count = getattr(metric, "total", None), getattr(metric, "count", None)
    if total is None or count is None:
        return None
    return float(keras.ops.convert_to_numpy(total)), float(keras.ops.convert_to_numpy(count))


class TrainingScalars(keras.callbacks.Callback):
    """Window means of every tracked loss term, and the learning rate, to TensorBoard."""

    def __init__(self, log_dir, every_n_steps=50, prefix="loss_terms", write=True):
        """`write=False`: read the trackers at the same points but write nothing (a non-chief
        worker under MultiWorkerMirroredStrategy: reading a tracker is a collective operation
        there, so every worker must take part in it, and only the chief writes)."""
        super().__init__()
        if int(every_n_steps) < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.log_dir = str(log_dir)
        self.every_n_steps = int(every_n_steps)
        self.prefix = prefix
        self.write = bool(write)
        self._writer = None

    def on_train_begin(self, logs=None):
        self._writer = tf.summary.create_file_writer(self.log_dir) if self.write else None
        # the optimizer's step counter: a resumed run continues its curves where they stopped
        self._step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self._seen = {}  # name -> (total, count) at the last read, within the current epoch
        self._pending = {}  # name -> (sum, count) of steps not yet written, from ended epochs
        self._last_written = self._step

    def _read(self):
        out = {}
        for metric in self.model.metrics:
            state = _tracker_state(metric)
            if state is not None:
                out[metric.name] = state
        return out

    def _collect(self):
        """Add what the trackers gained since the last read to the pending sums."""
        for name, (total, count) in self._read().items():
            seen_total, seen_count = self._seen.get(name, (0.0, 0.0))
            if count < seen_count:  # the trackers were reset (a new epoch) without us seeing it
                seen_total, seen_count = 0.0, 0.0
            s, n = self._pending.get(name, (0.0, 0.0))
            self._pending[name] = (s + total - seen_total, n + count - seen_count)
            self._seen[name] = (total, count)

    def on_epoch_begin(self, epoch, logs=None):
        # Keras resets the trackers just before this: start counting from their current state
        # (zeros, or what on_epoch_end already collected if a reset did not happen)
        self._seen = self._read()

    def on_epoch_end(self, epoch, logs=None):
        self._collect()

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step % self.every_n_steps == 0:
            self._write()

    def _write(self):
        self._collect()
        learning_rate = self.learning_rate()
        if self._writer is None:
            self._pending = {}
            self._last_written = self._step
            return
        with self._writer.as_default():
            for name, (s, n) in self._pending.items():
                if n > 0:
                    tf.summary.scalar(f"{self.prefix}/{name}", s / n, step=self._step)
            tf.summary.scalar("optimizer/learning_rate", learning_rate, step=self._step)
        self._writer.flush()
        self._pending = {}
        self._last_written = self._step

    def learning_rate(self) -> float:
        return float(np.asarray(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))

    def on_train_end(self, logs=None):
        if self._step > self._last_written:
            self._write()
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

