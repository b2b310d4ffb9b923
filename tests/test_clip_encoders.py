"""CLIP and SigLIP encoders (keras_irtf.layers.clip) on tiny random keras-hub presets."""

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from keras_irtf.config import ConfigError, load_config
from keras_irtf.layers.clip import (CLIPImageEncoder, CLIPTextEncoder, SigLIPImageEncoder, SigLIPTextEncoder,
                                    resolve_preset, CLIP)
from keras_irtf.testing.tiny_clip import make_tiny_clip_preset, make_tiny_siglip_preset

TEXTS = ["add red cube to top-left", "remove blue sphere", "make yellow cylinder big!", "is 2 sizes larger"]
SIDE = 32  # the tiny towers' input side
FAMILIES = {
    "clip": dict(image=CLIPImageEncoder, text=CLIPTextEncoder, dim=16),
    "siglip": dict(image=SigLIPImageEncoder, text=SigLIPTextEncoder, dim=32),
}


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_presets")
    return {"clip": make_tiny_clip_preset(root / "tiny_clip", TEXTS, seed=1),
            "siglip": make_tiny_siglip_preset(root / "tiny_siglip", TEXTS, seed=2)}


@pytest.fixture(scope="module")
def backbones(presets):
    import keras_hub

    return {"clip": keras_hub.models.CLIPBackbone.from_preset(presets["clip"]),
            "siglip": keras_hub.models.SigLIPBackbone.from_preset(presets["siglip"])}


@pytest.fixture(scope="module")
def encoders(presets):
    return {f: (spec["image"].from_preset(presets[f]), spec["text"].from_preset(presets[f]))
            for f, spec in FAMILIES.items()}


def images(n=3, seed=0):
    return np.random.default_rng(seed).normal(size=(n, SIDE, SIDE, 3)).astype("float32")


def preset_token_ids(folder, family, texts):
    """The preset preprocessor's token ids (its TensorFlow path: what runs in a graph)."""
    import keras_hub

    cls = keras_hub.models.CLIPPreprocessor if family == "clip" else keras_hub.models.SigLIPPreprocessor
    pre = cls.from_preset(folder, image_converter=None)
    return tf.function(lambda t: pre({"prompts": t, "images": None})["token_ids"])(tf.constant(texts))


def config(family, folder, *extra):
    return load_config([], [f"model.image_encoder={family}", f"model.image_encoder.preset={folder}",
                            f"model.text_encoder={family}", "model.composer=tirg",
                            f"model.embed_dim={FAMILIES[family]['dim']}", *extra])


def png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# ---- presets and errors ---------------------------------------------------------------------------
def test_tiny_presets_load_with_keras_hub(presets):
    import keras_hub

    folder = presets["clip"]
    tokenizer = keras_hub.models.CLIPTokenizer.from_preset(folder)
    assert tokenizer.end_token_id == tokenizer.vocabulary_size() - 1  # the text pooler's argmax
    converter = keras_hub.layers.CLIPImageConverter.from_preset(folder)
    assert tuple(converter.image_size) == (SIDE, SIDE)
    sp = keras_hub.models.SigLIPTokenizer.from_preset(presets["siglip"])
    assert sp.vocabulary_size() > 10 and sp.end_token_id is not None


def test_bare_names_urls_and_missing_folders_are_refused_with_the_how_to(presets, tmp_path):
    how_to = r"save_to_preset\(DIR\).*keras/clip/keras/clip_vit_base_patch16"
    with pytest.raises(ConfigError, match=r"bare preset name.*would download.*" + how_to):
        CLIPImageEncoder.from_preset("clip_vit_base_patch16")
    for url in ("https://www.kaggle.com/models/keras/clip", "kaggle://keras/clip/keras/clip_vit_base_patch16/3",
                "hf://openai/clip-vit-base-patch16"):
        with pytest.raises(ConfigError, match="is a URL or a hub handle.*" + how_to):
            CLIPTextEncoder.from_preset(url)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_preset(str(tmp_path / "nowhere"), "model.image_encoder.preset", CLIP)
    with pytest.raises(ConfigError, match="not a keras-hub preset folder.*config.json"):
        resolve_preset(str(tmp_path), "model.image_encoder.preset", CLIP)
    with pytest.raises(ConfigError, match="holds a SigLIPBackbone, not a CLIPBackbone"):
        CLIPImageEncoder.from_preset(presets["siglip"])
    from keras_irtf.experiment import Experiment

    with pytest.raises(ConfigError, match="model.image_encoder.preset is not set.*save_to_preset"):
        Experiment(load_config([], ["model.image_encoder=clip"]), verbose=False).preprocessor


def test_importing_keras_irtf_and_its_registry_does_not_import_keras_hub():
    code = ("import sys, keras_irtf; from keras_irtf.registry import IMAGE_ENCODERS, load_builtins; load_builtins(); "
            "from keras_irtf.config import load_config; load_config([], ['model.image_encoder=siglip']); "
            "assert 'clip' in IMAGE_ENCODERS; print('keras_hub' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


# ---- preprocessing --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_preprocessor_is_the_presets_image_converter(family, presets):
    import keras_hub
    from keras_irtf.experiment import Experiment

    folder = presets[family]
    # data.image_size does not apply: the tower's input side does
    prep = Experiment(config(family, folder, "data.image_size=64"), verbose=False).preprocessor
    assert prep.size == SIDE
    d = prep.describe()
    assert d["name"] == f"{family}:{os.path.basename(folder)}"
    want_mean, want_std = ((0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)) if family == "clip" else ((0.5,) * 3,) * 2
    np.testing.assert_allclose(d["mean"], want_mean, atol=1e-4)
    np.testing.assert_allclose(d["std"], want_std, atol=1e-4)
    image = np.random.default_rng(3).integers(0, 256, size=(SIDE, SIDE, 3)).astype("uint8")
    converter = keras_hub.layers.ImageConverter.from_preset(folder)
    expected = np.asarray(converter(image[None].astype("float32")))[0]
    np.testing.assert_allclose(prep(tf.constant(image)).numpy(), expected, atol=1e-5)


# ---- outputs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_outputs_are_the_backbones_embeddings(family, presets, backbones, encoders):
    image_encoder, text_encoder = encoders[family]
    backbone = backbones[family]
    dim = FAMILIES[family]["dim"]
    assert image_encoder.output_dim == text_encoder.output_dim == dim
    x = images()
    out = image_encoder(x)
    assert out.dtype == tf.float32 and out.shape == (3, dim)
    np.testing.assert_allclose(out, backbone.get_vision_embeddings(x), atol=1e-6)
    np.testing.assert_allclose(image_encoder.encode_images(x), out, atol=1e-6)
    ids = preset_token_ids(presets[family], family, TEXTS)
    expected = np.asarray(backbone.get_text_embeddings(ids))
    texts = tf.constant(TEXTS)
    np.testing.assert_allclose(text_encoder(texts), expected, atol=1e-5)
    graph = tf.function(lambda s: text_encoder(s), input_signature=[tf.TensorSpec([None], tf.string)])
    np.testing.assert_allclose(graph(texts), expected, atol=1e-5)
    # eager calls tokenise like the graph (keras-hub's Python path splits CLIP digits otherwise)
    np.testing.assert_array_equal(text_encoder.token_ids(texts), ids)
    assert not np.allclose(expected[0], expected[1])
    # only one tower each: the image encoder holds no text weights and vice versa
    image_weights = {id(v) for v in image_encoder.weights}
    assert image_weights.isdisjoint(id(v) for v in backbone.text_encoder.weights)
    assert len(image_encoder.weights) + len(text_encoder.weights) < len(backbone.weights)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_cached_ids_equal_the_direct_path(family, encoders):
    from keras_irtf.data.text_cache import TextEmbeddingCache

    image_encoder, text_encoder = encoders[family]
    x = images(4, seed=5)

    class FeatureCache:  # the interface the frozen-feature cache offers: gather(ids) -> [B, D]
        def __init__(self, encoder, pixels):
            self.table = tf.constant(encoder.encode_images(pixels))

        def gather(self, ids):
            return tf.gather(self.table, ids)

    with pytest.raises(ValueError, match="no feature cache attached"):
        image_encoder(tf.constant([0, 1]))
    image_encoder.attach_cache(FeatureCache(image_encoder, x))
    try:
        np.testing.assert_allclose(image_encoder(tf.constant([2, 0, 2])), image_encoder(x[[2, 0, 2]]), atol=1e-6)
        assert image_encoder.cacheable
    finally:
        image_encoder.attach_cache(None)

    cache = TextEmbeddingCache(text_encoder)
    assert cache.add(TEXTS) == len(TEXTS)
    text_encoder.attach_cache(cache)
    try:
        sample = [TEXTS[3], TEXTS[0], TEXTS[3]]
        ids = cache.vectorizer()(tf.constant(sample))
        np.testing.assert_allclose(text_encoder(ids), text_encoder(tf.constant(sample)), atol=1e-6)
    finally:
        text_encoder.attach_cache(None)


# ---- trainability -----------------------------------------------------------------------------------
def _gradients(layer, inputs, variables):
    variables = [v.value for v in variables]  # the tf.Variables behind Keras variables
    with tf.GradientTape() as tape:
        tape.watch(variables)
        loss = tf.reduce_sum(tf.square(layer(inputs, training=True)))
    return tape.gradient(loss, variables)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_frozen_by_default_and_finetune_makes_the_towers_trainable(family, presets):
    from keras_irtf.experiment import Experiment
    from keras_irtf.model.optimizers import pretrained_learning_rate_groups

    cfg = config(family, presets[family])
    frozen = Experiment(cfg, verbose=False).build_model()
    for part, inputs in ((frozen.image_encoder, images(2)), (frozen.text_encoder, tf.constant(TEXTS[:2]))):
        assert not part.trainable and part.trainable_weights == [] and part.pretrained_variables() == []
    assert all(g is None for g in _gradients(frozen.text_encoder, tf.constant(TEXTS[:2]),
                                             frozen.text_encoder.tower.weights))  # stop_gradient
    # a frozen image tower still passes the gradient to its input pixels (GA^A at ga.point=input
    # with cache: false, the robustness attacks), though none of its variables trains
    pixels = tf.constant(images(2))
    with tf.GradientTape() as tape:
        tape.watch(pixels)
        out = tf.reduce_sum(tf.square(frozen.image_encoder(pixels)))
    assert float(tf.reduce_sum(tf.abs(tape.gradient(out, pixels)))) > 0
    assert pretrained_learning_rate_groups(frozen, 0.1) == []
    tower_ids = {id(v) for part in (frozen.image_encoder, frozen.text_encoder) for v in part.weights}
    assert tower_ids.isdisjoint(id(v) for v in frozen.trainable_variables)  # what the optimizer updates
    assert len(frozen.trainable_variables) == len(frozen.composer.trainable_weights) + 1  # + the scale

    for mode, tuned in (("text", {"text"}), ("image", {"image"}), ("both", {"image", "text"})):
        cfg = config(family, presets[family])
        cfg.model.finetune = mode  # the key model.finetune (none | text | image | both)
        model = Experiment(cfg, verbose=False).build_model()
        expected_count = 0
        for kind, part, inputs in (("image", model.image_encoder, images(2)),
                                   ("text", model.text_encoder, tf.constant(TEXTS[:2]))):
            assert part.trainable == (kind in tuned)
            if kind in tuned:
                variables = part.pretrained_variables()
                assert variables and {id(v) for v in variables} == {id(v) for v in part.trainable_weights}
                assert {id(v) for v in part.tower.trainable_weights} <= {id(v) for v in variables}
                grads = _gradients(part, inputs, part.tower.trainable_weights)
                assert sum(g is not None and float(tf.reduce_sum(tf.abs(g))) > 0 for g in grads) > len(grads) // 2
                expected_count += len(variables)
            else:
                assert part.pretrained_variables() == [] and part.trainable_weights == []
        (group, multiplier), = pretrained_learning_rate_groups(model, 0.1)
        assert multiplier == 0.1 and len(group) == expected_count
        trainable = {id(v) for v in model.trainable_variables}
        assert {id(v) for v in group} <= trainable
        assert len(trainable) == expected_count + len(model.composer.trainable_weights) + 1
        if "text" in tuned:
            with pytest.raises(ValueError, match="fine-tuned.*model.text_encoder.cache=false"):
                model.text_encoder.attach_cache(object())
            assert not model.text_encoder.cacheable


def test_text_encoder_borrows_the_image_encoders_preset(presets):
    from keras_irtf.experiment import Experiment

    model = Experiment(config("clip", presets["clip"]), verbose=False).build_model()
    assert model.text_encoder.preset == model.image_encoder.preset == os.path.abspath(presets["clip"])
    # no image encoder of the same family: the key to set is named
    for image in (["model.image_encoder=small_cnn"], ["model.image_encoder=siglip",
                                                       f"model.image_encoder.preset={presets['siglip']}"]):
        cfg = load_config([], image + ["model.text_encoder=clip", "model.embed_dim=16"])
        with pytest.raises(ConfigError, match="model.text_encoder.preset is not set.*model.image_encoder=clip"):
            Experiment(cfg, verbose=False).build_model()
    # its own preset wins, and a sequence length within the tower's context is honoured
    cfg = load_config([], ["model.image_encoder=small_cnn", "model.text_encoder=siglip", "model.embed_dim=32",
                           f"model.text_encoder.preset={presets['siglip']}", "model.text_encoder.sequence_length=8"])
    model = Experiment(cfg, verbose=False).build_model()
    assert model.text_encoder.token_ids(tf.constant(TEXTS)).shape == (len(TEXTS), 8)
    cfg.model.text_encoder.sequence_length = 999
    with pytest.raises(ConfigError, match="at most 16 tokens"):
        Experiment(cfg, verbose=False).build_model()


# ---- saving and export -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_keras_round_trip_and_export(family, presets, tmp_path):
    from keras_irtf.experiment import Experiment, load_model, save_model
    from keras_irtf.serving.export import export_model

    folder = shutil.copytree(presets[family], tmp_path / "preset")
    cfg = config(family, folder)
    exp = Experiment(cfg, verbose=False)
    model = exp.build_model()
    x, texts = images(len(TEXTS), seed=7), tf.constant(TEXTS)
    queries = model.embed_queries(x, texts).numpy()
    gallery = model.embed_images(x).numpy()
    save_model(model, tmp_path / "model.keras")

    # export, then take the preset folder away: the .keras file is self-contained
    image = np.random.default_rng(9).integers(0, 256, size=(40, 52, 3)).astype("uint8")  # resized + cropped
    path = export_model(model, cfg, tmp_path / "exported", verbose=False)
    shutil.rmtree(folder)
    reloaded = load_model(tmp_path / "model.keras")
    assert type(reloaded.text_encoder) is FAMILIES[family]["text"]
    assert not reloaded.image_encoder.trainable and not reloaded.text_encoder.trainable
    np.testing.assert_allclose(reloaded.embed_queries(x, texts), queries, atol=1e-6)
    np.testing.assert_allclose(reloaded.embed_images(x), gallery, atol=1e-6)

    import tensorflow_text  # noqa: F401  (the tokenizers' ops, as a serving process needs)

    served = tf.saved_model.load(str(path)).signatures["serving_default"]
    got = served(image_bytes=tf.constant([png(image)] * 2), text=tf.constant(TEXTS[1:3]))["embedding"].numpy()
    pixels = tf.stack([exp.preprocessor(tf.constant(image))] * 2)
    want = model.embed_queries(pixels, tf.constant(TEXTS[1:3])).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(got[0], got[1])


def test_a_damaged_preset_folder_is_named(presets, tmp_path):
    import shutil

    from keras_irtf.layers.clip import CLIPImageEncoder

    folder = tmp_path / "damaged"
    shutil.copytree(presets["clip"], folder)
    (folder / "image_converter.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"image_converter.json: cannot be read as JSON.*save_to_preset"):
        CLIPImageEncoder._preset_preprocessor(str(folder))
    config = json.loads((folder / "config.json").read_text())
    del config["config"]["vision_encoder"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config.json: no 'config.vision_encoder'"):
        CLIPImageEncoder._preset_preprocessor(str(folder))
    with pytest.raises(ConfigError, match=r"damaged.*could not load the preset's backbone|could not load"):
        CLIPImageEncoder.from_preset(str(folder))

