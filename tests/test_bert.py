"""Frozen BERT text encoders (TF-Hub SavedModels and keras-hub presets), the text-embedding cache,
and TIRG-BERT / ComposeAE training runs with GA on the CSS smoke set.

The BERT models are tiny random ones written to temporary folders (keras_irtf.testing.tiny_bert) with the
real interfaces: a tensorflow-text BertTokenizer preprocessing SavedModel + an encoder SavedModel
with BERT's signature, and a keras-hub BertBackbone preset saved with save_to_preset.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_irtf.config import ConfigError
from keras_irtf.layers.bert import HubBertEncoder, KerasHubBertEncoder
from keras_irtf.data.text_cache import TextEmbeddingCache, prepare_text_input, texts_of_run
from keras_irtf.testing.tiny_bert import make_tiny_hub_bert, make_tiny_keras_hub_bert
from tests.conftest import tiny_config

HIDDEN = 24  # the tiny models' pooled width (768 for real BERT-Base: model.text_encoder.dim)
TEXTS = ["add red cube to top-left", "remove blue sphere", "make yellow cylinder big!"]


@pytest.fixture(scope="session")
def run_texts(css_smoke):
    return texts_of_run(css_smoke)


@pytest.fixture(scope="session")
def hub_bert(tmp_path_factory, run_texts):
    return make_tiny_hub_bert(tmp_path_factory.mktemp("hub_bert"), run_texts, hidden_size=HIDDEN)


@pytest.fixture(scope="session")
def keras_hub_bert(tmp_path_factory, run_texts):
    return make_tiny_keras_hub_bert(tmp_path_factory.mktemp("kh_bert") / "preset", run_texts, hidden_size=HIDDEN)


def bert_overrides(source, hub_bert, keras_hub_bert):
    if source == "bert_hub":
        pre, enc = hub_bert
        return ["model.text_encoder=bert_hub", f"model.text_encoder.preprocess={pre}", f"model.text_encoder.encoder={enc}",
                f"model.text_encoder.dim={HIDDEN}", "model.text_encoder.seq_length=32"]
    return ["model.text_encoder=bert_keras_hub", f"model.text_encoder.preset={keras_hub_bert}", f"model.text_encoder.dim={HIDDEN}",
            "model.text_encoder.seq_length=32"]


# ---- the layers ---------------------------------------------------------------------------------
def test_hub_layer_outputs_config_and_graph_mode(hub_bert):
    pre, enc = hub_bert
    layer = HubBertEncoder(pre, enc, output_dim=HIDDEN)
    out = layer(tf.constant(TEXTS))
    assert out.shape == (3, HIDDEN) and np.all(np.isfinite(out))
    assert not np.allclose(out[0], out[1])  # different texts, different embeddings
    assert layer.trainable_weights == [] and not layer.trainable
    config = layer.get_config()
    assert config["preprocess_handle"] == pre and config["encoder_handle"] == enc
    clone = HubBertEncoder.from_config(config)
    np.testing.assert_allclose(clone(tf.constant(TEXTS)), out, rtol=1e-6, atol=1e-6)
    assert keras.saving.serialize_keras_object(layer)["registered_name"] == "keras_irtf>HubBertEncoder"
    # raw strings inside a tf.function (what an exported serving signature does)
    graph = tf.function(lambda s: layer(s), input_signature=[tf.TensorSpec([None], tf.string)])
    np.testing.assert_allclose(graph(tf.constant(TEXTS)), out, rtol=1e-6, atol=1e-6)
    # a shorter sequence length packs the same (short) texts identically
    short = HubBertEncoder(pre, enc, output_dim=HIDDEN, seq_length=16)
    np.testing.assert_allclose(short(tf.constant(TEXTS)), out, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="model.text_encoder.dim"):
        HubBertEncoder(pre, enc, output_dim=768)(tf.constant(TEXTS))


def test_hub_layer_exports_in_a_saved_model(hub_bert, tmp_path):
    """The preprocessing (tensorflow-text ops) and the encoder go inside an exported SavedModel."""
    pre, enc = hub_bert
    layer = HubBertEncoder(pre, enc, output_dim=HIDDEN)
    expected = layer(tf.constant(TEXTS))
    archive = keras.export.ExportArchive()
    archive.track(layer)
    archive.add_endpoint("embed_text", lambda s: layer(s), input_signature=[tf.TensorSpec([None], tf.string)])
    archive.write_out(str(tmp_path / "exported"), verbose=False)
    reloaded = tf.saved_model.load(str(tmp_path / "exported"))
    np.testing.assert_allclose(reloaded.embed_text(tf.constant(TEXTS)), expected, rtol=1e-6, atol=1e-6)


def test_keras_hub_layer(keras_hub_bert):
    layer = KerasHubBertEncoder(keras_hub_bert, output_dim=HIDDEN, seq_length=32)
    out = layer(tf.constant(TEXTS))
    assert out.shape == (3, HIDDEN) and not np.allclose(out[0], out[2])
    assert layer.trainable_weights == [] and len(layer.non_trainable_weights) > 0  # frozen backbone
    assert layer.get_config()["preset"] == keras_hub_bert
    graph = tf.function(lambda s: layer(s))
    np.testing.assert_allclose(graph(tf.constant(TEXTS)), out, rtol=1e-5, atol=1e-5)


def test_urls_and_missing_folders_are_clear_errors(tmp_path, hub_bert):
    pre, enc = hub_bert
    with pytest.raises(ValueError, match="is a URL.*never downloads.*model.text_encoder.encoder="):
        HubBertEncoder(pre, "https://tfhub.dev/tensorflow/bert_en_uncased_L-12_H-768_A-12/4")
    with pytest.raises(ValueError, match="does not exist.*text_encoder.preprocess="):
        HubBertEncoder(str(tmp_path / "nowhere"), enc)
    with pytest.raises(ValueError, match="has no saved_model.pb"):
        HubBertEncoder(str(tmp_path), enc)
    # a bare keras-hub preset name is not a folder: never fetched, the error says how to make one
    with pytest.raises(ValueError, match="does not exist.*save_to_preset"):
        KerasHubBertEncoder("bert_base_en_uncased")
    from keras_irtf.experiment import build_model

    with pytest.raises(ConfigError, match="model.text_encoder.preset.*not set"):
        build_model(tiny_config(None, "model.text_encoder=bert_keras_hub"), 0)
    with pytest.raises(ConfigError, match="model.text_encoder"):
        tiny_config(None, "model.text_encoder=bert")


# ---- the cache ----------------------------------------------------------------------------------
def test_cache_embeds_each_text_once_and_matches_the_uncached_path(hub_bert, run_texts):
    pre, enc = hub_bert
    layer = HubBertEncoder(pre, enc, output_dim=HIDDEN)
    cache = TextEmbeddingCache(layer, batch_size=64)
    texts = run_texts + run_texts[:10]  # duplicates are embedded once
    assert cache.add(texts) == len(run_texts)
    assert cache.texts_encoded == len(run_texts)
    assert cache.encoder_batches == layer.encoder_runs == math.ceil(len(run_texts) / 64)
    assert cache.add(run_texts[5:20]) == 0 and layer.encoder_runs == cache.encoder_batches  # nothing re-run
    vectorizer = cache.vectorizer()
    sample = [run_texts[7], run_texts[0], run_texts[7]]
    ids = vectorizer(tf.constant(sample)).numpy()
    assert list(ids) == list(cache.ids(sample)) and ids[0] == ids[2]
    layer.attach_cache(cache)
    cached = layer(tf.constant(ids))
    runs = layer.encoder_runs
    np.testing.assert_allclose(cached, layer.encode_strings(tf.constant(sample)), rtol=1e-6, atol=1e-6)
    assert layer.encoder_runs == runs + 1  # only the explicit uncached call ran BERT
    with pytest.raises(tf.errors.InvalidArgumentError, match="missing from the BERT embedding cache"):
        vectorizer(tf.constant(["a text never cached"]))
    fresh = HubBertEncoder(pre, enc, output_dim=HIDDEN)
    with pytest.raises(ValueError, match="no text-embedding cache"):
        fresh(tf.constant([0, 1]))


def _fit(cfg, dataset, steps):
    from keras_irtf.data.pipeline import training_dataset
    from keras_irtf.experiment import build_model, make_optimizer

    model = build_model(cfg, 0)
    vectorizer = prepare_text_input(model.text_encoder, texts_of_run(dataset), cfg.model.text_encoder.cache)
    model.compile(optimizer=make_optimizer(cfg))
    ds = training_dataset(dataset, vectorizer, cfg.train.batch_size, steps, 0, cfg.data.image_size)
    runs = model.text_encoder.encoder_runs
    history = model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0)
    return model, model.text_encoder.encoder_runs - runs, history.history


def test_python_api_with_a_bert_config(css_smoke_root, hub_bert, keras_hub_bert, tmp_path):
    """load_benchmark -> create_model -> fit -> evaluate -> save_run -> reload, with a frozen
    BERT text encoder (raw strings through the text-embedding cache)."""
    import keras_irtf as kirtf

    cfg = tiny_config(css_smoke_root, *bert_overrides("bert_hub", hub_bert, keras_hub_bert),
                      "data.train_recall_queries=16", "train.batch_size=8")
    bench = kirtf.load_benchmark(cfg)
    assert bench.vectorizer is None and bench.text_input_kind == "strings"
    model = kirtf.create_model(cfg, bench)
    assert len(model.text_encoder.cache) == len(texts_of_run(bench.dataset))  # create_model filled it
    batch = next(iter(bench.train_dataset(steps=2)))
    assert batch["text"].dtype.is_integer  # cache row ids, not strings
    history = model.fit(bench.train_dataset(steps=2), epochs=1, steps_per_epoch=2, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    metrics = bench.evaluate(model, verbose=False)
    assert 0.0 <= metrics["test"]["R@1"] <= 1.0 and metrics["whm"]["value"] > 0
    run = kirtf.save_run(model, cfg, bench, tmp_path / "run")
    assert not (run / "vocab.txt").exists()  # BERT tokenises itself
    from keras_irtf.experiment import evaluate_run

    again = evaluate_run(run, out=tmp_path / "again.json", verbose=False)
    assert again["test"] == pytest.approx(metrics["test"], abs=1e-6)


def test_training_steps_never_rerun_bert_with_the_cache(css_smoke, hub_bert, keras_hub_bert):
    """Counter of encoder runs: 0 during training with the cache, one per step without it."""
    base = bert_overrides("bert_hub", hub_bert, keras_hub_bert) + ["model.composer=tirg", "ga.methods=adversarial"]
    cached, runs_cached, _ = _fit(tiny_config(None, *base), css_smoke, 3)
    assert runs_cached == 0
    assert len(cached.text_encoder.cache) == len(texts_of_run(css_smoke))
    uncached, runs_uncached, hist = _fit(tiny_config(None, *base, "model.text_encoder.cache=false"), css_smoke, 3)
    assert runs_uncached == 3 and np.isfinite(hist["loss"][-1])


# ---- TIRG-BERT and ComposeAE training runs, GA on ---------------------------------------------------
@pytest.mark.parametrize("method,source,point", [
    ("tirg", "bert_hub", "input"),
    ("composeae", "bert_keras_hub", "input"),
    pytest.param("composeae", "bert_hub", "text_feature", marks=pytest.mark.slow),
    pytest.param("tirg", "bert_keras_hub", "image_feature", marks=pytest.mark.slow),
])
def test_train_with_bert_and_ga(method, source, point, css_smoke_root, hub_bert, keras_hub_bert, tmp_path):
    from keras_irtf.data.css import CSSDataset
    from keras_irtf.experiment import load_model
    from keras_irtf.training.loop import train

    cfg = tiny_config(
        css_smoke_root, *bert_overrides(source, hub_bert, keras_hub_bert), f"model.composer={method}",
        "ga.methods=adversarial,isotropic", f"ga.point={point}", "ga.adversarial.eps=0.01", "loss.eta=0.001",
        "train.steps=3", "train.steps_per_epoch=3", "data.train_recall_queries=64", f"train.out={tmp_path / 'run'}",
    )
    run, metrics = train(cfg, verbose=0)
    losses = metrics["final_losses"]
    assert losses["ga_adversarial"] > 0 and np.isfinite(losses["loss"])
    if method == "composeae":
        assert losses["rotational_symmetry_loss"] > 0 and losses["reconstruction_text_loss"] > 0
    # BERT ran only to fill the cache (batches of 256 texts), never inside a step or the evaluation
    assert metrics["text_cache_size"] == len(texts_of_run(CSSDataset(css_smoke_root, verbose=False)))
    assert metrics["bert_encoder_runs"] == math.ceil(metrics["text_cache_size"] / 256)
    assert 0.0 <= metrics["test"]["R@1"] <= 1.0

    # tools/evaluate.py's path: reload the run (BERT from its local folders), new cache, same recall
    from keras_irtf.experiment import evaluate_run

    again = evaluate_run(run, out=tmp_path / "re.json", verbose=False)
    assert again["test"]["R@1"] == pytest.approx(metrics["test"]["R@1"], abs=1e-6)

    # the saved model reloads BERT from its local folders and embeds raw strings as the cache did
    model = load_model(run / "model.keras")
    dataset = CSSDataset(css_smoke_root, verbose=False)
    q = dataset.test.test_queries.subset(np.arange(6))
    from keras_irtf.data.pipeline import queries_dataset
    from keras_irtf.data.text_cache import raw_texts

    batch = next(iter(queries_dataset(dataset.test, q, raw_texts, 6, cfg.data.image_size, with_target=False)))
    from_strings = model.embed_queries(batch["source_image"], batch["text"])
    vectorizer = prepare_text_input(model.text_encoder, [str(t) for t in q.texts])
    from_cache = model.embed_queries(batch["source_image"], vectorizer(batch["text"]))
    np.testing.assert_allclose(from_cache, from_strings, rtol=1e-5, atol=1e-5)

    # export: the BERT preprocessing and encoder go inside the SavedModel (raw text in)
    from keras_irtf.serving.export import export_model, images_from_bytes, image_preprocessing_for

    version = export_model(model, cfg, tmp_path / "exported", run_dir=run, verbose=False)
    served = tf.saved_model.load(str(version))
    png = tf.io.encode_png(tf.cast(np.random.default_rng(0).integers(0, 255, (64, 64, 3)), tf.uint8))
    texts = tf.constant([str(q.texts[0]), str(q.texts[1])])
    out = served.serving_default(image_bytes=tf.stack([png, png]), text=texts)["embedding"]
    images = images_from_bytes(tf.stack([png, png]), image_preprocessing_for(cfg, run))
    np.testing.assert_allclose(out, model.embed_queries(images, texts), rtol=1e-4, atol=1e-4)
    assert not np.allclose(out[0], out[1])  # the two texts are read

