"""SavedModel export: the serving contract (keras-free reload, parity with the Keras model, every
endpoint, bad input), TF Serving's version layout, and atomicity of the write."""

import importlib.util
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke_run(css_smoke_root, tmp_path_factory):
    """A run folder trained for a few steps on the CSS smoke set."""
    from keras_irtf.training.loop import train

    out = tmp_path_factory.mktemp("export_run") / "css_smoke_tirg"
    cfg = tiny_config(css_smoke_root, f"train.out={out}", "train.steps=3", "train.steps_per_epoch=3",
                      "data.train_recall_queries=16")
    run, _ = train(cfg, verbose=0)
    return run


@pytest.fixture(scope="module")
def exported(smoke_run, css_smoke_root, tmp_path_factory):
    from keras_irtf.serving.export import export_run

    base = tmp_path_factory.mktemp("exported")
    path = export_run(smoke_run, out_root=base, gallery=Path(css_smoke_root) / "images", verbose=False)
    return path


def _png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# Runs in a fresh interpreter where keras and keras_irtf cannot be imported: only TensorFlow.
_CLIENT = textwrap.dedent(
    """
    import json, sys
    for name in ("keras", "keras_irtf", "tf_keras"):
        sys.modules[name] = None  # `import keras` now raises ImportError
    import numpy as np
    import tensorflow as tf

    export_dir, inputs_path, out_path = sys.argv[1:4]
    data = np.load(inputs_path, allow_pickle=True)
    images = [bytes(b) for b in data["images"]]
    texts = [str(t) for t in data["texts"]]
    m = tf.saved_model.load(export_dir)
    out = {"signatures": sorted(m.signatures)}
    q = m.signatures["serving_default"](image_bytes=tf.constant(images), text=tf.constant(texts))
    out["query"] = q["embedding"].numpy()
    out["image"] = m.signatures["embed_image"](image_bytes=tf.constant(images))["embedding"].numpy()
    k = int(data["k"])
    r = m.signatures["retrieve"](image_bytes=tf.constant(images), text=tf.constant(texts),
                                 k=tf.constant([k] * len(images), tf.int32))
    out["ids"], out["scores"] = r["ids"].numpy(), r["scores"].numpy()
    out["paths"] = np.array([[p.decode() for p in row] for row in r["paths"].numpy()])
    big = m.signatures["retrieve"](image_bytes=tf.constant(images[:1]), text=tf.constant(texts[:1]),
                                   k=tf.constant([100000], tf.int32))
    out["big_k"] = big["ids"].numpy().shape[1]
    errors = {}
    for label, payload in (("garbage", b"definitely not an image"), ("empty", b""),
                           ("truncated_png", images[0][:100])):
        try:
            m.signatures["embed_image"](image_bytes=tf.constant([images[0], payload]))
            errors[label] = None
        except tf.errors.InvalidArgumentError as e:
            errors[label] = e.message
    try:
        m.signatures["retrieve"](image_bytes=tf.constant(images[:2]), text=tf.constant(texts[:2]),
                                 k=tf.constant([3, 4], tf.int32))
        errors["mixed_k"] = None
    except tf.errors.InvalidArgumentError as e:
        errors["mixed_k"] = e.message
    try:
        import keras  # noqa: F401
        out["keras_importable"] = True
    except ImportError:
        out["keras_importable"] = False
    out["keras_irtf_loaded"] = any(
        (k == "keras_irtf" or k.startswith("keras_irtf.")) and v is not None for k, v in sys.modules.items())
    np.savez(out_path, **{k: v for k, v in out.items()})
    with open(out_path + ".errors.json", "w") as f:
        json.dump(errors, f)
    """
)


@pytest.fixture(scope="module")
def contract(exported, css_smoke_root, tmp_path_factory):
    """The exported model run by a keras-free client on PNGs of the gallery and a JPEG of
    another size, and the Keras model's outputs on the same inputs."""
    import tensorflow as tf

    from keras_irtf.config import load_config
    from keras_irtf.data.images import normalize_images
    from keras_irtf.data.text import TextVectorizer
    from keras_irtf.serving.export import list_gallery, read_export_info
    from keras_irtf.experiment import load_model

    tmp = tmp_path_factory.mktemp("client")
    info = read_export_info(exported)
    run = Path(info["run"])
    cfg = load_config([run / "config.yaml"])
    model = load_model(run / "model.keras")
    vectorizer = TextVectorizer.load(run / "vocab.txt", cfg.model.max_text_length)
    size = cfg.data.image_size

    gallery_root = Path(css_smoke_root) / "images"
    gallery = list_gallery(gallery_root)
    gallery_pixels = np.stack([np.asarray(Image.open(gallery_root / p).convert("RGB")) for p in gallery])
    assert gallery_pixels.shape[1:] == (size, size, 3)

    rng = np.random.default_rng(1)
    jpeg_pixels = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    jpeg = _jpeg(jpeg_pixels)
    images = [(gallery_root / gallery[i]).read_bytes() for i in (0, 5, 40)] + [jpeg]
    texts = ["make top-left red", "", "ADD a Blue Cube!!", "remove the unknownword"]
    # the reference pixels: lossless PNG decoded by Pillow; the JPEG decoded by TF and brought to
    # the encoder's size as the training pipeline does (shorter side, centre crop)
    from keras_irtf.preprocessing import resize_and_center_crop

    decoded = resize_and_center_crop(tf.io.decode_jpeg(jpeg, channels=3), size)
    ref_images = np.concatenate([gallery_pixels[[0, 5, 40]].astype(np.float32),
                                 decoded.numpy()[None].astype(np.float32)])
    ref_images = normalize_images(ref_images)
    ref_query = model.embed_queries(ref_images, vectorizer(texts)).numpy()
    ref_image = model.embed_images(ref_images).numpy()
    ref_gallery = model.embed_images(normalize_images(gallery_pixels)).numpy()

    inputs = tmp / "inputs.npz"
    np.savez(inputs, images=np.array(images, dtype=object), texts=np.array(texts), k=np.int64(10))
    script = tmp / "client.py"
    script.write_text(_CLIENT)
    out = tmp / "out.npz"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, str(script), str(exported), str(inputs), str(out)],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = dict(np.load(out, allow_pickle=False))
    result["errors"] = json.loads(Path(str(out) + ".errors.json").read_text())
    return {"result": result, "ref_query": ref_query, "ref_image": ref_image, "ref_gallery": ref_gallery,
            "gallery": gallery, "texts": texts}


def test_reloads_without_keras_and_lists_endpoints(contract):
    r = contract["result"]
    assert not r["keras_importable"]
    assert not r["keras_irtf_loaded"]
    assert list(r["signatures"]) == ["embed_image", "retrieve", "serving_default"]


def test_query_and_image_embeddings_equal_keras_model(contract):
    r = contract["result"]
    assert r["query"].shape == contract["ref_query"].shape
    assert np.max(np.abs(r["query"] - contract["ref_query"])) <= 1e-5
    assert np.max(np.abs(r["image"] - contract["ref_image"])) <= 1e-5
    # the empty text (row 1) is a valid query, and differs from a non-empty one on the same image
    assert np.all(np.isfinite(r["query"][1]))


def test_retrieve_matches_brute_force_numpy(contract):
    r = contract["result"]
    scores = contract["ref_query"].astype(np.float64) @ contract["ref_gallery"].astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    expected = np.take_along_axis(scores, order, 1)
    assert r["ids"].shape == (4, 10)
    np.testing.assert_allclose(r["scores"], expected, atol=1e-4)
    # ids agree wherever the score is not tied with a neighbour
    for i in range(4):
        for j in range(10):
            gap = np.min(np.abs(np.delete(scores[i], order[i, j]) - scores[i, order[i, j]]))
            if gap > 1e-4:
                assert r["ids"][i, j] == order[i, j]
    # returned paths are the gallery files of those ids, and scores are the dot products
    assert [list(row) for row in r["paths"]] == [[contract["gallery"][j] for j in row] for row in r["ids"]]
    np.testing.assert_allclose(r["scores"], np.take_along_axis(scores, r["ids"], 1), atol=1e-4)
    # a k above the gallery size returns the whole gallery
    assert int(r["big_k"]) == len(contract["gallery"])


def test_bad_input_gives_invalid_argument_with_a_clear_message(contract):
    errors = contract["result"]["errors"]
    assert "could not be decoded" in errors["garbage"]
    assert "could not be decoded" in errors["empty"]
    assert errors["truncated_png"] is not None and "png" in errors["truncated_png"].lower()
    assert "same k" in errors["mixed_k"]


def test_saved_model_cli_lists_string_inputs(exported):
    cli = Path(sys.executable).parent / "saved_model_cli"
    if not cli.exists():
        pytest.skip("saved_model_cli not installed next to the interpreter")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([str(cli), "show", "--dir", str(exported), "--all"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    blocks = {}
    for part in text.split("signature_def['")[1:]:
        name, body = part.split("']", 1)
        blocks[name] = body
    assert {"serving_default", "embed_image", "retrieve"} <= set(blocks)
    for name, inputs in (("serving_default", ("image_bytes", "text")), ("embed_image", ("image_bytes",)),
                         ("retrieve", ("image_bytes", "text"))):
        for inp in inputs:
            section = blocks[name].split(f"inputs['{inp}']", 1)[1].split("name:", 1)[0]
            assert "DT_STRING" in section, (name, inp, section)
    assert "DT_INT32" in blocks["retrieve"].split("inputs['k']", 1)[1].split("name:", 1)[0]


def test_export_info_and_gallery_list(exported, css_smoke_root):
    from keras_irtf.serving.export import list_gallery, read_export_info

    info = read_export_info(exported)
    assert exported.name == "1" and exported.parent.name == "css_smoke_tirg"
    assert info["endpoints"] == ["serving_default", "embed_image", "retrieve"]
    assert info["image_size"] == 64 and info["text_preprocessing"] == "vocabulary"
    # core TensorFlow ops only: loading needs no op library (a CLIP export records tensorflow_text)
    assert info["op_libraries"] == [] and info["op_library_details"] == {}
    listed = (exported / "assets.extra" / "gallery.txt").read_text().split()
    assert listed == list_gallery(Path(css_smoke_root) / "images")
    assert info["gallery"]["size"] == len(listed)


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_export_tool_says_each_line_once(smoke_run, css_smoke_root, tmp_path):
    """tools/export.py as a user runs it: the note naming the export once (TensorFlow's absl
    logging gives the root logger a handler of its own mid-export; the tool's log must not reach
    it as well), and the export's path alone on standard output."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, str(REPO / "tools" / "export.py"), "--run", str(smoke_run), "--gallery",
                           str(Path(css_smoke_root) / "images"), "--out", str(tmp_path / "exported")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    path = tmp_path / "exported" / smoke_run.name / "1"
    assert done.stdout == f"{path}\n"
    notes = [line for line in done.stderr.splitlines() if str(path) in line]
    assert notes == [f"exported {path} (endpoints: serving_default, embed_image, retrieve)"], done.stderr[-3000:]


def test_versions_force_and_interrupted_export(smoke_run, exported, tmp_path, monkeypatch, capsys):
    import shutil

    import tensorflow as tf

    from keras_irtf.serving.export import ExportError, export_model, load_run, read_export_info

    tool = _load_tool("export")
    base = tmp_path / "exported"
    shutil.copytree(exported, base / "css_smoke_tirg" / "1")  # an existing version 1
    # the tool takes the next free version, here without a gallery
    assert tool.main(["--run", str(smoke_run), "--out", str(base), "--quiet"]) == 0
    model_dir = base / "css_smoke_tirg"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2"]
    assert read_export_info(model_dir / "2")["endpoints"] == ["serving_default", "embed_image"]
    # an existing version is refused without --force, and the message says how to proceed
    capsys.readouterr()
    assert tool.main(["--run", str(smoke_run), "--out", str(base), "--version", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err and "3" in err

    # interruption after the SavedModel files are written, before the version is complete
    cfg, model = load_run(smoke_run)
    original = tf.saved_model.save
    written = []

    def crash_after_writing(obj, export_dir, *args, **kwargs):
        original(obj, export_dir, *args, **kwargs)
        written.extend(os.listdir(export_dir))
        raise KeyboardInterrupt("simulated interruption mid-export")

    monkeypatch.setattr(tf.saved_model, "save", crash_after_writing)
    with pytest.raises(KeyboardInterrupt):
        export_model(model, cfg, model_dir, run_dir=smoke_run, verbose=False)
    assert "saved_model.pb" in written  # the interruption really came mid-write
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2"]  # no version 3, no leftovers
    monkeypatch.undo()

    # --force replaces a version as a whole
    marker = model_dir / "1" / "stale.txt"
    marker.write_text("from the old version")
    with pytest.raises(ExportError, match="already exists"):
        export_model(model, cfg, model_dir, run_dir=smoke_run, version=1, verbose=False)
    assert marker.exists()
    export_model(model, cfg, model_dir, run_dir=smoke_run, version=1, force=True, verbose=False)
    assert not marker.exists() and (model_dir / "1" / "saved_model.pb").is_file()
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2"]


def test_bad_run_and_gallery_errors(smoke_run, tmp_path):
    from keras_irtf.serving.export import ExportError, export_run, list_gallery

    with pytest.raises(ExportError, match="config.yaml not found: --run must be a run folder"):
        export_run(tmp_path, out_root=tmp_path / "x", verbose=False)
    with pytest.raises(ExportError, match="does not exist"):
        list_gallery(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="holds no images"):
        list_gallery(tmp_path / "empty")


def test_unknown_encoder_names_the_registry(smoke_run):
    from keras_irtf.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="no image encoder of that name.*small_cnn.*register_image_encoder"):
        load_config([smoke_run / "config.yaml"], ["model.image_encoder=vit_giant"])
    with pytest.raises(ConfigError, match="model.text_encoder='bert_mystery'.*registered: .*lstm"):
        load_config([smoke_run / "config.yaml"], ["model.text_encoder=bert_mystery"])


def test_corrupt_gallery_image_is_named(smoke_run, tmp_path):
    from keras_irtf.serving.export import ExportError, export_run

    gallery = tmp_path / "gallery"
    gallery.mkdir()
    (gallery / "a.png").write_bytes(_png(np.zeros((64, 64, 3), np.uint8)))
    (gallery / "b.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(ExportError, match="b.jpg could not be decoded"):
        export_run(smoke_run, out_root=tmp_path / "out", gallery=gallery, verbose=False)
    assert not (tmp_path / "out" / smoke_run.name / "1").exists()


def test_query_search_and_figure(exported, css_smoke_root, tmp_path, capsys):
    import shutil

    from PIL import Image

    from keras_irtf.serving.query import FRAME_COLOR, ExportedModel, search

    gallery = Path(css_smoke_root) / "images"
    model = ExportedModel(exported)
    query = gallery / "css_test_000003.png"
    text = "add red cube to top-left"
    # in-graph retrieve over the stored gallery; the query's own image is left out
    results = search(model, query, text, gallery, top=10)
    assert [r.rank for r in results] == list(range(1, 11))
    assert all(r.path != query for r in results)
    assert all(a.score >= b.score for a, b in zip(results, results[1:]))
    with_own = search(model, query, text, gallery, top=10, exclude_query=False)
    own_score = float(model.embed_queries([query.read_bytes()], [text])[0] @ model.embed_images([query.read_bytes()])[0])
    assert any(r.path == query for r in with_own) == (own_score >= with_own[-1].score)
    # a different gallery folder: ranked through embed_image, same scores for the same files
    other = tmp_path / "gallery"
    other.mkdir()
    for r in results[:5]:
        shutil.copy(r.path, other / r.path.name)
    sub = search(model, query, text, other, top=3)
    assert [r.path.name for r in sub] == [r.path.name for r in results[:3]]
    np.testing.assert_allclose([r.score for r in sub], [r.score for r in results[:3]], atol=1e-4)

    # the tool: figure with the ground truth framed when it is retrieved, not otherwise
    tool = _load_tool("query")
    out = tmp_path / "query" / "grid.png"  # a run of the tool replaces the folder its previous run wrote
    target = results[1].path.name
    args = ["--model", str(exported), "--image", str(query), "--text", text, "--gallery", str(gallery),
            "--top", "10", "--out", str(out.parent), "--thumb", "64"]
    assert tool.main(args + ["--target", target]) == 0
    printed = capsys.readouterr().out
    assert f"{target}  <- target" in printed
    fig = np.asarray(Image.open(out).convert("RGB"))
    assert fig.shape[1] > 11 * 64  # query + 10 results side by side
    green = np.all(fig == np.array(FRAME_COLOR, np.uint8), axis=-1).sum()
    assert green > 4 * 64 * 4  # a frame around one thumbnail
    far = [p for p in sorted(gallery.iterdir()) if p.name not in {r.path.name for r in results}][0]
    assert tool.main(args + ["--target", far.name, "--top", "3"]) == 0
    fig = np.asarray(Image.open(out).convert("RGB"))
    assert np.all(fig == np.array(FRAME_COLOR, np.uint8), axis=-1).sum() < 100  # score text only, no frame
    assert tool.main(args + ["--target", "no_such.png"]) == 2


def test_export_preprocesses_with_the_image_encoders_preprocessor(smoke_run):
    """The graph's image path is the encoder's preprocessor: shorter side, centre crop, its mean
    and std; an image already at the encoder's size is only normalised."""
    import tensorflow as tf

    from keras_irtf.config import load_config
    from keras_irtf.data.images import normalize_images
    from keras_irtf.serving import export as E

    cfg = load_config([smoke_run / "config.yaml"], ["data.image_size=32"])
    prep = E.image_preprocessing_for(cfg)
    assert prep.size == 32 and prep.name == "center_crop_imagenet"
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 80, 3), dtype=np.uint8)  # shorter side 40 -> 32: 32 x 64, centre 32
    out = E.images_from_bytes(tf.constant([_png(img)]), prep).numpy()[0]
    resized = tf.image.resize(img.astype(np.float32), (32, 64), antialias=True).numpy()
    expected = normalize_images(np.clip(np.round(resized[:, 16:48]), 0, 255)).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-5)
    small = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    got = E.images_from_bytes(tf.constant([_png(small)]), prep).numpy()[0]
    np.testing.assert_allclose(got, normalize_images(small.astype(np.float32)).numpy(), atol=1e-6)
    text = E.text_preprocessing_for(load_config([smoke_run / "config.yaml"], ["model.text_encoder=bert_hub"]))
    assert text.name == "raw_strings"
    np.testing.assert_array_equal(text.transform(tf.constant(["a B", ""])).numpy(), [b"a B", b""])


@pytest.mark.slow
@pytest.mark.parametrize("method,image_encoder", [("concat", "small_cnn"), ("image_only", "small_cnn"),
                                                  ("text_only", "small_cnn"), ("tirg", "resnet18")])
def test_every_composer_and_encoder_exports(method, image_encoder, css_smoke_root, smoke_vectorizer, tmp_path):
    """Freshly built (untrained) models of every composer and image encoder export, and the
    SavedModel reproduces the Keras model on raw bytes and strings."""
    import tensorflow as tf

    from keras_irtf import api
    from keras_irtf.data.images import normalize_images
    from keras_irtf.serving.export import export_model

    cfg = tiny_config(css_smoke_root, f"model.composer={method}", f"model.image_encoder={image_encoder}",
                      "data.image_size=32")
    smoke_vectorizer.save(tmp_path / "vocab.txt")
    model = api.create_model(cfg, smoke_vectorizer, compile=False)
    path = export_model(model, cfg, tmp_path / "out", run_dir=tmp_path, verbose=False)
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    texts = ["add a red cube", ""]
    served = tf.saved_model.load(str(path)).signatures
    got = served["serving_default"](image_bytes=tf.constant([_png(p) for p in pixels]), text=tf.constant(texts))
    want = model.embed_queries(normalize_images(pixels.astype(np.float32)), smoke_vectorizer(texts)).numpy()
    assert np.max(np.abs(got["embedding"].numpy() - want)) <= 1e-5
    got_img = served["embed_image"](image_bytes=tf.constant([_png(p) for p in pixels]))["embedding"].numpy()
    assert np.max(np.abs(got_img - model.embed_images(normalize_images(pixels.astype(np.float32))).numpy())) <= 1e-5
