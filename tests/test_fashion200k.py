"""Fashion200k in its published layout: label files, caption post-processing, the reference's
one-word-difference pairs and "replace X with Y" texts, the official test queries (and the
generated fallback), malformed files, the file cache, and a short training + evaluation run."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from keras_irtf.config import load_config, repo_configs_dir
from keras_irtf.data.base import DatasetError
from keras_irtf.data.fashion200k import (
    Fashion200kDataset,
    clean_caption,
    different_words,
    parent_captions,
    replace_texts,
)
from keras_irtf.testing.fixtures import write_fashion200k

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def f2_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("f200k") / "Fashion200k"
    write_fashion200k(root)
    return root


@pytest.fixture(scope="module")
def f2(f2_root):
    return Fashion200kDataset(f2_root, image_size=32, verbose=False)


def test_caption_rules_of_the_reference():
    assert clean_caption(" a-line dress w. pockets & belt? *new*\n") == \
        "a-line dress wdotmark pockets andmark beltquestionmark starmarknewstarmark"
    assert different_words("blue floral dress", "red floral dress") == ("blue", "red", "replace blue with red")
    # no differing word: the reference's loop leaves the last word
    assert different_words("blue dress", "blue dress")[2] == "replace dress with dress"
    assert parent_captions("blue floral dress") == ["floral dress", "blue dress", "blue floral"]
    # the reference removes the word as a substring, everywhere ("red" inside "shredded")
    assert parent_captions("red shredded dress")[0] == "shded dress"


def test_vectorised_texts_match_the_reference_rule():
    rng = np.random.default_rng(0)
    words = ["red", "blue", "floral", "dress", "long", "red-ish"]
    vocab = sorted({" ".join(rng.choice(words, int(rng.integers(1, 6)))) for _ in range(300)})
    a, b = rng.integers(len(vocab), size=2000), rng.integers(len(vocab), size=2000)
    texts = replace_texts(vocab, a, b)
    assert list(texts) == [different_words(vocab[i], vocab[j])[2] for i, j in zip(a, b)]


def test_reads_label_files_and_official_queries(f2):
    assert f2.train.num_images == 9 and f2.test.num_images == 6
    assert f2.train.captions[:2] == ["blue floral dress", "blue floral dress"]
    assert "white lace gown wdotmark pockets" in f2.train.captions
    for split in (f2.train, f2.test):
        for p in split.image_paths:
            rel = Path(p).relative_to(f2.root)
            assert rel.parts[0] == "women" and rel.suffix == ".jpeg" and Path(p).is_file()
    assert sorted(set(f2.test.captions)) == f2.test.caption_vocab
    q = f2.test.test_queries
    assert f2.test_queries_source == "official test_queries.txt"
    assert list(q.texts) == ["replace floral with striped", "replace striped with floral", "replace grey with navy"]
    caps = f2.test.captions
    assert [caps[s] for s in q.source_ids] == ["pink floral dress", "pink striped dress", "grey wool coat"]
    assert [f2.test.caption_vocab[c] for c in q.target_captions] == ["pink striped dress", "pink floral dress",
                                                                      "navy wool coat"]
    assert [caps[t] for t in q.target_ids] == [f2.test.caption_vocab[c] for c in q.target_captions]
    assert f2.training_texts() == f2.train.captions


def test_training_pairs_differ_by_one_word(f2):
    caps = f2.train.captions
    q = f2.sample_training_queries(300, np.random.default_rng(1))
    assert len(q) == 300
    assert int(f2._index["train"].modifiable.sum()) == 8
    lone = caps.index("white lace gown wdotmark pockets")
    assert lone not in q.source_ids  # its caption has no sibling: never a source
    for s, text, t, tc in zip(q.source_ids, q.texts, q.target_ids, q.target_captions):
        src, tgt = caps[s], caps[t]
        assert src != tgt and f2.train.caption_vocab[tc] == tgt
        assert set(parent_captions(src)) & set(parent_captions(tgt))
        word_a, word_b = text[len("replace "):].split(" with ")
        assert word_a in src.split() and word_a not in tgt.split()
        assert word_b in tgt.split() and word_b not in src.split()
    assert {caps[s] for s in q.source_ids} == {c for c in caps if not c.startswith("white")}
    again = f2.sample_training_queries(300, np.random.default_rng(1))
    assert np.array_equal(q.target_ids, again.target_ids)


def test_without_test_queries_file_queries_are_generated(f2_root, tmp_path, caplog):
    root = tmp_path / "f2"
    shutil.copytree(f2_root, root)
    (root / "test_queries.txt").unlink()
    ds = Fashion200kDataset(root, image_size=32, verbose=False)
    assert "NOT comparable" in caplog.text  # a warning of the keras_irtf log
    q = ds.test.test_queries
    assert ds.test_queries_source.startswith("generated")
    assert len(q) == 6  # every test image has a sibling caption
    assert list(q.source_ids) == list(range(6))
    for s, text, t in zip(q.source_ids, q.texts, q.target_ids):
        assert ds.test.captions[s] != ds.test.captions[t]
        assert text == different_words(ds.test.captions[s], ds.test.captions[t])[2]


def test_malformed_files_name_file_and_line(f2_root, tmp_path):
    root = tmp_path / "f2"
    shutil.copytree(f2_root, root)
    labels = root / "labels" / "jacket_train_detect_all.txt"
    good = labels.read_text()
    labels.write_text(good + "women/jackets/x.jpeg 0.5 no tabs here\n")
    with pytest.raises(DatasetError, match=r"jacket_train_detect_all.txt, line 4: expected 'image path<TAB>"):
        Fashion200kDataset(root, image_size=32, verbose=False)
    labels.write_text(good)
    queries = root / "test_queries.txt"
    queries.write_text(queries.read_text() + "women/dresses/nope.jpeg women/dresses/nope2.jpeg\n")
    with pytest.raises(DatasetError, match=r"test_queries.txt, line 4: image women/dresses/nope.jpeg is not in"):
        Fashion200kDataset(root, image_size=32, verbose=False)


def test_missing_image_error_or_skip(f2_root, tmp_path):
    root = tmp_path / "f2"
    shutil.copytree(f2_root, root)
    rel = (root / "test_queries.txt").read_text().split()[0]
    (root / rel).unlink()
    with pytest.raises(DatasetError, match="missing or unreadable"):
        Fashion200kDataset(root, image_size=32, verbose=False)
    ds = Fashion200kDataset(root, image_size=32, on_bad_image="skip", verbose=False)
    assert ds.test.num_images == 5 and [p for p, _ in ds.skipped_images] == [str(root / rel)]
    # the official query whose source image is gone is dropped, and counted
    assert len(ds.test.test_queries) == 2 and ds.dropped_test_queries == 1


def test_no_dataset_fails_fast_with_instructions():
    code = (
        "import runpy, sys\nsys.argv = ['train.py'] + sys.argv[1:]\n"
        "try:\n    runpy.run_path('tools/train.py', run_name='__main__')\n"
        "except SystemExit as e:\n    print('EXIT', e.code, 'TF', 'tensorflow' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, "--dataset", "fashion200k"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    # before any dataset or model work (TensorFlow itself starts first: the registries need it)
    assert "EXIT 2" in proc.stdout, proc.stdout + proc.stderr
    for needle in ("labels/<category>_train_detect_all.txt", "github.com/xthan/fashion-200k",
                   "test_queries.txt", "github.com/google/tirg", "--data-root"):
        assert needle in proc.stderr


def test_file_cache_is_filled_once_and_keyed_by_size(f2, tmp_path, monkeypatch):
    from keras_irtf.data import image_files
    from keras_irtf.data.image_files import ImageFileCache

    paths = f2.test.image_paths
    cache = ImageFileCache(tmp_path, "t", paths, 24)
    first, bad = cache.fill(verbose=False)
    assert bad == [] and first.shape == (6, 24, 24, 3) and first.reshape(6, -1).std(1).min() > 1
    assert np.load(cache.state_path).tolist() == [1] * 6

    def no_decoding(*a, **k):
        raise AssertionError("a filled cache must not decode again")

    monkeypatch.setattr(image_files, "safe_decode_dataset", no_decoding)
    again, _ = ImageFileCache(tmp_path, "t", paths, 24).fill(verbose=False)
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert ImageFileCache(tmp_path, "t", paths, 32).folder != cache.folder
    assert ImageFileCache(tmp_path, "t", paths[:-1], 24).folder != cache.folder


@pytest.mark.slow
def test_train_and_evaluate_end_to_end_with_file_cache(f2_root, tmp_path):
    from keras_irtf.training.loop import train

    cfg = load_config([repo_configs_dir() / "fashion200k.yaml"], [
        f"data.root={f2_root}", "data.image_size=32", f"data.file_cache={tmp_path / 'cache'}",
        "model.image_encoder=small_cnn", "model.embed_dim=32", "model.text_encoder.word_embed_dim=16",
        "model.text_encoder.hidden_dim=32", "model.image_encoder.filters=[8,8,16,16]", "train.batch_size=4", "train.steps=2",
        "train.steps_per_epoch=2", "data.train_recall_queries=16", "eval.batch_size=8", "optim.decay_steps=[]",
        f"train.out={tmp_path / 'run'}"])
    run, metrics = train(cfg, verbose=0)
    assert set(metrics["test"]) == {"R@1", "R@10", "R@50"}
    assert metrics["whm"]["ks"] == [1, 10, 50]
    # 5 other images in each gallery, so the target caption is always within the top 10
    assert metrics["test"]["R@10"] == 1.0 and metrics["train"]["R@10"] == 1.0
    assert metrics["steps"] == 2 and np.isfinite(metrics["final_losses"]["loss"])
    assert len(list((tmp_path / "cache").glob("fashion200k_*_32px_*/images.u8"))) == 2


def test_configs_carry_the_paper_hyper_parameters():
    tirg = load_config([repo_configs_dir() / "fashion200k.yaml"])
    ga = load_config([repo_configs_dir() / "fashion200k_ga.yaml"])
    for cfg in (tirg, ga):
        assert cfg.data.dataset == "fashion200k" and cfg.data.image_size == 224
        assert cfg.train.batch_size == 32 and cfg.train.steps == 160000
        assert cfg.optim.learning_rate == 0.01 and cfg.optim.decay_steps == (50000, 100000, 150000)
        assert cfg.loss.kind == "batch_classification" and cfg.model.embed_dim == 512
        assert cfg.eval.ks == (1, 10, 50) and cfg.eval.whm_ks == (1, 10, 50)
    assert ga.ga_methods == ("adversarial", "isotropic") and ga.loss.eta == 0.001 and tirg.ga_methods == ()
