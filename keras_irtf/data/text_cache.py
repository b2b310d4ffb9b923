"""Embedding each distinct text once: a run-long cache in front of a frozen BERT encoder.

BERT is frozen in ComposeAE and TIRG-BERT, so a text's embedding never changes during a run;
re-running a 110M-parameter encoder for every query of every step would dominate training time
(the reference implementations precompute the embeddings with a BERT server). Instead:

    cache = TextEmbeddingCache(model.text_encoder)
    cache.add(texts_of_the_run)            # BERT runs here, once per distinct text, in batches
    model.text_encoder.attach_cache(cache)
    vectorizer = cache.vectorizer()       # tf.data: strings -> int32 row ids of the cache

The training batches then carry row ids and the encoder layer gathers rows of the cache's table
(a non-trainable variable); the embeddings are bit-for-bit the ones the uncached path computes.
The cache is a training-time speed-up only: the same layer still takes raw strings (an exported
model, or `use_cache=False` in `prepare_text_input`).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_irtf.utils import Progress


class TextEmbeddingCache:
    """Distinct text -> row of a [N, D] table of embeddings computed by `encoder` (run once each)."""

    def __init__(self, encoder, batch_size: int = 256, verbose: bool = False, store=None):
        self.encoder = encoder
        # an on-disk keras_irtf.data.feature_cache.TextFeatureStore: texts it holds are read, not
        # encoded, and new ones are added to it (reused by later runs)
        self.store = store
        self.texts_from_store = 0
        self.batch_size = int(batch_size)
        self.verbose = verbose
        self.texts: list = []
        self._index: dict = {}
        self._rows = np.zeros((0, encoder.output_dim), np.float32)
        self.table = tf.Variable(
            self._rows, shape=tf.TensorShape([None, encoder.output_dim]), trainable=False, name="text_embedding_cache"
        )
        self._encode = tf.function(encoder.encode_strings, reduce_retracing=True)
        self.texts_encoded = 0  # texts sent through the encoder by this cache
        self.encoder_batches = 0  # encoder calls made by this cache

    def __len__(self):
        return len(self.texts)

    def __contains__(self, text):
        return str(text) in self._index

    def add(self, texts) -> int:
        """Encode the texts not yet cached (each distinct text once); returns how many were new."""
        new = [t for t in dict.fromkeys(str(t) for t in texts) if t not in self._index]
        if not new:
            return 0
        stored = None
        if self.store is not None:
            have, found = self.store.lookup(new)
            stored = dict(zip((t for t, h in zip(new, have) if h), found))
            self.texts_from_store += len(stored)
        to_encode = [t for t in new if not stored or t not in stored]
        progress = Progress(len(to_encode), f"embedding texts ({type(self.encoder).__name__})", enabled=self.verbose)
        encoded = {}
        for start in range(0, len(to_encode), self.batch_size):
            batch = to_encode[start : start + self.batch_size]
            for t, row in zip(batch, self._encode(tf.constant(batch)).numpy()):
                encoded[t] = row
            self.encoder_batches += 1
            progress.update(len(batch))
        if self.store is not None and to_encode:
            self.store.append(to_encode, np.stack([encoded[t] for t in to_encode]))
        chunks = [np.stack([encoded[t] if t in encoded else stored[t] for t in new]).astype(np.float32)]
        for t in new:
            self._index[t] = len(self.texts)
            self.texts.append(t)
        self._rows = np.concatenate([self._rows] + chunks).astype(np.float32)
        self.table.assign(self._rows)
        self.texts_encoded += len(to_encode)
        return len(new)

    def ids(self, texts) -> np.ndarray:
        """Row ids of cached texts (KeyError naming the first missing text)."""
        out = []
        for t in texts:
            t = t.decode() if isinstance(t, bytes) else str(t)
            if t not in self._index:
                raise KeyError(f"text {t!r} is not in the embedding cache; add it with TextEmbeddingCache.add()")
            out.append(self._index[t])
        return np.asarray(out, np.int32)

    def embeddings(self, texts) -> np.ndarray:
        return self._rows[self.ids(texts)]

    def gather(self, ids):
        """Graph-friendly: int ids [B] -> float32 [B, D] (what the encoder layer calls)."""
        return tf.gather(self.table, tf.cast(ids, tf.int32))

    def vectorizer(self) -> "CachedTextVectorizer":
        """A tf.data-usable callable strings -> row ids, over the texts cached so far."""
        return CachedTextVectorizer(self)


class CachedTextVectorizer:
    """tf.string [B] -> int32 [B] row ids of a TextEmbeddingCache (a snapshot of its texts).

    A text outside the snapshot fails the pipeline with an error naming it (add every text of the
    run to the cache before building the pipelines: `texts_of_run`).
    """

    def __init__(self, cache: TextEmbeddingCache):
        self.cache = cache
        keys = tf.constant(cache.texts if cache.texts else [""], tf.string)
        values = tf.range(len(cache.texts) if cache.texts else 1, dtype=tf.int32)
        default = -1
        if not cache.texts:
            values = tf.constant([-1], tf.int32)
        self.table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, values), default)

    def __call__(self, texts):
        texts = tf.convert_to_tensor(texts, tf.string)
        ids = self.table.lookup(texts)
        missing = ids < 0
        check = tf.debugging.Assert(
            tf.logical_not(tf.reduce_any(missing)),
            ["texts missing from the BERT embedding cache (add them with TextEmbeddingCache.add "
             "before building the pipeline):", tf.boolean_mask(texts, missing)],
            summarize=5,
        )
        with tf.control_dependencies([check]):
            return tf.identity(ids)


def raw_texts(texts):
    """The uncached path's 'vectorizer': the strings themselves (the encoder runs on them)."""
    return tf.convert_to_tensor(texts, tf.string)


def texts_of_run(dataset) -> list:
    """Every text a training run feeds the model: training texts (training queries and the
    training-recall sample draw from them), the test queries' texts, and the dataset's
    `extra_texts()` (e.g. CIRR's test1 captions, embedded for the test-server submission)."""
    texts = list(dataset.training_texts())
    test = getattr(dataset, "test", None)
    if test is not None and getattr(test, "test_queries", None) is not None:
        texts += [str(t) for t in test.test_queries.texts]
    extra = getattr(dataset, "extra_texts", None)
    if extra is not None:
        texts += [str(t) for t in extra()]
    return list(dict.fromkeys(str(t) for t in texts))


def prepare_text_input(text_encoder, texts, use_cache: bool = True, batch_size: int = 256, verbose: bool = False,
                       store=None):
    """The pipelines' vectorizer for a frozen BERT text encoder.

    use_cache: embed `texts` once now, attach the cache to the encoder and return a vectorizer
    of row ids; otherwise return `raw_texts` (BERT runs inside every step). `store`: an on-disk
    TextFeatureStore (keras_irtf.data.feature_cache) read before encoding and added to.
    """
    if not use_cache:
        return raw_texts
    cache = TextEmbeddingCache(text_encoder, batch_size=batch_size, verbose=verbose, store=store)
    cache.add(texts)
    text_encoder.attach_cache(cache)
    return cache.vectorizer()
