"""Small datasets in the official FashionIQ and CIRR layouts and the triplets format (tests, demos).

Images are drawn with Pillow: a colour per image name plus noise, of small, non-square sizes,
deterministic for a seed. Each writer returns the ground truth it wrote (names, queries, texts),
so a test can state expected values without reading the files back. Sizes are chosen for tests
that train on them on a 2-core CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from keras_irtf.data.cirr import arrangement_dirs
from keras_irtf.evaluation import protocol
from keras_irtf.testing.fixtures import _color, _jpeg

FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")
# relative captions with the stray punctuation and spaces the published files have
_COLOURS = ("is darker.", "is red ", "is lighter, ", "is blue?", "is green.", "is white", "is black.", "is pink ")
_DETAILS = ("has longer sleeves.", " has a collar", "is shorter?", "has stripes.", "is plain", "has a print, ")
_EDITS = ("make it a dog", "add a person", "show two of them", "remove the background", "zoom in", "make it red")
_TEST1_EDITS = ("make it night", "add a ball", "show it from above", "change the colour to green")


def _write_json(path: Path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def _draw(path: Path, rng, name: str):
    """An image whose colour follows its name (distinct images look distinct)."""
    _jpeg(path, rng, _color(name))


def write_fashioniq(root, categories=FASHIONIQ_CATEGORIES, train_images: int = 8, val_images: int = 6,
                    seed: int = 0, extension: str = ".jpg") -> dict:
    """Write captions/, image_splits/ and images/ of a small FashionIQ.

    Per category c: train images "c_tr00".."c_tr<train_images-1>", triplets k -> k+1 (cyclic);
    val images "c_va00".."c_va<val_images-1>", all in split.c.val.json; val queries k -> (k+1) mod
    (val_images-1) for k < val_images-1 (the last val image is in the gallery only, referenced by
    no caption, as in the published files); a test split (no targets) over the first val image.
    Captions are two relative captions per triplet, with the published files' stray punctuation.

    Returns {"categories", "extension", "train": {c: [{"candidate", "target", "captions"}]},
    "val": {c: {"gallery": [names], "queries": [{"candidate", "target", "captions"}]}}}.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    truth = {"categories": list(categories), "extension": extension, "train": {}, "val": {}}
    for ci, c in enumerate(categories):
        for split, count in (("train", train_images), ("val", val_images)):
            names = [f"{c}_{split[:2]}{k:02d}" for k in range(count)]
            for name in names:
                _draw(root / "images" / f"{name}{extension}", rng, name)
            cycle = count if split == "train" else count - 1
            triplets = [{"candidate": names[k], "target": names[(k + 1) % cycle],
                         "captions": [_COLOURS[(k + ci) % len(_COLOURS)], _DETAILS[(k + 2 * ci) % len(_DETAILS)]]}
                        for k in range(cycle)]
            _write_json(root / "captions" / f"cap.{c}.{split}.json", triplets)
            _write_json(root / "image_splits" / f"split.{c}.{split}.json", names)
            if split == "train":
                truth["train"][c] = triplets
            else:
                truth["val"][c] = {"gallery": names, "queries": triplets}
        first = truth["val"][c]["gallery"][0]
        _write_json(root / "captions" / f"cap.{c}.test.json", [{"candidate": first, "captions": ["is red", "is long"]}])
        _write_json(root / "image_splits" / f"split.{c}.test.json", [first])
    return truth


def _cirr_split(image_root: Path, rng, prefix: str, count: int, folder) -> dict:
    """{name: "./<folder>/<name>.png"} with the images drawn."""
    out = {}
    for k in range(count):
        name = f"{prefix}-{k}-{k % 2}-img{k % 2}"
        rel = f"./{folder(k)}/{name}.png"
        _draw(image_root / rel, rng, name)
        out[name] = rel
    return out


def _cirr_queries(names, set_size: int, with_target: bool):
    """A query per image: reference i, target the next image of its img_set (cyclic)."""
    queries = []
    edits = _EDITS if with_target else _TEST1_EDITS
    for i, reference in enumerate(names):
        start = (i // set_size) * set_size
        members = names[start : start + set_size]
        target = members[(i - start + 1) % len(members)]
        q = {"pairid": i, "reference": reference, "caption": edits[i % len(edits)],
             "img_set": {"id": i // set_size, "members": members}}
        if with_target:
            q["target_hard"] = target
            q["target_soft"] = {target: 1.0}
        queries.append(q)
    return queries


def write_cirr(root, arrangement: str = "cirr", train_images: int = 12, val_images: int = 12, test1_images: int = 6,
               set_size: int = 6, seed: int = 0) -> dict:
    """Write a small CIRR in one of its published arrangements ("cirr": captions/, image_splits/,
    img_raw/...; "clip4cir": cirr/captions/, cirr/image_splits/, images in the root).

    Images: train "train-<k>-<k%2>-img<k%2>" under ./train/<k%3>/, val "dev-..." under ./dev/,
    test1 "test1-..." under ./test1/ (PNGs). img_sets are consecutive runs of `set_size` images of
    a split; every image is the reference of one query whose target is the next image of its set
    (cyclic), pairids numbered from 0 per split. test1 queries have no target, and captions of
    their own (not among the training ones).

    Returns {"arrangement", "meta_dir", "image_root", "train" | "val" | "test1": {"names": [...],
    "paths": {name: rel}, "queries": [the written entries]}}.
    """
    root = Path(root)
    meta, images = arrangement_dirs(root, arrangement)
    rng = np.random.default_rng(seed)
    truth = {"arrangement": arrangement, "meta_dir": meta, "image_root": images}
    layout = {"train": ("train", train_images, lambda k: f"train/{k % 3}"),
              "val": ("dev", val_images, lambda k: "dev"),
              "test1": ("test1", test1_images, lambda k: "test1")}
    for split, (prefix, count, folder) in layout.items():
        paths = _cirr_split(images, rng, prefix, count, folder)
        names = list(paths)
        queries = _cirr_queries(names, set_size, split != "test1")
        _write_json(meta / "captions" / f"cap.rc2.{split}.json", queries)
        _write_json(meta / "image_splits" / f"split.rc2.{split}.json", paths)
        truth[split] = {"names": names, "paths": paths, "queries": queries}
    return truth


def write_triplets(root, train_images: int = 8, test_images: int = 6, distractors: int = 2, gallery: bool = True,
                   seed: int = 0) -> dict:
    """Write a triplets folder: images/train/img<k>.jpg, images/test/img<k>.jpg (and
    images/test/distractor<k>.jpg), train.jsonl and test.jsonl (image k -> image k+1, cyclic,
    texts from a fixed list) and, with `gallery`, gallery.txt (every test image, then the
    distractors, which no query names).

    Returns {"train": [{"source", "text", "target"}], "test": [...], "gallery": [paths] or None}.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    truth = {}
    for split, count in (("train", train_images), ("test", test_images)):
        paths = [f"images/{split}/img{k}.jpg" for k in range(count)]
        for p in paths:
            _draw(root / p, rng, p)
        rows = [{"source": paths[k], "text": _EDITS[k % len(_EDITS)], "target": paths[(k + 1) % count]}
                for k in range(count)]
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        truth[split] = rows
    truth["gallery"] = None
    if gallery:
        extra = [f"images/test/distractor{k}.jpg" for k in range(distractors)]
        for p in extra:
            _draw(root / p, rng, p)
        truth["gallery"] = [r["source"] for r in truth["test"]] + extra
        (root / "gallery.txt").write_text("".join(p + "\n" for p in truth["gallery"]))
    return truth


# ---- hand-made embeddings (protocol tests) ----------------------------------------------------------
def ranking_embeddings(orders, num_images: int):
    """(image_emb [N, N], query_emb [Q, N]) whose scores rank, for query q, the image ids of
    `orders[q]` first, in that order, then every other image by ascending id (image embeddings
    are one-hot, so a query's scores are its own entries: distinct integers N, N-1, ..., 1)."""
    image_emb = np.eye(num_images, dtype=np.float32)
    query_emb = np.zeros((len(orders), num_images), np.float32)
    for q, order in enumerate(orders):
        order = [int(i) for i in order]
        full = order + [i for i in range(num_images) if i not in order]
        query_emb[q, full] = np.arange(num_images, 0, -1, dtype=np.float32)
    return image_emb, query_emb


def patch_embeddings(monkeypatch, image_emb, query_emb):
    """Make keras_irtf.evaluation.protocol embed images and queries with the given arrays
    (image id -> row of image_emb; the queries, in order -> query_emb) instead of a model."""
    monkeypatch.setattr(protocol, "embed_gallery", lambda model, split, ids, *a, **k: image_emb[np.asarray(ids)])
    monkeypatch.setattr(protocol, "embed_query_set", lambda model, split, queries, *a, **k: query_emb[: len(queries)])


def tiny_run_overrides(dataset: str, root) -> list:
    """Config overrides for a few-second training run of the default model (small_cnn + lstm +
    tirg) on one of these fixtures: 32 px images, a small model, 3 steps of 4 queries."""
    return [
        f"data.dataset={dataset}", f"data.root={root}", "data.image_size=32", "train.steps=3", "train.batch_size=4",
        "train.steps_per_epoch=3", "data.train_recall_queries=16", "eval.batch_size=8", "model.embed_dim=32",
        "model.text_encoder.word_embed_dim=16", "model.text_encoder.hidden_dim=32",
        "model.image_encoder.filters=[8,8,16,16]", "optim.decay_steps=[]",
    ]
