"""tools/query.py and the demo answering from a gallery index (--index): the same top-10 as the
export's exact retrieval, ties aside, for a flat and an HNSW index; the REST API's format kept;
an index of another export, an index without images and a link out of the images folder refused.

A tiny untrained export over a gallery of Pillow-drawn images; its indexes are built directly
from the export's own embed_image embeddings with keras_irtf.index.ann.build_index (no Beam),
their rows in another order than the export's gallery ids, so that rows and paths are checked
to be the index's own. The demo is driven in-process (Starlette's TestClient).
"""

import base64
import hashlib
import io
import json
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import export_untrained_smoke, load_tool

pytest.importorskip("faiss", reason="gallery indexes need the faiss extra: pip install -e '.[faiss]'")

ROOT = Path(__file__).resolve().parent.parent
GALLERY_SIZE = 40
TOP = 10
TEXTS = ["add a red cube", "make it blue", ""]
TIE = 1e-5  # relative: scores this close are a tie, in any order


def _drawn(seed: int, size: int = 32) -> bytes:
    """A PNG of a few coloured shapes on a coloured background."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = (int(v) for v in rng.integers(0, size - 8, 2))
        x1, y1 = x0 + int(rng.integers(4, 12)), y0 + int(rng.integers(4, 12))
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _tool(name):
    return load_tool(name)


def _b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The export (with its in-model gallery), the same model exported without a gallery (another
    export: another fingerprint), and flat and HNSW indexes of the gallery for each."""
    from keras_irtf.index.ann import build_index, export_fingerprint
    from keras_irtf.serving.export import export_model
    from keras_irtf.serving.query import ExportedModel, l2_normalised
    from keras_irtf.serving.reader import list_gallery

    tmp = tmp_path_factory.mktemp("index_serving")
    path, gallery, model, cfg = export_untrained_smoke(tmp, [_drawn(i) for i in range(GALLERY_SIZE)],
                                                       Path("exported") / "small")
    bare = export_model(model, cfg, tmp / "exported" / "bare", run_dir=tmp, verbose=False)  # no retrieve
    exported = ExportedModel(path)
    ids = sorted(list_gallery(gallery), reverse=True)  # rows in another order than the export's ids
    embeddings = l2_normalised(exported.embed_images([(gallery / i).read_bytes() for i in ids]))

    hashes = [hashlib.sha256((gallery / i).read_bytes()).hexdigest() for i in ids]

    def index(name, export, kind, **options):
        options.setdefault("images_root", gallery)
        options.setdefault("hashes", hashes if options["images_root"] else None)
        build_index(embeddings, ids, tmp / "indexes" / name, fingerprint=export_fingerprint(export), kind=kind,
                    holdout=20, **options)
        return tmp / "indexes" / name

    outside = tmp / "outside"
    outside.mkdir()
    (outside / "q.png").write_bytes(_drawn(1000))
    return types.SimpleNamespace(
        path=path, bare=bare, gallery=gallery, model=exported, ids=ids, embeddings=embeddings, tmp=tmp,
        hashes=hashes,
        flat=index("flat", path, "flat"),
        hnsw=index("hnsw", path, "hnsw", params={"M": 32, "ef_construction": 400, "ef_search": 400}),
        bare_flat=index("bare_flat", bare, "flat"),
        no_images=index("no_images", path, "flat", images_root=None),
        queries=[gallery / "g3.png", gallery / "g17.png", outside / "q.png"])


def _exact(setup, data: bytes, text: str):
    """{gallery path: score} of every gallery image from the export's own `retrieve` (exact, in the
    graph), and the ranked paths."""
    ids, paths, scores = setup.model.retrieve(data, text, GALLERY_SIZE)
    return dict(zip(paths, (float(s) for s in scores))), list(paths)


def _assert_same_ranking(got: list, want: list, score_of: dict):
    """`got` is `want`, the exact ranking, up to the order of results whose exact scores tie."""
    assert len(got) == len(want) and len(set(got)) == len(got)
    got_scores = np.array([score_of[p] for p in got])
    want_scores = np.array([score_of[p] for p in want])
    np.testing.assert_allclose(got_scores, want_scores, rtol=TIE, atol=TIE)
    untied = [i for i in range(len(want)) if all(abs(want_scores[i] - want_scores[j]) > TIE * abs(want_scores[i])
                                                  for j in range(len(want)) if j != i)]
    assert [got[i] for i in untied] == [want[i] for i in untied]
    assert len(untied) >= len(want) - 2  # a ranking made of ties would prove nothing


def _cosines(setup, image_bytes: bytes, text: str, paths: list) -> np.ndarray:
    """The cosine of the query and each gallery path, from serving_default and the embeddings."""
    from keras_irtf.serving.query import l2_normalised

    q = l2_normalised(setup.model.embed_queries([image_bytes], [text]))[0]
    rows = {p: r for r, p in enumerate(setup.ids)}
    return np.array([setup.embeddings[rows[p]] @ q for p in paths])


# ---- tools/query.py --------------------------------------------------------------------------------
def _query_json(capsys, setup, image: Path, text: str, *source) -> dict:
    code = _tool("query").main(["--model", str(setup.path), "--image", str(image), "--text", text,
                                "--top", str(TOP), "--json", *source])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def _relative(results, gallery) -> list:
    return [str(Path(r.path).relative_to(gallery)) for r in results]


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_query_ranks_as_exact_retrieval(setup, capsys, kind):
    """search_index (what tools/query.py --index runs) against search over the export's own gallery
    (the in-graph `retrieve`), for every query; then the tool itself for two of them."""
    from keras_irtf.index.ann import GalleryIndex, export_fingerprint
    from keras_irtf.serving.query import search, search_index

    index = GalleryIndex.load(getattr(setup, kind), fingerprint=export_fingerprint(setup.path))
    gallery = setup.gallery.resolve()
    for image in setup.queries:
        for text in TEXTS:
            score_of, _ = _exact(setup, image.read_bytes(), text)
            want = _relative(search(setup.model, image, text, setup.gallery, TOP), setup.gallery)
            results = search_index(setup.model, image, text, index, TOP)
            got = _relative(results, gallery)
            _assert_same_ranking(got, want, score_of)
            if image.parent == setup.gallery:
                assert image.name not in got  # the query image itself is left out, as in the exact search
            assert [r.index_id for r in results] == [setup.ids[r.gallery_id] for r in results] == got
            np.testing.assert_allclose([r.score for r in results], _cosines(setup, image.read_bytes(), text, got),
                                       atol=1e-5)
    for image, text in ((setup.queries[0], TEXTS[0]), (setup.queries[2], TEXTS[2])):
        score_of, _ = _exact(setup, image.read_bytes(), text)
        exact = _query_json(capsys, setup, image, text, "--gallery", str(setup.gallery))
        indexed = _query_json(capsys, setup, image, text, "--index", str(getattr(setup, kind)))
        want = [str(Path(r["path"]).relative_to(setup.gallery)) for r in exact["results"]]
        got = [str(Path(r["path"]).relative_to(gallery)) for r in indexed["results"]]
        _assert_same_ranking(got, want, score_of)
        assert [r["id"] for r in indexed["results"]] == got  # the index's ids are paths under its images
        assert [setup.ids[r["gallery_id"]] for r in indexed["results"]] == got  # gallery_id: the index's row
        assert indexed["index"]["kind"] == kind and indexed["index"]["scores"] == "cosine similarity"
        assert all(r["sha256"] for r in indexed["results"])


def test_query_tool_draws_the_figure_from_the_index(setup, tmp_path, capsys):
    out = tmp_path / "q"
    target = "g5.png"
    code = _tool("query").main(["--model", str(setup.path), "--image", str(setup.queries[0]), "--text", TEXTS[0],
                                "--index", str(setup.flat), "--top", str(GALLERY_SIZE), "--target", target,
                                "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    ranking = json.loads((out / "results.json").read_text())
    assert len(ranking["results"]) == GALLERY_SIZE - 1  # the whole gallery but the query
    assert [r["path"] for r in ranking["results"] if r["target"]] == [str(setup.gallery.resolve() / target)]
    with Image.open(out / "grid.png") as figure:
        assert figure.width > (GALLERY_SIZE - 1) * 128
    assert printed.splitlines()[0].split()[2] == ranking["results"][0]["path"]


def test_query_tool_gallery_and_index_conflict(setup, tmp_path, capsys):
    args = ["--model", str(setup.path), "--image", str(setup.queries[2]), "--text", "x", "--json"]
    other = tmp_path / "other"
    shutil.copytree(setup.gallery, other)
    assert _tool("query").main(args + ["--gallery", str(other), "--index", str(setup.flat)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --gallery {other} and --index {setup.flat} conflict: "
                                                   f"the index ranks the images under {setup.gallery.resolve()}")
    same = _query_json(capsys, setup, setup.queries[2], "x", "--gallery", str(setup.gallery), "--index",
                       str(setup.flat))  # the index's own images folder: no conflict
    assert len(same["results"]) == TOP
    with pytest.raises(SystemExit) as e:
        _tool("query").main(["--model", str(setup.path), "--image", str(setup.queries[2]), "--text", "x"])
    assert e.value.code == 2 and "give --gallery DIR (a folder of images) or --index DIR" in capsys.readouterr().err


def test_query_tool_refuses_an_index_of_another_export(setup, tmp_path, capsys):
    code = _tool("query").main(["--model", str(setup.path), "--image", str(setup.queries[0]), "--text", "x",
                                "--index", str(setup.bare_flat), "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {setup.bare_flat} was built from the embeddings of another export "
                          f"({setup.bare.resolve()}")
    assert not (tmp_path / "q").exists()


def test_query_tool_with_an_index_without_images(setup, tmp_path, capsys):
    args = ["--model", str(setup.path), "--image", str(setup.queries[0]), "--text", "x", "--index",
            str(setup.no_images)]
    assert _tool("query").main(args + ["--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "records no images folder (it was built from TFRecords)" in err
    assert "pass --json" in err and not (tmp_path / "q").exists()
    ranking = _query_json(capsys, setup, setup.queries[0], "x", "--index", str(setup.no_images))
    flat = _query_json(capsys, setup, setup.queries[0], "x", "--index", str(setup.flat), "--keep-query")
    assert [r["id"] for r in ranking["results"]] == [r["id"] for r in flat["results"]]  # nothing to leave out
    assert all(r["path"] is None and r["sha256"] is None for r in ranking["results"])


def test_query_tool_refuses_a_result_leading_out_of_the_images(setup, tmp_path, capsys):
    linked = _linked_gallery(setup, tmp_path)
    code = _tool("query").main(["--model", str(setup.path), "--image", str(setup.gallery / "g7.png"), "--text", "",
                                "--index", str(linked.index), "--json", "--keep-query", "--top", str(GALLERY_SIZE + 1)])
    out = capsys.readouterr()
    assert code == 2 and out.out == "" and out.err.count("\n") == 1
    assert out.err.startswith("error: gallery image 'g7.png' resolves to") and "outside" in out.err


# ---- the demo ------------------------------------------------------------------------------------------
def _client(app):
    from starlette.testclient import TestClient

    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def demos(setup):
    pytest.importorskip("fastapi", reason="the demo needs its extra: pip install -e '.[demo]'")
    from keras_irtf.demo import build_app

    return types.SimpleNamespace(exact=_client(build_app(setup.path)),
                                 flat=_client(build_app(setup.path, index=setup.flat)),
                                 hnsw=_client(build_app(setup.path, index=setup.hnsw)),
                                 bare=_client(build_app(setup.bare, index=setup.bare_flat)))


def _rest_retrieve(client, name, images, texts, k=TOP, columns=False):
    body = ({"signature_name": "retrieve", "inputs": {"image_bytes": [_b64(b) for b in images], "text": texts,
                                                      "k": [k] * len(images)}} if columns else
            {"signature_name": "retrieve", "instances": [{"image_bytes": _b64(b), "text": t, "k": k}
                                                         for b, t in zip(images, texts)]})
    r = client.post(f"/v1/models/{name}:predict", json=body)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("kind", ["flat", "hnsw", "bare"])
def test_demo_rest_retrieve_from_the_index_ranks_as_exact_retrieval(setup, demos, kind):
    client, name = getattr(demos, kind), "bare" if kind == "bare" else "small"
    images = [q.read_bytes() for q in setup.queries]
    exact = _rest_retrieve(demos.exact, "small", images, TEXTS)
    indexed = _rest_retrieve(client, name, images, TEXTS)
    assert len(indexed["predictions"]) == len(images)
    for data, text, want, got in zip(images, TEXTS, exact["predictions"], indexed["predictions"]):
        assert set(got) == {"ids", "paths", "scores"} == set(want)  # TF Serving's answer, as the export's
        assert all(isinstance(i, int) for i in got["ids"]) and len(got["ids"]) == len(got["scores"]) == TOP
        score_of, _ = _exact(setup, data, text)
        _assert_same_ranking(got["paths"], want["paths"], score_of)
        assert [setup.ids[i] for i in got["ids"]] == got["paths"]  # ids are the index's rows
        np.testing.assert_allclose(got["scores"], _cosines(setup, data, text, got["paths"]), atol=1e-5)
    columns = _rest_retrieve(client, name, images, TEXTS, columns=True)
    assert columns["outputs"]["paths"] == [p["paths"] for p in indexed["predictions"]]
    r = client.post(f"/v1/models/{name}:predict", json={"signature_name": "retrieve", "instances": [
        {"image_bytes": _b64(images[0]), "text": "x", "k": 2}, {"image_bytes": _b64(images[1]), "text": "y", "k": 3}]})
    assert r.status_code == 400 and "same k" in r.json()["error"]
    r = client.post(f"/v1/models/{name}:predict", json={"signature_name": "retrieve", "instances": [
        {"image_bytes": _b64(images[0]), "text": "x", "k": GALLERY_SIZE + 1}]})
    assert r.status_code == 400 and f"the gallery holds {GALLERY_SIZE} images" in r.json()["error"]
    defs = client.get(f"/v1/models/{name}/metadata").json()["metadata"]["signature_def"]["signature_def"]
    assert set(defs) == {"serving_default", "embed_image", "retrieve"}
    assert defs["retrieve"]["inputs"]["k"]["dtype"] == "DT_INT32" and defs["retrieve"]["outputs"]["ids"]["dtype"] \
        == "DT_INT64"


def test_demo_page_search_and_gallery_from_the_index(setup, demos):
    client = demos.flat
    info = client.get("/api/info").json()
    assert info["gallery"] == {"size": GALLERY_SIZE, "files": True, "root": str(setup.gallery.resolve())}
    assert info["index"]["kind"] == "flat" and info["scores"]["method"] == "index"
    row = setup.ids.index("g3.png")
    assert client.get(f"/gallery/{row}").content == (setup.gallery / "g3.png").read_bytes()
    body = client.post("/api/search", json={"image_id": row, "text": TEXTS[0], "k": TOP}).json()
    score_of, ranked = _exact(setup, (setup.gallery / "g3.png").read_bytes(), TEXTS[0])
    want = [p for p in ranked if p != "g3.png"][:TOP]
    got = [r["path"] for r in body["results"]]
    _assert_same_ranking(got, want, score_of)
    assert [setup.ids[r["id"]] for r in body["results"]] == got
    np.testing.assert_allclose([r["cosine"] for r in body["results"]], [r["score"] for r in body["results"]])
    listed = client.get("/api/gallery?q=g1&limit=100").json()
    assert {it["path"] for it in listed["items"]} == {p for p in setup.ids if "g1" in p}
    assert all(setup.ids[it["id"]] == it["path"] for it in listed["items"])


def test_demo_refuses_an_index_of_another_export(setup, capsys):
    pytest.importorskip("fastapi")
    from keras_irtf.demo import DemoError, build_app

    with pytest.raises(DemoError, match="was built from the embeddings of another export"):
        build_app(setup.path, index=setup.bare_flat)
    code = _tool("demo").main(["--model", str(setup.path), "--index", str(setup.bare_flat), "--port", "0",
                               "--log-level", "error"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {setup.bare_flat} was built from the embeddings of another export")


def test_demo_refuses_an_index_without_images_and_a_conflicting_gallery(setup, tmp_path):
    pytest.importorskip("fastapi")
    from keras_irtf.demo import DemoError, build_app

    with pytest.raises(DemoError, match=r"records no images folder \(it was built from TFRecords\): the demo shows "
                                        r"the images it ranks"):
        build_app(setup.path, index=setup.no_images)
    other = tmp_path / "other"
    shutil.copytree(setup.gallery, other)
    with pytest.raises(DemoError, match="conflict: the index ranks the images under"):
        build_app(setup.path, gallery=other, index=setup.flat)


def _linked_gallery(setup, tmp_path):
    """A copy of the gallery indexed, then g7.png replaced by a link to an image outside it, and
    notes.png, a text file inside it, listed as a row too."""
    from keras_irtf.index.ann import build_index, export_fingerprint

    linked = tmp_path / "linked"
    shutil.copytree(setup.gallery, linked)
    (linked / "notes.png").write_text("not an image\n")
    ids = setup.ids + ["notes.png"]
    embeddings = np.concatenate([setup.embeddings, setup.embeddings[:1] * 0 + 1 / np.sqrt(setup.embeddings.shape[1])])
    folder = tmp_path / "linked_index"
    build_index(embeddings, ids, folder, fingerprint=export_fingerprint(setup.path), kind="flat", images_root=linked,
                hashes=[hashlib.sha256((linked / i).read_bytes()).hexdigest() for i in ids], holdout=0)
    secret = tmp_path / "secret.png"
    secret.write_bytes((setup.gallery / "g7.png").read_bytes())  # an image, so only containment refuses it
    (linked / "g7.png").unlink()
    (linked / "g7.png").symlink_to(secret)
    return types.SimpleNamespace(folder=linked, index=folder, ids=ids, secret=secret)


def test_demo_serves_no_file_outside_the_index_images(setup, tmp_path):
    pytest.importorskip("fastapi")
    from keras_irtf.demo import build_app

    linked = _linked_gallery(setup, tmp_path)
    client = _client(build_app(setup.path, index=linked.index))
    inside = linked.ids.index("g3.png")
    assert client.get(f"/gallery/{inside}").content == (setup.gallery / "g3.png").read_bytes()
    row = linked.ids.index("g7.png")
    r = client.get(f"/gallery/{row}")
    assert r.status_code == 404 and "points outside the index's images folder" in r.json()["error"]
    assert r.content != linked.secret.read_bytes() and str(linked.secret) not in r.text
    r = client.post("/api/search", json={"image_id": row, "text": "x", "k": 3})
    assert r.status_code == 404 and "points outside" in r.json()["error"]
    r = client.get(f"/gallery/{linked.ids.index('notes.png')}")
    assert r.status_code == 404 and "serves images only" in r.json()["error"] and "not an image" not in r.text
    for path in ("/gallery/-1", f"/gallery/{len(linked.ids)}", "/gallery/..%2Fsecret.png"):
        assert client.get(path).status_code == 404, path
    # the REST API answers ids and paths, and reads no gallery file
    answer = _rest_retrieve(client, "small", [linked.secret.read_bytes()], [""], k=len(linked.ids))
    assert sorted(answer["predictions"][0]["paths"]) == sorted(linked.ids)


def test_demo_serves_only_the_bytes_that_were_embedded(setup, tmp_path):
    """An index.json rewritten to name another folder, or a gallery file changed after indexing:
    the file is refused (its sha256 is not the recorded one). An index without checksums serves
    files only from a folder the operator names with --gallery."""
    pytest.importorskip("fastapi")
    from keras_irtf.demo import build_app
    from keras_irtf.index.ann import build_index, export_fingerprint

    other = tmp_path / "other"  # same names, other bytes: what a rewritten images_root would point at
    other.mkdir()
    for i, name in enumerate(setup.ids):
        (other / name).write_bytes(_drawn(500 + i))
    tampered = tmp_path / "tampered"
    shutil.copytree(setup.flat, tampered)
    manifest = json.loads((tampered / "index.json").read_text())
    manifest["images_root"] = str(other)
    (tampered / "index.json").write_text(json.dumps(manifest))
    client = _client(build_app(setup.path, index=tampered))
    row = setup.ids.index("g3.png")
    r = client.get(f"/gallery/{row}")
    assert r.status_code == 404 and "differs from the one embedded" in r.json()["error"]
    assert r.content != (other / "g3.png").read_bytes()
    # the same check for a file changed in place after indexing
    changed = tmp_path / "changed"
    shutil.copytree(setup.gallery, changed)
    build_index(setup.embeddings, setup.ids, tmp_path / "changed_index", fingerprint=export_fingerprint(setup.path),
                kind="flat", images_root=changed, hashes=setup.hashes, holdout=0)
    (changed / "g3.png").write_bytes(_drawn(999))
    client = _client(build_app(setup.path, index=tmp_path / "changed_index"))
    assert client.get(f"/gallery/{row}").status_code == 404
    assert client.get(f"/gallery/{setup.ids.index('g4.png')}").content == (changed / "g4.png").read_bytes()
    # no checksums recorded: served only when the operator names the folder
    build_index(setup.embeddings, setup.ids, tmp_path / "unchecked", fingerprint=export_fingerprint(setup.path),
                kind="flat", images_root=setup.gallery, holdout=0)
    r = _client(build_app(setup.path, index=tmp_path / "unchecked")).get(f"/gallery/{row}")
    assert r.status_code == 404 and "records no checksums" in r.json()["error"]
    named = _client(build_app(setup.path, index=tmp_path / "unchecked", gallery=setup.gallery))
    assert named.get(f"/gallery/{row}").content == (setup.gallery / "g3.png").read_bytes()
