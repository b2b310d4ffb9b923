"""CIRR's test-server submission: rankings of the test1 queries in the two files the server takes.

test1's targets are not public; CIRR's evaluation server scores uploaded rankings:

    recall_submission.json         {"version": "rc2", "metric": "recall",
                                    "<pairid>": [the 50 best image names], ...}
    recall_subset_submission.json  {"version": "rc2", "metric": "recall_subset",
                                    "<pairid>": [the 3 best names of the query's img_set], ...}

The reference image is excluded from both rankings (as in the validation protocol); the subset
ranking is among the query's img_set.members. From the command line:

    python tools/evaluate.py --run runs/cirr_tirg_s0 --submission out/
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from keras_irtf.data.base import DatasetError
from keras_irtf.evaluation import protocol as P
from keras_irtf.evaluation.protocol import rank, rank_within
from keras_irtf.utils import write_json

log = logging.getLogger(__name__)

FILES = {"recall": "recall_submission.json", "recall_subset": "recall_subset_submission.json"}


def submission_from_embeddings(query_emb, gallery_emb, names, pairids, reference_ids, members, k: int = 50,
                               subset_k: int = 3, backend: str = "tf", verbose: bool = False):
    """(recall, recall_subset) dicts of the two files from embeddings, no model involved.

    query_emb [Q, D]; gallery_emb [N, D] with `names` [N] (image id = row); pairids [Q];
    reference_ids [Q] (rows of the gallery, excluded); members [Q, M] image ids (-1 = none).
    Exact score ties go to the lower image id."""
    names = list(names)
    reference_ids = np.asarray(reference_ids, np.int64)
    kk = min(int(k), len(names))
    _, top = rank(query_emb, gallery_emb, kk, reference_ids, verbose=verbose, backend=backend)
    ranked = rank_within(query_emb, np.arange(len(names)), gallery_emb, members, reference_ids)
    recall = {"version": "rc2", "metric": "recall"}
    subset = {"version": "rc2", "metric": "recall_subset"}
    for i, pairid in enumerate(np.asarray(pairids).tolist()):
        recall[str(pairid)] = [names[j] for j in top[i] if j >= 0]
        subset[str(pairid)] = [names[j] for j in ranked[i, :subset_k] if j >= 0]
    return recall, subset


def write_submission(exp, model, out_dir, verbose=None, backend=None) -> dict:
    """Embed CIRR's test1 queries and gallery with `model` (the run's preprocessing and text
    input, `exp` a keras_irtf.experiment.Experiment of a CIRR config) and write the two files
    into `out_dir`. Returns {"recall": path, "recall_subset": path}."""
    dataset = exp.dataset
    if not hasattr(dataset, "test1"):
        raise DatasetError(f"--submission writes CIRR's test-server files; this run's dataset is "
                           f"{exp.cfg.data.dataset.type!r}, not 'cirr'")
    show = exp.verbose if verbose is None else verbose
    test1 = dataset.test1(verbose=show)
    e = exp.cfg.eval
    kw = dict(batch_size=e.batch_size, preprocessor=exp.preprocessor, verbose=show)
    gallery = P.embed_gallery(model, test1.split, np.arange(test1.split.num_images), desc="test1 gallery", **kw)
    queries = P.embed_query_set(model, test1.split, test1.queries, exp._text_input(), desc="test1 queries", **kw)
    recall, subset = submission_from_embeddings(queries, gallery, test1.split.captions, test1.pairids,
                                                test1.queries.source_ids, test1.members,
                                                backend=backend or e.backend, verbose=show)
    out = Path(out_dir)
    written = {}
    for metric, data in (("recall", recall), ("recall_subset", subset)):
        written[metric] = out / FILES[metric]
        write_json(written[metric], data)
    if show:
        log.info(f"CIRR test1 submission ({len(test1.pairids)} pairs): {written['recall']}, {written['recall_subset']} "
                 f"(upload both to the CIRR evaluation server)")
    return written
