"""Stopping a training run on Ctrl-C or SIGTERM without losing the steps since the last backup.

While `keras_irtf.training.loop.train` runs `model.fit`, SIGINT (Ctrl-C) and SIGTERM (a
scheduler, `kill`, a container stop) only ask training to stop: the step in progress finishes,
a backup of that step is written to `<run>/backup/`, and `TrainingInterrupted` is raised naming
the step, so a re-run of the same command resumes exactly there. A second signal stops at once
(the last backup written is what a re-run resumes). The handlers are installed for the fit only,
from the main thread only, and the previous ones are put back afterwards.

    request = StopRequest()
    with request.handling_signals():
        model.fit(ds, callbacks=[backup, StopOnRequest(request, backup)])
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import keras

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal. `step`: the optimizer step it stopped after (None when a
    second signal stopped it at once); `backup_step`: the step of the backup a re-run resumes
    (None when there is none); `signal_name`: "SIGINT" or "SIGTERM"."""

    def __init__(self, signal_name: str, step=None, backup_step=None, backup_dir=None):
        self.signal_name = signal_name
        self.step = step
        self.backup_step = backup_step
        self.backup_dir = backup_dir
        super().__init__(self.describe())

    def describe(self) -> str:
        at = f" at step {self.step}" if self.step is not None else ""
        if self.backup_step is None:
            kept = "no backup was written"
        elif self.backup_step == self.step:
            kept = f"backed up in {self.backup_dir}"
        else:
            kept = f"the last backup in {self.backup_dir} is from step {self.backup_step}"
        return f"{self.signal_name}: training stopped{at}; {kept}"


class StopRequest:
    """The first stop signal received while training (None until one arrives). `announce`: write
    one line to standard error as the first signal arrives, so that whoever pressed Ctrl-C knows it
    was heard while the step in progress finishes (a large model's step can take a while)."""

    def __init__(self, announce: bool = True):
        self.signum = None
        self.announce = announce

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum, frame):
        if self.signum is not None:  # the second one: stop now, without waiting for the step
            raise TrainingInterrupted(signal.Signals(signum).name)
        self.signum = signum
        if self.announce:
            # os.write, not logging or sys.stderr: a handler may run in the middle of either's write
            name = signal.Signals(signum).name
            again = "Ctrl-C" if signum == signal.SIGINT else name
            line = f"{name}: stopping after the step in progress and backing it up ({again} again stops at once)\n"
            with contextlib.suppress(OSError):
                os.write(2, line.encode())

    @contextlib.contextmanager
    def handling_signals(self, signals=SIGNALS):
        """Within the block, `signals` set this request instead of interrupting (main thread
        only: Python runs signal handlers there; elsewhere the block changes nothing)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in signals}
        for s in signals:
            signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)


class StopOnRequest(keras.callbacks.Callback):
    """After each step: if a stop was requested, back up this step (`backup`: the run's
    keras_irtf.training.backup.TrainingBackup) and raise TrainingInterrupted. Put it after every
    other callback, so that each of them has seen the step first."""

    def __init__(self, request: StopRequest, backup):
        super().__init__()
        self.request = request
        self.backup = backup

    def on_train_batch_end(self, batch, logs=None):
        if self.request.signum is not None:
            self.stop(logs)

    def stop(self, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        self.backup.save(logs)  # nothing to do when this step is the backup already
        raise TrainingInterrupted(self.request.signal_name, step=step, backup_step=self.backup.last_good_step,
                                  backup_dir=self.backup.backup_dir)
