"""The architecture as checks: the import contract (.importlinter) holds, it names every module of
the package, and it catches an upward import; imports sit at the top of modules, only the optional
extras load later (through keras_irtf.utils.optional_import), and every module imports in a fresh
interpreter with the base install alone."""

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


# ---- imports sit at the top of modules ------------------------------------------------------
# The only import statements inside functions, each for a reason:
#   keras_irtf/__init__.py __getattr__   `import keras_irtf` stays light (config and registry only):
#                                        the public names that need TensorFlow load on first use
#   keras_irtf/cli.py start_tensorflow   the tools' quiet TensorFlow start: the import runs while
#                                        file descriptor 2 is pointed away, after --verbose is read
FUNCTION_IMPORTS_ALLOWED = {("keras_irtf/__init__.py", "__getattr__"), ("keras_irtf/cli.py", "start_tensorflow")}


def _function_imports(path: Path):
    """(line, outermost function, imported module) of every import statement inside a function."""
    tree = ast.parse(path.read_text(encoding="utf-8"))

    def walk(node, function):
        for child in ast.iter_child_nodes(node):
            if function is None and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield from walk(child, child.name)
                continue
            if function is not None and isinstance(child, ast.Import):
                for alias in child.names:
                    yield child.lineno, function, alias.name
            elif function is not None and isinstance(child, ast.ImportFrom):
                yield child.lineno, function, "." * child.level + (child.module or "")
            yield from walk(child, function)

    yield from walk(tree, None)


def _kind(module: str) -> str:
    return "keras_irtf" if module.startswith((".", "keras_irtf")) else module.split(".")[0]


def test_imports_inside_functions_are_only_the_documented_ones():
    """Every import statement inside a function, counted by kind: none but the allowed ones
    (the optional extras load through optional_import, which is a call, not an import statement)."""
    found = [(p.relative_to(ROOT).as_posix(), line, function, module) for p in sorted(PACKAGE.rglob("*.py"))
             for line, function, module in _function_imports(p)]
    offenders = [f"{path}:{line}: import {module} inside {function}() ({_kind(module)})"
                 for path, line, function, module in found if (path, function) not in FUNCTION_IMPORTS_ALLOWED]
    counts = {}
    for path, line, function, module in found:
        if (path, function) not in FUNCTION_IMPORTS_ALLOWED:
            counts[_kind(module)] = counts.get(_kind(module), 0) + 1
    assert not offenders, (f"{len(offenders)} imports inside functions {counts}; move them to the top of their "
                           f"module (an optional extra loads through keras_irtf.utils.optional_import):\n"
                           + "\n".join(offenders))
    # each allowed place still imports inside its function (else its entry is stale)
    assert {(path, function) for path, _, function, _ in found} == FUNCTION_IMPORTS_ALLOWED


def test_the_function_import_check_catches_one(tmp_path):
    source = tmp_path / "module.py"
    source.write_text("import os\n\ndef f():\n    from keras_irtf import config\n    import numpy as np\n"
                      "    return os, config, np\n\nclass A:\n    def g(self):\n        import json\n")
    assert [(line, function, _kind(module)) for line, function, module in _function_imports(source)] == [
        (4, "f", "keras_irtf"), (5, "f", "numpy"), (10, "g", "json")]


def test_modules_are_loaded_by_name_only_where_the_name_is_data():
    """importlib.import_module / __import__ only in the optional-extras helper, the registry (the
    user's plug-ins, the built-ins' modules) and the op libraries (a library an export names)."""
    allowed = {"keras_irtf/utils.py", "keras_irtf/registry.py", "keras_irtf/serving/op_libraries.py"}
    calls = []
    for p in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name in ("importlib.import_module", "__import__", "import_module"):
                    calls.append((p.relative_to(ROOT).as_posix(), node.lineno, name))
    assert calls and {path for path, _, _ in calls} <= allowed, calls


# Every module of the package, imported in a fresh interpreter where the optional extras cannot be
# imported (as with the base install alone): a finder ahead of the others refuses them and records
# each attempt, so that a module loading one when it is imported shows even if it catches the error.
_IMPORT_EVERY_MODULE = """
import importlib, json, pkgutil, sys

blocked, tried = set(json.loads(sys.argv[1])), []


class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            tried.append(name)
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
import keras_irtf

failed = {}
names = sorted(m.name for m in pkgutil.walk_packages(keras_irtf.__path__, "keras_irtf."))
for name in names:
    try:
        importlib.import_module(name)
    except Exception as e:
        failed[name] = repr(e)
print(json.dumps({"failed": failed, "tried": sorted(set(tried)), "modules": names}))
"""


def _fresh(code: str, *args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_module_imports_with_the_base_install_alone():
    from keras_irtf.utils import OPTIONAL_PACKAGES

    result = _fresh(_IMPORT_EVERY_MODULE, json.dumps(sorted(OPTIONAL_PACKAGES)))
    assert result["failed"] == {}
    assert result["tried"] == []  # no optional extra is even looked for while the modules load
    expected = {".".join(p.relative_to(ROOT).with_suffix("").parts[:-1] if p.stem == "__init__"
                         else p.relative_to(ROOT).with_suffix("").parts) for p in PACKAGE.rglob("*.py")}
    assert set(result["modules"]) | {"keras_irtf"} == expected


def test_an_optional_extra_loaded_at_import_time_is_caught():
    """The check above fails for a module that imports an optional extra at its top, even when
    the module catches the ImportError."""
    code = _IMPORT_EVERY_MODULE.replace("import keras_irtf\n", "import keras_irtf\n"
                                        "try:\n    import faiss\nexcept ImportError:\n    pass\n", 1)
    result = _fresh(code, json.dumps(["faiss"]))
    assert result["tried"] == ["faiss"]


# What must import without Keras (the readers of an export: tools/query.py and the demo load a
# SavedModel with TensorFlow alone) and without TensorFlow (`import keras_irtf`, the tools' shared
# command line, which starts TensorFlow quietly, and the CSS generator).
WITHOUT_KERAS = ["keras_irtf.serving.reader", "keras_irtf.serving.query", "keras_irtf.demo", "keras_irtf.demo.app",
                 "keras_irtf.demo.served", "keras_irtf.demo.ground_truth", "keras_irtf.demo.process",
                 "keras_irtf.image_limits", "keras_irtf.preprocessing", "keras_irtf.utils"]
WITHOUT_TENSORFLOW = ["keras_irtf", "keras_irtf.cli", "keras_irtf.config", "keras_irtf.registry",
                      "keras_irtf.data.css_generator", "keras_irtf.data.css_shift", "keras_irtf.data.css_scenes"]
_IMPORT_WITHOUT = """
import importlib, json, sys

absent, modules = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for name in absent:
    sys.modules[name] = None  # `import name` now raises ImportError
failed = {}
for name in modules:
    try:
        importlib.import_module(name)
    except ImportError as e:
        failed[name] = repr(e)
print(json.dumps({"failed": failed}))
"""


@pytest.mark.parametrize("absent, modules", [
    (["keras", "tf_keras", "tensorflow_text", "tensorflow_hub"], WITHOUT_KERAS),
    (["tensorflow", "keras", "tf_keras"], WITHOUT_TENSORFLOW),
], ids=["without keras", "without tensorflow"])
def test_the_light_entry_points_import_without_the_heavy_packages(absent, modules):
    assert _fresh(_IMPORT_WITHOUT, json.dumps(absent), json.dumps(modules)) == {"failed": {}}


def test_importing_a_heavy_module_without_keras_fails():
    """The check above can fail: the writer of exports needs Keras."""
    result = _fresh(_IMPORT_WITHOUT, json.dumps(["keras", "tf_keras"]), json.dumps(["keras_irtf.serving.export"]))
    assert list(result["failed"]) == ["keras_irtf.serving.export"]
