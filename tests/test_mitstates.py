"""MIT-States in its published layout: the split, the queries and targets of the TIRG protocol, the
adjective/noun recalls, the disk pipeline (resize + centre crop, unreadable images), and a short
training + evaluation run. Fixtures are JPEGs written with Pillow in a temporary folder."""

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from keras_irtf.config import load_config, repo_configs_dir
from keras_irtf.data.base import DatasetError, Queries
from keras_irtf.testing.fixtures import MITSTATES_SPEC, write_mitstates
from keras_irtf.data.mitstates import TEST_NOUNS, MITStatesDataset

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ms_root(tmp_path_factory):
    return write_mitstates(tmp_path_factory.mktemp("mitstates") / "release_dataset")


@pytest.fixture(scope="module")
def ms(ms_root):
    return MITStatesDataset(ms_root, image_size=32, verbose=False)


def small_config(root, out, *overrides):
    return load_config([repo_configs_dir() / "mitstates.yaml"], [
        f"data.root={root}", "data.image_size=32", "model.image_encoder=small_cnn", "model.embed_dim=32",
        "model.text_encoder.word_embed_dim=16", "model.text_encoder.hidden_dim=32", "model.image_encoder.filters=[8,8,16,16]",
        "train.batch_size=4", "train.steps=2", "train.steps_per_epoch=2", "data.train_recall_queries=16",
        "eval.batch_size=8", "optim.decay_steps=[]", f"train.out={out}", *overrides])


def test_split_is_noun_disjoint_and_skips_unused_folders(ms):
    train_nouns = {c.split()[1] for c in ms.train.captions}
    test_nouns = {c.split()[1] for c in ms.test.captions}
    assert train_nouns == {"apple", "car", "dog", "tree"}
    assert test_nouns == {"castle", "fish", "tomato"}
    assert not train_nouns & test_nouns
    assert test_nouns <= set(TEST_NOUNS) and not train_nouns & set(TEST_NOUNS)
    # "adj castle" and the folder without a space ("misc") are not read
    assert all(not c.startswith("adj ") for c in ms.train.captions + ms.test.captions)
    used = {k: v for k, v in MITSTATES_SPEC.items() if " " in k and not k.startswith("adj ")}
    assert ms.train.num_images == sum(v for k, v in used.items() if k.split()[1] not in TEST_NOUNS) == 18
    assert ms.test.num_images == sum(v for k, v in used.items() if k.split()[1] in TEST_NOUNS) == 15
    assert Counter(ms.test.captions) == {k: v for k, v in used.items() if k.split()[1] in TEST_NOUNS}
    for split in (ms.train, ms.test):
        assert [split.caption_vocab[i] for i in split.caption_ids] == split.captions
        assert all(Path(p).parent.name == c for p, c in zip(split.image_paths, split.captions))


def test_test_queries_follow_the_protocol(ms):
    q = ms.test.test_queries
    caps = ms.test.captions
    # every test image x every OTHER adjective of its noun: castle 5 x 1, fish 5 x 2, tomato 5 x 1
    assert len(q) == 20
    pairs = set()
    for s, text, t, tc in zip(q.source_ids, q.texts, q.target_ids, q.target_captions):
        adj, noun = caps[s].split()
        assert text != adj
        assert ms.test.caption_vocab[tc] == f"{text} {noun}" == caps[t]
        pairs.add((int(s), text))
    assert len(pairs) == 20
    # targets: every image of the target caption
    n_targets = ms.num_targets()
    expected = {"ancient castle": 3, "ruined castle": 2, "fresh fish": 2, "cooked fish": 2, "frozen fish": 1,
                "ripe tomato": 2, "unripe tomato": 3}
    assert list(n_targets) == [expected[ms.test.caption_vocab[c]] for c in q.target_captions]
    assert n_targets.sum() == 40


def test_training_queries_come_in_pairs_with_different_adjectives(ms):
    q = ms.sample_training_queries(400, np.random.default_rng(3))
    caps = ms.train.captions
    assert len(q) == 400
    for k in range(0, 400, 2):
        assert q.source_ids[k] == q.source_ids[k + 1]
        assert q.texts[k] != q.texts[k + 1]
    for s, text, t, tc in zip(q.source_ids, q.texts, q.target_ids, q.target_captions):
        noun = caps[s].split()[1]
        assert caps[t] == f"{text} {noun}" == ms.train.caption_vocab[tc]
        assert noun != "tree"  # a noun seen with one adjective cannot start a query
    # sources are passes over the eligible images: all 16 are used in 8 pairs x ... 400 queries
    assert set(q.source_ids.tolist()) == {i for i, c in enumerate(caps) if not c.endswith("tree")}
    # the target adjective is drawn among all of the noun's adjectives (its own included, as the reference)
    assert any(caps[s].split()[0] == text for s, text in zip(q.source_ids, q.texts))
    again = ms.sample_training_queries(400, np.random.default_rng(3))
    assert np.array_equal(q.target_ids, again.target_ids) and list(q.texts) == list(again.texts)
    unpaired = ms.sample_training_queries(50, np.random.default_rng(0), paired=False)
    assert len(unpaired) == 50
    assert ms.training_texts() == caps


def test_adjective_and_noun_recalls(ms):
    vocab = ms.test.caption_vocab
    cid = {c: i for i, c in enumerate(vocab)}
    queries = Queries(np.array([0, 0]), np.array(["ruined", "fresh"], object), np.array([0, 0]),
                      np.array([cid["ruined castle"], cid["fresh fish"]]))
    retrieved = np.array([[cid["ruined castle"], cid["ancient castle"], -1],
                          [cid["ripe tomato"], cid["cooked fish"], -1]])
    extra = ms.extra_recalls()
    assert extra["adjective"](retrieved, queries).tolist() == [[True, False, False], [False, False, False]]
    assert extra["noun"](retrieved, queries).tolist() == [[True, True, False], [False, True, False]]


def test_resize_shorter_side_and_center_crop():
    import tensorflow as tf

    from keras_irtf.data.image_files import resize_and_center_crop

    # 32 x 96: thirds red | green | blue; the 16 x 16 result is the middle of a 16 x 48 resize
    img = np.zeros((32, 96, 3), np.uint8)
    img[:, :32, 0] = 255
    img[:, 32:64, 1] = 255
    img[:, 64:, 2] = 255
    out = resize_and_center_crop(tf.constant(img), 16).numpy()
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert (out[:, 2:14, 1] == 255).all() and (out[:, 2:14, [0, 2]] == 0).all()
    tall = resize_and_center_crop(tf.constant(np.transpose(img, (1, 0, 2))), 16).numpy()
    assert tall.shape == (16, 16, 3) and (tall[2:14, :, 1] == 255).all()


def test_no_dataset_fails_fast_with_instructions(tmp_path):
    """`tools/train.py --dataset mitstates` without the data: exit 2 before any data or model work,
    naming the layout, where MIT-States is published and the flag."""
    code = (
        "import runpy, sys\n"
        "sys.argv = ['train.py'] + sys.argv[1:]\n"
        "try:\n    runpy.run_path('tools/train.py', run_name='__main__')\n"
        "except SystemExit as e:\n    print('EXIT', e.code, 'TF', 'tensorflow' in sys.modules)\n"
    )
    for extra in ([], ["--data-root", str(tmp_path / "nothing")]):
        proc = subprocess.run([sys.executable, "-c", code, "--dataset", "mitstates", *extra], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        # before any dataset or model work (TensorFlow itself starts first: the registries need it)
        assert "EXIT 2" in proc.stdout, proc.stdout + proc.stderr
        err = proc.stderr
        assert "images/<adjective> <noun>/*.jpg" in err
        assert "web.mit.edu/phillipi/Public/states_and_transformations" in err
        assert "--data-root" in err


def _break_images(root):
    """Three unreadable files in the test split: truncated JPEG, empty file, text renamed .jpg."""
    folder = root / "images"
    victims = {
        "truncated": folder / "ancient castle" / "image_0000.jpg",
        "empty": folder / "fresh fish" / "image_0000.jpg",
        "text": folder / "unripe tomato" / "image_0000.jpg",
    }
    data = victims["truncated"].read_bytes()
    victims["truncated"].write_bytes(data[: len(data) // 2])
    victims["empty"].write_bytes(b"")
    victims["text"].write_text("not an image")
    return victims


def test_unreadable_images_error_or_skip(ms_root, tmp_path):
    root = tmp_path / "ms"
    shutil.copytree(ms_root, root)
    victims = _break_images(root)
    with pytest.raises(DatasetError) as err:
        MITStatesDataset(root, image_size=32, verbose=False)
    msg = str(err.value)
    assert "3 unreadable image(s)" in msg and "data.on_bad_image=skip" in msg
    for p in victims.values():
        assert str(p) in msg
    assert "truncated JPEG" in msg and "empty file" in msg and "not an image" in msg

    ds = MITStatesDataset(root, image_size=32, on_bad_image="skip", verbose=False)
    assert ds.test.num_images == 12 and ds.train.num_images == 18
    assert sorted(p for p, _ in ds.skipped_images) == sorted(str(p) for p in victims.values())
    assert not set(ds.test.image_paths) & {str(p) for p in victims.values()}
    # castle 4 x 1, fish 4 x 2, tomato 4 x 1
    assert len(ds.test.test_queries) == 16


def test_corrupt_image_found_while_streaming_or_caching(ms_root, tmp_path):
    """A file whose head and tail look fine but whose data does not decode: named while streaming
    (error), replaced by a black image in evaluation (skip), found by the file cache (error/skip)."""
    from keras_irtf.data.pipeline import images_dataset

    root = tmp_path / "ms"
    shutil.copytree(ms_root, root)
    bad = root / "images" / "fresh fish" / "image_0001.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 4 + b"\xff\xd9")

    ds = MITStatesDataset(root, image_size=32, verbose=False)  # the header check passes
    bad_id = ds.test.image_paths.index(str(bad))
    with pytest.raises(Exception) as err:
        for _ in images_dataset(ds.test, np.arange(ds.test.num_images), 4, 32):
            pass
    assert str(bad) in str(err.value)

    ds.test.on_bad_image = "skip"
    batches = [b.numpy() for b in images_dataset(ds.test, np.arange(ds.test.num_images), 4, 32)]
    images = np.concatenate(batches)
    assert len(images) == ds.test.num_images  # the gallery keeps its order
    black = (0.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert np.allclose(images[bad_id], black, atol=1e-5)
    assert not np.allclose(images[bad_id + 1], black, atol=1e-2)

    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match="fresh fish/image_0001.jpg"):
        MITStatesDataset(root, image_size=32, file_cache=cache, verbose=False)
    cached = MITStatesDataset(root, image_size=32, file_cache=cache, on_bad_image="skip", verbose=False)
    assert cached.test.num_images == 14 and str(bad) not in cached.test.image_paths
    assert [p for p, _ in cached.skipped_images] == [str(bad)]
    # the cached images are the streamed ones
    streamed = MITStatesDataset(root, image_size=32, on_bad_image="skip", verbose=False)
    keep = [streamed.test.image_paths.index(p) for p in cached.test.image_paths]
    from_disk = np.concatenate([b.numpy() for b in images_dataset(streamed.test, keep, 8, 32)])
    from_cache = np.concatenate([b.numpy() for b in images_dataset(cached.test, np.arange(14), 8, 32)])
    assert np.allclose(from_disk, from_cache, atol=1e-6)


def test_training_skips_queries_with_unreadable_images(ms_root, tmp_path, capfd, monkeypatch):
    from keras_irtf.data.pipeline import training_dataset
    from keras_irtf.data.text import TextVectorizer

    root = tmp_path / "ms"
    shutil.copytree(ms_root, root)
    bad = root / "images" / "ripe apple" / "image_0000.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 4 + b"\xff\xd9")
    monkeypatch.chdir(tmp_path)  # nothing may be written into the working directory
    ds = MITStatesDataset(root, image_size=32, on_bad_image="skip", verbose=False)
    bad_id = ds.train.image_paths.index(str(bad))
    vec = TextVectorizer.from_texts(ds.training_texts(), 4)
    batches = list(training_dataset(ds, vec, 4, 30, seed=0, preprocessor=32))
    assert len(batches) == 30  # spare queries keep every batch full
    ids = np.concatenate([np.concatenate([b["source_id"].numpy(), b["target_id"].numpy()]) for b in batches])
    assert bad_id not in ids
    assert all(b["source_image"].shape == (4, 32, 32, 3) for b in batches)
    err = capfd.readouterr().err
    assert "skipping unreadable image" in err and "image_0000.jpg" in err  # said on standard error
    assert not (tmp_path / "stderr").exists()


@pytest.mark.slow
def test_train_and_evaluate_end_to_end(ms_root, tmp_path):
    from keras_irtf.training.loop import train

    run, metrics = train(small_config(ms_root, tmp_path / "run"), verbose=0)
    test = metrics["test"]
    for k in (1, 5, 10, 50):
        assert test[f"R@{k}"] <= test[f"noun_R@{k}"] + 1e-9  # a caption hit is also a noun hit
        assert test[f"R@{k}"] <= test[f"adjective_R@{k}"] + 1e-9
    # 14 other images in the gallery: every query's targets are within the top 14
    assert test["R@50"] == 1.0 and test["noun_R@1"] >= test["R@1"]
    assert metrics["steps"] == 2 and np.isfinite(metrics["final_losses"]["loss"])
    assert (run / "model.keras").is_file() and (run / "metrics.json").is_file()


def test_configs_carry_the_paper_hyper_parameters():
    tirg = load_config([repo_configs_dir() / "mitstates.yaml"])
    ga = load_config([repo_configs_dir() / "mitstates_ga.yaml"])
    for cfg in (tirg, ga):
        assert cfg.data.dataset == "mitstates" and cfg.data.image_size == 224
        assert cfg.train.batch_size == 32 and cfg.train.steps == 160000
        assert cfg.optim.learning_rate == 0.01 and cfg.optim.decay_steps == (50000, 100000, 150000)
        assert cfg.optim.weight_decay == 5e-5 and cfg.optim.backbone_lr_multiplier == 0.1
        assert cfg.model.method == "tirg" and cfg.model.image_encoder == "resnet18" and cfg.model.embed_dim == 512
    assert tirg.ga_methods == () and tirg.loss.eta == 0
    assert ga.ga_methods == ("adversarial", "isotropic") and ga.loss.eta == 0.001
    assert ga.ga.adversarial.eps == 1e-6 and ga.ga.isotropic.gamma == 0.01
