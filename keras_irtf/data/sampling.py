"""Vectorised pieces of the reference samplers (millions of training queries are drawn up front:
160,000 steps x 32 queries), equal in distribution to the reference's one-at-a-time loops."""

from __future__ import annotations

import numpy as np


class Groups:
    """Variable-length groups of integers (group g holds items[offsets[g]:offsets[g] + counts[g]])."""

    def __init__(self, lists):
        self.counts = np.array([len(x) for x in lists], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.items = np.array([v for x in lists for v in x], dtype=np.int64)

    def pick(self, groups, rng, exclude_position=None):
        """One uniformly random item of each group in `groups` (an int array). With
        `exclude_position`, the item at that position within its group is never picked (the
        others stay uniform); such groups need at least two items."""
        groups = np.asarray(groups, dtype=np.int64)
        counts = self.counts[groups]
        if exclude_position is None:
            pos = np.floor(rng.random(len(groups)) * counts).astype(np.int64)
        else:
            pos = np.floor(rng.random(len(groups)) * (counts - 1)).astype(np.int64)
            pos += pos >= exclude_position
        return self.items[self.offsets[groups] + pos], pos


def passes(rng, ids, n):
    """n items from successive shuffled passes over `ids` (a data loader's epochs)."""
    ids = np.asarray(ids, dtype=np.int64)
    reps = -(-n // len(ids))
    return np.concatenate([rng.permutation(ids) for _ in range(reps)])[:n]
