"""Robustness evaluation (keras_irtf.evaluation.robustness): each perturbation pinned."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from keras_irtf.evaluation import robustness as R
from keras_irtf.experiment import robustness_run
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def trained(css_smoke_root, tmp_path_factory):
    """An undefended smoke model (L_CE only), trained enough to retrieve above chance."""
    from keras_irtf.experiment import Experiment
    from keras_irtf.training.loop import train

    out = tmp_path_factory.mktemp("rob") / "run"
    run, metrics = train(tiny_config(css_smoke_root, f"train.out={out}", "train.steps=100"), verbose=0)
    exp, model = Experiment.from_run(run, verbose=False)
    return run, metrics, exp.dataset, model, exp.vectorizer


def _robust(trained, levels, **kw):
    _, _, dataset, model, vectorizer = trained
    return R.evaluate_robustness(model, dataset, vectorizer, levels=levels, seed=0, verbose=False, **kw)


def test_clean_is_the_protocols_test_recall_and_noise_zero_is_clean(trained):
    _, metrics, *_ = trained
    r = _robust(trained, {"noise": (0.0,)}, input_grad=False)
    for k in ("R@1", "R@5", "R@10", "R@50"):
        assert r["clean"][k] == metrics["test"][k]
        assert r["noise"]["0"][k] == r["clean"][k]


def test_attacks_lower_recall_of_an_undefended_model_and_runs_repeat(trained):
    levels = {"fgsm": (8 / 255,), "pgd": (8 / 255,), "noise": (16 / 255,)}
    r = _robust(trained, levels)
    key = R.level_key("fgsm", 8 / 255)
    assert key == "0.0314" and set(r) >= {"clean", "fgsm", "pgd", "noise", "input_grad_l1", "input_grad_l2"}
    assert r["clean"]["R@1"] > 0.2
    assert r["fgsm"][key]["R@1"] < r["clean"]["R@1"]
    assert r["pgd"][key]["R@1"] < r["clean"]["R@1"]
    # the full-gallery cross-entropy rises under the attack, and the gradient is finite, non-zero
    assert r["input_grad_l1"] > 0 and 0 < r["input_grad_l2"] <= r["input_grad_l1"]
    again = _robust(trained, levels)
    assert json.dumps(again, sort_keys=True) == json.dumps(r, sort_keys=True)  # seeded: identical


def test_gaussian_noise_has_its_sigma_and_is_clipped():
    u = tf.fill([4, 32, 32, 3], 0.5)
    x = R.gaussian_noise(u, 0.05, [1, 2]).numpy() - 0.5
    np.testing.assert_allclose(x.std(), 0.05, rtol=0.05)
    assert abs(x.mean()) < 0.005
    np.testing.assert_array_equal(R.gaussian_noise(u, 0.05, [1, 2]), R.gaussian_noise(u, 0.05, [1, 2]))
    edge = R.gaussian_noise(tf.ones([2, 8, 8, 3]), 0.5, [0, 1]).numpy()
    assert edge.max() <= 1.0 and edge.min() >= 0.0 and edge.min() < 1.0
    np.testing.assert_array_equal(R.gaussian_noise(u, 0.0, [1, 2]), u)


def test_jpeg_loses_more_at_lower_quality():
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.random((2, 8, 8, 3)), np.ones((1, 4, 4, 1)))  # 32x32, blocky
    u = tf.constant(smooth + 0.05 * rng.random(smooth.shape), tf.float32)
    err = {q: float(np.abs(R.jpeg_reencode(u, q).numpy() - u.numpy()).mean()) for q in (90, 50, 20)}
    assert 0 < err[90] < err[50] < err[20]
    assert R.jpeg_reencode(u, 90).shape == u.shape


def test_text_perturbations_do_what_they_say():
    texts = ["make top-left object red", "remove middle-center object", "red", "a b"]
    dropped = R.perturb_texts(texts, "drop_word", seed=3)
    for t, d in zip(texts, dropped):
        w, dw = t.split(), d.split()
        if len(w) < 2:
            assert d == t
            continue
        assert len(dw) == len(w) - 1
        assert any(w[:i] + w[i + 1:] == dw for i in range(len(w)))  # exactly one word removed
    swapped = R.perturb_texts(texts, "swap_words", seed=3)
    for t, s in zip(texts, swapped):
        w, sw = t.split(), s.split()
        assert sorted(w) == sorted(sw)
        if len(w) >= 2:
            diff = [i for i in range(len(w)) if w[i] != sw[i]]
            assert len(diff) == 2 and w[diff[0]] == sw[diff[1]] and w[diff[1]] == sw[diff[0]]
        else:
            assert s == t
    np.testing.assert_array_equal(dropped, R.perturb_texts(texts, "drop_word", seed=3))
    many = R.perturb_texts(["one two three four five six"] * 200, "drop_word", seed=0)
    assert len(set(many)) == 6  # every word gets dropped sometimes (the draw is uniform)


def test_text_perturbation_changes_recall_inputs(trained):
    r = _robust(trained, {"text": ("drop_word", "swap_words")}, input_grad=False)
    for how in ("drop_word", "swap_words"):
        assert r["text"][how]["changed"] > 0.9  # CSS texts have several words
        assert 0.0 <= r["text"][how]["R@1"] <= 1.0


def test_evaluate_tool_writes_robustness_json(trained, tmp_path):
    run = trained[0]
    r = subprocess.run([sys.executable, "tools/evaluate.py", "--run", str(run), "--robustness",
                        "--robustness-kinds", "noise,jpeg", "--quiet"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    saved = json.loads((run / "robustness.json").read_text())
    assert set(saved["noise"]) == {"0.00784", "0.0157", "0.0314", "0.0627"}
    assert set(saved["jpeg"]) == {"90", "50", "20"}
    assert "| noise | 0.0314 |" in r.stdout and "input_grad_l1" in saved


@pytest.mark.slow
def test_robustness_with_frozen_bert_and_composeae(css_smoke_root, tmp_path_factory):
    """BERT text (cached embeddings): the text perturbations act on the raw strings, whose new
    texts join the cache; the attacks differentiate through ComposeAE."""
    from keras_irtf.data.text_cache import texts_of_run
    from keras_irtf.data.css import CSSDataset
    from keras_irtf.testing.tiny_bert import make_tiny_keras_hub_bert
    from keras_irtf.training.loop import train

    texts = texts_of_run(CSSDataset(css_smoke_root, verbose=False))
    preset = make_tiny_keras_hub_bert(tmp_path_factory.mktemp("kh") / "preset", texts, hidden_size=24)
    out = tmp_path_factory.mktemp("bert") / "run"
    cfg = tiny_config(css_smoke_root, "model.text_encoder=bert_keras_hub", f"model.text_encoder.preset={preset}",
                      "model.text_encoder.dim=24", "model.text_encoder.seq_length=32", "model.composer=composeae",
                      "train.steps=3", "train.steps_per_epoch=3", "data.train_recall_queries=16", f"train.out={out}")
    run, metrics = train(cfg, verbose=0)
    r = robustness_run(run, levels={"text": ("drop_word",), "fgsm": (4 / 255,)}, verbose=False)
    assert r["clean"]["R@1"] == pytest.approx(metrics["test"]["R@1"], abs=1e-6)
    assert r["text"]["drop_word"]["changed"] > 0.9 and "0.0157" in r["fgsm"]
    assert (run / "robustness.json").is_file()


def test_apgd_checkpoints_follow_the_papers_schedule():
    assert R.apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    assert R.apgd_checkpoints(50) == [0, 11, 21, 29, 35, 40, 44, 47, 50]


def test_apgd_is_at_least_as_strong_as_pgd_and_zero_eps_is_clean(trained):
    eps = 4 / 255
    r = _robust(trained, {"pgd": (eps,), "apgd": (0.0, eps)}, input_grad=False, apgd_steps=20)
    key = R.level_key("apgd", eps)
    # an eps of 0 leaves every query image as it was: both APGD runs stay at the clean point
    assert r["apgd"]["0"] == r["clean"]
    # APGD (the worse of its cross-entropy and DLR runs per query) beats PGD-10 on the same model
    assert r["apgd"][key]["R@1"] <= r["pgd"][key]["R@1"] < r["clean"]["R@1"]
    assert r["apgd"][key]["R@10"] <= r["clean"]["R@10"]
    assert r["settings"]["apgd_steps"] == 20


def test_apgd_on_a_fixed_subset_of_queries(trained):
    first = R.apgd_subset(2400, 800)
    assert len(first) == 800 and len(set(first)) == 800 and (np.diff(first) > 0).all() and first.max() < 2400
    np.testing.assert_array_equal(first, R.apgd_subset(2400, 800))  # the same queries for every model
    assert R.apgd_subset(2400, None) is None and R.apgd_subset(30, 800) is None
    _, _, dataset, _, _ = trained
    n = len(dataset.test.test_queries)
    r = _robust(trained, {"apgd": (0.0, 4 / 255)}, input_grad=False, apgd_steps=5, apgd_queries=n // 2)
    assert r["settings"]["apgd_queries"] == n // 2 and r["settings"]["apgd_queries_asked"] == n // 2
    # at eps 0 the attacked subset's recall is that subset's clean recall, which is reported
    assert r["apgd"]["0"] == r["apgd_subset_clean"] != r["clean"]
    assert r["apgd"][R.level_key("apgd", 4 / 255)]["R@1"] <= r["apgd_subset_clean"]["R@1"]
    table = R.format_robustness(r)
    assert f"| clean, APGD's {n // 2} queries |" in table
    eps0 = next(line for line in table.splitlines() if line.startswith("| apgd | 0 |"))
    assert eps0.endswith("| +0.0 |")  # its drop is from the attacked queries' own clean recall
