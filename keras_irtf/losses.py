"""Retrieval losses, written for the GLOBAL batch so that they are right under tf.distribute.

Each function returns the loss of the local (per-replica) batch already divided by the global
batch size: summed over replicas (what the optimizer does with gradients) it is the mean over
the global batch. Batch-based losses gather the other replicas' targets as negatives, so a
2-replica run computes the same loss as one device on the same global batch.

- batch_classification_loss: TIRG's "batch based classification" (the GA paper's L_CE): softmax
  cross-entropy of each query against every target of the batch, the true target as the class.
- soft_triplet_loss: TIRG's soft triplet, log(1 + exp(d(a, p) - d(a, n))) on squared Euclidean
  distances over the stacked query and target features; here averaged over ALL in-batch
  negatives of each anchor (the reference samples three of them at random).
- similarity_matching_loss: the GA paper's L_S = mean_i ||f_comp_i - f_target_i||^2.
"""

from __future__ import annotations

import tensorflow as tf

from keras_irtf.registry import RETRIEVAL_LOSSES, register_retrieval_loss


def replica_info():
    """(number of replicas in sync, this replica's id) in the current context (1, 0 if none)."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None:  # cross-replica context
        return 1, 0
    return ctx.num_replicas_in_sync, ctx.replica_id_in_sync_group


def global_batch_size(local_batch, dtype=tf.float32):
    n, _ = replica_info()
    return tf.cast(local_batch, dtype) * n


def gather_across_replicas(x):
    """Concatenate `x` of every replica along axis 0; returns (gathered, offset of this replica)."""
    n, rid = replica_info()
    local = tf.shape(x)[0]
    if n == 1:
        return x, tf.constant(0, tf.int32)
    ctx = tf.distribute.get_replica_context()
    return ctx.all_gather(x, axis=0), tf.cast(rid, tf.int32) * local


def average_over_global_batch(per_example):
    """sum(per_example) / global batch size (tf.nn.compute_average_loss, kept explicit), in the
    per-example values' float dtype (float64 stays float64: the finite-difference tests need it)."""
    per_example = tf.convert_to_tensor(per_example)
    if not per_example.dtype.is_floating:
        per_example = tf.cast(per_example, tf.float32)
    return tf.reduce_sum(per_example) / global_batch_size(tf.shape(per_example)[0], per_example.dtype)


def batch_classification_per_example(query, target):
    all_targets, offset = gather_across_replicas(target)
    logits = tf.matmul(query, all_targets, transpose_b=True)
    labels = tf.range(tf.shape(query)[0]) + offset
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)


@register_retrieval_loss("batch_classification")
def batch_classification_loss(query, target):
    return average_over_global_batch(batch_classification_per_example(query, target))


def soft_triplet_per_example(query, target):
    """Per-anchor soft triplet over the stacked [queries; targets] (2B anchors)."""
    b = tf.shape(query)[0]
    all_q, offset = gather_across_replicas(query)
    all_t, _ = gather_across_replicas(target)
    n_all = tf.shape(all_q)[0]
    pool = tf.concat([all_q, all_t], axis=0)  # 2N items; item i and i + N share label i
    pool_labels = tf.concat([tf.range(n_all), tf.range(n_all)], axis=0)
    anchors = tf.concat([query, target], axis=0)
    own = tf.range(b) + offset
    anchor_labels = tf.concat([own, own], axis=0)
    positive_index = tf.concat([own + n_all, own], axis=0)
    sq = tf.reduce_sum(tf.square(anchors), 1, keepdims=True)
    d = sq + tf.reduce_sum(tf.square(pool), 1)[None, :] - 2.0 * tf.matmul(anchors, pool, transpose_b=True)
    d_pos = tf.gather(d, positive_index, batch_dims=1)
    negative = tf.cast(tf.not_equal(anchor_labels[:, None], pool_labels[None, :]), d.dtype)
    losses = tf.nn.softplus(d_pos[:, None] - d) * negative
    return tf.reduce_sum(losses, 1) / tf.reduce_sum(negative, 1)


@register_retrieval_loss("soft_triplet")
def soft_triplet_loss(query, target):
    per_anchor = soft_triplet_per_example(query, target)  # 2B anchors per replica
    return tf.reduce_sum(per_anchor) / (2.0 * global_batch_size(tf.shape(query)[0], per_anchor.dtype))


def similarity_matching_per_example(query, target, reduction: str = "sum"):
    sq = tf.square(query - target)
    return tf.reduce_sum(sq, -1) if reduction == "sum" else tf.reduce_mean(sq, -1)


def similarity_matching_loss(query, target, reduction: str = "sum"):
    """L_S = mean_i ||q_i - t_i||^2 ("sum", the paper) or mean_i mean_d (q - t)^2 ("mean", the
    authors' code, where eta = 1e-3 was tuned)."""
    return average_over_global_batch(similarity_matching_per_example(query, target, reduction))



def retrieval_loss(name: str):
    """The registered retrieval loss function of that name (loss.kind)."""
    return RETRIEVAL_LOSSES.get(name).obj
