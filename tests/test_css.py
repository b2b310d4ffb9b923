import hashlib
from collections import Counter
import shutil

import numpy as np
import pytest

from keras_irtf.data.base import DatasetError
from keras_irtf.data.css import IMAGE_PATTERN, NPY_NAME, CSSDataset, render_2d
from keras_irtf.data.css_generator import SIZES_PRESETS, generate, held_out_combos


def _digest(root):
    h = hashlib.sha256((root / NPY_NAME).read_bytes())
    for p in sorted((root / "images").iterdir()):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_generator_writes_the_published_layout(css_smoke_root):
    data = np.load(css_smoke_root / NPY_NAME, allow_pickle=True).item()
    assert set(data) == {"train", "test"}
    for split in ("train", "test"):
        d = data[split]
        assert set(d) >= {"objects_img", "mods", "labels"}
        n = len(d["objects_img"])
        assert len(d["labels"]) == n
        for i in (0, n - 1):
            assert (css_smoke_root / "images" / IMAGE_PATTERN.format(split=split, index=i)).is_file()
        assert not (css_smoke_root / "images" / IMAGE_PATTERN.format(split=split, index=n)).exists()
        obj = d["objects_img"][0][0]
        assert set(obj) == {"shape", "color", "size", "pos"} and len(obj["pos"]) == 2
        for mod in d["mods"]:
            assert set(mod) == {"from", "to", "to_str"} and len(mod["from"]) == len(mod["to"])
        assert sum(len(m["from"]) for m in d["mods"]) == SIZES_PRESETS["smoke"][split]
    kinds = {m["to_str"].split()[0] for s in data.values() for m in s["mods"]}
    assert kinds == {"add", "remove", "make"}


def test_generator_is_deterministic(tmp_path, css_smoke_root):
    again = generate(tmp_path / "again", size="smoke", seed=0, verbose=False)
    assert _digest(again) == _digest(css_smoke_root)
    other = generate(tmp_path / "other", size="smoke", seed=1, verbose=False)
    assert _digest(other) != _digest(css_smoke_root)


def test_test_split_is_compositional(css_smoke_root):
    """Training scenes never hold a held-out shape-colour pair; every test query is about one."""
    data = np.load(css_smoke_root / NPY_NAME, allow_pickle=True).item()
    held = held_out_combos(0)
    assert len(held) == 8
    for objs in data["train"]["objects_img"]:
        assert all((o["shape"], o["color"]) not in held for o in objs)
    test = data["test"]
    for mod in test["mods"]:
        for f, t in zip(mod["from"], mod["to"]):
            src = Counter((o["shape"], o["color"], o["size"]) for o in test["objects_img"][f])
            tgt = Counter((o["shape"], o["color"], o["size"]) for o in test["objects_img"][t])
            changed = (src - tgt) + (tgt - src)  # multisets: a scene may hold two equal objects
            assert any((s, c) in held for s, c, _ in changed), mod["to_str"]


def test_loader_png_and_2d_modes_agree(css_smoke_root):
    png = CSSDataset(css_smoke_root, images="png", verbose=False)
    drawn = CSSDataset(css_smoke_root, images="2d", verbose=False)
    assert png.image_mode == {"train": "png", "test": "png"}
    assert drawn.image_mode == {"train": "2d", "test": "2d"}
    np.testing.assert_array_equal(png.test.images, drawn.test.images)
    assert png.test.images.shape[1:] == (64, 64, 3) and png.test.images.dtype == np.uint8


def test_render_2d_follows_the_reference_geometry():
    img = render_2d([{"shape": "rectangle", "color": "red", "size": "small", "pos": [0.5, 0.5]}])
    red = np.all(img == (244, 35, 35), axis=-1)
    ys, xs = np.nonzero(red)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (28, 36, 28, 36)  # centre 32, half-size 4
    img = render_2d([{"shape": "circle", "color": "blue", "size": "large", "pos": [0.5, 0.5]}])
    blue = np.all(img == (42, 75, 215), axis=-1)
    assert blue[32, 24] and blue[32, 40] and not blue[24, 24]  # a diamond, 8 px half-size
    img = render_2d([{"shape": "triangle", "color": "green", "size": "large", "pos": [0.5, 0.5]}])
    green = np.all(img == (29, 205, 20), axis=-1)
    assert green[40].sum() > green[26].sum()  # widening downwards


def test_missing_pngs_fall_back_to_2d_and_png_mode_explains(tmp_path, css_smoke_root):
    root = tmp_path / "nopng"
    root.mkdir()
    shutil.copy(css_smoke_root / NPY_NAME, root / NPY_NAME)
    assert CSSDataset(root, verbose=False).image_mode["test"] == "2d"
    with pytest.raises(DatasetError, match=r"train split: \d+ of \d+ PNG\(s\) missing.*css_train_000000\.png"):
        CSSDataset(root, images="png", verbose=False)


def test_one_missing_png_is_an_error_not_a_silent_2d_split(tmp_path, css_smoke_root):
    """Issue #15 item 8: without css_train_000000.png the train split used to be drawn in 2D
    while the test split read PNGs."""
    root = tmp_path / "onemissing"
    shutil.copytree(css_smoke_root, root)
    (root / "images" / "css_train_000000.png").unlink()
    for mode in ("auto", "png"):
        with pytest.raises(DatasetError, match=r"train split: 1 of \d+ PNG\(s\) missing.*css_train_000000\.png"
                                               r".*--css-images 2d"):
            CSSDataset(root, images=mode, verbose=False)
    assert CSSDataset(root, images="2d", verbose=False).image_mode == {"train": "2d", "test": "2d"}


def test_query_enumeration_follows_the_protocol(css_smoke):
    """One test query per (mod, from, to) pair; the target caption is the target's label."""
    data = np.load(css_smoke.root / NPY_NAME, allow_pickle=True).item()["test"]
    expected = [(f, m["to_str"], t) for m in data["mods"] for f, t in zip(m["from"], m["to"])]
    q = css_smoke.test.test_queries
    assert list(zip(q.source_ids.tolist(), q.texts.tolist(), q.target_ids.tolist())) == expected
    captions = [str(label) for label in data["labels"]]
    assert [css_smoke.test.caption_vocab[c] for c in q.target_captions] == [captions[t] for t in q.target_ids]


def test_training_sampler_pairs_queries_on_a_source(css_smoke):
    rng = np.random.default_rng(0)
    q = css_smoke.sample_training_queries(200, rng, paired=True)
    same_source = q.source_ids[0::2] == q.source_ids[1::2]
    other_text = q.texts[0::2] != q.texts[1::2]
    # a source with a second modification is reused with a different text
    assert np.mean(same_source & other_text) > 0.8
    again = css_smoke.sample_training_queries(200, np.random.default_rng(0), paired=True)
    np.testing.assert_array_equal(q.source_ids, again.source_ids)


@pytest.mark.parametrize("damage", ["no_npy", "missing_key", "bad_mod"])
def test_partial_dataset_folders_are_explained(tmp_path, css_smoke_root, damage):
    root = tmp_path / damage
    shutil.copytree(css_smoke_root, root)
    if damage == "no_npy":
        (root / NPY_NAME).unlink()
        match = r"css_toy_dataset_novel2_small\.dup\.npy not found; expected the CSS dataset"
    else:
        data = np.load(root / NPY_NAME, allow_pickle=True).item()
        if damage == "missing_key":
            del data["test"]["mods"]
            match = r"key test\.'mods' missing"
        else:
            data["train"]["mods"][0]["to"] = data["train"]["mods"][0]["to"][:-1] + [10**6]
            match = r"train\.mods\[0\] refers to image 1000000"
        np.save(root / NPY_NAME, data, allow_pickle=True)
    with pytest.raises(DatasetError, match=match):
        CSSDataset(root, verbose=False)


def test_a_validation_split_is_held_out_of_training_by_source_image(css_smoke_root, monkeypatch):
    """data.validation_fraction: a seeded share of the training queries, whole source images,
    leaves the sampler and Ms; the evaluation ranks them as Ms ranks the others ("val")."""
    from keras_irtf.evaluation import protocol

    every = CSSDataset(css_smoke_root, verbose=False).train_recall_queries(0, 0)
    ds = CSSDataset(css_smoke_root, verbose=False).hold_out_validation(0.25, seed=0)
    val, kept = ds.validation_queries, ds.train_recall_queries(0, 0)
    assert len(val) + len(kept) == len(every)
    assert 0.25 * len(every) <= len(val) < 0.25 * len(every) + max(len(v) for v in ds._by_source["train"].values()) + 1
    assert not set(val.source_ids.tolist()) & set(kept.source_ids.tolist())  # whole source images
    rows = set(zip(every.source_ids.tolist(), every.texts.tolist(), every.target_ids.tolist()))
    assert set(zip(val.source_ids.tolist(), val.texts.tolist(), val.target_ids.tolist())) <= rows
    sampled = ds.sample_training_queries(500, np.random.default_rng(0))
    assert not set(sampled.source_ids.tolist()) & set(val.source_ids.tolist())  # never trained on
    again = CSSDataset(css_smoke_root, verbose=False).hold_out_validation(0.25, seed=0).validation_queries
    np.testing.assert_array_equal(again.source_ids, val.source_ids)  # the same split for the same seed
    other = CSSDataset(css_smoke_root, verbose=False).hold_out_validation(0.25, seed=1).validation_queries
    assert set(other.source_ids.tolist()) != set(val.source_ids.tolist())
    with pytest.raises(ValueError, match="leaves fewer than 2"):
        CSSDataset(css_smoke_root, verbose=False).hold_out_validation(0.999, seed=0)

    seen = []
    rng = np.random.default_rng(0)
    monkeypatch.setattr(protocol, "embed_gallery",
                        lambda model, split, ids, *a, **k: rng.normal(size=(len(ids), 8)).astype("float32"))

    def queries(model, split, q, *a, **k):
        seen.append((split.name, q))
        return rng.normal(size=(len(q), 8)).astype("float32")

    monkeypatch.setattr(protocol, "embed_query_set", queries)
    out = protocol.evaluate(None, ds, None, seed=0, verbose=False)
    assert out["val"]["queries"] == len(val) and 0.0 <= out["val"]["R@10"] <= 1.0
    assert out["whm"]["Ms_queries"] == len(kept)
    assert [name for name, _ in seen] == ["test", "train", "train"]
    np.testing.assert_array_equal(seen[2][1].source_ids, val.source_ids)  # ranked in the training split
    assert "val" not in protocol.evaluate(None, CSSDataset(css_smoke_root, verbose=False), None, verbose=False)


def test_the_validation_fraction_is_a_css_key(css_smoke_root):
    from keras_irtf.config import ConfigError, load_config, repo_configs_dir
    from keras_irtf.data.base import refuse_css_only_keys
    from keras_irtf.registry import DATASETS

    cfg = load_config([repo_configs_dir() / "css.yaml"], [f"data.root={css_smoke_root}", "data.validation_fraction=0.2"])
    ds = DATASETS.get("css").obj.from_settings(cfg.data.dataset.settings, cfg, image_size=32, verbose=False)
    assert len(ds.validation_queries) > 0
    with pytest.raises(ConfigError, match="data.validation_fraction is available for the built-in CSS, not 'mitstates'"):
        refuse_css_only_keys(cfg, "mitstates")
    with pytest.raises(ConfigError, match=r"data.validation_fraction=1.0: expected a finite number >= 0 and < 1"):
        load_config([], ["data.validation_fraction=1.0"])
