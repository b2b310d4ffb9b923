"""The documented Python API is exactly keras_irtf.__all__: every name there resolves, the
module docstring lists each of them, and every top-level name the docs and examples use exists."""

import re
from pathlib import Path

import pytest

import keras_irtf

ROOT = Path(__file__).resolve().parent.parent
SUBMODULES = {p.stem for p in (ROOT / "keras_irtf").glob("*.py")} | {
    p.name for p in (ROOT / "keras_irtf").iterdir() if (p / "__init__.py").is_file()}


def test_every_public_name_resolves():
    for name in keras_irtf.__all__:
        assert getattr(keras_irtf, name) is not None, name
    assert sorted(keras_irtf.__all__) == sorted(set(keras_irtf.__all__))
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        keras_irtf.no_such_name  # noqa: B018


def test_the_module_docstring_lists_exactly_the_public_names():
    listed = set()
    for line in keras_irtf.__doc__.splitlines():
        if line.startswith("    ") and "  " in line.strip():
            names = line.strip().split("  ")[0]
            listed |= {n.strip() for n in names.split(",")}
    assert listed == set(keras_irtf.__all__)


def _documents():
    yield ROOT / "README.md"
    yield from sorted((ROOT / "docs").rglob("*.md"))
    yield from sorted((ROOT / "examples").rglob("*.py"))


def test_every_top_level_name_the_docs_use_is_public():
    used = {}
    for path in _documents():
        text = path.read_text()
        names = re.findall(r"(?<![.\w])(?:keras_irtf|kirtf)\.([A-Za-z_]\w*)", text)  # not .keras_irtf.json
        for group in re.findall(r"from keras_irtf import ([\w, ()\n]+)", text):
            names += [n.strip(" ()\n") for n in group.split(",")]
        for name in names:
            if name and name not in SUBMODULES:
                used.setdefault(name, path.relative_to(ROOT))
    missing = {n: str(p) for n, p in used.items() if n not in keras_irtf.__all__ and n != "__version__"}
    assert not missing, f"names used in the docs but not in keras_irtf.__all__: {missing}"
    assert {"load_config", "create_model"} <= set(used)  # the scan does read the docs


def test_build_model_and_make_optimizer_from_a_config(css_smoke_root):
    from tests.conftest import tiny_config

    cfg = tiny_config(css_smoke_root)
    model = keras_irtf.build_model(cfg, vocab_size=50)
    assert isinstance(model, keras_irtf.ComposedRetrievalModel) and model.built
    optimizer = keras_irtf.make_optimizer(cfg, model)
    assert float(optimizer.learning_rate) == pytest.approx(cfg.optim.learning_rate)
