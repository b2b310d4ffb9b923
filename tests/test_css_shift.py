"""The distribution-shift test split of CSS (keras_irtf.data.dataset.shift)."""

import numpy as np
import pytest

from keras_irtf.config import ConfigError
from keras_irtf.data.css import COLORS, CSSDataset, read_css_npy, render_2d
from keras_irtf.data.css_shift import noise_shifted, render_shifted, shifted_canvases
from tests.conftest import tiny_config


def _test_objects(root):
    return read_css_npy(root)["test"]["objects_img"]


def test_shifted_images_are_deterministic_and_differ_from_the_clean_rendering(css_smoke_root):
    objs = _test_objects(css_smoke_root)
    clean = np.stack([render_2d(o) for o in objs])
    for name in ("render", "noise"):
        a = shifted_canvases(objs, name, seed=0)
        np.testing.assert_array_equal(a, shifted_canvases(objs, name, seed=0))
        assert np.abs(a.astype(int) - shifted_canvases(objs, name, seed=1)).mean() > 1.0
        assert a.shape == clean.shape and a.dtype == np.uint8
        assert np.abs(a.astype(int) - clean).mean() > 2.0
    # image i depends on (seed, shift, i) only: a subset renders the same pixels
    np.testing.assert_array_equal(shifted_canvases(objs[:3], "render", 0), shifted_canvases(objs, "render", 0)[:3])


def test_render_shift_keeps_each_colour_name_size_and_cell():
    """Shades stay nearest to their own colour name; sizes stay apart; objects stay in their cell."""
    from keras_irtf.data.css_shift import _shade

    palette = np.array(list(COLORS.values()), float)
    names = list(COLORS)
    rng = np.random.default_rng(0)
    for name in names:
        shades = np.stack([_shade(COLORS[name], rng) for _ in range(300)])
        nearest = np.argmin(((shades[:, None] - palette[None]) ** 2).sum(-1), axis=1)
        assert (nearest == names.index(name)).all(), name
        assert shades.std(0).max() > 3.0  # other shades, not the one colour
    for trial in range(60):
        shape = ("rectangle", "circle", "triangle")[trial % 3]
        size = ("small", "large")[trial % 2]
        obj = {"shape": shape, "color": names[trial % 8], "size": size, "pos": [0.5, 0.5]}
        img = render_shifted([obj], np.random.default_rng([7, trial])).astype(float)
        background = render_shifted([], np.random.default_rng([7, trial])).astype(float)  # drawn first
        assert 215 <= background.min() and background.max() <= 255 and background.std() > 2  # texture
        ys, xs = np.nonzero(np.abs(img - background).sum(-1) > 0)
        extent = ys.max() - ys.min() + 1
        assert (extent <= 11) if size == "small" else (extent >= 12)  # 2 x 4 x 1.25 + 1 vs 2 x 8 x 0.8
        assert abs(ys.mean() - 32) < 8 and abs(xs.mean() - 32) < 8  # +- 0.05 of 64 px plus the shape


def test_noise_shift_blurs_and_adds_signal_dependent_noise():
    canvas = np.full((64, 64, 3), 255, np.uint8)
    canvas[:, :32] = 0
    out = noise_shifted(canvas, np.random.default_rng(0)).astype(float)
    white, black = out[8:56, 44:60], out[8:56, 4:20]
    assert 5.0 < (255 - white).std() + abs(255 - white.mean()) < 20.0  # ~ 0.049 * 255 = 12.5 levels
    assert black.std() < white.std()  # less noise in the dark (signal-dependent)
    edge = out[32, 28:36, 0]
    assert 20 < edge[3] < 235 or 20 < edge[4] < 235  # the step is blurred


def test_generator_writes_shift_pngs_that_the_loader_reads(tmp_path):
    from keras_irtf.data.css_generator import generate
    from keras_irtf.data.css import attach_shift

    root = generate(tmp_path / "css", size="smoke", seed=2, verbose=False, shifts=["render"])
    assert (root / "shift_render" / "css_test_000000.png").is_file()
    from_png = attach_shift(CSSDataset(root, verbose=False), "render", 2, verbose=False).test_shift.images
    (root / "shift_render" / "css_test_000000.png").unlink()  # -> rendered on the fly
    on_the_fly = attach_shift(CSSDataset(root, verbose=False), "render", 2, verbose=False).test_shift.images
    np.testing.assert_array_equal(from_png, on_the_fly)


def test_shift_split_has_the_test_queries_and_captions(css_smoke_root):
    from keras_irtf.data import load_dataset

    ds = load_dataset(tiny_config(css_smoke_root, "data.dataset.shift=noise"), verbose=False)
    t, s = ds.test, ds.test_shift
    assert s.name == "test_shift" and s.captions == t.captions and s.test_queries is t.test_queries
    assert s.images.shape == t.images.shape and np.abs(s.images.astype(int) - t.images).mean() > 2
    with pytest.raises(ConfigError, match="data.dataset.shift"):
        load_dataset(tiny_config(css_smoke_root, "data.dataset.shift=fog"), verbose=False)


def test_training_with_a_shift_writes_a_test_shift_block(css_smoke_root, tmp_path):
    from keras_irtf.training.loop import train

    cfg = tiny_config(css_smoke_root, "data.dataset.shift=render", "train.steps=6", "train.steps_per_epoch=6",
                      f"train.out={tmp_path / 'run'}")
    _, metrics = train(cfg, verbose=0)
    assert set(metrics["test_shift"]) == set(metrics["test"])
    w = metrics["whm_shift"]
    assert w["shift"] == "render" and w["Ms"] == metrics["whm"]["Ms"]
    mt = np.mean([metrics["test_shift"][f"R@{k}"] for k in (1, 5, 10)])
    assert w["Mt"] == pytest.approx(mt)
    assert w["value"] == pytest.approx(1.5 * w["Ms"] * mt / (0.5 * mt + w["Ms"]))
