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


# ---- each part is built from its own settings section and named arguments, without a Config ----
_COMPOSER_INPUTS = (tf.random.normal((2, 16), seed=2), tf.random.normal((2, 16), seed=3))


@pytest.mark.parametrize("name", ["combiner", "composeae", "composeae_real", "concat", "image_only", "sum",
                                  "text_only", "tirg"])
def test_every_built_in_composer_builds_from_its_own_settings(name):
    from keras_irtf.registry import COMPOSERS

    entry = COMPOSERS.get(name)
    composer = entry.obj.from_settings(entry.default_settings(), output_dim=16, image_dim=16, text_dim=16)
    assert composer.output_dim == 16
    assert tuple(composer(list(_COMPOSER_INPUTS)).shape) == (2, 16)


@pytest.mark.parametrize("name, size", [("small_cnn", 64), ("resnet18", 32)])
def test_built_in_image_encoders_build_from_their_own_settings(name, size):
    from keras_irtf.registry import IMAGE_ENCODERS

    entry = IMAGE_ENCODERS.get(name)
    settings = entry.default_settings()
    encoder = entry.obj.from_settings(settings, output_dim=12, image_size=size)
    assert tuple(encoder(tf.zeros((1, size, size, 3))).shape) == (1, 12)
    assert entry.obj.preprocessor(settings, image_size=size).size == size


def test_the_lstm_takes_double_backprop_as_a_named_argument():
    from keras_irtf.registry import TEXT_ENCODERS

    entry = TEXT_ENCODERS.get("lstm")
    settings = entry.default_settings()
    plain = entry.obj.from_settings(settings, output_dim=12, vocab_size=10)
    second_order = entry.obj.from_settings(settings, output_dim=12, vocab_size=10, double_backprop=True)
    assert plain.use_cudnn == "auto" and second_order.use_cudnn is False
    assert plain.output_dim == 12 and plain.vocab_size == 10
    # the generic kernel does give a gradient of a gradient through the LSTM
    tokens = tf.constant([[3, 4, 5, 0]], tf.int32)
    second_order(tokens)
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            embedded = second_order.embedding(tokens)
            inner.watch(embedded)
            feature = second_order.projection(second_order.lstm(embedded, mask=second_order.embedding.compute_mask(tokens)))
            loss = tf.reduce_sum(feature ** 2)
        grad_x = inner.gradient(loss, embedded)
        penalty = tf.reduce_sum(grad_x ** 2)
    grads = outer.gradient(penalty, second_order.lstm.trainable_variables)
    assert all(g is not None for g in grads)


@pytest.mark.parametrize("overrides, expected", [
    ([], False),
    (["ga.methods=adversarial", "ga.point=input"], False),
    (["ga.methods=isotropic", "ga.point=text_feature"], False),
    (["ga.methods=adversarial", "ga.point=text_feature"], True),
    (["ga.methods=fgsm", "ga.point=text_feature"], True),
])
def test_the_assembler_says_when_the_text_encoder_needs_double_backprop(overrides, expected):
    from keras_irtf.config import load_config
    from keras_irtf.experiment import Experiment

    exp = Experiment(load_config([], ["model.image_encoder=small_cnn", "model.embed_dim=16"] + overrides), verbose=False)
    assert exp.part_context("text_encoder", vocab_size=5)["double_backprop"] is expected
    model = exp.build_model(vocab_size=5)
    assert (model.text_encoder.use_cudnn is False) is expected


def test_the_assembler_passes_the_shared_preset_folders():
    from keras_irtf.config import load_config
    from keras_irtf.experiment import Experiment

    cfg = load_config([], ["model.image_encoder=clip", "model.text_encoder=clip", "model.image_encoder.preset=/p/img",
                           "model.finetune=text"])
    exp = Experiment(cfg, verbose=False)
    image, text = exp.part_context("image_encoder"), exp.part_context("text_encoder")
    assert image["shared_presets"] == () and image["finetune"] is False
    assert text["shared_presets"] == (("model.image_encoder.preset", "/p/img"),) and text["finetune"] is True
    cfg = load_config([], ["model.image_encoder=clip", "model.text_encoder=siglip", "model.clip_preset=/p/both"])
    text = Experiment(cfg, verbose=False).part_context("text_encoder")
    assert text["shared_presets"] == (("model.clip_preset", "/p/both"),)
