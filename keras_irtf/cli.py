"""What every tool's command line shares: --import, -q/--quiet, -v/--verbose, the log's format
and a quiet TensorFlow start.

Each tool first reads `--import MODULE` (repeatable), `--quiet` and `--verbose`, sends the
library's log (the `keras_irtf` loggers) to standard error, imports the user's modules (their
registrations join keras_irtf.registry), and only then builds its full argument parser, whose
choices are read from the registries:

    pre = cli.preparse(argv)                  # --import, -q, -v; TensorFlow started quietly
    parser = argparse.ArgumentParser(...)
    cli.add_common(parser)
    parser.add_argument("--method", choices=cli.names("composer"))
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import sys

from keras_irtf.registry import REGISTRIES, RegistryError, import_modules


def add_common(parser: argparse.ArgumentParser):
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import a module (dotted name or .py path) before the config is read, so that its "
                             "registered composers, encoders, datasets and GA methods can be named (repeatable)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="show only warnings and errors on standard error (no progress or notes)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show debug notes and TensorFlow's own start-up log lines (hidden by default)")


def preparse(argv=None):
    """Read --import, --quiet and --verbose, send the keras_irtf log to standard error, start
    TensorFlow (quietly unless --verbose), import the user's modules. Returns the namespace of
    those options."""
    pre = argparse.ArgumentParser(add_help=False)
    add_common(pre)
    known, _ = pre.parse_known_args(argv)
    configure_logging(logging.WARNING if known.quiet else logging.DEBUG if known.verbose else logging.INFO)
    start_tensorflow(verbose=known.verbose)
    try:
        import_modules(known.imports)
    except RegistryError as e:
        sys.stderr.write(f"error: {e}\n")
        raise SystemExit(2) from None
    return known


class _Console(logging.StreamHandler):
    """A stream handler that writes to the current sys.stderr unless given a stream (so that a
    redirected or captured stderr is followed)."""

    _keras_irtf_console = True

    def __init__(self, stream=None):
        super().__init__(stream)
        self._fixed = stream

    def emit(self, record):
        self.stream = self._fixed or sys.stderr
        super().emit(record)


class _ConsoleFormat(logging.Formatter):
    """Notes as they are; warnings and errors start with their level ("warning: ...")."""

    def format(self, record):
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def configure_logging(level=logging.INFO, stream=None):
    """Send the `keras_irtf` loggers to `stream` (standard error by default) at `level`, one
    plain line a record, and there only: their records no longer reach the root logger, which
    absl gives a handler of its own the first time TensorFlow logs through it (a SavedModel
    export does), so each line would otherwise be written twice. Standard output is left to
    results. Called again, it replaces the handler it added before."""
    logger = logging.getLogger("keras_irtf")
    for handler in list(logger.handlers):
        if getattr(handler, "_keras_irtf_console", False):
            logger.removeHandler(handler)
    handler = _Console(stream)
    handler.setFormatter(_ConsoleFormat("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return handler


def start_tensorflow(verbose: bool = False):
    """Import TensorFlow. Unless `verbose`, the C++ log lines its import prints (oneDNN and CUDA
    notices, absl's pre-initialisation warning, CPU feature hints) are dropped: they are written
    straight to file descriptor 2, so it is pointed at /dev/null for that moment, and later C++
    log lines are filtered with TF_CPP_MIN_LOG_LEVEL=3. Python errors are not affected (they are
    raised after it is restored). Devices are NOT initialised here: logical CPUs and multi-worker
    collectives must be configured first."""
    if verbose or "tensorflow" in sys.modules:
        import tensorflow  # noqa: F401

        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # C++ log lines after start-up too
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def command_line(script, argv, drop=()) -> str:
    """The shell command that runs `script` with `argv` again, quoted for pasting: the Python
    that runs now (by name when that name finds it on the PATH), the script as it was given,
    and the arguments, without the flags in `drop` (flags without a value; an abbreviation
    argparse accepts for one of them, such as --fre, is left out too)."""
    python = sys.executable
    name = os.path.basename(python)
    found = shutil.which(name)
    if found and os.path.realpath(found) == os.path.realpath(python):
        python = name

    def dropped(arg: str) -> bool:
        return arg.startswith("--") and len(arg) > 3 and any(flag.startswith(arg) for flag in drop)

    return shlex.join([python, str(script), *(a for a in argv if not dropped(a))])


def exit_now(code: int):
    """End the process at once with `code`, once standard output, standard error and the log
    are flushed. Python's own exit first frees every object, and TensorFlow's input-pipeline
    iterators wait for their background threads when freed, for up to a minute when one is
    mid-way through its autotuning pause: after Ctrl-C, when the backup is written and the
    message printed, nothing is left that is worth that wait."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)


def names(kind: str) -> list:
    """The registered names of a kind (composer, image_encoder, text_encoder, dataset, ...)."""
    return REGISTRIES[kind].names()
