"""TIRG's protocols where keras_irtf used to differ: the CSS training sampler and the CSS
training recall Ms (issue 14, item 3)."""

import numpy as np
import pytest

from keras_irtf.config import ConfigError
from keras_irtf.data.css import CSSDataset
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def css_fresh(css_smoke_root):
    return CSSDataset(css_smoke_root, verbose=False)


def _records(ds):
    return ds._records["train"]


def _first_queries(ds, sampler, pairs, seed=0):
    ds.sampler = sampler
    q = ds.sample_training_queries(2 * pairs, np.random.default_rng(seed), paired=True)
    ds.sampler = "reference"
    return q


def _index_of(ds, q):
    """Training-query index of every sampled query (source, text, target identify it)."""
    mods = ds._mods["train"]
    key = {(s, t, g): i for i, (s, t, g) in enumerate(zip(mods.source_ids, mods.texts, mods.target_ids))}
    return np.array([key[(s, t, g)] for s, t, g in zip(q.source_ids, q.texts, q.target_ids)])


def test_reference_sampler_draws_a_record_then_a_pair(css_fresh):
    """TIRG: the first query of a pair picks a modification record uniformly, then a pair in it."""
    assert css_fresh.sampler == "reference"  # the default
    pairs = 20000
    q = _first_queries(css_fresh, "reference", pairs)
    idx = _index_of(css_fresh, q)
    rec = _records(css_fresh)
    first = rec[idx[0::2]]
    records = np.unique(rec)
    freq = np.array([(first == r).mean() for r in records])
    p = 1.0 / len(records)
    assert np.abs(freq - p).max() < 4.5 * np.sqrt(p * (1 - p) / pairs)
    # within a record, its pairs are equally likely
    big = records[np.argmax([(rec == r).sum() for r in records])]
    members = np.flatnonzero(rec == big)
    if len(members) > 1:
        picks = idx[0::2][first == big]
        counts = np.array([(picks == m).sum() for m in members]) / len(picks)
        pm = 1.0 / len(members)
        assert np.abs(counts - pm).max() < 4.5 * np.sqrt(pm * (1 - pm) / len(picks))
    # the second query: the same source with another record whenever the source has one
    second = idx[1::2]
    same_source = q.source_ids[0::2] == q.source_ids[1::2]
    other_record = rec[idx[0::2]] != rec[second]
    by_source = css_fresh._by_source["train"]
    has_other = np.array([len({int(rec[o]) for o in by_source[int(s)]}) > 1 for s in q.source_ids[0::2]])
    assert (same_source & other_record)[has_other].all()


def test_uniform_pairs_sampler_is_the_former_behaviour(css_fresh):
    pairs = 20000
    q = _first_queries(css_fresh, "uniform_pairs", pairs)
    idx = _index_of(css_fresh, q)[0::2]
    n = len(css_fresh._mods["train"])
    freq = np.bincount(idx, minlength=n) / pairs
    p = 1.0 / n
    assert np.abs(freq - p).max() < 4.5 * np.sqrt(p * (1 - p) / pairs)


def test_the_two_samplers_give_different_mixes_of_modification_kinds(css_fresh):
    """Records of "remove <cell> object" hold many pairs, "add <object> to <cell>" few: TIRG's
    record-first draw therefore asks for additions more often than the uniform draw."""

    def share(sampler, kind):
        q = _first_queries(css_fresh, sampler, 5000)
        return np.mean([t.startswith(kind) for t in q.texts[0::2]])

    assert share("reference", "add") > share("uniform_pairs", "add") + 0.05


def test_sampler_is_seeded_and_configurable(css_smoke_root):
    from keras_irtf.data import load_dataset

    a = load_dataset(tiny_config(css_smoke_root), verbose=False)
    assert a.sampler == "reference"
    q1 = a.sample_training_queries(100, np.random.default_rng(3))
    q2 = a.sample_training_queries(100, np.random.default_rng(3))
    np.testing.assert_array_equal(q1.target_ids, q2.target_ids)
    b = load_dataset(tiny_config(css_smoke_root, "data.dataset.sampler=uniform_pairs"), verbose=False)
    assert b.sampler == "uniform_pairs"
    with pytest.raises(ConfigError, match="data.dataset.sampler"):
        load_dataset(tiny_config(css_smoke_root, "data.dataset.sampler=bogus"), verbose=False)


def test_css_training_recall_ranks_every_training_query_against_every_training_image(css_fresh):
    """Ms on CSS as TIRG's test() on the training split: all training queries, gallery = all
    training images with the source excluded; checked against a brute-force numpy ranking."""
    from keras_irtf.data.text import TextVectorizer
    from keras_irtf.evaluation.protocol import embed_gallery, embed_query_set, evaluate_split
    from keras_irtf.experiment import build_model

    cfg = tiny_config(None)
    vec = TextVectorizer.from_texts(css_fresh.training_texts(), 16)
    model = build_model(cfg, vec.vocab_size)
    queries = css_fresh.train_recall_queries(10, 0)
    assert len(queries) == len(css_fresh._mods["train"])  # every training query, not a sample
    ks = (1, 5, 10)
    got = evaluate_split(model, css_fresh, vec, "train", queries, ks=ks, preprocessor=64, verbose=False)
    split = css_fresh.train
    g = embed_gallery(model, split, np.arange(split.num_images), verbose=False)
    qe = embed_query_set(model, split, queries, vec, verbose=False)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    qe = qe / np.linalg.norm(qe, axis=1, keepdims=True)
    scores = qe.astype(np.float64) @ g.T.astype(np.float64)
    scores[np.arange(len(queries)), queries.source_ids] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")
    retrieved = split.caption_ids[order]
    for k in ks:
        expected = np.mean((retrieved[:, :k] == queries.target_captions[:, None]).any(1))
        assert got[f"R@{k}"] == pytest.approx(expected)
    assert split.num_images > len(np.unique(queries.target_ids))  # a larger gallery than the targets


def test_other_datasets_keep_the_sampled_training_recall():
    from keras_irtf.data.base import RetrievalDataset
    from keras_irtf.data.fashion200k import Fashion200kDataset
    from keras_irtf.data.mitstates import MITStatesDataset

    assert RetrievalDataset.train_recall_gallery == "targets"
    assert MITStatesDataset.train_recall_gallery == "targets"
    assert Fashion200kDataset.train_recall_gallery == "targets"
    assert CSSDataset.train_recall_gallery == "split"
