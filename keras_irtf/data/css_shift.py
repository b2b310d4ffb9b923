"""A distribution-shift test split for CSS: the same scenes and queries, rendered differently.

GA's argument is about generalisation to distributions other than the training one. The test
split of CSS is compositional (unseen shape-colour pairs) but rendered exactly like the
training split. `data.css_shift=NAME` adds `dataset.test_shift`: the test split's scenes and
queries (same captions, same targets) under a rendering that training never sees, evaluated
like the test split (metrics.json: a `test_shift` block and `whm_shift` = WHM(Ms, Mt_shift)).

    render  each object in another shade of its colour name (hue +- 0.02, saturation x 0.7..1.1,
            value x 0.8..1.1 in HSV; grays get only the value change), its size x 0.8..1.25,
            its position moved by up to +- 0.05 of the canvas within its cell, an outline of
            0, 1 or 2 pixels in a darker shade; a low-contrast background texture (a random
            plane wave and smooth blotches, 215..255 instead of flat white)
    noise   the standard rendering, blurred (Gaussian, sigma 0.5..1.0 px) and with sensor-like
            noise: signal-dependent Gaussian, standard deviation sqrt(0.0004 + 0.002 x) for
            intensity x in [0, 1] (about 5 to 12 levels of 255), rounded to 8 bits

Scenes are drawn on the 64x64 canvas, then resized like the 2D renderer does. Image i of the
shifted split is a function of (css seed, shift, i) only. The generator can write the shifted
images in the published layout, `<root>/shift_<name>/css_test_<index:06d>.png`
(`python -m keras_irtf.data.css_generator --shift render,noise`); the loader
(keras_irtf.data.css.attach_shift) reads them when present and renders them otherwise (the same
pixels). This module draws with numpy and Pillow only, so that the generator needs no TensorFlow.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image

from keras_irtf.data.css_scenes import CANVAS, COLORS, IMAGE_PATTERN, render_2d

SHIFTS = ("render", "noise")
_SHIFT_ID = {"render": 1, "noise": 2}


def shift_folder(root, name: str) -> Path:
    return Path(root) / f"shift_{name}"


def _rng(seed: int, name: str, index: int):
    return np.random.default_rng([int(seed), _SHIFT_ID[name], int(index)])


def _shade(rgb, rng):
    r, g, b = (c / 255.0 for c in rgb)
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    if s > 0.05:
        h = (h + rng.uniform(-0.02, 0.02)) % 1.0
        s = min(1.0, s * rng.uniform(0.7, 1.1))
    v = min(1.0, v * rng.uniform(0.8, 1.1))
    return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255.0


def _mask(shape, y, x, s, yy, xx):
    dy, dx = yy - y, np.abs(xx - x)
    if shape == "rectangle":
        return (np.abs(dy) <= s) & (dx <= s)
    if shape == "circle":  # the reference's "circle" is a diamond
        return np.abs(dy) + dx <= s
    if shape == "triangle":
        return (np.abs(dy) <= s) & (dx <= (dy + s) / 2.0)
    raise ValueError(f"unknown CSS shape {shape!r}")


def _background(rng):
    yy, xx = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float64)
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 16)
    wave = np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period + rng.uniform(0, 2 * np.pi))
    blotch = np.kron(rng.normal(size=(8, 8)), np.ones((8, 8)))
    kernel = np.exp(-0.5 * (np.arange(-6, 7) / 3.0) ** 2)
    kernel /= kernel.sum()
    blotch = _separable(blotch, kernel)
    level = 240.0 + 7.0 * wave + 6.0 * blotch / (np.abs(blotch).max() + 1e-9)
    tint = rng.uniform(-4, 4, size=3)
    return np.clip(level[..., None] + tint, 215.0, 255.0)


def _separable(img, kernel):
    pad = len(kernel) // 2
    out = np.pad(img, [(pad, pad), (pad, pad)] + [(0, 0)] * (img.ndim - 2), mode="edge")
    out = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="valid"), 0, out)
    return np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="valid"), 1, out)


def render_shifted(objects, rng) -> np.ndarray:
    """The `render` shift of one scene on the 64x64 canvas (uint8 HxWx3)."""
    img = _background(rng)
    yy, xx = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float64)
    for obj in objects:
        fill = _shade(COLORS[obj["color"]], rng)
        outline = fill * rng.uniform(0.45, 0.65)
        s = (8.0 if obj["size"] == "large" else 4.0) * rng.uniform(0.8, 1.25)
        y = (float(obj["pos"][0]) + rng.uniform(-0.05, 0.05)) * CANVAS
        x = (float(obj["pos"][1]) + rng.uniform(-0.05, 0.05)) * CANVAS
        thickness = int(rng.integers(0, 3))
        outer = _mask(obj["shape"], y, x, s, yy, xx)
        inner = _mask(obj["shape"], y, x, max(s - thickness, 1.0), yy, xx) if thickness else outer
        img[outer] = outline
        img[inner] = fill
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def noise_shifted(canvas, rng) -> np.ndarray:
    """The `noise` shift of one clean 64x64 rendering: blur, then signal-dependent noise."""
    sigma = rng.uniform(0.5, 1.0)
    taps = np.arange(-3, 4)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    x = _separable(canvas.astype(np.float64) / 255.0, kernel)
    x = x + rng.normal(size=x.shape) * np.sqrt(0.0004 + 0.002 * np.clip(x, 0, 1))
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def shifted_canvases(objects_img, name: str, seed: int, clean=None) -> np.ndarray:
    """uint8 [N, 64, 64, 3]: the test scenes under shift `name`. `clean` (the standard 64x64
    renderings, for `noise`) defaults to the 2D renderer's."""
    if name not in SHIFTS:
        raise ValueError(f"unknown CSS shift {name!r}; expected one of {SHIFTS}")
    out = np.empty((len(objects_img), CANVAS, CANVAS, 3), np.uint8)
    for i, objs in enumerate(objects_img):
        rng = _rng(seed, name, i)
        if name == "render":
            out[i] = render_shifted(objs, rng)
        else:
            base = render_2d(objs) if clean is None else clean[i]
            out[i] = noise_shifted(base, rng)
    return out


def resize_canvases(canvases, size: int) -> np.ndarray:
    """64x64 canvases [N, 64, 64, 3] at `size` (bilinear, as the 2D renderer resizes)."""
    if size == CANVAS:
        return canvases
    return np.stack([np.asarray(Image.fromarray(c).resize((size, size), Image.BILINEAR)) for c in canvases])


def write_shift_pngs(root, objects_img, name: str, seed: int, clean=None):
    """The shifted test images as PNGs under `<root>/shift_<name>/` (the published naming)."""
    folder = shift_folder(root, name)
    folder.mkdir(parents=True, exist_ok=True)
    for i, canvas in enumerate(shifted_canvases(objects_img, name, seed, clean)):
        Image.fromarray(canvas).save(folder / IMAGE_PATTERN.format(split="test", index=i), optimize=False)
    return folder


__all__ = ["SHIFTS", "noise_shifted", "render_shifted", "resize_canvases", "shift_folder", "shifted_canvases",
           "write_shift_pngs"]
