"""Evaluation with the TIRG protocol: test recall Mt, training recall Ms, and their WHM.

Test: every test query (source image + text) against the gallery of ALL test images, the query's
own source image excluded; a hit when a retrieved image has the target's caption.
Train (Ms), per dataset as TIRG's code does it (`dataset.train_recall_gallery`): CSS, every
training query against every training image, the source excluded; MIT-States and Fashion200k, a
fixed, seeded sample of training queries against the gallery of their target images. Datasets of
published triplets (FashionIQ, CIRR, triplet folders) take min(T, n) distinct triplets of their
T (`training_recall_queries`): a set of 72 triplets is evaluated on those 72, once each. The
number of queries Ms is over is metrics.json's `whm["Ms_queries"]` (`train` stays a dict of recalls).
Exact score ties are broken towards the lower gallery index (TIRG: numpy's unstable argsort).

A dataset whose published protocol differs says so with `test_protocol(split_name, queries)`,
returning a TestProtocol (None keeps the default above):
- groups of queries, each ranked against its own gallery, with or without the source removed
  (FashionIQ: each category's queries against that category's images, nothing removed; the
  results are "<category>_R@K" and "R@K" = their mean);
- an explicit gallery (a single group whose gallery is a subset: a triplets folder's
  gallery.txt);
- extra metrics computed from the query and image embeddings (CIRR's Recall_subset@K, ranked
  within each query's own image set).
The ranking itself is `recalls_from_embeddings`, a function of embeddings only, so protocols are
tested with hand-made embeddings. metrics.json's `test` block stays a flat dict of floats: the
WHM reads its "R@K" keys.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_irtf.data.base import Queries, RetrievalDataset, Split
from keras_irtf.data.named_images import NamedImageDataset
from keras_irtf.data.pipeline import images_dataset, queries_dataset
from keras_irtf.data.protocols import QueryGroup, TestProtocol, rank_within  # noqa: F401  (part of this module's API)
from keras_irtf.evaluation import metrics as M
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
    (keras_irtf.preprocessing.ImagePreprocessor, or an int S for the built-in one)."""
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


def default_protocol(dataset, split_name: str, queries: Queries) -> TestProtocol:
    """The TIRG protocol as one group. Test (and test_shift): gallery = every image of the split,
    the source excluded. Train: the same when `dataset.train_recall_gallery == "split"` (CSS),
    else gallery = the queries' target images, nothing excluded."""
    split = getattr(dataset, split_name)
    everything = np.arange(len(queries))
    if split_name != "train" or getattr(dataset, "train_recall_gallery", "targets") == "split":
        return TestProtocol([QueryGroup("", everything, np.arange(split.num_images), True)])
    return TestProtocol([QueryGroup("", everything, np.unique(queries.target_ids), False)])


def split_protocol(dataset, split_name: str, queries: Queries) -> TestProtocol:
    """The dataset's own protocol for a test split (`dataset.test_protocol(split_name, queries)`,
    None = the default), else the default; training recall always follows the default."""
    hook = getattr(dataset, "test_protocol", None)
    if split_name.startswith("test") and hook is not None:
        protocol = hook(split_name, queries)
        if protocol is not None:
            return protocol
    return default_protocol(dataset, split_name, queries)


def training_recall_queries(dataset, n: int, seed: int) -> Queries:
    """The training queries of Ms, for `data.train_recall_queries` = n:

    - a dataset that defines its own `train_recall_queries` (CSS: every training query, TIRG's
      protocol) gets it as it is;
    - a dataset of published triplets (NamedImageDataset: FashionIQ, CIRR, triplet folders):
      min(T, n) distinct triplets of its T, drawn without replacement (seeded), in triplet order,
      each with one of its texts drawn uniformly; n >= T takes every triplet once. Drawing n
      with replacement would embed 10,000 queries for a set of 72 triplets, most of them repeats;
    - any other (MIT-States, Fashion200k, whose queries are drawn, not listed): the dataset's
      seeded sample of n (TIRG's sampling for them).
    """
    own = type(dataset).train_recall_queries is not RetrievalDataset.train_recall_queries
    if own or not isinstance(dataset, NamedImageDataset):
        return dataset.train_recall_queries(n, seed)
    # the triplets a NamedImageDataset subclass sets (its documented attributes)
    sources, targets, texts = dataset._train_source_ids, dataset._train_target_ids, dataset._train_texts
    rng = np.random.default_rng(seed + 7919)
    rows = np.sort(rng.choice(len(sources), size=min(int(n), len(sources)), replace=False))
    variant = rng.integers(texts.shape[1], size=len(rows))
    tgt = targets[rows]
    return Queries(sources[rows].copy(), texts[rows, variant], tgt, dataset.train.caption_ids[tgt].astype(np.int64))


def retrieved_captions(query_emb, gallery_emb, gallery_caption_ids, k, exclude=None, query_chunk=1024,
                       gallery_chunk=8192, verbose=True, backend="tf"):
    """Caption ids [Q, k] of each query's top-k gallery images (-1: no eligible image, never a
    hit); `exclude`: one gallery position (or -1) per query."""
    gallery_caption_ids = np.asarray(gallery_caption_ids, np.int64)
    kk = min(int(k), len(gallery_caption_ids))
    if kk == 0 or len(query_emb) == 0:
        return np.full((len(query_emb), int(k)), -1, np.int64)
    _, top = rank(query_emb, gallery_emb, kk, exclude, query_chunk, gallery_chunk, verbose, backend)
    # an index of -1 marks "no eligible item" (a gallery of k items, one excluded): never a hit
    retrieved = np.where(top >= 0, gallery_caption_ids[np.maximum(top, 0)], -1)
    if kk < k:  # a gallery smaller than K: pad with a caption that never matches
        retrieved = np.pad(retrieved, ((0, 0), (0, int(k) - kk)), constant_values=-1)
    return retrieved


def recalls_from_embeddings(query_emb, image_ids, image_emb, queries: Queries, caption_ids, protocol: TestProtocol,
                            ks=(1, 5, 10, 50), extra_recalls=None, query_chunk=1024, gallery_chunk=8192,
                            verbose=True, backend="tf") -> dict:
    """The split's results from embeddings, no model involved (tests pass hand-made ones).

    query_emb: [Q] rows, one per query of `queries`; image_ids: sorted image ids of the split
    with their embeddings `image_emb` (at least protocol.image_ids()); caption_ids: the split's
    caption id per image (a hit is a retrieved image with the target's caption).
    extra_recalls: the dataset's extra_recalls() (applied to an unnamed group: "<name>_R@K").
    """
    image_ids = np.asarray(image_ids, np.int64)
    caption_ids = np.asarray(caption_ids, np.int64)
    kmax = max(ks)
    result, named = {}, []
    for group in protocol.groups:
        gallery_ids = np.asarray(group.gallery_ids, np.int64)
        rows = np.searchsorted(image_ids, gallery_ids)
        if len(gallery_ids) and (rows.max() >= len(image_ids) or not np.array_equal(image_ids[rows], gallery_ids)):
            raise ValueError(f"group {group.name!r}: some gallery images have no embedding")
        sub = queries.subset(np.asarray(group.query_idx, np.int64))
        exclude = None
        if group.exclude_source:
            # exclusion is by gallery position: the source's position in this gallery, or -1
            position = np.full(len(caption_ids), -1, np.int64)
            position[gallery_ids] = np.arange(len(gallery_ids))
            exclude = position[sub.source_ids]
        retrieved = retrieved_captions(
            np.asarray(query_emb)[np.asarray(group.query_idx, np.int64)], np.asarray(image_emb)[rows],
            caption_ids[gallery_ids], kmax, exclude, query_chunk, gallery_chunk, verbose, backend)
        recalls = M.recall_at_k(retrieved, sub.target_captions, ks)
        for name, fn in (extra_recalls or {}).items() if not group.name else ():
            hits = fn(retrieved, sub)
            for kk in ks:
                recalls[f"{name}_R@{kk}"] = float(np.mean(hits[:, :kk].any(1)))
        if group.name:
            named.append((group.name, recalls))
        else:
            result.update(recalls)
    if named:
        for key in named[0][1]:
            result[key] = float(np.mean([r[key] for _, r in named]))
        for name, recalls in named:
            result.update({f"{name}_{key}": value for key, value in recalls.items()})
    if protocol.extra_metrics is not None:
        result.update({k: float(v) for k, v in protocol.extra_metrics(query_emb, image_ids, image_emb, queries).items()})
    if protocol.derived is not None:
        result.update({k: float(v) for k, v in protocol.derived(dict(result)).items()})
    return result


def evaluate_split(model, dataset, vectorizer, split_name, queries: Queries, ks=(1, 5, 10, 50),
                   batch_size=256, preprocessor=64, query_chunk=1024, gallery_chunk=8192, verbose=True,
                   backend="tf"):
    """Recall@K of `queries` on one split, under the split's protocol (`split_protocol`: the
    dataset's `test_protocol` for test splits, else the TIRG default). Every image any group
    needs is embedded once, every query once."""
    split = getattr(dataset, split_name)
    protocol = split_protocol(dataset, split_name, queries)
    image_ids = protocol.image_ids()
    g = embed_gallery(model, split, image_ids, batch_size, preprocessor, verbose, f"{split_name} gallery")
    q = embed_query_set(model, split, queries, vectorizer, batch_size, preprocessor, verbose, f"{split_name} queries")
    extra = dataset.extra_recalls() if split_name.startswith("test") else None
    return recalls_from_embeddings(q, image_ids, g, queries, split.caption_ids, protocol, ks, extra, query_chunk,
                                   gallery_chunk, verbose, backend)


def evaluate(model, dataset, vectorizer, ks=(1, 5, 10, 50), whm_ks=None, alpha=0.5,
             train_queries=10000, seed=0, batch_size=256, preprocessor=64, query_chunk=1024,
             gallery_chunk=8192, verbose=True, backend="tf") -> dict:
    """Test recall, training recall and WHM, as the `metrics.json` of a run stores them (from a
    config, keras_irtf.experiment.Experiment.evaluate passes every argument). `whm` holds Ms, Mt,
    their WHM and `Ms_queries`, how many training queries Ms is over (`training_recall_queries`:
    at most `train_queries`; every training query for CSS). With held-out training queries
    (`dataset.validation_queries`, data.validation_fraction) `val` holds their recall."""
    whm_ks = tuple(whm_ks or dataset.whm_ks)
    ks = tuple(sorted(set(ks) | set(whm_ks)))
    kw = dict(ks=ks, batch_size=batch_size, preprocessor=preprocessor, query_chunk=query_chunk,
              gallery_chunk=gallery_chunk, verbose=verbose, backend=backend)
    test = evaluate_split(model, dataset, vectorizer, "test", dataset.test.test_queries, **kw)
    train_set = training_recall_queries(dataset, train_queries, seed)
    train = evaluate_split(model, dataset, vectorizer, "train", train_set, **kw)
    mt = M.average_recall(test, whm_ks)
    ms = M.average_recall(train, whm_ks)
    out = {
        "test": test,
        "train": train,
        "whm": {"alpha": alpha, "value": M.weighted_harmonic_mean(ms, mt, alpha), "Ms": ms, "Mt": mt,
                "ks": list(whm_ks), "Ms_queries": len(train_set)},
    }
    out.update(evaluate_shift(model, dataset, vectorizer, ms, alpha, whm_ks, ms_queries=len(train_set), **kw))
    held_out = getattr(dataset, "validation_queries", None)
    if held_out is not None and len(held_out):
        # the training queries held out (data.validation_fraction), ranked as Ms ranks the others
        out["val"] = evaluate_split(model, dataset, vectorizer, "train", held_out, **kw)
        out["val"]["queries"] = len(held_out)
    return out


def evaluate_shift(model, dataset, vectorizer, ms, alpha, whm_ks, ms_queries=None, **kw) -> dict:
    """{"test_shift": recalls, "whm_shift": WHM(Ms, Mt_shift)} when the dataset has a shifted
    test split (CSS with data.dataset.shift), else {}."""
    shifted = getattr(dataset, "test_shift", None)
    if shifted is None:
        return {}
    result = evaluate_split(model, dataset, vectorizer, "test_shift", shifted.test_queries, **kw)
    mt = M.average_recall(result, whm_ks)
    return {"test_shift": result,
            "whm_shift": {"alpha": alpha, "value": M.weighted_harmonic_mean(ms, mt, alpha), "Ms": ms, "Mt": mt,
                          "ks": list(whm_ks), "shift": getattr(dataset, "shift_name", None),
                          "Ms_queries": ms_queries}}

