"""The CSS layout and scenes, without TensorFlow: file names, the scene grammar's values, the 2D
renderer and the reader of the pickled .npy dict.

    <root>/css_toy_dataset_novel2_small.dup.npy   pickled dict {'train': ..., 'test': ...}
    <root>/images/css_<split>_<index:06d>.png      one rendering per scene

The generator (keras_irtf.data.css_generator), the rendering shifts (keras_irtf.data.css_shift)
and the demo's ground truth read and draw scenes with these alone; the dataset, which decodes
the PNGs with TensorFlow, is keras_irtf.data.css (it re-exports these names).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from keras_irtf.data.base import DatasetError
from keras_irtf.data.safe_files import UnsafeFileError, load_pickled_npy

NPY_NAME = "css_toy_dataset_novel2_small.dup.npy"
IMAGE_PATTERN = "css_{split}_{index:06d}.png"

COLORS = {
    "gray": (87, 87, 87),
    "red": (244, 35, 35),
    "blue": (42, 75, 215),
    "green": (29, 205, 20),
    "brown": (129, 74, 25),
    "purple": (129, 38, 192),
    "cyan": (41, 208, 208),
    "yellow": (255, 238, 51),
}
SHAPES = ("rectangle", "circle", "triangle")
SIZES = ("small", "large")
CANVAS = 64


def render_2d(objects, size: int = CANVAS) -> np.ndarray:
    """Draw a scene's object list on a white canvas (the reference's 2D rendering), uint8 HxWx3."""
    img = np.full((CANVAS, CANVAS, 3), 255, dtype=np.uint8)
    for obj in objects:
        color = np.array(COLORS[obj["color"]], dtype=np.uint8)
        s = 8 if obj["size"] == "large" else 4
        y = int(round(float(obj["pos"][0]) * CANVAS))
        x = int(round(float(obj["pos"][1]) * CANVAS))
        shape = obj["shape"]
        for y0 in range(max(0, y - s), min(CANVAS, y + s + 1)):
            if shape == "rectangle":
                half = s
            elif shape == "circle":
                half = s - abs(y0 - y)
            elif shape == "triangle":
                half = (y0 - y + s) // 2
            else:
                raise DatasetError(f"CSS object has unknown shape {shape!r}; expected {SHAPES}")
            x0, x1 = max(0, x - half), min(CANVAS, x + half + 1)
            if x1 > x0:
                img[y0, x0:x1] = color
    if size != CANVAS:
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
    return img


def layout_help(root) -> str:
    return (
        f"expected the CSS dataset in its published layout under {root}: "
        f"{NPY_NAME} (a pickled dict with 'train' and 'test', each with 'objects_img' and 'mods') "
        f"and images/css_<split>_<index:06d>.png. Generate the built-in benchmark with "
        f"`python tools/train.py --dataset css` (no --data-root), or "
        f"`python -m keras_irtf.data.css_generator --out DIR`."
    )


def read_css_npy(root) -> dict:
    root = Path(root)
    path = root / NPY_NAME
    if not path.is_file():
        raise DatasetError(f"{path} not found; " + layout_help(root))
    try:
        # a crafted pickle runs code when loaded: unpickle plain data only
        data = load_pickled_npy(path)
    except UnsafeFileError:
        raise
    except Exception as e:  # a truncated or foreign file
        raise DatasetError(f"{path} could not be read as a pickled dict ({e}); " + layout_help(root)) from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path} holds a {type(data).__name__}, not a pickled dict; " + layout_help(root))
    for split in ("train", "test"):
        if split not in data:
            raise DatasetError(f"{path}: key {split!r} missing; " + layout_help(root))
        for key in ("objects_img", "mods"):
            if key not in data[split]:
                raise DatasetError(f"{path}: key {split}.{key!r} missing; " + layout_help(root))
        for i, mod in enumerate(data[split]["mods"][:50]):
            missing = [k for k in ("from", "to", "to_str") if k not in mod]
            if missing:
                raise DatasetError(f"{path}: {split}.mods[{i}] lacks {missing}; " + layout_help(root))
    return data
