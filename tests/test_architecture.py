"""The architecture as checks: the import contract (.importlinter) holds, it names every module of
the package, and it catches an upward import."""

import ast
import configparser
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "keras_irtf"
CONTRACT = ROOT / ".importlinter"


def _lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports over the keras_irtf package found under `root`, with the contract there."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='.importlinter', no_cache=True, no_logo=True))")
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def _floors() -> list:
    parser = configparser.ConfigParser()
    parser.read(CONTRACT)
    lines = [line.strip() for line in parser["importlinter:contract:floors"]["layers"].splitlines() if line.strip()]
    return [[name.strip() for name in line.split("|")] for line in lines]


def test_the_import_contract_holds():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_the_contract_ignores_no_import():
    text = CONTRACT.read_text()
    assert "ignore_imports" not in text and "unmatched_ignore_imports_alerting" not in text


def test_every_module_of_the_package_is_on_a_floor():
    on_floors = {name for floor in _floors() for name in floor}
    children = {f"keras_irtf.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    children |= {f"keras_irtf.{p.name}" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert on_floors == children


@pytest.mark.parametrize("importer, imported", [
    ("layers/base.py", "keras_irtf.experiment"),  # a floor reaching up
    ("model/losses_check.py", "keras_irtf.data.base"),  # a sibling on the same floor
])
def test_the_contract_catches_an_upward_or_sideways_import(tmp_path, importer, imported):
    copy = tmp_path / "repo"
    shutil.copytree(PACKAGE, copy / "keras_irtf", ignore=shutil.ignore_patterns("__pycache__", "static"))
    shutil.copy(CONTRACT, copy / ".importlinter")
    target = copy / "keras_irtf" / importer
    target.write_text((target.read_text() if target.exists() else "") + f"\nimport {imported}  # noqa\n")
    result = _lint(copy)
    assert result.returncode != 0
    assert "1 broken" in result.stdout and imported in result.stdout


# ---- each choice list is written once: next to its setting (config) or in a registry ---------
def _string_collections(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) >= 2 and all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
            yield node.lineno, frozenset(e.value for e in node.elts)


def test_each_choice_list_is_written_once():
    from keras_irtf import config
    from keras_irtf.registry import REGISTRIES

    declared = {frozenset(values): key for key, values in config._CHOICES.items()}
    declared.update({frozenset(reg.builtin_names()): f"the {kind} registry" for kind, reg in REGISTRIES.items()})
    sources = [p for folder in ("keras_irtf", "tools", "benchmarks") for p in sorted((ROOT / folder).rglob("*.py"))]
    repeated = [f"{p.relative_to(ROOT)}:{line}: the choices of {declared[values]}"
                for p in sources if p != PACKAGE / "config.py"
                for line, values in _string_collections(p) if values in declared]
    assert not repeated, "\n".join(repeated)


def test_the_choice_lists_are_read_from_the_config():
    from keras_irtf import config, precision
    from keras_irtf.evaluation import retrieval
    from keras_irtf.model import gradient_augmentation as ga

    assert precision.PRECISIONS is config.TrainConfig.CHOICES["precision"] == config.choices("train.precision")
    assert ga.POINTS is config.GAConfig.CHOICES["point"] and ga.MODES is config.GAConfig.CHOICES["mode"]
    assert retrieval.BACKENDS is config.EvalConfig.CHOICES["backend"]
    with pytest.raises(ValueError, match=r"GA point must be one of \('input', 'image_feature'"):
        ga.GradientAugmentation(point="pixels")
    with pytest.raises(config.ConfigError, match=r"train.strategy='sideways': expected one of \['auto', 'one_device'"):
        config.load_config([], ["train.strategy=sideways"])


def test_the_ga_layer_knows_the_built_in_methods_from_the_registry():
    from keras_irtf.config import GA_OLD_KEYS, MOVED_KEYS
    from keras_irtf.model.gradient_augmentation import GradientAugmentation
    from keras_irtf.registry import GA_METHODS

    layer = GradientAugmentation(methods="isotropic")
    builtins = set(GA_METHODS.builtin_names())
    assert builtins == {"adversarial", "fgsm", "isotropic", "l1", "l2", "pgd"}
    assert all(layer.method_settings(name) is not None for name in builtins)
    # the GA keys of earlier versions: one table for config files (hints) and .keras files (values)
    assert MOVED_KEYS["ga.eps"] == "ga.adversarial.eps" and "ga.l1" not in MOVED_KEYS
    old = GradientAugmentation(methods="adversarial", eps=0.25, l2=0.5)
    assert old.eps == 0.25 and old.l2 == 0.5 and set(GA_OLD_KEYS) >= {"eps", "l2"}


# ---- optional extras load only where they are used, through one helper -----------------------
def _imports(path: Path):
    """(line, module name, inside a function) of every import statement of a source file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))

    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield child.lineno, alias.name, in_function
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                yield child.lineno, child.module, in_function
            yield from walk(child, inside)

    yield from walk(tree, False)


def test_optional_packages_are_imported_only_through_the_helper():
    from keras_irtf.utils import OPTIONAL_PACKAGES

    direct = [f"{p.relative_to(ROOT)}:{line}: import {name}" for p in sorted(PACKAGE.rglob("*.py"))
              for line, name, _ in _imports(p) if name.split(".")[0] in OPTIONAL_PACKAGES]
    assert not direct, "\n".join(direct)
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    extras = set(parser["options.extras_require"])
    assert {extra for extra in OPTIONAL_PACKAGES.values() if extra} <= extras


def test_the_helper_names_the_extra_to_install(monkeypatch):
    from keras_irtf.utils import MissingExtra, optional_import

    assert optional_import("json", "demo").dumps([]) == "[]"
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if not installed
    with pytest.raises(MissingExtra) as e:
        optional_import("faiss", "faiss", "backend='faiss'")
    assert str(e.value) == "backend='faiss' needs the package faiss, which is not installed: pip install -e '.[faiss]'"
    assert isinstance(e.value, ImportError)


_IMPORT_EVERY_MODULE = """
import importlib, json, pkgutil, sys
import keras_irtf
from keras_irtf.utils import OPTIONAL_PACKAGES
failed = {}
for info in sorted(pkgutil.walk_packages(keras_irtf.__path__, "keras_irtf."), key=lambda m: m.name):
    try:
        importlib.import_module(info.name)
    except Exception as e:
        failed[info.name] = repr(e)
loaded = sorted(name for name in OPTIONAL_PACKAGES if name in sys.modules)
print(json.dumps({"failed": failed, "loaded": loaded, "count": len([m for m in sys.modules if m.startswith("keras_irtf")])}))
"""


def test_every_module_imports_without_loading_an_optional_package():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", _IMPORT_EVERY_MODULE], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["failed"] == {}
    assert result["loaded"] == []
    assert result["count"] >= len(list(PACKAGE.rglob("*.py")))
