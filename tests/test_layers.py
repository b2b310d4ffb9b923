import numpy as np
import pytest
import tensorflow as tf

from keras_irtf.layers import (
    ConcatComposer,
    ImageOnlyComposer,
    LSTMTextEncoder,
    ResNet18Encoder,
    ScaledL2Normalization,
    SmallCNNEncoder,
    TextOnlyComposer,
    TIRGComposer,
)
from tests.layer_testing import run_layer_test


def test_small_cnn(tmp_path):
    x = tf.random.normal((2, 64, 64, 3), seed=1)
    run_layer_test(SmallCNNEncoder, {"filters": (4, 8, 8, 8), "output_dim": 16}, x, (2, 16), tmp_path)


def test_small_cnn_keeps_position():
    """Flattening (not pooling) the last map: the same blob at two places gives two features."""
    enc = SmallCNNEncoder((4, 8, 8, 8), 16)
    a = np.zeros((1, 64, 64, 3), np.float32)
    b = a.copy()
    a[0, 4:12, 4:12] = 1.0
    b[0, 52:60, 52:60] = 1.0
    fa, fb = enc(a), enc(b)
    assert not np.allclose(fa, fb, atol=1e-4)


def test_resnet18(tmp_path):
    x = tf.random.normal((2, 64, 64, 3), seed=1)
    layer = run_layer_test(ResNet18Encoder, {"output_dim": 32}, x, (2, 32), tmp_path)
    # ResNet-18 backbone (without the projection) has the torchvision count minus the fc layer:
    # 11,176,512 conv/bn weights incl. BN moving statistics 9,600 -> 11,186,112 in all (keras-hub's
    # resnet_18_imagenet count)
    n = sum(int(np.prod(w.shape)) for w in layer.weights) - (512 * 32 + 32)
    assert n == 11_186_112


def test_lstm_text_encoder(tmp_path):
    tokens = tf.constant([[3, 4, 5, 0, 0], [6, 7, 0, 0, 0]], tf.int32)
    run_layer_test(LSTMTextEncoder, {"vocab_size": 10, "embed_dim": 8, "hidden_dim": 8, "output_dim": 12},
                   tokens, (2, 12), tmp_path)


def test_lstm_ignores_padding_and_accepts_empty_text():
    enc = LSTMTextEncoder(10, 8, 8, 12, dropout=0.0)
    short = tf.constant([[3, 4, 0, 0, 0]], tf.int32)
    padded_more = tf.constant([[3, 4, 0, 0, 0, 0, 0, 0]], tf.int32)
    np.testing.assert_allclose(enc(short), enc(padded_more), rtol=1e-5, atol=1e-6)
    empty = enc(tf.zeros((1, 5), tf.int32))
    assert np.all(np.isfinite(empty))


@pytest.mark.parametrize("cls", [TIRGComposer, ConcatComposer])
def test_learned_composers(cls, tmp_path):
    f_img = tf.random.normal((4, 16), seed=1)
    f_txt = tf.random.normal((4, 16), seed=2)
    run_layer_test(cls, {"output_dim": 16}, [f_img, f_txt], (4, 16), tmp_path)


def test_tirg_formula():
    """f = sigmoid(gate) * f_img * a0 + res * a1 with a = (1, 10) at initialisation."""
    comp = TIRGComposer(output_dim=4)
    f_img = tf.random.normal((3, 4), seed=3)
    f_txt = tf.random.normal((3, 4), seed=4)
    out = comp([f_img, f_txt], training=False).numpy()
    x = tf.concat([f_img, f_txt], -1)
    gate = comp.gate_dense(tf.nn.relu(comp.gate_bn(x, training=False)))
    res = comp.res_dense2(tf.nn.relu(comp.res_dense1(tf.nn.relu(comp.res_bn(x, training=False)))))
    expected = tf.sigmoid(gate) * f_img * 1.0 + res * 10.0
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(comp.mix.numpy(), [1.0, 10.0])


def test_single_modality_composers():
    f_img = tf.random.normal((2, 8), seed=1)
    f_txt = tf.random.normal((2, 8), seed=2)
    np.testing.assert_array_equal(ImageOnlyComposer(8)([f_img, f_txt]), f_img)
    np.testing.assert_array_equal(TextOnlyComposer(8)([f_img, f_txt]), f_txt)


def test_scaled_l2_normalization(tmp_path):
    x = tf.random.normal((5, 7), seed=1)
    layer = run_layer_test(ScaledL2Normalization, {"initial_scale": 4.0}, x, (5, 7), tmp_path)
    # run_layer_test took a gradient step: the scale moved from 4.0 and the norm follows it
    assert len(layer.trainable_weights) == 1 and abs(float(layer.scale.numpy()) - 4.0) > 1e-4
    np.testing.assert_allclose(np.linalg.norm(layer(x).numpy(), axis=1), float(layer.scale.numpy()), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ScaledL2Normalization(4.0)(x).numpy(), axis=1), 4.0, rtol=1e-5)
