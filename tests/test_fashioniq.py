"""FashionIQ in its published layout: caption joining, the training-text modes and sampler, the
per-category protocol pinned against a hand-computed table, malformed files and images, and a
short training + evaluation run."""

import json
import os
import shutil

import numpy as np
import pytest

from keras_irtf.config import ConfigError, load_config
from keras_irtf.data.base import DatasetError
from keras_irtf.data.fashioniq import (FashionIQConfig, FashionIQDataset, average_of_reported, caption_variants,
                                       join_captions)
from keras_irtf.data.safe_files import UnsafeFileError
from keras_irtf.testing.cir_fixtures import patch_embeddings, ranking_embeddings, tiny_run_overrides, write_fashioniq


@pytest.fixture(scope="module")
def fiq_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fiq") / "fashionIQ_dataset"
    write_fashioniq(root)
    return root


@pytest.fixture(scope="module")
def fiq(fiq_root):
    return FashionIQDataset(fiq_root, image_size=32, verbose=False)


@pytest.fixture
def fiq_copy(fiq_root, tmp_path):
    root = tmp_path / "fiq"
    shutil.copytree(fiq_root, root)
    return root


def test_caption_join_of_clip4cir():
    assert join_captions("is darker.", " has a collar,") == "Is darker and has a collar"
    # capitalize() lower-cases the rest of the first caption; the second is only stripped
    assert join_captions("Is RED?", "Has A Print. ") == "Is red and Has A Print"
    assert caption_variants("is darker.", "has stripes", "joined") == ["Is darker and has stripes"]
    assert caption_variants("is darker.", "has stripes", "both_orders") == [
        "Is darker and has stripes", "Has stripes and is darker"]
    assert caption_variants("is darker.", "has stripes", "randomized") == [
        "Is darker and has stripes", "Has stripes and is darker", "Is darker", "Has stripes"]


def test_reads_the_layout_val_is_the_test_split(fiq):
    # 3 categories x 8 training images, each named by one training triplet
    assert fiq.train.num_images == 24 and fiq.num_training_triplets == 24
    # every image of split.<cat>.val.json (6 a category), including the one no caption names
    assert fiq.test.num_images == 18 and len(fiq.test.test_queries) == 15
    assert fiq.test.captions[:6] == [f"dress_va{k:02d}" for k in range(6)]
    assert {c: g.tolist() for c, g in fiq.galleries.items()} == {
        "dress": list(range(6)), "shirt": list(range(6, 12)), "toptee": list(range(12, 18))}
    q = fiq.test.test_queries
    assert q.texts[0] == "Is darker and has longer sleeves"
    assert [fiq.test.captions[i] for i in q.source_ids[:5]] == [f"dress_va{k:02d}" for k in range(5)]
    assert [fiq.test.captions[i] for i in q.target_ids[:5]] == ["dress_va01", "dress_va02", "dress_va03",
                                                               "dress_va04", "dress_va00"]
    # each image is its own identity: the target caption is the target's name
    assert [fiq.test.caption_vocab[c] for c in q.target_captions] == [fiq.test.captions[i] for i in q.target_ids]
    assert list(fiq.query_categories) == ["dress"] * 5 + ["shirt"] * 5 + ["toptee"] * 5


@pytest.mark.parametrize("mode,per_triplet", [("joined", 1), ("both_orders", 2), ("randomized", 4)])
def test_training_texts_list_everything_the_sampler_draws(fiq_root, mode, per_triplet):
    settings = FashionIQConfig(train_captions=mode)
    ds = FashionIQDataset(fiq_root, settings=settings, image_size=32, verbose=False)
    assert ds._train_texts.shape == (24, per_triplet)
    q = ds.sample_training_queries(6000, np.random.default_rng(3))
    assert set(q.texts) == set(ds.training_texts())
    # triplet 0 of dress: "is darker." / "has longer sleeves.", each variant drawn about equally
    first = (q.source_ids == 0)
    drawn = {t: int((q.texts[first] == t).sum()) for t in set(q.texts[first])}
    assert set(drawn) == set(caption_variants("is darker.", "has longer sleeves.", mode))
    assert min(drawn.values()) > 0.6 * first.sum() / per_triplet
    # triplets uniformly, targets their own
    counts = np.bincount(q.source_ids, minlength=24)
    assert counts.min() > 180 and counts.max() < 330
    assert all(ds.train.captions[t] == f"{ds.train.captions[s][:-2]}{(int(ds.train.captions[s][-2:]) + 1) % 8:02d}"
               for s, t in zip(q.source_ids[:50], q.target_ids[:50]))
    again = ds.sample_training_queries(6000, np.random.default_rng(3))
    assert np.array_equal(q.source_ids, again.source_ids) and list(q.texts) == list(again.texts)


def test_per_category_table_hand_computed(fiq, monkeypatch):
    from keras_irtf.evaluation.protocol import evaluate_split

    # rankings (image ids; dress 0-5, shirt 6-11, toptee 12-17), each query's target rank in its
    # category's gallery, reference kept: dress [1, 2, 3, 4, 6], shirt [1, 1, 1, 2, 5], toptee [6, 6, 3, 1, 2]
    orders = [
        [6, 1],  # dress 0 -> 1; the best image is a shirt, outside the dress gallery: rank 1
        [1, 2],  # dress 1 -> 2; its own reference first (kept): rank 2
        [0, 1, 3], [0, 1, 2, 4], [1, 2, 3, 4, 5, 0],
        [7], [8], [9], [9, 10], [7, 8, 9, 10, 6],  # shirt; 9 -> 10 with the reference first: rank 2
        [12, 14, 15, 16, 17, 13], [12, 13, 15, 16, 17, 14], [12, 13, 15], [16], [13, 12],
    ]
    images, queries = ranking_embeddings(orders, 18)
    patch_embeddings(monkeypatch, images, queries)
    r = evaluate_split(None, fiq, None, "test", fiq.test.test_queries, ks=(1, 2, 3, 5, 10), verbose=False)
    expected = {
        "dress": {1: 1 / 5, 2: 2 / 5, 3: 3 / 5, 5: 4 / 5, 10: 1.0},
        "shirt": {1: 3 / 5, 2: 4 / 5, 3: 4 / 5, 5: 1.0, 10: 1.0},
        "toptee": {1: 1 / 5, 2: 2 / 5, 3: 3 / 5, 5: 3 / 5, 10: 1.0},
    }
    for c, table in expected.items():
        for k, v in table.items():
            assert r[f"{c}_R@{k}"] == pytest.approx(v), (c, k)
    assert r["R@1"] == pytest.approx(1 / 3) and r["R@2"] == pytest.approx(1.6 / 3)
    assert r["R@3"] == pytest.approx(2 / 3) and r["R@5"] == pytest.approx(0.8) and r["R@10"] == 1.0
    assert set(r) == {f"{p}R@{k}" for p in ("", "dress_", "shirt_", "toptee_") for k in (1, 2, 3, 5, 10)}
    assert all(isinstance(v, float) for v in r.values())
    assert average_of_reported({"R@10": 0.3, "R@50": 0.6}) == {"avg_R@10_R@50": pytest.approx(0.45)}


def test_categories_setting_and_its_choices(fiq_root):
    cfg = load_config([], ["data.dataset=fashioniq", "data.dataset.categories=dress,toptee",
                           "data.dataset.train_captions=randomized"])
    assert cfg.data.dataset.categories == ("dress", "toptee")
    ds = FashionIQDataset(fiq_root, settings=cfg.data.dataset.settings, image_size=32, verbose=False)
    assert ds.categories == ("dress", "toptee") and set(ds.galleries) == {"dress", "toptee"}
    assert ds.train.num_images == 16 and len(ds.test.test_queries) == 10 and ds._train_texts.shape[1] == 4
    assert not any(c.startswith("shirt") for c in ds.test.captions)
    with pytest.raises(ConfigError, match=r"data.dataset.categories\[1\]='coat': expected items among"):
        load_config([], ["data.dataset=fashioniq", "data.dataset.categories=[dress,coat]"])
    with pytest.raises(ConfigError, match=r"train_captions='shuffled': expected one of"):
        load_config([], ["data.dataset=fashioniq", "data.dataset.train_captions=shuffled"])
    with pytest.raises(ConfigError, match="names a category twice"):
        load_config([], ["data.dataset=fashioniq", "data.dataset.categories=[dress,dress]"])


def test_malformed_files_are_named(fiq_copy):
    cap = fiq_copy / "captions" / "cap.shirt.train.json"
    good = cap.read_text()
    cap.write_text('[\n {"candidate": "shirt_tr00",\n')
    with pytest.raises(DatasetError, match=r"cap.shirt.train.json, line 3, column 1: not valid JSON"):
        FashionIQDataset(fiq_copy, image_size=32, verbose=False)
    cap.write_text(good)
    val = fiq_copy / "captions" / "cap.dress.val.json"
    entries = json.loads(val.read_text())
    del entries[1]["target"]
    val.write_text(json.dumps(entries))
    with pytest.raises(DatasetError, match=r"cap.dress.val.json, entry 1: missing key 'target'"):
        FashionIQDataset(fiq_copy, image_size=32, verbose=False)
    entries[1]["target"] = "dress_va02"
    entries[2]["captions"] = ["only one"]
    val.write_text(json.dumps(entries))
    with pytest.raises(DatasetError, match=r"entry 2: key 'captions' must be a list of two strings"):
        FashionIQDataset(fiq_copy, image_size=32, verbose=False)
    (fiq_copy / "image_splits" / "split.toptee.val.json").unlink()
    with pytest.raises(DatasetError, match=r"split.toptee.val.json not found.*github.com/XiaoxiaoGuo/fashion-iq"):
        FashionIQDataset.check(FashionIQConfig(), load_config([], [f"data.root={fiq_copy}"]))


def test_missing_ambiguous_and_escaping_images(fiq_copy, tmp_path):
    (fiq_copy / "images" / "dress_va03.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 FashionIQ image\(s\) not found in .*images: dress_va03"):
        FashionIQDataset(fiq_copy, image_size=32, verbose=False)
    ds = FashionIQDataset(fiq_copy, image_size=32, on_bad_image="skip", verbose=False)
    # dress queries 2 -> 3 and 3 -> 4 need it; the dress gallery loses it
    assert len(ds.test.test_queries) == 13 and ds.dropped_queries["test"] == 2
    assert [ds.test.captions[i] for i in ds.galleries["dress"]] == ["dress_va00", "dress_va01", "dress_va02",
                                                                     "dress_va04", "dress_va05"]
    shutil.copy(fiq_copy / "images" / "dress_va00.jpg", fiq_copy / "images" / "dress_va00.png")
    with pytest.raises(DatasetError, match=r"image 'dress_va00' is ambiguous: .* dress_va00.jpg, dress_va00.png"):
        FashionIQDataset(fiq_copy, image_size=32, on_bad_image="skip", verbose=False)
    (fiq_copy / "images" / "dress_va00.png").unlink()
    outside = tmp_path / "elsewhere.jpg"
    shutil.copy(fiq_copy / "images" / "dress_va01.jpg", outside)
    (fiq_copy / "images" / "dress_va01.jpg").unlink()
    os.symlink(outside, fiq_copy / "images" / "dress_va01.jpg")
    with pytest.raises(UnsafeFileError, match=r"outside the dataset root"):
        FashionIQDataset(fiq_copy, image_size=32, verbose=False)


def test_other_image_extensions(tmp_path):
    write_fashioniq(tmp_path / "png", categories=("shirt",), train_images=4, val_images=3, extension=".png")
    ds = FashionIQDataset(tmp_path / "png", settings=FashionIQConfig(categories=("shirt",)), image_size=32,
                          verbose=False)
    assert all(p.endswith(".png") for p in ds.train.image_paths + ds.test.image_paths)
    assert ds.test.num_images == 3 and len(ds.test.test_queries) == 2


@pytest.mark.slow
def test_train_and_evaluate_end_to_end(fiq_root):
    from keras_irtf.experiment import Experiment

    cfg = load_config([], tiny_run_overrides("fashioniq", fiq_root))
    exp = Experiment(cfg, verbose=False)
    model = exp.create_model()
    history = model.fit(exp.train_dataset(), epochs=1, steps_per_epoch=3, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    metrics = exp.evaluate(model)
    test = metrics["test"]
    keys = {f"{p}R@{k}" for p in ("", "dress_", "shirt_", "toptee_") for k in (1, 5, 10, 50)}
    assert set(test) == keys | {"avg_R@10_R@50"}
    assert all(0.0 <= v <= 1.0 for v in test.values())
    # six images a category gallery, the reference kept: the target is always within the top 10
    assert test["R@10"] == 1.0 and test["dress_R@50"] == 1.0 and test["avg_R@10_R@50"] == 1.0
    assert test["R@1"] == pytest.approx(np.mean([test[f"{c}_R@1"] for c in ("dress", "shirt", "toptee")]))
    assert metrics["whm"]["ks"] == [10, 50] and set(metrics["train"]) == {"R@1", "R@5", "R@10", "R@50"}


def test_protocol_hooks_as_a_pure_function():
    from keras_irtf.data.base import Queries
    from keras_irtf.evaluation.protocol import QueryGroup, TestProtocol, rank_within, recalls_from_embeddings

    # five images, each its own caption; group "a": queries 0, 1 against images 0-2, the source
    # kept; group "b": query 2 against images 3-4, the source excluded
    queries = Queries(np.array([0, 1, 3]), np.array(["x", "y", "z"], object), np.array([2, 2, 4]), np.array([2, 2, 4]))
    query_emb = np.array([[5, 0, 4, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 5, 1]], np.float32)
    protocol = TestProtocol(
        [QueryGroup("a", np.array([0, 1]), np.array([0, 1, 2]), exclude_source=False),
         QueryGroup("b", np.array([2]), np.array([3, 4]), exclude_source=True)],
        extra_metrics=lambda q, ids, emb, qs: {"embedded": len(ids), "queries": len(qs)},
        derived=lambda r: {"sum": r["R@1"] + r["R@2"]})
    assert protocol.image_ids().tolist() == [0, 1, 2, 3, 4]
    r = recalls_from_embeddings(query_emb, np.arange(5), np.eye(5, dtype=np.float32), queries, np.arange(5),
                                protocol, ks=(1, 2), verbose=False)
    # a: query 0 ranks its own source first (kept): rank 2; query 1: rank 1. b: the source (3) out: rank 1
    assert r == {"R@1": 0.75, "R@2": 1.0, "a_R@1": 0.5, "a_R@2": 1.0, "b_R@1": 1.0, "b_R@2": 1.0,
                 "embedded": 5.0, "queries": 3.0, "sum": 1.75}
    ranked = rank_within(query_emb[:2], np.arange(5), np.eye(5, dtype=np.float32),
                         np.array([[0, 1, 2], [2, -1, 1]]), np.array([0, 1]))
    assert ranked.tolist() == [[2, 1, -1], [2, -1, -1]]


def test_robustness_follows_the_per_category_protocol(tmp_path):
    """The robustness evaluation ranks FashionIQ queries within their category, as the clean one."""
    from keras_irtf.config import load_config
    from keras_irtf.evaluation.robustness import evaluate_robustness
    from keras_irtf.experiment import Experiment
    from keras_irtf.testing.cir_fixtures import tiny_run_overrides, write_fashioniq

    write_fashioniq(tmp_path / "fiq")
    exp = Experiment(load_config([], tiny_run_overrides("fashioniq", tmp_path / "fiq")), verbose=False)
    model = exp.create_model()
    clean = exp.evaluate(model, verbose=False)["test"]
    r = evaluate_robustness(model, exp.dataset, exp._text_input(), levels={"noise": [2 / 255]},
                            preprocessor=exp.preprocessor, input_grad=False, verbose=False)
    for key in ("R@1", "dress_R@1", "shirt_R@5", "toptee_R@10"):
        assert r["clean"][key] == pytest.approx(clean[key])
    (noisy,) = r["noise"].values()
    assert "dress_R@1" in noisy and set(noisy) == set(r["clean"])
    assert "protocol" in r["settings"]["gallery"]
