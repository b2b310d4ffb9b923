"""A triplets folder (train.jsonl, test.jsonl, optional gallery.txt): reading, path containment,
malformed lines named, the listed gallery, Recall@K pinned on hand-made embeddings, and a short
training + evaluation run."""

import json
import os
import shutil

import numpy as np
import pytest

from keras_irtf.config import load_config
from keras_irtf.data.base import DatasetError
from keras_irtf.data.safe_files import UnsafeFileError
from keras_irtf.data.triplets import TripletsDataset
from keras_irtf.testing.cir_fixtures import patch_embeddings, ranking_embeddings, tiny_run_overrides, write_triplets


@pytest.fixture(scope="module")
def trip_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("triplets") / "mine"
    write_triplets(root)
    return root


@pytest.fixture(scope="module")
def trip(trip_root):
    return TripletsDataset(trip_root, image_size=32, verbose=False)


@pytest.fixture
def trip_copy(trip_root, tmp_path):
    root = tmp_path / "mine"
    shutil.copytree(trip_root, root)
    return root


def _lines(path, *lines):
    path.write_text(path.read_text() + "".join(line + "\n" for line in lines))


def test_reads_the_folder(trip):
    assert trip.train.num_images == 8 and trip.num_training_triplets == 8
    assert trip.test.captions == [f"images/test/img{k}.jpg" for k in range(6)] + [
        "images/test/distractor0.jpg", "images/test/distractor1.jpg"]
    assert trip.gallery_ids.tolist() == list(range(8))
    q = trip.test.test_queries
    assert q.source_ids.tolist() == list(range(6)) and q.target_ids.tolist() == [1, 2, 3, 4, 5, 0]
    assert trip.training_texts() == ["make it a dog", "add a person", "show two of them", "remove the background",
                                     "zoom in", "make it red"]
    s = trip.sample_training_queries(800, np.random.default_rng(0))
    assert np.all(s.target_ids == (s.source_ids + 1) % 8) and np.bincount(s.source_ids).min() > 60


def test_recalls_hand_computed(trip, monkeypatch):
    from keras_irtf.evaluation.protocol import evaluate_split

    # gallery: img0-5 (ids 0-5) and two distractors (6, 7); query k: img k -> img k+1 (cyclic)
    orders = [[0, 7, 1],  # the source first (excluded): rank 2
              [2], [6, 7, 3], [3, 4], [0, 1, 2, 3, 6, 7, 5], [1, 2, 3, 4, 6, 0]]  # 1, 3, 1, 7, 6
    images, queries = ranking_embeddings(orders, 8)
    patch_embeddings(monkeypatch, images, queries)
    r = evaluate_split(None, trip, None, "test", trip.test.test_queries, ks=(1, 2, 5, 10), verbose=False)
    assert r == pytest.approx({"R@1": 2 / 6, "R@2": 3 / 6, "R@5": 4 / 6, "R@10": 1.0})


def test_listed_gallery_is_the_gallery(trip_copy, monkeypatch):
    from keras_irtf.evaluation.protocol import evaluate_split

    # drop the query whose target is img0 and img0 from the gallery: img0 is then only a source
    test = trip_copy / "test.jsonl"
    test.write_text("".join(test.read_text().splitlines(keepends=True)[:5]))
    (trip_copy / "gallery.txt").write_text("".join(f"images/test/img{k}.jpg\n" for k in range(1, 6))
                                           + "images/test/distractor0.jpg\n")
    ds = TripletsDataset(trip_copy, image_size=32, verbose=False)
    assert ds.test.captions[-1] == "images/test/img0.jpg" and ds.gallery_ids.tolist() == list(range(6))
    # ids: img1-5 = 0-4, distractor0 = 5, distractor1 (listed no more) absent, img0 = 6
    orders = [[6, 5, 0],  # img0 -> img1: img0 is not in the gallery, the distractor is: rank 2
              [5, 1],     # img1 -> img2: 2
              [1, 2],     # img2 -> img3: the source (1) excluded: 1
              [6, 3],     # img3 -> img4: 1
              [3, 4]]     # img4 -> img5: the source excluded: 1
    images, queries = ranking_embeddings(orders, 7)
    patch_embeddings(monkeypatch, images, queries)
    r = evaluate_split(None, ds, None, "test", ds.test.test_queries, ks=(1, 2), verbose=False)
    assert r == pytest.approx({"R@1": 3 / 5, "R@2": 1.0})
    # a target the gallery does not list could never be retrieved: an error naming the line
    _lines(test, json.dumps({"source": "images/test/img1.jpg", "text": "x", "target": "images/test/img0.jpg"}))
    with pytest.raises(DatasetError, match=r"test.jsonl, line 6: target 'images/test/img0.jpg' is not in "
                                           r".*gallery.txt"):
        TripletsDataset(trip_copy, image_size=32, verbose=False)


def test_without_gallery_every_test_image(trip_copy):
    (trip_copy / "gallery.txt").unlink()
    _lines(trip_copy / "test.jsonl",
           json.dumps({"source": "images/./test/img1.jpg", "text": "x", "target": "images/test/img2.jpg"}))
    ds = TripletsDataset(trip_copy, image_size=32, verbose=False)
    assert ds.gallery_ids is None and ds.test_protocol("test", ds.test.test_queries) is None
    # the same file spelt two ways is one image
    assert ds.test.captions == [f"images/test/img{k}.jpg" for k in range(6)]
    assert ds.test.test_queries.source_ids[-1] == 1


@pytest.mark.parametrize("line,message", [
    ('{"source": "images/train/img0.jpg", "text": "x"', r"train.jsonl, line 10: not valid JSON"),
    ('["images/train/img0.jpg"]', r"train.jsonl, line 10: expected a JSON object, got list"),
    ('{"source": "images/train/img0.jpg", "text": "x"}', r"train.jsonl, line 10: missing key 'target'"),
    ('{"source": "images/train/img0.jpg", "text": 3, "target": "images/train/img1.jpg"}',
     r"train.jsonl, line 10: key 'text' must be a string, got 3"),
])
def test_malformed_lines_are_named(trip_copy, line, message):
    _lines(trip_copy / "train.jsonl", "", line)  # after 8 lines a blank one (skipped, but counted)
    with pytest.raises(DatasetError, match=message):
        TripletsDataset(trip_copy, image_size=32, verbose=False)


def test_paths_may_not_leave_the_folder(trip_copy, tmp_path):
    test = trip_copy / "test.jsonl"
    good = test.read_text()
    shutil.copy(trip_copy / "images" / "test" / "img0.jpg", tmp_path / "outside.jpg")
    for escape in ("../outside.jpg", str(tmp_path / "outside.jpg")):
        test.write_text(good)
        _lines(test, json.dumps({"source": escape, "text": "x", "target": "images/test/img1.jpg"}))
        with pytest.raises(UnsafeFileError, match=r"test.jsonl, line 7: image path .* outside the dataset root"):
            TripletsDataset(trip_copy, image_size=32, verbose=False)
    ds = TripletsDataset(trip_copy, image_size=32, on_bad_image="skip", verbose=False)
    assert len(ds.test.test_queries) == 6
    test.write_text(good)
    os.symlink(tmp_path / "outside.jpg", trip_copy / "images" / "test" / "link.jpg")
    _lines(test, json.dumps({"source": "images/test/link.jpg", "text": "x", "target": "images/test/img1.jpg"}))
    with pytest.raises(UnsafeFileError, match=r"test.jsonl, line 7: image path 'images/test/link.jpg'"):
        TripletsDataset(trip_copy, image_size=32, verbose=False)
    test.write_text(good)
    _lines(trip_copy / "gallery.txt", "../outside.jpg")
    with pytest.raises(UnsafeFileError, match=r"gallery.txt, line 9"):
        TripletsDataset(trip_copy, image_size=32, verbose=False)


def test_missing_and_damaged_images_are_named(trip_copy):
    (trip_copy / "images" / "train" / "img3.jpg").unlink()
    (trip_copy / "images" / "test" / "img2.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(DatasetError, match=r"images/train/img3.jpg: missing or unreadable"):
        TripletsDataset(trip_copy, image_size=32, verbose=False)
    ds = TripletsDataset(trip_copy, image_size=32, on_bad_image="skip", verbose=False)
    # lines 3 (img2 -> img3) and 4 (img3 -> img4) of train.jsonl; 2 and 3 of test.jsonl
    assert ds.num_training_triplets == 6 and len(ds.test.test_queries) == 4
    assert ds.dropped_queries == {"train": 2, "test": 2}
    assert [p for p, _ in ds.skipped_images] == [str(trip_copy / "images/train/img3.jpg"),
                                                  str(trip_copy / "images/test/img2.jpg")]
    assert "images/test/img2.jpg" not in ds.test.captions and len(ds.gallery_ids) == 7


def test_missing_files_fail_fast(trip_copy):
    (trip_copy / "test.jsonl").unlink()
    cfg = load_config([], ["data.dataset=triplets", f"data.root={trip_copy}"])
    with pytest.raises(DatasetError, match=r"test.jsonl not found. A triplets folder"):
        TripletsDataset.check(None, cfg)


@pytest.mark.slow
def test_train_and_evaluate_end_to_end(trip_root):
    from keras_irtf.experiment import Experiment

    exp = Experiment(load_config([], tiny_run_overrides("triplets", trip_root)), verbose=False)
    model = exp.create_model()
    model.fit(exp.train_dataset(), epochs=1, steps_per_epoch=3, verbose=0)
    metrics = exp.evaluate(model)
    assert set(metrics["test"]) == {"R@1", "R@5", "R@10", "R@50"} == set(metrics["train"])
    assert all(0.0 <= v <= 1.0 for v in metrics["test"].values())
    # 8 listed images, the source removed: the target is always within the top 10
    t = metrics["test"]
    assert t["R@10"] == 1.0 and t["R@50"] == 1.0 and t["R@1"] <= t["R@5"] <= t["R@10"]
    assert metrics["whm"]["ks"] == [1, 5, 10] and 0.0 <= metrics["whm"]["value"] <= 1.0
