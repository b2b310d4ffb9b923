"""The mathematics of gradient augmentation, each checked against an independent computation."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from ga_tiny import tiny_batch, tiny_model
from keras_irtf.model.gradient_augmentation import GradientAugmentation, dual_norm, per_example_norm


# ---- independent reference computations (plain TF, not keras_irtf.losses) ---------------------
def _l2n(x, scale):
    return scale * x / tf.sqrt(tf.reduce_sum(x * x, axis=-1, keepdims=True))


def _per_example_losses(model, batch, eta=0.0, overrides=None):
    """l_i = softmax CE of query i against the batch's targets (+ eta ||q_i - t_i||^2), with any
    intermediate tensor replaced by `overrides` (name -> tensor)."""
    o = overrides or {}
    scale = model.normalization.scale
    x = o.get("input", batch["source_image"])
    f_img = o.get("image_feature", model.image_encoder(x))
    f_txt = o.get("text_feature", model.text_encoder(batch["text"]))
    f_comp = o.get("composed", model.composer([f_img, f_txt]))
    q = _l2n(f_comp, scale)
    t = _l2n(model.image_encoder(batch["target_image"]), scale)
    logits = tf.matmul(q, t, transpose_b=True)
    ce = tf.reduce_logsumexp(logits, axis=1) - tf.linalg.diag_part(logits)
    ls = tf.reduce_sum(tf.square(q - t), axis=1)
    return ce + eta * ls, {"input": x, "image_feature": f_img, "text_feature": f_txt, "composed": f_comp}


def _independent_penalty(model, batch, point, eps, q, eta=0.0):
    """eps * mean_i ||d l_i / d x_i||_q, one example's loss at a time."""
    _, feats = _per_example_losses(model, batch, eta)
    x = tf.identity(feats[point])
    norms = []
    for i in range(x.shape[0]):
        with tf.GradientTape() as tape:
            tape.watch(x)
            losses, _ = _per_example_losses(model, batch, eta, {point: x})
            li = losses[i]
        g = tape.gradient(li, x).numpy()
        others = np.delete(g, i, axis=0)
        assert np.abs(others).max() < 1e-12  # example i's loss does not see the other x_j
        gi = g[i].ravel()
        norms.append(np.abs(gi).sum() if q == 1 else np.sqrt((gi**2).sum()))
    return eps * float(np.mean(norms))


# ---- norms ------------------------------------------------------------------------------------
def test_dual_norm():
    assert dual_norm("inf") == 1.0
    assert dual_norm(2) == 2.0
    assert dual_norm(1) == float("inf")
    assert dual_norm(3) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="attack norm"):
        dual_norm(0.5)


@pytest.mark.parametrize("q", [1.0, 2.0, float("inf"), 3.0])
def test_per_example_norm_matches_numpy(q, rng):
    x = rng.normal(size=(5, 2, 3, 4))
    got = per_example_norm(tf.constant(x), q).numpy()
    want = np.linalg.norm(x.reshape(5, -1), ord=q, axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-9)


# ---- adversarial GA ---------------------------------------------------------------------------
@pytest.mark.parametrize("attack_norm,q", [("inf", 1), ("2", 2)])
@pytest.mark.parametrize("point", ["input", "composed"])
def test_penalty_value_matches_independent_per_example_norms(attack_norm, q, point):
    eps = 0.37
    model = tiny_model("adversarial", eps=eps, attack_norm=attack_norm, point=point, eta=0.01)
    batch = tiny_batch()
    terms = model.compute_loss_terms(batch, training=True)
    want = _independent_penalty(model, batch, point, eps, q, eta=0.01)
    assert want > 1e-3
    np.testing.assert_allclose(float(terms["ga_adversarial"]), want, rtol=1e-9)
    # the total is the main loss plus the penalty
    np.testing.assert_allclose(
        float(terms["loss"]),
        float(terms["retrieval_loss"]) + 0.01 * float(terms["similarity_loss"]) + want, rtol=1e-9,
    )


def test_reference_mode_coefficient():
    """The authors' code: eps * d^(1 - 1/q) / 2 with d the elements of one example's x."""
    batch = tiny_batch()
    paper = tiny_model("adversarial", eps=0.1, attack_norm="2")
    ref = tiny_model("adversarial", eps=0.1, attack_norm="2", mode="reference")
    p = float(paper.compute_loss_terms(batch)["ga_adversarial"])
    r = float(ref.compute_loss_terms(batch)["ga_adversarial"])
    d = 3 * 3 * 3
    np.testing.assert_allclose(r / p, d**0.5 / 2, rtol=1e-9)


def _loss_and_grads(model, batch):
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        loss = model.compute_loss_terms(batch, training=True)["loss"]
    return loss, tape.gradient(loss, variables), variables


@pytest.mark.parametrize(
    "point,attack_norm", [("input", "2"), ("input", "inf"), ("image_feature", "2"), ("text_feature", "2"),
                          ("composed", "2")]
)
def test_penalised_gradient_matches_finite_differences(point, attack_norm):
    """Double backprop: d(L + eps ||dL/dx||_q)/dtheta equals central differences (float64)."""
    model = tiny_model("adversarial", eps=2.0, attack_norm=attack_norm, point=point, eta=0.05)
    batch = tiny_batch()
    _, grads, variables = _loss_and_grads(model, batch)
    plain = tiny_model("", eta=0.05)
    plain.set_weights(model.get_weights())
    _, plain_grads, _ = _loss_and_grads(plain, batch)
    loss_fn = tf.function(lambda: model.compute_loss_terms(batch, training=True)["loss"])
    rng = np.random.default_rng(1)
    h = 1e-6
    checked, penalty_share = 0, []
    for v, g, pg in zip(variables, grads, plain_grads):
        if g is None:
            continue
        g = tf.convert_to_tensor(g).numpy().ravel()
        pg = tf.convert_to_tensor(pg).numpy().ravel()
        for idx in rng.choice(g.size, size=min(3, g.size), replace=False):
            base = v.numpy()
            flat = base.ravel().copy()
            values = []
            for sign in (1.0, -1.0):
                flat[idx] = base.ravel()[idx] + sign * h
                v.assign(flat.reshape(base.shape))
                values.append(float(loss_fn()))
            v.assign(base)
            fd = (values[0] - values[1]) / (2 * h)
            np.testing.assert_allclose(g[idx], fd, rtol=1e-5, atol=1e-8, err_msg=f"{v.path}[{idx}]")
            penalty_share.append(abs(g[idx] - pg[idx]))
            checked += 1
    assert checked >= 15
    # the penalty's own gradient (second-order term) is a visible part of what was checked
    assert max(penalty_share) > 1e-3


def test_all_weights_zero_is_the_plain_step():
    """The real TIRG (batch norm included) with GA^A (eps 0) and GA^I (gamma 0) switched on: one
    step gives the plain step's weights; with eps > 0 it does not (so the comparison can fail)."""
    from conftest import tiny_config
    from keras_irtf.experiment import build_model, make_optimizer

    smoke_config = tiny_config()

    def make(methods, eps=0.0, gamma=0.0):
        cfg = smoke_config.copy()
        cfg.ga.methods, cfg.ga.adversarial.eps, cfg.ga.isotropic.gamma = methods, eps, gamma
        cfg.model.text_encoder.dropout = 0.0
        model = build_model(cfg, vocab_size=20)
        model.compile(optimizer=make_optimizer(cfg))
        return model

    s = smoke_config.data.image_size
    rng = np.random.default_rng(0)
    batch = {
        "source_image": tf.constant(rng.normal(size=(8, s, s, 3)), tf.float32),
        "text": tf.constant(rng.integers(1, 20, size=(8, smoke_config.model.max_text_length)), tf.int32),
        "target_image": tf.constant(rng.normal(size=(8, s, s, 3)), tf.float32),
    }
    plain = make("")
    start = plain.get_weights()
    zero = make("adversarial,isotropic")
    zero.set_weights(start)
    on = make("adversarial,isotropic", eps=1.0, gamma=1e-2)
    on.set_weights(start)
    for m in (plain, zero, on):
        m.train_step(batch)
    changed = max(np.abs(a - b).max() for a, b in zip(plain.get_weights(), start))
    assert changed > 1e-4  # the step did move the weights
    for a, b in zip(plain.get_weights(), zero.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert max(np.abs(a - b).max() for a, b in zip(plain.get_weights(), on.get_weights())) > 1e-5


# ---- isotropic GA -----------------------------------------------------------------------------
def _draws(ga, variables, n):
    """[n, total size] noise draws (one compiled call per draw, as in training)."""
    draw = tf.function(lambda: tf.concat([tf.reshape(x, [-1]) for x in ga.isotropic_noise(variables)[0]], 0))
    return np.stack([draw().numpy() for _ in range(n)])


def test_isotropic_noise_is_isotropic_with_the_specified_scale():
    gamma = 0.3
    ga = GradientAugmentation("isotropic", gamma=gamma, noise_scaling="per_element", seed=3)
    variables = [tf.Variable(np.zeros((2, 3), np.float32)), tf.Variable(np.zeros((4,), np.float32))]
    x = _draws(ga, variables, 3000) / gamma  # [draws, 10]: should be N(0, I)
    n, d = x.shape
    assert np.abs(x.mean(0)).max() < 4.5 / np.sqrt(n)  # zero mean
    cov = np.cov(x, rowvar=False)
    np.testing.assert_allclose(np.diag(cov), 1.0, atol=0.1)  # the scale: std gamma per element
    assert np.abs(cov - np.diag(np.diag(cov))).max() < 0.1  # uncorrelated elements
    # no preferred direction: the projections on random unit directions have the same spread
    dirs = np.random.default_rng(0).normal(size=(d, 20))
    dirs /= np.linalg.norm(dirs, axis=0)
    spread = (x @ dirs).std(0)
    assert spread.max() / spread.min() < 1.15
    # the squared norm follows chi^2_d: mean d
    assert abs((x**2).sum(1).mean() - d) < 0.3


def test_mean_scaling_divides_by_the_variable_size():
    ga = GradientAugmentation("isotropic", gamma=0.5, noise_scaling="mean", seed=1)
    variables = [tf.Variable(np.zeros((10, 10), np.float32)), tf.Variable(np.zeros((2,), np.float32))]
    x = _draws(ga, variables, 1000)
    big, small = x[:, :100], x[:, 100:]
    np.testing.assert_allclose(big.std(), 0.5 / 100, rtol=0.05)
    np.testing.assert_allclose(small.std(), 0.5 / 2, rtol=0.05)


def test_noise_is_fresh_every_step_and_repeats_under_a_seed():
    variables = [tf.Variable(np.zeros((5,), np.float32))]

    def sequence(seed, compiled):
        ga = GradientAugmentation("isotropic", gamma=1.0, noise_scaling="per_element", seed=seed)
        fn = tf.function(lambda: ga.isotropic_noise(variables)[0][0]) if compiled else (
            lambda: ga.isotropic_noise(variables)[0][0])
        return np.stack([fn().numpy() for _ in range(3)])

    a = sequence(7, compiled=True)
    assert np.abs(a[0] - a[1]).min() > 0 and np.abs(a[1] - a[2]).min() > 0  # fresh every call
    np.testing.assert_array_equal(a, sequence(7, compiled=True))  # same seed, same sequence
    np.testing.assert_array_equal(a, sequence(7, compiled=False))
    assert np.abs(a - sequence(8, compiled=True)).min() > 0


def test_noise_is_fresh_between_training_steps():
    """Inside the compiled train_step, two steps from the same weights get different updates."""
    model = tiny_model("isotropic", gamma=0.1, noise_scaling="per_element", dtype="float32")
    model.compile(optimizer=keras.optimizers.SGD(1.0))
    batch = tiny_batch(dtype="float32")
    variables = model.trainable_variables
    start = [v.numpy() for v in variables]
    step = tf.function(model.train_step)
    step(batch)
    first = [v.numpy() - s for v, s in zip(variables, start)]
    for v, s in zip(variables, start):  # same weights again; the noise generator moves on
        v.assign(s)
    step(batch)
    second = [v.numpy() - s for v, s in zip(variables, start)]
    diff = max(np.abs(a - b).max() for a, b in zip(first, second))
    assert diff > 1e-3


def test_reference_mode_isotropic_noise_has_the_authors_departures():
    """Authors' code: parameter k of N gets gamma * (N - k) * (n + 1) / size: mean gamma (N - k)/size."""
    gamma = 0.2
    ga = GradientAugmentation("isotropic", gamma=gamma, mode="reference", seed=0)
    variables = [tf.Variable(np.zeros((4,), np.float32)), tf.Variable(np.zeros((2, 2), np.float32)),
                 tf.Variable(np.zeros((8,), np.float32))]
    draws = _draws(ga, variables, 2000)
    offsets = np.cumsum([0] + [int(np.prod(v.shape)) for v in variables])
    for k, v in enumerate(variables):
        x = draws[:, offsets[k]:offsets[k + 1]]
        size = int(np.prod(v.shape))
        scale = gamma * (len(variables) - k) / size
        np.testing.assert_allclose(x.mean(), scale, rtol=0.05)
        np.testing.assert_allclose(x.std(), scale, rtol=0.05)


def _updates_from_noise(methods_kw, steps=25):
    """The part of the weight update that the isotropic term adds, as it reaches the optimizer:
    (update of the GA model) - (update of the same model without GA), from the same weights and
    batch, SGD with learning rate 1 and no momentum, so the difference is -noise."""
    batch = tiny_batch(dtype="float32")
    plain = tiny_model("", dtype="float32", seed=0)
    iso = tiny_model("isotropic", dtype="float32", seed=0, **methods_kw)
    for m in (plain, iso):
        m.compile(optimizer=keras.optimizers.SGD(1.0))
    start = [v.numpy() for v in plain.trainable_variables]
    steps_fn = {id(m): tf.function(m.train_step) for m in (plain, iso)}
    out = []
    for _ in range(steps):
        deltas = {}
        for m in (plain, iso):
            for v, s in zip(m.trainable_variables, start):
                v.assign(s)
            steps_fn[id(m)](batch)
            deltas[id(m)] = [v.numpy() - s for v, s in zip(m.trainable_variables, start)]
        out.append([a - b for a, b in zip(deltas[id(iso)], deltas[id(plain)])])
    sizes = [int(np.prod(s.shape)) for s in start]
    # [steps, variable] -> per variable, all steps' elements
    return [np.stack([o[k] for o in out]).reshape(steps, -1) for k in range(len(sizes))], sizes


def test_noise_reaches_the_optimizer_with_its_specified_scale():
    """The noise as the optimizer applies it: a wrong factor anywhere between the draw and
    optimizer.apply (x10 in train_step, a lost division) changes this standard deviation."""
    gamma = 0.05
    per_var, sizes = _updates_from_noise({"gamma": gamma, "noise_scaling": "per_element"})
    x = np.concatenate([p.ravel() for p in per_var]) / gamma
    assert x.size > 5000
    np.testing.assert_allclose(x.std(), 1.0, rtol=0.05)
    assert abs(x.mean()) < 4.5 / np.sqrt(x.size)


def test_mean_scaled_noise_reaches_the_optimizer_divided_by_the_variable_size():
    gamma = 0.5
    per_var, sizes = _updates_from_noise({"gamma": gamma, "noise_scaling": "mean"})
    x = np.concatenate([p.ravel() * size / gamma for p, size in zip(per_var, sizes)])
    np.testing.assert_allclose(x.std(), 1.0, rtol=0.05)
    # and each variable by its own size (the largest ones have enough elements to tell)
    for p, size in zip(per_var, sizes):
        if p.size >= 1000:
            np.testing.assert_allclose(p.std() * size / gamma, 1.0, rtol=0.1)


def test_fused_normals_have_the_standard_normal_distribution():
    """The one-draw-per-step sampler (Box-Muller over one uniform draw) against N(0, 1):
    moments, tail probabilities, independence of the two members of a Box-Muller pair, of
    neighbours and across variables, odd total sizes; and against keras.random.normal."""
    from keras_irtf.model.gradient_augmentation import fused_standard_normals

    shapes = [(301, 7), (5,), (3, 3, 2)]  # 2,130 elements (the split point falls inside shape 0)
    gen = keras.random.SeedGenerator(11)
    draw = tf.function(lambda: tf.concat([tf.reshape(x, [-1]) for x in fused_standard_normals(shapes, gen)], 0))
    x = np.stack([draw().numpy() for _ in range(300)])  # [draws, 2130]
    assert [tuple(t.shape) for t in fused_standard_normals(shapes, gen)] == shapes
    z = x.ravel()
    n = z.size
    assert abs(z.mean()) < 4.5 / np.sqrt(n)
    np.testing.assert_allclose(z.std(), 1.0, atol=4.5 * np.sqrt(2.0 / n))
    np.testing.assert_allclose(((z - z.mean()) ** 4).mean() / z.var() ** 2, 3.0, atol=0.05)  # kurtosis
    for k, p in ((1.0, 0.682689), (2.0, 0.954500), (3.0, 0.997300)):
        np.testing.assert_allclose((np.abs(z) < k).mean(), p, atol=4.5 * np.sqrt(p * (1 - p) / n))
    ref = keras.random.normal((n,), seed=3).numpy()
    np.testing.assert_allclose(np.quantile(z, [0.01, 0.1, 0.5, 0.9, 0.99]),
                               np.quantile(ref, [0.01, 0.1, 0.5, 0.9, 0.99]), atol=0.03)
    half = (x.shape[1] + 1) // 2
    a, b = x[:, : x.shape[1] - half].ravel(), x[:, half:].ravel()  # the two members of each pair
    bound = 4.5 / np.sqrt(a.size)
    assert abs(np.corrcoef(a, b)[0, 1]) < bound
    assert abs(np.corrcoef(a**2, b**2)[0, 1]) < 2 * bound  # independent, not only uncorrelated
    assert abs(np.corrcoef(x[:, :-1].ravel(), x[:, 1:].ravel())[0, 1]) < bound  # neighbours
    assert abs(np.corrcoef(x[:-1].ravel(), x[1:].ravel())[0, 1]) < bound  # successive steps
    odd = fused_standard_normals([(3,), (4,)], keras.random.SeedGenerator(0))
    assert [t.shape for t in odd] == [(3,), (4,)]


def test_fused_normals_repeat_under_a_seed():
    from keras_irtf.model.gradient_augmentation import fused_standard_normals

    def seq(seed):
        gen = keras.random.SeedGenerator(seed)
        return np.stack([np.concatenate([t.numpy().ravel() for t in fused_standard_normals([(4, 2), (3,)], gen)])
                         for _ in range(3)])

    a = seq(5)
    np.testing.assert_array_equal(a, seq(5))
    assert np.abs(a[0] - a[1]).min() > 0
    assert np.abs(a - seq(6)).min() > 0


def test_fused_normals_scales_multiply_the_same_draw():
    """A common scale (folded into the Box-Muller radius) and per-shape scales (applied to each
    output) give scale times the unit draw of the same seed, shape by shape: a shape inside the
    cosine half, one that straddles the two halves, two inside the sine half."""
    from keras_irtf.model.gradient_augmentation import fused_standard_normals, stateless_seed

    shapes = [(3,), (6, 5), (7,), (2, 2)]  # 44 elements: half = 22 falls inside (6, 5)

    def draw(scales):
        return [t.numpy() for t in fused_standard_normals(shapes, keras.random.SeedGenerator(4), scales=scales)]

    unit = draw(None)
    for scales in ([0.25] * 4, [2.0, 1e-3, 30.0, 0.5]):
        for t, u, s in zip(draw(scales), unit, scales):
            np.testing.assert_allclose(t, s * u, rtol=1e-6, atol=0)
    # the layout: cosine members first, then the sine members of the same pairs
    flat = np.concatenate([u.ravel() for u in unit])
    half = (flat.size + 1) // 2
    u = tf.random.stateless_uniform((2, half), seed=stateless_seed(keras.random.SeedGenerator(4)), dtype=tf.float32).numpy()
    radius, angle = np.sqrt(-2.0 * np.log1p(-u[0].astype(np.float64))), 2.0 * np.pi * u[1].astype(np.float64)
    expected = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[: flat.size]
    np.testing.assert_allclose(flat, expected, rtol=1e-4, atol=1e-5)


# ---- baselines ----------------------------------------------------------------------------------
def test_fgsm_loss_is_the_mean_of_clean_and_adversarial_losses():
    fgsm_eps = 0.05
    model = tiny_model("fgsm", fgsm_eps=fgsm_eps)
    batch = tiny_batch()
    terms = model.compute_loss_terms(batch, training=True)
    x = batch["source_image"]
    with tf.GradientTape() as tape:
        tape.watch(x)
        losses, _ = _per_example_losses(model, batch, overrides={"input": x})
        clean = tf.reduce_mean(losses)
    delta = fgsm_eps * tf.sign(tape.gradient(clean, x))
    adv = tf.reduce_mean(_per_example_losses(model, batch, overrides={"input": x + delta})[0])
    assert float(adv) > float(clean)  # the attack raises the loss
    np.testing.assert_allclose(float(terms["fgsm_loss"]), float(adv), rtol=1e-9)
    np.testing.assert_allclose(float(terms["loss"]), 0.5 * float(clean + adv), rtol=1e-9)


@pytest.mark.parametrize("method", ["l1", "l2"])
def test_weight_regularization_value(method):
    model = tiny_model(method, l1=0.01, l2=0.02)
    terms = model.compute_loss_terms(tiny_batch(), training=True)
    kernels = [v.numpy() for v in model.trainable_variables if len(v.shape) >= 2]
    want = 0.01 * sum(np.abs(k).sum() for k in kernels) if method == "l1" else 0.02 * sum((k**2).sum() for k in kernels)
    np.testing.assert_allclose(float(terms["weight_regularization"]), want, rtol=1e-9)
    np.testing.assert_allclose(float(terms["loss"]), float(terms["retrieval_loss"]) + want, rtol=1e-9)


# ---- logging, configuration ---------------------------------------------------------------------
def test_every_term_is_its_own_metric():
    model = tiny_model("adversarial,isotropic", eta=0.01, eps=0.1, gamma=1e-3, noise_scaling="per_element", dtype="float32")
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    batches = [tiny_batch(dtype="float32", seed=s) for s in range(2)]
    ds = tf.data.Dataset.from_tensor_slices({k: tf.stack([b[k] for b in batches]) for k in batches[0]})
    history = model.fit(ds, epochs=1, verbose=0)
    logs = {k: v[-1] for k, v in history.history.items()}
    assert {"loss", "retrieval_loss", "similarity_loss", "ga_adversarial", "ga_isotropic"} <= set(logs)
    assert logs["ga_adversarial"] > 0 and logs["similarity_loss"] > 0
    assert logs["loss"] > logs["retrieval_loss"]


def test_bad_ga_settings_are_clear_errors():
    with pytest.raises(ValueError, match="GA point"):
        GradientAugmentation("adversarial", point="pixels")
    with pytest.raises(ValueError, match="noise_scaling"):
        GradientAugmentation("isotropic", noise_scaling="global")
    with pytest.raises(ValueError, match="unknown method"):
        GradientAugmentation("adversarial,dropout")


def test_ga_flags_and_configs():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import train as train_tool

    args = train_tool.parse_args(["--dataset", "css", "--ga", "adversarial,isotropic", "--set", "ga.adversarial.eps=0.5",
                                  "--set", "ga.isotropic.gamma=0.25", "--set", "loss.eta=0.125"])
    cfg = train_tool.resolve_config(args)
    assert cfg.ga_methods == ("adversarial", "isotropic")
    assert (cfg.ga.adversarial.eps, cfg.ga.isotropic.gamma, cfg.loss.eta) == (0.5, 0.25, 0.125)
    ga_cfg = train_tool.resolve_config(train_tool.parse_args(["--config", "configs/css_ga.yaml"]))
    # GA^I off: no setting of it raised any column in the GA study (docs/results/README.md)
    assert ga_cfg.ga_methods == ("adversarial",) and ga_cfg.loss.eta == 1e-3
    assert (ga_cfg.ga.isotropic.gamma, ga_cfg.ga.isotropic.noise_scaling) == (1e-2, "mean")


# ---- PGD adversarial training -------------------------------------------------------------------
def _pixel_batch(lo=0.0, hi=1.0, mean=None, std=None, batch=6, seed=0, dtype="float64"):
    """tiny_batch whose query images are pixels u in [lo, hi] normalised as (u - mean) / std
    (default: ImageNet's, the GA layer's default); returns (batch, u)."""
    from keras_irtf.preprocessing import IMAGENET_MEAN, IMAGENET_STD

    mean = np.array(IMAGENET_MEAN if mean is None else mean)
    std = np.array(IMAGENET_STD if std is None else std)
    b = tiny_batch(batch=batch, dtype=dtype, seed=seed)
    u = np.random.default_rng(seed + 10).uniform(lo, hi, size=tuple(b["source_image"].shape))
    b["source_image"] = tf.constant((u - mean) / std, dtype)
    return b, u


def _pgd_model(dtype="float64", **settings):
    model = tiny_model("pgd", dtype=dtype, settings={"pgd": settings})
    pgd = model.gradient_augmentation.active[0]
    pgd.trace = []
    return model, pgd


@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_attack_raises_the_attack_loss_at_every_step(random_start):
    # steps small against the curvature of the tiny model, the ball reached after 5 of them
    model, pgd = _pgd_model(steps=8, eps=0.03, step_size=0.006, random_start=random_start)
    batch, _ = _pixel_batch()
    terms = model.compute_loss_terms(batch, training=True)
    losses = [float(v) for v in pgd.trace[0]["losses"]] + [float(terms["pgd_loss"])]
    assert len(losses) == 9  # before each of the 8 steps, and at delta_8
    assert all(b >= a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] > 1.05 * losses[0]
    assert float(terms["pgd_loss"]) > float(terms["retrieval_loss"])  # the attack hurts the clean loss


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_pgd_perturbation_stays_in_its_ball_and_in_the_pixel_range(norm):
    """At ga.point=input the ball and the range are [0, 1] pixels: u + delta in [0, 1] and
    ||delta||_p <= eps, on images with pixels at 0 and 1, large steps so that both bind."""
    from keras_irtf.preprocessing import IMAGENET_STD

    eps = 0.05 if norm == "inf" else 0.5
    model, pgd = _pgd_model(steps=5, eps=eps, step_size=eps, attack_norm=norm, random_start=True)
    batch, u = _pixel_batch()
    u[:, 0] = 0.0  # pixels at both ends of the range
    u[:, 1] = 1.0
    batch["source_image"] = tf.constant((u - np.array(model.gradient_augmentation.pixel_mean))
                                        / np.array(model.gradient_augmentation.pixel_std))
    model.compute_loss_terms(batch, training=True)
    du = pgd.trace[0]["delta"].numpy() * np.array(IMAGENET_STD)  # the shift in pixels
    assert (u + du).min() >= -1e-9 and (u + du).max() <= 1 + 1e-9
    assert du[:, 0].min() >= -1e-12 and du[:, 1].max() <= 1e-12  # not pushed out at the ends
    if norm == "inf":
        assert np.abs(du).max() <= eps * (1 + 1e-9)
        assert np.abs(du).max() > 0.99 * eps  # the attack uses its budget
    else:
        norms = np.linalg.norm(du.reshape(len(du), -1), axis=1)
        assert norms.max() <= eps * (1 + 1e-9) and norms.min() > 0.5 * eps


def test_pgd_training_gradient_is_that_of_the_loss_at_the_attacked_query():
    """d/dtheta of (L(x) + L(x + delta_k)) / 2 with delta_k a constant: the model's gradient
    against an independent computation (plain TF, the per-example losses) at the same delta_k."""
    model, pgd = _pgd_model(steps=3, eps=0.05, random_start=True)
    batch, _ = _pixel_batch()
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        terms = model.compute_loss_terms(batch, training=True)
    grads = tape.gradient(terms["loss"], variables)
    delta = tf.stop_gradient(pgd.trace[0]["delta"])
    assert float(tf.reduce_max(tf.abs(delta))) > 0
    x = batch["source_image"]
    with tf.GradientTape(persistent=True) as tape:
        clean = tf.reduce_mean(_per_example_losses(model, batch)[0])
        adv = tf.reduce_mean(_per_example_losses(model, batch, overrides={"input": x + delta})[0])
        want_loss = 0.5 * (clean + adv)
    want = tape.gradient(want_loss, variables)
    clean_grads = tape.gradient(clean, variables)
    np.testing.assert_allclose(float(terms["pgd_loss"]), float(adv), rtol=1e-12)
    np.testing.assert_allclose(float(terms["loss"]), float(want_loss), rtol=1e-12)
    moved = 0.0
    for g, w, c, v in zip(grads, want, clean_grads, variables):
        g, w, c = (tf.convert_to_tensor(t).numpy() for t in (g, w, c))
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-13, err_msg=v.path)
        moved = max(moved, float(np.abs(w - c).max()))
    assert moved > 1e-3  # the adversarial half is a visible part of the gradient


def test_pgd_one_step_from_x_with_alpha_eps_is_fgsm_training():
    """k = 1, no random start, alpha = eps: delta = eps * sign(dL/dx), FGSM's (pixels = the model
    input here, mean 0 and std 1, away from the range's ends)."""
    eps = 0.05
    pgd = tiny_model("pgd", pixel_mean=(0.0, 0.0, 0.0), pixel_std=(1.0, 1.0, 1.0),
                     settings={"pgd": {"steps": 1, "eps": eps, "step_size": eps, "random_start": False}})
    fgsm = tiny_model("fgsm", fgsm_eps=eps)
    fgsm.set_weights(pgd.get_weights())
    batch, _ = _pixel_batch(0.2, 0.8, mean=(0, 0, 0), std=(1, 1, 1))
    out = {}
    for name, model in (("pgd", pgd), ("fgsm", fgsm)):
        with tf.GradientTape() as tape:
            terms = model.compute_loss_terms(batch, training=True)
        out[name] = (terms, [tf.convert_to_tensor(g).numpy() for g in tape.gradient(terms["loss"],
                                                                                      model.trainable_variables)])
    (p_terms, p_grads), (f_terms, f_grads) = out["pgd"], out["fgsm"]
    np.testing.assert_allclose(float(p_terms["pgd_loss"]), float(f_terms["fgsm_loss"]), rtol=1e-12)
    np.testing.assert_allclose(float(p_terms["loss"]), float(f_terms["loss"]), rtol=1e-12)
    for a, b in zip(p_grads, f_grads):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def test_pgd_attack_passes_leave_the_batch_norm_statistics_alone():
    """The real TIRG (batch norm): at eps 0 every pass sees the clean batch, so PGD-3 training,
    whose 3 attack passes run in a stateless scope, takes exactly FGSM training's step (2 passes
    that update the moving statistics), moving statistics included."""
    from conftest import tiny_config
    from keras_irtf.experiment import build_model, make_optimizer

    def make(*overrides):
        cfg = tiny_config(None, "model.text_encoder.lstm.dropout=0.0", *overrides)
        keras.utils.set_random_seed(0)
        model = build_model(cfg, vocab_size=20)
        model.compile(optimizer=make_optimizer(cfg))
        return model, cfg

    pgd, cfg = make("ga.methods=pgd", "ga.pgd.eps=0.0", "ga.pgd.steps=3")
    fgsm, _ = make("ga.methods=fgsm", "ga.fgsm.eps=0.0")
    fgsm.set_weights(pgd.get_weights())
    start = [v.numpy() for v in pgd.weights]
    s, n = cfg.data.image_size, cfg.model.max_text_length
    rng = np.random.default_rng(0)
    batch = {"source_image": tf.constant(rng.normal(size=(8, s, s, 3)), tf.float32),
             "text": tf.constant(rng.integers(1, 20, size=(8, n)), tf.int32),
             "target_image": tf.constant(rng.normal(size=(8, s, s, 3)), tf.float32)}
    for model in (pgd, fgsm):
        model.train_step(batch)
    bn = [i for i, v in enumerate(pgd.weights) if "moving_mean" in v.path]
    assert bn and max(np.abs(pgd.weights[i].numpy() - start[i]).max() for i in bn) > 1e-4  # they moved
    for a, b in zip(pgd.weights, fgsm.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7, err_msg=a.path)


# ---- which variables GA^I perturbs, and by how much -------------------------------------------------
def test_variable_kinds_and_parts_come_from_the_owning_layers():
    from conftest import tiny_config
    from keras_irtf.experiment import build_model
    from keras_irtf.model.gradient_augmentation import VARIABLE_KINDS, variable_groups

    model = build_model(tiny_config(), vocab_size=20)
    groups = variable_groups(model)
    by_path = {v.path.split("/", 1)[1]: groups[id(v)] for v in model.trainable_variables}
    assert by_path["image_encoder/conv0/kernel"] == ("kernel", "image_encoder")
    assert by_path["image_encoder/bn0/gamma"] == ("normalization", "image_encoder")
    assert by_path["image_encoder/projection/bias"] == ("bias", "image_encoder")
    assert by_path["text_encoder/embedding/embeddings"] == ("embedding", "text_encoder")
    assert by_path["text_encoder/lstm/lstm_cell/bias"] == ("bias", "text_encoder")
    assert by_path["text_encoder/lstm/lstm_cell/recurrent_kernel"] == ("kernel", "text_encoder")
    assert by_path["composer/gate_bn/beta"] == ("normalization", "composer")
    assert by_path["composer/mix"] == ("kernel", "composer")  # TIRG's own weights
    assert by_path["normalization/scale"] == ("logit_scale", None)
    assert {kind for kind, _ in groups.values()} == set(VARIABLE_KINDS)


@pytest.mark.parametrize("settings,noised", [
    ({"exclude": ("bias", "embedding")}, lambda kind, part: kind not in ("bias", "embedding")),
    ({"only": ("composer",)}, lambda kind, part: part == "composer"),
    ({"only": ("kernel", "logit_scale"), "exclude": "text_encoder"},
     lambda kind, part: kind in ("kernel", "logit_scale") and part != "text_encoder"),
])
def test_excluded_variables_get_the_update_without_noise(settings, noised):
    """One SGD step from the same weights with and without GA^I: the excluded variables' updates
    are the plain update exactly, the others differ."""
    from keras_irtf.model.gradient_augmentation import variable_groups

    batch = tiny_batch(dtype="float32")
    plain = tiny_model("", dtype="float32")
    iso = tiny_model("isotropic", dtype="float32", gamma=0.05, noise_scaling="per_element",
                     settings={"isotropic": settings})
    iso.set_weights(plain.get_weights())
    for m in (plain, iso):
        m.compile(optimizer=keras.optimizers.SGD(1.0))
        tf.function(m.train_step)(batch)
    groups = variable_groups(iso)
    seen = set()
    for a, b in zip(plain.trainable_variables, iso.trainable_variables):
        kind, part = groups[id(b)]
        if noised(kind, part):
            assert np.abs(a.numpy() - b.numpy()).max() > 1e-4, b.path
        else:
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=b.path)
        seen.add(noised(kind, part))
    assert seen == {True, False}


def test_an_unknown_variable_kind_is_a_clear_error():
    from keras_irtf.config import ConfigError, load_config

    with pytest.raises(ValueError, match=r"unknown item\(s\) \['weights'\].*'kernel', 'bias', 'normalization'"):
        GradientAugmentation("isotropic", settings={"isotropic": {"exclude": "bias,weights"}})
    with pytest.raises(ConfigError, match=r"ga.isotropic.only\[0\]='convolutions': expected items among "
                                          r"\['kernel', 'bias', 'normalization', 'embedding', 'logit_scale', "
                                          r"'image_encoder', 'text_encoder', 'composer'\]"):
        load_config([], ["ga.methods=isotropic", "ga.isotropic.only=convolutions"])
    cfg = load_config([], ["ga.methods=isotropic", "ga.isotropic.exclude=bias,logit_scale"])
    assert cfg.ga.isotropic.exclude == ("bias", "logit_scale")


@pytest.mark.parametrize("mode,exclude,noised", [
    ("paper", None, lambda kind, part: kind != "kernel" and part != "composer"),
    ("reference", None, lambda kind, part: True),
    ("paper", [], lambda kind, part: True),
    ("reference", ["bias"], lambda kind, part: kind != "bias"),
])
def test_exclude_left_unset_spares_the_kernels_and_the_composer_in_the_papers_mode(mode, exclude, noised):
    """ga.isotropic.exclude unset (null, the default): the paper's mode noises no kernel and nothing
    of the composer, and every other variable; the reference mode (the authors' code) noises every
    variable; a list given is used as it is in either mode."""
    from keras_irtf.model.gradient_augmentation import variable_groups

    model = tiny_model("isotropic", dtype="float32", mode=mode, settings={"isotropic": {"exclude": exclude}})
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    tf.function(model.train_step)(tiny_batch(dtype="float32"))  # builds the model: the method is attached
    method = model.gradient_augmentation.active[0]
    groups = variable_groups(model)
    variables = model.trainable_variables
    want = [noised(*groups[id(v)]) for v in variables]
    assert method.noised(variables) == want
    assert any(want)
    assert all(want) == (mode == "reference" and exclude is None or exclude == [])
    # kept unset through the layer's config (a .keras file), so a reloaded model resolves it the same way
    config = model.gradient_augmentation.get_config()
    assert config["settings"]["isotropic"]["exclude"] == (None if exclude is None else tuple(exclude))
    again = GradientAugmentation.from_config(config)
    assert again.active[0].exclude == method.exclude


@pytest.mark.parametrize("only", [("composer",), ("kernel",), ("bias", "logit_scale")])
def test_only_with_exclude_unset_noises_what_only_names(only):
    """`only` names the variables itself: the default exclusion does not empty it."""
    from keras_irtf.model.gradient_augmentation import variable_groups

    model = tiny_model("isotropic", dtype="float32", settings={"isotropic": {"exclude": None, "only": only}})
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    logs = tf.function(model.train_step)(tiny_batch(dtype="float32"))
    method = model.gradient_augmentation.active[0]
    groups = variable_groups(model)
    variables = model.trainable_variables
    want = [bool({*groups[id(v)]} & set(only)) for v in variables]
    assert method.exclude == () and any(want)
    assert method.noised(variables) == want
    assert float(logs["ga_noise_ratio"]) > 0


def test_a_model_file_without_the_exclude_key_keeps_every_variable():
    """A GA layer config saved before ga.isotropic.exclude existed (no key) noised every variable;
    reloaded, it still does. A config that has the key keeps its value (null: the default)."""
    saved = GradientAugmentation("isotropic", settings={"isotropic": {"gamma": 0.1}}).get_config()
    assert saved["settings"]["isotropic"]["exclude"] is None
    assert GradientAugmentation.from_config(saved).active[0].exclude == ("kernel", "composer")
    del saved["settings"]["isotropic"]["exclude"]
    old = GradientAugmentation.from_config(saved)
    assert old.active[0].exclude == () and old.active[0].settings.gamma == 0.1


def test_exclude_in_the_config_unset_empty_and_listed():
    from pathlib import Path

    from keras_irtf.config import load_config, to_yaml
    from keras_irtf.model.gradient_augmentation import DEFAULT_EXCLUDE, default_exclude

    assert DEFAULT_EXCLUDE == ("kernel", "composer")
    assert default_exclude("paper") == DEFAULT_EXCLUDE and default_exclude("reference") == ()
    cfg = load_config([], ["ga.methods=isotropic"])
    assert cfg.ga.isotropic.exclude is None
    assert "exclude: null" in to_yaml(cfg)
    assert load_config([], ["ga.methods=isotropic", "ga.isotropic.exclude="]).ga.isotropic.exclude == ()
    assert load_config([], ["ga.isotropic.exclude=[]"]).ga.isotropic.exclude == ()
    # the study configs that measured every variable's noise say so, and keep measuring it
    for name in ("css_ga_study.yaml", "css_ablation.yaml"):
        path = Path(__file__).resolve().parent.parent / "configs" / name
        assert load_config([path]).ga.isotropic.exclude == (), name


def test_reference_terms_split_the_authors_noise_from_their_push():
    """ga.mode=reference adds gamma (N - k) / size * (n + 1) to parameter k of N: `push` adds the
    constant alone, `noise` the (N - k)-counted noise alone, and the two add up to both."""
    gamma = 0.2
    variables = [tf.Variable(np.zeros((4,), np.float32)), tf.Variable(np.zeros((2, 2), np.float32)),
                 tf.Variable(np.zeros((8,), np.float32))]
    scales = np.concatenate([np.full(int(np.prod(v.shape)), gamma * (3 - k) / np.prod(v.shape))
                             for k, v in enumerate(variables)])

    def draws(terms, n=3):
        ga = GradientAugmentation("isotropic", mode="reference", seed=0,
                                  settings={"isotropic": {"gamma": gamma, "reference_terms": terms}})
        return _draws(ga, variables, n)

    push, noise, both = draws("push"), draws("noise"), draws("noise_and_push")
    np.testing.assert_allclose(push, np.broadcast_to(scales, push.shape), rtol=1e-6)
    np.testing.assert_allclose(both, noise + push, rtol=1e-6, atol=1e-7)
    many = draws("noise", 2000)
    np.testing.assert_allclose(many.mean(0) / scales, 0.0, atol=0.15)
    np.testing.assert_allclose(many.std(0) / scales, 1.0, atol=0.1)
    with pytest.raises(ValueError, match="reference_terms='push' applies to ga.mode=reference"):
        GradientAugmentation("isotropic", settings={"isotropic": {"reference_terms": "push"}}).isotropic_noise(
            variables)


@pytest.mark.parametrize("settings", [{}, {"exclude": ("bias",)}])
def test_logged_noise_to_gradient_ratio_is_the_ratio_of_the_norms(settings):
    """ga_noise_ratio of one step = ||noise|| / ||g||, both read from the updates: SGD with rate 1
    moves the plain model by -g and the GA^I model by -(g + noise) from the same weights."""
    batch = tiny_batch()
    plain = tiny_model("")
    iso = tiny_model("isotropic", gamma=0.02, noise_scaling="per_element", settings={"isotropic": settings})
    iso.set_weights(plain.get_weights())
    start = [v.numpy() for v in plain.trainable_variables]
    logs = {}
    for name, m in (("plain", plain), ("iso", iso)):
        m.compile(optimizer=keras.optimizers.SGD(1.0))
        logs[name] = {k: float(v) for k, v in tf.function(m.train_step)(batch).items()}
    g = np.concatenate([(s - v.numpy()).ravel() for s, v in zip(start, plain.trainable_variables)])
    noise = np.concatenate([(a.numpy() - b.numpy()).ravel()
                            for a, b in zip(plain.trainable_variables, iso.trainable_variables)])
    want = np.linalg.norm(noise) / np.linalg.norm(g)
    assert 1e-3 < want < 10
    np.testing.assert_allclose(logs["iso"]["ga_noise_ratio"], want, rtol=1e-5)
    # a diagnostic, not a loss term: the logged loss is L_CE + L_GA^I
    np.testing.assert_allclose(logs["iso"]["loss"], logs["iso"]["retrieval_loss"] + logs["iso"]["ga_isotropic"],
                               rtol=1e-6)
