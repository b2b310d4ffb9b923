"""The pretrained image encoder: a keras-hub backbone from a LOCAL preset folder (a tiny random
ResNetBackbone saved with save_to_preset here), bare preset names refused, input conversion,
the 0.1x backbone learning rate, saving and reloading, and a training step through
tools/train.py --image-weights."""

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

import keras  # noqa: E402

from keras_irtf.config import ConfigError, load_config, repo_configs_dir  # noqa: E402
from keras_irtf.layers.pretrained import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    PretrainedImageEncoder,
    import_keras_hub,
    preset_input_transform,
    resolve_preset_dir,
)

ROOT = Path(__file__).resolve().parent.parent


def tiny_backbone():
    """The resnet_18 block structure (basic blocks, 7x7 stem of 64, no pre-activation), shrunk."""
    return keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 32],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(None, None, 3),
    )


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("presets") / "tiny_resnet"
    keras.utils.set_random_seed(1)
    tiny_backbone().save_to_preset(str(folder))
    converter = keras_hub.layers.ResNetImageConverter(
        image_size=(224, 224), scale=[1 / (255 * s) for s in IMAGENET_STD],
        offset=[-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], crop_to_aspect_ratio=True)
    converter.save_to_preset(str(folder))
    return folder


def config(*overrides):
    return load_config([repo_configs_dir() / "mitstates.yaml"], [
        "data.image_size=32", "model.embed_dim=16", "model.text_encoder.word_embed_dim=8", "model.text_encoder.hidden_dim=16",
        "train.batch_size=4", *overrides])


def test_bare_preset_name_is_refused_without_network(monkeypatch, tmp_path):
    def no_download(*args, **kwargs):
        raise AssertionError("from_preset must not be reached for a bare name")

    monkeypatch.setattr(keras_hub.models.Backbone, "from_preset", no_download)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resnet_18_imagenet").mkdir()  # even a folder of that name: keras-hub would still download
    (tmp_path / "resnet_18_imagenet" / "config.json").write_text("{}")
    with pytest.raises(ConfigError) as err:
        PretrainedImageEncoder.from_preset("resnet_18_imagenet_v2")
    assert "bare preset name" in str(err.value) and "never downloads" in str(err.value)
    assert "--image-weights ./resnet_18_imagenet" in str(err.value)
    with pytest.raises(ConfigError, match="missing model.weights.h5"):
        resolve_preset_dir("./resnet_18_imagenet")
    with pytest.raises(ConfigError, match="is not a folder"):
        resolve_preset_dir(str(tmp_path / "elsewhere" / "resnet"))


def test_missing_keras_hub_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "keras_hub", None)
    with pytest.raises(ImportError, match=r"keras_irtf\[hub\]"):
        import_keras_hub()


def test_input_conversion_follows_the_preset_converter(preset, tmp_path):
    assert preset_input_transform(preset) is None  # ImageNet mean/std: nothing to convert
    other = tmp_path / "p"
    shutil.copytree(preset, other)
    text = (other / "image_converter.json").read_text()
    import json

    cfg = json.loads(text)
    cfg["config"]["scale"], cfg["config"]["offset"] = 1 / 255.0, None  # a preset wanting 0..1 pixels
    (other / "image_converter.json").write_text(json.dumps(cfg))
    scale, offset = preset_input_transform(other)
    assert np.allclose(scale, IMAGENET_STD) and np.allclose(offset, IMAGENET_MEAN)
    enc = PretrainedImageEncoder.from_preset(other, output_dim=8)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    got = np.asarray(enc(x))
    expected = enc.projection(enc.pool(enc.backbone(x * np.array(IMAGENET_STD, "float32")
                                                    + np.array(IMAGENET_MEAN, "float32"))))
    assert np.allclose(got, expected, atol=1e-5)


def test_build_model_loads_the_preset_weights(preset, caplog):
    from keras_irtf.experiment import build_model

    caplog.set_level("INFO", logger="keras_irtf")
    model = build_model(config(f"model.image_encoder.weights={preset}"), vocab_size=20)
    enc = model.image_encoder
    assert isinstance(enc, PretrainedImageEncoder) and enc.pretrained and enc.input_scale is None
    saved = keras_hub.models.Backbone.from_preset(str(preset))
    for a, b in zip(enc.backbone.weights, saved.weights):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert "pretrained keras-hub backbone from" in caplog.text
    # weights are a key of resnet18 only: on the small CNN they are refused, naming who has them
    with pytest.raises(ConfigError, match="unknown key model.image_encoder.weights.*is a key of: resnet18"):
        config("model.image_encoder=small_cnn", f"model.image_encoder.weights={preset}")


def test_random_init_is_logged(caplog):
    from keras_irtf.layers import ResNet18Encoder
    from keras_irtf.experiment import build_model

    caplog.set_level("INFO", logger="keras_irtf")
    model = build_model(config(), vocab_size=20)
    assert isinstance(model.image_encoder, ResNet18Encoder)
    assert "random initialisation" in caplog.text


def test_backbone_learning_rate_is_a_tenth(preset):
    from keras_irtf.model.optimizers import MultiplierSGD
    from keras_irtf.experiment import build_model, make_optimizer

    cfg = config(f"model.image_encoder.weights={preset}", "optim.weight_decay=0")
    model = build_model(cfg, vocab_size=20)
    opt = make_optimizer(cfg, model)
    assert isinstance(opt, MultiplierSGD)
    backbone = {id(v) for v in model.image_encoder.backbone.trainable_variables}
    for v in model.trainable_variables:
        assert opt.learning_rate_multiplier(v) == (0.1 if id(v) in backbone else 1.0)
    assert type(make_optimizer(cfg)) is keras.optimizers.SGD  # no model: plain SGD

    # the Python API builds the same optimizer (it once lost the multiplier)
    from keras_irtf import api

    compiled = api.create_model(cfg, 20)
    assert isinstance(compiled.optimizer, MultiplierSGD)
    api_backbone = compiled.image_encoder.backbone.trainable_variables
    assert api_backbone and all(compiled.optimizer.learning_rate_multiplier(v) == 0.1 for v in api_backbone)
    assert compiled.optimizer.learning_rate_multiplier(compiled.image_encoder.projection.kernel) == 1.0

    # one SGD step with unit gradients: the multiplied variable moves a tenth as far
    a, b = keras.Variable(np.zeros(3, "float32")), keras.Variable(np.zeros(3, "float32"))
    sgd = MultiplierSGD(learning_rate=0.5, momentum=0.9)
    sgd.set_learning_rate_multiplier([a], 0.1)
    sgd.apply([np.ones(3, "float32")] * 2, [a, b])
    assert np.allclose(np.asarray(a), -0.05) and np.allclose(np.asarray(b), -0.5)


def test_saved_model_reloads_without_the_preset_folder(preset, tmp_path):
    from keras_irtf.experiment import build_model, load_model, save_model

    folder = tmp_path / "preset_copy"
    shutil.copytree(preset, folder)
    model = build_model(config(f"model.image_encoder.weights={folder}"), vocab_size=20)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    before = np.asarray(model.embed_images(x))
    save_model(model, tmp_path / "m.keras")
    shutil.rmtree(folder)
    again = load_model(tmp_path / "m.keras")
    assert isinstance(again.image_encoder, PretrainedImageEncoder)
    assert np.allclose(np.asarray(again.embed_images(x)), before, atol=1e-5)


@pytest.mark.slow
def test_tools_train_with_image_weights_trains_a_step(preset, tmp_path, capsys):
    from keras_irtf.testing.fixtures import write_mitstates
    from keras_irtf.experiment import load_model

    data = write_mitstates(tmp_path / "ms")
    spec = importlib.util.spec_from_file_location("train_tool", ROOT / "tools" / "train.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "run"
    rc = tool.main([
        "--dataset", "mitstates", "--data-root", str(data), "--image-weights", str(preset), "--steps", "1",
        "--out", str(out), "--set", "data.image_size=32", "--set", "train.batch_size=4",
        "--set", "train.steps_per_epoch=1", "--set", "data.train_recall_queries=8", "--set", "model.embed_dim=16",
        "--set", "model.text_encoder.word_embed_dim=8", "--set", "model.text_encoder.hidden_dim=16", "--set", "eval.batch_size=16",
    ])
    assert rc == 0
    printed = capsys.readouterr()
    assert "pretrained keras-hub backbone from" in printed.err  # a note of the log, on standard error
    assert "pretrained keras-hub" not in printed.out  # standard output carries the results only
    model = load_model(out / "model.keras")
    saved = keras_hub.models.Backbone.from_preset(str(preset))
    kernel = "conv1_conv/kernel"
    trained = {v.path: np.asarray(v) for v in model.image_encoder.backbone.weights}
    start = {v.path: np.asarray(v) for v in saved.weights}
    moved = np.abs(trained[kernel] - start[kernel]).max()
    assert 0 < moved < 1e-2  # one step at lr 0.01 x 0.1 moved the pretrained stem, a little
