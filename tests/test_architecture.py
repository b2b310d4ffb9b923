"""The architecture as checks: the import contract (.importlinter) holds, it names every module of
the package, and it catches an upward import."""

import configparser
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
