"""evaluate_split's ranking stage: backends agree, the source image is excluded, and a gallery
with fewer eligible images than K never produces a false hit."""

import numpy as np
import pytest

from keras_irtf.evaluation import protocol as evaluation
from keras_irtf.data.base import Queries, Split
from keras_irtf.evaluation.retrieval import faiss_available


class TinyDataset:
    """Three test images; image 2 has the caption every query asks for."""

    def __init__(self):
        self.test = Split(name="test", captions=["a", "b", "c"], caption_ids=np.array([0, 1, 2]),
                          caption_vocab=["a", "b", "c"])

    def extra_recalls(self):
        return {}


@pytest.fixture
def fixed_embeddings(monkeypatch):
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], np.float32)
    queries = np.array([[1.0, 0.1], [1.0, 0.1]], np.float32)
    monkeypatch.setattr(evaluation, "embed_gallery", lambda *a, **k: gallery)
    monkeypatch.setattr(evaluation, "embed_query_set", lambda *a, **k: queries)


@pytest.mark.parametrize("backend", ["tf", pytest.param("faiss", marks=pytest.mark.skipif(
    not faiss_available(), reason="faiss-cpu is not installed (optional extra keras_irtf[faiss])"))])
def test_small_gallery_excluded_source_is_not_a_hit(fixed_embeddings, backend):
    # query 0's source is image 2 (the only one with the target caption 2): excluded, so a miss
    # at every K (its empty third place holds index -1, which must not map to an image: read as
    # the last gallery image it would be a false hit at K = 3);
    # query 1's source is image 0 (excluded): image 1 comes first, image 2 second
    queries = Queries(np.array([2, 0]), np.array(["x", "y"], dtype=object), np.array([2, 2]), np.array([2, 2]))
    r = evaluation.evaluate_split(None, TinyDataset(), None, "test", queries, ks=(1, 2, 3, 5), verbose=False,
                                  backend=backend)
    assert r == {"R@1": 0.0, "R@2": 0.5, "R@3": 0.5, "R@5": 0.5}
