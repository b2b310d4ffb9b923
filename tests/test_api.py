"""The Python API for user scripts (keras_irtf.api, re-exported by keras_irtf)."""

import numpy as np
import pytest

import keras_irtf as kirtf
from conftest import tiny_config


@pytest.fixture(scope="module")
def cfg(css_smoke_root):
    return tiny_config(css_smoke_root, "data.train_recall_queries=16")


@pytest.fixture(scope="module")
def bench(cfg):
    return kirtf.load_benchmark(cfg)


def test_public_names_resolve():
    for name in kirtf.__all__:
        assert getattr(kirtf, name) is not None, name
    from keras_irtf import api

    assert kirtf.load_benchmark is api.load_benchmark and kirtf.export_run is api.export_run


def test_benchmark_datasets_shapes_and_determinism(cfg, bench):
    s, L, bs = cfg.data.image_size, cfg.model.max_text_length, cfg.train.batch_size
    ds = bench.train_dataset(steps=3)
    batches = list(ds)
    assert len(batches) == 3  # exactly `steps` batches
    b = batches[0]
    assert b["source_image"].shape == (bs, s, s, 3) and b["target_image"].shape == (bs, s, s, 3)
    assert b["text"].shape == (bs, L) and b["text"].dtype.name == "int32"
    # the same seed gives the same batches; another seed does not
    again = next(iter(bench.train_dataset(steps=3)))
    np.testing.assert_array_equal(b["source_id"].numpy(), again["source_id"].numpy())
    other = next(iter(bench.train_dataset(steps=3, seed=cfg.train.seed + 1)))
    assert not np.array_equal(b["source_id"].numpy(), other["source_id"].numpy())
    # validation: the test queries in order, full batches, with targets
    val = list(bench.validation_dataset(batch_size=8))
    assert len(val) == len(bench.dataset.test.test_queries) // 8
    np.testing.assert_array_equal(val[0]["source_id"].numpy(), bench.dataset.test.test_queries.source_ids[:8])
    gallery = list(bench.gallery_dataset("test", batch_size=32))
    assert sum(len(g) for g in gallery) == bench.dataset.test.num_images
    with pytest.raises(ValueError, match="fewer than one batch"):
        bench.validation_dataset(batch_size=10_000)


def test_fit_with_user_callback_evaluate_save_load(cfg, bench, tmp_path):
    import keras

    class CountBatches(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.losses = []

        def on_train_batch_end(self, batch, logs=None):
            self.losses.append(float(logs["loss"]))

    keras.utils.set_random_seed(0)
    model = kirtf.create_model(cfg, bench)
    assert model.optimizer is not None and model.built
    counter = CountBatches()
    history = model.fit(bench.train_dataset(steps=4), epochs=2, steps_per_epoch=2, callbacks=[counter], verbose=0,
                        shuffle=False)
    assert len(counter.losses) == 4 and all(np.isfinite(counter.losses))
    assert len(history.history["loss"]) == 2

    metrics = bench.evaluate(model)
    assert set(metrics) == {"test", "train", "whm"}
    assert 0.0 <= metrics["test"]["R@1"] <= metrics["test"]["R@10"] <= 1.0

    # .keras round trip: identical embeddings
    batch = next(iter(bench.validation_dataset()))
    kirtf.save_model(model, tmp_path / "m.keras")
    loaded = kirtf.load_model(tmp_path / "m.keras")
    for fn in ("embed_queries", "embed_images"):
        args = (batch["source_image"], batch["text"]) if fn == "embed_queries" else (batch["target_image"],)
        np.testing.assert_array_equal(getattr(model, fn)(*args).numpy(), getattr(loaded, fn)(*args).numpy())

    # a saved run is what the tools read, and its vocabulary reproduces the token ids
    run = kirtf.save_run(model, cfg, bench, tmp_path / "run", metrics=metrics)
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "vocab.txt", "model.keras", "metrics.json"}
    from keras_irtf.serving.export import load_run

    cfg2, model2 = load_run(run)
    assert cfg2.to_dict() == cfg.to_dict()
    bench2 = kirtf.load_benchmark(cfg2, vocabulary=run / "vocab.txt")
    texts = list(bench.dataset.test.test_queries.texts[:5])
    np.testing.assert_array_equal(bench.vectorizer(texts).numpy(), bench2.vectorizer(texts).numpy())
    np.testing.assert_array_equal(model.embed_images(batch["target_image"]).numpy(),
                                  model2.embed_images(batch["target_image"]).numpy())


def test_create_model_uncompiled_from_vocab_size(cfg):
    model = kirtf.create_model(cfg, 50, compile=False)
    assert model.text_encoder.vocab_size == 50
    assert getattr(model, "optimizer", None) is None
