"""Small datasets written in the official MIT-States and Fashion200k layouts (tests, benchmarks, demos).

The images are JPEGs drawn with Pillow: a colour per caption plus noise, of varying, non-square
sizes (so the resize-and-centre-crop path is exercised). Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# caption -> number of images. Test nouns come from the reference's list; train nouns do not.
MITSTATES_SPEC = {
    # train
    "ripe apple": 3, "rotten apple": 2, "sliced apple": 2,
    "old car": 2, "new car": 3,
    "wet dog": 2, "dry dog": 2,
    "big tree": 2,  # a noun with one adjective: no training query can start from it
    # test
    "ancient castle": 3, "ruined castle": 2,
    "fresh fish": 2, "cooked fish": 2, "frozen fish": 1,
    "ripe tomato": 2, "unripe tomato": 3,
    # not used by the protocol
    "adj castle": 2,
    "misc": 2,
}


def _jpeg(path: Path, rng, color, width=None, height=None, quality=85):
    w = int(width or rng.integers(40, 72))
    h = int(height or rng.integers(30, 64))
    base = np.array(color, dtype=np.float32)[None, None, :]
    noise = rng.normal(0, 25, size=(h, w, 3))
    img = np.clip(base + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=quality)


def _color(text: str):
    digest = sum((i + 1) * ord(ch) for i, ch in enumerate(text))
    rng = np.random.default_rng(digest)
    return tuple(int(v) for v in rng.integers(20, 235, size=3))


def write_mitstates(root, spec=None, seed: int = 0, size=None):
    """Write images/<adj noun>/image_<k>.jpg for every caption of `spec` (caption -> count).

    size: (width, height) for every image, or None for small random sizes."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for caption, count in (spec or MITSTATES_SPEC).items():
        for k in range(count):
            w, h = size or (None, None)
            _jpeg(root / "images" / caption / f"image_{k:04d}.jpg", rng, _color(caption), w, h)
    return root


# Fashion200k: label file -> [(caption, count)]; image paths follow the published pattern
FASHION200K_SPEC = {
    "dress_train_detect_all.txt": [("blue floral dress", 2), ("red floral dress", 2), ("blue striped dress", 1),
                                   ("white lace gown w. pockets", 1)],
    "jacket_train_detect_all.txt": [("black leather jacket", 2), ("brown leather jacket", 1)],
    "dress_test_detect_all.txt": [("pink floral dress", 2), ("pink striped dress", 1)],
    "jacket_test_detect_all.txt": [("grey wool coat", 2), ("navy wool coat", 1)],
}
CATEGORY_FOLDERS = {"dress": "dresses/casual_and_day_dresses", "jacket": "jackets/leather_jackets"}


def write_fashion200k(root, spec=None, seed: int = 0, test_queries=True):
    """Write labels/*.txt, women/<category>/.../<id>_<n>.jpeg and (optionally) test_queries.txt.

    Returns {caption: [relative image paths]} of the test split (in label-file order)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    next_id = 50000000
    test_paths = {}
    for label_file, items in (spec or FASHION200K_SPEC).items():
        category = CATEGORY_FOLDERS[label_file.split("_")[0]]
        lines = []
        for caption, count in items:
            for _ in range(count):
                rel = f"women/{category}/{next_id}/{next_id}_0.jpeg"
                next_id += 1
                _jpeg(root / rel, rng, _color(caption))
                lines.append(f"{rel}\t{rng.uniform(0.5, 1.0):.6f}\t{caption}\n")
                if "_test_" in label_file:
                    test_paths.setdefault(caption, []).append(rel)
        (root / "labels").mkdir(parents=True, exist_ok=True)
        (root / "labels" / label_file).write_text("".join(lines))
    if test_queries and spec is None:
        pairs = [
            (test_paths["pink floral dress"][0], test_paths["pink striped dress"][0]),
            (test_paths["pink striped dress"][0], test_paths["pink floral dress"][1]),
            (test_paths["grey wool coat"][0], test_paths["navy wool coat"][0]),
        ]
        (root / "test_queries.txt").write_text("".join(f"{a} {b}\n" for a, b in pairs))
    return test_paths
