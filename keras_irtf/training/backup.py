"""Crash-safe training: exact resumption from a backup, and a stop on a non-finite loss.

TrainingBackup writes, every N steps and at every epoch end, the model's weights with the
optimizer state (momentum, iteration count and so the learning-rate schedule) and every random
generator the model holds (the isotropic-GA noise, dropout) to `<run>/backup/`, then points
`state.json` at it with an atomic rename: a crash at any moment leaves the previous complete
backup in force. `train()` reads `state.json`, restores the weights, and rebuilds the input
pipeline from the same seed at the saved step, so the resumed run sees exactly the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import time
from pathlib import Path

import keras
import numpy as np

from keras_irtf.run_folder import BackupError, ensure_backup_dir, latest_backup
from keras_irtf.utils import write_json

log = logging.getLogger(__name__)

__all__ = ["BackupError", "BackupWriteError", "describe_os_error", "StopOnNonFiniteLoss", "TrainingBackup", "TrainingDiverged", "latest_backup",
           "restore_backup", "rng_variables", "unsound_state"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class BackupWriteError(RuntimeError):
    """A backup could not be written (a full disk, a read-only folder); the last one is kept."""


def describe_os_error(e: BaseException) -> str:
    """'disk full' for ENOSPC / EDQUOT (h5py hides errno in its message), else the error's text."""
    text = str(e)
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "errno = 28" in text:
        return "disk full: no space left on the device"
    return f"{type(e).__name__}: {text[:200]}"


# A model variable beyond this magnitude has exploded (weights are O(1)-O(100); a batch-norm
# variance of 1e23 was seen one step before the loss turned NaN): such state is not backed up.
EXPLODED_ABS = 1e12


def unsound_state(model):
    """None when every float variable of the model is finite and below EXPLODED_ABS (and every
    optimizer variable finite), else a description of the first variable that is not."""
    for v in model.variables:
        if "float" not in str(v.dtype):
            continue
        a = np.asarray(v.numpy())
        if not np.all(np.isfinite(a)):
            return f"{v.path} holds non-finite values"
        peak = float(np.max(np.abs(a))) if a.size else 0.0
        if peak > EXPLODED_ABS:
            return f"{v.path} has exploded (max |value| {peak:.3g} > {EXPLODED_ABS:.0e})"
    optimizer = getattr(model, "optimizer", None)
    for v in getattr(optimizer, "variables", []) or []:
        if "float" in str(v.dtype) and not np.all(np.isfinite(np.asarray(v.numpy()))):
            return f"optimizer variable {v.path} holds non-finite values"
    return None


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stop at the first step whose loss terms are not finite, naming the step and the terms, and
    the step of the last backup known to be sound (`backup`: the run's TrainingBackup)."""

    def __init__(self, backup=None):
        super().__init__()
        self.backup = backup

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        values = {k: float(v) for k, v in logs.items()}
        if any(not math.isfinite(v) for v in values.values()):
            step = int(self.model.optimizer.iterations.numpy())
            terms = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
            self.model.stop_training = True
            good = self.backup.last_good_step if self.backup is not None else None
            if good is None:
                where = "no backup was kept (none was written before the divergence), so a re-run starts over"
            else:
                where = (f"the last backup, from step {good}, passed the finiteness check (every weight finite and "
                         f"below {EXPLODED_ABS:.0e}) and is what a re-run of the same command resumes; state from "
                         f"later steps was never backed up")
            raise TrainingDiverged(
                f"non-finite loss at step {step}: {terms}. Training stopped; {where}. Lower "
                f"optim.learning_rate or the GA weights (ga.adversarial.eps, ga.isotropic.gamma), or set "
                f"optim.clipnorm; a changed config cannot resume this backup: add --fresh to start over with it."
            )


def read_state_names(backup_dir) -> set:
    """The file names the backup folder's state.json names (empty when there is none to read)."""
    try:
        state = json.loads((Path(backup_dir) / "state.json").read_text())
        return {str(state.get("weights")), str(state.get("rng"))}
    except (OSError, ValueError, AttributeError):
        return set()


class TrainingBackup(keras.callbacks.Callback):
    def __init__(self, backup_dir, every_steps: int = 200, enabled: bool = True, prior_seconds: float = 0.0):
        super().__init__()
        self.backup_dir = Path(backup_dir)
        self.every_steps = int(every_steps)
        self.enabled = enabled  # False on non-chief workers: they restore but never write
        self.prior_seconds = float(prior_seconds)  # training time before a resume
        self._running_since = None
        self._elapsed = 0.0
        info = latest_backup(self.backup_dir) if enabled else None
        self.last_good_step = int(info["step"]) if info else None  # the backup a re-run resumes
        self.refused = []  # (step, reason) of states not backed up

    def seconds(self) -> float:
        """Training seconds so far, across resumptions."""
        running = time.time() - self._running_since if self._running_since is not None else 0.0
        return self.prior_seconds + self._elapsed + running

    def on_train_begin(self, logs=None):
        self._running_since = time.time()

    def on_train_end(self, logs=None):
        if self._running_since is not None:
            self._elapsed += time.time() - self._running_since
        self._running_since = None

    def _step(self) -> int:
        return int(self.model.optimizer.iterations.numpy())

    def save(self, logs=None):
        if not self.enabled:
            return
        step = self._step()
        if step == self.last_good_step:
            return  # this state is the backup already (an epoch that ends on a backup step)
        # never publish a diverged state: keep the last good backup in force instead
        reason = next((f"loss {k}={float(v):.6g}" for k, v in (logs or {}).items() if not _finite(v)), None)
        reason = reason or unsound_state(self.model)
        if reason is not None:
            self.refused.append((step, reason))
            if len(self.refused) == 1:
                kept = f"step {self.last_good_step}" if self.last_good_step is not None else "none"
                log.warning(f"step {step}: {reason}; not backed up (last good backup: {kept})")
            return
        ensure_backup_dir(self.backup_dir)
        name = f"step-{step:09d}.weights.h5"
        rng_name = f"step-{step:09d}.rng.npz"
        partials = (self.backup_dir / f".{name}.partial.weights.h5", self.backup_dir / f".{rng_name}.partial")
        try:
            self.model.save_weights(partials[0])
            os.replace(partials[0], self.backup_dir / name)
            # save_weights leaves out the random generators' states: keep them beside the weights
            with open(partials[1], "wb") as f:
                np.savez(f, **{f"v{i}": v.numpy() for i, v in enumerate(rng_variables(self.model))})
            os.replace(partials[1], self.backup_dir / rng_name)
            write_json(self.backup_dir / "state.json",
                       {"step": step, "weights": name, "rng": rng_name, "train_seconds": self.seconds()})
        except OSError as e:
            # state.json is written last: it still names the previous backup, so this step's files are unused
            named = read_state_names(self.backup_dir)  # what the backup in force uses is never removed
            for path in (*partials, self.backup_dir / name, self.backup_dir / rng_name):
                if path.name not in named:
                    path.unlink(missing_ok=True)  # owned: a file of this step that this save was writing
            kept = f"step {self.last_good_step}" if self.last_good_step is not None else "none yet"
            raise BackupWriteError(
                f"could not write the backup of step {step} to {self.backup_dir} ({describe_os_error(e)}); "
                f"training stopped and the last complete backup ({kept}) is kept. Free space (or fix the "
                f"folder) and run the same command to resume"
            ) from None
        self.last_good_step = step
        for old in list(self.backup_dir.glob("step-*.weights.h5")) + list(self.backup_dir.glob("step-*.rng.npz")):
            if old.name not in (name, rng_name):
                old.unlink()  # owned: an older step file in the backup folder this run marked as its own

    def on_train_batch_end(self, batch, logs=None):
        if self.every_steps > 0 and self._step() % self.every_steps == 0:
            self.save(logs)

    def on_epoch_end(self, epoch, logs=None):
        self.save(logs)


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return True  # not a number: nothing to check


def rng_variables(model):
    """The model's random-generator states (isotropic noise, dropout), in construction order."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


def restore_backup(model, info):
    """Load a backup into a built, compiled model (its optimizer built). A damaged weights or
    random-state file raises BackupError naming it (with --fresh as the way out)."""
    fresh = "pass --fresh to discard the backup and start over"
    try:
        model.load_weights(info["weights"])
    except Exception as e:  # h5py raises OSError / KeyError / ValueError for a cut file
        raise BackupError(f"backup file {info['weights']} is damaged and cannot be loaded ({type(e).__name__}: "
                          f"{str(e)[:200]}); it was probably cut short by a crash or a full disk; {fresh}") from None
    variables = rng_variables(model)
    try:
        saved = np.load(info["rng"])
    except Exception as e:
        raise BackupError(f"backup file {info['rng']} is damaged and cannot be loaded ({type(e).__name__}: "
                          f"{str(e)[:200]}); {fresh}") from None
    with saved:
        if len(saved.files) != len(variables):
            raise BackupError(
                f"backup {info['rng']} holds {len(saved.files)} random-generator states but the model has "
                f"{len(variables)}: it was written by a different model; {fresh}"
            )
        for i, v in enumerate(variables):
            v.assign(saved[f"v{i}"])
    return int(info["step"])
