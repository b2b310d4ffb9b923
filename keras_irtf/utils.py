"""Small helpers: optional packages, progress reports, atomic file writes, JSON I/O."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# The packages keras_irtf loads only when a feature needs them, and the extra of setup.cfg that
# installs each (None: the base install has it; it is still loaded only where it is used).
OPTIONAL_PACKAGES = {
    "keras_hub": "hub",
    "sentencepiece": "hub",  # keras-hub's SentencePiece tokenizers (SigLIP)
    "faiss": "faiss",
    "fastapi": "demo",
    "starlette": "demo",
    "uvicorn": "demo",
    "playwright": "demo",
    "tensorflow_hub": None,
    "apache_beam": None,
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
        install = f"pip install -e '.[{extra}]'" if extra else "pip install -e ."
        raise MissingExtra(f"{needed_by or top} needs the package {missing}{via}, which is not installed: "
                           f"{install}") from e


class Progress:
    """Progress of a long loop, fed with increments, on standard error (standard output carries
    results only). On a terminal, Keras' Progbar redrawn in place (the style training shows);
    otherwise (a log file, a pipe) a plain line through the `keras_irtf` log at every tenth of
    the way, with no control codes."""

    def __init__(self, total: int, desc: str = "", enabled: bool = True, unit: str = "step"):
        self.total = max(int(total), 1)
        self.count = 0
        self.enabled = enabled
        self.desc = desc or "progress"
        self.unit = unit
        self.bar = None
        self._tenths = 0
        if enabled:
            if desc:
                log.info(desc)
            if sys.stderr.isatty():
                import keras

                with contextlib.redirect_stdout(sys.stderr):
                    self.bar = keras.utils.Progbar(self.total, interval=0.05, unit_name=unit)

    def update(self, n: int = 1):
        self.count = min(self.count + int(n), self.total)
        if self.bar is not None:
            with contextlib.redirect_stdout(sys.stderr):  # Keras writes its bar to sys.stdout
                self.bar.update(self.count)
        elif self.enabled:
            tenths = self.count * 10 // self.total
            if tenths > self._tenths:
                self._tenths = tenths
                units = self.unit[:-1] + "ies" if self.unit.endswith("y") else self.unit + "s"
                log.info(f"{self.desc}: {self.count}/{self.total} {units} ({tenths * 10}%)")

    def close(self):
        if self.count < self.total:
            self.update(self.total - self.count)


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
