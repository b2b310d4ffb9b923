"""Recall@K under the TIRG protocol, and the GA paper's weighted harmonic mean (WHM).

Recall@K: the fraction of queries for which some image among the top K has the target's
caption (so a duplicate of the target counts as a hit).

WHM of the training recall Ms and the test recall Mt (each the average of the dataset's reported
recalls, e.g. R@1, R@5, R@10):
    WHM = (1 + alpha) * Ms * Mt / (alpha * Mt + Ms)
alpha = 0 gives Mt; alpha = 1 the harmonic mean. The paper reports alpha = 0.5.
"""

from __future__ import annotations

import numpy as np


def hits_at_k(retrieved_captions, target_captions, ks):
    """{K: bool [Q]} whether the target caption is among the first K retrieved captions."""
    retrieved = np.asarray(retrieved_captions)
    target = np.asarray(target_captions).reshape(-1, 1)
    match = retrieved == target
    first = np.where(match.any(1), match.argmax(1), np.iinfo(np.int64).max)
    return {int(k): first < k for k in ks}


def recall_at_k(retrieved_captions, target_captions, ks=(1, 5, 10, 50)) -> dict:
    """{"R@K": recall} from retrieved caption ids [Q, >= max(ks)] and target caption ids [Q]."""
    retrieved = np.asarray(retrieved_captions)
    if retrieved.ndim != 2 or retrieved.shape[1] < max(ks):
        raise ValueError(f"need at least {max(ks)} retrieved items per query, got shape {retrieved.shape}")
    hits = hits_at_k(retrieved, target_captions, ks)
    return {f"R@{k}": float(h.mean()) if len(h) else 0.0 for k, h in hits.items()}


def average_recall(recalls: dict, ks=(1, 5, 10)) -> float:
    return float(np.mean([recalls[f"R@{k}"] for k in ks]))


def weighted_harmonic_mean(ms: float, mt: float, alpha: float = 0.5) -> float:
    """WHM = (1 + alpha) Ms Mt / (alpha Mt + Ms); 0 when both recalls are 0."""
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    denom = alpha * mt + ms
    return float((1.0 + alpha) * ms * mt / denom) if denom > 0 else 0.0


whm = weighted_harmonic_mean
