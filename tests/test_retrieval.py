"""Chunked top-k (TensorFlow and faiss backends) against the brute-force reference."""

import numpy as np
import pytest

from keras_irtf.evaluation.retrieval import brute_force_top_k, chunked_top_k, faiss_available, resolve_backend

BACKENDS = ["tf", pytest.param("faiss", marks=pytest.mark.skipif(
    not faiss_available(), reason="faiss-cpu is not installed (optional extra: pip install 'keras_irtf[faiss]')"))]


def integer_embeddings(rng, nq, ng, d=6):
    """Small-integer vectors: every score is exact in float32, so any backend must reproduce the
    float64 reference exactly, and many scores tie (this checks the tie order too)."""
    q = rng.integers(-2, 3, (nq, d)).astype(np.float32)
    g = rng.integers(-2, 3, (ng, d)).astype(np.float32)
    g[50:60] = g[7]  # exact duplicates of one gallery image
    return q, g


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_brute_force_with_ties_and_exclusion(rng, backend):
    q, g = integer_embeddings(rng, 230, 610)
    exclude = rng.integers(-1, 610, 230)
    exclude[:20] = 7  # the source is one of a group of duplicates: only it must go
    ref_s, ref_i = brute_force_top_k(q, g, 37, exclude)
    s, i = chunked_top_k(q, g, 37, exclude, query_chunk=64, gallery_chunk=100, backend=backend)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_array_equal(s, ref_s.astype(np.float32))
    assert not np.any(i == exclude[:, None])
    # ties are ordered by gallery index
    same = s[:, 1:] == s[:, :-1]
    assert np.all(i[:, 1:][same] > i[:, :-1][same])


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_brute_force_on_a_subsample_of_a_large_gallery(rng, backend):
    """Unit-norm 512-d embeddings, a gallery of 12,000 in chunks of 8,192: the evaluator's regime."""
    g = rng.standard_normal((12000, 512), dtype=np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = 0.5 * rng.standard_normal((2000, 512), dtype=np.float32) + g[rng.integers(0, 12000, 2000)]
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exclude = rng.integers(0, 12000, 2000)
    s, i = chunked_top_k(q, g, 50, exclude, query_chunk=1024, gallery_chunk=8192, backend=backend)
    sub = rng.choice(2000, 300, replace=False)
    ref_s, ref_i = brute_force_top_k(q[sub], g, 50, exclude[sub])
    np.testing.assert_allclose(s[sub], ref_s, atol=1e-5)
    # float32 vs float64 sums may swap two neighbours whose scores differ by < 1e-5, nothing else
    differ = i[sub] != ref_i
    gaps = np.abs(np.diff(ref_s, axis=1))
    assert np.all(np.minimum(np.pad(gaps, ((0, 0), (0, 1)), constant_values=np.inf),
                             np.pad(gaps, ((0, 0), (1, 0)), constant_values=np.inf))[differ] < 1e-5)
    assert differ.any(axis=1).mean() < 0.05
    assert not np.any(i == exclude[:, None])


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_gallery_pads_with_minus_one(backend):
    q = np.eye(3, 4, dtype=np.float32)
    g = np.eye(2, 4, dtype=np.float32)
    s, i = chunked_top_k(q, g, 4, exclude=[0, -1, 1], backend=backend)
    np.testing.assert_array_equal(i, [[1, -1, -1, -1], [1, 0, -1, -1], [0, -1, -1, -1]])
    assert np.all(np.isneginf(s[i < 0]))
    np.testing.assert_array_equal(i, brute_force_top_k(q, g, 4, [0, -1, 1])[1])


@pytest.mark.skipif(not faiss_available(), reason="faiss-cpu is not installed (optional extra: pip install 'keras_irtf[faiss]')")
def test_faiss_equals_tf_on_random_embeddings(rng):
    g = rng.standard_normal((5000, 64), dtype=np.float32)
    q = rng.standard_normal((700, 64), dtype=np.float32)
    exclude = rng.integers(-1, 5000, 700)
    tf_s, tf_i = chunked_top_k(q, g, 20, exclude, query_chunk=256, gallery_chunk=2048, backend="tf")
    fa_s, fa_i = chunked_top_k(q, g, 20, exclude, query_chunk=256, backend="faiss")
    np.testing.assert_allclose(fa_s, tf_s, rtol=1e-5, atol=1e-5)
    assert (fa_i == tf_i).all(axis=1).mean() > 0.99  # only float near-ties may swap
    assert resolve_backend("auto") == "tf" and resolve_backend("faiss") == "faiss"  # auto: the measured faster one


def test_faiss_missing_gives_actionable_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "faiss", None)  # as if faiss-cpu were not installed
    assert not faiss_available() and resolve_backend("auto") == "tf"
    with pytest.raises(ImportError, match=r"backend='faiss' needs the package faiss.*pip install -e '\.\[faiss\]'"):
        chunked_top_k(np.ones((2, 3)), np.ones((4, 3)), 2, backend="faiss")


def test_bad_inputs_are_explained():
    with pytest.raises(ValueError, match="dimension 3 but the gallery has 4"):
        chunked_top_k(np.ones((2, 3)), np.ones((5, 4)), 2)
    with pytest.raises(ValueError, match="exclude has 3 entries for 2 queries"):
        chunked_top_k(np.ones((2, 3)), np.ones((5, 3)), 2, exclude=[0, 1, 2])
    with pytest.raises(ValueError, match="backend='gpu'"):
        chunked_top_k(np.ones((2, 3)), np.ones((5, 3)), 2, backend="gpu")
