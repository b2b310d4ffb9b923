"""Reference material read from the code when the docs are built: the configuration keys, the
registries, every tool's --help and the public API. The Sphinx directives in irtf_sphinx.py
render it; tests/test_docs.py checks it (every key has a meaning).

Nothing here is written by hand about a key: its type and default come from the config
dataclasses, its choices and limits from keras_irtf.config's tables or the settings dataclass's
CHOICES / DOMAINS, its meaning from the dataclass's HELP or keras_irtf.config.SETTINGS_HELP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("train", "evaluate", "export", "query", "demo", "index", "ablate", "weight_drift", "plugins",
         "reliability_probes")
HELP_COLUMNS = 100  # argparse wraps --help to the terminal; a fixed width keeps the page stable


@dataclasses.dataclass
class Key:
    name: str  # the dotted key as --set takes it
    type: str
    default: str
    allowed: str
    meaning: str


@dataclasses.dataclass
class Section:
    title: str  # "data", "model.image_encoder: resnet18", ...
    intro: str
    keys: list


def _value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if hasattr(value, "type") and hasattr(value, "kind"):  # a OneOf section: its type
        return str(value.type)
    return str(value)


def _domain(domain) -> str:
    from keras_irtf import config

    return config._domain_text(domain[:4]).replace("a finite number ", "")


def _meaning(cls, name: str) -> str:
    from keras_irtf import config

    own = getattr(cls, "HELP", None) or {}
    if name in own:
        return own[name]
    return config.SETTINGS_HELP.get(f"{cls.__module__}.{cls.__qualname__}", {}).get(name, "")


def _fields(cls):
    return [f for f in dataclasses.fields(cls) if not f.name.startswith("_")]


def _default(field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _settings_keys(prefix: str, cls) -> list:
    """The keys of a registered type's settings dataclass."""
    from keras_irtf import config

    keys = []
    for f in _fields(cls):
        allowed = ""
        if f.name in getattr(cls, "CHOICES", {}):
            allowed = " | ".join(str(c) for c in cls.CHOICES[f.name])
        elif f.name in getattr(cls, "DOMAINS", {}):
            allowed = _domain(cls.DOMAINS[f.name])
        keys.append(Key(f"{prefix}.{f.name}", config._type_name(f), _value(_default(f)), allowed,
                        _meaning(cls, f.name)))
    return keys


def config_reference() -> list:
    """Every configuration key, section by section: the plain sections first, then each
    registered kind's types with their own keys."""
    from keras_irtf import config
    from keras_irtf.registry import GA_METHODS, REGISTRIES, RETRIEVAL_LOSSES

    sections = []
    defaults = config.Config()
    kinds = {}  # "model.image_encoder" -> registry
    for section in dataclasses.fields(config.Config):
        instance = getattr(defaults, section.name)
        keys = []
        for f in _fields(type(instance)):
            name = f"{section.name}.{f.name}"
            value = getattr(instance, f.name)
            if isinstance(value, config.OneOf):
                registry = value.registry
                kinds[name] = registry
                keys.append(Key(name, f"registered {registry.kind}", value.type, " | ".join(registry.names()),
                                _meaning(type(instance), f.name)))
                continue
            allowed = ""
            if (section.name, f.name) in config._CHOICES:
                allowed = " | ".join(config._CHOICES[(section.name, f.name)])
            elif (section.name, f.name) in config.NUMERIC_DOMAINS:
                allowed = _domain(config.NUMERIC_DOMAINS[(section.name, f.name)])
            elif (section.name, f.name) in config.NUMERIC_ITEM_DOMAINS:
                allowed = "each " + _domain(config.NUMERIC_ITEM_DOMAINS[(section.name, f.name)])
            elif name == "loss.kind":
                allowed = " | ".join(RETRIEVAL_LOSSES.names())
            elif name == "ga.methods":
                allowed = "any of " + ", ".join(GA_METHODS.names())
            keys.append(Key(name, config._type_name(f), _value(value), allowed, _meaning(type(instance), f.name)))
        sections.append(Section(section.name, "", keys))
    for key, registry in kinds.items():
        for entry in registry.entries():
            if entry.config is None:
                continue
            sections.append(Section(f"{key}: {entry.name}",
                                    f"Keys of `{key}={entry.name}` ({_object_name(entry.obj)}).",
                                    _settings_keys(key, entry.config)))
    for entry in GA_METHODS.entries():
        if entry.config is not None:
            sections.append(Section(f"ga.{entry.name}", f"Keys of the GA method `{entry.name}` "
                                    f"({_object_name(entry.obj)}), read when `ga.methods` names it.",
                                    _settings_keys(f"ga.{entry.name}", entry.config)))
    assert set(REGISTRIES) >= {"composer", "image_encoder", "text_encoder", "dataset"}
    return sections


def _object_name(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def undescribed_keys() -> list:
    """Keys whose meaning is missing, and meanings that name no key (a renamed key's leftover)."""
    from keras_irtf import config
    from keras_irtf.registry import REGISTRIES

    problems = [k.name for s in config_reference() for k in s.keys if not k.meaning.strip()]
    classes = {type(getattr(config.Config(), f.name)) for f in dataclasses.fields(config.Config)}
    for registry in REGISTRIES.values():
        classes |= {e.config for e in registry.entries() if e.config is not None}
    by_name = {f"{c.__module__}.{c.__qualname__}": c for c in classes}
    for cls in classes:
        names = {f.name for f in _fields(cls)}
        problems += [f"{cls.__qualname__}.HELP[{k!r}] (no such key)" for k in getattr(cls, "HELP", {}) if k not in names]
    for path, table in config.SETTINGS_HELP.items():
        cls = by_name.get(path)
        if cls is None:
            problems.append(f"SETTINGS_HELP[{path!r}] (no registered settings class of that name)")
            continue
        names = {f.name for f in _fields(cls)}
        problems += [f"SETTINGS_HELP[{path!r}][{k!r}] (no such key)" for k in table if k not in names]
    return problems


def registry_table() -> str:
    from keras_irtf import registry

    return registry.markdown_table()


def tool_help(name: str) -> str:
    """What `python tools/<name>.py --help` prints, at a fixed width."""
    path = ROOT / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_keras_irtf_tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = io.StringIO()
    saved_argv, saved_columns = sys.argv[:], os.environ.get("COLUMNS")
    sys.argv = [str(path)]  # argparse names the program after argv[0]
    os.environ["COLUMNS"] = str(HELP_COLUMNS)
    try:
        with contextlib.redirect_stdout(out):
            try:
                module.main(["--help"])
            except SystemExit as e:
                if e.code not in (0, None):
                    raise RuntimeError(f"tools/{name}.py --help exited with {e.code}") from None
    finally:
        sys.argv = saved_argv
        if saved_columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved_columns
    return out.getvalue().rstrip() + "\n"


def public_names() -> list:
    import keras_irtf

    return sorted(keras_irtf.__all__, key=lambda n: (not n[0].isupper(), n.lower()))
