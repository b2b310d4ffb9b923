"""The frozen-feature cache: the tower runs once per image (and once ever, across runs), the
cached path computes what the pixel path computes, and what it cannot do is refused clearly."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from keras_irtf.config import ConfigError
from keras_irtf.data.feature_cache import FeatureStore, image_keys
from keras_irtf.experiment import Experiment
from keras_irtf.registry import import_modules

PLUGIN = str(__import__("pathlib").Path(__file__).parent / "plugins" / "frozen_feature_encoder.py")


def _exp(root, store, *overrides, dataset=None):
    import_modules([PLUGIN])
    cfg = tiny_config(root, "model.image_encoder=frozen_cnn", "model.embed_dim=16", f"data.feature_cache={store}",
                      "train.batch_size=8", *overrides)
    return Experiment(cfg, dataset=dataset, verbose=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    yield tmp_path_factory.mktemp("features")
    from keras_irtf import registry

    registry.IMAGE_ENCODERS._entries.pop("frozen_cnn", None)  # other tests list the built-ins only


def test_cached_features_equal_the_tower_and_are_reused_across_runs(css_smoke_root, css_smoke, store):
    exp = _exp(css_smoke_root, store, dataset=css_smoke)
    model = exp.create_model()
    cache = model.image_encoder._cache
    n = css_smoke.train.num_images + css_smoke.test.num_images
    assert cache.images_encoded == n and cache.images_from_store == 0
    assert int(model.image_encoder.tower_runs.numpy()) == n
    # a batch carries cache rows, and the model's features are the tower's on the pixels
    batch = exp.sample_batch()
    assert batch["source_image"].dtype == tf.int64 and batch["source_image"].shape == (8,)
    pixels = next(iter(Experiment(exp.cfg, dataset=css_smoke, verbose=False).train_dataset(steps=1)))
    np.testing.assert_array_equal(batch["source_id"], pixels["source_id"])
    np.testing.assert_allclose(model.embed_images(batch["target_image"]), model.embed_images(pixels["target_image"]),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.embed_queries(batch["source_image"], batch["text"]),
                               model.embed_queries(pixels["source_image"], pixels["text"]), rtol=1e-5, atol=1e-5)
    # the same loss terms on the cached and on the pixel batch
    cached_terms = model.compute_loss_terms(batch, training=False)
    pixel_terms = model.compute_loss_terms(pixels, training=False)
    assert abs(float(cached_terms["loss"]) - float(pixel_terms["loss"])) < 1e-5

    # a second run with the same encoder weights and preprocessing reads everything from the store
    exp2 = _exp(css_smoke_root, store, dataset=css_smoke)
    model2 = exp2.create_model()
    cache2 = model2.image_encoder._cache
    assert cache2.images_encoded == 0 and cache2.images_from_store == n
    assert int(model2.image_encoder.tower_runs.numpy()) == 0
    assert cache2.fingerprint == cache.fingerprint
    np.testing.assert_array_equal(cache2._table, cache._table)

    # other weights (another seed) are another fingerprint: nothing is shared
    exp3 = _exp(css_smoke_root, store, "model.image_encoder.seed=1", dataset=css_smoke)
    cache3 = exp3.create_model().image_encoder._cache
    assert cache3.fingerprint != cache.fingerprint and cache3.images_encoded == n


def test_training_and_evaluation_run_on_cached_features(css_smoke_root, css_smoke, store):
    exp = _exp(css_smoke_root, store, "ga.methods=adversarial,isotropic", "ga.point=image_feature",
               dataset=css_smoke)
    model = exp.create_model()
    assert not model.image_encoder.trainable_variables
    before = int(model.image_encoder.tower_runs.numpy())
    history = model.fit(exp.train_dataset(steps=3), epochs=1, steps_per_epoch=3, verbose=0)
    assert np.isfinite(history.history["loss"]).all() and "ga_adversarial" in " ".join(history.history)
    metrics = exp.evaluate(model, verbose=False)
    assert 0.0 <= metrics["test"]["R@1"] <= 1.0
    assert int(model.image_encoder.tower_runs.numpy()) == before  # the tower never ran again
    # evaluation on pixels gives the same recalls (the cache only saves time)
    exp.image_input = None
    assert exp.evaluate(model, verbose=False)["test"] == metrics["test"]


def test_pixel_gradients_are_refused_on_cached_features(css_smoke_root, store):
    exp = _exp(css_smoke_root, store, "ga.methods=adversarial")  # ga.point=input by default
    with pytest.raises(ConfigError, match=r"ga.point=image_feature.*cache=false"):
        exp.create_model()
    # without the cache the tower runs on pixels and GA^A at the input is available
    _exp(css_smoke_root, store, "ga.methods=adversarial", "model.image_encoder.frozen_cnn.cache=false").check_feature_cache()


def test_store_keeps_committed_rows_after_an_interrupted_append(tmp_path):
    s = FeatureStore(tmp_path, "fp", dim=3)
    s.append(["a", "b"], np.arange(6, dtype=np.float32).reshape(2, 3))
    # an interrupted append: rows written, the key line torn
    with open(s.rows_path, "ab") as f:
        f.write(np.ones(3, np.float32).tobytes())
    with open(s.keys_path, "a") as f:
        f.write("c")
    fresh = FeatureStore(tmp_path, "fp", dim=3)
    assert len(fresh) == 2 and list(fresh.lookup(["a", "b", "c"])) == [0, 1, -1]
    np.testing.assert_array_equal(fresh.read([1]), [[3, 4, 5]])
    assert fresh.append(["c", "a"], np.full((2, 3), 7, np.float32)) == 1
    again = FeatureStore(tmp_path, "fp", dim=3)
    assert list(again.lookup(["a", "b", "c"])) == [0, 1, 2]
    np.testing.assert_array_equal(again.read([2, 0]), [[7, 7, 7], [0, 1, 2]])
    assert s.keys_path.read_text() == "a\nb\nc\n"


def test_image_keys_follow_the_file(tmp_path):
    from keras_irtf.data.base import Split

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"x")
    b.write_bytes(b"y")
    split = Split("t", ["a", "b"], np.array([0, 1]), ["a", "b"], image_paths=[str(a), str(b)])
    k1 = image_keys(split)
    assert len(set(k1)) == 2
    b.write_bytes(b"yy")  # a replaced file is a new key; the other keeps its own
    k2 = image_keys(split)
    assert k2[0] == k1[0] and k2[1] != k1[1]


def test_store_writes_a_repeated_key_once_and_reads_past_a_torn_row(tmp_path):
    s = FeatureStore(tmp_path, "fp", dim=2)
    # identical images (CSS has byte-identical scenes) give the same key twice in one append
    assert s.append(["a", "a", "b"], np.array([[1, 1], [9, 9], [2, 2]], np.float32)) == 2
    assert s.append(["c"], np.array([[3, 3]], np.float32)) == 1
    fresh = FeatureStore(tmp_path, "fp", dim=2)
    np.testing.assert_array_equal(fresh.read(fresh.lookup(["a", "b", "c"])), [[1, 1], [2, 2], [3, 3]])
    # another run appending (or a killed one) leaves half a row: readers still read whole rows
    with open(s.rows_path, "ab") as f:
        f.write(b"\x00\x00")
    fresh = FeatureStore(tmp_path, "fp", dim=2)
    np.testing.assert_array_equal(fresh.read(fresh.lookup(["c", "a"])), [[3, 3], [1, 1]])
    assert fresh.append(["d"], np.array([[4, 4]], np.float32)) == 1
    again = FeatureStore(tmp_path, "fp", dim=2)
    np.testing.assert_array_equal(again.read(again.lookup(["a", "b", "c", "d"])), [[1, 1], [2, 2], [3, 3], [4, 4]])


def test_an_interrupted_fill_keeps_what_it_encoded(css_smoke_root, css_smoke, tmp_path, monkeypatch):
    """The fill stores rows as it goes: a fill killed after two batches leaves them in the store,
    and the next run encodes only the rest."""
    import keras_irtf.data.feature_cache as feature_cache
    from keras_irtf.data.feature_cache import ImageFeatureCache

    exp = _exp(css_smoke_root, tmp_path, dataset=css_smoke)
    model = exp.build_model(exp.build_text_input())
    real = feature_cache.images_dataset  # the name the cache calls

    def two_batches_then_killed(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(feature_cache, "images_dataset", two_batches_then_killed)
    cache = ImageFeatureCache(model.image_encoder, exp.preprocessor, tmp_path, batch_size=8, verbose=False)
    cache.flush_every = 4
    with pytest.raises(KeyboardInterrupt):
        cache.add_splits({"train": css_smoke.train})
    keys = image_keys(css_smoke.train)
    first = set(keys[:16])  # the two batches (identical scenes share a key)
    assert len(cache.store) == len(first)
    monkeypatch.setattr(feature_cache, "images_dataset", real)
    again = ImageFeatureCache(model.image_encoder, exp.preprocessor, tmp_path, batch_size=8, verbose=False)
    again.add_splits({"train": css_smoke.train})
    reused = sum(k in first for k in keys)
    assert again.images_from_store == reused >= 16 and again.images_encoded == len(keys) - reused
    full = ImageFeatureCache(model.image_encoder, exp.preprocessor, None, batch_size=8, verbose=False)
    full.add_splits({"train": css_smoke.train})
    np.testing.assert_allclose(again._table, full._table, rtol=1e-6, atol=1e-6)

