"""Shared fixtures: a generated CSS smoke set, a tiny config, a tiny model.

Everything is made in temporary folders; nothing is downloaded.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

from keras_irtf.config import load_config, repo_configs_dir


@pytest.fixture(scope="session")
def css_smoke_root(tmp_path_factory):
    from keras_irtf.data.css_generator import generate

    return generate(tmp_path_factory.mktemp("css") / "css_smoke", size="smoke", seed=0, verbose=False)


def tiny_config(root=None, *overrides):
    """The smoke preset (tiny model, few steps) on a given CSS folder."""
    configs = repo_configs_dir()
    items = [f"data.root={root}"] if root else []
    return load_config([configs / "css.yaml", configs / "presets" / "smoke.yaml"], items + list(overrides))


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
