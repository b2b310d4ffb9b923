"""Exact top-k retrieval by inner product with bounded memory, on TensorFlow or faiss.

TensorFlow backend ("tf", the default): scores are computed a block at a time
(`queries_chunk @ gallery_chunk^T`) and merged into a running top-k, so memory is
O(query_chunk x (gallery_chunk + k)) whatever the gallery size, never the full query x gallery
matrix.

faiss backend ("faiss", needs the optional extra `pip install keras_irtf[faiss]`): an exact
`IndexFlatIP` searched one query chunk at a time. Results are made identical to the TensorFlow
path: the query's own image is dropped after the search, and equal scores are ordered by gallery
index (faiss does not promise an order among ties, so a tie group cut by the k-th place is
searched again with a larger k).

"auto" is the backend measured faster on this project's machines: TensorFlow (see
`resolve_backend`); faiss is there to choose explicitly.

Both backends return, for every query, the k best gallery indices ordered by score descending
and then by gallery index ascending; a query's `exclude` index is never returned; where fewer
than k gallery items are eligible, the tail holds score -inf and index -1.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_irtf.config import choices
from keras_irtf.utils import optional_import

BACKENDS = choices("eval.backend")


def faiss_available() -> bool:
    try:
        _import_faiss()
    except ImportError:
        return False
    return True


def _import_faiss():
    return optional_import("faiss", "faiss", "backend='faiss'")


def resolve_backend(backend: str) -> str:
    """'tf' or 'faiss' for a requested backend.

    'auto' picks TensorFlow. On a machine running nothing else faiss is the faster exact search
    (benchmarks/retrieval_backends.py, docs/retrieval_backends.md: 1.14x to 1.62x at galleries of
    3K to 30K, 8,000 queries, 512-d, k = 50), but its OpenMP threads wait for busy cores, and on
    the project's 2-core machine shared with other jobs the TF backend was faster at every gallery
    size: 'auto' takes the backend that does not need the cores to itself. Choose
    backend="faiss" explicitly on a dedicated machine."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {list(BACKENDS)}")
    return "tf" if backend == "auto" else backend


def _check_inputs(queries, gallery, k, exclude):
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    if queries.ndim != 2 or gallery.ndim != 2:
        raise ValueError(f"queries and gallery must be 2-D [N, D]; got shapes {queries.shape} and {gallery.shape}")
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"queries have dimension {queries.shape[1]} but the gallery has {gallery.shape[1]}: "
            "they must come from the same embedding space"
        )
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    nq = len(queries)
    if exclude is None:
        exclude = np.full(nq, -1, np.int64)
    else:
        exclude = np.asarray(exclude, dtype=np.int64).reshape(-1)
        if len(exclude) != nq:
            raise ValueError(f"exclude has {len(exclude)} entries for {nq} queries: give one gallery index (or -1) per query")
    return queries, gallery, k, exclude


_block_top_k = None


def _tf_block_top_k():
    """The block step as an XLA-compiled tf.function, built on first use (importing this module
    stays cheap). XLA's fused matmul + top-k took about 60% of the CPU time of the plain graph on
    a 1024 x 8192 x 512 block; it compiles once per block shape (k is a Python int, static)."""
    global _block_top_k
    if _block_top_k is None:
        @tf.function(jit_compile=True)
        def block_top_k(q, g, g_offset, g_size, exclude, best_scores, best_ids, k):
            scores = tf.matmul(q, g, transpose_b=True)
            ids = g_offset + tf.range(g.shape[0], dtype=tf.int64)
            # the source image, and the padding rows of a last, short gallery block, never count
            drop = tf.equal(exclude[:, None], ids[None, :]) | (ids >= g_size)[None, :]
            scores = tf.where(drop, tf.constant(-np.inf, scores.dtype), scores)
            s, i = tf.math.top_k(scores, k=min(k, g.shape[0]), sorted=True)
            # the running best comes first, so on equal scores the lower gallery index wins
            # (top_k keeps the lower position first); the -1 fillers beat excluded -inf items
            cand_scores = tf.concat([best_scores, s], axis=1)
            cand_ids = tf.concat([best_ids, tf.gather(ids, i)], axis=1)
            s, i = tf.math.top_k(cand_scores, k=k, sorted=True)
            return s, tf.gather(cand_ids, i, batch_dims=1)

        _block_top_k = block_top_k
    return _block_top_k


def _tf_top_k(queries, gallery, k, exclude, query_chunk, gallery_chunk, progress):
    step = _tf_block_top_k()
    nq, ng = len(queries), len(gallery)
    out_scores = np.empty((nq, k), np.float32)
    out_ids = np.empty((nq, k), np.int64)
    if ng == 0:
        out_scores.fill(-np.inf)
        out_ids.fill(-1)
        return out_scores, out_ids
    # every block has the same shape (the last ones padded), so XLA compiles the step once
    qc, gc = min(query_chunk, nq), min(gallery_chunk, ng)
    g_size = tf.constant(ng, tf.int64)

    def padded(a, rows, fill=0):
        if len(a) == rows:
            return a
        pad = np.full((rows - len(a),) + a.shape[1:], fill, a.dtype)
        return np.concatenate([a, pad])

    for qs in range(0, nq, qc):
        n = min(qc, nq - qs)
        q = tf.constant(padded(queries[qs : qs + qc], qc))
        ex = tf.constant(padded(exclude[qs : qs + qc], qc, -1))
        best_s = tf.fill([qc, k], tf.constant(-np.inf, tf.float32))
        best_i = tf.fill([qc, k], tf.constant(-1, tf.int64))
        for gs in range(0, ng, gc):
            # converted block by block: holding a second, TensorFlow copy of a large gallery
            # would cost more memory than the copies cost time
            g = tf.constant(padded(gallery[gs : gs + gc], gc))
            best_s, best_i = step(q, g, tf.constant(gs, tf.int64), g_size, ex, best_s, best_i, k)
        out_scores[qs : qs + n] = best_s.numpy()[:n]
        out_ids[qs : qs + n] = best_i.numpy()[:n]
        if progress is not None:
            progress.update(n)
    return out_scores, out_ids


def _canonical_top_k(scores, ids, exclude, k):
    """Drop excluded / missing items, order by (score desc, index asc), keep k (pad -inf, -1)."""
    scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
    drop = (ids < 0) | (ids == exclude[:, None])
    # lexsort: last key is primary -> dropped last, then score descending, then index ascending
    order = np.lexsort((ids, -scores, drop), axis=1)[:, :k]
    s = np.take_along_axis(scores, order, 1)
    i = np.take_along_axis(ids, order, 1)
    keep = np.take_along_axis(~drop, order, 1)
    s = np.where(keep, s, -np.inf).astype(np.float32)
    i = np.where(keep, i, -1)
    if s.shape[1] < k:
        pad = k - s.shape[1]
        s = np.pad(s, ((0, 0), (0, pad)), constant_values=-np.inf)
        i = np.pad(i, ((0, 0), (0, pad)), constant_values=-1)
    return s, i


def _faiss_top_k(queries, gallery, k, exclude, query_chunk, progress):
    faiss = _import_faiss()
    nq, ng = len(queries), len(gallery)
    out_scores = np.full((nq, k), -np.inf, np.float32)
    out_ids = np.full((nq, k), -1, np.int64)
    if ng == 0:
        return out_scores, out_ids
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    for qs in range(0, nq, query_chunk):
        q = queries[qs : qs + query_chunk]
        ex = exclude[qs : qs + query_chunk]
        rows = np.arange(len(q))
        # one extra place for the excluded image, a few more so that most tie groups fit
        kk = min(ng, k + 1 + 8)
        while len(rows):
            s, i = index.search(q[rows], kk)
            i = i.astype(np.int64)
            cs, ci = _canonical_top_k(s, i, ex[rows], k)
            out_scores[qs + rows], out_ids[qs + rows] = cs, ci
            if kk >= ng:
                break
            # a row is final unless its k-th kept score equals the last score faiss returned:
            # then items of that score may lie beyond place kk, and faiss chose among them freely
            boundary = np.where(i[:, -1] < 0, -np.inf, s[:, -1])
            unsure = (cs[:, -1] == boundary) & np.isfinite(boundary)
            rows = rows[unsure]
            kk = min(ng, kk * 2)
        if progress is not None:
            progress.update(len(q))
    return out_scores, out_ids


def chunked_top_k(queries, gallery, k, exclude=None, query_chunk=1024, gallery_chunk=8192, progress=None,
                  backend="tf"):
    """Top-k gallery indices and scores by inner product.

    queries [Q, D], gallery [G, D] (float arrays); exclude [Q]: the gallery index to skip for
    each query (-1 for none), e.g. the query's own source image. backend: "tf" (default),
    "faiss" (exact IndexFlatIP; needs faiss-cpu) or "auto". `progress` (optional) receives
    `update(n)` after every n queries.

    Returns (scores [Q, k] float32, ids [Q, k] int64), best first, ties by lower gallery index;
    where fewer than k gallery items are eligible the tail has score -inf and index -1.
    """
    queries, gallery, k, exclude = _check_inputs(queries, gallery, k, exclude)
    query_chunk, gallery_chunk = int(query_chunk), int(gallery_chunk)
    if query_chunk < 1 or gallery_chunk < 1:
        raise ValueError(f"query_chunk and gallery_chunk must be >= 1, got {query_chunk} and {gallery_chunk}")
    if resolve_backend(backend) == "faiss":
        return _faiss_top_k(queries, gallery, k, exclude, query_chunk, progress)
    return _tf_top_k(queries, gallery, k, exclude, query_chunk, gallery_chunk, progress)


def brute_force_top_k(queries, gallery, k, exclude=None):
    """Reference implementation (full float64 score matrix, full stable argsort): for tests.

    Same conventions as `chunked_top_k` (ties by lower index, -inf / -1 tail)."""
    queries, gallery, k, exclude = _check_inputs(queries, gallery, k, exclude)
    scores = queries.astype(np.float64) @ gallery.astype(np.float64).T
    rows = np.nonzero(exclude >= 0)[0]
    scores[rows, exclude[rows]] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    s = np.take_along_axis(scores, order, 1)
    ids = np.where(np.isfinite(s), order, -1)
    if ids.shape[1] < k:
        pad = k - ids.shape[1]
        s = np.pad(s, ((0, 0), (0, pad)), constant_values=-np.inf)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    return s, ids
