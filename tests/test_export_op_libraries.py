"""Exports whose graph runs ops beyond core TensorFlow (the CLIP tokenizer's tensorflow-text ops):
the export records the op libraries, and tools/query.py and the demo's loader, each in a fresh
process that imported nothing before, load the export and rank as the Keras model does; a missing
library is one error line naming the export, the op and the pip command."""

import importlib.metadata
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("keras_hub")
pytest.importorskip("tensorflow_text")

REPO = Path(__file__).resolve().parent.parent
TEXT = "make it red and add a stripe"
K = 4


def _png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def clip_export(tmp_path_factory):
    """A tiny random CLIP model (TIRG on the CLIP towers) exported with a gallery of 7 images, and
    the ranking of the gallery for one query as the Keras model computes it in this process."""
    import tensorflow as tf

    from keras_irtf.config import load_config
    from keras_irtf.experiment import Experiment
    from keras_irtf.serving.export import export_model
    from keras_irtf.testing.tiny_clip import make_tiny_clip_preset

    root = tmp_path_factory.mktemp("clip_export")
    preset = make_tiny_clip_preset(root / "preset", [TEXT], seed=3)
    cfg = load_config([], ["model.image_encoder=clip", f"model.image_encoder.preset={preset}",
                           "model.text_encoder=clip", "model.composer=tirg", "model.embed_dim=16"])
    exp = Experiment(cfg, verbose=False)
    model = exp.build_model()
    rng = np.random.default_rng(11)
    gallery = root / "gallery"
    gallery.mkdir()
    for i in range(7):
        (gallery / f"g{i}.png").write_bytes(_png(rng.integers(0, 256, size=(36 + i, 40, 3)).astype("uint8")))
    query = root / "query.png"  # not a gallery file: nothing is left out of the results
    query.write_bytes(_png(rng.integers(0, 256, size=(44, 38, 3)).astype("uint8")))
    path = export_model(model, cfg, root / "exported" / "tiny_clip", gallery=gallery, verbose=False)

    prep = model.image_encoder.own_preprocessor() or exp.preprocessor
    names = sorted(p.name for p in gallery.iterdir())

    def pixels(files):  # decoded as the serving graph decodes them
        return tf.stack([prep(tf.io.decode_image(f.read_bytes(), channels=3, expand_animations=False))
                         for f in files])

    q = model.embed_queries(pixels([query]), tf.constant([TEXT])).numpy()[0]
    g = model.embed_images(pixels([gallery / n for n in names])).numpy()
    scores = g @ q
    order = np.argsort(-scores, kind="stable")
    assert scores[order[K - 1]] - scores[order[K]] > 1e-4  # no tie at the cut
    return {"path": path, "gallery": gallery, "query": query, "names": names, "ids": order[:K].tolist(),
            "scores": scores[order[:K]].tolist(), "root": root}


def _run(args, code=None, timeout=300):
    """A fresh interpreter in the repository folder: `python args...`, or `python -c code args...`."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO))
    cmd = [sys.executable] + (["-c", code] if code is not None else []) + [str(a) for a in args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _query_args(export, out, gallery=None):
    return ["--model", export["path"], "--image", export["query"], "--text", TEXT,
            "--gallery", gallery or export["gallery"], "--top", K, "--out", out]


def _ranking(stdout):
    """(gallery file names, scores) of tools/query.py's result lines: "rank  score  path"."""
    rows = [line.split() for line in stdout.splitlines() if line.strip()[:1].isdigit()]
    return [Path(r[2]).name for r in rows], [float(r[1]) for r in rows]


def test_the_export_records_the_op_libraries_its_graph_runs(clip_export):
    from keras_irtf.serving.export import read_export_info
    from keras_irtf.serving.op_libraries import read_graph_op_names

    info = read_export_info(clip_export["path"])
    assert info["op_libraries"] == ["tensorflow_text"]
    details = info["op_library_details"]["tensorflow_text"]
    assert details["package"] == "tensorflow-text"
    assert details["version"] == importlib.metadata.version("tensorflow-text")
    assert "RegexSplitWithOffsets" in details["ops"]  # the CLIP tokenizer's pre-tokenisation
    assert set(details["ops"]) <= read_graph_op_names(clip_export["path"])
    assert details["files"] and all(f.endswith(".so") for f in details["files"])


def test_query_tool_in_a_fresh_process_ranks_as_the_keras_model(clip_export, tmp_path):
    done = _run(["tools/query.py"] + _query_args(clip_export, tmp_path / "query"))
    assert done.returncode == 0, done.stderr[-3000:]
    names, scores = _ranking(done.stdout)
    assert names == [clip_export["names"][i] for i in clip_export["ids"]]
    np.testing.assert_allclose(scores, clip_export["scores"], rtol=1e-3, atol=1e-3)
    assert (tmp_path / "query" / "grid.png").stat().st_size > 0
    # a gallery folder other than the exported one: ranked through embed_image, the same order
    other = tmp_path / "other"
    shutil.copytree(clip_export["gallery"], other)
    (other / "extra.txt").write_text("not an image")
    done = _run(["tools/query.py"] + _query_args(clip_export, tmp_path / "query2", gallery=other))
    assert done.returncode == 0, done.stderr[-3000:]
    assert _ranking(done.stdout)[0] == names


# the demo's loader as tools/demo.py runs it (keras_irtf/demo/process.py): keras cannot be imported
_DEMO_LOADER = textwrap.dedent(
    """
    import json, sys
    for name in ("keras", "tf_keras"):
        sys.modules[name] = None
    from keras_irtf.demo.served import ServedModel
    model = ServedModel(sys.argv[1])
    out = model.retrieve(open(sys.argv[2], "rb").read(), sys.argv[3], int(sys.argv[4]))
    out["tensorflow_text_imported"] = "tensorflow_text" in sys.modules
    print(json.dumps(out))
    """
)


def test_demo_loader_in_a_fresh_process_without_keras(clip_export):
    done = _run([clip_export["path"], clip_export["query"], TEXT, K], code=_DEMO_LOADER)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["ids"] == clip_export["ids"]
    assert out["paths"] == [clip_export["names"][i] for i in clip_export["ids"]]
    np.testing.assert_allclose(out["scores"], clip_export["scores"], rtol=1e-3, atol=1e-3)
    # the op files were loaded from the installed package; its Python side (which needs Keras) was not
    assert out["tensorflow_text_imported"] is False


# a tool run with tensorflow_text unimportable, as on a machine without tensorflow-text
_WITHOUT_TEXT = textwrap.dedent(
    """
    import runpy, sys
    sys.modules["tensorflow_text"] = None
    tool = sys.argv[1]
    sys.argv = [tool] + sys.argv[2:]
    runpy.run_path(tool, run_name="__main__")
    """
)


def test_a_missing_op_library_is_one_line_naming_the_package(clip_export, tmp_path):
    version = importlib.metadata.version("tensorflow-text")
    path = str(clip_export["path"])
    for tool, args in (("tools/query.py", _query_args(clip_export, tmp_path / "query")),
                       ("tools/demo.py", ["--model", path, "--port", "0"])):
        done = _run([tool] + args, code=_WITHOUT_TEXT)
        assert done.returncode == 2, (tool, done.stdout[-2000:], done.stderr[-3000:])
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, (tool, done.stderr[-3000:])
        assert errors[0].startswith(f"error: {path}: its graph runs the op RegexSplitWithOffsets of tensorflow-text")
        assert errors[0].endswith(f"pip install tensorflow-text=={version}")
        assert "op_libraries" in errors[0] and "Traceback" not in done.stderr
        assert not (tmp_path / "query").exists()


def test_an_export_without_the_record_still_loads(clip_export, tmp_path):
    """An export written before the op libraries were recorded: the known library is imported
    when the graph names an op this process lacks."""
    old = tmp_path / "old" / "1"
    shutil.copytree(clip_export["path"], old)
    info_file = old / "assets.extra" / "keras_irtf_export.json"
    info = json.loads(info_file.read_text())
    del info["op_libraries"], info["op_library_details"]
    info_file.write_text(json.dumps(info))
    export = dict(clip_export, path=old)
    done = _run(["tools/query.py"] + _query_args(export, tmp_path / "query"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert _ranking(done.stdout)[0] == [clip_export["names"][i] for i in clip_export["ids"]]
    # and without tensorflow-text, the error names the op and the package
    done = _run(["tools/query.py"] + _query_args(export, tmp_path / "query"), code=_WITHOUT_TEXT)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-3000:]
    assert "RegexSplitWithOffsets" in errors[0] and "pip install tensorflow-text==" in errors[0]


def test_a_damaged_op_library_record_is_named(clip_export, tmp_path):
    from keras_irtf.serving.export import DamagedExport, open_export

    bad = tmp_path / "bad" / "1"
    shutil.copytree(clip_export["path"], bad)
    info_file = bad / "assets.extra" / "keras_irtf_export.json"
    info = json.loads(info_file.read_text())
    info["op_libraries"] = "tensorflow_text"
    info_file.write_text(json.dumps(info))
    with pytest.raises(DamagedExport, match=r"keras_irtf_export.json: \"op_libraries\" must be a list"):
        open_export(bad)


def test_op_libraries_are_found_from_the_graph_of_any_model(tmp_path):
    """A SavedModel whose graph runs a tensorflow-text op (as a plug-in encoder's could) maps it to
    tensorflow-text; a graph of core ops needs no library."""
    import tensorflow as tf
    import tensorflow_text as tf_text

    from keras_irtf.serving.op_libraries import read_graph_op_names, required_op_libraries

    class Tokenize(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def __call__(self, text):
            return tf_text.WhitespaceTokenizer().tokenize(text).flat_values

    class Core(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def __call__(self, text):
            return tf.strings.split(text).flat_values

    tf.saved_model.save(Tokenize(), str(tmp_path / "text"))
    tf.saved_model.save(Core(), str(tmp_path / "core"))
    found = required_op_libraries(read_graph_op_names(tmp_path / "text"))
    assert list(found) == ["tensorflow_text"]
    assert found["tensorflow_text"]["package"] == "tensorflow-text"
    assert any("Whitespace" in op for op in found["tensorflow_text"]["ops"])
    assert required_op_libraries(read_graph_op_names(tmp_path / "core")) == {}


# tools/query.py's loader (keras_irtf.serving.query.ExportedModel) with keras unimportable
_QUERY_LOADER = textwrap.dedent(
    """
    import json, sys
    for name in ("keras", "tf_keras"):
        sys.modules[name] = None
    from keras_irtf.serving.query import ExportedModel
    model = ExportedModel(sys.argv[1])
    emb = model.embed_queries([open(sys.argv[2], "rb").read()], [sys.argv[3]])
    print(json.dumps({"embedding": emb[0].tolist(), "info": model.info["op_libraries"]}))
    """
)


def test_a_siglip_export_loads_in_a_fresh_process(tmp_path):
    """SigLIP tokenises with tensorflow-text's SentencePiece ops: recorded, loaded, same embedding."""
    import tensorflow as tf

    from keras_irtf.config import load_config
    from keras_irtf.experiment import Experiment
    from keras_irtf.serving.export import export_model, read_export_info
    from keras_irtf.testing.tiny_clip import make_tiny_siglip_preset

    preset = make_tiny_siglip_preset(tmp_path / "preset", [TEXT], seed=4)
    cfg = load_config([], ["model.image_encoder=siglip", f"model.image_encoder.preset={preset}",
                           "model.text_encoder=siglip", "model.composer=tirg", "model.embed_dim=32"])
    exp = Experiment(cfg, verbose=False)
    model = exp.build_model()
    path = export_model(model, cfg, tmp_path / "exported" / "tiny_siglip", verbose=False)
    details = read_export_info(path)["op_library_details"]
    assert list(details) == ["tensorflow_text"] and "SentencepieceTokenizeOp" in details["tensorflow_text"]["ops"]
    image = tmp_path / "q.png"
    image.write_bytes(_png(np.random.default_rng(5).integers(0, 256, size=(30, 41, 3)).astype("uint8")))
    prep = model.image_encoder.own_preprocessor() or exp.preprocessor
    pixels = prep(tf.io.decode_image(image.read_bytes(), channels=3, expand_animations=False))[None]
    want = model.embed_queries(pixels, tf.constant([TEXT])).numpy()[0]

    done = _run([path, image, TEXT], code=_QUERY_LOADER)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["info"] == ["tensorflow_text"]
    np.testing.assert_allclose(out["embedding"], want, rtol=1e-4, atol=1e-4)


def test_an_op_the_installed_library_lacks_is_named(tmp_path):
    """A recorded op the installed tensorflow-text does not register (an export made with another
    version), and an unknown op of an export without the record: one line each, what to install."""
    from keras_irtf.serving.op_libraries import MissingOpLibrary, register_op_libraries

    version = importlib.metadata.version("tensorflow-text")
    record = {"op_libraries": ["tensorflow_text"], "op_library_details": {"tensorflow_text": {
        "package": "tensorflow-text", "version": "9.9.9", "ops": ["TFText>NoSuchOp"], "files": []}}}
    with pytest.raises(MissingOpLibrary) as e:
        register_op_libraries(tmp_path, record, {"Const", "TFText>NoSuchOp"})
    assert str(e.value) == (f"{tmp_path}: its graph runs the op TFText>NoSuchOp of tensorflow-text 9.9.9, which the "
                            f"installed tensorflow-text {version} does not register: pip install tensorflow-text==9.9.9")
    with pytest.raises(MissingOpLibrary, match=r"its graph runs the op NoSuchOp, which TensorFlow .* does not register"
                                               r".*pip install tensorflow-text==2\.\d+\.\*"):
        register_op_libraries(tmp_path, {}, {"Const", "NoSuchOp"})
    register_op_libraries(tmp_path, record, {"Const", "RegexSplitWithOffsets"})  # all registered: nothing to do


@pytest.mark.parametrize("library", ["payload_mod", "exported.evil.payload_mod", "os.path", "../payload_mod"])
def test_an_export_cannot_make_the_loader_import_or_load_its_own_code(tmp_path, monkeypatch, library):
    """An export's description is input: a library it names that keras_irtf does not know, and
    that this process has not imported, is refused; nothing it names is imported or loaded."""
    from keras_irtf.serving.op_libraries import MissingOpLibrary, register_op_libraries

    marker = tmp_path / "ran"
    code = tmp_path / "code"
    (code / "exported" / "evil").mkdir(parents=True)
    payload = f"open({str(marker)!r}, 'w').write('x')\n"
    (code / "payload_mod.py").write_text(payload)
    (code / "exported" / "evil" / "payload_mod.py").write_text(payload)
    monkeypatch.syspath_prepend(str(code))  # as the working folder or the checkout is for the tools
    info = {"op_libraries": [library],
            "op_library_details": {library: {"package": "x", "ops": ["NoSuchOpXyz"], "files": ["payload.so"]}}}
    with pytest.raises(MissingOpLibrary, match=r"keras_irtf loads only the op libraries it knows"):
        register_op_libraries(tmp_path / "export" / "1", info, {"NoSuchOpXyz"})
    assert not marker.exists()
    assert "payload_mod" not in sys.modules and "exported.evil.payload_mod" not in sys.modules
