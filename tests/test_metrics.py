"""Recall@K (TIRG caption protocol) and the weighted harmonic mean against hand-computed cases."""

import numpy as np
import pytest

from keras_irtf.evaluation import metrics as M
from keras_irtf.evaluation.retrieval import chunked_top_k


def test_recall_at_k_hand_computed():
    # captions of the retrieved items, best first, for 4 queries
    retrieved = np.array([
        [7, 3, 3, 9, 1],  # target 7: hit at rank 1
        [2, 8, 5, 5, 4],  # target 5: first hit at rank 3
        [1, 1, 1, 1, 1],  # target 6: never
        [0, 2, 4, 6, 6],  # target 6: first hit at rank 4
    ])
    targets = np.array([7, 5, 6, 6])
    r = M.recall_at_k(retrieved, targets, ks=(1, 3, 5))
    assert r == {"R@1": 0.25, "R@3": 0.5, "R@5": 0.75}
    hits = M.hits_at_k(retrieved, targets, (1, 4))
    np.testing.assert_array_equal(hits[1], [True, False, False, False])
    np.testing.assert_array_equal(hits[4], [True, True, False, True])
    assert M.average_recall(r, ks=(1, 3, 5)) == pytest.approx(0.5)


def test_recall_needs_enough_retrieved_items():
    with pytest.raises(ValueError, match="at least 10 retrieved items"):
        M.recall_at_k(np.zeros((3, 5)), np.zeros(3), ks=(1, 10))


def test_query_image_exclusion_and_caption_duplicates():
    """The source image is never retrieved, and ANY image with the target's caption is a hit."""
    # gallery: 0 is the source image of query 0; 1 and 2 share caption 20 (duplicates)
    gallery = np.array([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.0, 0.0, 1.0]], np.float32)
    captions = np.array([10, 20, 20, 30])
    queries = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], np.float32)

    # query 0 asks for caption 10 = the caption of its own source image, which is excluded: a miss
    # (nothing else has caption 10); query 1 asks for caption 20: its best match (image 1, after
    # the excluded image 0) has caption 20
    _, top = chunked_top_k(queries, gallery, 3, exclude=[0, 0])
    np.testing.assert_array_equal(top, [[1, 2, 3], [1, 2, 3]])
    r = M.recall_at_k(captions[top], np.array([10, 20]), ks=(1, 3))
    assert r == {"R@1": 0.5, "R@3": 0.5}

    # without exclusion the source image itself would have made query 0 a hit at rank 1 (and
    # pushed query 1's match to rank 2)
    _, top = chunked_top_k(queries, gallery, 3)
    hits = M.hits_at_k(captions[top], np.array([10, 20]), (1, 2))
    np.testing.assert_array_equal(hits[1], [True, False])
    np.testing.assert_array_equal(hits[2], [True, True])

    # a duplicate-caption hit: query asks for 20, image 1 (caption 20) is excluded as its source,
    # image 2 (another image with caption 20) still counts
    _, top = chunked_top_k(queries[:1], gallery, 2, exclude=[1])
    np.testing.assert_array_equal(top, [[0, 2]])
    assert M.recall_at_k(captions[top], np.array([20]), ks=(1, 2)) == {"R@1": 0.0, "R@2": 1.0}


def test_whm_formula_and_limits():
    ms, mt = 0.8, 0.4
    assert M.weighted_harmonic_mean(ms, mt, 0.0) == pytest.approx(mt)  # alpha 0: the test recall
    assert M.weighted_harmonic_mean(ms, mt, 1.0) == pytest.approx(2 * ms * mt / (ms + mt))  # harmonic mean
    assert M.weighted_harmonic_mean(ms, mt, 0.5) == pytest.approx(1.5 * 0.32 / (0.2 + 0.8))
    # large alpha approaches the training recall
    assert M.weighted_harmonic_mean(ms, mt, 1e9) == pytest.approx(ms, rel=1e-6)
    assert M.weighted_harmonic_mean(0.0, 0.0, 0.5) == 0.0
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        M.weighted_harmonic_mean(ms, mt, -0.1)


@pytest.mark.parametrize("ms, mt, expected", [
    (98.8, 96.5, 97.3),  # CSS, TIRG+GA
    (75.9, 52.3, 58.3),  # Fashion200k, TIRG+GA
    (53.2, 29.3, 34.5),  # MIT-States, TIRG
    (49.3, 29.7, 34.2),  # MIT-States, TIRG+GA
])
def test_whm_reproduces_the_papers_check_values(ms, mt, expected):
    # the paper's values (in percent) at alpha = 0.5, rounded to one decimal
    assert round(M.weighted_harmonic_mean(ms, mt, 0.5), 1) == expected
    # and on fractions, as the evaluator computes them
    assert round(100 * M.weighted_harmonic_mean(ms / 100, mt / 100, 0.5), 1) == expected
