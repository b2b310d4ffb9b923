"""Dropout whose masks under tf.distribute are those of the global batch on one device.

`keras.layers.Dropout` draws its mask from a SeedGenerator whose state every replica holds a copy
of: under MirroredStrategy each replica draws the same mask for its share of the batch, so with 2
replicas rows i and i + B/2 of the global batch are dropped together, a correlation one device
never has. `Dropout` here draws the mask of the whole global batch from that same seed on every
replica and keeps this replica's rows (replica r holds rows r * b .. (r + 1) * b - 1 of the global
batch, b the local batch, as tf.distribute splits it and as keras_irtf's losses assume): the masks
of the global batch are independent across rows and equal to the masks one device draws for the
same global batch with the same generator state. On one device it is keras.layers.Dropout,
bit for bit (same seed stream, same mask, same scaling).

Every dropout of keras_irtf's encoders and composers is this layer. A plug-in that uses
keras.layers.Dropout directly keeps Keras' per-replica repetition under a multi-replica strategy.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def _stateless_seed(seed_generator):
    """The generator's next seed as the int32 pair tf.random.stateless_* takes, exactly as Keras'
    TensorFlow backend derives it for keras.random.dropout (the generator moves on)."""
    seed = seed_generator.next()
    if seed.dtype == tf.int32:
        return seed
    return tf.cast(tf.math.floormod(seed, tf.int32.max - 1), tf.int32)


@keras.saving.register_keras_serializable(package="keras_irtf")
class Dropout(keras.layers.Dropout):
    """keras.layers.Dropout with the global batch's masks under a multi-replica strategy (see the
    module docstring). Same arguments and configuration as keras.layers.Dropout."""

    def call(self, inputs, training=False):
        if not (training and self.rate > 0):
            return inputs
        ctx = tf.distribute.get_replica_context()
        if ctx is None or ctx.num_replicas_in_sync == 1:
            return super().call(inputs, training=training)
        return self._global_batch_dropout(inputs, ctx.num_replicas_in_sync, ctx.replica_id_in_sync_group)

    def _global_batch_dropout(self, inputs, replicas, replica_id):
        x = tf.convert_to_tensor(inputs)
        if self.rate >= 1.0:
            return tf.zeros_like(x)
        shape = tf.shape(x)
        noise_shape = [shape[i] if d is None else d for i, d in enumerate(self.noise_shape)] \
            if self.noise_shape is not None else tf.unstack(shape)
        local = shape[0]
        # a noise shape of 1 along the batch shares one mask between all rows on one device: the
        # same single row on every replica; otherwise the global batch's rows, this replica's slice
        per_row = not (self.noise_shape is not None and self.noise_shape[0] == 1)
        if per_row:
            noise_shape = [local * replicas, *noise_shape[1:]]
        # tf.nn.experimental.stateless_dropout's arithmetic (what keras.random.dropout calls):
        # x * (1 / (1 - rate)) where a uniform draw in x's dtype is >= rate, else 0
        u = tf.random.stateless_uniform(tf.stack(noise_shape), seed=_stateless_seed(self.seed_generator),
                                        dtype=x.dtype)
        if per_row:
            start = tf.cast(replica_id, tf.int32) * local
            u = u[start:start + local]
        scale = tf.constant(1.0 / (1.0 - self.rate), dtype=x.dtype)
        return tf.where(u >= self.rate, x * scale, tf.zeros([], x.dtype))
