"""What a first run on real data meets: the frozen-feature store keyed on content (a copied preset
or a moved dataset keeps its features, a changed weight does not), the training recall Ms on a
small set of triplets (each query once, the count recorded), and errors that name the model family
asked for and the `hub` extra when keras-hub is missing."""

import os
import shutil
import sys

import numpy as np
import pytest

from keras_irtf.config import ConfigError, load_config, repo_configs_dir
from keras_irtf.testing.cir_fixtures import write_cirr, write_fashioniq, write_triplets

FROZEN = ["train.batch_size=4", "eval.batch_size=8", "data.train_recall_queries=16"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    pytest.importorskip("keras_hub")
    from keras_irtf.testing.tiny_clip import make_tiny_clip_preset, make_tiny_siglip_preset

    root = tmp_path_factory.mktemp("first_contact")
    out = {"root": root, "triplets": root / "triplets"}
    write_triplets(out["triplets"])
    out["clip"] = make_tiny_clip_preset(root / "presets" / "clip_tiny")
    out["siglip"] = make_tiny_siglip_preset(root / "presets" / "siglip_tiny")
    return out


def _experiment(data_root, preset, store, family="clip"):
    from keras_irtf.experiment import Experiment

    items = ["data.dataset=triplets", f"data.root={data_root}", f"model.clip_preset={preset}",
             f"data.feature_cache={store}", *FROZEN]
    if family != "clip":
        items += [f"model.image_encoder={family}", f"model.text_encoder={family}"]
    return Experiment(load_config([repo_configs_dir() / "fashioniq_combiner.yaml"], items), verbose=False)


def _caches(data_root, preset, store):
    """(image feature cache, text embedding cache) of a run's model, filled from `store`."""
    model = _experiment(data_root, preset, store).create_model(compile=False)
    return model.image_encoder.cache, model.text_encoder.cache


def _change_one_vision_weight(preset):
    import h5py

    with h5py.File(os.path.join(preset, "model.weights.h5"), "r+") as f:
        w = f["layers/clip_vision_encoder/layers/clip_vision_embedding/patch_embedding/vars/0"]
        value = w[...]
        value.flat[0] += 0.5
        w[...] = value


# ---- the frozen-feature store: keyed on what the features are, not on where files are ----------
def test_a_copied_preset_reuses_the_store_and_a_changed_weight_does_not(work, tmp_path):
    store = tmp_path / "features"
    images, texts = _caches(work["triplets"], work["clip"], store)
    n, t = len(images._table), len(texts)
    assert n > 0 and images.images_encoded == n and images.images_from_store == 0
    assert texts.texts_encoded == t > 0 and texts.texts_from_store == 0

    # the same preset copied elsewhere, under another folder name: nothing is encoded again
    copy = shutil.copytree(work["clip"], tmp_path / "elsewhere" / "my_copy_of_clip")
    images2, texts2 = _caches(work["triplets"], copy, store)
    assert images2.images_encoded == 0 and images2.images_from_store == n
    assert texts2.texts_encoded == 0 and texts2.texts_from_store == t
    assert images2.fingerprint == images.fingerprint
    np.testing.assert_array_equal(images2._table, images._table)

    # one weight of the vision tower changed in the copy: every image is encoded again (the
    # text tower is unchanged, so its stored features still serve)
    _change_one_vision_weight(copy)
    images3, texts3 = _caches(work["triplets"], copy, store)
    assert images3.images_encoded == n and images3.images_from_store == 0
    assert images3.fingerprint != images.fingerprint
    assert not np.allclose(images3._table, images._table)
    assert texts3.texts_encoded == 0 and texts3.texts_from_store == t


def test_a_moved_dataset_reuses_the_store(work, tmp_path):
    store = tmp_path / "features"
    first = shutil.copytree(work["triplets"], tmp_path / "data" / "triplets")
    images, _ = _caches(first, work["clip"], store)
    n = len(images._table)
    assert images.images_encoded == n > 0

    moved = tmp_path / "somewhere" / "else" / "my_triplets"
    moved.parent.mkdir(parents=True)
    os.rename(first, moved)  # what `mv` does: same files, same sizes and modification times
    again, _ = _caches(moved, work["clip"], store)
    assert again.images_encoded == 0 and again.images_from_store == n

    # a file replaced in the moved copy is encoded again, and only that one
    image = sorted((moved / "images" / "test").glob("img*.jpg"))[0]
    image.write_bytes(image.read_bytes() + b"\0")
    third, _ = _caches(moved, work["clip"], store)
    assert third.images_encoded == 1 and third.images_from_store == n - 1


def test_image_keys_are_relative_to_the_images_folder(tmp_path):
    from keras_irtf.data.base import Split
    from keras_irtf.data.feature_cache import image_keys

    def split_under(root):
        paths = [root / "a" / "x.jpg", root / "b" / "y.jpg"]
        return Split("t", ["x", "y"], np.array([0, 1]), ["x", "y"], image_paths=[str(p) for p in paths]), paths

    split, paths = split_under(tmp_path / "one")
    for i, p in enumerate(paths):
        p.parent.mkdir(parents=True)
        p.write_bytes(bytes([i]) * 10)
    before = image_keys(split)
    os.rename(tmp_path / "one", tmp_path / "two")
    after, _ = split_under(tmp_path / "two")
    assert image_keys(after) == before and len(set(before)) == 2


# ---- the training recall Ms on a small set of triplets -------------------------------------------
def _record_embeddings(monkeypatch):
    """Make the protocol embed with random vectors and record the queries it embeds per split."""
    from keras_irtf.evaluation import protocol

    seen = {}
    rng = np.random.default_rng(0)
    monkeypatch.setattr(protocol, "embed_gallery",
                        lambda model, split, ids, *a, **k: rng.normal(size=(len(ids), 8)).astype("float32"))

    def queries(model, split, q, *a, **k):
        seen[split.name] = q
        return rng.normal(size=(len(q), 8)).astype("float32")

    monkeypatch.setattr(protocol, "embed_query_set", queries)
    return seen


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory):
    from keras_irtf.data.cirr import CIRRDataset
    from keras_irtf.data.fashioniq import FashionIQDataset
    from keras_irtf.data.triplets import TripletsDataset

    root = tmp_path_factory.mktemp("small_sets")
    write_fashioniq(root / "fashioniq")
    write_cirr(root / "cirr")
    write_triplets(root / "triplets")
    return {"fashioniq": FashionIQDataset(root / "fashioniq", image_size=32, verbose=False),
            "cirr": CIRRDataset(root / "cirr", image_size=32, verbose=False),
            "triplets": TripletsDataset(root / "triplets", image_size=32, verbose=False)}


@pytest.mark.parametrize("name", ["fashioniq", "cirr", "triplets"])
def test_training_recall_takes_each_triplet_once_on_a_small_set(name, small_sets, monkeypatch):
    from keras_irtf.evaluation.protocol import evaluate

    ds = small_sets[name]
    n = ds.num_training_triplets
    seen = _record_embeddings(monkeypatch)
    out = evaluate(None, ds, None, train_queries=10000, seed=0, verbose=False)
    train = seen[ds.train.name]
    assert len(train) == n < 10000  # not 10,000 draws from a few dozen triplets
    pairs = set(zip(train.source_ids.tolist(), train.target_ids.tolist()))
    assert pairs == set(zip(ds._train_source_ids.tolist(), ds._train_target_ids.tolist())) and len(pairs) == n
    assert out["whm"]["Ms_queries"] == n  # metrics.json says how many queries Ms is over
    assert set(out["train"]) == {"R@1", "R@5", "R@10", "R@50"}  # the train block stays recalls only
    assert 0.0 <= out["train"]["R@10"] <= 1.0

    # fewer asked than there are: that many distinct ones, the same for the same seed
    out = evaluate(None, ds, None, train_queries=5, seed=3, verbose=False)
    first = seen[ds.train.name]
    assert len(first) == 5 == out["whm"]["Ms_queries"]
    assert len(set(zip(first.source_ids.tolist(), first.target_ids.tolist()))) == 5
    evaluate(None, ds, None, train_queries=5, seed=3, verbose=False)
    again = seen[ds.train.name]
    np.testing.assert_array_equal(again.source_ids, first.source_ids)
    np.testing.assert_array_equal(again.texts, first.texts)


def test_css_training_recall_is_still_every_training_query(css_smoke, monkeypatch):
    """CSS keeps TIRG's protocol: every training query against every training image, whatever
    data.train_recall_queries says."""
    from keras_irtf.evaluation.protocol import evaluate

    seen = _record_embeddings(monkeypatch)
    every = css_smoke.train_recall_queries(3, 0)
    out = evaluate(None, css_smoke, None, train_queries=3, seed=0, verbose=False)
    train = seen[css_smoke.train.name]
    assert len(train) == len(every) > 3 and out["whm"]["Ms_queries"] == len(every)
    np.testing.assert_array_equal(train.source_ids, every.source_ids)
    np.testing.assert_array_equal(train.target_ids, every.target_ids)


# ---- errors that name the family asked for, and the hub extra --------------------------------------
def test_a_siglip_preset_for_the_clip_encoders_says_how_to_use_it(work):
    from keras_irtf.layers.clip import CLIPImageEncoder, SigLIPTextEncoder

    with pytest.raises(ConfigError) as err:
        _experiment(work["triplets"], work["siglip"], work["root"] / "features").check()
    text = str(err.value)
    assert "holds a SigLIPBackbone, not a CLIPBackbone" in text and "SigLIP preset" in text
    assert "model.image_encoder=siglip" in text and "model.text_encoder=siglip" in text
    assert "CLIPBackbone.from_preset" not in text and "clip_vit_base_patch16" not in text  # no CLIP download how-to
    with pytest.raises(ConfigError, match=r"SigLIP preset.*model.image_encoder=siglip"):
        CLIPImageEncoder.from_preset(work["siglip"])
    # and the other way round
    with pytest.raises(ConfigError) as err:
        SigLIPTextEncoder.from_preset(work["clip"])
    text = str(err.value)
    assert "CLIP preset" in text and "model.text_encoder=clip" in text and "siglip_base_patch16_224" not in text


def test_a_clip_preset_as_resnet_weights_says_how_to_use_it(work):
    from keras_irtf.layers.pretrained import resolve_preset_dir

    with pytest.raises(ConfigError, match=r"CLIP preset.*model.image_encoder=clip"):
        resolve_preset_dir(work["clip"])


def test_missing_keras_hub_names_the_family_and_the_hub_extra(work, monkeypatch, tmp_path):
    from keras_irtf.layers.bert import KerasHubBertEncoder
    from keras_irtf.layers.clip import SigLIPImageEncoder
    from keras_irtf.layers.pretrained import PretrainedImageEncoder

    monkeypatch.setitem(sys.modules, "keras_hub", None)  # as if keras-hub were not installed
    install = "pip install -e '.[hub]'"
    # the start-up check stops before any work (a ConfigError: tools print it in one line)
    with pytest.raises(ConfigError) as err:
        _experiment(work["triplets"], work["siglip"], tmp_path / "features", family="siglip").check()
    assert "siglip" in str(err.value) and install in str(err.value) and "keras-hub" in str(err.value)
    # building the encoder says the same (and is an ImportError too)
    with pytest.raises(ImportError) as err:
        SigLIPImageEncoder.from_preset(work["siglip"])
    assert isinstance(err.value, ConfigError) and "siglip" in str(err.value) and install in str(err.value)
    assert "clip image" not in str(err.value).lower()
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text("{}")
    with pytest.raises(ImportError, match=r"bert_keras_hub.*" + r"pip install -e '\.\[hub\]'"):
        KerasHubBertEncoder(str(bert))
    resnet = tmp_path / "resnet"
    resnet.mkdir()
    (resnet / "config.json").write_text('{"class_name": "ResNetBackbone"}')
    (resnet / "model.weights.h5").write_bytes(b"")
    with pytest.raises(ImportError, match=r"pip install -e '\.\[hub\]'"):
        PretrainedImageEncoder.from_preset(str(resnet))
