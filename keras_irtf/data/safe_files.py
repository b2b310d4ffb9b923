"""Reading dataset files that may not be trustworthy: restricted unpickling, contained paths.

A dataset folder passed with --data-root is input from elsewhere. Two ways such input could
reach beyond what it describes are closed here:

- the CSS `.npy` is a pickled dict, and unpickling runs whatever callables the pickle names.
  `load_pickled_npy` unpickles with `RestrictedUnpickler`, which admits only the builtins and
  numpy reconstruction functions that plain data needs (dict, list, str, int, float, numpy
  arrays, dtypes and scalars) and refuses anything else with an error naming the file and the
  refused global;
- label files list image paths relative to the dataset root. `contained_path` resolves a listed
  path (symlinks included) and refuses one that leaves the root (an absolute path, `..`, or a
  symlink pointing elsewhere), naming the file and line.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np

from keras_irtf.data.base import DatasetError
from keras_irtf.safety import is_under

log = logging.getLogger(__name__)


class UnsafeFileError(DatasetError):
    """A dataset file that asks for something a data file must not (code, paths outside the root)."""


# (module, name) pairs a pickle of plain data with numpy arrays needs. numpy moved its core
# module to numpy._core in 2.0; files written by either version name one or the other.
_NUMPY_GLOBALS = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {
    (module, "_frombuffer") for module in ("numpy.core.numeric", "numpy._core.numeric")
} | {("numpy", "ndarray"), ("numpy", "dtype")}
_BUILTIN_GLOBALS = {("builtins", name) for name in ("dict", "list", "set", "frozenset", "tuple", "str", "bytes",
                                                    "bytearray", "int", "float", "bool", "complex")}
ALLOWED_GLOBALS = frozenset(_NUMPY_GLOBALS | _BUILTIN_GLOBALS)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ALLOWED_GLOBALS: data, never code."""

    def __init__(self, file, source: str = "<pickle>", **kwargs):
        super().__init__(file, **kwargs)
        self.source = source

    def find_class(self, module, name):
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module.startswith("numpy.dtypes") and name.endswith("DType"):  # numpy 2 dtype classes
            return super().find_class(module, name)
        raise UnsafeFileError(
            f"{self.source}: refused to unpickle {module}.{name}: this file may only hold plain data "
            f"(dict, list, str, int, float, numpy arrays and scalars), and a pickle that names other "
            f"callables can run code when it is loaded. Re-create the file from a trusted source."
        )


def load_pickled_npy(path):
    """The object stored in a `.npy` file, unpickled with RestrictedUnpickler when it is an object
    array (a pickled dict is saved as a 0-d object array); `.item()` of a 0-d array is returned as
    is. Non-object arrays are read without pickle. Raises UnsafeFileError for a pickle naming a
    callable outside ALLOWED_GLOBALS."""
    path = Path(path)
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if not dtype.hasobject:
            f.seek(0)
            return np.load(f, allow_pickle=False)
        # what np.load does for object arrays, with a restricted unpickler instead of pickle.load
        array = RestrictedUnpickler(f, source=str(path), encoding="latin1").load()
    if not isinstance(array, np.ndarray):
        return array
    return array.item() if array.shape == () else array


def contained_path(root, listed, where: str, policy: str = "error"):
    """`root / listed`, resolved, if it stays inside the resolved root; else an error naming
    `where` (file and line) or, with policy="skip", None (the caller drops the entry and warns).

    Symlinks are followed: a link inside the root that points outside it is refused too."""
    root_real = os.path.realpath(root)
    listed = str(listed)
    real = os.path.realpath(os.path.join(root_real, listed))
    if os.path.isabs(listed) or not is_under(real, root_real):
        if policy == "skip":
            return None
        raise UnsafeFileError(
            f"{where}: image path {listed!r} resolves to {real}, outside the dataset root {root_real}. "
            f"Listed paths must be relative and stay inside --data-root (no absolute paths, no '..', no "
            f"symlinks out of it). Fix the file, or run with --set data.on_bad_image=skip to drop such "
            f"entries with a warning."
        )
    return Path(os.path.join(str(root), listed))


def report_outside(dropped, desc: str, verbose: bool = True):
    """Warn about entries dropped by contained_path(policy="skip")."""
    if dropped and verbose:
        listing = "; ".join(dropped[:5]) + (f"; and {len(dropped) - 5} more" if len(dropped) > 5 else "")
        log.warning(f"skipping {len(dropped)} image path(s) outside the dataset root in {desc} "
                    f"(data.on_bad_image=skip): {listing}")
