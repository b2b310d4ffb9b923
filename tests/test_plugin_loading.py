"""Plug-ins as a new user writes them: a module in the working folder loaded by name, errors that
say what was tried, and the one contract a plug-in layer must meet (sub-layers built in build())."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from keras_irtf.registry import RegistryError, import_modules
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent


def test_a_module_in_the_working_folder_is_imported_by_name(tmp_path, css_smoke_root):
    """`python tools/train.py --import my_gated ...` from the folder holding my_gated.py."""
    shutil.copy(ROOT / "tests" / "plugins" / "gated_sum_composer.py", tmp_path / "my_gated_first_contact.py")
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="-1")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), "--import", "my_gated_first_contact",
                        "--method", "gated_sum", "--dataset", "css", "--preset", "smoke", "--data-root",
                        str(css_smoke_root), "--steps", "2", "--out", str(tmp_path / "run"), "--quiet"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["method"] == "gated_sum"


def test_a_missing_module_names_both_places_looked_in(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RegistryError, match=r"no module 'no_such_plugin_x' on the Python path nor as "
                                            r"no_such_plugin_x.py in the working folder"):
        import_modules(["no_such_plugin_x"])


@pytest.mark.parametrize("by", ["name", "path"])
def test_an_exception_inside_the_plugin_is_reported_with_its_traceback(tmp_path, monkeypatch, by):
    name = f"raising_plugin_{by}"
    (tmp_path / f"{name}.py").write_text("x = 1\n\ndef setup():\n    raise RuntimeError('the plug-in is broken')\n\nsetup()\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # a name found in the working folder appends it
    with pytest.raises(RegistryError) as info:
        import_modules([name if by == "name" else f"./{name}.py"])
    message = str(info.value)
    assert "the plug-in was found but raised RuntimeError: the plug-in is broken" in message
    assert f"{name}.py\", line 4, in setup" in message and f"{name}.py\", line 6" in message
    assert name not in sys.modules  # not left half-imported


def test_a_plugin_import_that_fails_inside_is_not_called_missing(tmp_path, monkeypatch):
    (tmp_path / "needs_missing_dep.py").write_text("import no_such_dependency_y\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(RegistryError, match=r"was found but raised ModuleNotFoundError: No module named "
                                            r"'no_such_dependency_y'"):
        import_modules(["needs_missing_dep"])


def test_a_layer_that_leaves_a_weighted_sublayer_unbuilt_is_named_at_build(tmp_path, css_smoke_root):
    from keras_irtf.experiment import build_model
    from keras_irtf.model.retrieval_model import UnbuiltSublayerError

    plugin = tmp_path / "lazy_composer_contract.py"
    plugin.write_text(textwrap.dedent('''
        import keras
        from keras_irtf.layers import Composer
        from keras_irtf.registry import register_composer

        @register_composer("lazy_sum_contract")
        class LazySum(Composer):
            def __init__(self, output_dim=512, **kwargs):
                super().__init__(output_dim, **kwargs)
                self.concat = keras.layers.Concatenate()      # no weights: may stay unbuilt
                self.text_proj = keras.layers.Dense(self.output_dim, name="text_proj")

            def build(self, input_shapes):
                pass                                          # forgets self.text_proj.build

            def call(self, inputs, training=False):
                img, txt = inputs
                return img + self.text_proj(txt)
    '''))
    import_modules([str(plugin)])
    cfg = tiny_config(css_smoke_root, "model.composer=lazy_sum_contract")
    with pytest.raises(UnbuiltSublayerError, match=r"LazySum \(composer\) did not build its sub-layer\(s\) "
                                                   r"text_proj \(Dense\) in build\(\)"):
        build_model(cfg, vocab_size=50)
    build_model(tiny_config(css_smoke_root, "model.composer=tirg"), vocab_size=50)  # the built-ins comply
