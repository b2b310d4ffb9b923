"""The demo page's ground truth for FashionIQ, CIRR and triplet folders, and its cosine scores.

The ground-truth readers are checked on the fixtures of keras_irtf.testing.cir_fixtures (no
model); then over real exports whose gallery is a FashionIQ or a CIRR fixture's images: FashionIQ
through tools/demo.py in a child process that cannot import keras (the dataset found from the
gallery folder), CIRR in process with --queries naming a caption file. The byte-identical upload
and the cosine against independently computed embeddings are also checked over a CSS export in
tests/test_demo.py.
"""

import base64
import json
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_config
from keras_irtf.testing.cir_fixtures import write_cirr, write_fashioniq, write_triplets

pytest.importorskip("fastapi", reason="the demo needs its extra: pip install -e '.[demo]'")
pytest.importorskip("uvicorn", reason="the demo needs its extra: pip install -e '.[demo]'")


def _model(gallery_root, paths=None):
    """What find_ground_truth reads of a served model: the gallery list and folder."""
    from keras_irtf.serving.export import list_gallery

    gallery_root = Path(gallery_root)
    return types.SimpleNamespace(gallery_paths=paths if paths is not None else list_gallery(gallery_root),
                                 gallery_root=gallery_root, path=gallery_root / "no_export")


def _export(tmp, gallery, texts):
    """An untrained smoke model (32-px images) exported with `gallery` as its gallery."""
    from keras_irtf import api
    from keras_irtf.data.text import TextVectorizer
    from keras_irtf.serving.export import export_model

    tmp.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(None, "data.image_size=32")
    vectorizer = TextVectorizer.from_texts(texts, cfg.model.max_text_length)
    vectorizer.save(tmp / "vocab.txt")
    model = api.create_model(cfg, vectorizer, compile=False)
    return export_model(model, cfg, tmp / "exported", run_dir=tmp, gallery=gallery, verbose=False)


def _b64(data):
    return {"b64": base64.b64encode(data).decode()}


# ---- the readers, without a model ------------------------------------------------------------------


def test_fashioniq_ground_truth(tmp_path):
    from keras_irtf.data.fashioniq import join_captions
    from keras_irtf.demo.ground_truth import find_ground_truth

    root = tmp_path / "fashioniq"
    truth = write_fashioniq(root)
    model = _model(root / "images")  # the gallery exported from <fashioniq>/images
    ids = {p: i for i, p in enumerate(model.gallery_paths)}
    gt = find_ground_truth(model)  # found from the gallery folder's parent
    assert gt is not None and "FashionIQ" in gt.source and gt.protocol == "the triplet's target image (FashionIQ)"
    n_triplets = sum(len(t) for t in truth["train"].values()) + sum(len(v["queries"]) for v in truth["val"].values())
    assert len(gt) == n_triplets == 39
    q = truth["val"]["shirt"]["queries"][2]
    c1, c2 = q["captions"]
    ref, target = ids[q["candidate"] + ".jpg"], ids[q["target"] + ".jpg"]
    assert gt.texts_for(ref) == [join_captions(c1, c2)]  # the text the evaluation uses, suggested
    for text in (join_captions(c1, c2), join_captions(c2, c1), c1, c2, c1.strip(".?, ").upper() + " ?"):
        assert gt.targets(ref, text) == {target}, text
    assert gt.targets(ref, "is purple") is None and gt.targets(target, c1) is None
    # explicit: the dataset folder, or a caption file inside it
    for queries in (root, root / "captions" / "cap.dress.val.json"):
        assert find_ground_truth(model, queries).targets(ref, c1) == {target}

    # a gallery of the validation images of one category: the other categories' queries are skipped
    only = _model(root / "images", [f"{n}.jpg" for n in truth["val"]["dress"]["gallery"]])
    gt = find_ground_truth(only, root)
    assert len(gt) == len(truth["val"]["dress"]["queries"]) == 5
    q = truth["val"]["dress"]["queries"][4]
    assert gt.targets(4, join_captions(*q["captions"])) == {int(q["target"][-2:])}


@pytest.mark.parametrize("arrangement", ["cirr", "clip4cir"])
def test_cirr_ground_truth(tmp_path, arrangement):
    from keras_irtf.demo import DemoError
    from keras_irtf.demo.ground_truth import find_ground_truth

    root = tmp_path / arrangement
    truth = write_cirr(root, arrangement=arrangement)
    images = truth["image_root"]
    # the gallery exported from the dev images only, or from the whole image root
    dev = _model(images / "dev")
    gt = find_ground_truth(dev)  # found two (cirr: img_raw/dev) or one (clip4cir: dev) levels up
    assert gt is not None and "CIRR" in gt.source and "target_hard" in gt.protocol
    assert len(gt) == len(truth["val"]["queries"]) == 12
    ids = {p: i for i, p in enumerate(dev.gallery_paths)}
    for q in truth["val"]["queries"]:
        assert gt.targets(ids[q["reference"] + ".png"], q["caption"]) == {ids[q["target_hard"] + ".png"]}
        assert gt.texts_for(ids[q["reference"] + ".png"]) == [q["caption"]]
    whole = _model(images)
    gt = find_ground_truth(whole, truth["meta_dir"] / "captions" / "cap.rc2.val.json")
    ids = {p: i for i, p in enumerate(whole.gallery_paths)}
    assert len(gt) == 24  # train and val (test1 has no targets)
    q = truth["train"]["queries"][7]
    rel = {name: path[2:] for name, path in truth["train"]["paths"].items()}  # "./train/1/x.png" -> "train/1/x.png"
    assert gt.targets(ids[rel[q["reference"]]], q["caption"].upper()) == {ids[rel[q["target_hard"]]]}
    # a gallery that holds none of the dataset's images: refused when named, quietly absent when found
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.png").write_bytes((images / "dev" / dev.gallery_paths[0]).read_bytes())
    with pytest.raises(DemoError, match="no cirr query has its reference image and a target"):
        find_ground_truth(_model(other), root)


def test_triplets_ground_truth(tmp_path):
    from keras_irtf.demo.ground_truth import find_ground_truth, from_jsonl

    root = tmp_path / "triplets"
    truth = write_triplets(root)
    whole = _model(root)  # gallery paths are the triplets' own paths (images/test/img0.jpg, ...)
    gt = find_ground_truth(whole)
    ids = {p: i for i, p in enumerate(whole.gallery_paths)}
    assert len(gt) == len(truth["train"]) + len(truth["test"]) == 14
    for row in truth["test"] + truth["train"]:
        assert gt.targets(ids[row["source"]], row["text"]) == {ids[row["target"]]}
    # the test images only: images/train/img0.jpg is not images/test/img0.jpg (no match by name)
    test_only = _model(root / "images" / "test")
    gt = from_jsonl(root / "test.jsonl", test_only.gallery_paths, test_only.gallery_root)
    ids = {p: i for i, p in enumerate(test_only.gallery_paths)}
    assert len(gt) == 6 and gt.targets(ids["img2.jpg"], truth["test"][2]["text"]) == {ids["img3.jpg"]}
    gt = find_ground_truth(test_only)  # found two levels up; train.jsonl's images are not in the gallery
    assert len(gt) == 6 and gt.reference_ids == {ids[f"img{k}.jpg"] for k in range(6)}


# ---- cosine from retrieve's scores -------------------------------------------------------------------


class _FakeServed:
    """The parts of a ServedModel that the page's Cosine reads, over given embeddings."""

    def __init__(self, gallery, query):
        variable = types.SimpleNamespace(name="gallery_embeddings:0", shape=gallery.shape, numpy=lambda: gallery)
        self.functions = {"retrieve": types.SimpleNamespace(variables=[variable]), "serving_default": None}
        self.has_retrieve, self.gallery_size = True, len(gallery)
        self.query, self.calls = query, 0

    def call(self, name, columns):
        assert name == "serving_default"
        self.calls += 1
        return {"embedding": self.query[None]}


def test_cosine_from_retrieve_scores():
    from keras_irtf.demo.app import Cosine

    rng = np.random.default_rng(0)
    unit = rng.normal(size=(20, 8))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    q = rng.normal(size=8)
    want = unit @ q / np.linalg.norm(q)

    # every embedding on the sphere of radius s = 9 (ScaledL2Normalization): cosine = score / 81
    sphere = _FakeServed((9 * unit).astype(np.float32), (9 * q / np.linalg.norm(q)).astype(np.float32))
    cos = Cosine(sphere)
    assert cos.method == "sphere" and cos.radius == pytest.approx(9, rel=1e-6) and sphere.calls == 2  # the probes
    scores = (9 * unit) @ sphere.query
    assert scores.max() > 4  # raw scores are far outside [-1, 1]
    norm = cos.query_norm(b"image", "text")
    got = [cos.of(norm, i, float(s)) for i, s in enumerate(scores)]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert sphere.calls == 2  # no model call per query
    assert cos.describe()["shown"] == "cosine similarity" and cos.describe()["scale"] == pytest.approx(81, rel=1e-5)
    assert "81 \u00d7 this" in cos.describe()["text"]

    # embeddings of different norms: |q| from serving_default for each query
    gallery = (unit * rng.uniform(0.5, 3, size=(20, 1))).astype(np.float32)
    varied = _FakeServed(gallery, (2.5 * q).astype(np.float32))
    cos = Cosine(varied)
    assert cos.method == "query" and cos.radius is None
    norm = cos.query_norm(b"image", "text")
    assert varied.calls == 3
    got = [cos.of(norm, i, float(s)) for i, s in enumerate(gallery @ varied.query)]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert cos.of(norm, 0, float("nan")) is None and cos.of(norm, 20, 1.0) is None
    assert cos.of(norm, 0, 1e9) == 1.0  # rounding never leaves [-1, 1]

    # gallery on a sphere, queries not: still exact
    off = _FakeServed((9 * unit).astype(np.float32), (3 * q).astype(np.float32))
    assert Cosine(off).method == "query"

    # no stored gallery embeddings: the raw score, labelled as such
    bare = _FakeServed((9 * unit).astype(np.float32), q)
    bare.functions["retrieve"].variables = []
    cos = Cosine(bare)
    assert cos.method == "raw" and cos.of(cos.query_norm(b"", ""), 0, 3.0) is None
    assert cos.describe()["shown"] == "raw score" and "dot product" in cos.describe()["text"]


# ---- over real exports -------------------------------------------------------------------------------


@pytest.mark.slow
def test_fashioniq_export_in_the_demo_server(tmp_path):
    """tools/demo.py, keras unimportable, over an export of a FashionIQ fixture's images: the
    dataset is found from the gallery folder, a validation query shows its target, a single
    caption is known too, and an upload of the reference file is that image's query."""
    from keras_irtf.data.fashioniq import join_captions
    from keras_irtf.demo.process import DemoProcess

    root = tmp_path / "fashioniq"
    truth = write_fashioniq(root)
    texts = [c for split in ("train", "val") for c_ in truth[split].values()
             for t in (c_ if split == "train" else c_["queries"]) for c in t["captions"]]
    path = _export(tmp_path / "run", root / "images", texts)
    gallery = (path / "assets.extra" / "gallery.txt").read_text().split("\n")[:-1]
    ids = {p: i for i, p in enumerate(gallery)}
    q = truth["val"]["toptee"]["queries"][1]
    c1, c2 = q["captions"]
    ref, target = ids[q["candidate"] + ".jpg"], ids[q["target"] + ".jpg"]
    k = len(gallery) - 1  # every other image: the target is among the results

    with DemoProcess(path, start_timeout=240) as demo:
        assert any("ground truth:" in line and "FashionIQ" in line and "(39 known queries)" in line
                   for line in demo.lines), demo.output()
        status, info = demo.request("GET", "/api/info")
        assert info["ground_truth"]["queries"] == 39 and "FashionIQ" in info["ground_truth"]["source"]
        status, body = demo.request("GET", f"/api/gallery/{ref}/texts")
        assert body["texts"] == [join_captions(c1, c2)]
        for request in ({"image_id": ref, "text": join_captions(c1, c2)},
                        {"image_id": ref, "text": c2.strip(" .?,")},
                        {"image": _b64((root / "images" / gallery[ref]).read_bytes()), "text": c1}):
            status, body = demo.request("POST", "/api/search", {**request, "k": k})
            assert status == 200, body
            gt = body["ground_truth"]
            assert gt["known"] is True and gt["targets"] == 1 and gt["found"] == 1, request.get("text")
            assert [r["id"] for r in body["results"] if r["target"]] == [target]
            assert ref not in [r["id"] for r in body["results"]] and len(body["results"]) == k
            assert all(-1 <= r["cosine"] <= 1 for r in body["results"])
        assert body["query"]["identical_to"]["image_id"] == ref
        status, body = demo.request("POST", "/api/search", {"image_id": ref, "text": "is purple", "k": 3})
        assert body["ground_truth"]["known"] is False and not any(r["target"] for r in body["results"])


@pytest.mark.slow
def test_cirr_export_with_a_caption_file(tmp_path):
    """build_app over an export of a CIRR fixture's dev images, --queries naming a caption file:
    each validation caption marks its target_hard image."""
    from keras_irtf.demo import build_app

    root = tmp_path / "cirr"
    truth = write_cirr(root, arrangement="cirr")
    texts = [q["caption"] for split in ("train", "val") for q in truth[split]["queries"]]
    path = _export(tmp_path / "run", root / "img_raw" / "dev", texts)
    demo = build_app(path, queries=root / "captions" / "cap.rc2.val.json").state.demo
    gallery = demo.model.gallery_paths
    assert demo.info()["ground_truth"]["queries"] == 12 and "CIRR" in demo.info()["ground_truth"]["source"]
    ids = {p: i for i, p in enumerate(gallery)}
    for q in truth["val"]["queries"][:4]:
        ref, target = ids[q["reference"] + ".png"], ids[q["target_hard"] + ".png"]
        body = demo.search({"image_id": ref, "text": q["caption"], "k": len(gallery) - 1})
        assert body["ground_truth"]["known"] is True and body["ground_truth"]["found"] == 1
        assert [r["id"] for r in body["results"] if r["target"]] == [target]
        assert json.dumps(body)  # the page's JSON
