"""Serving and demo hardening: what a request (or a serving command) may open, replace or crash.

Each test reproduces a way the demo, tools/query.py or tools/export.py once served a file from
outside its gallery, wrote or deleted outside its folder, wrapped an integer, or ended in a
traceback or a 500, and checks the refusal: a 4xx with a message naming the input, or one error
line and exit 2. The demo is driven in-process (Starlette's TestClient) over a small export.
"""

import ast
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import export_untrained_smoke

ROOT = Path(__file__).resolve().parent.parent
GALLERY_SIZE = 5


def _png(seed, size=24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"hardening_{name}_tool", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env(**extra):
    return dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="-1", TF_CPP_MIN_LOG_LEVEL="3", **extra)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """An untrained smoke model exported with a 5-image gallery (its model and config too)."""
    tmp = tmp_path_factory.mktemp("hardening_serving")
    path, gallery, model, cfg = export_untrained_smoke(
        tmp, [_png(i) for i in range(GALLERY_SIZE)], Path("exported") / "small")
    return types.SimpleNamespace(path=path, gallery=gallery, model=model, cfg=cfg, run_dir=tmp)


def _copy_gallery(small, tmp_path, name="gallery"):
    copy = tmp_path / name
    shutil.copytree(small.gallery, copy)
    return copy


def _client(small, gallery):
    """The demo's app over the export, its gallery read from `gallery` (no start-up checks: what
    a gallery changed while the demo runs looks like)."""
    pytest.importorskip("fastapi", reason="the demo needs its extra: pip install -e '.[demo]'")
    from starlette.testclient import TestClient

    from keras_irtf.demo.app import create_app
    from keras_irtf.demo.served import ServedModel

    return TestClient(create_app(ServedModel(small.path, gallery_root=gallery)), raise_server_exceptions=False)


def _b64(data: bytes):
    import base64

    return {"b64": base64.b64encode(data).decode()}


def _post(client, url, raw: bytes):
    return client.post(url, content=raw, headers={"Content-Type": "application/json"})


# ---- 1. files outside the gallery folder ----------------------------------------------------------
def test_demo_gallery_route_does_not_follow_a_link_out_of_the_gallery(small, tmp_path):
    gallery = _copy_gallery(small, tmp_path)
    secret = tmp_path / "secret.png"  # an image, so that nothing but the containment check refuses it
    secret.write_bytes(_png(99))
    client = _client(small, gallery)
    (gallery / "g1.png").unlink()
    (gallery / "g1.png").symlink_to(secret)  # planted while the demo runs
    (gallery / "g2.png").unlink()
    (gallery / "g2.png").symlink_to("/etc/passwd")
    (gallery / "kept").mkdir()
    (gallery / "g3.png").rename(gallery / "kept" / "g3.png")
    (gallery / "g3.png").symlink_to(gallery / "kept" / "g3.png")  # a link inside the gallery is fine
    (gallery / "g4.png").unlink()
    (gallery / "g4.png").symlink_to(gallery / "g0.png")  # inside, but other bytes than the export embedded
    for gid in (1, 2):
        r = client.get(f"/gallery/{gid}")
        assert r.status_code == 404, (gid, r.status_code, r.content[:80])
        assert "outside the gallery folder" in r.json()["error"]
        assert str(secret) not in r.text and "/etc/passwd" not in r.text  # where it leads stays in the log
        assert client.get(f"/api/gallery/{gid}/texts").status_code == 404
    r = client.get("/gallery/3")
    assert r.status_code == 200 and r.content == (gallery / "kept" / "g3.png").read_bytes()
    assert r.headers["content-type"] == "image/png"
    r = client.get("/gallery/4")
    assert r.status_code == 404 and "is not the image the export embedded" in r.json()["error"]


def test_demo_serves_no_file_an_export_lists_without_checksums_from_its_recorded_root(small, tmp_path):
    """An export's description names its gallery root and files; one that records no checksums
    (or lies about the root) must not turn the demo into a file server: without --gallery, only
    files whose sha256 the export recorded are served."""
    pytest.importorskip("fastapi")
    from starlette.testclient import TestClient

    from keras_irtf.demo.app import create_app
    from keras_irtf.demo.served import ServedModel

    crafted = tmp_path / "crafted" / "1"
    shutil.copytree(small.path, crafted)
    info_file = crafted / "assets.extra" / "keras_irtf_export.json"
    info = json.loads(info_file.read_text())
    info["gallery"]["root"] = "/"
    info_file.write_text(json.dumps(info))
    (crafted / "assets.extra" / "gallery.txt").write_text("etc/passwd\n" * GALLERY_SIZE)
    (crafted / "assets.extra" / "gallery_sha256.txt").unlink()  # owned: the test's own copy of its export
    model = ServedModel(crafted)
    client = TestClient(create_app(model), raise_server_exceptions=False)
    r = client.get("/gallery/0")
    assert r.status_code == 404 and "root:" not in r.text
    assert "records no checksums of its gallery files" in r.json()["error"]


def test_demo_search_by_image_id_does_not_read_a_link_out_of_the_gallery(small, tmp_path):
    gallery = _copy_gallery(small, tmp_path)
    secret = tmp_path / "secret.png"
    secret.write_bytes(_png(99))
    client = _client(small, gallery)
    assert client.post("/api/search", json={"image_id": 1, "text": "x", "k": 2}).status_code == 200
    (gallery / "g1.png").unlink()
    (gallery / "g1.png").symlink_to(secret)
    r = client.post("/api/search", json={"image_id": 1, "text": "x", "k": 2})
    assert r.status_code == 404 and "gallery image 1 ('g1.png') points outside the gallery folder" in r.json()["error"]


def test_demo_refuses_to_start_on_a_gallery_with_a_link_out(small, tmp_path):
    pytest.importorskip("fastapi")
    from keras_irtf.demo import DemoError, build_app

    gallery = _copy_gallery(small, tmp_path)
    (gallery / "g4.png").unlink()
    (gallery / "g4.png").symlink_to(small.gallery / "g4.png")  # the same bytes, but outside this folder
    with pytest.raises(DemoError, match=r"does not hold the images the export embedded: g4.png leads outside"):
        build_app(small.path, gallery=gallery)


def test_query_reads_no_gallery_file_outside_the_gallery(small, tmp_path, capsys, monkeypatch):
    from keras_irtf.serving.export import ExportError, list_gallery

    gallery = _copy_gallery(small, tmp_path)
    (tmp_path / "outside.png").write_bytes(_png(99))
    (gallery / "g1.png").unlink()
    (gallery / "g1.png").symlink_to(tmp_path / "outside.png")
    with pytest.raises(ExportError, match=r"gallery file 'g1.png' resolves to .*outside.png, outside"):
        list_gallery(gallery)  # what the exporter and tools/query.py list
    tool = _tool("query")
    args = ["--model", str(small.path), "--image", str(small.gallery / "g0.png"), "--text", "x",
            "--out", str(tmp_path / "grid.png")]
    assert tool.main(args + ["--gallery", str(gallery)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: gallery file 'g1.png' resolves to") and "Traceback" not in err
    assert not (tmp_path / "grid.png").exists()
    # --target relative to --gallery stays inside it too
    cwd = tmp_path / "cwd" / "here"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)  # "../outside.png" is no file from here, only from the gallery
    assert tool.main(args + ["--gallery", str(gallery), "--target", "../outside.png"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --target gallery file '../outside.png' resolves to") and "outside" in err


# ---- 2. export names and version folders ----------------------------------------------------------
@pytest.mark.parametrize("name", ["../../x", "a/b", "/abs", "", "..", ".", "a\x00b"])
def test_export_name_is_one_plain_folder_name(name, tmp_path, capsys):
    out = tmp_path / "deep" / "out"
    code = _tool("export").main(["--run", str(tmp_path / "no_run"), "--out", str(out), "--name", name, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: --name {name!r} must be one plain folder name")
    assert not (tmp_path / "x").exists() and not out.exists()


def test_export_name_through_a_link_out_of_out_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "elsewhere").symlink_to(tmp_path)
    assert _tool("export").main(["--run", str(tmp_path / "no_run"), "--out", str(out), "--name", "elsewhere"]) == 2
    assert "--name 'elsewhere' resolves to" in capsys.readouterr().err


def test_force_replaces_only_a_version_folder_keras_irtf_wrote(small, tmp_path):
    import tensorflow as tf

    from keras_irtf.safety import MARKER_NAME, NotOwnedError, owned_kind
    from keras_irtf.serving.export import export_model, write_atomically

    base = tmp_path / "exported"
    user = base / "1"
    user.mkdir(parents=True)
    (user / "thesis.tex").write_text("keep me")

    def write(folder):
        Path(folder).mkdir()
        (Path(folder) / "saved_model.pb").write_bytes(b"new")

    with pytest.raises(NotOwnedError, match=r"exported/1 is a folder keras_irtf did not write \(holds thesis.tex\)"):
        write_atomically(base, 1, write, force=True)
    with pytest.raises(NotOwnedError, match="did not write"):  # refused before the gallery is embedded
        export_model(small.model, small.cfg, base, run_dir=small.run_dir, version=1, force=True, verbose=False)
    assert (user / "thesis.tex").read_text() == "keep me" and sorted(p.name for p in base.iterdir()) == ["1"]

    # every version folder written carries the marker, and loads as before
    assert owned_kind(small.path) == "export version" and (small.path / MARKER_NAME).is_file()
    assert set(tf.saved_model.load(str(small.path)).signatures) == {"serving_default", "embed_image", "retrieve"}
    # a version of ours is replaced as a whole
    write_atomically(base, 2, write)
    (base / "2" / "stale.txt").write_text("old")
    write_atomically(base, 2, write, force=True)
    assert sorted(p.name for p in (base / "2").iterdir()) == [MARKER_NAME, "saved_model.pb"]
    assert sorted(p.name for p in base.iterdir()) == ["1", "2"]  # no staging or swapped-out folder left

    def crash(folder):
        write(folder)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(base, 3, crash)
    assert sorted(p.name for p in base.iterdir()) == ["1", "2"]


def test_every_delete_in_the_serving_code_states_its_guard():
    """No rmtree in the serving and demo code (remove_owned / replace_folder do the deleting);
    any other delete call names, in an `# owned:` comment, why the path is the code's own."""
    files = sorted((ROOT / "keras_irtf" / "serving").glob("*.py")) + sorted((ROOT / "keras_irtf" / "demo").glob("*.py"))
    files += [ROOT / "tools" / f"{t}.py" for t in ("demo", "query", "export")]
    problems = []
    for path in files:
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in {"rmtree", "unlink", "rmdir", "removedirs"}:
                if node.func.attr == "rmtree" or "# owned:" not in lines[node.lineno - 1]:
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.func.attr}")
    assert not problems, problems


# ---- 3. k is checked before it becomes an int32 -----------------------------------------------------
def test_rest_k_out_of_range_is_refused_not_wrapped(small, tmp_path):
    client = _client(small, small.gallery)
    image = _b64((small.gallery / "g0.png").read_bytes())
    url = "/v1/models/small:predict"
    for k in (4294967299, 2**31, 2**63 + 3, GALLERY_SIZE + 1, 0, -1):
        for body in ({"signature_name": "retrieve", "instances": [{"image_bytes": image, "text": "x", "k": k}]},
                     {"signature_name": "retrieve", "inputs": {"image_bytes": [image], "text": ["x"], "k": [k]}}):
            r = client.post(url, json=body)
            assert r.status_code == 400, (k, r.text[:200])
            assert f"k must be >= 1 and <= {GALLERY_SIZE} (the gallery holds {GALLERY_SIZE} images" in r.json()["error"]
            assert f"got {k}" in r.json()["error"]
    for k in (True, 2.0, "3", [2]):
        r = client.post(url, json={"signature_name": "retrieve", "instances": [{"image_bytes": image, "text": "x", "k": k}]})
        assert r.status_code == 400 and "instances[0].k" in r.json()["error"], (k, r.text)
    r = client.post(url, json={"signature_name": "retrieve", "instances": [{"image_bytes": image, "text": "x",
                                                                            "k": GALLERY_SIZE}]})
    assert r.status_code == 200 and len(r.json()["predictions"][0]["ids"]) == GALLERY_SIZE
    r = client.post("/api/search", json={"image_id": 0, "text": "x", "k": 4294967299})
    assert r.status_code == 400 and "k must be between 1 and" in r.json()["error"]
    r = client.post("/api/search", json={"image_id": 0, "text": "x"})  # the default k fits a small gallery
    assert r.status_code == 200 and len(r.json()["results"]) == GALLERY_SIZE - 1


def test_query_top_beyond_the_gallery_is_the_whole_gallery(small):
    from keras_irtf.serving.query import ExportedModel, QueryError, search

    model = ExportedModel(small.path)
    query = small.gallery / "g0.png"
    for top in (4294967299, 2**31, GALLERY_SIZE + 10):
        results = search(model, query, "x", small.gallery, top=top, exclude_query=False)
        assert len(results) == GALLERY_SIZE, top
    assert len(search(model, query, "x", small.gallery, top=4294967299)) == GALLERY_SIZE - 1
    with pytest.raises(QueryError, match="k must be an integer from 1 to 2147483647, got 4294967299"):
        model.retrieve(query.read_bytes(), "x", 4294967299)


# ---- 4. a gallery with the export's names but other pictures ------------------------------------------
def test_demo_refuses_a_gallery_other_than_the_embedded_one(small, tmp_path):
    pytest.importorskip("fastapi")
    from keras_irtf.demo import DemoError, build_app

    other = _copy_gallery(small, tmp_path, "other")
    (other / "g0.png").write_bytes((small.gallery / "g1.png").read_bytes())
    (other / "g1.png").write_bytes((small.gallery / "g0.png").read_bytes())
    with pytest.raises(DemoError, match=r"does not hold the images the export embedded: g0.png is not the image the "
                                        r"export embedded \(its sha256 differs\).*export again with --gallery"):
        build_app(small.path, gallery=other)
    (other / "g0.png").unlink()
    with pytest.raises(DemoError, match="g0.png is missing"):
        build_app(small.path, gallery=other)
    same = _copy_gallery(small, tmp_path, "same")
    (same / "extra.png").write_bytes(_png(7))  # files the export did not embed do not matter
    assert build_app(small.path, gallery=same).state.demo.model.gallery_root == same.resolve()


def test_query_and_demo_share_the_gallery_check(small, tmp_path, monkeypatch):
    """tools/query.py and the demo decide "the stored embeddings rank this folder" with one function."""
    pytest.importorskip("fastapi")
    from keras_irtf.demo import served
    from keras_irtf.serving import export, query

    assert query.gallery_difference is export.gallery_difference is served.gallery_difference
    calls = []
    monkeypatch.setattr(query, "gallery_difference", lambda *a, **k: calls.append(a) or "differs")
    model = query.ExportedModel(small.path)
    monkeypatch.setattr(model, "retrieve", lambda *a: pytest.fail("stored embeddings used for a differing gallery"))
    assert len(query.search(model, small.gallery / "g0.png", "x", small.gallery, top=2)) == 2 and calls


# ---- 5. a damaged export ------------------------------------------------------------------------------
def _damage(small, tmp_path, how):
    copy = tmp_path / "damaged" / "1"
    shutil.copytree(small.path, copy)
    if how == "truncated saved_model.pb":
        data = (copy / "saved_model.pb").read_bytes()
        (copy / "saved_model.pb").write_bytes(data[:1000])
        return copy, copy / "saved_model.pb"
    if how == "missing variables file":
        target = next((copy / "variables").glob("variables.data-*"))
        target.unlink()
        return copy, target
    if how == "truncated variables file":
        target = next((copy / "variables").glob("variables.data-*"))
        target.write_bytes(target.read_bytes()[:100])
        return copy, copy / "variables"
    if how == "garbage metadata JSON":
        target = copy / "assets.extra" / "keras_irtf_export.json"
        target.write_text("{garbage")
        return copy, target
    if how == "gallery list not UTF-8":
        target = copy / "assets.extra" / "gallery.txt"
        target.write_bytes(b"\xff\xfe\n")
        return copy, target
    raise AssertionError(how)


DAMAGES = ["truncated saved_model.pb", "missing variables file", "truncated variables file", "garbage metadata JSON",
           "gallery list not UTF-8"]


@pytest.mark.parametrize("how", DAMAGES)
def test_query_names_a_damaged_export(small, tmp_path, capsys, how):
    path, damaged = _damage(small, tmp_path, how)
    code = _tool("query").main(["--model", str(path), "--image", str(small.gallery / "g0.png"), "--text", "x",
                                "--gallery", str(small.gallery), "--out", str(tmp_path / "grid.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: damaged export: {damaged}") and "export the run again" in err


@pytest.mark.parametrize("how", DAMAGES)
def test_demo_names_a_damaged_export(small, tmp_path, capsys, how):
    pytest.importorskip("fastapi")
    path, damaged = _damage(small, tmp_path, how)
    code = _tool("demo").main(["--model", str(path), "--port", "0", "--log-level", "error"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: damaged export: {damaged}")


# ---- 6. the demo without its extra ------------------------------------------------------------------------
@pytest.mark.parametrize("package", ["fastapi", "uvicorn"])
def test_demo_without_its_extra_says_what_to_install(small, tmp_path, package):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(f"import sys\nsys.modules[{package!r}] = None  # as if not installed\n")
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(shim), str(ROOT)])
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "demo.py"), "--model", str(small.path), "--port", "0"],
                       capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: the demo needs the package {package}, which is not installed: pip install -e '.[demo]'")


# ---- 7. request bodies nested deeply ----------------------------------------------------------------------
def test_deeply_nested_json_is_a_400(small):
    client = _client(small, small.gallery)
    for depth in (100_000, 200, 33):
        body = b"[" * depth + b"]" * depth
        for url in ("/api/search", "/v1/models/small:predict"):
            r = _post(client, url, body)
            assert r.status_code == 400, (depth, url, r.text[:200])
            assert "nests lists and objects more than 32 levels deep" in r.json()["error"]
    nested = {"instances": [{"image_bytes": _b64(b"x"), "text": "x"}]}
    for _ in range(40):
        nested = {"signature_name": "serving_default", "instances": nested["instances"], "x": nested}
    assert _post(client, "/api/search", json.dumps(nested).encode()).status_code == 400
    assert _post(client, "/api/search", b"[" * 31 + b"]" * 31).json()["error"] == "the request body must be a JSON object"


# ---- other requests that crashed the demo -----------------------------------------------------------------
def test_text_that_is_not_unicode_is_a_400(small):
    client = _client(small, small.gallery)
    image = _b64((small.gallery / "g0.png").read_bytes())["b64"]
    for url, raw in (("/api/search", '{"image_id": 0, "text": "\\ud800", "k": 2}'),
                     ("/v1/models/small:predict", '{"instances": [{"image_bytes": {"b64": "%s"}, "text": "\\ud800"}]}'
                      % image)):
        r = _post(client, url, raw.encode())
        assert r.status_code == 400 and "not valid Unicode" in r.json()["error"], r.text[:300]


def test_huge_ids_and_versions_in_urls_are_a_404(small, caplog):
    client = _client(small, small.gallery)
    digits = "9" * 5000  # int() refuses over 4300 digits
    for url in (f"/gallery/{digits}", f"/api/gallery/{digits}/texts", f"/v1/models/small/versions/{digits}",
                "/gallery/-1", "/gallery/1e3", "/gallery/%D9%A3"):
        r = client.get(url)
        assert r.status_code == 404 and "error" in r.json(), (url[:60], r.status_code, r.text[:200])
    r = _post(client, f"/v1/models/small/versions/{digits}:predict", b"{}")
    assert r.status_code == 404 and len(r.json()["error"]) < 300
    assert client.get("/v1/models/small/versions/01").status_code == 200
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert refusals and max(map(len, refusals)) < 1000  # a 5000-digit URL does not become a 5000-byte log line
