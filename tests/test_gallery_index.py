"""Galleries of millions: tools/index.py's embedding pipeline (Apache Beam over an export) and
the index it builds."""

import hashlib
import importlib.util
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import export_untrained_smoke

pytest.importorskip("apache_beam")
pytest.importorskip("faiss")

from keras_irtf.index import ann  # noqa: E402
from keras_irtf.index.embeddings import EmbeddingsError, EmbeddingStore, read_shard  # noqa: E402
from keras_irtf.index.pipeline import embed_batch, image_problem, parse_images, read_image  # noqa: E402
from keras_irtf.safety import NotOwnedError, mark_owned  # noqa: E402


# ---- the embedding pipeline ---------------------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("index_tool", ROOT / "tools" / "index.py")
index_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(index_tool)
HNSW = ["--kind", "hnsw", "--param", "M=32", "--param", "ef_construction=200", "--param", "ef_search=200"]
COUNTS = re.compile(r"(\d+) new images embedded, (\d+) skipped as already embedded, (\d+) dead-lettered")


def _drawing(i: int, size: int = 24) -> Image.Image:
    """A small picture of its own: a coloured shape on a background, placed by `i`."""
    rng = np.random.default_rng(i)
    im = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(im)
    x, y = (int(v) for v in rng.integers(0, size // 2, 2))
    box = [x, y, x + size // 2, y + size // 2]
    (draw.ellipse if i % 2 else draw.rectangle)(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return im


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    _drawing(i).save(buf, "PNG")
    return buf.getvalue()


def _write_gallery(folder: Path, numbers) -> list:
    """PNGs drawn by `numbers`, some in a subfolder; returns their ids (paths relative to folder)."""
    ids = []
    for i in numbers:
        rel = f"shelf{i % 2}/item{i:02d}.png" if i % 3 else f"item{i:02d}.png"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(_png(i))
        ids.append(rel)
    return sorted(ids)


def _run(capsys, *argv) -> tuple:
    """tools/index.py's main in this process: (status, standard output, standard error)."""
    code = index_tool.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _counts(out: str) -> tuple:
    found = COUNTS.search(out)
    assert found, out
    return tuple(int(v) for v in found.groups())


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """An untrained smoke export (32-px images): (path, ExportedModel)."""
    from keras_irtf.serving.query import ExportedModel

    path, _, _, _ = export_untrained_smoke(tmp_path_factory.mktemp("export"), [_png(100), _png(101)], "exported")
    return path, ExportedModel(path)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, export):
    """A gallery of 12 drawings, a corrupt PNG and a link to an image outside it, indexed once."""
    base = tmp_path_factory.mktemp("gallery")
    gallery = base / "gallery"
    ids = _write_gallery(gallery, range(12))
    (gallery / "shelf1" / "corrupt.png").write_bytes(_png(50)[:70])  # a PNG cut short: its header reads fine
    (base / "outside.png").write_bytes(_png(51))
    os.symlink(base / "outside.png", gallery / "shelf0" / "elsewhere.png")
    return {"gallery": gallery, "ids": ids, "out": base / "indexes" / "shop", "export": export[0],
            "model": export[1], "base": base, "runs": {}}


@pytest.fixture
def first_run(indexed, capsys):
    """The first run of tools/index.py over the gallery (made once; later tests see its output)."""
    if "first" not in indexed["runs"]:
        indexed["runs"]["first"] = _run(capsys, "--model", indexed["export"], "--images", indexed["gallery"],
                                        "--out", indexed["out"], *HNSW, "--direct_running_mode", "in_memory")
    return indexed["runs"]["first"]


def test_the_run_reports_new_skipped_and_dead_lettered_images(first_run, indexed):
    code, out, err = first_run
    assert code == 0, err
    assert _counts(out) == (12, 0, 2)
    assert f"hnsw index of 12 images, recall@10 1.0000 against exact search: {indexed['out']}" in out
    store = EmbeddingStore(indexed["out"])
    assert store.count == 12 and store.images["images_root"] == str(indexed["gallery"].resolve())
    assert ann.fingerprints_match(store.fingerprint, ann.export_fingerprint(indexed["export"]))


def test_the_dead_letter_names_the_corrupt_image_and_the_link_out_with_reasons(first_run, indexed):
    lines = (indexed["out"] / "dead_letter.jsonl").read_text().splitlines()
    letters = {d["id"]: d for d in map(json.loads, lines)}
    assert set(letters) == {"shelf1/corrupt.png", "shelf0/elsewhere.png"}
    assert letters["shelf1/corrupt.png"]["reason"].startswith("cannot be decoded (a corrupt or truncated image)")
    assert letters["shelf1/corrupt.png"]["path"].endswith("gallery/shelf1/corrupt.png")
    outside = letters["shelf0/elsewhere.png"]["reason"]
    assert "outside" in outside and str((indexed["base"] / "outside.png").resolve()) in outside
    assert "only files under the images folder are read" in outside


def test_the_index_finds_the_exact_top_10_of_the_exports_embeddings(first_run, indexed):
    model, gallery = indexed["model"], indexed["gallery"]
    index = ann.GalleryIndex.load(indexed["out"], fingerprint=ann.export_fingerprint(indexed["export"]))
    assert index.kind == "hnsw" and sorted(index.ids) == indexed["ids"]
    assert index.images_root == gallery.resolve()
    assert index.image_path(index.ids.index("item00.png")) == (gallery / "item00.png").resolve()
    # each image's checksum recorded as embedded: the bytes a server may hand out for its row
    assert index.hashes == [hashlib.sha256((gallery / i).read_bytes()).hexdigest() for i in index.ids]
    assert index.image_bytes(index.ids.index("item00.png")) == (gallery / "item00.png").read_bytes()
    # the exact ranking, from the export's own embed_image on the same files, in the index's row order
    exact = _unit(model.embed_images([(gallery / i).read_bytes() for i in index.ids]))
    ids, stored = EmbeddingStore(indexed["out"]).read_all()
    np.testing.assert_allclose(stored[[ids.index(i) for i in index.ids]], exact, atol=1e-5)
    # queries: every gallery image, and composed queries (an image and a text) as a user sends them
    texts = ["add a red cube", "make it blue"]
    composed = model.embed_queries([_png(200 + j) for j in range(6)], [texts[j % 2] for j in range(6)])
    queries = np.concatenate([exact, _unit(composed)]).astype(np.float32)
    exact_scores, exact_rows = ann.exact_topk(exact, queries, 10)
    scores, rows = index.search(queries, 10)
    assert ann.recall_at_k(exact, queries, rows, exact_scores, k=10) == 1.0
    for got, want in zip(rows, exact_rows):  # the same ten images (ties aside, the same order)
        assert {index.ids[r] for r in got} == {index.ids[r] for r in want}


def test_an_index_of_another_export_is_refused(first_run, indexed, tmp_path, capsys):
    other_path, _, _, _ = export_untrained_smoke(tmp_path, [_png(102)], "other")
    other = ann.export_fingerprint(other_path)
    assert not ann.fingerprints_match(other, ann.export_fingerprint(indexed["export"]))
    with pytest.raises(ann.GalleryIndexError, match="was built from the embeddings of another export"):
        ann.GalleryIndex.load(indexed["out"], fingerprint=other)
    # tools/index.py with the other export into the same folder: refused before anything is read or written
    before = {p: p.stat().st_mtime_ns for p in indexed["out"].rglob("*")}
    code, out, err = _run(capsys, "--model", other_path, "--images", indexed["gallery"], "--out", indexed["out"])
    assert code == 2 and out == ""
    assert err.startswith(f"error: {indexed['out']} holds the embeddings of another export")
    assert "use another --out, or --replace" in err
    assert {p: p.stat().st_mtime_ns for p in indexed["out"].rglob("*")} == before


def test_a_second_run_embeds_only_the_new_images_and_keeps_the_old_shards(export, tmp_path, capsys):
    gallery, out = tmp_path / "gallery", tmp_path / "index"
    _write_gallery(gallery, range(12))
    args = ["--model", export[0], "--images", gallery, "--out", out, "--kind", "flat"]
    code, first, err = _run(capsys, *args, "--shards", "2")
    assert code == 0, err
    assert _counts(first) == (12, 0, 0)
    store = EmbeddingStore(out)
    old = {name: hashlib.sha256((store.folder / name).read_bytes()).hexdigest() for name in store.shards}
    assert sorted(old) == ["part-00000-of-00002.npz", "part-00001-of-00002.npz"]
    added = _write_gallery(gallery, [12, 13])
    code, second, err = _run(capsys, *args)
    assert code == 0, err
    assert _counts(second) == (2, 12, 0)
    store = EmbeddingStore(out)
    assert store.shards == [*sorted(old), "part-00002-of-00003.npz"]
    assert {name: hashlib.sha256((store.folder / name).read_bytes()).hexdigest() for name in old} == old
    assert sorted(read_shard(store.folder / "part-00002-of-00003.npz")[0]) == added
    assert ann.GalleryIndex.load(out).size == 14 and "flat index of 14 images" in second
    # nothing new: nothing embedded, the index rebuilt from the shards as they are
    code, third, err = _run(capsys, *args)
    assert code == 0 and _counts(third) == (0, 14, 0) and len(EmbeddingStore(out).shards) == 3


def test_replace_deletes_only_a_folder_keras_irtf_wrote(export, tmp_path, capsys):
    gallery = tmp_path / "gallery"
    _write_gallery(gallery, range(3))
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    code, out, err = _run(capsys, "--model", export[0], "--images", gallery, "--out", theirs, "--replace")
    assert code == 2 and "keras_irtf did not write" in err and "choose another --out" in err
    assert (theirs / "notes.txt").read_text() == "keep me"
    ours = tmp_path / "ours"
    mark_owned(ours, ann.INDEX_KIND)
    (ours / "stale.txt").write_text("from before")
    code, out, err = _run(capsys, "--model", export[0], "--images", gallery, "--out", ours, "--replace")
    assert code == 0, err
    assert _counts(out) == (3, 0, 0) and not (ours / "stale.txt").exists()


def test_tfrecords_are_read_with_their_ids(export, tmp_path, capsys):
    import tensorflow as tf

    def example(**features):
        return tf.train.Example(features=tf.train.Features(feature={
            k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v])) for k, v in features.items()}))

    records = tmp_path / "records"
    records.mkdir()
    with tf.io.TFRecordWriter(str(records / "a.tfrecord")) as w:
        for i in range(3):
            w.write(example(id=f"sku-{i}".encode(), image=_png(i)).SerializeToString())
        w.write(example(id=b"sku-broken", image=b"not an image").SerializeToString())
    with tf.io.TFRecordWriter(str(records / "b.tfrecord")) as w:
        w.write(example(id=b"sku-3", image=_png(3)).SerializeToString())
        w.write(example(id=b"sku-no-image").SerializeToString())
    out = tmp_path / "index"
    args = ["--model", export[0], "--images", f"tfrecord:{records}/*.tfrecord", "--out", out]
    code, first, err = _run(capsys, *args)
    assert code == 0, err
    assert _counts(first) == (4, 0, 2)
    letters = {d["id"]: d for d in map(json.loads, (out / "dead_letter.jsonl").read_text().splitlines())}
    assert letters["sku-broken"]["reason"].startswith("not a JPEG, PNG, GIF or BMP image")
    assert letters["sku-broken"]["path"].endswith("a.tfrecord")
    assert letters["sku-no-image"]["reason"] == "a record without one bytes feature 'image' (found 0 values)"
    index = ann.GalleryIndex.load(out)
    assert sorted(index.ids) == [f"sku-{i}" for i in range(4)] and index.images_root is None
    ids, stored = EmbeddingStore(out).read_all()
    np.testing.assert_allclose(stored[ids.index("sku-2")], _unit(export[1].embed_images([_png(2)]))[0], atol=1e-5)
    code, second, err = _run(capsys, *args)
    assert code == 0 and _counts(second) == (0, 4, 2)  # already embedded: counted in the pipeline


def test_flags_that_are_neither_the_tools_nor_beams_are_refused_before_any_work(tmp_path, capsys):
    args = ["--model", tmp_path / "no-export", "--images", tmp_path, "--out", tmp_path / "out"]
    with pytest.raises(SystemExit) as e:
        _run(capsys, *args, "--batchsize", "8")
    assert e.value.code == 2 and "unrecognised arguments: --batchsize" in capsys.readouterr().err
    code, out, err = _run(capsys, *args, "--kind", "hnsw", "--param", "ef=10")
    assert code == 2 and "index kind hnsw: unknown parameter(s) ['ef']" in err
    assert not (tmp_path / "out").exists()


def test_an_export_the_workers_cannot_load_is_one_line(export, tmp_path, capsys):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(export[0], damaged)
    for part in (damaged / "variables").glob("variables.data*"):
        part.write_bytes(part.read_bytes()[:100])
    gallery = tmp_path / "gallery"
    _write_gallery(gallery, range(2))
    code, out, err = _run(capsys, "--model", damaged, "--images", gallery, "--out", tmp_path / "out")
    assert code == 2 and out == ""
    assert err.strip().splitlines()[-1].startswith(f"error: damaged export: {damaged / 'variables'}")
    assert "Traceback" not in err and not list((tmp_path / "out" / "embeddings").glob("*"))


# the pieces, without Beam
def test_folder_list_and_glob_specs_name_the_same_images(tmp_path):
    gallery = tmp_path / "gallery"
    ids = _write_gallery(gallery, range(5))
    (gallery / "readme.txt").write_text("not an image")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", gallery / "linked")  # a link to a folder is not followed
    folder = parse_images(str(gallery))
    assert folder.kind == "folder" and folder.ids == ids and folder.root == gallery
    assert [d["id"] for d in folder.dead] == ["linked"]
    assert "links to folders are not followed" in folder.dead[0]["reason"]
    listed = tmp_path / "list.txt"
    listed.write_text("".join(f"gallery/{i}\n" for i in reversed(ids)) + "\n" + f"gallery/{ids[0]}\n")
    as_list = parse_images(str(listed))
    assert as_list.kind == "list" and as_list.ids == [f"gallery/{i}" for i in reversed(ids)]  # once each
    assert as_list.root == tmp_path
    as_glob = parse_images(f"{gallery}/**/*.png")
    assert as_glob.kind == "glob" and as_glob.root == gallery and as_glob.ids == ids
    assert as_glob.describe()["images_root"] == str(gallery.resolve())
    for spec, message in [(str(tmp_path / "missing"), "no such folder or file"),
                          (f"{tmp_path}/nothing/*.png", "the folder .*nothing does not exist"),
                          (f"tfrecord:{tmp_path}/*.tfrecord", "no file matches")]:
        with pytest.raises(EmbeddingsError, match=message):
            parse_images(spec)


def test_reading_an_image_checks_it_before_any_batch(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok.png").write_bytes(_png(1))
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("hello")
    big = io.BytesIO()
    Image.new("RGB", (64, 64)).save(big, "PNG")
    (root / "big.png").write_bytes(big.getvalue())
    (tmp_path / "secret.png").write_bytes(_png(2))
    os.symlink(tmp_path / "secret.png", root / "link.png")
    assert read_image(root, "ok.png")[2] == _png(1)
    reasons = {name: read_image(root, name, max_pixels=1000, max_bytes=10_000) for name in
               ("empty.png", "text.png", "big.png", "link.png", "../secret.png", "missing.png")}
    assert reasons["empty.png"]["reason"] == "an empty file"
    assert reasons["text.png"]["reason"].startswith("not a JPEG, PNG, GIF or BMP image")
    assert "64 x 64 = 4096 pixels is over the limit of 1000 pixels" in reasons["big.png"]["reason"]
    for name in ("link.png", "../secret.png"):
        assert "outside" in reasons[name]["reason"] and "only files under the images folder" in reasons[name]["reason"]
    assert reasons["missing.png"]["reason"].startswith("cannot be opened")
    assert read_image(root, "ok.png", max_bytes=10)["reason"].endswith("bytes a file (--max-file-mb)")
    assert image_problem(_png(3)[:60]).startswith("cannot be decoded")


def test_an_image_the_graph_refuses_costs_only_itself(export):
    """A batch holding bytes the export cannot embed is embedded one image at a time: the
    others keep their embeddings (the pipeline checks decoding first; this is its safety net)."""
    model = export[1]
    vectors = embed_batch(model, [_png(1), b"\x89PNG\r\n\x1a\n garbage", _png(2)])
    assert isinstance(vectors[1], str) and vectors[1].startswith("the export could not embed it")
    want = _unit(model.embed_images([_png(1), _png(2)]))
    np.testing.assert_allclose(np.stack([vectors[0], vectors[2]]), want, atol=1e-5)


def test_a_folder_keras_irtf_did_not_write_is_refused(export, tmp_path):
    from keras_irtf.index.pipeline import embed_gallery

    gallery = tmp_path / "gallery"
    _write_gallery(gallery, range(2))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "data.bin").write_bytes(b"x")
    with pytest.raises(NotOwnedError, match="did not write as a gallery index"):
        embed_gallery(export[0], str(gallery), taken)
    assert sorted(p.name for p in taken.iterdir()) == ["data.bin"]


def test_a_file_name_that_is_not_utf8_is_a_dead_letter_reason_not_a_crash():
    from keras_irtf.index.pipeline import id_problem

    assert id_problem("caf\udce9.jpg") == "its name is not valid UTF-8 text; rename it"  # os.fsdecode of Latin-1
    assert id_problem("café.jpg") is None


def test_a_tfrecord_id_embedded_already_is_skipped_before_its_image_is_decoded():
    import tensorflow as tf

    from keras_irtf.index.pipeline import parse_record

    def record(image_id, image):
        return tf.train.Example(features=tf.train.Features(feature={
            "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_id])),
            "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image]))})).SerializeToString()

    corrupt = record(b"old.png", b"\x89PNG\r\n\x1a\nnot really")  # decoding it would dead-letter it
    assert parse_record("a.tfrecord", corrupt, done=frozenset({"old.png"})) is None
    assert parse_record("a.tfrecord", corrupt)["reason"]  # not embedded yet: checked, and refused
    assert parse_record("a.tfrecord", record(b"new.png", _png(7)), done=frozenset({"old.png"}))[0] == "new.png"


def test_a_killed_runs_staging_is_removed_only_when_ours_and_dead(export, tmp_path, capsys):
    import subprocess
    import sys

    from keras_irtf.index import pipeline as P

    gallery = tmp_path / "gallery"
    _write_gallery(gallery, range(3))
    out = tmp_path / "index"
    args = ["--model", export[0], "--images", gallery, "--out", out]
    assert _run(capsys, *args)[0] == 0
    folder = out / "embeddings"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)  # a process that has ended
    killed = folder / P._staging_name(dead_pid)
    killed.mkdir()
    mark_owned(killed, P.STAGING_KIND)
    (killed / "shard-00000.npz").write_bytes(b"half written")
    live = folder / P._staging_name(os.getppid())  # a run still in progress (a live process)
    live.mkdir()
    mark_owned(live, P.STAGING_KIND)
    unmarked = folder / P._staging_name(dead_pid + 1)  # not proven ours: a user's folder
    unmarked.mkdir()
    other_host = folder / f".staging-elsewhere-{dead_pid}"  # another machine's run
    other_host.mkdir()
    mark_owned(other_host, P.STAGING_KIND)
    _write_gallery(gallery, range(3, 5))
    code, text, err = _run(capsys, *args)
    assert code == 0, err
    assert _counts(text) == (2, 3, 0)
    assert not killed.exists()
    assert live.is_dir() and unmarked.is_dir() and other_host.is_dir()
    assert not list(folder.glob(P._staging_name(os.getpid())))  # this run's own staging: cleaned up
