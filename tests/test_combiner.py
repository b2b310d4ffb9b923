"""CLIP4Cir's Combiner and the sum baseline: their formulas, their loss (cross-entropy over the
in-batch targets at logit scale 100), and composers built to the image feature's width."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from keras_irtf.experiment import Experiment
from keras_irtf.layers.composers import CombinerComposer, SumComposer


def _features(rng, b=6, d=8):
    return rng.normal(size=(b, d)).astype("float32"), rng.normal(size=(b, d)).astype("float32")


def test_combiner_is_a_dynamic_convex_mix_plus_a_residual(rng):
    img, txt = _features(rng)
    c = CombinerComposer(output_dim=8, dropout=0.5)
    out = c([img, txt]).numpy()
    assert (c.projection_dim, c.hidden_dim) == (32, 64)  # 4x and 8x the feature width
    lam, residual = c.mix([img, txt])
    lam = lam.numpy()
    assert lam.shape == (6, 1) and ((lam > 0) & (lam < 1)).all()
    np.testing.assert_allclose(out, residual.numpy() + lam * txt + (1 - lam) * img, atol=1e-5)
    # with the residual branch's output layer zeroed, the output is exactly the convex mix
    c.output_layer.kernel.assign(tf.zeros_like(c.output_layer.kernel))
    c.output_layer.bias.assign(tf.zeros_like(c.output_layer.bias))
    out = c([img, txt]).numpy()
    between = (out - img) / (txt - img)  # lambda per query, the same for every dimension
    np.testing.assert_allclose(between, np.repeat(lam, 8, axis=1), rtol=1e-4, atol=1e-4)
    # dropout acts in training only: two inference calls agree, two training calls differ
    np.testing.assert_array_equal(c([img, txt]).numpy(), c([img, txt]).numpy())
    assert not np.allclose(c([img, txt], training=True).numpy(), c([img, txt], training=True).numpy())


def test_combiner_refuses_features_of_different_widths(rng):
    with pytest.raises(ValueError, match="widths must be equal"):
        CombinerComposer(output_dim=8).build([(None, 8), (None, 6)])
    with pytest.raises(ValueError, match="widths must be equal"):
        SumComposer(output_dim=8).build([(None, 8), (None, 6)])


def test_sum_is_the_sum_and_learns_nothing(rng):
    img, txt = _features(rng)
    s = SumComposer(output_dim=8)
    np.testing.assert_allclose(s([img, txt]).numpy(), img + txt, rtol=1e-6)
    assert s.trainable_weights == []


def test_combiner_loss_is_cross_entropy_at_logit_scale_100(css_smoke_root, css_smoke):
    cfg = tiny_config(css_smoke_root, "model.composer=combiner", "model.initial_scale=10", "model.learn_scale=false",
                      "train.batch_size=8")
    exp = Experiment(cfg, dataset=css_smoke, verbose=False)
    model = exp.create_model()
    assert not model.normalization.scale.trainable
    assert isinstance(model.composer, CombinerComposer) and model.composer.output_dim == 64
    batch = exp.sample_batch()
    terms = model.compute_loss_terms(batch, training=False)
    q = tf.math.l2_normalize(model.compose(model.encode_image(batch["source_image"]), model.encode_text(batch["text"])), 1)
    t = tf.math.l2_normalize(model.encode_image(batch["target_image"]), 1)
    logits = 100.0 * tf.matmul(q, t, transpose_b=True)
    expected = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(tf.range(8), logits))
    assert abs(float(terms["retrieval_loss"]) - float(expected)) < 1e-4
    before = float(model.normalization.scale.numpy())
    model.fit(exp.train_dataset(steps=2), epochs=1, steps_per_epoch=2, verbose=0)
    assert float(model.normalization.scale.numpy()) == before == 10.0


def test_composers_take_the_image_encoders_width():
    from keras_irtf.config import load_config
    from keras_irtf.experiment import Experiment

    exp = Experiment(load_config([], ["model.embed_dim=32", "model.composer=sum"]), verbose=False)
    context = exp.part_context("composer", image_dim=12, text_dim=32)
    assert context["output_dim"] == 12
    for cls in (CombinerComposer, SumComposer):
        assert cls.from_settings(None, **context).output_dim == 12
        assert cls.from_settings(None, output_dim=32).output_dim == 32
