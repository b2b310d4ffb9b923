"""The two file-system rules every writer and reader of keras_irtf follows.

1. **Delete or replace only what keras_irtf can prove it wrote.** A folder the project creates
   (a generated dataset, a run's backup, an export version) carries a marker file,
   `.keras_irtf.json`, naming what kind of folder it is. `remove_owned` deletes a folder only
   when its marker names the expected kind; `prepare_output_folder` accepts a missing or empty
   folder, or one of ours. Anything else in the way raises `NotOwnedError`, whose one-line
   message names the path and what to do (a flag, or moving the files away). Files in a run
   folder are proven by the run's manifest instead (keras_irtf.run_folder).
2. **Open or serve a file on a request's behalf only after resolving it under its root.**
   `resolve_under(root, name)` follows every symlink and refuses a result outside the resolved
   root (an absolute name, `..`, a link pointing elsewhere). Dataset label files, the demo's
   gallery route and export names all go through it.

Every recursive delete in the package goes through `remove_owned`; tests/test_hardening_owned.py
scans the sources for `rmtree` and `unlink` calls and checks each call site's guard.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from keras_irtf.config import ConfigError

MARKER_NAME = ".keras_irtf.json"


class NotOwnedError(ConfigError):
    """A path the command would delete or replace, which keras_irtf cannot prove it wrote."""


class OutsideRootError(ValueError):
    """A name that resolves outside the folder it must stay in."""


# ---- containment ------------------------------------------------------------------------------
def is_under(path, root) -> bool:
    """True when `path` (resolved, symlinks followed) is `root` (resolved) or lies below it."""
    real, root_real = os.path.realpath(path), os.path.realpath(root)
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def resolve_under(root, name, what: str = "path") -> Path:
    """`root / name` with every symlink resolved, if it lies inside the resolved `root`; else
    OutsideRootError naming `what`, the name and where it leads."""
    name = str(name)
    root_real = os.path.realpath(root)
    if "\x00" in name:
        raise OutsideRootError(f"{what} {name!r} holds a NUL byte: not a file name")
    real = os.path.realpath(os.path.join(root_real, name))
    if os.path.isabs(name) or not is_under(real, root_real):
        raise OutsideRootError(f"{what} {name!r} resolves to {real}, outside {root_real}")
    return Path(real)


# ---- ownership --------------------------------------------------------------------------------
def mark_owned(folder, kind: str, **details) -> Path:
    """Write the marker that lets keras_irtf later replace or delete `folder` (of `kind`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / MARKER_NAME
    record = {"written_by": "keras_irtf", "kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **details}
    with open(marker, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    return marker


def owned_kind(folder):
    """The kind named by `folder`'s marker, or None (no marker, unreadable, a link, not ours)."""
    folder = Path(folder)
    marker = folder / MARKER_NAME
    if folder.is_symlink() or not folder.is_dir() or marker.is_symlink() or not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("written_by") != "keras_irtf":
        return None
    kind = record.get("kind")
    return kind if isinstance(kind, str) else None


def _listing(folder: Path, limit: int = 3) -> str:
    try:
        names = sorted(p.name for p in folder.iterdir())
    except OSError:
        return ""
    shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
    return f" (holds {shown})" if shown else ""


def _article(noun: str) -> str:
    return "an" if noun[:1].lower() in "aeiou" else "a"


def not_owned_error(path, kind: str, hint: str) -> NotOwnedError:
    path = Path(path)
    what = "a file" if path.is_file() or path.is_symlink() and not path.is_dir() else "a folder"
    listing = _listing(path) if path.is_dir() and not path.is_symlink() else ""
    return NotOwnedError(
        f"{path} is {what} keras_irtf did not write{listing}, so it will not delete or replace it as "
        f"{_article(kind)} {kind}; {hint}"
    )


def remove_owned(folder, kind: str, hint: str = "move it away or choose another folder") -> bool:
    """Delete `folder` when its marker proves it is a `kind` folder keras_irtf wrote; do nothing
    when it does not exist; otherwise raise NotOwnedError (nothing is deleted). Returns whether
    a folder was deleted."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return False
    if owned_kind(folder) != kind:
        raise not_owned_error(folder, kind, hint)
    shutil.rmtree(folder)  # owned: its marker names this kind
    return True


def is_empty_folder(folder) -> bool:
    folder = Path(folder)
    return folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir())


def prepare_output_folder(folder, kind: str, hint: str, replace: bool = False, replace_flag: str = "") -> bool:
    """Check that `folder` may receive a new `kind` folder: missing or empty is fine; one of
    ours of the same kind is fine when `replace` (else NotOwnedError naming `replace_flag`);
    anything else raises NotOwnedError with `hint`. Returns True when an owned folder of this
    kind is in the way (the caller replaces it, atomically, once its new content is complete)."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return False
    if is_empty_folder(folder):
        return False
    if owned_kind(folder) == kind:
        if replace:
            return True
        raise NotOwnedError(f"{folder} already holds a {kind} written by keras_irtf; pass {replace_flag} to "
                            f"replace it, or choose another folder")
    raise not_owned_error(folder, kind, hint)


def replace_folder(tmp, final, kind: str):
    """Move the complete folder `tmp` to `final`. `final` may be missing, an empty folder, or a
    folder of ours of `kind` (it is swapped out, then deleted); anything else raises
    NotOwnedError and leaves both in place."""
    tmp, final = Path(tmp), Path(final)
    if is_empty_folder(final):
        final.rmdir()  # owned: an empty folder holds nothing to lose
    if not final.exists() and not final.is_symlink():
        os.replace(tmp, final)
        return
    if owned_kind(final) != kind:
        raise not_owned_error(final, kind, "move it away or choose another folder")
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if old.exists() or old.is_symlink():  # left by an earlier run of this process id: ours only
        remove_owned(old, kind)
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)  # put the previous folder back: nothing is lost
        raise
    remove_owned(old, kind)
