"""tf.data pipelines of dict batches for training and evaluation.

Training batches are dicts
    {"source_image": float32 [B, H, W, 3] (ImageNet-normalised), "text": int32 [B, L],
     "target_image": float32 [B, H, W, 3], "source_id", "target_id", "target_caption": int64 [B]}
built from a query list that is fixed by the seed before training starts: the same seed gives the
same batches, and a resumed run can skip to its step.
"""

from __future__ import annotations

import numpy as np

from keras_irtf.data.base import Queries, Split
from keras_irtf.data.images import normalize_images


def _image_table(split: Split):
    import tensorflow as tf

    if split.images is None:
        return None
    return tf.constant(split.images)


def image_loader(split: Split, image_size: int):
    """A TF function: int64 ids [B] -> float32 normalised images [B, S, S, 3]."""
    import tensorflow as tf

    table = _image_table(split)
    if table is not None:
        return lambda ids: normalize_images(tf.gather(table, ids))
    paths = tf.constant([str(p) for p in split.image_paths])

    def load_one(i):
        raw = tf.io.read_file(paths[i])
        img = tf.io.decode_image(raw, channels=3, expand_animations=False)
        img.set_shape([None, None, 3])
        return tf.image.resize(img, (image_size, image_size), antialias=True)

    return lambda ids: normalize_images(
        tf.map_fn(load_one, ids, fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))
    )


def queries_dataset(split: Split, queries: Queries, vectorizer, batch_size: int, image_size: int,
                    drop_remainder: bool = False, with_target: bool = True):
    """Batches of queries in order (evaluation, or training with a pre-sampled query list)."""
    import tensorflow as tf

    load = image_loader(split, image_size)
    tensors = {
        "source_id": queries.source_ids.astype(np.int64),
        "text": queries.texts.astype(str),
        "target_id": queries.target_ids.astype(np.int64),
        "target_caption": queries.target_captions.astype(np.int64),
    }
    ds = tf.data.Dataset.from_tensor_slices(tensors).batch(batch_size, drop_remainder=drop_remainder)

    def to_batch(b):
        out = {
            "source_image": load(b["source_id"]),
            "text": vectorizer(b["text"]),
            "source_id": b["source_id"],
            "target_id": b["target_id"],
            "target_caption": b["target_caption"],
        }
        if with_target:
            out["target_image"] = load(b["target_id"])
        return out

    return ds.map(to_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)


def training_dataset(dataset, vectorizer, batch_size: int, steps: int, seed: int, image_size: int,
                     paired: bool = True, start_step: int = 0, shard=(0, 1)):
    """Batches `start_step` .. `steps` - 1 of training queries sampled by the dataset's reference
    sampler, each of `batch_size` queries (the global batch).

    The whole query list is drawn from `seed` up front, so a resumed run skips to `start_step`
    and sees exactly the batches the uninterrupted run would have seen. With
    `shard=(i, n)` the dataset yields only slice i of n of every global batch (a worker's share
    under MultiWorkerMirroredStrategy: it reads and decodes only its own images).
    """
    index, num_shards = shard
    if batch_size % num_shards:
        raise ValueError(f"global batch {batch_size} does not split into {num_shards} shards")
    rng = np.random.default_rng(seed)
    queries = dataset.sample_training_queries(steps * batch_size, rng, paired=paired)
    per_shard = batch_size // num_shards
    rows = np.arange(start_step * batch_size, steps * batch_size).reshape(-1, batch_size)
    rows = rows[:, index * per_shard : (index + 1) * per_shard].reshape(-1)
    queries = queries.subset(rows)
    return queries_dataset(dataset.train, queries, vectorizer, per_shard, image_size, drop_remainder=True)


def images_dataset(split: Split, ids, batch_size: int, image_size: int):
    """Batches of normalised images of `ids` (gallery indexing)."""
    import tensorflow as tf

    load = image_loader(split, image_size)
    ds = tf.data.Dataset.from_tensor_slices(np.asarray(ids, dtype=np.int64)).batch(batch_size)
    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)
