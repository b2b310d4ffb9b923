"""tf.data pipelines of dict batches for training and evaluation.

Training batches are dicts
    {"source_image": float32 [B, H, W, 3] (ImageNet-normalised), "text": int32 [B, L],
     "target_image": float32 [B, H, W, 3], "source_id", "target_id", "target_caption": int64 [B]}
built from a query list that is fixed by the seed before training starts: the same seed gives the
same batches, and a resumed run can skip to its step.

Images are normalised by the image encoder's preprocessor (keras_irtf.preprocessing;
the assembler passes it, a plain int S stands for the built-in ImageNet preprocessing at S).
With a frozen-feature cache (keras_irtf.data.feature_cache; the assembler passes a
CachedFeatureInput in place of the preprocessor) the image entries are int64 rows of the cache
instead, and no image is read. Otherwise a split's images come from one of three places:
- memory (`split.images` is a numpy array: CSS): gathered from a constant;
- a file cache (`split.images` is a CachedImages over a memory-mapped file, see
  keras_irtf.data.image_files): gathered from the mapped file;
- disk (`split.image_paths`, MIT-States and Fashion200k without a cache): every image is read,
  decoded, resized and centre-cropped per element, in parallel, then batched. An image that
  cannot be decoded stops the run with its path (`split.on_bad_image == "error"`); with "skip" it
  is reported, and a training query that needs it is dropped (an evaluation image is replaced by
  a black one so that the gallery keeps its order).
"""

from __future__ import annotations

import sys

import numpy as np
import tensorflow as tf

from keras_irtf.data.base import Queries, Split
from keras_irtf.data.image_files import decode_and_resize, safe_decode_dataset
from keras_irtf.preprocessing import ImagePreprocessor


def as_preprocessor(preprocessor) -> ImagePreprocessor:
    """An ImagePreprocessor, or an int S meaning the built-in encoders' preprocessing at S x S
    (a CachedFeatureInput is passed through: images become feature-cache rows)."""
    if isinstance(preprocessor, ImagePreprocessor) or _cached(preprocessor):
        return preprocessor
    return ImagePreprocessor(int(preprocessor))


def _cached(prep) -> bool:
    """A keras_irtf.data.feature_cache.CachedFeatureInput (it maps split image ids to cache rows)."""
    return bool(getattr(prep, "serves_cached_features", False))


def _row_loader(split: Split, prep):
    """ids [B] -> int64 rows [B] of the frozen-feature cache (no image is read)."""
    rows = tf.constant(prep.rows(split), tf.int64)
    return lambda ids: tf.gather(rows, ids)


def _in_memory(split: Split) -> bool:
    return isinstance(split.images, np.ndarray) and not isinstance(split.images, np.memmap)


def _streams_from_disk(split: Split) -> bool:
    return split.images is None and split.image_paths is not None


def _image_table(split: Split):
    if not _in_memory(split):
        return None
    return tf.constant(split.images)


def _array_gather(images, image_size: int):
    """ids [B] -> uint8 [B, S, S, 3] from an array-like that is not a constant (a file cache)."""
    shape = tuple(images.shape[1:])
    if shape != (image_size, image_size, 3):
        raise ValueError(f"cached images are {shape}, the pipeline asks for {image_size}x{image_size}x3")

    def gather(ids):
        out = tf.numpy_function(lambda i: images[i], [ids], tf.uint8, stateful=False)
        out.set_shape([None, image_size, image_size, 3])
        return out

    return gather


def image_loader(split: Split, preprocessor):
    """A TF function: int64 ids [B] -> float32 normalised images [B, S, S, 3]."""
    prep = as_preprocessor(preprocessor)
    if _cached(prep):
        return _row_loader(split, prep)
    image_size = prep.size
    table = _image_table(split)
    if table is not None:
        return lambda ids: prep.normalize(tf.gather(table, ids))
    if split.images is not None:
        gather = _array_gather(split.images, image_size)
        return lambda ids: prep.normalize(gather(ids))
    paths = tf.constant([str(p) for p in split.image_paths])
    return lambda ids: prep.normalize(
        tf.map_fn(lambda i: decode_and_resize(paths[i], image_size), ids,
                  fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.uint8))
    )


def _disk_elements(split: Split, ds, id_keys, image_size: int, skip_unreadable: bool):
    """Per-element datasets of dicts -> the same dicts with "<key>_image" uint8 images decoded from
    the split's files for each id key, in parallel and in order."""
    paths = tf.constant([str(p) for p in split.image_paths])
    mode = split.on_bad_image

    def decode_all(element):
        parts = [tf.data.Dataset.from_tensors(element)]
        parts += [safe_decode_dataset(paths[element[k]], image_size) for k in id_keys]
        return tf.data.Dataset.zip(tuple(parts))

    ds = ds.interleave(decode_all, cycle_length=16, block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=True)

    def check(element, *decoded):
        out = dict(element)
        oks = []
        for key, (image, ok) in zip(id_keys, decoded):
            path = paths[element[key]]
            if mode == "error":
                with tf.control_dependencies([tf.debugging.Assert(
                        ok, ["could not read or decode image", path,
                             "(replace it, or set data.on_bad_image=skip)"])]):
                    image = tf.identity(image)
            else:
                image = tf.cond(ok, lambda: image, lambda: _report_skip(image, path))
            out[f"{key}_image"] = image
            oks.append(ok)
        out["_ok"] = tf.reduce_all(tf.stack(oks))
        return out

    ds = ds.map(check, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if skip_unreadable and mode != "error":
        ds = ds.filter(lambda e: e["_ok"])
    return ds.map(lambda e: {k: v for k, v in e.items() if k != "_ok"})


def _report_skip(image, path):
    # the process's standard error ("file://stderr" would create a FILE named stderr)
    with tf.control_dependencies([tf.print("warning: skipping unreadable image", path,
                                           "(data.on_bad_image=skip)", output_stream=sys.stderr)]):
        return tf.identity(image)


def queries_dataset(split: Split, queries: Queries, vectorizer, batch_size: int, preprocessor,
                    drop_remainder: bool = False, with_target: bool = True, skip_unreadable: bool = False):
    """Batches of queries in order (evaluation, or training with a pre-sampled query list).

    skip_unreadable: for a split streamed from disk with on_bad_image="skip", drop a query whose
    image cannot be decoded (training) instead of giving it a black image (evaluation). The
    stream then repeats without end: take the batches you need.
    """
    prep = as_preprocessor(preprocessor)
    tensors = {
        "source_id": queries.source_ids.astype(np.int64),
        "text": queries.texts.astype(str),
        "target_id": queries.target_ids.astype(np.int64),
        "target_caption": queries.target_captions.astype(np.int64),
    }
    if _streams_from_disk(split) and not _cached(prep):
        keys = ["source_id", "target_id"] if with_target else ["source_id"]
        ds = tf.data.Dataset.from_tensor_slices(tensors)
        ds = _disk_elements(split, ds, keys, prep.size, skip_unreadable)
        if skip_unreadable and split.on_bad_image == "skip":
            ds = ds.repeat()  # the caller takes as many batches as it needs
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)

        def image(b, key):  # decoded by the disk elements
            return prep.normalize(b[f"{key}_image"])
    else:
        load = image_loader(split, prep)
        ds = tf.data.Dataset.from_tensor_slices(tensors).batch(batch_size, drop_remainder=drop_remainder)

        def image(b, key):
            return load(b[key])

    def to_batch(b):
        out = {
            "source_image": image(b, "source_id"),
            "text": vectorizer(b["text"]),
            "source_id": b["source_id"],
            "target_id": b["target_id"],
            "target_caption": b["target_caption"],
        }
        if with_target:
            out["target_image"] = image(b, "target_id")
        return out

    return ds.map(to_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)


def training_dataset(dataset, vectorizer, batch_size: int, steps: int, seed: int, preprocessor,
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
    split = dataset.train
    queries = dataset.sample_training_queries(steps * batch_size, rng, paired=paired)
    per_shard = batch_size // num_shards
    rows = np.arange(start_step * batch_size, steps * batch_size).reshape(-1, batch_size)
    rows = rows[:, index * per_shard : (index + 1) * per_shard].reshape(-1)
    queries = queries.subset(rows)
    ds = queries_dataset(split, queries, vectorizer, per_shard, preprocessor, drop_remainder=True,
                         skip_unreadable=True)
    # streamed with on_bad_image=skip, the query stream repeats (dropped queries are made up from
    # its start), so the run still gets exactly its number of full batches
    streamed = _streams_from_disk(split) and not _cached(as_preprocessor(preprocessor))
    return ds.take(steps - start_step) if streamed and split.on_bad_image == "skip" else ds


def images_dataset(split: Split, ids, batch_size: int, preprocessor):
    """Batches of normalised images of `ids` (gallery indexing)."""
    prep = as_preprocessor(preprocessor)
    ids = np.asarray(ids, dtype=np.int64)
    if _streams_from_disk(split) and not _cached(prep):
        ds = tf.data.Dataset.from_tensor_slices({"id": ids})
        ds = _disk_elements(split, ds, ["id"], prep.size, skip_unreadable=False).batch(batch_size)
        return ds.map(lambda b: prep.normalize(b["id_image"]), num_parallel_calls=tf.data.AUTOTUNE,
                      deterministic=True).prefetch(tf.data.AUTOTUNE)
    load = image_loader(split, prep)
    ds = tf.data.Dataset.from_tensor_slices(ids).batch(batch_size)
    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)
