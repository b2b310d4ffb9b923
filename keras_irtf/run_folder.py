"""A run folder that never loses a result: overwrite check, exclusive lock, config fingerprint.

`train()` enters `run_folder_guard(run, cfg)` before it writes anything:

- a folder that holds a finished run (model.keras or metrics.json, and no backup to resume) is
  refused unless `overwrite=True` (tools/train.py --overwrite), which removes that run's files
  first (so its TensorBoard logs do not mix with the new run's). It removes only what the run
  can be proven to have written: files listed with their sha256 in the run's manifest
  (run_manifest.json) and unchanged since, and the logs/ and backup/ folders carrying their
  ownership marker (keras_irtf.safety). A file or folder of these names that keras_irtf did
  not write stops the command, naming it; nothing is deleted;
- the same manifest is checked when a run is loaded (`verify_run_files`): a file changed or
  damaged since training (a vocab.txt missing a line silently lowers recall) is reported, not
  used;
- an exclusive lock file `<run>/.lock` (created with O_EXCL, holding the owner's pid, start time
  and host) stops a second training into the same folder at once. A lock whose process is gone
  (same host, pid not running, or running but started later: a reused pid) is stale and taken over;
- a backup to resume must come from the same experiment: the resolved config (less the keys
  that may change on resume, RESUMABLE_KEYS) is stored with the backup, and a re-run whose
  config differs stops and lists the keys, with `fresh=True` (--fresh) to discard the backup.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import socket
import time
import zipfile
from pathlib import Path

from keras_irtf.config import ConfigError
from keras_irtf.safety import is_empty_folder, mark_owned, not_owned_error, owned_kind, remove_owned
from keras_irtf.utils import file_sha256, process_alive, read_json, write_json

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
FINGERPRINT_NAME = "config_fingerprint.json"  # in <run>/backup/
MANIFEST_NAME = "run_manifest.json"  # sha256 of every file the run wrote
# What a finished run consists of (what --overwrite removes); anything else in the folder stays.
RUN_FILES = ("model.keras", "metrics.json", "config.yaml", "vocab.txt")
# The run's folders and the kind their ownership marker names.
BACKUP_KIND, LOGS_KIND = "training backup", "run logs"
RUN_FOLDERS = {"logs": LOGS_KIND, "backup": BACKUP_KIND}

# Keys that may differ between a backup and the run that resumes it: the length of the run (to
# extend it), how often it logs and backs up, where it is written, the hardware it runs on, and
# everything that only concerns the evaluation after training.
RESUMABLE_KEYS = (
    "train.steps",
    "train.steps_per_epoch",
    "train.backup_every_steps",
    "train.log_every_steps",
    "train.out",
    "train.preset",
    "train.strategy",
    "train.devices",
    "train.collective_timeout_seconds",
    "data.cache_dir",
    "data.file_cache",
    "data.train_recall_queries",
    "eval.*",
)


class RunFolderError(ConfigError):
    """A run folder that cannot be used as asked (finished run, locked, other experiment)."""


class BackupError(RunFolderError):
    """A backup that cannot be resumed: incomplete, damaged, or beyond the steps asked."""


def latest_backup(backup_dir):
    """The last complete backup's state ({"step", "weights", "rng", "train_seconds"}), or None
    when there is none (no folder, or no state.json yet). A state.json whose files are missing
    or unreadable raises BackupError: resuming quietly from step 0 would discard the run."""
    backup_dir = Path(backup_dir)
    state = backup_dir / "state.json"
    if not state.is_file():
        return None
    fresh = "pass --fresh to discard the backup and start over"
    try:
        info = read_json(state)
        step = int(info["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BackupError(f"{state} is damaged ({type(e).__name__}: {e}), so the backup cannot be resumed; "
                          f"{fresh}") from None
    if step < 0:
        raise BackupError(f"{state} names step {step}; {fresh}")
    for key in ("weights", "rng"):
        name = info.get(key)
        if not isinstance(name, str) or not (backup_dir / name).is_file():
            raise BackupError(
                f"the backup in {backup_dir} is incomplete: state.json names {key} file {name!r}, which is "
                f"missing, so step {step} cannot be restored exactly; {fresh}"
            )
        info[key] = backup_dir / name
    return info


# ---- finished runs and --overwrite ------------------------------------------------------------
def finished_run_files(run) -> list:
    """The result files of a finished run in `run` ([] when none, or when a complete backup
    shows that the run is still to be resumed; an empty or broken backup/ does not count)."""
    run = Path(run)
    try:
        resumable = latest_backup(run / "backup") is not None
    except BackupError:
        resumable = False
    if resumable:
        return []
    return [name for name in ("model.keras", "metrics.json") if (run / name).exists()]


# ---- the run's manifest: which files it wrote, with their checksums ---------------------------
def read_manifest(run) -> dict:
    """{file name: {"sha256", "bytes"}} of the files the run recorded ({} without a manifest)."""
    path = Path(run) / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        record = read_json(path)
    except (OSError, ValueError) as e:
        raise DamagedRunFile(f"{path} is damaged ({e}); it lists the run's files with their checksums. "
                             f"Train the run again, or delete {path} to load the run unchecked") from None
    files = record.get("files") if isinstance(record, dict) else None
    if record.get("written_by") != "keras_irtf" or not isinstance(files, dict):
        raise DamagedRunFile(f"{path} is not a keras_irtf run manifest (expected 'written_by' and 'files')")
    return files


def record_run_files(run, *names):
    """Add (or refresh) `names` in the run's manifest with their current sha256 and size: call
    after writing each of them."""
    run = Path(run)
    files = read_manifest(run)
    for name in names:
        path = run / name
        files[name] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    write_json(run / MANIFEST_NAME, {"written_by": "keras_irtf", "files": dict(sorted(files.items()))})


def proven_run_file(run, name, files=None) -> bool:
    """True when `run/name` is listed in the manifest and unchanged since it was recorded."""
    files = read_manifest(run) if files is None else files
    path = Path(run) / name
    entry = files.get(name)
    return bool(entry) and path.is_file() and not path.is_symlink() and file_sha256(path) == entry.get("sha256")


def verify_run_files(run, names, verbose: bool = True):
    """Check `names` in run folder `run` against the manifest's checksums; raise DamagedRunFile
    naming the first file that differs. A run without a manifest (written by hand, or by a
    keras_irtf that did not record one) loads unchecked, with a warning."""
    run = Path(run)
    files = read_manifest(run)
    if not files:
        if verbose:
            log.warning(f"{run} has no {MANIFEST_NAME}: its files are loaded without checking their "
                        f"checksums")
        return
    for name in names:
        path = run / name
        entry = files.get(name)
        if entry is None or not path.is_file():
            continue  # not written by this run (e.g. no vocabulary for a frozen text encoder)
        digest = file_sha256(path)
        if digest != entry.get("sha256"):
            raise DamagedRunFile(
                f"{path} differs from the file training wrote (sha256 {digest[:12]}..., {path.stat().st_size} "
                f"bytes; recorded {str(entry.get('sha256'))[:12]}..., {entry.get('bytes')} bytes in "
                f"{run / MANIFEST_NAME}): it was changed or damaged since, and a model read with it would "
                f"not be the model that was trained. Restore the file, or train the run again"
            )


def check_not_finished(run, overwrite: bool = False, verbose: bool = True):
    """Refuse to train into a folder holding a finished run unless `overwrite`; with it, remove
    that run's files (RUN_FILES the manifest proves, RUN_FOLDERS with their marker) first,
    after checking all of them (a file keras_irtf cannot prove it wrote stops the command
    before anything is removed)."""
    run = Path(run)
    found = finished_run_files(run)
    if not found:
        return
    if not overwrite:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime((run / found[0]).stat().st_mtime))
        raise RunFolderError(
            f"{run} holds a finished run ({', '.join(found)}, written {when}); training again would replace "
            f"it. Choose another folder with --out, or pass --overwrite to replace it (tools/evaluate.py "
            f"--run {run} re-evaluates it without training)."
        )
    files = read_manifest(run)
    hint = "move it away or choose another --out; --overwrite replaces only what a keras_irtf run wrote"
    for name in RUN_FILES:
        path = run / name
        if (path.exists() or path.is_symlink()) and not proven_run_file(run, name, files):
            raise not_owned_error(path, "run file", hint + f" (it is not listed unchanged in {MANIFEST_NAME})")
    for name, kind in RUN_FOLDERS.items():
        path = run / name
        if (path.exists() or path.is_symlink()) and not is_empty_folder(path) and owned_kind(path) != kind:
            raise not_owned_error(path, kind, hint)
    for name in RUN_FILES:
        (run / name).unlink(missing_ok=True)  # owned: its checksum in the run's manifest was checked above
    for name, kind in RUN_FOLDERS.items():
        remove_owned(run / name, kind, hint)
    (run / MANIFEST_NAME).unlink(missing_ok=True)  # owned: it lists only the files just removed
    if verbose:
        log.info(f"--overwrite: removed the finished run in {run}")


# ---- the lock ---------------------------------------------------------------------------------
def _process_start(pid: int):
    """The start time of process `pid` in clock ticks since boot (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def lock_is_stale(owner: dict) -> bool:
    """True when the lock's owner is a process of this host that no longer runs."""
    if owner.get("host") != socket.gethostname():
        return False  # cannot tell for another machine: treat as held
    pid = int(owner.get("pid", -1))
    if not process_alive(pid):  # False for pid <= 0 too
        return True
    started = owner.get("process_start")
    return started is not None and _process_start(pid) not in (None, started)  # pid reused


class RunLock:
    """An exclusive lock on a run folder (a file created with O_EXCL), released by `release()`."""

    def __init__(self, run):
        self.path = Path(run) / LOCK_NAME
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(),
                      "process_start": _process_start(os.getpid()),
                      "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.held = False

    def acquire(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self._read()
                if other is not None and not lock_is_stale(other):
                    raise RunFolderError(
                        f"{self.path.parent} is being written by another training (pid {other.get('pid')} on "
                        f"{other.get('host')}, since {other.get('since')}); two trainings into one folder would "
                        f"overwrite each other's backup and config. Wait for it, or choose another --out. "
                        f"If that process is gone, delete {self.path}."
                    ) from None
                # stale (its process is gone) or unreadable (a crash while it was written): take it over
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()  # owned: a lock file of a training that no longer runs
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
            self.held = True
            return self
        raise RunFolderError(f"could not take the lock {self.path}: another process keeps re-creating it")

    def _read(self):
        for _ in range(20):  # the owner may be between creating the file and writing it
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                return None
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                time.sleep(0.05)
        return None

    def release(self):
        if self.held:
            if (self._read() or {}).get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)  # owned: the lock holds this process's pid
            self.held = False


# ---- the config fingerprint -------------------------------------------------------------------
def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def fingerprinted_config(cfg) -> dict:
    """{"section.key": value} of the resolved config, less RESUMABLE_KEYS."""
    flat = _flatten(cfg.to_dict())
    return {k: v for k, v in flat.items() if not any(fnmatch.fnmatchcase(k, p) for p in RESUMABLE_KEYS)}


def config_fingerprint(cfg) -> dict:
    values = fingerprinted_config(cfg)
    digest = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()
    return {"sha256": digest, "config": values}


def write_fingerprint(backup_dir, cfg):
    ensure_backup_dir(backup_dir)
    write_json(Path(backup_dir) / FINGERPRINT_NAME, config_fingerprint(cfg))


def check_fingerprint(backup_dir, cfg, verbose: bool = True):
    """Stop when the backup in `backup_dir` was written by a run of another config."""
    path = Path(backup_dir) / FINGERPRINT_NAME
    if not path.is_file():
        if verbose:
            log.warning(f"{backup_dir} has no {FINGERPRINT_NAME} (written by an older keras_irtf): resuming "
                        f"without checking that it is the same experiment")
        return
    stored = read_json(path)
    current = config_fingerprint(cfg)
    if stored.get("sha256") == current["sha256"]:
        return
    old, new = stored.get("config", {}), current["config"]
    differ = sorted(k for k in set(old) | set(new) if old.get(k, "<absent>") != new.get(k, "<absent>"))
    listing = "; ".join(f"{k}: backup {old.get(k, '<absent>')!r}, now {new.get(k, '<absent>')!r}" for k in differ[:12])
    more = f"; and {len(differ) - 12} more" if len(differ) > 12 else ""
    raise RunFolderError(
        f"{Path(backup_dir).parent} holds a backup of a different experiment, so it cannot be resumed with "
        f"this config ({len(differ)} key(s) differ: {listing}{more}). Re-run with the backup's settings to "
        f"resume, pass --fresh to discard the backup and start over, or choose another --out. Keys that may "
        f"change on resume: {', '.join(RESUMABLE_KEYS)}."
    )


# ---- all of it, around a training ------------------------------------------------------------
@contextlib.contextmanager
def run_folder_guard(run, cfg, overwrite: bool = False, fresh: bool = False, verbose: bool = True,
                     chief: bool = True):
    """Lock `run`, refuse a finished run (unless `overwrite`), discard (`fresh`) or check the
    backup's config, and store this config's fingerprint for a fresh start. The lock is held
    until the block exits. `chief=False` (a multi-worker run's other workers, which never
    write the run folder) skips all of it."""
    run = Path(run)
    if not chief:
        yield run
        return
    check_run_folder_path(run)
    lock = RunLock(run).acquire()
    try:
        check_not_finished(run, overwrite, verbose)
        backup_dir = run / "backup"
        check_run_subfolders(run)
        if fresh and remove_owned(backup_dir, BACKUP_KIND, "move it away or choose another --out") and verbose:
            log.info(f"--fresh: discarded the backup in {backup_dir}")
        if latest_backup(backup_dir) is not None:
            check_fingerprint(backup_dir, cfg, verbose)
        else:
            write_fingerprint(backup_dir, cfg)
        yield run
    finally:
        lock.release()


def check_run_folder_path(run):
    """--out must name a folder (or nothing yet): a file there is refused before any work."""
    run = Path(run)
    for parent in [run, *run.parents]:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise RunFolderError(f"{parent} is a file, so the run folder {run} cannot be created there; "
                                     f"choose another --out (train.out)")
            return


def check_run_subfolders(run):
    """The run's logs/ and backup/ must be missing, empty or ours: a run writes into them and
    later removes them, which it must never do to a user's folder of the same name."""
    for name, kind in RUN_FOLDERS.items():
        path = Path(run) / name
        if (path.exists() or path.is_symlink()) and not is_empty_folder(path) and owned_kind(path) != kind:
            raise not_owned_error(path, kind, f"this run would write its {kind} there; move it away or "
                                              f"choose another --out")


def ensure_owned_dir(folder, kind):
    """Create `folder` (with its ownership marker) unless it is already one of ours."""
    folder = Path(folder)
    if owned_kind(folder) == kind:
        return folder
    if (folder.exists() or folder.is_symlink()) and not is_empty_folder(folder):
        raise not_owned_error(folder, kind, "move it away or choose another --out")
    mark_owned(folder, kind)
    return folder


def ensure_backup_dir(backup_dir):
    return ensure_owned_dir(backup_dir, BACKUP_KIND)


# ---- model files ------------------------------------------------------------------------------
class DamagedModelFile(RunFolderError):
    """A model.keras that is empty, truncated or otherwise not a readable Keras archive."""


class DamagedRunFile(RunFolderError):
    """A run folder's file that differs from what training wrote (its manifest's checksum)."""


def check_model_file(path):
    """Raise FileNotFoundError when `path` is missing and DamagedModelFile when it is not a whole
    Keras archive (a .keras file is a zip: its directory and every member's CRC are checked), so
    that a damaged file is reported as damaged, not as missing or as a Keras traceback."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    advice = ("it was probably cut short by a crash or a full disk while being copied or written. Train the "
              "run again (tools/train.py with --overwrite) or restore the file from a copy")
    size = path.stat().st_size
    if size == 0:
        raise DamagedModelFile(f"{path} is damaged: the file is empty; {advice}")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DamagedModelFile(f"{path} is damaged: not a readable Keras archive ({e}; {size} bytes); {advice}") from None
    if bad is not None:
        raise DamagedModelFile(f"{path} is damaged: member {bad} fails its checksum; {advice}")
    if "config.json" not in names:
        raise DamagedModelFile(f"{path} is damaged: no config.json inside (holds {names[:5]}); {advice}")


def interrupted_message(run, how: str = "interrupted", stopped_at=None, resume_command=None) -> str:
    """The one line tools/train.py prints on Ctrl-C or SIGTERM: the step training stopped at
    (`stopped_at`, when known), the backup a re-run resumes from, and the command that resumes
    it (`resume_command`; else "the same command")."""
    try:
        info = latest_backup(Path(run) / "backup") if run is not None else None
    except BackupError:
        info = None
    again = f"`{resume_command}`" if resume_command else "the same command"
    at = f" at step {stopped_at}" if stopped_at is not None else ""
    if info is None:
        return f"{how}{at} before the first backup of {run}; run {again} to start again"
    saved = int(info["step"])
    if stopped_at is None:
        return f"{how}; the last backup in {run} is from step {saved}; resume with {again}"
    if stopped_at == saved:
        return f"{how} at step {saved} (backed up in {run}); resume with {again}"
    return f"{how} at step {stopped_at}; the last backup in {run} is from step {saved}; resume with {again}"
