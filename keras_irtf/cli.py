"""What every tool's command line shares: --import, --verbose, and a quiet TensorFlow start.

Each tool first reads `--import MODULE` (repeatable) and `--verbose`, imports the user's
modules (their registrations join keras_irtf.registry), and only then builds its full argument
parser, whose choices are read from the registries:

    pre = cli.preparse(argv)                  # --import, --verbose; TensorFlow started quietly
    parser = argparse.ArgumentParser(...)
    cli.add_common(parser)
    parser.add_argument("--method", choices=cli.names("composer"))
"""

from __future__ import annotations

import argparse
import os
import sys


def add_common(parser: argparse.ArgumentParser):
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import a module (dotted name or .py path) before the config is read, so that its "
                             "registered composers, encoders, datasets and GA methods can be named (repeatable)")
    parser.add_argument("--verbose", action="store_true",
                        help="also show TensorFlow's own start-up log lines (hidden by default)")


def preparse(argv=None):
    """Read --import and --verbose, start TensorFlow (quietly unless --verbose), import the
    user's modules. Returns the namespace of those two options."""
    pre = argparse.ArgumentParser(add_help=False)
    add_common(pre)
    known, _ = pre.parse_known_args(argv)
    start_tensorflow(verbose=known.verbose)
    from keras_irtf.registry import RegistryError, import_modules

    try:
        import_modules(known.imports)
    except RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return known


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


def names(kind: str) -> list:
    """The registered names of a kind (composer, image_encoder, text_encoder, dataset, ...)."""
    from keras_irtf.registry import REGISTRIES

    return REGISTRIES[kind].names()
