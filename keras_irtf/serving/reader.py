"""Reading an export back: its description, its gallery list, its SavedModel, its gallery folder.

    from keras_irtf.serving.reader import open_export
    export = open_export("exported/css_tirg_s0/1")       # export.module: the loaded SavedModel
    export.module.signatures["serving_default"]

What tools/query.py (keras_irtf.serving.query) and the demo (keras_irtf.demo) read of an export,
with TensorFlow and numpy only: no Keras, and no module that builds a model (the writer is
keras_irtf.serving.export, which re-exports these names). Every file is checked as it is read: a
truncated, missing or garbled one is a `DamagedExport` naming it, and an op library that cannot
be loaded a `MissingOpLibrary` naming the package to install (keras_irtf.serving.op_libraries).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Optional

import tensorflow as tf
from google.protobuf.message import DecodeError
from tensorflow.core.protobuf import saved_model_pb2

from keras_irtf.safety import OutsideRootError, resolve_under
from keras_irtf.serving.errors import EXPORT_INFO_NAME, DamagedExport, ExportError, damaged_export  # noqa: F401
from keras_irtf.serving.op_libraries import MissingOpLibrary, graph_op_names, register_op_libraries
from keras_irtf.utils import file_sha256

GALLERY_LIST_NAME = "gallery.txt"  # one gallery path a line, in id order, next to the info file
GALLERY_HASHES_NAME = "gallery_sha256.txt"  # the sha256 of each gallery file's bytes, in id order
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp")


# ---- the gallery folder ------------------------------------------------------------------------


def gallery_file(folder, name) -> Path:
    """The gallery file `name` (a path relative to the gallery `folder`), every symlink resolved.
    A name leading out of the folder (absolute, "..", a link to a file elsewhere) raises
    ExportError naming it: the exporter, tools/query.py and the demo read only files inside the
    gallery folder (the folder itself may be a link)."""
    try:
        return resolve_under(folder, name, "gallery file")
    except OutsideRootError as e:
        raise ExportError(f"{e}: only files inside the gallery folder are read; copy the file into it, or give "
                          f"--gallery the folder that holds the images") from None


def list_gallery(folder) -> list:
    """Image files under `folder` (recursive, sorted), as paths relative to it. A file that is a
    link out of the folder raises ExportError naming it (see gallery_file)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"gallery folder {folder} does not exist")
    files = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise ExportError(f"gallery folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    for name in files:
        gallery_file(folder, name)
    return files


# ---- the export's files -----------------------------------------------------------------------


def read_export_info(version_dir) -> dict:
    """The export's description (endpoints, image size, gallery) from assets.extra/; DamagedExport
    naming the file when it is not a JSON object."""
    path = Path(version_dir) / "assets.extra" / EXPORT_INFO_NAME
    if not path.is_file():
        raise ExportError(f"{path} not found: {version_dir} is not a keras_irtf export version folder")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise damaged_export(path, e) from None
    if not isinstance(info, dict):
        raise damaged_export(path, f"expected a JSON object, found {type(info).__name__}")
    return info


# ---- reading an export back: tools/query.py and the demo ----------------------------------------


def _read_lines(path, what: str) -> Optional[list]:
    """The lines of an assets.extra list file (None when there is none); DamagedExport when it
    cannot be read as UTF-8 text."""
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8").split("\n")[:-1]
    except (OSError, ValueError) as e:
        raise damaged_export(path, f"cannot read the {what} ({e})") from None


def load_export(path, info: Optional[dict] = None):
    """`tf.saved_model.load(path)` of an export version folder, after registering the op libraries
    its graph runs beyond core TensorFlow (the export's description records them under
    "op_libraries"; keras_irtf.serving.op_libraries). The one loader of exports: tools/query.py,
    the demo and open_export go through it. `info`: the export's description (read here when None).

    A truncated saved_model.pb, missing or truncated variables, or any other load failure raises
    DamagedExport naming the file or folder; an op library that cannot be loaded raises
    keras_irtf.serving.op_libraries.MissingOpLibrary naming the export, the op and the package."""
    path = Path(path)
    pb = path / "saved_model.pb"
    try:
        saved = saved_model_pb2.SavedModel()
        saved.ParseFromString(pb.read_bytes())
    except (OSError, DecodeError) as e:
        raise damaged_export(pb, f"not a SavedModel protocol buffer ({e})") from None
    if not saved.meta_graphs:
        raise damaged_export(pb, "it holds no MetaGraph (an empty or cut-short file)")
    if info is None:
        info = read_export_info(path) if (path / "assets.extra" / EXPORT_INFO_NAME).is_file() else {}
    register_op_libraries(path, info, graph_op_names(saved))
    try:
        return tf.saved_model.load(str(path))
    except (tf.errors.NotFoundError, RuntimeError) as e:
        found = re.search(r"Op type not registered '([^']+)'", str(e))
        if found:  # not damage: an op library this process lacks (a graph function the scan missed)
            raise MissingOpLibrary(f"{path}: its graph runs the op {found.group(1)}, which TensorFlow "
                                   f"{tf.__version__} does not register: install the package that provides it "
                                   f"(for tensorflow-text: pip install tensorflow-text=="
                                   f"{'.'.join(tf.__version__.split('.')[:2])}.*)") from None
        raise damaged_export(_damaged_part(path, e), e) from None
    except (tf.errors.OpError, OSError, ValueError, IndexError, KeyError, TypeError) as e:
        raise damaged_export(_damaged_part(path, e), e) from None


def _damaged_part(path: Path, error) -> Path:
    """The file or folder of the export an error of tf.saved_model.load is about: a path inside
    the export its message names, else variables/ for a checkpoint read, else the folder."""
    text = str(error)
    named = re.search(re.escape(str(path)) + r"/[^\s;:'\"]+", text)
    if named:
        return Path(named.group(0))
    if "variables" in text or "checkpoint" in text.lower() or isinstance(error, IndexError):
        return path / "variables"
    return path


@dataclasses.dataclass
class OpenedExport:
    """An export version folder read back: its SavedModel and the files beside it."""

    path: Path
    info: dict  # keras_irtf_export.json ({} for a SavedModel not written by keras_irtf)
    module: object  # what tf.saved_model.load returned
    gallery_paths: Optional[list]  # assets.extra/gallery.txt, in id order (None without a gallery)
    gallery_hashes: Optional[list]  # assets.extra/gallery_sha256.txt (None: an export without them)


def open_export(path, require_info: bool = True) -> OpenedExport:
    """Load the export version folder `path` for tools/query.py and the demo. Every file is
    checked as it is read: a damaged one raises DamagedExport ("damaged export: <file>: ...", one
    line). `require_info=False` also serves a SavedModel without keras_irtf's description."""
    path = Path(path)
    if not (path / "saved_model.pb").is_file():
        raise ExportError(f"{path} holds no saved_model.pb: pass a version folder such as exported/<name>/1")
    extra = path / "assets.extra"
    info = read_export_info(path) if require_info or (extra / EXPORT_INFO_NAME).exists() else {}
    paths = _read_lines(extra / GALLERY_LIST_NAME, "gallery list")
    hashes = _read_lines(extra / GALLERY_HASHES_NAME, "gallery checksums")
    recorded = info.get("gallery")
    if paths is not None and isinstance(recorded, dict) and isinstance(recorded.get("size"), int) \
            and recorded["size"] != len(paths):
        raise damaged_export(extra / GALLERY_LIST_NAME, f"it lists {len(paths)} images, the export embedded "
                                                        f"{recorded['size']} ({EXPORT_INFO_NAME})")
    if hashes is not None and (paths is None or len(hashes) != len(paths)
                               or not all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes)):
        raise damaged_export(extra / GALLERY_HASHES_NAME, f"expected one sha256 a line for each entry of "
                                                          f"{GALLERY_LIST_NAME}")
    module = load_export(path, info)  # registers the op libraries the export records first
    return OpenedExport(path, info, module, paths, hashes)


def gallery_difference(folder, export_paths, export_hashes, hashes: Optional[dict] = None) -> Optional[str]:
    """None when `folder` holds, under every path of the export's gallery list, the very file the
    export embedded (the same sha256): only then do the stored gallery embeddings (`retrieve`)
    rank the pictures a viewer of the folder sees. Otherwise what differs, for a message.
    `hashes` maps gallery paths to sha256s already computed. Files are resolved under `folder`:
    a link out of it is a difference (and is not read)."""
    if export_paths is None:
        return "the export has no gallery"
    if export_hashes is None or len(export_hashes) != len(export_paths):
        return f"the export records no gallery checksums ({GALLERY_HASHES_NAME}), so its gallery cannot be checked"
    hashes = hashes or {}
    for name, want in zip(export_paths, export_hashes):
        try:
            path = gallery_file(folder, name)
        except ExportError:
            return f"{name} leads outside {folder}"
        if name not in hashes and not path.is_file():
            return f"{name} is missing"
        try:
            have = hashes[name] if name in hashes else file_sha256(path)
        except OSError as e:
            return f"{name} cannot be read ({e.strerror or e})"
        if have != want:
            return f"{name} is not the image the export embedded (its sha256 differs)"
    return None
