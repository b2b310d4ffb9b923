"""Chunked top-k retrieval with bounded memory.

Scores are computed a block at a time (`queries_chunk @ gallery_chunk^T`) and merged into a
running top-k, so memory is O(query_chunk x (gallery_chunk + k)) whatever the gallery size,
never the full query x gallery matrix. A query's own image (its source) can be excluded.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


@tf.function(reduce_retracing=True)
def _block_top_k(q, g, g_offset, exclude, best_scores, best_ids, k):
    scores = tf.matmul(q, g, transpose_b=True)
    ids = g_offset + tf.range(tf.shape(g)[0], dtype=tf.int64)
    scores = tf.where(tf.equal(exclude[:, None], ids[None, :]), tf.constant(-np.inf, scores.dtype), scores)
    kk = tf.minimum(k, tf.shape(g)[0])
    s, i = tf.math.top_k(scores, k=kk, sorted=True)
    cand_scores = tf.concat([best_scores, s], axis=1)
    cand_ids = tf.concat([best_ids, tf.gather(ids, i)], axis=1)
    s, i = tf.math.top_k(cand_scores, k=k, sorted=True)
    return s, tf.gather(cand_ids, i, batch_dims=1)


def chunked_top_k(queries, gallery, k, exclude=None, query_chunk=1024, gallery_chunk=8192, progress=None):
    """Top-k gallery indices and scores by inner product.

    queries [Q, D], gallery [G, D] (float arrays), exclude [Q] gallery index to skip per query
    (-1 for none). Returns (scores [Q, k] float32, ids [Q, k] int64), best first; where fewer
    than k gallery items are eligible the tail has score -inf.
    """
    queries = np.asarray(queries, dtype=np.float32)
    gallery = np.asarray(gallery, dtype=np.float32)
    nq, ng = len(queries), len(gallery)
    k = int(k)
    exclude = np.full(nq, -1, np.int64) if exclude is None else np.asarray(exclude, dtype=np.int64)
    out_scores = np.empty((nq, k), np.float32)
    out_ids = np.empty((nq, k), np.int64)
    for qs in range(0, nq, query_chunk):
        q = tf.constant(queries[qs : qs + query_chunk])
        ex = tf.constant(exclude[qs : qs + query_chunk])
        best_s = tf.fill([q.shape[0], k], tf.constant(-np.inf, tf.float32))
        best_i = tf.fill([q.shape[0], k], tf.constant(-1, tf.int64))
        for gs in range(0, ng, gallery_chunk):
            g = tf.constant(gallery[gs : gs + gallery_chunk])
            best_s, best_i = _block_top_k(q, g, tf.constant(gs, tf.int64), ex, best_s, best_i, tf.constant(k))
        out_scores[qs : qs + len(q)] = best_s.numpy()
        out_ids[qs : qs + len(q)] = best_i.numpy()
        if progress is not None:
            progress.update(len(q))
    return out_scores, out_ids


def brute_force_top_k(queries, gallery, k, exclude=None):
    """Reference implementation (full score matrix, full argsort): for tests and benchmarks."""
    scores = np.asarray(queries, np.float64) @ np.asarray(gallery, np.float64).T
    if exclude is not None:
        for i, e in enumerate(exclude):
            if e >= 0:
                scores[i, e] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order
