"""End-to-end: pipeline batches, the model's .keras round trip, a smoke training run, evaluation."""

import json
import subprocess
import sys

import numpy as np
import pytest

from keras_irtf.data.pipeline import training_dataset
from keras_irtf.experiment import build_model, load_model, make_optimizer, sample_batch, save_model
from keras_irtf.training.loop import train
from tests.conftest import tiny_config


def test_training_batches(css_smoke, smoke_vectorizer):
    ds = training_dataset(css_smoke, smoke_vectorizer, batch_size=8, steps=3, seed=5, preprocessor=64)
    batches = list(ds)
    assert len(batches) == 3
    b = batches[0]
    assert set(b) == {"source_image", "text", "target_image", "source_id", "target_id", "target_caption"}
    assert b["source_image"].shape == (8, 64, 64, 3) and b["source_image"].dtype.name == "float32"
    assert b["text"].shape == (8, 16) and b["text"].dtype.name == "int32"
    # ImageNet normalisation of the white background: (1 - mean) / std per channel
    corner = b["source_image"][0, 0, 0].numpy()
    np.testing.assert_allclose(corner, (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]), rtol=1e-5)
    # the target image is the one the query names
    raw = css_smoke.train.images[b["target_id"].numpy()[0]]
    np.testing.assert_allclose(b["target_image"][0].numpy()[..., 0], (raw[..., 0] / 255 - 0.485) / 0.229, atol=1e-5)
    again = next(iter(training_dataset(css_smoke, smoke_vectorizer, 8, 3, 5, 64)))
    np.testing.assert_array_equal(again["source_id"], b["source_id"])
    # resuming at step 2 yields the uninterrupted run's third batch
    resumed = next(iter(training_dataset(css_smoke, smoke_vectorizer, 8, 3, 5, 64, start_step=2)))
    np.testing.assert_array_equal(resumed["source_id"], batches[2]["source_id"])


def test_vectorizer_roundtrip(tmp_path, smoke_vectorizer):
    from keras_irtf.data.text import TextVectorizer, tokenize_py

    assert tokenize_py("Make top-left Object RED!") == ["make", "topleft", "object", "red"]
    smoke_vectorizer.save(tmp_path / "vocab.txt")
    loaded = TextVectorizer.load(tmp_path / "vocab.txt", 16)
    texts = np.array(["make top-left object red", "add ünknown wörds"])
    np.testing.assert_array_equal(loaded(texts), smoke_vectorizer(texts))
    ids = smoke_vectorizer(np.array(["zzz make"])).numpy()[0]
    assert ids[0] == 1 and ids[1] > 1 and ids[2] == 0  # OOV, word, padding


@pytest.mark.parametrize("method", ["tirg", "concat", "image_only", "text_only"])
def test_model_keras_roundtrip_gives_identical_outputs(method, css_smoke, smoke_vectorizer, tmp_path):
    cfg = tiny_config(None, f"model.composer={method}")
    model = build_model(cfg, smoke_vectorizer.vocab_size)
    model.compile(optimizer=make_optimizer(cfg))
    batch = sample_batch(css_smoke, smoke_vectorizer, cfg, batch_size=6)
    model.train_on_batch(batch)  # moves weights and BN statistics away from initialisation
    path = tmp_path / "m.keras"
    save_model(model, path)
    reloaded = load_model(path)
    for key in ("query", "target"):
        np.testing.assert_allclose(reloaded(batch)[key], model(batch)[key], rtol=1e-6, atol=1e-6)
    assert type(reloaded.composer) is type(model.composer)


def test_train_step_learns(css_smoke, smoke_vectorizer):
    cfg = tiny_config(None, "optim.learning_rate=0.05")
    model = build_model(cfg, smoke_vectorizer.vocab_size)
    model.compile(optimizer=make_optimizer(cfg))
    batch = sample_batch(css_smoke, smoke_vectorizer, cfg, batch_size=16)
    first = model.train_on_batch(batch, return_dict=True)["retrieval_loss"]
    for _ in range(15):
        last = model.train_on_batch(batch, return_dict=True)["retrieval_loss"]
    assert first > np.log(16) * 0.8  # starts near chance for 16 in-batch candidates
    assert last < 0.5 * first


@pytest.fixture(scope="module")
def smoke_run(css_smoke_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "smoke"
    cfg = tiny_config(css_smoke_root, f"train.out={out}", "train.steps=100")
    run, metrics = train(cfg, verbose=0)
    return run, metrics


def test_smoke_run_writes_the_run_folder(smoke_run):
    run, metrics = smoke_run
    for name in ("config.yaml", "vocab.txt", "model.keras", "metrics.json"):
        assert (run / name).is_file(), name
    assert any((run / "logs").rglob("events.out.tfevents*"))
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["dataset"] == "css" and saved["method"] == "tirg" and saved["steps"] == 100
    assert set(saved["test"]) >= {"R@1", "R@5", "R@10", "R@50"} and saved["train_seconds"] > 0
    assert saved["whm"]["alpha"] == 0.5 and 0 <= saved["whm"]["value"] <= 1


def test_smoke_run_beats_chance(smoke_run, css_smoke):
    _, metrics = smoke_run
    gallery = css_smoke.test.num_images - 1  # the source is excluded
    chance_r5 = 5 / gallery
    assert metrics["test"]["R@5"] > 4 * chance_r5, metrics["test"]
    assert metrics["train"]["R@5"] > 4 * chance_r5, metrics["train"]


def test_evaluate_tool_reproduces_the_run(smoke_run, tmp_path):
    run, metrics = smoke_run
    out = tmp_path / "re.json"
    r = subprocess.run([sys.executable, "tools/evaluate.py", "--run", str(run), "--out", str(out), "--quiet",
                        "--alpha", "1.0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    again = json.loads(out.read_text())
    assert again["test"] == metrics["test"] and again["train"] == metrics["train"]
    ms, mt = again["whm"]["Ms"], again["whm"]["Mt"]
    assert again["whm"]["alpha"] == 1.0
    assert again["whm"]["value"] == pytest.approx(2 * ms * mt / (ms + mt))
    r = subprocess.run([sys.executable, "tools/evaluate.py", "--run", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "config.yaml not found" in r.stderr
