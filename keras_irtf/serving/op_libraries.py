"""The TensorFlow op libraries an export needs beyond core TensorFlow, found in its graph.

A SavedModel names every op its functions run. Core TensorFlow registers most of them; a few come
from an op library that a Python package loads (`tf.load_op_library`) when it is imported: the
keras-hub CLIP / SigLIP tokenizers and the BERT preprocessing models run tensorflow-text ops
(`RegexSplitWithOffsets`, `CaseFoldUTF8`, ...). `tf.saved_model.load` refuses a graph naming an
op the process has not registered ("Op type not registered ..."), so such a library must be
loaded first.

At export time `required_op_libraries(graph_op_names(...))` maps each op of the written graph
to the package whose op library registered it (found among the loaded modules, so a plug-in
encoder using another op library is covered too); the export's description records the result:

    "op_libraries": ["tensorflow_text"],
    "op_library_details": {"tensorflow_text": {"package": "tensorflow-text", "version": "2.21.1",
                                               "ops": ["RegexSplitWithOffsets", ...],
                                               "files": ["python/ops/_regex_split_ops.so", ...]}}

At load time `register_op_libraries` (called by keras_irtf.serving.reader.load_export, the one
loader of exports) loads the recorded op files from the installed package (no import of its
Python side, which for tensorflow-text pulls in Keras), or else imports the package, and raises
MissingOpLibrary, one line naming the export, the op and the `pip install` to run, when it cannot.
An export without the record (or a SavedModel written elsewhere) gets the known libraries
imported when its graph names an op this process lacks.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import types
from pathlib import Path
from typing import Iterable, Optional

import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import op_def_registry

from keras_irtf.serving.errors import EXPORT_INFO_NAME, ExportError, damaged_export

# op libraries keras_irtf's own encoders use: tried for a graph that records none
KNOWN_OP_LIBRARIES = {"tensorflow_text": "tensorflow-text"}
INFO_KEY = "op_libraries"
DETAILS_KEY = "op_library_details"


_IMPORT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def trusted_library(library: str) -> bool:
    """Whether keras_irtf may load `library` because an export names it. An export is input, not
    code: the names it records are acted on only when they are one plain import name (no dots)
    of an op library keras_irtf's own encoders use (KNOWN_OP_LIBRARIES) or of a package this
    process has imported already (e.g. a plug-in given with --import); any other name is refused,
    so a crafted description cannot make the loader import a module or load a file it ships."""
    return bool(_IMPORT_NAME.match(library)) and (library in KNOWN_OP_LIBRARIES or library in sys.modules)


class MissingOpLibrary(ExportError):
    """An export whose graph runs ops of a package this process cannot load; the message names the
    export, the op and the package to install."""


# ---- the graph's ops -----------------------------------------------------------------------------


def graph_op_names(saved_model) -> set:
    """Every op type a SavedModel proto (saved_model_pb2.SavedModel) names: the nodes of each
    MetaGraph's graph and of every function in its library."""
    names = set()
    for meta in saved_model.meta_graphs:
        names.update(node.op for node in meta.graph_def.node)
        for fn in meta.graph_def.library.function:
            names.update(node.op for node in fn.node_def)
    return names


def read_graph_op_names(version_dir) -> set:
    """graph_op_names of `<version_dir>/saved_model.pb`."""
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((Path(version_dir) / "saved_model.pb").read_bytes())
    return graph_op_names(saved)


def unregistered_ops(op_names: Iterable[str]) -> list:
    """The op types of `op_names` this process has not registered, sorted."""
    return sorted(name for name in op_names if op_def_registry.get(name) is None)


# ---- export time: which package registered each op -----------------------------------------------


def _plugin_modules() -> dict:
    """{id(op module): (module, [names of the modules holding it])} for every op-wrapper module
    tf.load_op_library made (they carry _IS_TENSORFLOW_PLUGIN), found through the loaded modules
    that keep a reference to them (e.g. tensorflow_text.python.ops.regex_split_ops)."""
    found = {}
    for holder, module in sorted(sys.modules.items(), key=lambda kv: kv[0]):
        if not isinstance(module, types.ModuleType):  # None entries, lazy loaders
            continue
        try:
            attributes = list(vars(module).values())
        except TypeError:
            continue
        for value in attributes:
            if isinstance(value, types.ModuleType) and vars(value).get("_IS_TENSORFLOW_PLUGIN") is True:
                found.setdefault(id(value), (value, []))[1].append(holder)
    return found


def _owner(module, holders: list) -> str:
    """The library (import name) of an op module: of the packages whose modules hold it, the one
    whose folder has the shared library that registered it (another package may only re-export
    it), else the first."""
    names = list(dict.fromkeys(_library_name(h) for h in holders))
    if len(names) > 1:
        for name in names:
            if _op_files(_package_dir(name), [module]):
                return name
    return names[0]


def _library_name(holder: str) -> str:
    """The import name that loads the op module `holder` refers to: its top-level package (a
    TensorFlow-internal op library: the module itself)."""
    top = holder.split(".")[0]
    return holder if top == "tensorflow" else top


def _package_dir(library: str) -> Optional[Path]:
    """The folder of the installed top-level package of `library`, found without importing it
    (None when it is not installed, or when sys.modules blocks it)."""
    try:
        spec = importlib.util.find_spec(library.split(".")[0])
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _distribution(library: str):
    """(pip package name, installed version) of the import name `library` (None, None if unknown)."""
    top = library.split(".")[0]
    try:
        names = importlib.metadata.packages_distributions().get(top) or []
    except Exception:  # noqa: BLE001 - a broken metadata entry must not stop an export
        names = []
    name = names[0] if names else KNOWN_OP_LIBRARIES.get(top, top.replace("_", "-"))
    try:
        return name, importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return name, None


def _op_files(package_dir: Optional[Path], wanted: list) -> list:
    """The op library files (paths relative to `package_dir`) that registered the op modules
    `wanted`: each shared library of the package is asked, through tf.load_op_library (a no-op for
    a library already loaded), which op module it is; [] when the package folder is unknown."""
    if package_dir is None or not wanted or package_dir.name == "tensorflow":
        return []  # TensorFlow's own op modules are loaded by importing them
    loaded = _mapped_files()
    files, left = [], {id(m) for m in wanted}
    for path in sorted(package_dir.rglob("*.so"), key=lambda f: (not f.name.startswith("_"), f)):
        if not left:
            break
        if loaded is not None and str(path.resolve()) not in loaded:
            continue  # never load a library the package did not load itself
        try:
            module = tf.load_op_library(str(path))
        except Exception:  # noqa: BLE001 - not an op library
            continue
        if id(module) in left:
            left.discard(id(module))
            files.append(path.relative_to(package_dir).as_posix())
    return files if not left else []  # all or nothing: the loader falls back to importing the package


def _mapped_files() -> Optional[set]:
    """Real paths of the shared libraries this process has loaded (Linux); None elsewhere."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    return {os.path.realpath(parts[5]) for parts in (line.split() for line in lines) if len(parts) >= 6}


def required_op_libraries(op_names: Iterable[str]) -> dict:
    """{import name: {"package", "version", "ops", "files"}} of the op libraries outside core
    TensorFlow that registered any of `op_names` (the ops of an exported graph), as loaded in this
    process. Ops nothing here registered count as core TensorFlow."""
    op_names = set(op_names)
    libraries = {}
    for module, holders in _plugin_modules().values():
        # the generated wrappers define each op's raw function under the op's name, made an identifier
        # ("TFText>WhitespaceTokenizeWithOffsetsV2" -> TFText_WhitespaceTokenizeWithOffsetsV2)
        ops = sorted(name for name in op_names
                     if isinstance(vars(module).get(re.sub(r"\W", "_", name)), types.FunctionType))
        if not ops:
            continue
        entry = libraries.setdefault(_owner(module, holders), {"ops": set(), "modules": []})
        entry["ops"].update(ops)
        entry["modules"].append(module)
    out = {}
    for library, entry in sorted(libraries.items()):
        package, version = _distribution(library)
        out[library] = {"package": package, "version": version, "ops": sorted(entry["ops"]),
                        "files": _op_files(_package_dir(library), entry["modules"])}
    return out


def describe(details: dict) -> dict:
    """The export description's entries for required_op_libraries' answer."""
    return {INFO_KEY: sorted(details), DETAILS_KEY: details}


# ---- load time ----------------------------------------------------------------------------------


def _install_hint(package: str, version: Optional[str]) -> str:
    return f"pip install {package}=={version}" if version else f"pip install {package}"


def _recorded(path: Path, info: dict) -> Optional[dict]:
    """{library: details} the export's description records (None when it records nothing: an
    older export, or a SavedModel keras_irtf did not write); DamagedExport naming the key when the
    record is not what keras_irtf writes."""
    if not isinstance(info, dict) or INFO_KEY not in info:
        return None
    file = path / "assets.extra" / EXPORT_INFO_NAME
    libraries = info[INFO_KEY]
    if not isinstance(libraries, list) or not all(isinstance(x, str) and x for x in libraries):
        raise damaged_export(file, f'"{INFO_KEY}" must be a list of package import names')
    details = info.get(DETAILS_KEY) or {}
    if not isinstance(details, dict):
        raise damaged_export(file, f'"{DETAILS_KEY}" must be a JSON object')
    return {name: details.get(name) if isinstance(details.get(name), dict) else {} for name in libraries}


def _installed_files(library: str) -> set:
    """The resolved paths of the files pip installed for the distribution providing `library`
    (empty when it is not an installed distribution, e.g. a folder that happens to be on sys.path)."""
    try:
        names = importlib.metadata.packages_distributions().get(library, [])
        found = set()
        for name in names:
            dist = importlib.metadata.distribution(name)
            found.update(Path(dist.locate_file(f)).resolve() for f in (dist.files or []))
        return found
    except Exception:  # noqa: BLE001 - unreadable metadata: nothing is trusted
        return set()


def _load_files(library: str, files) -> bool:
    """Load the op library files recorded for `library` from its installed package folder
    (without importing its Python side); False when that is not possible. Only a trusted library
    (trusted_library), and only `.so` files its installed distribution lists, are loaded."""
    if not files or not isinstance(files, list) or not trusted_library(library):
        return False
    folder = _package_dir(library)
    if folder is None:
        return False
    installed = _installed_files(library)
    try:
        for name in files:
            file = (folder / str(name)).resolve()
            if folder.resolve() not in file.parents or not file.is_file() or file.suffix != ".so" \
                    or file not in installed:
                return False
            tf.load_op_library(str(file))
    except Exception:  # noqa: BLE001 - e.g. a library built for another TensorFlow: import instead
        return False
    return True


def _import(library: str) -> Optional[str]:
    """Import `library`; None on success, else the reason (one line)."""
    try:
        importlib.import_module(library)
    except Exception as e:  # noqa: BLE001 - ImportError, or an error raised inside the package
        text = " ".join(str(e).split()) or type(e).__name__
        return f"{type(e).__name__}: {text}"[:200]
    return None


def register_op_libraries(path, info: Optional[dict], op_names: Iterable[str]):
    """Make every op of the export at `path` (its graph names `op_names`) known to this process
    before tf.saved_model.load: load the op libraries `info` records, else (no record) try the
    known ones when an op is missing. MissingOpLibrary (one line: the export, the op, the package
    and the pip command) when an op stays unknown."""
    path = Path(path)
    op_names = set(op_names)
    recorded = _recorded(path, info)  # a garbled record is named even when nothing is missing
    missing = unregistered_ops(op_names)
    if not missing:
        return
    where = f"{path}/assets.extra/{EXPORT_INFO_NAME}"
    if recorded is not None:
        for library, details in recorded.items():
            recorded_ops = details.get("ops") if isinstance(details.get("ops"), list) else []
            needs = [op for op in recorded_ops if op in missing] if recorded_ops else missing
            if not needs:
                continue  # its ops are registered already
            package = str(details.get("package") or KNOWN_OP_LIBRARIES.get(library, library))
            version = details.get("version")
            if not trusted_library(library):
                raise MissingOpLibrary(
                    f"{path}: its graph runs the op {needs[0]}, which \"{INFO_KEY}\" in {where} says comes from "
                    f"{library!r}; keras_irtf loads only the op libraries it knows "
                    f"({', '.join(sorted(KNOWN_OP_LIBRARIES))}) or a package this process has already imported: "
                    f"if you trust that package, import it first (tools: --import MODULE)")
            if _load_files(library, details.get("files")) and not set(unregistered_ops(needs)):
                continue
            problem = _import(library)
            if problem is not None:
                raise MissingOpLibrary(
                    f"{path}: its graph runs the op {needs[0]} of {package} (\"{INFO_KEY}\" in {where}), which "
                    f"cannot be loaded here ({problem}): {_install_hint(package, version)}")
    problems = []
    if recorded is None:  # an export that records nothing: the op libraries keras_irtf's encoders use
        for library in KNOWN_OP_LIBRARIES:
            if _package_dir(library) is not None:
                problem = _import(library)
                if problem is not None:
                    problems.append(f"{library} could not be imported ({problem})")
    still = unregistered_ops(missing)
    if not still:
        return
    owners = {op: lib for lib, d in (recorded or {}).items()
              for op in (d.get("ops") if isinstance(d.get("ops"), list) else [])}
    lib = owners.get(still[0])
    if lib is not None:  # the library loaded, but not with this op: another version
        details = recorded[lib]
        package, version = str(details.get("package") or lib), details.get("version")
        installed = _distribution(lib)[1]
        raise MissingOpLibrary(f"{path}: its graph runs the op {still[0]} of {package} {version or ''}".rstrip()
                               + f", which the installed {package} {installed or ''}".rstrip()
                               + f" does not register: {_install_hint(package, version)}")
    if recorded is None:
        major_minor = ".".join(tf.__version__.split(".")[:2])
        hint = (f"{'; '.join(problems)}; " if problems else "") + (
            f"if it was exported with a CLIP, SigLIP or BERT text encoder: pip install "
            f"tensorflow-text=={major_minor}.*")
    else:
        hint = f"install the package that registers it ({where} records {sorted(recorded) or 'no op library'})"
    raise MissingOpLibrary(f"{path}: its graph runs the op {still[0]}, which TensorFlow {tf.__version__} does "
                           f"not register and no loaded op library provides; {hint}")
