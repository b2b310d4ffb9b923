"""Shared fixtures: a generated CSS smoke set, a tiny config, a tiny model.

Everything is made in temporary folders; nothing is downloaded.
"""

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import logging

import numpy as np
import pytest

from keras_irtf.config import load_config, repo_configs_dir


@pytest.fixture(autouse=True)
def _keras_irtf_log_as_before():
    """A tool's main() run in the test process configures the `keras_irtf` logger (its console
    handler, its level, no propagation to the root logger, where pytest's caplog listens): put
    it back as it was after each test."""
    logger = logging.getLogger("keras_irtf")
    saved = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


@pytest.fixture(scope="session")
def css_smoke_root(tmp_path_factory):
    from keras_irtf.data.css_generator import generate

    return generate(tmp_path_factory.mktemp("css") / "css_smoke", size="smoke", seed=0, verbose=False)


def tiny_config(root=None, *overrides):
    """The smoke preset (tiny model, few steps) on a given CSS folder."""
    configs = repo_configs_dir()
    items = [f"data.root={root}"] if root else []
    return load_config([configs / "css.yaml", configs / "presets" / "smoke.yaml"], items + list(overrides))


def export_untrained_smoke(tmp, images, out, **export_options):
    """Export an untrained smoke model (32-px images, a two-caption vocabulary) whose gallery is
    `images` (PNG bytes) written to tmp/gallery; returns (export path, gallery, model, config)."""
    from keras_irtf import api
    from keras_irtf.data.text import TextVectorizer
    from keras_irtf.serving.export import export_model

    cfg = tiny_config(None, "data.image_size=32")
    vectorizer = TextVectorizer.from_texts(["add a red cube", "make it blue"], cfg.model.max_text_length)
    vectorizer.save(tmp / "vocab.txt")
    gallery = tmp / "gallery"
    gallery.mkdir()
    for i, data in enumerate(images):
        (gallery / f"g{i}.png").write_bytes(data)
    model = api.create_model(cfg, vectorizer, compile=False)
    path = export_model(model, cfg, tmp / out, run_dir=tmp, gallery=gallery, verbose=False, **export_options)
    return path, gallery, model, cfg


@pytest.fixture
def smoke_config(css_smoke_root, tmp_path):
    return tiny_config(css_smoke_root, f"train.out={tmp_path / 'run'}")


@pytest.fixture(scope="session")
def css_smoke(css_smoke_root):
    from keras_irtf.data.css import CSSDataset

    return CSSDataset(css_smoke_root, verbose=False)


@pytest.fixture(scope="session")
def smoke_vectorizer(css_smoke):
    from keras_irtf.data.text import TextVectorizer

    return TextVectorizer.from_texts(css_smoke.training_texts(), 16)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def load_tool(name: str):
    """The module of tools/<name>.py, freshly loaded (the tools are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tool_{name}", Path(__file__).resolve().parents[1] / "tools" /
                                                  f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
