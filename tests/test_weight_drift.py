"""tools/weight_drift.py and keras_irtf.training.drift: the drift between two runs' weights, and
the drift the authors' GA^I push predicts (checked against Keras' SGD and against the push the
training step adds)."""

import json

import keras
import numpy as np
import pytest

from keras_irtf import api
from keras_irtf.training import drift as D

PUSH = ["ga.methods=isotropic", "ga.mode=reference", "ga.isotropic.reference_terms=push", "ga.isotropic.gamma=0.01"]


def test_the_momentum_sum_is_what_keras_sgd_does_under_a_constant_gradient():
    from keras_irtf.config import load_config, repo_configs_dir

    cfg = load_config([repo_configs_dir() / "css.yaml"], ["optim.decay_steps=[7]", "optim.decay_factor=0.1"])
    steps, g = 12, 0.3
    rates = D.learning_rates(cfg, steps)
    # Keras' schedule: iterations 0 .. 7 (the first 8 steps) at the base rate, then a tenth of it
    assert np.allclose(rates[:8], 0.01) and np.allclose(rates[8:], 0.001)  # float32, as the optimizer has them
    w = keras.Variable(np.zeros(3, np.float32))
    opt = keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
    for lr in rates:
        opt.learning_rate = float(lr)  # one optimizer throughout: its momentum carries over
        opt.apply_gradients([(keras.ops.full((3,), g), w)])
    moved = -g * D.momentum_displacement(rates, 0.9)
    np.testing.assert_allclose(w.numpy(), moved, rtol=1e-5)
    assert moved < -g * rates.sum()  # momentum carries it further than plain SGD
    assert D.momentum_displacement(rates, 0.0) == pytest.approx(rates.sum())
    assert D.momentum_displacement([], 0.9) == 0.0


def _model(cfg):
    keras.utils.set_random_seed(0)
    return api.create_model(cfg, 40, compile=True)


def test_the_predicted_push_is_the_one_the_training_step_adds():
    """push_gradients is the constant GA^I's reference mode adds to each variable's gradient."""
    from conftest import tiny_config

    cfg = tiny_config(None, *PUSH)
    model = _model(cfg)
    variables = list(model.trainable_variables)
    sizes = [max(int(np.prod(v.shape)), 1) for v in variables]
    expected = D.push_gradients(cfg, sizes)
    noises, _ = model.gradient_augmentation.isotropic_noise(variables)
    for v, noise, c in zip(variables, noises, expected):
        np.testing.assert_allclose(noise.numpy(), np.full(v.shape, c), rtol=1e-6, err_msg=v.path)
    assert expected[0] == pytest.approx(0.01 * len(variables) / sizes[0])
    # the paper's mode, or no GA^I, has no push
    assert D.push_gradients(tiny_config(None, "ga.methods=isotropic"), sizes) is None
    assert D.push_gradients(tiny_config(None, "ga.methods=adversarial"), sizes) is None
    assert D.push_drift(tiny_config(None, *PUSH, "optim.optimizer=adam"), sizes, 10) is None


def test_weight_drift_finds_the_variable_that_moved_and_refuses_another_architecture():
    from conftest import tiny_config

    cfg = tiny_config(None)
    base, run = _model(cfg), _model(cfg)
    target = run.trainable_variables[3]
    target.assign(target + 0.25)
    rows = D.weight_drift(base, run)
    moved = [r for r in rows if abs(r["drift"]) > 1e-9]
    assert [r["k"] for r in moved] == [3] and moved[0]["drift"] == pytest.approx(0.25, rel=1e-5)
    assert moved[0]["rms"] == pytest.approx(0.25, rel=1e-5) and moved[0]["path"] == target.path
    assert {r["kind"] for r in rows} >= {"kernel", "bias", "normalization", "logit_scale"}
    assert "push_drift" not in rows[0]
    other = _model(tiny_config(None, "model.embed_dim=32"))
    with pytest.raises(ValueError, match="the two models differ"):
        D.weight_drift(base, other)


def test_the_tool_compares_two_run_folders(css_smoke_root, tmp_path, capsys):
    from conftest import load_tool, tiny_config

    cfg_base = tiny_config(css_smoke_root)
    cfg_run = tiny_config(css_smoke_root, *PUSH)
    bench = api.load_benchmark(cfg_base)
    base = api.create_model(cfg_base, bench, compile=False)
    run = api.create_model(cfg_run, bench, compile=False)
    run.set_weights(base.get_weights())
    bn_gamma = next(v for v in run.trainable_variables if v.path.endswith("bn0/gamma"))
    bn_gamma.assign(bn_gamma - 2.0)
    api.save_run(base, cfg_base, bench, tmp_path / "base")
    api.save_run(run, cfg_run, bench, tmp_path / "run", metrics={"steps": 100})
    tool = load_tool("weight_drift")
    assert tool.main([str(tmp_path / "base"), str(tmp_path / "run"), "--top", "3", "--json",
                      str(tmp_path / "d.json")]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[4]  # caption, blank line, header, rule, then the largest drift
    assert first.startswith("| image_encoder/bn0/gamma | 1 | normalization | image_encoder |") and "| -2 |" in first
    saved = json.loads((tmp_path / "d.json").read_text())
    row = next(r for r in saved["variables"] if r["path"].endswith("bn0/gamma"))
    n, size = len(saved["variables"]), row["size"]
    # 100 steps of lr 0.01, momentum 0.9, gradient gamma (N - k) / size
    assert row["push_drift"] == pytest.approx(-0.01 * (n - 1) / size * D.momentum_displacement([0.01] * 100, 0.9))
    assert "| normalization |" in out.split("| kind |")[1]
    assert tool.main([str(tmp_path / "base"), str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
