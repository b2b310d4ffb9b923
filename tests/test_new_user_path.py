"""The path a new user takes with a CLIP model, end to end, each step a fresh process started the way
the README starts it (nothing is imported into this test process but the demo's process helper):
write a FashionIQ-layout dataset and a tiny CLIP preset, train the Combiner with tools/train.py,
export it with tools/export.py, query the export with tools/query.py, serve it with tools/demo.py
and ask its REST API. The query's results are gallery images, and the demo's answer is the
query tool's ranking."""

import base64
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytest.importorskip("keras_hub")
pytest.importorskip("fastapi", reason="the demo needs its extra: pip install -e '.[demo]'")
pytest.importorskip("uvicorn", reason="the demo needs its extra: pip install -e '.[demo]'")

TOP = 5
QUERY_IMAGE = "dress_va00.jpg"
TEXT = "is darker and has long sleeves"

_FIXTURE = textwrap.dedent(
    """
    from keras_irtf.testing.cir_fixtures import write_fashioniq
    from keras_irtf.testing.tiny_clip import make_tiny_clip_preset

    write_fashioniq("fashioniq")
    make_tiny_clip_preset("clip_preset")
    """
)


def _start(work, *args):
    """One fresh interpreter in the work folder: `python args...`, started."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


def _finish(proc, timeout=300):
    """The output of a process _start started, once it has succeeded."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, f"{proc.args[1:3]} exited with {proc.returncode}:\n{out[-2000:]}\n{err[-4000:]}"
    return out


def _step(work, *args):
    return _finish(_start(work, *args))


@pytest.mark.slow
def test_train_export_query_and_demo_a_clip_model_on_fashioniq(tmp_path):
    from keras_irtf.demo.process import DemoProcess  # subprocess + urllib only: it starts tools/demo.py

    work = tmp_path
    _step(work, "-c", _FIXTURE)
    images = work / "fashioniq" / "images"
    assert (work / "clip_preset" / "config.json").is_file() and (images / QUERY_IMAGE).is_file()

    _step(work, REPO / "tools" / "train.py", "--dataset", "fashioniq", "--data-root", "fashioniq",
          "--clip-preset", "./clip_preset", "--out", "runs/fiq_clip", "--steps", "3",
          "--set", "train.batch_size=4", "--set", "train.steps_per_epoch=3", "--set", "data.train_recall_queries=16",
          "--set", "eval.batch_size=8", "--set", "data.feature_cache=features", "--quiet")
    assert (work / "runs" / "fiq_clip" / "model.keras").is_file()

    out = _step(work, REPO / "tools" / "export.py", "--run", "runs/fiq_clip", "--gallery", images,
                "--out", "exported", "--quiet")
    export = work / "exported" / "fiq_clip" / "1"
    assert out.strip().splitlines()[-1] == "exported/fiq_clip/1" and (export / "saved_model.pb").is_file()
    gallery = (export / "assets.extra" / "gallery.txt").read_text().split("\n")[:-1]
    assert sorted(gallery) == sorted(p.name for p in images.iterdir())

    # the query tool runs while the demo server starts
    query = _start(work, REPO / "tools" / "query.py", "--model", export, "--image", images / QUERY_IMAGE,
                   "--text", TEXT, "--gallery", images, "--top", TOP, "--out", "grid.png")
    try:
        with DemoProcess(export, "--gallery", images, start_timeout=120) as demo:
            status, body = demo.request("POST", "/v1/models/fiq_clip:predict", {
                "signature_name": "retrieve", "instances": [
                    {"image_bytes": {"b64": base64.b64encode((images / QUERY_IMAGE).read_bytes()).decode()},
                     "text": TEXT, "k": TOP + 1}]})
    except BaseException:
        query.kill()
        query.communicate()
        raise
    out = _finish(query)
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == list(range(1, TOP + 1))
    ranked = [Path(r[2]).name for r in rows]
    scores = [float(r[1]) for r in rows]
    assert set(ranked) <= set(gallery) and QUERY_IMAGE not in ranked  # gallery images, the query left out
    assert scores == sorted(scores, reverse=True) and (work / "grid.png").stat().st_size > 0

    assert status == 200, body
    pred = body["predictions"][0]
    assert pred["paths"] == [gallery[i] for i in pred["ids"]]
    answer = [(p, s) for p, s in zip(pred["paths"], pred["scores"]) if p != QUERY_IMAGE][:TOP]
    assert [p for p, _ in answer] == ranked  # the REST answer is the query tool's ranking
    assert [round(s, 4) for _, s in answer] == pytest.approx(scores, abs=2e-4)
