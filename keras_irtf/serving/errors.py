"""What the export modules share: the export's metadata file name and its errors.

keras_irtf.serving.export writes exports, keras_irtf.serving.reader opens them and
keras_irtf.serving.op_libraries reads the op libraries an export records. All raise these; the
reader and the export module re-export them.
"""

from __future__ import annotations

EXPORT_INFO_NAME = "keras_irtf_export.json"  # in <version>/assets.extra/ (TF Serving's extras folder)


class ExportError(ValueError):
    """An export that cannot be made (bad run folder, gallery, version); the message says why."""


class DamagedExport(ExportError):
    """An export version folder holding a file that cannot be read (truncated, missing, garbled)."""


def damaged_export(path, problem) -> DamagedExport:
    """The one-line error for an export file (or folder) that cannot be read: `problem` is a text
    or the exception (its first line is kept; TensorFlow's go on for many)."""
    lines = [line.strip() for line in str(problem).splitlines() if line.strip()]
    reason = lines[0] if lines else type(problem).__name__
    if reason.startswith(str(path)):  # TensorFlow's "<file>; No such file or directory"
        reason = reason[len(str(path)):].lstrip(";: ") or reason
    reason = reason[:300]
    if isinstance(problem, (IndexError, KeyError, RuntimeError)):  # messages that do not say what failed
        reason = f"{type(problem).__name__}: {reason}"
    return DamagedExport(f"damaged export: {path}: {reason}; export the run again (tools/export.py)")
