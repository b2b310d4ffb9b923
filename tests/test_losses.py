"""The retrieval losses and L_S against NumPy computations written from their definitions."""

import numpy as np
import pytest
import tensorflow as tf

from keras_irtf import losses as L


def _np_softmax_ce(q, t):
    logits = q @ t.T
    m = logits.max(1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(1)) + m[:, 0]
    return lse - np.diag(logits)


def test_batch_classification_matches_numpy(rng):
    q, t = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    np.testing.assert_allclose(L.batch_classification_per_example(tf.constant(q), tf.constant(t)).numpy(),
                               _np_softmax_ce(q, t), rtol=1e-10)
    np.testing.assert_allclose(float(L.batch_classification_loss(tf.constant(q), tf.constant(t))),
                               _np_softmax_ce(q, t).mean(), rtol=1e-10)


def test_soft_triplet_matches_brute_force(rng):
    q, t = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    pool = np.concatenate([q, t])
    labels = np.concatenate([np.arange(4), np.arange(4)])
    per_anchor = []
    for a in range(8):
        pos = (a + 4) % 8
        d_pos = ((pool[a] - pool[pos]) ** 2).sum()
        negs = [j for j in range(8) if labels[j] != labels[a]]
        per_anchor.append(np.mean([np.log1p(np.exp(d_pos - ((pool[a] - pool[j]) ** 2).sum())) for j in negs]))
    np.testing.assert_allclose(float(L.soft_triplet_loss(tf.constant(q), tf.constant(t))), np.mean(per_anchor),
                               rtol=1e-9)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_similarity_matching_loss(reduction, rng):
    q, t = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    sq = (q - t) ** 2
    want = (sq.sum(1) if reduction == "sum" else sq.mean(1)).mean()
    got = L.similarity_matching_loss(tf.constant(q), tf.constant(t), reduction)
    np.testing.assert_allclose(float(got), want, rtol=1e-12)


def test_losses_keep_float64():
    """float64 in, float64 out: the finite-difference tests of GA rely on it."""
    q = tf.constant(np.eye(3))
    for value in (L.batch_classification_loss(q, q), L.soft_triplet_loss(q, q), L.similarity_matching_loss(q, q)):
        assert value.dtype == tf.float64


def test_global_batch_average_outside_replicas():
    assert L.replica_info() == (1, 0)
    np.testing.assert_allclose(float(L.average_over_global_batch(tf.constant([1.0, 2.0, 6.0]))), 3.0)
    assert L.average_over_global_batch(tf.constant([1, 3])).dtype == tf.float32  # ints become floats
