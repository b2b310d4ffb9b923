"""The web demo (tools/demo.py, keras_irtf.demo): the page driven in headless Chromium, the TF
Serving-compatible REST API against tf.saved_model.load, the limits, and the gallery by id.

The server runs as a child process with keras made unimportable, on a free port of 127.0.0.1,
over a smoke CSS export with a gallery. The browser is the system's Chromium (Debian's
`chromium`; CI installs it): the browser test skips, saying so, only where none is installed.
"""

import base64
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config

pytest.importorskip("fastapi", reason="the demo needs its extra: pip install -e '.[demo]'")
pytest.importorskip("uvicorn", reason="the demo needs its extra: pip install -e '.[demo]'")

LIMITS = ["--max-megapixels", "0.5", "--max-upload-mb", "0.25", "--max-request-mb", "1", "--max-instances", "8"]


@pytest.fixture(scope="module")
def exported(css_smoke_root, tmp_path_factory):
    """A smoke CSS run (3 steps) exported with the smoke set's images as its gallery."""
    import keras_irtf as kirtf

    out = tmp_path_factory.mktemp("demo_run") / "css_demo"
    cfg = tiny_config(css_smoke_root, f"train.out={out}", "train.steps=3", "train.steps_per_epoch=3",
                      "data.train_recall_queries=16")
    run, _ = kirtf.train(cfg, verbose=0)
    return kirtf.export_run(run, out_root=tmp_path_factory.mktemp("exported"), gallery=Path(css_smoke_root) / "images",
                      verbose=False)


@pytest.fixture(scope="module")
def served(exported):
    """The export's signatures, loaded directly: what the demo's answers are compared with."""
    import tensorflow as tf

    return tf.saved_model.load(str(exported)).signatures


@pytest.fixture(scope="module")
def demo(exported, tmp_path_factory):
    from keras_irtf.demo.process import DemoProcess

    log = tmp_path_factory.mktemp("demo_log") / "server.log"
    with DemoProcess(exported, *LIMITS, log_path=log) as proc:
        yield proc
    assert proc.proc.returncode is not None  # the test shut it down


@pytest.fixture(scope="module")
def gallery(exported):
    return (exported / "assets.extra" / "gallery.txt").read_text().split("\n")[:-1]


def _png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _retrieve(served, image_bytes, text, k):
    import tensorflow as tf

    out = served["retrieve"](image_bytes=tf.constant([image_bytes]), text=tf.constant([text]),
                             k=tf.constant([k], tf.int32))
    return [int(i) for i in out["ids"].numpy()[0]], [float(s) for s in out["scores"].numpy()[0]]


def _cosines(served, image_bytes, text, gallery_files):
    """The cosine similarity of the query (image_bytes, text) with each gallery file, from the
    export's serving_default and embed_image signatures (not from retrieve's scores)."""
    import tensorflow as tf

    q = served["serving_default"](image_bytes=tf.constant([image_bytes]), text=tf.constant([text]))["embedding"]
    g = served["embed_image"](image_bytes=tf.constant([Path(f).read_bytes() for f in gallery_files]))["embedding"]
    q, g = q.numpy()[0].astype(np.float64), g.numpy().astype(np.float64)
    return g @ q / (np.linalg.norm(g, axis=1) * np.linalg.norm(q))


def _css_targets(css_root, gallery):
    """{(reference gallery id, text): target gallery ids} computed from the CSS .npy directly."""
    from keras_irtf.data.css import read_css_npy

    index = {p: i for i, p in enumerate(gallery)}
    data = read_css_npy(css_root)
    out = {}
    for split in ("test", "train"):
        labels = list(data[split].get("labels", range(len(data[split]["objects_img"]))))
        for mod in data[split]["mods"]:
            for f, t in zip(mod["from"], mod["to"]):
                ref = index.get(f"css_{split}_{f:06d}.png")
                targets = {index[f"css_{split}_{i:06d}.png"] for i, lab in enumerate(labels)
                           if lab == labels[t] and f"css_{split}_{i:06d}.png" in index}
                if ref is not None:
                    out.setdefault((ref, mod["to_str"]), set()).update(targets)
    return out


# ---- the page in a real browser -------------------------------------------------------------------


@pytest.mark.slow
def test_page_in_headless_chromium(demo, served, exported, gallery, css_smoke_root, tmp_path):
    pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright: pip install -e '.[test]'")
    from keras_irtf.demo.process import chromium_page, find_chromium

    if find_chromium() is None:
        pytest.skip("no Chromium installed (CI installs Debian's: apt-get install -y chromium; or set "
                    "KERAS_IRTF_CHROMIUM to a Chromium binary)")
    assert demo.url.startswith("http://127.0.0.1:")  # the default bind is loopback only

    # a known query whose target the model ranks within the top 100 (the page shows up to 100)
    known = _css_targets(css_smoke_root, gallery)
    chosen = None
    for (ref, text), targets in sorted(known.items()):
        if not gallery[ref].startswith("css_test_"):
            continue
        ids, _ = _retrieve(served, (Path(css_smoke_root) / "images" / gallery[ref]).read_bytes(), text, 101)
        shown = [i for i in ids if i != ref][:100]
        if targets & set(shown):
            chosen = ref, text, targets, shown
            break
    assert chosen is not None
    ref, text, targets, expected_shown = chosen

    with chromium_page() as page:
        requested = []
        page.on("request", lambda r: requested.append(r.url))
        page.goto(demo.url)
        page.wait_for_selector("#gallery-grid .thumb")
        assert "css_demo" in page.inner_text("#model-line")

        # 1. upload an image (a JPEG of another size), type a text, k = 10
        rng = np.random.default_rng(0)
        pixels = np.asarray(Image.open(Path(css_smoke_root) / "images" / gallery[7]).convert("RGB").resize((100, 80)))
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels + rng.integers(-3, 4, pixels.shape), 0, 255).astype(np.uint8)).save(
            buf, format="JPEG", quality=90)
        upload = tmp_path / "my photo.jpg"
        upload.write_bytes(buf.getvalue())
        page.click("#tab-upload")
        page.set_input_files("#upload", str(upload))
        page.wait_for_function("document.getElementById('reference-name').textContent.includes('my photo.jpg')")
        page.fill("#text", "add red circle to top-left")
        page.fill("#k", "10")
        page.click("#search")
        page.wait_for_selector("#results .result")
        page.wait_for_function("[...document.querySelectorAll('#results .result img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        cards = page.query_selector_all("#results .result")
        want_ids, want_scores = _retrieve(served, upload.read_bytes(), "add red circle to top-left", 10)
        assert len(cards) == 10
        assert [int(c.get_attribute("data-id")) for c in cards] == want_ids
        assert [c.query_selector(".rank").inner_text() for c in cards] == [f"#{i}" for i in range(1, 11)]
        # the raw score (retrieve's dot product) is kept in data-score; the card shows the cosine
        np.testing.assert_allclose([float(c.get_attribute("data-score")) for c in cards], want_scores, rtol=1e-5)
        cosines = _cosines(served, upload.read_bytes(), "add red circle to top-left",
                           [Path(css_smoke_root) / "images" / gallery[i] for i in want_ids])
        np.testing.assert_allclose([float(c.get_attribute("data-cosine")) for c in cards], cosines, atol=1e-5)
        shown_scores = [float(c.query_selector(".score").inner_text()) for c in cards]
        np.testing.assert_allclose(shown_scores, cosines, atol=6e-4)  # printed with 3 decimals
        assert all(-1 <= x <= 1 for x in shown_scores)
        label = page.inner_text("#score-label")
        assert "cosine similarity" in label and "from -1 to 1" in label
        scale = float(label.split("is ")[-1].split(" \u00d7")[0])  # "... is 15.91 × this)"
        np.testing.assert_allclose(want_scores, scale * cosines, rtol=2e-3)  # the raw score is scale x cosine
        assert page.is_hidden("#reference-note")  # not a gallery file's bytes
        assert all(c.query_selector("img").evaluate("i => i.complete && i.naturalWidth === 64") for c in cards)
        assert "add red circle to top-left" in page.inner_text("#query-card")
        latency = page.inner_text("#latency")
        assert "ms per query" in latency and float(page.get_attribute("#latency", "data-ms")) > 0
        assert page.query_selector_all("#results .result.target") == []  # an upload has no ground truth
        assert page.is_hidden("#error")

        # 2. pick a gallery image found by name, take a known modification, k = 100
        page.click("#tab-gallery")
        page.fill("#gallery-search", gallery[ref])
        page.wait_for_function(f"document.querySelectorAll('#gallery-grid .thumb').length === 1 && "
                               f"document.querySelector('#gallery-grid .thumb').dataset.id === '{ref}'")
        page.click(f"#gallery-grid .thumb[data-id='{ref}']")
        chip = page.wait_for_selector(f"#suggestions button:text-is({json.dumps(text)})")
        chip.click()
        assert page.input_value("#text") == text
        page.fill("#k", "100")
        page.click("#search")
        page.wait_for_function("document.querySelectorAll('#results .result').length === 100")
        cards = page.query_selector_all("#results .result")
        shown = [int(c.get_attribute("data-id")) for c in cards]
        assert shown == expected_shown  # the reference image itself is left out, as in evaluation
        marked = {int(c.get_attribute("data-id")) for c in page.query_selector_all("#results .result.target")}
        assert marked == targets & set(shown) and marked
        assert page.query_selector_all("#results .result.target .badge")
        assert "Known query" in page.inner_text("#gt-line")

        # 2b. upload the very file of that gallery image: searched as its query, itself left out
        page.click("#tab-upload")
        page.set_input_files("#upload", str(Path(css_smoke_root) / "images" / gallery[ref]))
        page.wait_for_function("document.getElementById('reference-name').textContent"
                               f".includes({json.dumps(gallery[ref])})")
        assert page.is_checked("#exclude") and page.is_enabled("#exclude")
        page.click("#search")
        page.wait_for_selector("#reference-note:not([hidden])")
        page.wait_for_function("document.querySelectorAll('#results .result').length === 100")
        cards = page.query_selector_all("#results .result")
        assert [int(c.get_attribute("data-id")) for c in cards] == expected_shown
        note = page.inner_text("#reference-note")
        assert f"byte-identical to gallery image {gallery[ref]} (id {ref})" in note and "left out" in note
        assert {int(c.get_attribute("data-id")) for c in page.query_selector_all("#results .result.target")} == marked
        assert "Known query" in page.inner_text("#gt-line")

        # 3. a bad upload: a readable message, no results, and the server still answers
        page.click("#tab-upload")
        page.set_input_files("#upload", files=[{"name": "notes.png", "mimeType": "image/png",
                                                "buffer": b"these are my notes, not a picture"}])
        page.wait_for_function("document.getElementById('reference-name').textContent.includes('notes.png')")
        page.click("#search")
        page.wait_for_selector("#error:not([hidden])")
        assert "notes.png is not an image" in page.inner_text("#error")
        assert page.query_selector_all("#results .result") == []
        # over the pixel limit (0.5 megapixels here): refused from the header
        page.set_input_files("#upload", files=[{"name": "huge.png", "mimeType": "image/png",
                                                "buffer": _png(np.zeros((700, 800, 3), np.uint8))}])
        page.wait_for_function("document.getElementById('reference-name').textContent.includes('huge.png')")
        page.click("#search")
        page.wait_for_function("document.getElementById('error').textContent.includes('megapixels')")
        assert "800 x 700" in page.inner_text("#error")
        status, _ = demo.request("GET", "/v1/models/css_demo")
        assert status == 200

    outside = [u for u in requested if not u.startswith((demo.url, "data:", "blob:"))]
    assert not outside, f"the page fetched something other than the demo server: {outside}"
    assert any("search" in line and "ms model" in line for line in demo.lines)  # latency is logged


# ---- the REST API against tf.saved_model.load --------------------------------------------------------


def _b64(data):
    return {"b64": base64.b64encode(data).decode()}


def test_rest_api_matches_the_saved_model(demo, served, css_smoke_root, gallery):
    import tensorflow as tf

    images = [(Path(css_smoke_root) / "images" / gallery[i]).read_bytes() for i in (0, 9, 50)]
    texts = ["make top-left object red", "", "remove middle-center object"]
    url = "/v1/models/css_demo:predict"

    status, body = demo.request("GET", "/v1/models/css_demo")
    assert status == 200 and body["model_version_status"][0]["state"] == "AVAILABLE"
    assert body["model_version_status"][0]["version"] == "1"
    status, meta = demo.request("GET", "/v1/models/css_demo/versions/1/metadata")
    defs = meta["metadata"]["signature_def"]["signature_def"]
    assert status == 200 and set(defs) == {"serving_default", "embed_image", "retrieve"}
    assert defs["retrieve"]["inputs"]["k"]["dtype"] == "DT_INT32"

    # retrieve, rows: one object per instance, keyed by output name
    status, body = demo.request("POST", url, {"signature_name": "retrieve", "instances": [
        {"image_bytes": _b64(b), "text": t, "k": 5} for b, t in zip(images, texts)]})
    assert status == 200, body
    direct = served["retrieve"](image_bytes=tf.constant(images), text=tf.constant(texts), k=tf.constant([5] * 3))
    assert len(body["predictions"]) == 3
    for i, pred in enumerate(body["predictions"]):
        assert set(pred) == {"ids", "paths", "scores"}
        assert pred["ids"] == direct["ids"].numpy()[i].tolist()
        assert pred["paths"] == [p.decode() for p in direct["paths"].numpy()[i]]
        np.testing.assert_allclose(pred["scores"], direct["scores"].numpy()[i], rtol=1e-6)
    # the same in columns (and through the versioned URL)
    status, cols = demo.request("POST", "/v1/models/css_demo/versions/1:predict", {"signature_name": "retrieve",
        "inputs": {"image_bytes": [_b64(b) for b in images], "text": texts, "k": [5, 5, 5]}})
    assert status == 200 and cols["outputs"]["ids"] == direct["ids"].numpy().tolist()

    # single-output signatures answer the bare value per instance (TF Serving's rule)
    want = served["serving_default"](image_bytes=tf.constant(images), text=tf.constant(texts))["embedding"].numpy()
    status, body = demo.request("POST", url, {"instances": [{"image_bytes": _b64(b), "text": t}
                                                            for b, t in zip(images, texts)]})
    assert status == 200 and np.asarray(body["predictions"]).shape == want.shape
    np.testing.assert_allclose(body["predictions"], want, rtol=1e-6, atol=1e-7)
    want = served["embed_image"](image_bytes=tf.constant(images))["embedding"].numpy()
    for instances in ([{"image_bytes": _b64(b)} for b in images], [_b64(b) for b in images]):
        status, body = demo.request("POST", url, {"signature_name": "embed_image", "instances": instances})
        assert status == 200
        np.testing.assert_allclose(body["predictions"], want, rtol=1e-6, atol=1e-7)
    status, body = demo.request("POST", url, {"signature_name": "embed_image", "inputs": [_b64(images[0])]})
    assert status == 200 and np.asarray(body["outputs"]).shape == (1, want.shape[1])


@pytest.mark.parametrize("payload,status,message", [
    ({"signature_name": "classify", "instances": [{}]}, 400, 'Serving signature name: "classify" not found'),
    ({"signature_name": "retrieve"}, 400, "Missing 'inputs' or 'instances' key"),
    ({"instances": [{"image_bytes": {"b64": "%%%"}, "text": "x"}]}, 400, "not valid base64"),
    ({"instances": [{"image_bytes": _b64(b"GIF89a but not really"), "text": "x"}]}, 400, "is not an image"),
    ({"instances": [{"image_bytes": _b64(b"\x89PNG\r\n\x1a\n"), "text": "x"}]}, 400, "is not an image"),
    ({"instances": [{"image_bytes": _b64(b""), "text": "x"}]}, 400, "is empty"),
    ({"instances": [{"text": "x"}]}, 400, "missing ['image_bytes']"),
    ({"instances": [{"image_bytes": "PNG", "text": "x", "k": 3}]}, 400, "unknown ['k']"),
    ({"signature_name": "retrieve", "instances": [{"image_bytes": "IMG", "text": "x", "k": "ten"}]}, 400,
     "expected an integer"),
    ({"signature_name": "retrieve", "instances": [{"image_bytes": "IMG", "text": "x", "k": 0}]}, 400,
     "k must be >= 1"),
    ({"signature_name": "retrieve", "instances": [{"image_bytes": "IMG", "text": "x", "k": 2},
                                                  {"image_bytes": "IMG", "text": "y", "k": 3}]}, 400, "same k"),
    ({"instances": [{"image_bytes": "IMG", "text": "x"}] * 9}, 413, "up to 8"),
    ({"instances": [{"image_bytes": "BIG_BYTES", "text": "x"}]}, 413, "up to 0.25 MB"),
    ({"instances": [{"image_bytes": "BIG_PIXELS", "text": "x"}]}, 413, "0.5 megapixels"),
])
def test_rest_api_refuses_bad_requests(demo, css_smoke_root, gallery, payload, status, message):
    image = (Path(css_smoke_root) / "images" / gallery[0]).read_bytes()
    rng = np.random.default_rng(0)
    fill = {"IMG": _b64(image), "BIG_BYTES": _b64(_png(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))),
            "BIG_PIXELS": _b64(_png(np.zeros((1000, 1000, 3), np.uint8)))}
    payload = json.loads(json.dumps(payload))
    for inst in payload.get("instances", []):
        if isinstance(inst.get("image_bytes"), str) and inst["image_bytes"] in fill:
            inst["image_bytes"] = fill[inst["image_bytes"]]
    got, body = demo.request("POST", "/v1/models/css_demo:predict", payload)
    assert got == status and message in body["error"], body
    assert demo.proc.poll() is None  # refused, not crashed


def test_rest_api_urls_and_body_limits(demo):
    status, body = demo.request("POST", "/v1/models/other_model:predict", {"instances": []})
    assert status == 404 and "Servable not found for request: Latest(other_model)" in body["error"]
    status, body = demo.request("GET", "/v1/models/css_demo/versions/7")
    assert status == 404 and "Specific(css_demo, 7)" in body["error"]
    status, body = demo.request("POST", "/v1/models/css_demo:predict", raw=b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]
    # a body declared over the limit is refused before it is read (headers only: a client still
    # sending a body the server will not read may see the connection closed under it)
    import http.client
    from urllib.parse import urlparse

    url = urlparse(demo.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.putrequest("POST", "/v1/models/css_demo:predict")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(1024 * 1024 + 1))
    conn.endheaders()
    resp = conn.getresponse()
    status, body = resp.status, json.loads(resp.read())
    conn.close()
    assert status == 413 and "request body is over 1 MB" in body["error"]
    status, body = demo.request("POST", "/api/search", {"image_id": 10 ** 6, "text": "x"})
    assert status == 400 and "image_id must be between 0 and" in body["error"]


def test_page_search_api_and_gallery_by_id_only(demo, served, css_smoke_root, gallery):
    root = Path(css_smoke_root) / "images"
    status, body = demo.request("GET", "/gallery/3")
    assert status == 200 and body == (root / gallery[3]).read_bytes()
    for path in ("/gallery/112", "/gallery/-1", "/gallery/..%2F..%2Fcss_toy_dataset_novel2_small.dup.npy",
                 "/gallery/../css_toy_dataset_novel2_small.dup.npy", "/static/../app.py", "/static/%2e%2e/app.py",
                 "/gallery/%2Fetc%2Fpasswd"):
        status, body = demo.request("GET", path)
        assert status == 404, path
        assert isinstance(body, dict) and "error" in body, path
    status, body = demo.request("GET", "/static/demo.js")
    assert status == 200 and b"fetch(" in body  # the page's own script, served locally

    # the page's search endpoint: the same ranking as the retrieve signature, reference left out
    status, body = demo.request("POST", "/api/search", {"image_id": 5, "text": "make top-left object red", "k": 4})
    ids, scores = _retrieve(served, (root / gallery[5]).read_bytes(), "make top-left object red", 5)
    want = [(i, s) for i, s in zip(ids, scores) if i != 5][:4]
    assert status == 200 and [r["id"] for r in body["results"]] == [i for i, _ in want]
    assert body["timing"]["model_ms"] > 0 and body["timing"]["server_ms"] >= body["timing"]["model_ms"]
    status, body = demo.request("POST", "/api/search", {"image_id": 5, "text": "x", "k": 4,
                                                        "exclude_reference": False})
    assert [r["id"] for r in body["results"]] == _retrieve(served, (root / gallery[5]).read_bytes(), "x", 4)[0]
    status, body = demo.request("GET", "/api/gallery?q=CSS_TEST_00001&limit=5")
    assert status == 200 and body["total"] == 10 and [it["path"] for it in body["items"]] == [
        f"css_test_{i:06d}.png" for i in range(10, 15)]


def test_upload_identical_to_a_gallery_image_is_that_images_query(demo, served, css_smoke_root, gallery):
    """An upload with the very bytes of a gallery file (same sha256 as the export recorded) is that
    gallery image's query: it is left out of its own results and its ground truth is known."""
    root = Path(css_smoke_root) / "images"
    known = _css_targets(css_smoke_root, gallery)
    (ref, text), targets = next((key, t) for key, t in sorted(known.items()) if gallery[key[0]].startswith("css_test_"))
    data = (root / gallery[ref]).read_bytes()
    k = 100
    ids, _ = _retrieve(served, data, text, k + 1)
    assert ref in ids  # the model ranks the reference itself among the top k + 1: leaving it out matters

    status, picked = demo.request("POST", "/api/search", {"image_id": ref, "text": text, "k": k})
    assert status == 200
    status, body = demo.request("POST", "/api/search", {"image": _b64(data), "filename": "copy.png", "text": text,
                                                        "k": k})
    assert status == 200, body
    shown = [r["id"] for r in body["results"]]
    assert shown == [i for i in ids if i != ref][:k] == [r["id"] for r in picked["results"]]
    assert ref not in shown and len(shown) == k
    assert body["query"]["identical_to"] == {"image_id": ref, "path": gallery[ref], "also": []}
    assert body["query"]["exclude_reference"] is True and body["query"]["filename"] == "copy.png"
    assert body["ground_truth"]["known"] is True and body["ground_truth"]["targets"] == len(targets)
    assert {r["id"] for r in body["results"] if r["target"]} == targets & set(shown)

    # unchecked "leave the reference image out": the image stays, as for a gallery pick
    status, body = demo.request("POST", "/api/search", {"image": _b64(data), "text": text, "k": k,
                                                        "exclude_reference": False})
    assert [r["id"] for r in body["results"]] == ids[:k] and body["query"]["exclude_reference"] is False

    # the same pixels in other bytes (another PNG compression) are an ordinary upload
    other = io.BytesIO()
    Image.open(root / gallery[ref]).save(other, format="PNG", compress_level=0)
    assert other.getvalue() != data
    status, body = demo.request("POST", "/api/search", {"image": _b64(other.getvalue()), "text": text, "k": k})
    assert body["query"]["identical_to"] is None and body["query"]["exclude_reference"] is False
    assert [r["id"] for r in body["results"]] == _retrieve(served, other.getvalue(), text, k)[0]
    assert not any(r["target"] for r in body["results"]) and body["ground_truth"]["known"] is False


def test_page_scores_are_cosine_similarities(demo, served, css_smoke_root, gallery):
    """The page's score is the cosine of the query and image embeddings, in [-1, 1], computed
    here from serving_default and embed_image; the raw score (retrieve's, which the REST API
    returns unchanged) is s^2 times it."""
    root = Path(css_smoke_root) / "images"
    status, info = demo.request("GET", "/api/info")
    assert status == 200 and info["scores"]["shown"] == "cosine similarity"
    assert info["scores"]["method"] == "sphere"  # ScaledL2Normalization: every embedding has norm s
    scale = info["scores"]["scale"]
    rng = np.random.default_rng(3)
    upload = _png(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    for request, data, text in (
            ({"image_id": 9, "text": "make top-left object red"}, (root / gallery[9]).read_bytes(),
             "make top-left object red"),
            ({"image": _b64(upload), "text": "remove middle-center object"}, upload, "remove middle-center object"),
            ({"image_id": 40, "text": ""}, (root / gallery[40]).read_bytes(), "")):
        status, body = demo.request("POST", "/api/search", {**request, "k": 30})
        assert status == 200, body
        ids = [r["id"] for r in body["results"]]
        cosine = np.array([r["cosine"] for r in body["results"]])
        want = _cosines(served, data, text, [root / gallery[i] for i in ids])
        np.testing.assert_allclose(cosine, want, atol=1e-5)
        assert np.all(cosine >= -1) and np.all(cosine <= 1) and np.all(np.diff(cosine) <= 1e-6)  # ranked by it
        raw = np.array([r["score"] for r in body["results"]])
        direct_ids, direct_scores = _retrieve(served, data, text, 31)
        assert dict(zip(ids, raw.tolist())) == pytest.approx({i: s for i, s in zip(direct_ids, direct_scores)
                                                              if i in ids}, rel=1e-6)
        np.testing.assert_allclose(raw, scale * cosine, rtol=1e-4, atol=1e-5)
        assert body["scores"]["shown"] == "cosine similarity" and "from -1 to 1" in body["scores"]["text"]
    # TF Serving's predict still answers the SavedModel's own scores
    status, body = demo.request("POST", "/v1/models/css_demo:predict", {"signature_name": "retrieve", "instances": [
        {"image_bytes": _b64(upload), "text": "x", "k": 3}]})
    assert set(body["predictions"][0]) == {"ids", "paths", "scores"}
    np.testing.assert_allclose(body["predictions"][0]["scores"], _retrieve(served, upload, "x", 3)[1], rtol=1e-6)


def test_gallery_entries_stay_inside_the_gallery(exported, css_smoke_root, tmp_path):
    """Symbolic links inside the gallery folder are followed; a list entry or a link leading out
    of the gallery folder is refused with 404, whatever the list says (its target is never read)."""
    import shutil

    from keras_irtf.demo import DemoError
    from keras_irtf.demo.served import ServedModel

    copy = tmp_path / "css_demo" / "1"
    shutil.copytree(exported, copy)
    links = tmp_path / "links"
    links.mkdir()
    source = Path(css_smoke_root) / "images" / "css_test_000001.png"
    shutil.copy(source, links / "a.png")
    (links / "b.png").symlink_to(links / "a.png")  # inside the folder: followed
    (links / "c.png").symlink_to(source)  # out of the folder: refused
    (tmp_path / "secret.txt").write_text("not for visitors")
    (copy / "assets.extra" / "gallery.txt").write_text(
        "a.png\n../secret.txt\n/etc/hostname\nsub/../a.png\nb.png\nc.png\n")
    (copy / "assets.extra" / "gallery_sha256.txt").unlink()  # an export without checksums
    info = json.loads((copy / "assets.extra" / "keras_irtf_export.json").read_text())
    info["gallery"]["size"] = 6
    (copy / "assets.extra" / "keras_irtf_export.json").write_text(json.dumps(info))
    model = ServedModel(copy, gallery_root=links)
    assert model.info["endpoints"] == ["serving_default", "embed_image", "retrieve"]  # the export's file names
    assert model.gallery_files_present and model.gallery_bytes(0) == source.read_bytes()
    assert model.gallery_bytes(3) == model.gallery_bytes(4) == source.read_bytes()
    for bad in (1, 2, 5):
        with pytest.raises(DemoError, match="outside the gallery folder") as e:
            model.gallery_bytes(bad)
        assert e.value.status == 404
    with pytest.raises(DemoError, match="ids run from 0 to 5"):
        model.gallery_file(6)


# ---- pieces without a server ------------------------------------------------------------------------


def _png_header(width, height):
    """A PNG file that declares width x height but holds no pixel data (57 bytes)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_image_limits_read_the_header_only():
    from keras_irtf.demo import DemoError, Limits, check_image

    limits = Limits()  # 10 MB, 40 megapixels
    assert check_image(_png(np.zeros((30, 40, 3), np.uint8)), limits) == (40, 30, "PNG")
    # 49 megapixels declared in 57 bytes: refused without decoding anything
    with pytest.raises(DemoError, match=r"7000 x 7000 = 49.0 megapixels.*up to 40.0 megapixels") as e:
        check_image(_png_header(7000, 7000), limits)
    assert e.value.status == 413
    with pytest.raises(DemoError, match="too many pixels") as e:  # past Pillow's own bomb limit
        check_image(_png_header(100_000, 100_000), limits)
    assert e.value.status == 413
    with pytest.raises(DemoError, match="up to 1 MB") as e:
        check_image(b"\xff\xd8\xff" + bytes(1024 * 1024), Limits(max_upload_bytes=1024 * 1024))
    assert e.value.status == 413
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TIFF")
    with pytest.raises(DemoError, match="TIFF image; the model reads JPEG, PNG, GIF or BMP") as e:
        check_image(buf.getvalue(), limits)
    assert e.value.status == 400
    with pytest.raises(ValueError, match="max_pixels must be >= 1"):
        Limits(max_pixels=0)


def test_tf_serving_format_rules():
    from keras_irtf.demo import DemoError
    from keras_irtf.demo.served import SignatureInfo, TensorInfo
    from keras_irtf.demo.tf_serving import format_predict_response, parse_predict_request

    sigs = {"serving_default": SignatureInfo({"x": TensorInfo("float32", (None,))}, {"y": TensorInfo("float32", (None,))}),
            "two": SignatureInfo({"a": TensorInfo("string", (None,)), "n": TensorInfo("int32", (None,))},
                                 {"ids": TensorInfo("int64", (None, 2)), "name_bytes": TensorInfo("string", (None,))})}
    assert parse_predict_request({"instances": [1.5, 2]}, sigs, 8) == ("serving_default", {"x": [1.5, 2]}, True)
    assert parse_predict_request({"inputs": {"x": [3]}}, sigs, 8) == ("serving_default", {"x": [3]}, False)
    name, cols, rows = parse_predict_request({"signature_name": "two", "instances": [
        {"a": {"b64": base64.b64encode(b"\x00\xff").decode()}, "n": 1}, {"a": "text", "n": 2}]}, sigs, 8)
    assert cols == {"a": [b"\x00\xff", b"text"], "n": [1, 2]} and rows
    with pytest.raises(DemoError, match="expected a number"):
        parse_predict_request({"instances": ["a"]}, sigs, 8)
    with pytest.raises(DemoError, match="expected an integer"):
        parse_predict_request({"signature_name": "two", "instances": [{"a": "t", "n": True}]}, sigs, 8)

    out = {"ids": np.array([[1, 2], [3, 4]], np.int64), "name_bytes": np.array([b"\x00", b"ok"], object)}
    assert format_predict_response(out, True) == {"predictions": [
        {"ids": [1, 2], "name_bytes": {"b64": "AA=="}}, {"ids": [3, 4], "name_bytes": {"b64": "b2s="}}]}
    assert format_predict_response(out, False) == {"outputs": {"ids": [[1, 2], [3, 4]],
                                                               "name_bytes": [{"b64": "AA=="}, {"b64": "b2s="}]}}
    single = {"y": np.array([0.5, float("nan")], np.float32)}
    answer = format_predict_response(single, True)
    assert answer["predictions"][0] == 0.5 and np.isnan(answer["predictions"][1])  # bare values
    assert format_predict_response({"paths": np.array([[b"a.png"]], object)}, False) == {"outputs": [["a.png"]]}


def test_ground_truth_from_a_queries_file(tmp_path):
    from keras_irtf.demo import DemoError
    from keras_irtf.demo.ground_truth import from_jsonl

    gallery = ["dress/a.jpg", "dress/b.jpg", "shirt/c.jpg"]
    path = tmp_path / "queries.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"image": "dress/a.jpg", "text": "Is  Longer", "targets": ["dress/b.jpg"]},
        {"image": "dress/a.jpg", "text": "is red", "targets": ["shirt/c.jpg", "missing.jpg"]},
        {"image": "elsewhere.jpg", "text": "x", "targets": ["dress/a.jpg"]},
    ]) + "\n")
    gt = from_jsonl(path, gallery)
    assert gt.targets(0, "is longer") == {1}  # case and spacing ignored
    assert gt.targets(0, "IS RED") == {2}
    assert gt.targets(0, "is blue") is None and gt.targets(1, "is longer") is None
    assert gt.texts_for(0) == ["Is  Longer", "is red"] and gt.reference_ids == {0}
    path.write_text('{"image": "dress/a.jpg"}\n')
    with pytest.raises(DemoError, match="line 1: expected"):
        from_jsonl(path, gallery)


def test_ctrl_c_stops_the_demo_with_one_line(exported):
    """SIGINT (Ctrl-C) while serving: uvicorn shuts down, then one line and exit status 130, no
    traceback. The server ran with Playwright unimportable: the demo never needs it."""
    from keras_irtf.demo.process import UNIMPORTABLE_IN_THE_CHILD, DemoProcess

    assert "playwright" in UNIMPORTABLE_IN_THE_CHILD
    with DemoProcess(exported, "--log-level", "warning") as proc:
        status, _ = proc.request("GET", "/")
        assert status == 200
    assert proc.proc.returncode == 130, proc.output()[-3000:]
    out = proc.output()
    assert "Traceback" not in out and "KeyboardInterrupt" not in out and "CancelledError" not in out, out[-3000:]
    assert out.strip().splitlines()[-1] == "keras_irtf demo: stopped (Ctrl-C)"


def test_playwright_belongs_to_the_test_extra_and_the_demo_never_imports_it():
    """Playwright drives Chromium in the browser test and the latency benchmark: the test extra
    installs it, the demo extra does not, and neither tools/demo.py nor the modules it serves
    with name it (only keras_irtf.demo.process, the tests' and benchmark's driver, loads it)."""
    import configparser

    from keras_irtf.utils import OPTIONAL_PACKAGES

    root = Path(__file__).resolve().parent.parent
    parser = configparser.ConfigParser()
    parser.read(root / "setup.cfg")
    extras = {name: value.split() for name, value in parser["options.extras_require"].items()}
    assert "playwright" in extras["test"] and "playwright" not in extras["demo"]
    assert OPTIONAL_PACKAGES["playwright"] == "test"
    served = [root / "tools" / "demo.py"] + [p for p in (root / "keras_irtf" / "demo").glob("*.py")
                                            if p.name != "process.py"]
    assert [p.name for p in served if "playwright" in p.read_text().lower()] == []
