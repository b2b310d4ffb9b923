"""A pretrained image encoder: a keras-hub backbone read from a LOCAL preset folder.

    encoder = PretrainedImageEncoder.from_preset("/data/presets/resnet_18_imagenet", output_dim=512)

The default architecture is keras-hub's ResNet-18 (the `resnet_18_imagenet` preset: basic blocks
2/2/2/2, 64..512 filters), as TIRG uses: the backbone's last feature map is averaged over space
and projected linearly to `output_dim` (the projection is new and trained at the full learning
rate; the backbone's layers at `optim.backbone_lr_multiplier` times it, 0.1 in the reference).

Inputs are the pipeline's images: resized (shorter side) and centre-cropped to 224, ImageNet
mean/std-normalised. If the preset's image converter (`image_converter.json`) expects another
scaling, the encoder converts per channel before the backbone, so the weights see the inputs
they were trained with.

keras_irtf never downloads: `preset` must be a folder. A bare preset name such as
"resnet_18_imagenet" is refused (keras-hub would go to the network for it), with instructions.
keras-hub is an optional dependency, the `hub` extra (`pip install -e '.[hub]'` in the keras_irtf
checkout), imported only when an encoder that needs it is built. `import_keras_hub` and
`require_keras_hub` are what every such encoder (this one, clip / siglip, bert_keras_hub) uses to
say so, naming the encoder that needs it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import keras

from keras_irtf.config import ConfigError
from keras_irtf.layers.base import ImageEncoder
from keras_irtf.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from keras_irtf.utils import optional_import

_FETCH_HELP = (
    "To get a local copy, on a machine with network access run\n"
    "    python -c \"import keras_hub; keras_hub.models.Backbone.from_preset('resnet_18_imagenet')"
    ".save_to_preset('resnet_18_imagenet')\"\n"
    "(or download the model 'keras/resnetv1', variation 'resnet_18_imagenet', from Kaggle and unpack it), "
    "copy the folder here and pass its path, e.g. --image-weights ./resnet_18_imagenet"
)


# how to install keras-hub: keras_irtf's `hub` extra (setup.cfg), from the checkout
HUB_INSTALL = "pip install -e '.[hub]'"
RESNET_NEEDS = "the pretrained image encoder (model.image_encoder.weights / --image-weights)"


class KerasHubMissing(ConfigError, ImportError):
    """keras-hub, an optional dependency, is not installed or does not import. A ConfigError
    (the tools print it in one line, like any other setup problem) and an ImportError."""


def _keras_hub_message(needed_by: str, error=None) -> str:
    if error is None or (isinstance(error, ModuleNotFoundError) and error.name == "keras_hub"):
        return (f"{needed_by} needs keras-hub, which is not installed. It is keras_irtf's optional `hub` extra "
                f"(keras_irtf[hub]: keras-hub==0.32.*): install it with `{HUB_INSTALL}` in the keras_irtf checkout")
    return (f"{needed_by} needs keras-hub, which is installed but does not import ({type(error).__name__}: "
            f"{str(error)[:300]}). Reinstall keras_irtf's `hub` extra (keras_irtf[hub]: keras-hub==0.32.*, whose "
            f"tokenizers need tensorflow-text>=2.21.1) with `{HUB_INSTALL}` in the keras_irtf checkout")


def require_keras_hub(needed_by: str = RESNET_NEEDS):
    """KerasHubMissing (naming `needed_by` and the `hub` extra) when keras-hub is not installed;
    cheap (keras-hub is looked up, not imported): the start-up checks use it."""
    if importlib.util.find_spec("keras_hub") is None:
        raise KerasHubMissing(_keras_hub_message(needed_by))


def import_keras_hub(needed_by: str = RESNET_NEEDS):
    """The keras_hub module, or KerasHubMissing naming `needed_by` (e.g. "the siglip image
    encoder (model.image_encoder=siglip)") and how to install the `hub` extra."""
    try:
        return optional_import("keras_hub", "hub", needed_by)
    except ImportError as e:
        raise KerasHubMissing(_keras_hub_message(needed_by, e.__cause__ or e)) from e


# keras-hub backbones that another keras_irtf encoder reads: given as ResNet weights, the error
# says which encoder to use instead
_OTHER_ENCODERS = {
    "CLIPBackbone": ("a CLIP preset", "--set model.image_encoder=clip --set model.text_encoder=clip --set "
                                      "model.clip_preset=DIR (tools/train.py --clip-preset DIR)"),
    "SigLIPBackbone": ("a SigLIP preset", "--set model.image_encoder=siglip --set model.text_encoder=siglip --set "
                                          "model.clip_preset=DIR (tools/train.py --clip-preset DIR)"),
    "BertBackbone": ("a BERT preset (a text encoder)", "--set model.text_encoder=bert_keras_hub --set "
                                                       "model.text_encoder.preset=DIR"),
}


def _backbone_class(path: Path):
    """The class_name of a preset's config.json, or None when it cannot be read."""
    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data.get("class_name") if isinstance(data, dict) else None


def resolve_preset_dir(preset) -> str:
    """The absolute path of a local keras-hub preset folder for this encoder, or ConfigError
    explaining what to pass (a CLIP, SigLIP or BERT preset is named, with the encoder that reads
    it); KerasHubMissing when keras-hub, which reads the folder, is not installed."""
    text = str(preset)
    path = Path(text).expanduser()
    if not path.is_dir():
        bare = "/" not in text and "\\" not in text and not text.startswith(".") and not text.startswith("~")
        if bare:
            raise ConfigError(
                f"model.image_encoder.weights={text!r} is a bare preset name: keras-hub would try to download it, "
                f"and keras_irtf never downloads at run time. Pass the path of a local preset folder "
                f"(containing config.json and model.weights.h5) instead. " + _FETCH_HELP
            )
        raise ConfigError(f"model.image_encoder.weights: {path} is not a folder. " + _FETCH_HELP)
    missing = [n for n in ("config.json", "model.weights.h5") if not (path / n).is_file()]
    if missing:
        raise ConfigError(
            f"model.image_encoder.weights: {path} is not a keras-hub preset folder (missing {', '.join(missing)}). "
            f"A preset folder is what `Backbone.save_to_preset(DIR)` writes. " + _FETCH_HELP
        )
    other = _OTHER_ENCODERS.get(_backbone_class(path))
    if other is not None:
        what, how = other
        raise ConfigError(
            f"model.image_encoder.weights: {path.resolve()} is {what}, not an image backbone for "
            f"model.image_encoder=resnet18 (--image-weights). To use it, pass it to the encoder that reads it: "
            f"{how}, with DIR={path.resolve()}"
        )
    require_keras_hub()
    return str(path.resolve())


def preset_input_transform(preset_dir):
    """(scale, offset) per channel taking ImageNet-normalised inputs to what the preset's image
    converter produces from 0..255 pixels; None when they are the same (or it has no converter)."""
    path = Path(preset_dir) / "image_converter.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text()).get("config", {})
    scale, offset = config.get("scale"), config.get("offset")

    def per_channel(v, default):
        if v is None:
            return [default] * 3
        return [float(x) for x in v] if isinstance(v, (list, tuple)) else [float(v)] * 3

    scale, offset = per_channel(scale, 1.0), per_channel(offset, 0.0)
    # pixels u = (x * std + mean) * 255; the preset wants u * scale + offset
    a = [s * sd * 255.0 for s, sd in zip(scale, IMAGENET_STD)]
    b = [s * m * 255.0 + o for s, m, o in zip(scale, IMAGENET_MEAN, offset)]
    if all(abs(x - 1.0) < 1e-3 for x in a) and all(abs(x) < 1e-3 for x in b):
        return None
    return a, b


@keras.saving.register_keras_serializable(package="keras_irtf")
class PretrainedImageEncoder(ImageEncoder):
    """keras-hub backbone -> global average pooling -> Dense(output_dim).

    Args:
        backbone: a keras-hub Backbone (or its serialised config, when reloading a saved model).
        output_dim: size of the image feature.
        preset: the folder the weights came from (recorded for reference; a reloaded model takes its
            weights from the .keras file and does not need the folder).
        input_scale, input_offset: per-channel conversion from ImageNet-normalised inputs to the
            backbone's expected inputs (None = identity).
    """

    def __init__(self, backbone, output_dim=512, preset=None, input_scale=None, input_offset=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(backbone, dict):
            import_keras_hub()  # registers the keras-hub classes
            backbone = keras.saving.deserialize_keras_object(backbone)
        self.backbone = backbone
        self.output_dim = int(output_dim)
        self.preset = preset
        self.input_scale = list(input_scale) if input_scale is not None else None
        self.input_offset = list(input_offset) if input_offset is not None else None
        self.pool = keras.layers.GlobalAveragePooling2D(name="pool")
        self.projection = keras.layers.Dense(self.output_dim, name="projection")

    @classmethod
    def from_preset(cls, preset, output_dim=512, **kwargs):
        """Load the backbone's architecture and weights from a local keras-hub preset folder."""
        folder = resolve_preset_dir(preset)
        keras_hub = import_keras_hub()
        backbone = keras_hub.models.Backbone.from_preset(folder)
        transform = preset_input_transform(folder)
        scale, offset = transform if transform else (None, None)
        return cls(backbone, output_dim=output_dim, preset=folder, input_scale=scale, input_offset=offset, **kwargs)

    @property
    def pretrained(self) -> bool:
        return self.preset is not None

    def backbone_variables(self):
        """The variables trained at the reduced (pretrained-layer) learning rate."""
        return list(self.backbone.trainable_variables)

    def pretrained_variables(self) -> list:
        return self.backbone_variables() if self.pretrained else []

    def build(self, input_shape):
        if not self.projection.built:
            feature_shape = self.backbone.compute_output_shape(tuple(input_shape))
            self.projection.build((feature_shape[0], feature_shape[-1]))
        self.built = True

    def call(self, images, training=False):
        x = images
        if self.input_scale is not None:
            x = x * keras.ops.convert_to_tensor(self.input_scale, x.dtype) + keras.ops.convert_to_tensor(
                self.input_offset, x.dtype)
        return self.projection(self.pool(self.backbone(x, training=training)))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.output_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            backbone=keras.saving.serialize_keras_object(self.backbone),
            output_dim=self.output_dim,
            preset=self.preset,
            input_scale=self.input_scale,
            input_offset=self.input_offset,
        )
        return config
