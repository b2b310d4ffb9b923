"""Small helpers: a progress bar that needs no TensorFlow, atomic file writes, JSON I/O."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path


class Progress:
    """A text progress bar on stderr: redrawn in place on a terminal, every 10% otherwise."""

    def __init__(self, total: int, desc: str = "", enabled: bool = True, stream=None):
        self.total = max(int(total), 1)
        self.desc = desc
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.start = time.time()
        self.count = 0
        self._last_decile = -1
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, n: int = 1):
        self.count = min(self.count + n, self.total)
        if not self.enabled:
            return
        frac = self.count / self.total
        elapsed = time.time() - self.start
        eta = elapsed / frac * (1 - frac) if frac > 0 else 0.0
        line = (
            f"{self.desc} [{'=' * int(30 * frac):<30}] {self.count}/{self.total} "
            f"{elapsed:.0f}s elapsed, {eta:.0f}s left"
        )
        if self._tty:
            self.stream.write("\r" + line)
            if self.count >= self.total:
                self.stream.write("\n")
            self.stream.flush()
        else:
            decile = int(frac * 10)
            if decile > self._last_decile:
                self._last_decile = decile
                self.stream.write(line + "\n")
                self.stream.flush()

    def close(self):
        if self.count < self.total:
            self.count = self.total - 1
            self.update(1)


def umask_file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file (0666 less the user's umask).

    The umask can only be read by setting it; set it straight back (process-wide, but only for
    the instant between the two calls)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path, text: str):
    """Write a file so that readers see the old or the new content, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600 files; run-folder files should follow the umask like model.keras does
        os.fchmod(fd, umask_file_mode())
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path, data):
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path):
    with open(path) as f:
        return json.load(f)
