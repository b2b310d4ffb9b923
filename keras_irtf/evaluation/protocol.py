"""Evaluation with the TIRG protocol: test recall Mt, training recall Ms, and their WHM.

Test: every test query (source image + text) against the gallery of ALL test images, the query's
own source image excluded; a hit when a retrieved image has the target's caption.
Train (Ms), per dataset as TIRG's code does it (`dataset.train_recall_gallery`): CSS, every
training query against every training image, the source excluded; MIT-States and Fashion200k, a
fixed, seeded sample of training queries against the gallery of their target images.
Exact score ties are broken towards the lower gallery index (TIRG: numpy's unstable argsort).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_irtf.evaluation import metrics as M
from keras_irtf.data.base import Queries, Split
from keras_irtf.data.pipeline import images_dataset, queries_dataset
from keras_irtf.evaluation.retrieval import chunked_top_k, resolve_backend
from keras_irtf.utils import Progress


def _embedders(model):
    @tf.function(reduce_retracing=True)
    def embed_images(images):
        return model.embed_images(images, training=False)

    @tf.function(reduce_retracing=True)
    def embed_queries(images, tokens):
        return model.embed_queries(images, tokens, training=False)

    return embed_images, embed_queries


def embed_gallery(model, split: Split, ids, batch_size=256, preprocessor=64, verbose=True, desc="gallery"):
    """Embeddings of the split's images `ids`; `preprocessor`: the image encoder's
    (keras_irtf.layers.preprocessing.ImagePreprocessor, or an int S for the built-in one)."""
    embed_images, _ = _embedders(model)
    progress = Progress(len(ids), f"embedding {desc}", enabled=verbose, unit="image")
    out = []
    for images in images_dataset(split, ids, batch_size, preprocessor):
        out.append(embed_images(images).numpy())
        progress.update(len(out[-1]))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def embed_query_set(model, split: Split, queries: Queries, vectorizer, batch_size=256, preprocessor=64,
                    verbose=True, desc="queries"):
    _, embed_queries = _embedders(model)
    progress = Progress(len(queries), f"embedding {desc}", enabled=verbose, unit="query")
    out = []
    ds = queries_dataset(split, queries, vectorizer, batch_size, preprocessor, with_target=False)
    for b in ds:
        out.append(embed_queries(b["source_image"], b["text"]).numpy())
        progress.update(len(out[-1]))
    return np.concatenate(out)


def rank(query_emb, gallery_emb, k, exclude=None, query_chunk=1024, gallery_chunk=8192, verbose=True,
         backend="tf"):
    """Top-k gallery positions for every query (bounded memory; see keras_irtf.evaluation.retrieval), with a
    progress bar. backend: "tf" (default), "faiss" (exact, needs faiss-cpu) or "auto"."""
    backend = resolve_backend(backend)
    progress = Progress(len(query_emb), f"ranking ({backend})", enabled=verbose, unit="query")
    out = chunked_top_k(query_emb, gallery_emb, k, exclude, query_chunk, gallery_chunk, progress, backend=backend)
    progress.close()
    return out


def evaluate_split(model, dataset, vectorizer, split_name, queries: Queries, ks=(1, 5, 10, 50),
                   batch_size=256, preprocessor=64, query_chunk=1024, gallery_chunk=8192, verbose=True,
                   backend="tf"):
    """Recall@K of `queries` on one split. Test (and test_shift): gallery = every image of the
    split, the source excluded. Train: the same when `dataset.train_recall_gallery == "split"`
    (CSS), else gallery = the queries' target images."""
    split = getattr(dataset, split_name)
    if split_name != "train" or getattr(dataset, "train_recall_gallery", "targets") == "split":
        gallery_ids = np.arange(split.num_images)
        exclude = queries.source_ids
    else:
        gallery_ids = np.unique(queries.target_ids)
        exclude = None
    g = embed_gallery(model, split, gallery_ids, batch_size, preprocessor, verbose, f"{split_name} gallery")
    q = embed_query_set(model, split, queries, vectorizer, batch_size, preprocessor, verbose, f"{split_name} queries")
    if exclude is not None:
        # exclusion is by gallery position; the test gallery is every image, in id order
        exclude = np.asarray(exclude, np.int64)
    k = min(max(ks), len(gallery_ids))
    _, top = rank(q, g, k, exclude, query_chunk, gallery_chunk, verbose, backend)
    # an index of -1 marks "no eligible item" (a gallery of k items, one excluded): never a hit
    retrieved = np.where(top >= 0, split.caption_ids[gallery_ids[np.maximum(top, 0)]], -1)
    if k < max(ks):  # a gallery smaller than K: pad with a caption that never matches
        retrieved = np.pad(retrieved, ((0, 0), (0, max(ks) - k)), constant_values=-1)
    result = M.recall_at_k(retrieved, queries.target_captions, ks)
    if split_name.startswith("test"):
        for name, fn in dataset.extra_recalls().items():
            hits = fn(retrieved, queries)
            for kk in ks:
                result[f"{name}_R@{kk}"] = float(np.mean(hits[:, :kk].any(1)))
    return result


def evaluate(model, dataset, vectorizer, ks=(1, 5, 10, 50), whm_ks=None, alpha=0.5,
             train_queries=10000, seed=0, batch_size=256, preprocessor=64, query_chunk=1024,
             gallery_chunk=8192, verbose=True, backend="tf") -> dict:
    """Test recall, training recall and WHM, as the `metrics.json` of a run stores them (from a
    config, keras_irtf.experiment.Experiment.evaluate passes every argument)."""
    whm_ks = tuple(whm_ks or dataset.whm_ks)
    ks = tuple(sorted(set(ks) | set(whm_ks)))
    kw = dict(ks=ks, batch_size=batch_size, preprocessor=preprocessor, query_chunk=query_chunk,
              gallery_chunk=gallery_chunk, verbose=verbose, backend=backend)
    test = evaluate_split(model, dataset, vectorizer, "test", dataset.test.test_queries, **kw)
    train = evaluate_split(model, dataset, vectorizer, "train", dataset.train_recall_queries(train_queries, seed), **kw)
    mt = M.average_recall(test, whm_ks)
    ms = M.average_recall(train, whm_ks)
    out = {
        "test": test,
        "train": train,
        "whm": {"alpha": alpha, "value": M.weighted_harmonic_mean(ms, mt, alpha), "Ms": ms, "Mt": mt,
                "ks": list(whm_ks)},
    }
    out.update(evaluate_shift(model, dataset, vectorizer, ms, alpha, whm_ks, **kw))
    return out


def evaluate_shift(model, dataset, vectorizer, ms, alpha, whm_ks, **kw) -> dict:
    """{"test_shift": recalls, "whm_shift": WHM(Ms, Mt_shift)} when the dataset has a shifted
    test split (CSS with data.dataset.shift), else {}."""
    shifted = getattr(dataset, "test_shift", None)
    if shifted is None:
        return {}
    result = evaluate_split(model, dataset, vectorizer, "test_shift", shifted.test_queries, **kw)
    mt = M.average_recall(result, whm_ks)
    return {"test_shift": result,
            "whm_shift": {"alpha": alpha, "value": M.weighted_harmonic_mean(ms, mt, alpha), "Ms": ms, "Mt": mt,
                          "ks": list(whm_ks), "shift": getattr(dataset, "shift_name", None)}}

