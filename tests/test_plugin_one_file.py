"""Adding a composer, a dataset or a GA method takes one file: the plug-in, copied alone into an
empty folder and loaded with --import, is offered by the tools' --help, its keys are validated by
the config, and the assembler builds it with its settings."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = Path(__file__).resolve().parent / "plugins"

# Runs in a fresh interpreter: tools/train.py --import PLUGIN --help, then the checks of one kind.
_SCRIPT = textwrap.dedent(
    """
    import contextlib, io, json, runpy, sys
    plugin, train, checks = sys.argv[1:4]
    sys.argv = ["train.py", "--import", plugin, "--help"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(train, run_name="__main__")
        except SystemExit:
            pass
    from keras_irtf.config import ConfigError, load_config
    from keras_irtf.experiment import Experiment
    result = {"help": out.getvalue()}
    exec(checks)
    print("RESULT " + json.dumps(result))
    """
)


def _run_plugin(tmp_path, plugin_file: str, checks: str) -> dict:
    folder = tmp_path / "only_the_plugin"
    folder.mkdir()
    plugin = shutil.copy(PLUGINS / plugin_file, folder / plugin_file)
    assert sorted(p.name for p in folder.iterdir()) == [plugin_file]  # nothing else is needed
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(plugin), str(ROOT / "tools" / "train.py"),
                           textwrap.dedent(checks)], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _help_choices(help_text: str, flag: str) -> list:
    flat = " ".join(help_text.split())
    start = flat.index(f"[{flag} {{") + len(flag) + 3
    return flat[start:flat.index("}", start)].split(",")


def test_a_composer_in_one_file(tmp_path):
    result = _run_plugin(tmp_path, "gated_sum_composer.py", """
        cfg = load_config([], ["model.composer=gated_sum", "model.composer.hidden=3", "model.embed_dim=8",
                               "model.image_encoder=small_cnn", "model.image_encoder.filters=[4,4]"])
        model = Experiment(cfg, verbose=False).build_model(vocab_size=7)
        result.update(cls=type(model.composer).__name__, hidden=model.composer.hidden,
                      output_dim=model.composer.output_dim)
        try:
            load_config([], ["model.composer=gated_sum", "model.composer.width=3"])
        except ConfigError as e:
            result["error"] = str(e)
    """)
    assert "gated_sum" in _help_choices(result["help"], "--method")
    assert (result["cls"], result["hidden"], result["output_dim"]) == ("GatedSum", 3, 8)
    assert "model.composer.width" in result["error"] and "hidden" in result["error"]


def test_a_dataset_in_one_file(tmp_path):
    result = _run_plugin(tmp_path, "colour_pairs_dataset.py", """
        cfg = load_config([], ["data.dataset=colour_pairs", "data.dataset.images_per_colour=2", "data.image_size=16"])
        data = Experiment(cfg, verbose=False).dataset
        result.update(cls=type(data).__name__, train_images=data.train.num_images,
                      image_shape=list(data.train.images.shape[1:]), queries=len(data.test.test_queries.texts))
    """)
    assert "colour_pairs" in _help_choices(result["help"], "--dataset")
    assert result["cls"] == "ColourPairs" and result["train_images"] == 6 * 2
    assert result["image_shape"] == [16, 16, 3] and result["queries"] == 24


def test_a_ga_method_in_one_file(tmp_path):
    result = _run_plugin(tmp_path, "feature_norm_ga.py", """
        cfg = load_config([], ["ga.methods=feature_grad,isotropic", "ga.feature_grad.weight=0.25",
                               "ga.point=composed", "model.embed_dim=8", "model.image_encoder=small_cnn",
                               "model.image_encoder.filters=[4,4]"])
        exp = Experiment(cfg, verbose=False)
        ga = exp.build_model(vocab_size=7).gradient_augmentation
        result.update(active=[type(m).__name__ for m in ga.active], weight=ga.method_settings("feature_grad").weight,
                      terms=ga.term_names(), double_backprop=exp.part_context("text_encoder")["double_backprop"])
        from keras_irtf.registry import GA_METHODS
        result["builtin"] = GA_METHODS.builtin_names()
    """)
    assert "feature_grad" in result["help"].split("comma-separated GA methods:")[1].split("(or none)")[0]
    assert result["active"] == ["FeatureGradPenalty", "IsotropicGA"] and result["weight"] == 0.25
    assert result["terms"] == ["feature_grad_penalty", "ga_isotropic"]
    assert result["double_backprop"] is False  # x at the composed feature: no second order through the LSTM
    assert "feature_grad" not in result["builtin"]
