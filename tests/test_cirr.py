"""CIRR in both published arrangements: detection, contained paths, malformed files, the val
protocol (Recall@K with the reference removed, Recall_subset@K within img_set) and the test-server
submission files pinned against hand-computed values, the text cache, and a short run."""

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from keras_irtf.config import load_config, to_yaml
from keras_irtf.data.base import DatasetError
from keras_irtf.data.cirr import CIRRConfig, CIRRDataset, detect_arrangement
from keras_irtf.data.safe_files import UnsafeFileError
from keras_irtf.testing.cir_fixtures import patch_embeddings, ranking_embeddings, tiny_run_overrides, write_cirr

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cirr_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cirr") / "CIRR"
    write_cirr(root, arrangement="cirr")
    return root


@pytest.fixture(scope="module")
def cirr(cirr_root):
    return CIRRDataset(cirr_root, image_size=32, verbose=False)


@pytest.fixture
def cirr_copy(cirr_root, tmp_path):
    root = tmp_path / "cirr"
    shutil.copytree(cirr_root, root)
    return root


def _edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_both_arrangements_give_the_same_dataset(cirr, cirr_root, tmp_path):
    truth = write_cirr(tmp_path / "c4c", arrangement="clip4cir")
    other = CIRRDataset(tmp_path / "c4c", image_size=32, verbose=False)
    assert (cirr.arrangement, other.arrangement) == ("cirr", "clip4cir")
    assert cirr.test.captions == other.test.captions == truth["val"]["names"]
    assert cirr.train.captions == other.train.captions
    # paths of split.rc2.<split>.json resolved against each arrangement's image root
    assert cirr.train.image_paths[0] == str(cirr_root / "img_raw" / "./train/0/train-0-0-img0.png")
    assert other.train.image_paths[0] == str(tmp_path / "c4c" / "./train/0/train-0-0-img0.png")
    assert other.test.image_paths[3] == str(tmp_path / "c4c" / "./dev/dev-3-1-img1.png")
    for a, b in ((cirr.test.test_queries, other.test.test_queries),):
        assert list(a.texts) == list(b.texts) and np.array_equal(a.target_ids, b.target_ids)
    assert cirr.num_training_triplets == 12 and list(cirr._train_texts[:2, 0]) == ["make it a dog", "add a person"]
    q = cirr.test.test_queries
    assert [cirr.test.captions[i] for i in q.target_ids[:6]] == truth["val"]["names"][1:6] + truth["val"]["names"][:1]
    assert cirr.test_members.shape == (12, 6) and cirr.test_members[7].tolist() == list(range(6, 12))


def test_arrangement_detection_errors(cirr_root, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=r"neither CIRR arrangement: no .*captions/cap.rc2.train.json \(CIRR's "
                                           r"README\) and no .*cirr/captions/cap.rc2.train.json \(CLIP4Cir's\)"):
        detect_arrangement(empty)
    with pytest.raises(DatasetError, match=r"arrangement=clip4cir: .*cirr/captions/cap.rc2.train.json not found"):
        CIRRDataset(cirr_root, settings=CIRRConfig(arrangement="clip4cir"), image_size=32, verbose=False)
    both = tmp_path / "both"
    shutil.copytree(cirr_root, both)
    shutil.copytree(both / "captions", both / "cirr" / "captions")
    with pytest.raises(DatasetError, match="holds both CIRR arrangements"):
        detect_arrangement(both)
    assert detect_arrangement(both, "cirr") == "cirr"
    with pytest.raises(Exception, match=r"arrangement='sideways': expected one of"):
        load_config([], ["data.dataset=cirr", "data.dataset.arrangement=sideways"])


def test_paths_may_not_leave_the_image_root(cirr_copy, tmp_path):
    split = cirr_copy / "image_splits" / "split.rc2.train.json"
    good = split.read_text()
    _edit_json(split, lambda d: d.update({"train-3-1-img1": "./../../outside.png"}))
    with pytest.raises(UnsafeFileError, match=r"split.rc2.train.json, key 'train-3-1-img1': image path "
                                              r"'./../../outside.png' resolves to .* outside the dataset root"):
        CIRRDataset(cirr_copy, image_size=32, verbose=False)
    # skip: the image is dropped, and the queries that name it
    ds = CIRRDataset(cirr_copy, image_size=32, on_bad_image="skip", verbose=False)
    assert ds.train.num_images == 11 and ds.num_training_triplets == 10 and ds.dropped_queries["train"] == 2
    split.write_text(good)
    _edit_json(split, lambda d: d.update({"train-3-1-img1": str(tmp_path / "abs.png")}))
    with pytest.raises(UnsafeFileError, match="outside the dataset root"):
        CIRRDataset(cirr_copy, image_size=32, verbose=False)
    split.write_text(good)
    target = cirr_copy / "img_raw" / "dev" / "dev-2-0-img0.png"
    shutil.move(target, tmp_path / "moved.png")
    os.symlink(tmp_path / "moved.png", target)
    with pytest.raises(UnsafeFileError, match=r"split.rc2.val.json, key 'dev-2-0-img0'"):
        CIRRDataset(cirr_copy, image_size=32, verbose=False)


def test_malformed_files_are_named(cirr_copy):
    cap = cirr_copy / "captions" / "cap.rc2.val.json"
    good = cap.read_text()
    cap.write_text(good[:-40])
    with pytest.raises(DatasetError, match=r"cap.rc2.val.json, line \d+, column \d+: not valid JSON"):
        CIRRDataset(cirr_copy, image_size=32, verbose=False)
    cap.write_text(good)
    train = cirr_copy / "captions" / "cap.rc2.train.json"
    _edit_json(train, lambda d: d[3].pop("caption"))
    with pytest.raises(DatasetError, match=r"cap.rc2.train.json, entry 3 \(pairid 3\): missing key 'caption'"):
        CIRRDataset(cirr_copy, image_size=32, verbose=False)
    _edit_json(train, lambda d: d[3].update({"caption": "x", "pairid": "3"}))
    with pytest.raises(DatasetError, match=r"entry 3: key 'pairid' must be an integer, got '3'"):
        CIRRDataset(cirr_copy, image_size=32, verbose=False)
    _edit_json(train, lambda d: d[3].update({"pairid": 3, "target_hard": "nowhere-1-img0"}))
    with pytest.raises(DatasetError, match=r"entry 3 \(pairid 3\): target image 'nowhere-1-img0' is not listed in "
                                           r".*split.rc2.train.json"):
        CIRRDataset(cirr_copy, image_size=32, verbose=False)


def test_missing_image_is_named(cirr_copy):
    (cirr_copy / "img_raw" / "dev" / "dev-4-0-img0.png").unlink()
    with pytest.raises(DatasetError, match=r"dev-4-0-img0.png: missing or unreadable"):
        CIRRDataset(cirr_copy, image_size=32, verbose=False)
    ds = CIRRDataset(cirr_copy, image_size=32, on_bad_image="skip", verbose=False)
    assert ds.test.num_images == 11 and len(ds.test.test_queries) == 10
    # queries 3 -> 4 and 4 -> 5 are dropped; the skipped image leaves the other four img_sets 0-5
    assert ds.test_members[:4, 4].tolist() == [-1] * 4 and (ds.test_members == -1).sum() == 4


# val: images 0-5 are img_set 0, 6-11 img_set 1; query i: reference i -> the next image of its set.
# Each order lists the images a query ranks first; the rest follow by ascending id.
VAL_ORDERS = [
    [0, 1],                          # reference first (removed): rank 1; subset 1
    [7, 8, 2],                       # rank 3; 7 and 8 are not in its set: subset 1
    [3],                             # 1; 1
    [6, 7, 8, 9, 10, 11, 0, 4],      # 8; subset (0, 4): 2
    [0, 1, 2, 3, 5],                 # 5; 5
    [1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 0],  # 11; 5
    [7],                             # 1; 1
    [7, 6, 8],                       # reference removed: 2; 2
    [0, 1, 2, 3, 4, 5, 9],           # 7; 1
    [10],                            # 1; 1
    [6, 11],                         # 2; 2
    [7, 8, 9, 10, 6],                # 5; 5
]
# ranks: full [1, 3, 1, 8, 5, 11, 1, 2, 7, 1, 2, 5], subset [1, 1, 1, 2, 5, 5, 1, 2, 1, 1, 2, 5]


def test_val_recalls_hand_computed(cirr, monkeypatch):
    from keras_irtf.evaluation.protocol import evaluate_split

    images, queries = ranking_embeddings(VAL_ORDERS, 12)
    patch_embeddings(monkeypatch, images, queries)
    r = evaluate_split(None, cirr, None, "test", cirr.test.test_queries, ks=(1, 5, 10, 50), verbose=False)
    assert r == pytest.approx({
        "R@1": 4 / 12, "R@5": 9 / 12, "R@10": 11 / 12, "R@50": 1.0,
        "R_subset@1": 6 / 12, "R_subset@2": 9 / 12, "R_subset@3": 9 / 12,
        "avg_R@5_R_subset@1": (9 / 12 + 6 / 12) / 2,
    })
    assert all(isinstance(v, float) for v in r.values())


def _sub_root(tmp_path):
    root = tmp_path / "sub"
    write_cirr(root, train_images=8, val_images=8, test1_images=8, set_size=4)
    return root


def test_submission_files_hand_computed(tmp_path, monkeypatch):
    from keras_irtf.evaluation.cirr_submission import write_submission
    from keras_irtf.experiment import Experiment

    root = _sub_root(tmp_path)
    cfg = load_config([], ["data.dataset=cirr", f"data.root={root}", "data.image_size=32"])
    exp = Experiment(cfg, verbose=False)
    # test1: 8 images, img_sets 0-3 and 4-7, query i has reference i
    orders = [[0, 5, 2, 7, 1], [7, 6, 5, 4, 3, 2, 1, 0], [], [], [], [], [], []]
    images, queries = ranking_embeddings(orders, 8)
    patch_embeddings(monkeypatch, images, queries)
    written = write_submission(exp, None, tmp_path / "out", verbose=False)
    recall = json.loads(written["recall"].read_text())
    subset = json.loads(written["recall_subset"].read_text())
    assert written["recall"].name == "recall_submission.json"
    assert written["recall_subset"].name == "recall_subset_submission.json"
    names = [f"test1-{k}-{k % 2}-img{k % 2}" for k in range(8)]

    def n(ids):
        return [names[i] for i in ids]

    assert recall["version"] == "rc2" and recall["metric"] == "recall"
    assert subset["version"] == "rc2" and subset["metric"] == "recall_subset"
    assert set(recall) == set(subset) == {"version", "metric"} | {str(i) for i in range(8)}
    assert recall["0"] == n([5, 2, 7, 1, 3, 4, 6])  # the reference (0) removed; 7 images, fewer than 50
    assert subset["0"] == n([2, 1, 3])               # within img_set 0-3, without 0
    assert recall["1"] == n([7, 6, 5, 4, 3, 2, 0])
    assert subset["1"] == n([3, 2, 0])
    assert recall["5"] == n([0, 1, 2, 3, 4, 6, 7])
    assert subset["5"] == n([4, 6, 7])


def test_submission_top_50_and_ties():
    from keras_irtf.evaluation.cirr_submission import submission_from_embeddings

    # 60 images, all scoring the same: the 50 lowest ids but the reference
    names = [f"img{i}" for i in range(60)]
    recall, subset = submission_from_embeddings(np.ones((1, 4), np.float32), np.ones((60, 4), np.float32), names,
                                                [77], [3], np.array([[10, 3, 11, 12, -1, -1]]))
    assert recall["77"] == [f"img{i}" for i in range(51) if i != 3]
    assert subset["77"] == ["img10", "img11", "img12"]


def test_test1_texts_join_the_text_cache(cirr):
    from keras_irtf.data.text_cache import texts_of_run

    extra = cirr.extra_texts()
    assert extra[:2] == ["make it night", "add a ball"] and len(extra) == 6
    texts = texts_of_run(cirr)
    assert set(extra) <= set(texts) and not set(extra) & set(cirr.training_texts())


def _evaluate_tool():
    spec = importlib.util.spec_from_file_location("evaluate_tool", ROOT / "tools" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_submission_refuses_other_datasets(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(load_config([], ["data.dataset=fashion200k"])))
    assert _evaluate_tool().main(["--run", str(run), "--submission", str(tmp_path / "out")]) == 2
    assert "--submission writes CIRR's test-server files" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_test1_files_required_for_a_submission(cirr_copy):
    (cirr_copy / "captions" / "cap.rc2.test1.json").unlink()
    ds = CIRRDataset(cirr_copy, image_size=32, verbose=False)
    assert ds.extra_texts() == []
    with pytest.raises(DatasetError, match=r"cap.rc2.test1.json not found: the test-server submission needs"):
        ds.test1()


@pytest.mark.slow
def test_train_evaluate_and_submit_end_to_end(tmp_path):
    from keras_irtf.evaluation.cirr_submission import write_submission
    from keras_irtf.experiment import Experiment

    truth = write_cirr(tmp_path / "c4c", arrangement="clip4cir")
    cfg = load_config([], tiny_run_overrides("cirr", tmp_path / "c4c"))
    exp = Experiment(cfg, verbose=False)
    model = exp.create_model()
    model.fit(exp.train_dataset(), epochs=1, steps_per_epoch=3, verbose=0)
    metrics = exp.evaluate(model)
    test = metrics["test"]
    assert set(test) == {"R@1", "R@5", "R@10", "R@50", "R_subset@1", "R_subset@2", "R_subset@3",
                         "avg_R@5_R_subset@1"}
    assert all(0.0 <= v <= 1.0 for v in test.values())
    # 11 images once the reference is removed: always within 50; 5 in the subset: always within 5 = never
    # asked, but within 3 at least as often as within 1
    assert test["R@50"] == 1.0 and test["R@10"] >= test["R@5"] >= test["R@1"]
    assert test["R_subset@3"] >= test["R_subset@2"] >= test["R_subset@1"]
    assert metrics["whm"]["ks"] == [1, 5, 10]
    written = write_submission(exp, model, tmp_path / "out", verbose=False)
    recall = json.loads(written["recall"].read_text())
    subset = json.loads(written["recall_subset"].read_text())
    for q in truth["test1"]["queries"]:
        top, best3 = recall[str(q["pairid"])], subset[str(q["pairid"])]
        assert len(top) == 5 and q["reference"] not in top and set(top) < set(truth["test1"]["names"])
        assert len(best3) == 3 and q["reference"] not in best3 and set(best3) < set(q["img_set"]["members"])
    # the same from the saved run, through tools/evaluate.py --submission
    exp.save_run(model, tmp_path / "run", metrics)
    assert _evaluate_tool().main(["--run", str(tmp_path / "run"), "--submission", str(tmp_path / "tool"), "--quiet"]) == 0
    assert json.loads((tmp_path / "tool" / "recall_submission.json").read_text()) == recall
    assert json.loads((tmp_path / "tool" / "recall_subset_submission.json").read_text()) == subset
