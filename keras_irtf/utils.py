"""Small helpers: optional packages, progress reports, atomic file writes, JSON I/O."""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

# The packages of optional extras: keras_irtf loads them only when a feature needs them, through
# optional_import, never at the top of a module (tests/test_architecture.py checks both). Each maps
# to the extra of setup.cfg that installs it (None: no extra yet, the package is installed by name).
OPTIONAL_PACKAGES = {
    "keras_hub": "hub",
    "sentencepiece": "hub",  # keras-hub's SentencePiece tokenizers (SigLIP)
    "faiss": "faiss",
    "fastapi": "demo",
    "starlette": "demo",
    "uvicorn": "demo",
    "playwright": "test",  # the demo's browser test and latency benchmark (not the demo)
    "apache_beam": "beam",  # tools/index.py: the embedding pipeline
}


class MissingExtra(ImportError):
    """An optional package that is not installed; the message names the extra that installs it."""


def optional_import(module: str, extra, needed_by: str = ""):
    """`import module` for a package of an optional extra (OPTIONAL_PACKAGES), done where the
    feature that needs it runs, so that importing keras_irtf never loads it. MissingExtra, naming
    `needed_by`, the missing package and how to install the extra, when it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        missing = e.name.split(".")[0] if isinstance(e, ModuleNotFoundError) and e.name else top
        via = "" if missing == top else f" (needed by {top})"
        install = f"pip install -e '.[{extra}]'" if extra else f"pip install {missing}"
        raise MissingExtra(f"{needed_by or top} needs the package {missing}{via}, which is not installed: "
                           f"{install}") from e


class Progress:
    """Progress of a long loop, fed with increments, on standard error (standard output carries
    results only). On a terminal, a bar redrawn in place (count, share done, time spent and
    time left); otherwise (a log file, a pipe) a plain line through the `keras_irtf` log at every
    tenth of the way, with no control codes. Needs no TensorFlow or Keras, so that the readers of
    an export can show it."""

    WIDTH = 30  # characters of the bar on a terminal
    REDRAW_SECONDS = 0.05

    def __init__(self, total: int, desc: str = "", enabled: bool = True, unit: str = "step"):
        self.total = max(int(total), 1)
        self.count = 0
        self.enabled = enabled
        self.desc = desc or "progress"
        self.unit = unit
        self.terminal = enabled and sys.stderr.isatty()
        self._tenths = 0
        self._start = time.monotonic()
        self._drawn_at = None
        self._drawn_width = 0
        if enabled and desc:
            log.info(desc)
        if self.terminal:
            self._draw()

    def update(self, n: int = 1):
        before = self.count
        self.count = min(self.count + int(n), self.total)
        if self.terminal:
            finished = self.count == self.total
            if (finished and before < self.total) or (
                    not finished and time.monotonic() - self._drawn_at >= self.REDRAW_SECONDS):
                self._draw()
        elif self.enabled:
            tenths = self.count * 10 // self.total
            if tenths > self._tenths:
                self._tenths = tenths
                log.info(f"{self.desc}: {self.count}/{self.total} {self._units()} ({tenths * 10}%)")

    def close(self):
        if self.count < self.total:
            self.update(self.total - self.count)

    def _units(self) -> str:
        return self.unit[:-1] + "ies" if self.unit.endswith("y") else self.unit + "s"

    def line(self, elapsed: float) -> str:
        """The terminal line for the current count after `elapsed` seconds."""
        full = self.WIDTH * self.count // self.total
        bar = "=" * full + (">" + "." * (self.WIDTH - full - 1) if full < self.WIDTH else "")
        text = f"{self.count}/{self.total} {self._units()} [{bar}] {100 * self.count // self.total:3d}% {elapsed:.0f}s"
        if 0 < self.count < self.total:
            text += f", {elapsed / self.count * (self.total - self.count):.0f}s left"
        return text

    def _draw(self):
        self._drawn_at = time.monotonic()
        text = self.line(self._drawn_at - self._start)
        padding = " " * max(self._drawn_width - len(text), 0)  # what a longer line left behind
        self._drawn_width = len(text)
        sys.stderr.write("\r" + text + padding + ("\n" if self.count == self.total else ""))
        sys.stderr.flush()


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this machine runs (one of another user counts as running)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


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
            os.unlink(tmp)  # owned: the mkstemp file this write created
        raise


def write_json(path, data):
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def file_sha256(path) -> str:
    """sha256 of a file's bytes (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
