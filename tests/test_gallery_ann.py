"""keras_irtf.index.ann: exact search, recall with ties, the three index kinds, and the index
folder's refusals (another export, damaged files, a folder keras_irtf did not write, a link out
of the images' folder)."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("faiss")

from keras_irtf.index import ann  # noqa: E402
from keras_irtf.safety import NotOwnedError  # noqa: E402

FP = {"saved_model_checksum": "111", "export": "/exports/a/1"}
OTHER = {"saved_model_checksum": "222", "export": "/exports/b/1"}


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n=3000, d=32, clusters=30, seed=0):
    """A Gaussian mixture on the sphere: `clusters` centres, rows spread around them."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(clusters, d)))
    return _unit(centres[rng.integers(clusters, size=n)] + 0.3 / np.sqrt(d) * rng.normal(size=(n, d)))


def _ids(n):
    return [f"shop/item{i:05d}.png" for i in range(n)]


def test_exact_topk_scans_in_chunks_and_matches_a_full_sort():
    rng = np.random.default_rng(1)
    g, q = _unit(rng.normal(size=(1000, 16))), _unit(rng.normal(size=(7, 16)))
    scores, rows = ann.exact_topk(g, q, k=12, chunk=97)  # chunks smaller than the gallery, k > a chunk's tail
    full = q @ g.T
    np.testing.assert_array_equal(rows, np.argsort(-full, axis=1)[:, :12])
    np.testing.assert_allclose(scores, np.sort(full, axis=1)[:, ::-1][:, :12], rtol=1e-6)


def test_recall_counts_a_row_tied_with_the_kth_as_a_hit_and_recomputes_true_scores():
    g = _unit(np.eye(4, 8, dtype=np.float32) + 0.01)
    g = np.concatenate([g, g[3:4]])  # row 4 duplicates row 3: tied scores
    q = g[3:4] + 0.001
    exact_scores, exact_rows = ann.exact_topk(g, q, k=1)
    other_of_tie = 4 if exact_rows[0, 0] == 3 else 3
    assert ann.recall_at_k(g, q, np.array([[other_of_tie]]), exact_scores, k=1) == 1.0
    assert ann.recall_at_k(g, q, np.array([[0]]), exact_scores, k=1) == 0.0
    assert ann.recall_at_k(g, q, np.array([[-1]]), exact_scores, k=1) == 0.0  # a missing result is a miss


@pytest.mark.parametrize("kind,params,least", [
    ("flat", {}, 1.0),
    ("hnsw", {"M": 16, "ef_construction": 100, "ef_search": 200}, 0.99),
    ("ivfpq", {"nlist": 16, "m": 8, "nprobe": 16, "refine": 50}, 0.99),  # every list, re-ranked: ~exact
])
def test_each_kind_finds_what_exact_search_finds_and_its_manifest_says_so(tmp_path, kind, params, least):
    g = _clustered()
    index = ann.build_index(g, _ids(len(g)), tmp_path / "idx", fingerprint=FP, kind=kind, params=params,
                            images_root=tmp_path, holdout=100)
    manifest = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert manifest["kind"] == kind and manifest["size"] == len(g) and manifest["dim"] == 32
    assert manifest["fingerprint"] == FP and manifest["images_root"] == str(tmp_path.resolve())
    assert manifest["holdout"]["recall_at_10"] >= least
    # measured again from the loaded index on other queries
    loaded = ann.GalleryIndex.load(tmp_path / "idx", fingerprint=FP)
    q = ann.holdout_queries(g, 50, seed=7)
    exact_scores, exact_rows = ann.exact_topk(g, q, 10)
    scores, rows = loaded.search(q, 10)
    assert rows.shape == (50, 10) and scores.dtype == np.float32
    assert ann.recall_at_k(g, q, rows, exact_scores, 10) >= least
    if kind == "flat":
        np.testing.assert_array_equal(rows[:, 0], exact_rows[:, 0])


def test_auto_chooses_by_size_and_unknown_parameters_are_refused():
    assert [ann.choose_kind(n) for n in (10, ann.FLAT_BELOW, ann.HNSW_BELOW)] == ["flat", "hnsw", "ivfpq"]
    with pytest.raises(ann.GalleryIndexError, match=r"hnsw: unknown parameter\(s\) \['ef'\]"):
        ann.resolve_params("hnsw", 100, 32, {"ef": 10})
    with pytest.raises(ann.GalleryIndexError, match="m=5 must divide the dimension 32"):
        ann.resolve_params("ivfpq", 100, 32, {"m": 5})
    with pytest.raises(ann.GalleryIndexError, match="unknown index kind 'annoy'"):
        ann.resolve_params("annoy", 100, 32)


def test_an_index_of_another_export_is_refused_naming_both(tmp_path):
    g = _clustered(200)
    ann.build_index(g, _ids(200), tmp_path / "idx", fingerprint=FP, holdout=0)
    with pytest.raises(ann.GalleryIndexError, match=r"another export \(/exports/a/1, checksum 111\).*/exports/b/1"):
        ann.GalleryIndex.load(tmp_path / "idx", fingerprint=OTHER)
    moved = dict(FP, export="/elsewhere/a/1")  # the same SavedModel copied elsewhere is the same export
    assert ann.GalleryIndex.load(tmp_path / "idx", fingerprint=moved).size == 200


def test_damaged_files_are_named(tmp_path):
    g = _clustered(200)
    folder = tmp_path / "idx"
    ann.build_index(g, _ids(200), folder, fingerprint=FP, holdout=0)
    ids = (folder / "ids.txt").read_text()
    (folder / "ids.txt").write_text(ids.replace("item00007", "item99999"))
    with pytest.raises(ann.GalleryIndexError, match=r"damaged index: .*ids.txt differs"):
        ann.GalleryIndex.load(folder)
    (folder / "ids.txt").write_text(ids)
    data = (folder / "index.faiss").read_bytes()
    (folder / "index.faiss").write_bytes(data[:len(data) // 2])
    with pytest.raises(ann.GalleryIndexError, match=r"damaged index: .*index.faiss differs in size"):
        ann.GalleryIndex.load(folder)
    with pytest.raises(ann.GalleryIndexError, match="holds no index.json"):
        ann.GalleryIndex.load(tmp_path)


def test_a_folder_keras_irtf_did_not_write_is_left_alone_and_its_own_is_rebuilt(tmp_path):
    g = _clustered(200)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(NotOwnedError, match="did not write"):
        ann.build_index(g, _ids(200), theirs, fingerprint=FP, holdout=0)
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]
    ours = tmp_path / "ours"
    ann.build_index(g, _ids(200), ours, fingerprint=FP, holdout=0)
    ann.build_index(g[:150], _ids(150), ours, fingerprint=OTHER, kind="hnsw", holdout=0)
    rebuilt = ann.GalleryIndex.load(ours, fingerprint=OTHER)
    assert (rebuilt.kind, rebuilt.size) == ("hnsw", 150)
    assert not [p.name for p in ours.iterdir() if ".tmp-" in p.name]  # no temporary file left


def test_bad_embeddings_and_ids_are_refused_before_anything_is_written(tmp_path):
    g = _clustered(20)
    for emb, ids, message in [(g, _ids(19), "19 ids for 20 embeddings"),
                              (g, ["same"] * 20, "not unique"),
                              (np.where(np.arange(20)[:, None] == 3, np.nan, g), _ids(20), "non-finite"),
                              (g, _ids(19) + ["two\nlines"], "one-line")]:
        with pytest.raises(ann.GalleryIndexError, match=message):
            ann.build_index(emb, ids, tmp_path / "idx", fingerprint=FP, holdout=0)
    assert not (tmp_path / "idx").exists()


def test_image_path_stays_under_the_images_folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"s")
    os.symlink(tmp_path / "secret.png", images / "b.png")
    g = _clustered(2)
    index = ann.build_index(g, ["a.png", "b.png"], tmp_path / "idx", fingerprint=FP, images_root=images, holdout=0)
    assert index.image_path(0) == (images / "a.png").resolve()
    with pytest.raises(ann.GalleryIndexError, match="outside"):
        index.image_path(1)
    no_root = ann.build_index(g, ["a", "b"], tmp_path / "idx2", fingerprint=FP, holdout=0)
    with pytest.raises(ann.GalleryIndexError, match="no images folder"):
        no_root.image_path(0)


def test_ids_holding_other_line_breaking_characters_load_back(tmp_path):
    """str.splitlines also breaks on a form feed or U+2028: ids holding them (a TFRecord id may)
    build and load back as the same rows; a carriage return is refused at build."""
    g = _clustered(3)
    ids = ["a\x0cb.png", "c\u2028d.png", "plain.png"]
    ann.build_index(g, ids, tmp_path / "idx", fingerprint=FP, holdout=0)
    assert ann.GalleryIndex.load(tmp_path / "idx").ids == ids
    with pytest.raises(ann.GalleryIndexError, match="one-line"):
        ann.build_index(g, ["x\ry", "b", "c"], tmp_path / "idx2", fingerprint=FP, holdout=0)


def test_ivfpq_on_a_gallery_too_small_to_train_is_one_clear_error(tmp_path):
    g = _clustered(100)
    with pytest.raises(ann.GalleryIndexError, match=r"needs at least 256 embeddings .* has 100: use --kind flat"):
        ann.build_index(g, _ids(100), tmp_path / "idx", fingerprint=FP, kind="ivfpq", holdout=0)
    assert not (tmp_path / "idx").exists()  # refused before the folder is made
