"""The built-in CSS benchmark: a generator of CSS-style scenes and modification queries.

It follows the grammar of the published CSS set (three shapes, eight colours, two sizes, objects
on a 3x3 grid; modification texts that add an object, remove one, or change an attribute of
one) and writes the published layout (the .npy dict and one PNG per scene), so that
`keras_irtf.data.css.CSSDataset` reads the generated and the published data alike.

The split is compositional, like the published "novel" split: a third of the shape-colour
combinations never appear in the training scenes, and every test query's modified object has
one of them. Everything is determined by the seed.

    python -m keras_irtf.data.css_generator --size small --out data/cache/css_small_s0

The `css` dataset (keras_irtf.data.css.CSSBenchmark) generates the benchmark on first use when no
data.root is given; its settings are `CSSConfig`. Generating needs numpy and Pillow, not
TensorFlow.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from keras_irtf.config import NON_NEGATIVE
from keras_irtf.data.css_scenes import COLORS, IMAGE_PATTERN, NPY_NAME, SHAPES, SIZES, render_2d
from keras_irtf.data.css_shift import write_shift_pngs
from keras_irtf.safety import NotOwnedError, mark_owned, prepare_output_folder, remove_owned, replace_folder
from keras_irtf.utils import Progress

COLOR_NAMES = tuple(COLORS)
OWNED_KIND = "CSS benchmark"  # the kind named in a generated folder's ownership marker


@dataclasses.dataclass
class CSSConfig:
    DOMAINS = {"seed": NON_NEGATIVE}
    CHOICES = {"size": ("smoke", "small", "full"), "images": ("auto", "png", "2d"),
               "sampler": ("reference", "uniform_pairs"), "shift": ("None", "render", "noise")}
    size: str = "small"  # the built-in benchmark's size: smoke | small | full
    seed: int = 0  # generator seed (the dataset itself), independent of the training seed
    images: str = "auto"  # auto (PNGs when images/ has any, each then required; else 2D) | png | 2d
    # training sampler: reference (TIRG: a modification record uniformly, then one of its pairs)
    # | uniform_pairs (uniformly over all pairs)
    sampler: str = "reference"
    # also evaluate on the test split rendered under a shift training never sees (None | render |
    # noise; keras_irtf.data.css_shift): metrics.json then has a test_shift block
    shift: Optional[str] = None


ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
CELL_CENTERS = (0.2, 0.5, 0.8)
JITTER = 0.03  # of the canvas: the same scene is never rendered twice to the same pixels

# Query counts per split. `full` has the published set's counts.
SIZES_PRESETS = {
    "smoke": {"train": 48, "test": 36},
    "small": {"train": 4800, "test": 2400},
    "full": {"train": 19012, "test": 19057},
}
MODS_PER_SCENE = 3


def cell_name(cell: int) -> str:
    return f"{ROWS[cell // 3]}-{COLS[cell % 3]}"


def held_out_combos(seed: int) -> set:
    """Shape-colour pairs kept out of training: each colour with one shape (a third of them),
    so every word is still seen in training, but not every combination."""
    shift = seed % len(SHAPES)
    return {(SHAPES[(i + shift) % len(SHAPES)], c) for i, c in enumerate(COLOR_NAMES)}


class _SceneWriter:
    """Collects images (object lists, with their canonical labels) of one split."""

    def __init__(self, rng):
        self.rng = rng
        self.objects = []
        self.labels = []
        self._label_of = {}

    def add(self, scene) -> int:
        """scene: dict cell -> (shape, color, size). Returns the new image id."""
        key = tuple(sorted(scene.items()))
        label = self._label_of.setdefault(key, len(self._label_of))
        objs = []
        for cell, (shape, color, size) in sorted(scene.items()):
            jy, jx = self.rng.uniform(-JITTER, JITTER, size=2)
            pos = [round(CELL_CENTERS[cell // 3] + float(jy), 4), round(CELL_CENTERS[cell % 3] + float(jx), 4)]
            objs.append({"shape": shape, "color": color, "size": size, "pos": pos})
        self.objects.append(objs)
        self.labels.append(label)
        return len(self.objects) - 1


def _random_object(rng, allowed):
    while True:
        obj = (SHAPES[rng.integers(3)], COLOR_NAMES[rng.integers(8)], SIZES[rng.integers(2)])
        if allowed((obj[0], obj[1])):
            return obj


def _propose_mod(rng, scene):
    """One random modification of `scene`: (text, new scene, the object it is about)."""
    kind = ("add", "remove", "change")[rng.integers(3)]
    cells = sorted(scene)
    if kind == "add":
        free = [c for c in range(9) if c not in scene]
        if not free:
            return None
        cell = free[rng.integers(len(free))]
        obj = (SHAPES[rng.integers(3)], COLOR_NAMES[rng.integers(8)], SIZES[rng.integers(2)])
        new = dict(scene)
        new[cell] = obj
        return f"add {obj[2]} {obj[1]} {obj[0]} to {cell_name(cell)}", new, obj
    if kind == "remove":
        if len(scene) < 2:
            return None
        cell = cells[rng.integers(len(cells))]
        obj = scene[cell]
        new = {c: o for c, o in scene.items() if c != cell}
        return f"remove {cell_name(cell)} object", new, obj
    cell = cells[rng.integers(len(cells))]
    shape, color, size = scene[cell]
    attr = ("shape", "color", "size")[rng.integers(3)]
    if attr == "shape":
        value = [s for s in SHAPES if s != shape][rng.integers(2)]
        obj = (value, color, size)
    elif attr == "color":
        value = [c for c in COLOR_NAMES if c != color][rng.integers(7)]
        obj = (shape, value, size)
    else:
        value = "large" if size == "small" else "small"
        obj = (shape, color, value)
    new = dict(scene)
    new[cell] = obj
    return f"make {cell_name(cell)} object {value}", new, obj


def generate_split(split: str, n_queries: int, rng, held_out: set):
    """Scenes and modification records of one split, as the published dict stores them."""
    train = split == "train"

    def scene_ok(scene):
        return not train or all((o[0], o[1]) not in held_out for o in scene.values())

    writer = _SceneWriter(rng)
    pairs = []  # (from id, to id, text)
    while len(pairs) < n_queries:
        n_obj = int(rng.integers(2, 5))
        cells = rng.choice(9, size=n_obj, replace=False)
        if train:
            scene = {int(c): _random_object(rng, lambda so: so not in held_out) for c in cells}
        else:
            scene = {int(c): _random_object(rng, lambda so: True) for c in cells}
        mods, texts, tries = [], set(), 0
        while len(mods) < MODS_PER_SCENE and tries < 50:
            tries += 1
            proposal = _propose_mod(rng, scene)
            if proposal is None:
                continue
            text, new, obj = proposal
            if text in texts or not scene_ok(new):
                continue
            if not train and (obj[0], obj[1]) not in held_out:
                continue  # test queries are about an unseen shape-colour combination
            texts.add(text)
            mods.append((text, new))
        if not mods:
            continue
        src = writer.add(scene)
        for text, new in mods:
            if len(pairs) >= n_queries:
                break
            pairs.append((src, writer.add(new), text))
    records, index = [], {}
    for f, t, text in pairs:
        if text not in index:
            index[text] = len(records)
            records.append({"from": [], "to": [], "to_str": text})
        records[index[text]]["from"].append(f)
        records[index[text]]["to"].append(t)
    return {"objects_img": writer.objects, "labels": writer.labels, "mods": records}


def generate(out, size: str = CSSConfig.size, seed: int = CSSConfig.seed, write_png: bool = True,
             verbose: bool = True, shifts=(), overwrite: bool = False) -> Path:
    """Write the benchmark to `out` in the published layout (atomically: all or nothing).

    `out` must be missing, empty, or (with `overwrite`) a CSS benchmark this generator wrote
    (its `.keras_irtf.json` marker says so); a folder holding anything else is refused with
    NotOwnedError before any work, and never deleted.

    shifts: also write the test split under these rendering shifts (keras_irtf.data.css_shift)
    as `shift_<name>/css_test_<index:06d>.png`."""
    if size not in SIZES_PRESETS:
        raise ValueError(f"unknown CSS size {size!r}; expected one of {sorted(SIZES_PRESETS)}")
    out = Path(out)
    prepare_output_folder(out, OWNED_KIND, hint="choose a new or empty folder for the generated benchmark",
                          replace=overwrite, replace_flag="--overwrite")
    rng = np.random.default_rng(seed)
    held_out = held_out_combos(seed)
    data = {
        split: generate_split(split, SIZES_PRESETS[size][split], rng, held_out)
        for split in ("train", "test")
    }
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    remove_owned(tmp, OWNED_KIND)  # left by a crashed run of a process with this pid
    (tmp / "images").mkdir(parents=True)
    mark_owned(tmp, OWNED_KIND, size=size, seed=int(seed))
    try:
        if write_png:
            total = sum(len(d["objects_img"]) for d in data.values())
            progress = Progress(total, f"writing CSS {size} images to {out}", enabled=verbose)
            for split, d in data.items():
                for i, objs in enumerate(d["objects_img"]):
                    Image.fromarray(render_2d(objs)).save(
                        tmp / "images" / IMAGE_PATTERN.format(split=split, index=i), optimize=False
                    )
                    progress.update()
        np.save(tmp / NPY_NAME, data, allow_pickle=True)
        if shifts:
            for name in shifts:
                write_shift_pngs(tmp, data["test"]["objects_img"], name, seed)
        replace_folder(tmp, out, OWNED_KIND)
    except BaseException:
        with contextlib.suppress(OSError, NotOwnedError):
            remove_owned(tmp, OWNED_KIND)
        raise
    return out


def ensure_generated(cache_dir, size: str, seed: int, verbose: bool = True) -> Path:
    """The generated benchmark's folder, generating it on first use."""
    out = Path(cache_dir) / f"css_{size}_s{seed}"
    if not (out / NPY_NAME).is_file():
        generate(out, size=size, seed=seed, verbose=verbose, overwrite=True)  # replaces only a generated set
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--size", default=CSSConfig.size, choices=sorted(SIZES_PRESETS))
    parser.add_argument("--seed", type=int, default=CSSConfig.seed)
    parser.add_argument("--no-png", action="store_true", help="write only the .npy (images drawn in 2D)")
    parser.add_argument("--shift", default="", help="also write the test split under these rendering shifts "
                        "(comma-separated: render,noise; see keras_irtf.data.css_shift)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a benchmark this generator wrote earlier in --out (never other files)")
    args = parser.parse_args(argv)
    shifts = [x.strip() for x in args.shift.split(",") if x.strip()]
    try:
        path = generate(args.out, args.size, args.seed, write_png=not args.no_png, shifts=shifts,
                        overwrite=args.overwrite)
    except NotOwnedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
