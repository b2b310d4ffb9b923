"""train.precision: float32, mixed_bfloat16 and mixed_float16 through training (GA included),
saving, evaluation and export, with the float32 parts kept in float32."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_irtf.config import ConfigError
from keras_irtf.experiment import Experiment, build_model, load_model, make_optimizer, save_model
from tests.conftest import tiny_config

POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")
COMPUTE = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}
# dropout off: its masks would make two models' losses differ for reasons other than precision
GA = ("ga.methods=adversarial,isotropic", "loss.eta=0.1", "model.text_encoder.dropout=0.0")


def _cfg(precision, *extra):
    return tiny_config(None, f"train.precision={precision}", *GA, *extra)


def _batch(css_smoke, smoke_vectorizer, cfg, n=8):
    from keras_irtf.experiment import sample_batch

    return sample_batch(css_smoke, smoke_vectorizer, cfg, batch_size=n)


def _layers(layer):
    """The layer and every sub-layer under it."""
    return [layer, *layer._flatten_layers(include_self=False, recursive=True)]


def test_precision_is_a_validated_config_key():
    assert tiny_config().train.precision == "float32"
    with pytest.raises(ConfigError, match="train.precision='float64'"):
        tiny_config(None, "train.precision=float64")


STEPS = 8  # enough for the steps a fresh model's float16 gradients overflow, and some applied


@pytest.mark.parametrize("precision", POLICIES)
def test_smoke_training_with_ga_and_ls(precision, css_smoke, smoke_vectorizer):
    cfg = _cfg(precision)
    keras.utils.set_random_seed(0)  # the initial weights (build_model does not seed them)
    model = build_model(cfg, smoke_vectorizer.vocab_size)
    assert keras.config.dtype_policy().name == "float32"  # the policy did not leak out of building
    model.compile(optimizer=make_optimizer(cfg, model))
    batch = _batch(css_smoke, smoke_vectorizer, cfg)
    before = [v.numpy() for v in model.trainable_variables]
    history = model.fit(tf.data.Dataset.from_tensors(batch).repeat(STEPS), epochs=1, verbose=0)
    logs = {k: v[-1] for k, v in history.history.items()}  # over the epoch's steps
    moved = max(float(np.abs(v.numpy() - b).max()) for v, b in zip(model.trainable_variables, before))
    assert moved > 1e-3
    for key in ("loss", "retrieval_loss", "similarity_loss", "ga_adversarial", "ga_isotropic"):
        assert np.isfinite(logs[key]), (key, logs)
    assert logs["ga_adversarial"] > 0
    compute = COMPUTE[precision]
    # the encoders and the composer, down to their innermost layers, compute in the policy
    for part in (model.image_encoder, model.text_encoder, model.composer):
        for layer in _layers(part):
            assert layer.dtype_policy.name == precision, layer.path
    conv = model.image_encoder.blocks[0][0]
    assert conv(batch["source_image"][:1]).dtype.name == compute
    # the float32 parts
    assert model.normalization.dtype_policy.name == "float32"
    assert model.gradient_augmentation.dtype_policy.name == "float32"
    assert model.normalization.scale.dtype == "float32"
    bn = model.image_encoder.blocks[0][1]
    assert {bn.moving_mean.dtype, bn.moving_variance.dtype} == {"float32"}
    out = model(batch)
    assert out["query"].dtype.name == "float32" and out["target"].dtype.name == "float32"
    terms = model.compute_loss_terms(batch, training=False)
    assert all(v.dtype.name == "float32" for v in terms.values()), {k: v.dtype for k, v in terms.items()}
    # every variable (mixed policies keep them in float32) and the optimizer's state
    assert {v.dtype for v in model.variables if v.dtype != "int64"} == {"float32"}
    assert {v.dtype for v in model.optimizer.variables} <= {"float32", "int64"}
    scaled = precision == "mixed_float16"
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) == scaled
    assert ("skipped_steps" in logs) == scaled
    if scaled:
        # dynamic loss scaling starts at 2^15 and halves on each overflow: the first steps of a
        # fresh model are skipped (measured over 60 initial weights: 1 to 4 of them), the later
        # ones are applied (`moved` above)
        assert 1.0 <= logs["skipped_steps"] <= STEPS - 3


@pytest.mark.parametrize("precision", ("mixed_bfloat16", "mixed_float16"))
@pytest.mark.parametrize("extra", [("ga.methods=fgsm,l1",), ("ga.methods=l2",), ("ga.methods=pgd,isotropic", "ga.pgd.steps=2"),
                                   ("model.composer=composeae", "model.composer.composeae.dropout=0.0"),
                                   ("ga.point=image_feature",), ("model.image_encoder=resnet18", "data.image_size=32")])
def test_other_methods_and_composeae(precision, extra, css_smoke, smoke_vectorizer):
    cfg = _cfg(precision, *extra)
    model = build_model(cfg, smoke_vectorizer.vocab_size)
    model.compile(optimizer=make_optimizer(cfg, model))
    logs = model.train_on_batch(_batch(css_smoke, smoke_vectorizer, cfg), return_dict=True)
    assert logs and all(np.isfinite(v) for v in logs.values()), logs
    names = set(model.loss_term_names())
    assert names <= set(logs), (names, logs)
    if "composeae" in extra[0]:
        assert {"reconstruction_image_loss", "rotational_symmetry_loss"} <= set(logs)
    # every sub-layer in the policy, those created in build() too (ResNet's shortcut, ComposeAE's
    # text decoder)
    for part in (model.image_encoder, model.text_encoder, model.composer):
        assert {layer.dtype_policy.name for layer in _layers(part)} == {precision}, part.name


def _twin(model, cfg, vocab):
    """The model of `cfg` with `model`'s weights."""
    twin = build_model(cfg, vocab)
    twin.set_weights(model.get_weights())
    return twin


def test_adversarial_penalty_does_not_depend_on_the_loss_scale(css_smoke, smoke_vectorizer):
    """The GA^A penalty from dL/dx of the scaled loss, unscaled before the norm: the same value
    under every loss scale, and the float32 value within float16's rounding."""
    ref_cfg = _cfg("float32", "ga.methods=adversarial")
    ref = build_model(ref_cfg, smoke_vectorizer.vocab_size)
    batch = _batch(css_smoke, smoke_vectorizer, ref_cfg, n=16)
    want = float(ref.compute_loss_terms(batch, training=True)["ga_adversarial"])
    # float32 with a loss scale: the same value to float32 rounding
    got32 = float(ref.compute_loss_terms(batch, training=True, loss_scale=tf.constant(2.0**12))["ga_adversarial"])
    assert got32 == pytest.approx(want, rel=1e-5)

    half_cfg = _cfg("mixed_float16", "ga.methods=adversarial")
    half = _twin(ref, half_cfg, smoke_vectorizer.vocab_size)
    values = {s: float(half.compute_loss_terms(batch, training=True, loss_scale=tf.constant(s))["ga_adversarial"])
              for s in (2.0**4, 2.0**10, 2.0**15)}
    assert want > 0
    for s, v in values.items():
        # tolerance: float16 activations (11-bit mantissa) through the network, measured ~1e-2
        assert v == pytest.approx(want, rel=5e-2), (s, v, want)
    # between scales only the rounding of the scaled gradient differs (the scales are powers of two)
    assert values[2.0**4] == pytest.approx(values[2.0**15], rel=1e-3), values


def test_isotropic_noise_is_not_scaled(css_smoke, smoke_vectorizer):
    """One SGD step under two loss scales from the same weights: the same update, of the noise's
    size (gamma) -- noise multiplied by the scale would move the weights 256 times further."""
    gamma, lr = 0.5, 0.1
    cfg = _cfg("mixed_float16", "ga.methods=isotropic", f"ga.isotropic.gamma={gamma}",
               "ga.isotropic.noise_scaling=per_element", "ga.isotropic.exclude=", "optim.optimizer=sgd",
               "optim.momentum=0.0", f"optim.learning_rate={lr}", "optim.weight_decay=0.0")
    batch = _batch(css_smoke, smoke_vectorizer, cfg)
    start = build_model(cfg, smoke_vectorizer.vocab_size).get_weights()
    moves = []
    for scale in (4.0, 2.0**10):  # (2^15 overflows on this fresh model's first step)
        model = build_model(cfg, smoke_vectorizer.vocab_size)  # the same noise seed (train.seed)
        model.set_weights(start)
        inner = keras.optimizers.SGD(lr, momentum=0.0)
        model.compile(optimizer=keras.optimizers.LossScaleOptimizer(inner, initial_scale=scale))
        before = [v.numpy() for v in model.trainable_variables]
        logs = model.train_on_batch(batch, return_dict=True)
        assert logs["skipped_steps"] == 0.0
        moves.append([v.numpy() - b for v, b in zip(model.trainable_variables, before)])
    big = max(range(len(moves[0])), key=lambda i: moves[0][i].size)  # the largest kernel
    a, b = moves[0][big], moves[1][big]
    # the update is -lr * (g + gamma * n): its spread is about lr * gamma (the noise dominates)
    assert 0.5 * lr * gamma < float(np.std(a)) < 2 * lr * gamma
    np.testing.assert_allclose(a, b, atol=1e-3 * lr * gamma + 1e-6)


def test_overflow_step_is_skipped_and_counted_not_a_divergence(css_smoke, smoke_vectorizer):
    from keras_irtf.training.backup import StopOnNonFiniteLoss

    cfg = _cfg("mixed_float16")
    model = build_model(cfg, smoke_vectorizer.vocab_size)
    model.compile(optimizer=make_optimizer(cfg, model))
    model.optimizer.build(model.trainable_variables)
    model.optimizer.dynamic_scale.assign(2.0**120)  # the scaled float16 gradients overflow
    before = [v.numpy() for v in model.trainable_variables]
    batch = _batch(css_smoke, smoke_vectorizer, cfg)
    logs = model.train_on_batch(batch, return_dict=True)
    assert logs["skipped_steps"] == 1.0
    assert all(np.isfinite(v) for v in logs.values()), logs  # the unscaled losses
    assert all(np.array_equal(v.numpy(), b) for v, b in zip(model.trainable_variables, before))
    assert float(model.optimizer.dynamic_scale.numpy()) == 2.0**119  # halved, as Keras does
    stop = StopOnNonFiniteLoss()
    stop.set_model(model)
    stop.on_train_batch_end(0, logs)  # no TrainingDiverged
    assert not model.stop_training
    model.optimizer.dynamic_scale.assign(2.0**120)
    history = model.fit(tf.data.Dataset.from_tensors(batch).repeat(2), epochs=1, verbose=0)
    assert history.history["skipped_steps"][-1] >= 1.0  # counted over the epoch
    assert all(np.isfinite(v[-1]) for v in history.history.values())


@pytest.mark.parametrize("precision", ("mixed_bfloat16", "mixed_float16"))
def test_keras_roundtrip_restores_the_policies(precision, css_smoke, smoke_vectorizer, tmp_path):
    cfg = _cfg(precision, "model.composer=concat")
    model = build_model(cfg, smoke_vectorizer.vocab_size)
    model.compile(optimizer=make_optimizer(cfg, model))
    batch = _batch(css_smoke, smoke_vectorizer, cfg)
    model.train_on_batch(batch)
    save_model(model, tmp_path / "m.keras")
    reloaded = load_model(tmp_path / "m.keras")
    assert keras.config.dtype_policy().name == "float32"
    assert reloaded.precision == precision
    for part in ("image_encoder", "text_encoder", "composer"):
        names = {layer.path: layer.dtype_policy.name for layer in _layers(getattr(reloaded, part))}
        assert set(names.values()) == {precision}, names
    assert reloaded.normalization.dtype_policy.name == "float32"
    for key in ("query", "target"):
        got, want = reloaded(batch)[key], model(batch)[key]
        assert got.dtype.name == "float32"
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert isinstance(reloaded.optimizer, keras.optimizers.LossScaleOptimizer) == (precision == "mixed_float16")


@pytest.mark.parametrize("precision", ("mixed_bfloat16", "mixed_float16"))
def test_export_returns_float32_embeddings_equal_to_the_model(precision, css_smoke_root, smoke_vectorizer, tmp_path):
    from keras_irtf import api
    from keras_irtf.data.images import normalize_images
    from keras_irtf.serving.export import export_model, read_export_info
    from tests.test_export import _png

    cfg = tiny_config(css_smoke_root, f"train.precision={precision}", "data.image_size=32")
    smoke_vectorizer.save(tmp_path / "vocab.txt")
    model = api.create_model(cfg, smoke_vectorizer, compile=False)
    path = export_model(model, cfg, tmp_path / "out", run_dir=tmp_path, verbose=False)
    assert read_export_info(path)["precision"] == precision
    pixels = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    texts = ["add a red cube", ""]
    loaded = tf.saved_model.load(str(path))
    served = loaded.signatures
    sig = served["serving_default"]
    assert {k: v.dtype for k, v in sig.structured_outputs.items()} == {"embedding": tf.float32}
    assert sorted(sig.structured_input_signature[1]) == ["image_bytes", "text"]
    got = sig(image_bytes=tf.constant([_png(p) for p in pixels]), text=tf.constant(texts))["embedding"].numpy()
    want = model.embed_queries(normalize_images(pixels.astype(np.float32)), smoke_vectorizer(texts)).numpy()
    # the SavedModel's graph and the eager Keras model round the 16-bit activations in a different
    # order: equal to a few units in the last place of the compute dtype (embeddings of norm
    # model.initial_scale = 4; measured 1.3e-3 bfloat16, 5e-4 float16), where another image or
    # text moves them by ~1
    ulp = {"mixed_bfloat16": 2.0**-8, "mixed_float16": 2.0**-11}[precision]
    assert np.max(np.abs(got - want)) <= 4 * ulp
    img = served["embed_image"](image_bytes=tf.constant([_png(p) for p in pixels]))["embedding"]
    assert img.dtype == tf.float32
    assert np.max(np.abs(img.numpy() - model.embed_images(normalize_images(pixels.astype(np.float32))).numpy())) <= 4 * ulp
    assert np.abs(got[0] - got[1]).max() > 0.1  # the two queries differ by far more


def test_evaluation_embeddings_are_float32_and_recorded(css_smoke_root, tmp_path):
    from keras_irtf.training.loop import train
    from keras_irtf.utils import read_json

    cfg = tiny_config(css_smoke_root, f"train.out={tmp_path / 'run'}", "train.precision=mixed_bfloat16",
                      "train.steps=4", "train.steps_per_epoch=4", "data.train_recall_queries=16",
                      "ga.methods=adversarial,isotropic", "loss.eta=0.1")
    run, metrics = train(cfg, verbose=0)
    saved = read_json(run / "metrics.json")
    assert saved["precision"] == "mixed_bfloat16"
    assert 0.0 <= saved["test"]["R@1"] <= 1.0 and np.isfinite(saved["final_losses"]["loss"])
    exp, model = Experiment.from_run(run, verbose=False)
    assert model.image_encoder.dtype_policy.name == "mixed_bfloat16"
    emb = model.embed_images(tf.zeros([2, cfg.data.image_size, cfg.data.image_size, 3]))
    assert emb.dtype == tf.float32


@pytest.mark.slow
@pytest.mark.parametrize("precision", ("mixed_bfloat16", "mixed_float16"))
def test_two_replicas_train_under_the_policy(precision, css_smoke_root):
    """TIRG with GA^A + GA^I + L_S under the policy, MirroredStrategy on 2 logical CPUs against one
    device (tests/distributed_equivalence_check.py in its own process): from the one-device
    states after 0, 2 and 4 steps, one step on each, one on 2 replicas with the replica bug of
    the negative control, and one step of the same model in float32 from the same state.

    The bound is the policy's own rounding, measured on this CPU: the one-device 16-bit step's
    distance from the float32 step. Two 16-bit computations of the same step (one device, and
    2 replicas summing the halves' gradients) differ by about that much, sqrt(2) times it if
    their roundings were independent (they share most of them: measured 0.3 to 0.55 of it under
    bfloat16); a 16-bit rounding that flips a ReLU or max-pool choice at one pixel can double it
    (measured 2.05 under float16 at one state); the bound is 4 times it. A CPU that computes
    16-bit products differently (native AVX-512 BF16 / AMX) moves both distances together, so
    the bound does not depend on the CPU. The control misses the one-device step by a whole
    gradient step (or is skipped for an overflow under float16): measured 16 to 18 times the
    float32 distance under bfloat16, over 100 times under float16, so it fails the bound.
    Under mixed_float16 the two runs skip the same steps (the fresh model's first step overflows
    the initial loss scale) and the logged terms are finite."""
    from tests.test_distributed_equivalence import run_check

    ga = ("ga.methods=adversarial,isotropic", "loss.eta=0.001", "ga.adversarial.eps=0.01", "ga.isotropic.gamma=0.01",
          "ga.isotropic.noise_scaling=per_element", "model.text_encoder.dropout=0.0")
    r = run_check(css_smoke_root, "trajectory", *ga, f"train.precision={precision}", CHECK_STATES="0,2,4",
                  CHECK_REFERENCE="float32")
    applied = 0
    for s in r["trajectory"]:
        single, mirrored = s["single_logs"], s["mirrored_logs"]
        assert set(single) == set(mirrored) and all(np.isfinite(v) for v in [*single.values(), *mirrored.values()])
        assert single.get("skipped_steps") == mirrored.get("skipped_steps"), s
        gap = s["single_to_reference_l2"]  # the policy's rounding of this step, on this CPU
        assert s["mirrored_l2"] <= 4 * gap, s
        if single.get("skipped_steps", 0.0) == 0.0:
            applied += 1
            assert s["control_l2"] > 4 * gap, s  # the replica bug fails the bound
    assert applied >= 2, r["trajectory"]


@pytest.fixture(scope="module")
def tiny_hub_bert(tmp_path_factory, css_smoke):
    from keras_irtf.data.text_cache import texts_of_run
    from keras_irtf.testing.tiny_bert import make_tiny_hub_bert

    return make_tiny_hub_bert(tmp_path_factory.mktemp("hub_bert"), texts_of_run(css_smoke), hidden_size=24)


@pytest.mark.parametrize("precision", ("mixed_bfloat16", "mixed_float16"))
def test_frozen_bert_text_cache_under_the_policy(precision, css_smoke, tiny_hub_bert):
    """A frozen BERT encoder read through the text-embedding cache: the cache is filled once
    (float32 rows), training with GA^A + GA^I reads it under the policy."""
    from keras_irtf.data.pipeline import training_dataset
    from keras_irtf.data.text_cache import prepare_text_input, texts_of_run

    pre, enc = tiny_hub_bert
    cfg = tiny_config(None, "model.text_encoder=bert_hub", f"model.text_encoder.preprocess={pre}",
                      f"model.text_encoder.encoder={enc}", "model.text_encoder.dim=24",
                      "model.text_encoder.seq_length=32", f"train.precision={precision}", *GA[:2],
                      "train.batch_size=8")
    model = build_model(cfg, 0)
    vectorizer = prepare_text_input(model.text_encoder, texts_of_run(css_smoke), True)
    model.compile(optimizer=make_optimizer(cfg, model))
    runs = model.text_encoder.encoder_runs
    ds = training_dataset(css_smoke, vectorizer, 8, 3, 0, cfg.data.image_size)
    history = model.fit(ds, epochs=1, steps_per_epoch=3, verbose=0)
    assert model.text_encoder.encoder_runs == runs  # training read the cache, never ran BERT
    assert all(np.isfinite(v[-1]) for v in history.history.values()), history.history
    assert model.text_encoder.cache.table.dtype == tf.float32
    assert model.composer.dtype_policy.name == precision
