"""What a dataset declares about its test: groups of queries with their galleries, extra metrics,
and the ranking of each query's own candidate set (CIRR's Recall_subset).

Datasets return a TestProtocol from `test_protocol(split_name, queries)`; keras_irtf.evaluation
runs it (see keras_irtf.evaluation.protocol for the protocols themselves).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np


@dataclasses.dataclass
class QueryGroup:
    """Some of a split's queries, ranked against their own gallery.

    name: "" for a protocol of one group (its recalls are the split's "R@K"); otherwise the
        prefix of the group's keys ("dress" -> "dress_R@10") and the group joins the averages.
    query_idx: rows of the split's Queries that belong to the group.
    gallery_ids: image ids of the split that are the group's gallery, in gallery order (exact
        score ties go to the earlier one).
    exclude_source: whether a query's own source image is removed from the gallery (when it is
        in it at all).
    """

    name: str
    query_idx: np.ndarray
    gallery_ids: np.ndarray
    exclude_source: bool = True


@dataclasses.dataclass
class TestProtocol:
    """How a dataset's test queries are evaluated (`RetrievalDataset.test_protocol`).

    groups: the query groups; each query may be in at most one. A single unnamed group is the
        TIRG protocol's shape (every query against one gallery); named groups (FashionIQ's
        categories) report "<name>_R@K" each and "R@K" = the unweighted mean over the groups
        (every group counts the same, as the FashionIQ papers average over categories).
    extra_metrics: fn(query_emb [Q, D], image_ids [N] sorted, image_emb [N, D], queries) ->
        {name: float}, called once with every query and every embedded image (CIRR's
        Recall_subset). Its keys are added to the split's results as they are.
    extra_image_ids: split image ids extra_metrics needs beyond the groups' galleries.
    derived: fn(results) -> {name: float}: summaries of the results computed so far (CIRR's
        headline (R@5 + R_subset@1) / 2), added last.
    """

    groups: list
    extra_metrics: Optional[Callable] = None
    extra_image_ids: Optional[np.ndarray] = None
    derived: Optional[Callable] = None

    def image_ids(self) -> np.ndarray:
        """Every image id to embed, sorted, each once."""
        parts = [np.asarray(g.gallery_ids, np.int64) for g in self.groups]
        if self.extra_image_ids is not None:
            parts.append(np.asarray(self.extra_image_ids, np.int64))
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def rank_within(query_emb, image_ids, image_emb, candidates, exclude=None) -> np.ndarray:
    """Each query's own candidate images ranked by score: [Q, M] image ids, best first, -1 for
    padding and for the excluded image (moved to the end). Ties go to the earlier candidate.

    candidates: [Q, M] image ids (-1 = no candidate), each with an embedding in
    (image_ids sorted, image_emb); exclude: [Q] an image id to leave out per query (or -1).
    Used for CIRR's Recall_subset (ranking within the query's img_set) and its submission."""
    candidates = np.asarray(candidates, np.int64)
    image_ids = np.asarray(image_ids, np.int64)
    valid = candidates >= 0
    if exclude is not None:
        valid &= candidates != np.asarray(exclude, np.int64)[:, None]
    rows = np.searchsorted(image_ids, np.maximum(candidates, 0))
    rows = np.minimum(rows, max(len(image_ids) - 1, 0))
    if (valid & (image_ids[rows] != candidates)).any():
        raise ValueError("rank_within: some candidate images have no embedding")
    scores = np.einsum("qd,qmd->qm", np.asarray(query_emb, np.float32), np.asarray(image_emb, np.float32)[rows])
    scores = np.where(valid, scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked = np.take_along_axis(candidates, order, axis=1)
    return np.where(np.take_along_axis(valid, order, axis=1), ranked, -1)


__all__ = ["QueryGroup", "TestProtocol", "rank_within"]
