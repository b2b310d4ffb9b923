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
package documents it): layers are built through their classmethod `from_settings(settings, cfg,
**context)`, datasets through `load(settings, cfg, image_size, verbose)`, and so on. This module
imports nothing heavy: TensorFlow is imported when the built-ins are first needed.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, Optional


class RegistryError(ValueError):
    """An unknown name or a clashing registration (the message lists what is registered)."""


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
    "keras_irtf.model.losses",
    "keras_irtf.model.gradient_augmentation",
    "keras_irtf.data.css_generator",
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
    """Import user modules (dotted names, or paths of .py files) so that their registrations
    take effect. Returns the modules. A module that cannot be imported raises RegistryError."""
    load_builtins()
    modules = []
    for name in names or ():
        name = str(name)
        try:
            if name.endswith(".py") or "/" in name:
                path = Path(name).resolve()
                if not path.is_file():
                    raise RegistryError(f"--import {name}: no such file")
                spec = importlib.util.spec_from_file_location(path.stem, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[path.stem] = module
                spec.loader.exec_module(module)
            else:
                module = importlib.import_module(name)
        except RegistryError:
            raise
        except ImportError as e:
            raise RegistryError(
                f"--import {name}: cannot import it ({e}); give a module on PYTHONPATH (or in the current "
                f"folder) or a path to a .py file"
            ) from None
        modules.append(module)
    return modules


def describe() -> str:
    """Every registry's names, one kind a line (for --help texts)."""
    return "\n".join(f"{kind}: {', '.join(reg.names())}" for kind, reg in REGISTRIES.items())


def markdown_table() -> str:
    """The registries as the Markdown table README.md shows (a test keeps the two equal):
    `python -m keras_irtf.registry`."""
    rows = ["| kind | config key | registered (own keys) | decorator |", "|---|---|---|---|"]
    for reg in REGISTRIES.values():
        names = []
        for e in reg.entries():
            names.append(f"`{e.name}` ({', '.join(e.keys)})" if e.keys else f"`{e.name}`")
        rows.append(f"| {reg.kind} | `{reg.key}` | {'; '.join(names)} | `{reg.decorator}` |")
    return "\n".join(rows)


if __name__ == "__main__":  # run as a script, this file is not the module the built-ins fill
    from keras_irtf import registry

    print(registry.markdown_table())
