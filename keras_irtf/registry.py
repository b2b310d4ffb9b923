"""Registries of keras_irtf's pluggable kinds, filled by decorators.

Every composer, image encoder, text encoder, dataset, retrieval loss and gradient-augmentation
(GA) method is registered under the name a config uses for it, together with the dataclass of
its own settings (its config section, see keras_irtf.config.OneOf):

    from keras_irtf.registry import register_composer

    @dataclasses.dataclass
    class GatedSumConfig:
        hidden: int = 256                       # settable as model.composer.hidden

    @register_composer("gated_sum", config=GatedSumConfig)
    class GatedSum(keras_irtf.layers.Composer):
        ...

After that, `model.composer=gated_sum` (or `--method gated_sum`) builds it. The built-ins
register themselves the same way; command-line choices, config validation and error messages
read these registries. A user's module joins them with `--import MODULE` on every tool (or
`keras_irtf.registry.import_modules([...])` from Python) before the config is resolved.

What a registered object must provide depends on its kind (each kind's base class in the
package documents it): model parts are built through their classmethod `from_settings(settings,
**context)` (keras_irtf.layers.base), datasets through `from_settings(settings, cfg, image_size,
verbose)` (keras_irtf.data.base), and so on. This module imports nothing heavy: the built-ins'
modules, which import TensorFlow, are imported when the built-ins are first needed.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Optional


class ConfigError(ValueError):
    """A configuration file or override that cannot be applied (keras_irtf.config.ConfigError:
    defined here, below keras_irtf.config, so that loading a plug-in can raise it too)."""


class RegistryError(ValueError):
    """An unknown name or a clashing registration (the message lists what is registered)."""


class PluginNameError(RegistryError, ConfigError):
    """A plug-in module whose name is another module's (standard library, imported, installed)."""


@dataclasses.dataclass
class Entry:
    """One registered object: its name, the object itself and the dataclass of its settings."""

    kind: str
    name: str
    obj: Any
    config: Optional[type] = None  # dataclass of the object's own keys (None: it has none)
    module: str = ""

    def default_settings(self):
        return self.config() if self.config is not None else None

    @property
    def keys(self) -> list:
        return [f.name for f in dataclasses.fields(self.config)] if self.config is not None else []


class Registry:
    """name -> Entry for one kind; `key` is the config key that names an entry."""

    def __init__(self, kind: str, key: str, decorator: str, base_hint: str = ""):
        self.kind = kind
        self.key = key
        self.decorator = decorator
        self.base_hint = base_hint
        self._entries: dict = {}

    def register(self, name: str, config: Optional[type] = None) -> Callable:
        if not isinstance(name, str) or not name or not name.replace("_", "").isalnum():
            raise RegistryError(f"{self.kind} name {name!r}: use letters, digits and underscores")
        if config is not None and not dataclasses.is_dataclass(config):
            raise RegistryError(f"{self.kind} {name!r}: config= must be a dataclass, got {config!r}")

        def wrap(obj):
            old = self._entries.get(name)
            module = getattr(obj, "__module__", "")
            if old is not None and (old.module, getattr(old.obj, "__qualname__", None)) != (
                    module, getattr(obj, "__qualname__", None)):
                raise RegistryError(
                    f"{self.kind} {name!r} is already registered by {old.module}.{getattr(old.obj, '__qualname__', old.obj)}; "
                    f"choose another name"
                )
            self._entries[name] = Entry(self.kind, name, obj, config, module)
            return obj

        return wrap

    def get(self, name: str) -> Entry:
        load_builtins()
        entry = self._entries.get(str(name))
        if entry is None:
            raise RegistryError(
                f"{self.key}={name!r}: no {self.kind} of that name; registered: {self.names()}. "
                f"A {self.kind} of your own registers with keras_irtf.registry.{self.decorator}(name) "
                f"in a module you load with --import MODULE{self.base_hint}"
            )
        return entry

    def __contains__(self, name) -> bool:
        load_builtins()
        return str(name) in self._entries

    def names(self) -> list:
        load_builtins()
        return sorted(self._entries)

    def builtin_names(self) -> list:
        """The names keras_irtf itself registers (not a plug-in's)."""
        load_builtins()
        return sorted(n for n, e in self._entries.items() if e.module.split(".")[0] == "keras_irtf")

    def entries(self) -> list:
        load_builtins()
        return [self._entries[n] for n in sorted(self._entries)]


COMPOSERS = Registry("composer", "model.composer", "register_composer", " (subclass keras_irtf.layers.Composer)")
IMAGE_ENCODERS = Registry("image encoder", "model.image_encoder", "register_image_encoder", " (subclass keras_irtf.layers.ImageEncoder)")
TEXT_ENCODERS = Registry("text encoder", "model.text_encoder", "register_text_encoder", " (subclass keras_irtf.layers.TextEncoder)")
DATASETS = Registry("dataset", "data.dataset", "register_dataset", " (subclass keras_irtf.data.RetrievalDataset)")
RETRIEVAL_LOSSES = Registry("retrieval loss", "loss.kind", "register_retrieval_loss", " (a function (query, target) -> scalar loss)")
GA_METHODS = Registry("GA method", "ga.methods", "register_ga_method", " (subclass keras_irtf.model.gradient_augmentation.GAMethod)")

REGISTRIES = {
    "composer": COMPOSERS,
    "image_encoder": IMAGE_ENCODERS,
    "text_encoder": TEXT_ENCODERS,
    "dataset": DATASETS,
    "retrieval_loss": RETRIEVAL_LOSSES,
    "ga_method": GA_METHODS,
}


def register_composer(name: str, config: Optional[type] = None):
    """Class decorator: a keras_irtf.layers.Composer subclass usable as model.composer=name."""
    return COMPOSERS.register(name, config)


def register_image_encoder(name: str, config: Optional[type] = None):
    """Class decorator: a keras_irtf.layers.ImageEncoder subclass usable as model.image_encoder=name."""
    return IMAGE_ENCODERS.register(name, config)


def register_text_encoder(name: str, config: Optional[type] = None):
    """Class decorator: a keras_irtf.layers.TextEncoder subclass usable as model.text_encoder=name."""
    return TEXT_ENCODERS.register(name, config)


def register_dataset(name: str, config: Optional[type] = None):
    """Class decorator: a keras_irtf.data.RetrievalDataset subclass usable as data.dataset=name."""
    return DATASETS.register(name, config)


def register_retrieval_loss(name: str):
    """Function decorator: fn(query [B, D], target [B, D]) -> scalar, usable as loss.kind=name."""
    return RETRIEVAL_LOSSES.register(name)


def register_ga_method(name: str, config: Optional[type] = None):
    """Class decorator: a GAMethod subclass usable in ga.methods (settings under ga.<name>)."""
    return GA_METHODS.register(name, config)


_BUILTIN_MODULES = (
    "keras_irtf.layers",
    "keras_irtf.layers.clip",
    "keras_irtf.losses",
    "keras_irtf.model.gradient_augmentation",
    "keras_irtf.data.css",
    "keras_irtf.data.mitstates",
    "keras_irtf.data.fashion200k",
    "keras_irtf.data.fashioniq",
    "keras_irtf.data.cirr",
    "keras_irtf.data.triplets",
)
_loaded = False
_loading = False


def load_builtins():
    """Import the modules that register keras_irtf's own entries (once)."""
    global _loaded, _loading
    if _loaded or _loading:
        return
    _loading = True
    try:
        for name in _BUILTIN_MODULES:
            importlib.import_module(name)
        _loaded = True
    finally:
        _loading = False


def import_modules(names) -> list:
    """Import user modules so that their registrations take effect. Each name is either a path
    to a .py file (`./myplug.py`, `plugins/myplug.py`) or a module name (`myplug`,
    `mypkg.composers`) importable from the Python path or, failing that, from the working
    folder (as `python -m` would find it). Returns the modules.

    Errors say which of the two was tried and why it failed: a module found nowhere (with the
    places looked in), or an exception raised inside the plug-in while it ran (with its
    traceback). A module whose name is already another module's (the standard library's, an
    imported or an installed one) raises PluginNameError (a RegistryError and a ConfigError)
    before any of it runs. The built-in entries are registered first when there are modules
    to import (so that a clash is the plug-in's); with none, nothing is loaded here (the
    registries load the built-ins when first asked, and a tool that only reads an export never
    needs the layers)."""
    if names:
        load_builtins()
    modules = []
    for name in names or ():
        name = str(name)
        try:
            if name.endswith(".py") or "/" in name:
                modules.append(_import_file(name))
                continue
            _check_module_name(name)
            if not _findable(name) and _in_working_folder(name):
                sys.path.append(str(Path.cwd()))  # after everything else: it shadows nothing
            module = importlib.import_module(name)
        except RegistryError:
            raise
        except SyntaxError as e:
            raise RegistryError(f"--import {name}: {e.msg} ({e.filename}, line {e.lineno})") from None
        except ImportError as e:
            if e.name is not None and not (name == e.name or name.startswith(e.name + ".")):
                raise _failed_inside(name, e) from None  # the plug-in's own import failed
            raise RegistryError(
                f"--import {name}: no module {name!r} on the Python path nor as {Path(*name.split('.'))}.py in the "
                f"working folder {Path.cwd()} ({e}); give a module name importable from there or a path to a .py file"
            ) from None
        except Exception as e:
            raise _failed_inside(name, e) from None
        modules.append(module)
    return modules


def _findable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _in_working_folder(name: str) -> bool:
    local = Path.cwd().joinpath(*name.split("."))
    return local.with_suffix(".py").is_file() or (local / "__init__.py").is_file()


def _failed_inside(name: str, error: BaseException) -> RegistryError:
    """The plug-in was found but raised while it ran: the error with the plug-in's traceback."""
    frames = traceback.extract_tb(error.__traceback__)
    own = [f for f in frames if "importlib" not in f.filename and not f.filename.endswith("registry.py")]
    where = "".join(traceback.format_list(own or frames)).rstrip()
    return RegistryError(
        f"--import {name}: the plug-in was found but raised {type(error).__name__}: {error} while it was imported; "
        f"fix the plug-in (its traceback follows)\n{where}"
    )


def _import_file(name: str):
    """Execute the .py file `name` as the module named after it (its stem)."""
    path = Path(name).resolve()
    if not path.is_file():
        raise RegistryError(f"--import {name}: no such file")
    stem = path.stem
    _check_file_name(name, stem, path)
    spec = importlib.util.spec_from_file_location(stem, path)
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get(stem)
    sys.modules[stem] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as e:
        # a plug-in that fails half-way is not left behind as an importable module
        if previous is None:
            sys.modules.pop(stem, None)
        else:
            sys.modules[stem] = previous
        if isinstance(e, SyntaxError):
            raise RegistryError(f"--import {name}: {e.msg} ({e.filename}, line {e.lineno})") from None
        if isinstance(e, Exception):
            raise _failed_inside(name, e) from None
        raise
    return module


def _stdlib_names() -> frozenset:
    return frozenset(getattr(sys, "stdlib_module_names", ())) | frozenset(sys.builtin_module_names)


def _origin(module) -> Optional[Path]:
    """The file a loaded module came from (None for a built-in or namespace package)."""
    spec = getattr(module, "__spec__", None)
    origin = getattr(module, "__file__", None) or getattr(spec, "origin", None)
    if not origin or origin in ("built-in", "frozen") or not Path(origin).exists():
        return None
    return Path(origin).resolve()


def _importable_from(top: str) -> Optional[Path]:
    """The file `import top` would load if it were not imported yet (sys.modules is not consulted):
    an installed package, a module on PYTHONPATH. None if nothing of that name is found."""
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None:
            continue
        try:
            spec = find_spec(top, None)
        except Exception:  # a third-party finder may fail on a name it does not know
            continue
        if spec is None or not spec.origin or spec.origin in ("built-in", "frozen", "namespace"):
            continue  # namespace packages: a regular module of the name wins over them
        if Path(spec.origin).exists():
            return Path(spec.origin).resolve()
    return None


def _stdlib_message(arg: str, top: str) -> str:
    return (f"--import {arg}: {top!r} is the name of a standard-library module; a plug-in of that name would "
            f"replace Python's own {top} for the whole process (or never be loaded): rename the file "
            f"(e.g. {top}_plugin.py)")


def _check_file_name(arg: str, stem: str, path: Path):
    """Refuse a plug-in file whose module name (its stem) is another module's."""
    if stem in _stdlib_names():
        raise PluginNameError(_stdlib_message(arg, stem))
    loaded = sys.modules.get(stem)
    if loaded is not None:
        origin = _origin(loaded)
        if origin != path:  # the same file again is the same plug-in
            raise PluginNameError(
                f"--import {arg}: {stem!r} is already the name of an imported module "
                f"({origin if origin else repr(loaded)}); loading {path.name} under that name would replace it for "
                f"the whole process: rename the file (e.g. {stem}_plugin.py)"
            )
        return
    if stem.isidentifier():
        origin = _importable_from(stem)
        if origin is not None and origin != path:
            raise PluginNameError(
                f"--import {arg}: {stem!r} is already the name of an installed module ({origin}); loading "
                f"{path.name} under that name would hide it for the whole process: rename the file "
                f"(e.g. {stem}_plugin.py)"
            )


def _check_module_name(name: str):
    """Refuse a dotted plug-in name whose top-level package is the standard library's, or is
    already imported from another file than the one the name now points to."""
    top = name.split(".")[0]
    if top in _stdlib_names():
        raise PluginNameError(_stdlib_message(name, top))
    loaded = sys.modules.get(top)
    if loaded is None:
        return
    origin, found = _origin(loaded), _importable_from(top)
    if origin is not None and found is not None and origin != found:
        raise PluginNameError(
            f"--import {name}: {top!r} is already the name of an imported module ({origin}), so {found} would never "
            f"be loaded: rename your module (e.g. {top}_plugin.py)"
        )


def describe() -> str:
    """Every registry's names, one kind a line (for --help texts)."""
    return "\n".join(f"{kind}: {', '.join(reg.names())}" for kind, reg in REGISTRIES.items())


def markdown_table() -> str:
    """The registries as the Markdown table README.md shows (a test keeps the two equal):
    `python tools/plugins.py` prints it."""
    rows = ["| kind | config key | registered (own keys) | decorator |", "|---|---|---|---|"]
    for reg in REGISTRIES.values():
        names = []
        for e in reg.entries():
            names.append(f"`{e.name}` ({', '.join(e.keys)})" if e.keys else f"`{e.name}`")
        rows.append(f"| {reg.kind} | `{reg.key}` | {'; '.join(names)} | `{reg.decorator}` |")
    return "\n".join(rows)

