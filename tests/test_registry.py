"""Registries and the assembler: user plug-ins in one file each (composer, dataset, GA method)
loaded with --import, per-kind config sections, and one preprocessing for training and export."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from keras_irtf.config import ConfigError, load_config, repo_configs_dir

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = Path(__file__).resolve().parent / "plugins"


def _tool(name, *args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "tools" / f"{name}.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)


def test_registries_list_the_builtins_and_choices_come_from_them():
    from keras_irtf import registry

    assert registry.COMPOSERS.names() == ["combiner", "composeae", "composeae_real", "concat", "image_only", "sum",
                                         "text_only", "tirg"]
    assert registry.IMAGE_ENCODERS.names() == ["clip", "resnet18", "siglip", "small_cnn"]
    assert registry.TEXT_ENCODERS.names() == ["bert_hub", "bert_keras_hub", "clip", "lstm", "siglip"]
    assert registry.DATASETS.names() == ["cirr", "css", "fashion200k", "fashioniq", "mitstates", "triplets"]
    assert registry.RETRIEVAL_LOSSES.names() == ["batch_classification", "soft_triplet"]
    assert registry.GA_METHODS.names() == ["adversarial", "fgsm", "isotropic", "l1", "l2", "pgd"]
    # a name registered twice by different classes is refused
    with pytest.raises(registry.RegistryError, match="already registered"):
        registry.register_composer("tirg")(type("Other", (), {}))


def test_each_kind_owns_its_keys_and_switching_type_keeps_them():
    cfg = load_config([repo_configs_dir() / "css.yaml"],
                      ["model.image_encoder.filters=[4,8]", "model.image_encoder=resnet18",
                       "model.image_encoder.weights=/somewhere", "model.image_encoder=small_cnn"])
    assert cfg.model.image_encoder == "small_cnn" and cfg.model.image_encoder.filters == (4, 8)
    assert cfg.model.image_encoder.to_dict() == {"type": "small_cnn", "filters": [4, 8], "stem_stride": 2}
    # the explicit form sets another type's keys without selecting it
    cfg = load_config([], ["model.image_encoder.resnet18.weights=/w"])
    assert cfg.model.image_encoder == "small_cnn"
    with pytest.raises(ConfigError, match=r"unknown key model.image_encoder.weights.*'weights' is a key of: resnet18"):
        load_config([], ["model.image_encoder.weights=/w"])
    with pytest.raises(ConfigError, match=r"model.cnn_filters; it moved to model.image_encoder.filters"):
        load_config([], ["model.cnn_" + "filters=[1]"])
    with pytest.raises(ConfigError, match=r"ga.isotropic.noise_scaling='sideways'"):
        load_config([], ["ga.methods=isotropic", "ga.isotropic.noise_scaling=sideways"])
    # a round trip through config.yaml
    cfg = load_config([], ["ga.methods=adversarial", "ga.adversarial.eps=0.25", "model.composer=composeae",
                           "model.composer.dropout=0.2"])
    again = load_config([], [{k: v for k, v in cfg.to_dict().items()}])
    assert again.to_dict() == cfg.to_dict() and again.ga.adversarial.eps == 0.25


@pytest.mark.slow
def test_user_composer_dataset_and_ga_method_from_one_file_each(tmp_path):
    """Three --import modules: a composer, a dataset and a GA method. The smoke preset trains with
    all three, and the run exports; the SavedModel answers without the user's modules."""
    imports = [a for p in ("gated_sum_composer", "colour_pairs_dataset", "feature_norm_ga")
               for a in ("--import", str(PLUGINS / f"{p}.py"))]
    run = tmp_path / "run"
    r = _tool("train", *imports, "--dataset", "colour_pairs", "--method", "gated_sum", "--preset", "smoke",
              "--ga", "feature_grad", "--set", "ga.point=composed", "--set", "model.composer.hidden=4",
              "--set", "data.dataset.images_per_colour=4", "--set", "data.image_size=16",
              "--set", "train.steps=6", "--set", "train.steps_per_epoch=3", "--set", "train.batch_size=8",
              "--set", "data.train_recall_queries=16", "--out", str(run), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["dataset"] == "colour_pairs" and metrics["method"] == "gated_sum"
    assert metrics["final_losses"]["feature_grad_penalty"] > 0
    assert "hidden: 4" in (run / "config.yaml").read_text()
    # without the modules, the run's config names a dataset nobody registered: a clear error
    r = _tool("export", "--run", str(run), "--out", str(tmp_path / "exported"))
    assert r.returncode == 2 and "no dataset of that name" in r.stderr and "--import" in r.stderr
    r = _tool("export", *imports, "--run", str(run), "--out", str(tmp_path / "exported"))
    assert r.returncode == 0, r.stderr[-3000:]
    version = Path(r.stdout.strip().splitlines()[-1])
    client = (
        "import sys, numpy as np, tensorflow as tf\n"
        "from PIL import Image\nimport io\n"
        "m = tf.saved_model.load(sys.argv[1])\n"
        "buf = io.BytesIO(); Image.fromarray(np.full((20, 24, 3), 200, np.uint8)).save(buf, 'PNG')\n"
        "out = m.signatures['serving_default'](image_bytes=tf.constant([buf.getvalue()]), text=tf.constant(['make it red']))\n"
        "e = out['embedding'].numpy(); print('SHAPE', e.shape, 'NORM', float(np.linalg.norm(e)))\n"
        "print('PLUGINS', any(k.endswith(('gated_sum_composer', 'feature_norm_ga')) for k in sys.modules))\n"
    )
    c = subprocess.run([sys.executable, "-c", client, str(version)], capture_output=True, text=True, timeout=300)
    assert c.returncode == 0, c.stderr[-2000:]
    assert "SHAPE (1, 64)" in c.stdout and "PLUGINS False" in c.stdout


def test_import_errors_are_clear():
    r = _tool("train", "--import", "no_such_module_xyz", "--dataset", "css", timeout=300)
    assert r.returncode == 2 and "--import no_such_module_xyz: no module 'no_such_module_xyz' on the Python path nor" in r.stderr


@pytest.fixture(scope="module")
def ms_root(tmp_path_factory):
    from keras_irtf.testing.fixtures import write_mitstates

    return write_mitstates(tmp_path_factory.mktemp("mitstates") / "release_dataset")


@pytest.mark.parametrize("image_encoder", ["small_cnn", "resnet18"])
def test_export_equals_the_training_pipeline_on_a_disk_dataset(image_encoder, ms_root, tmp_path):
    """A run on MIT-States (JPEGs of other sizes, streamed from disk): `embed_image` and
    `serving_default` of the export on a file's bytes equal the Keras model on the training
    pipeline's tensor for that file, for every registered image encoder."""
    import tensorflow as tf

    from keras_irtf.experiment import Experiment
    from keras_irtf.registry import IMAGE_ENCODERS
    from keras_irtf.serving.export import export_run

    assert image_encoder in IMAGE_ENCODERS.names()
    cfg = load_config([repo_configs_dir() / "mitstates.yaml"], [
        f"data.root={ms_root}", "data.image_size=40", f"model.image_encoder={image_encoder}", "model.embed_dim=16",
        "model.text_encoder.word_embed_dim=8", "model.text_encoder.hidden_dim=8", "train.batch_size=4"])
    exp = Experiment(cfg, verbose=False)
    model = exp.create_model()
    run = exp.save_run(model, tmp_path / "run")
    version = export_run(run, out_root=tmp_path / "exported", verbose=False)
    served = tf.saved_model.load(str(version)).signatures

    split = exp.dataset.test
    ids = [0, 3, 5]
    pipeline = np.concatenate([b.numpy() for b in exp.gallery_dataset("test", batch_size=64)])[ids]
    raw = tf.constant([Path(split.image_paths[i]).read_bytes() for i in ids])
    sizes = {tf.io.decode_jpeg(r).shape[:2] for r in raw}
    assert any(h != w for h, w in sizes)  # non-square files: the crop matters
    got = served["embed_image"](image_bytes=raw)["embedding"].numpy()
    want = model.embed_images(pipeline).numpy()
    np.testing.assert_allclose(got, want, atol=2e-5)
    texts = ["ancient", "cooked", "ripe"]
    got_q = served["serving_default"](image_bytes=raw, text=tf.constant(texts))["embedding"].numpy()
    want_q = model.embed_queries(pipeline, exp.vectorizer(texts)).numpy()
    np.testing.assert_allclose(got_q, want_q, atol=2e-5)
    # a different crop (the old square resize) would not match: the comparison can fail
    squashed = np.stack([tf.image.resize(tf.io.decode_jpeg(r), (40, 40), antialias=True).numpy() for r in raw])
    assert np.max(np.abs(model.embed_images(exp.preprocessor.normalize(squashed)).numpy() - got)) > 1e-3


def test_keras_irtf_has_no_import_cycle():
    """Every `import` / `from ... import` of a keras_irtf module inside keras_irtf (module level
    and inside functions) is an edge; the graph must be acyclic."""
    import ast

    package = ROOT / "keras_irtf"
    modules = {}
    for path in package.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        modules[name] = path
    graph = {m: set() for m in modules}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                if t in modules and t != name:
                    graph[name].add(t)
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n] if n in stack else [m, n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])
    assert len(modules) > 30 and graph["keras_irtf.experiment"]  # the walk saw the package


def test_readme_registry_table_is_the_registries():
    from keras_irtf.registry import markdown_table

    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- registry-table -->\n", 1)[1].split("\n<!-- /registry-table -->", 1)[0]
    assert block == markdown_table(), "README's registry table is stale: paste `python tools/plugins.py`"


def test_the_plugin_listing_tool_prints_the_table_and_nothing_on_stderr():
    """`python tools/plugins.py` prints README's table and nothing else: no runpy warning, none of
    TensorFlow's C++ start-up lines (the environment a user's shell has: no TF_CPP_MIN_LOG_LEVEL);
    with --import a user's module joins the listing."""
    import os

    from keras_irtf.registry import markdown_table

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "plugins.py")], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr == ""
    assert done.stdout == markdown_table() + "\n"
    names = subprocess.run([sys.executable, str(ROOT / "tools" / "plugins.py"), "--names", "--import",
                            str(PLUGINS / "gated_sum_composer.py")], capture_output=True, text=True, cwd=ROOT,
                           env=env, timeout=300)
    assert names.returncode == 0 and names.stderr == "", names.stderr[-2000:]
    composers = names.stdout.splitlines()[0]
    assert composers.startswith("composer: ") and "gated_sum" in composers.split(": ")[1].split(", ")
