"""Serving hardening (issue #15): pixel limits read from image headers before decoding, empty
batches (item 3); stored gallery embeddings used only for the exported files (item 9)."""

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import export_untrained_smoke


def _encode(array, fmt, **kw):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def bomb_png(width=20000, height=20000) -> bytes:
    """A valid 1-bit grayscale PNG of width x height zeros: tens of KB on disk, width * height * 3
    bytes once decoded to RGB (1.2 GB for the default 20000 x 20000)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _samples():
    arr = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x010E] = "x" * 5000  # a long ImageDescription: the frame header comes after 5 KB
    return {
        "png": _encode(arr, "PNG"), "gif": _encode(arr, "GIF"), "bmp": _encode(arr, "BMP"),
        "jpeg": _encode(arr, "JPEG", quality=90), "progressive": _encode(arr, "JPEG", progressive=True),
        "exif_jpeg": _encode(arr, "JPEG", exif=exif.tobytes()),
    }


def test_dimensions_from_headers_python_and_graph():
    import tensorflow as tf

    from keras_irtf.image_limits import image_dimensions, image_dimensions_graph

    for name, data in _samples().items():
        assert image_dimensions(data) == (53, 37), name
        assert tuple(int(v) for v in image_dimensions_graph(tf.constant(data))) == (53, 37), name
    bomb = bomb_png()
    assert len(bomb) < 500_000
    assert image_dimensions(bomb) == (20000, 20000)
    assert tuple(int(v) for v in image_dimensions_graph(tf.constant(bomb))) == (20000, 20000)
    for junk in (b"", b"garbage", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0"):
        assert image_dimensions(junk) is None
        assert tuple(int(v) for v in image_dimensions_graph(tf.constant(junk))) == (-1, -1)


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    """An untrained smoke model exported with a 1000-pixel limit and a 3-image gallery."""
    rng = np.random.default_rng(1)
    images = [_encode(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8), "PNG") for _ in range(3)]
    path, gallery, _, _ = export_untrained_smoke(tmp_path_factory.mktemp("limits"), images, "out", max_pixels=1000)
    return path, gallery


def test_export_refuses_images_over_the_limit_before_decoding(small_export):
    import tensorflow as tf

    from keras_irtf.serving.export import read_export_info

    path, _ = small_export
    assert read_export_info(path)["max_pixels"] == 1000
    served = tf.saved_model.load(str(path)).signatures
    rng = np.random.default_rng(2)
    ok = _encode(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8), "PNG")  # 900 pixels
    assert served["embed_image"](image_bytes=tf.constant([ok]))["embedding"].shape[0] == 1
    for big in (_encode(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8), "JPEG"), bomb_png()):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"more than 1000 pixels.*max_pixels"):
            served["serving_default"](image_bytes=tf.constant([ok, big]), text=tf.constant(["a", "b"]))
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"more than 1000 pixels"):
            served["embed_image"](image_bytes=tf.constant([big]))


def test_empty_batch_gives_empty_results(small_export):
    import tensorflow as tf

    path, _ = small_export
    served = tf.saved_model.load(str(path)).signatures
    none = tf.constant([], tf.string)
    assert served["serving_default"](image_bytes=none, text=none)["embedding"].shape == (0, 64)
    assert served["embed_image"](image_bytes=none)["embedding"].shape == (0, 64)
    out = served["retrieve"](image_bytes=none, text=none, k=tf.constant([], tf.int32))
    assert out["ids"].shape[0] == 0 and out["scores"].shape[0] == 0


def test_query_tool_and_loaders_refuse_a_pixel_bomb(small_export, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    from keras_irtf.data.base import DatasetError
    from keras_irtf.data.image_files import check_image_files
    from keras_irtf.data.images import decode_files

    path, gallery = small_export
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png())
    spec = importlib.util.spec_from_file_location("query_tool", Path(__file__).parent.parent / "tools" / "query.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    code = tool.main(["--model", str(path), "--image", str(bomb), "--text", "x", "--gallery", str(gallery),
                      "--out", str(tmp_path / "grid.png")])
    assert code == 2
    assert "20000 x 20000 = 400000000 pixels is over the limit of 1000" in capsys.readouterr().err

    keep, bad = check_image_files([bomb, gallery / "g0.png"], on_bad_image="skip", verbose=False)
    assert keep.tolist() == [False, True] and "20000 x 20000 pixels, over the limit" in bad[0][1]
    with pytest.raises(DatasetError, match=r"bomb\.png: 20000 x 20000"):
        check_image_files([bomb], on_bad_image="error", verbose=False)
    with pytest.raises(DatasetError, match=r"bomb\.png: 20000 x 20000 = 400000000 pixels is over the limit"):
        decode_files([bomb], 32, verbose=False)


def test_gallery_with_the_exported_names_but_other_images_is_embedded_again(small_export, tmp_path):
    """Issue #15 item 9: same file names, different images -> the stored embeddings are stale."""
    import shutil

    from keras_irtf.serving.query import ExportedModel, search

    path, exported_gallery = small_export
    model = ExportedModel(path)
    gallery = tmp_path / "gallery"
    shutil.copytree(exported_gallery, gallery)
    query = gallery / "g2.png"

    def expected(folder):
        files = sorted(p.name for p in folder.iterdir())
        emb = model.embed_images([(folder / f).read_bytes() for f in files])
        q = model.embed_queries([query.read_bytes()], ["add a red cube"])[0]
        return {f: float(s) for f, s in zip(files, emb @ q)}

    same = search(model, query, "add a red cube", gallery, top=5)
    want = expected(gallery)
    assert [r.path.name for r in same] and "g2.png" not in [r.path.name for r in same]
    for r in same:
        assert abs(r.score - want[r.path.name]) < 1e-4
    # swap the contents of g0 and g1 (names unchanged): scores must follow the new contents
    a, b = (gallery / "g0.png").read_bytes(), (gallery / "g1.png").read_bytes()
    (gallery / "g0.png").write_bytes(b)
    (gallery / "g1.png").write_bytes(a)
    swapped = search(model, query, "add a red cube", gallery, top=5)
    want = expected(gallery)
    assert abs(want["g0.png"] - want["g1.png"]) > 1e-6  # the swap is visible in the scores
    for r in swapped:
        assert abs(r.score - want[r.path.name]) < 1e-4, (r.path.name, r.score, want)
    # the query is recognised by content: a copy outside the gallery is still left out
    copy = tmp_path / "elsewhere.png"
    copy.write_bytes(query.read_bytes())
    assert "g2.png" not in [r.path.name for r in search(model, copy, "add a red cube", gallery, top=5)]


def test_targets_are_recognised_by_content(small_export, tmp_path):
    from keras_irtf.serving.query import ExportedModel, draw_results, search

    path, gallery = small_export
    model = ExportedModel(path)
    results = search(model, gallery / "g2.png", "x", gallery, top=2)
    target_copy = tmp_path / "target.png"  # the same bytes as the top result, under another name
    target_copy.write_bytes(results[0].path.read_bytes())
    fig = draw_results(gallery / "g2.png", "x", results, targets=[target_copy], thumb=32)
    pixels = np.asarray(fig)
    green = np.all(pixels == (20, 170, 40), axis=-1)
    first_cell = green[:, 10 + 40 + 40: 10 + 40 + 40 + 40]  # query cell + arrow, then result 1
    assert first_cell.any()


def test_query_image_that_is_not_an_image_is_a_clear_error(small_export, tmp_path, capsys):
    """Issue #15 item 11: a non-image --image gives one error line and exit 2, no traceback."""
    import importlib.util
    from pathlib import Path

    path, gallery = small_export
    spec = importlib.util.spec_from_file_location("query_tool2", Path(__file__).parent.parent / "tools" / "query.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    text_file = tmp_path / "notes.png"
    text_file.write_text("this is not an image")
    code = tool.main(["--model", str(path), "--image", str(text_file), "--text", "x", "--gallery", str(gallery),
                      "--out", str(tmp_path / "grid.png")])
    assert code == 2
    assert f"error: query image {text_file} is not a JPEG, PNG, GIF or BMP image" in capsys.readouterr().err
