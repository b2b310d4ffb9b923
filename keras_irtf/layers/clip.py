"""CLIP and SigLIP image and text encoders, read from LOCAL keras-hub preset folders.

    --set model.image_encoder=clip --set model.image_encoder.preset=/presets/clip_vit_base_patch16
    --set model.text_encoder=clip            # shares the image encoder's preset folder
    --set model.clip_preset=/presets/clip_vit_base_patch16   # or: one folder for both encoders

A preset folder is what `save_to_preset(DIR)` writes (config.json + model.weights.h5 for the
backbone, tokenizer.json + assets/, preprocessor.json, image_converter.json). keras_irtf never
downloads: a bare preset name ("clip_vit_base_patch16"), a URL or a kaggle:// / hf:// handle is
refused with instructions, and a preset of the other family (a SigLIP folder given to the clip
encoders) is named, with the settings that read it. keras-hub, the optional `hub` extra
(`pip install -e '.[hub]'`), is imported only when an encoder is built; the start-up check says
when it is missing, naming the encoder that needs it.

Each layer keeps one tower of the backbone, so the weights are not held twice:

- image encoders (`clip`, `siglip`): the vision tower + its pooling + its projection; the
  output is exactly `backbone.get_vision_embeddings(images)`. Inputs are images already through
  `preprocessor()` (an ImagePreprocessor with the tower's input side and the mean/std that the
  preset's image converter implies), float32 [B, S, S, 3]; or integer ids [B] into an attached
  feature cache (`attach_cache(cache)`, `cache.gather(ids) -> [B, D]`). `encode_images` always
  runs the tower.
- text encoders (`clip`, `siglip`, input_kind "strings"): the preset's own preprocessing and
  tokenizer (CLIP: lower case, byte-level BPE between <|startoftext|> and <|endoftext|>, pooled at
  the end-of-text token; SigLIP: canonicalised text, SentencePiece, pooled at the last token),
  inside the graph (tf.function, exported SavedModels), then the text tower + pooling +
  projection: exactly `backbone.get_text_embeddings(token_ids)`. Integer inputs are row ids of
  an attached TextEmbeddingCache, as for the frozen BERT encoders (keras_irtf.layers.bert).

Frozen by default. `model.finetune` (none | text | image | both) makes the named towers
trainable: their variables are `pretrained_variables()` (trained at optim.finetune_lr_multiplier
times the rate); a frozen tower lists no trainable variable (the gradient with respect to its
input pixels still flows: GA^A at the input, the robustness attacks), and a frozen text tower's
output is under tf.stop_gradient.

A saved `.keras` model holds the towers' weights and the tokenizer's vocabulary (Keras assets):
it reloads without the preset folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Optional

import keras
import tensorflow as tf

from keras_irtf.config import NON_NEGATIVE, ConfigError
from keras_irtf.layers.base import ImageEncoder
from keras_irtf.layers.bert import FrozenTextEncoder, _is_url
from keras_irtf.layers.pretrained import HUB_INSTALL, import_keras_hub, require_keras_hub
from keras_irtf.preprocessing import ImagePreprocessor
from keras_irtf.registry import register_image_encoder, register_text_encoder

# where an image encoder's preset folder is configured (named in error messages); model.clip_preset
# (tools/train.py --clip-preset) gives one folder to both encoders
PRESET_KEYS = "model.image_encoder.preset"


@dataclasses.dataclass(frozen=True)
class Family:
    """What differs between CLIP and SigLIP presets."""

    name: str  # the registered name: "clip" | "siglip"
    backbone: str  # keras_hub.models class names
    preprocessor: str
    example: str  # a preset name, for the how-to
    kaggle: str  # its Kaggle handle
    mean: tuple  # the statistics its image converter uses ([0, 1] pixel units)
    std: tuple

    @property
    def label(self) -> str:
        """How people write the family's name: "CLIP", "SigLIP"."""
        return self.backbone[: -len("Backbone")]


CLIP = Family("clip", "CLIPBackbone", "CLIPPreprocessor", "clip_vit_base_patch16",
              "keras/clip/keras/clip_vit_base_patch16", (0.48145466, 0.4578275, 0.40821073),
              (0.26862954, 0.26130258, 0.27577711))
SIGLIP = Family("siglip", "SigLIPBackbone", "SigLIPPreprocessor", "siglip_base_patch16_224",
                "keras/siglip/keras/siglip_base_patch16_224", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
FAMILIES = {f.name: f for f in (CLIP, SIGLIP)}


def preset_help(family: Family, key: str) -> str:
    return (
        f"keras_irtf never downloads models. Make a local keras-hub {family.label} preset folder once, on a machine "
        f"with network: `import keras_hub; b = keras_hub.models.{family.backbone}.from_preset('{family.example}'); "
        f"p = keras_hub.models.{family.preprocessor}.from_preset('{family.example}'); "
        "b.save_to_preset(DIR); p.save_to_preset(DIR)` (the preprocessor writes the tokenizer and the image "
        f"converter too), or download the Kaggle model {family.kaggle} and extract it into DIR. Copy DIR "
        f"here and pass its path: --set {key}=DIR. keras_irtf reads it with keras-hub, its optional `hub` extra "
        f"(`{HUB_INSTALL}` in the keras_irtf checkout)"
    )


def other_family_help(found: Family, family: Family) -> str:
    """What to say when a preset folder of the `found` family is given to encoders that read
    `family` presets: how to use it with the encoders of its own family (it is what the user
    has), or to pass a `family` folder instead."""
    return (
        f"It is a {found.label} preset, and the {family.name} encoders read {family.label} presets. "
        f"To use this {found.label} preset, set both encoders to {found.name}: --set model.image_encoder={found.name} "
        f"--set model.text_encoder={found.name} (tools/train.py --image-encoder {found.name} --text-encoder "
        f"{found.name}). To stay with {family.label}, pass a {family.label} preset folder instead "
        f"(docs/vision-language.md, 'CLIP and SigLIP towers', says how to make one)"
    )


def resolve_preset(preset, key: str, family: Family) -> str:
    """The absolute path of a local `family` preset folder, or ConfigError saying how to make one."""
    help_text = preset_help(family, key)
    if not preset:
        raise ConfigError(f"{key} is not set: it must be the path of a local keras-hub preset folder (or set "
                          f"model.clip_preset / tools/train.py --clip-preset for both encoders). {help_text}")
    text = str(preset)
    if _is_url(text) or text.lower().startswith(("kaggle:", "hf:")):
        raise ConfigError(f"{key}={text!r} is a URL or a hub handle, not a local folder. {help_text}")
    path = Path(text).expanduser()
    if not path.is_dir():
        bare = not any(c in text for c in "/\\") and not text.startswith((".", "~"))
        if bare:
            raise ConfigError(
                f"{key}={text!r} is a bare preset name and no such folder exists: keras-hub would download it. "
                f"Pass a folder path (./{text} for a folder here). {help_text}")
        raise ConfigError(f"{key}={text!r}: folder {path.resolve()} does not exist. {help_text}")
    missing = [n for n in ("config.json", "model.weights.h5") if not (path / n).is_file()]
    if missing:
        raise ConfigError(f"{key}={text!r}: {path.resolve()} is not a keras-hub preset folder (no "
                          f"{', '.join(missing)}). {help_text}")
    found = _read_json(path / "config.json").get("class_name")
    if found != family.backbone:
        other = next((f for f in FAMILIES.values() if f.backbone == found), None)
        if other is not None:  # the other family's preset: say how to use it, not how to get this one
            raise ConfigError(f"{key}={text!r}: the preset holds a {found}, not a {family.backbone}. "
                              + other_family_help(other, family))
        raise ConfigError(f"{key}={text!r}: the preset holds a {found}, not a {family.backbone} "
                          f"(model.*_encoder={family.name}). {help_text}")
    return str(path.resolve())


def _read_json(path) -> dict:
    """A preset's JSON file; a damaged one is a ConfigError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read as JSON ({e}); the preset folder is damaged: write it "
                          f"again with save_to_preset (docs/vision-language.md, 'CLIP and SigLIP towers')") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}; the preset folder is damaged")
    return data


def _entry(data: dict, path, *keys):
    """data[k0][k1]..., or a ConfigError naming the file and the missing key."""
    for i, k in enumerate(keys):
        if not isinstance(data, dict) or k not in data:
            raise ConfigError(f"{path}: no {'.'.join(keys[: i + 1])!r}: not the keras-hub preset layout the "
                              f"clip / siglip encoders read (a backbone's config.json written by save_to_preset)")
        data = data[k]
    return data


def _per_channel(value, default: float) -> list:
    if value is None:
        return [default] * 3
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * 3


def preset_image_statistics(folder, family: Family):
    """(side, mean, std, note): the vision tower's input side (config.json) and the per-channel
    mean/std in [0, 1] pixel units that the preset's image converter implies (it computes
    u * scale + offset on 0..255 pixels u, i.e. (u / 255 - mean) / std with std = 1 / (255 scale)
    and mean = -offset * std); the family's statistics when the folder has no image converter."""
    folder = Path(folder)
    path = folder / "config.json"
    side = int(_entry(_read_json(path), path, "config", "vision_encoder", "config", "image_shape")[0])
    converter = folder / "image_converter.json"
    if not converter.is_file():
        return side, family.mean, family.std, "no image_converter.json: the family's statistics"
    config = _entry(_read_json(converter), converter, "config")
    scale, offset = _per_channel(config.get("scale"), 1.0), _per_channel(config.get("offset"), 0.0)
    std = tuple(round(1.0 / (255.0 * s), 8) for s in scale)
    mean = tuple(round(-o / (255.0 * s), 8) for o, s in zip(offset, scale))
    return side, mean, std, ""


def needed_by(family: Family, role: str) -> str:
    """The encoder that needs keras-hub, as error messages name it."""
    return f"the {family.name} {role} encoder (model.{role}_encoder={family.name})"


def _deserialize(obj, needs: str = "a saved model's clip / siglip encoder"):
    """A keras-hub layer, or its serialised config (when a saved model is reloaded)."""
    if isinstance(obj, dict):
        import_keras_hub(needs)  # registers the keras-hub classes
        return keras.saving.deserialize_keras_object(obj)
    return obj


def _serialize(obj):
    return keras.saving.serialize_keras_object(obj) if obj is not None else None


def load_backbone(folder: str, needs: str = "the clip / siglip encoders"):
    """The preset's backbone, under the current Keras dtype policy (the run's precision);
    `needs`: the encoder asking, named if keras-hub is missing."""
    keras_hub = import_keras_hub(needs)
    try:
        return keras_hub.models.Backbone.from_preset(folder, dtype=keras.config.dtype_policy().name)
    except (KeyError, ValueError, TypeError, OSError) as e:  # a damaged or partial preset folder
        raise ConfigError(f"{folder}: keras-hub could not load the preset's backbone ({type(e).__name__}: {e}); "
                          f"the folder is damaged or incomplete: write it again with save_to_preset "
                          f"(docs/vision-language.md, 'CLIP and SigLIP towers')") from None


def _configured_preset(settings, shared_presets=()):
    """(folder, the key it came from): the image encoder's own `preset` key, else the first
    folder of `shared_presets` ((key, folder) pairs the assembler passes: model.clip_preset)."""
    own = getattr(settings, "preset", None)
    if own:
        return own, PRESET_KEYS
    for key, folder in shared_presets:
        if folder:
            return folder, key
    return own, PRESET_KEYS


class _TowerMixin:
    """Trainability shared by the image and text towers."""

    role = "image"  # which of the model's encoders it is ("image" | "text"), for error messages

    @classmethod
    def needs(cls) -> str:
        return needed_by(cls.family, cls.role)

    @classmethod
    def _check_preset(cls, preset, key):
        """The start-up check: the preset folder (resolve_preset), then keras-hub, which reads it."""
        resolve_preset(preset, key, cls.family)
        require_keras_hub(cls.needs())

    # a fine-tuned tower trains at optim.finetune_lr_multiplier times the learning rate
    lr_multiplier_key = "finetune_lr_multiplier"

    def _set_finetune(self, finetune: bool):
        self.finetune = bool(finetune)
        # The setter itself, not `self.trainable = ...`: Keras skips assigning the value an
        # attribute already has, and FrozenTextEncoder starts frozen, so the towers added since
        # would stay trainable and land in the model's trainable_variables.
        keras.layers.Layer.trainable.fset(self, self.finetune)

    def pretrained_variables(self) -> list:
        """The tower's variables when it is fine-tuned (trained at the reduced learning rate), []
        when frozen."""
        return list(self.trainable_variables) if self.finetune else []

    def _tower_config(self) -> dict:
        return dict(tower=_serialize(self.tower), pooler=_serialize(self.pooler),
                    projection=_serialize(self.projection), preset=self.preset, finetune=self.finetune)


# ---- image encoders -----------------------------------------------------------------------------


@dataclasses.dataclass
class PresetImageConfig:
    """Settings of the `clip` and `siglip` image encoders."""

    preset: Optional[str] = None  # local keras-hub preset folder (written by save_to_preset)
    cache: bool = True  # whether a frozen-feature cache may serve this encoder's features


@register_image_encoder("clip", config=PresetImageConfig)
@keras.saving.register_keras_serializable(package="keras_irtf")
class CLIPImageEncoder(_TowerMixin, ImageEncoder):
    """The vision tower of a keras-hub CLIP preset: images -> `get_vision_embeddings(images)`.

    Args:
        tower: the backbone's vision encoder (a keras-hub Backbone, or its config when reloading).
        pooler, projection: the backbone's vision pooler and projection (None where the tower
            already ends with them, as SigLIP's does).
        preset: the folder it came from (for reference: a reloaded model takes its weights from the
            .keras file).
        finetune: trainable (its output then carries gradients); frozen otherwise.
        allow_cache: whether a frozen-feature cache may serve its features (settings `cache`).
    """

    family = CLIP

    def __init__(self, tower, pooler=None, projection=None, preset=None, finetune=False, allow_cache=True,
                 image_preprocessing=None, **kwargs):
        kwargs.pop("trainable", None)
        super().__init__(**kwargs)
        # the preset's preprocessing ({"size", "mean", "std", "name"}), kept in the config so that a
        # reloaded model preprocesses without the preset folder (own_preprocessor)
        self.image_preprocessing = dict(image_preprocessing) if image_preprocessing else None
        self.tower = _deserialize(tower, self.needs())
        self.pooler = _deserialize(pooler, self.needs())
        self.projection = _deserialize(projection, self.needs())
        self.preset = preset
        self.allow_cache = bool(allow_cache)
        self.side = int(self.tower.image_shape[0])
        self.output_dim = int(self.projection.units) if self.projection is not None else int(self.tower.hidden_dim)
        self._cache = None
        self._set_finetune(finetune)
        self.built = True  # the tower and projection come built

    @classmethod
    def from_preset(cls, preset, finetune=False, allow_cache=True, key="model.image_encoder.preset", **kwargs):
        folder = resolve_preset(preset, key, cls.family)
        backbone = load_backbone(folder, cls.needs())
        prep = cls._preset_preprocessor(folder).describe()
        return cls(backbone.vision_encoder, getattr(backbone, "vision_pooler", None),
                   getattr(backbone, "vision_projection", None), preset=folder, finetune=finetune,
                   allow_cache=allow_cache, image_preprocessing=prep, **kwargs)

    @classmethod
    def _preset_preprocessor(cls, folder):
        side, mean, std, note = preset_image_statistics(folder, cls.family)
        name = f"{cls.family.name}:{Path(folder).name}" + (f" ({note})" if note else "")
        return ImagePreprocessor(side, mean, std, name=name)

    def own_preprocessor(self):
        """The preprocessing recorded when the encoder was built from its preset (None if not
        recorded): what a reloaded model uses, with or without the preset folder."""
        p = self.image_preprocessing
        return None if not p else ImagePreprocessor(p["size"], p["mean"], p["std"], name=p.get("name", "clip"))

    @classmethod
    def from_settings(cls, settings, *, finetune=False, shared_presets=(), **context):
        """`finetune`: whether this tower trains (model.finetune); `shared_presets`: (key, folder)
        pairs read when the encoder's own preset key is unset (model.clip_preset)."""
        preset, key = _configured_preset(settings, shared_presets)
        return cls.from_preset(preset, finetune=finetune, allow_cache=settings.cache, key=key, name="image_encoder")

    @classmethod
    def check(cls, settings, *, shared_presets=(), **context):
        """Fail fast (ConfigError with the how-to) when the preset folder is missing or wrong, or
        keras-hub is not installed."""
        cls._check_preset(*_configured_preset(settings, shared_presets))

    @classmethod
    def preprocessor(cls, settings, *, shared_presets=(), **context):
        """The preset's preprocessing: its tower's input side (data.image_size does not apply) and
        the mean/std its image converter implies; resize + centre crop as for every encoder."""
        return cls._preset_preprocessor(resolve_preset(*_configured_preset(settings, shared_presets), cls.family))

    # ---- the cache --------------------------------------------------------------------------
    def attach_cache(self, cache):
        """Read integer inputs [B] as row ids of `cache` (`cache.gather(ids) -> [B, D]`)."""
        if cache is not None and self.finetune:
            raise ValueError(f"{self.name} is fine-tuned (model.finetune=image|both): its features change "
                             "during training, so no feature cache may serve them")
        self._cache = cache

    @property
    def cache(self):
        return self._cache

    @property
    def cacheable(self) -> bool:
        """Whether a frozen-feature cache may serve this encoder (frozen, and settings cache: true)."""
        return self.allow_cache and not self.finetune

    # ---- computation ------------------------------------------------------------------------
    def _embed(self, images, training=False):
        x = self.tower({"images": images}, training=training)
        if self.pooler is not None:
            x = self.pooler(x)
        if self.projection is not None:
            x = self.projection(x)
        return x

    def encode_images(self, images, training=False):
        """Preprocessed images float [B, S, S, 3] -> float32 [B, output_dim] (runs the tower)."""
        # no stop_gradient when frozen: the tower's variables are not trainable, so no gradient
        # reaches them, but dL/d(pixels) must flow (GA^A at ga.point=input with cache: false, the
        # robustness evaluation's FGSM / PGD attacks and its input-gradient norms)
        return tf.cast(self._embed(images, training=bool(training) and self.finetune), tf.float32)

    def build(self, input_shape=None):
        self.built = True

    def call(self, images, training=False):
        images = tf.convert_to_tensor(images)
        if images.dtype.is_integer and images.shape.rank is not None and images.shape.rank <= 2:
            if self._cache is None:
                raise ValueError(f"{self.name} got integer ids but has no feature cache attached: pass "
                                 "preprocessed images, or attach_cache(cache) first")
            return tf.cast(self._cache.gather(tf.reshape(images, [-1])), tf.float32)
        if not images.dtype.is_floating:
            raise TypeError(f"{self.name}: expected preprocessed float images [B, S, S, 3] or integer cache "
                            f"ids [B], got {images.dtype} {images.shape}")
        return self.encode_images(images, training)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.output_dim)

    def get_config(self):
        config = super().get_config()
        config.pop("trainable", None)
        config.update(self._tower_config(), allow_cache=self.allow_cache, image_preprocessing=self.image_preprocessing)
        return config


@register_image_encoder("siglip", config=PresetImageConfig)
@keras.saving.register_keras_serializable(package="keras_irtf")
class SigLIPImageEncoder(CLIPImageEncoder):
    """The vision tower of a keras-hub SigLIP preset (its attention-pooling head included)."""

    family = SIGLIP


# ---- text encoders ------------------------------------------------------------------------------


@dataclasses.dataclass
class PresetTextConfig:
    """Settings of the `clip` and `siglip` text encoders."""

    DOMAINS = {"sequence_length": NON_NEGATIVE}
    # local keras-hub preset folder; None = the image encoder's, when it is of the same family
    preset: Optional[str] = None
    sequence_length: int = 0  # tokens per text; 0 = the preset preprocessor's
    cache: bool = True  # embed each distinct text once per run (frozen encoder only)


def _force_graph_tokenization(*layers):
    # keras-hub 0.32 tokenises eager calls with the Python `tokenizers` library and traced calls
    # with TensorFlow ops, and the two disagree (CLIP: digits). The TF path is what runs inside
    # tf.function and exported SavedModels, so eager calls take it too.
    for layer in layers:
        if layer is not None and hasattr(layer, "_allow_python_workflow"):
            layer._allow_python_workflow = False


@register_text_encoder("clip", config=PresetTextConfig)
@keras.saving.register_keras_serializable(package="keras_irtf")
class CLIPTextEncoder(_TowerMixin, FrozenTextEncoder):
    """The text tower of a keras-hub CLIP preset: strings -> `get_text_embeddings(token_ids)` of
    the preset preprocessor's token ids.

    Args:
        tower: the backbone's text encoder (or its config when reloading).
        preprocessor: the preset's CLIPPreprocessor (its tokenizer's vocabulary is saved as Keras
            assets in the .keras file).
        pooler, projection: the backbone's text pooler and projection (None for SigLIP).
        preset: the folder it came from (for reference).
        finetune: trainable (no stop_gradient, no cache); frozen otherwise.
    """

    family = CLIP
    role = "text"

    def __init__(self, tower, preprocessor, pooler=None, projection=None, preset=None, finetune=False,
                 output_dim=None, seq_length=None, **kwargs):
        needs = self.needs()
        tower, projection = _deserialize(tower, needs), _deserialize(projection, needs)
        width = int(projection.units) if projection is not None else int(tower.projection_dim)
        preprocessor = _deserialize(preprocessor, needs)
        super().__init__(output_dim=width, seq_length=preprocessor.sequence_length, **kwargs)
        self.tower = tower
        self.pooler = _deserialize(pooler, needs)
        self.projection = projection
        self.preprocessor = preprocessor
        _force_graph_tokenization(preprocessor, preprocessor.tokenizer)
        # keras-hub builds a preprocessor (its packer) lazily, and a reloaded model's can only be
        # built once Keras has loaded the tokenizer's vocabulary (an asset), after this
        # constructor. It holds no weights: it counts as built for the model's check that every
        # weighted sub-layer is built (keras_irtf.model.retrieval_model), and token_ids builds
        # its packer before the first texts.
        preprocessor.built = True
        self.preset = preset
        self._packer_ready = False
        self._set_finetune(finetune)
        self.built = True

    @classmethod
    def from_preset(cls, preset, sequence_length=0, finetune=False, key="model.text_encoder.preset", **kwargs):
        folder = resolve_preset(preset, key, cls.family)
        keras_hub = import_keras_hub(cls.needs())
        backbone = load_backbone(folder, cls.needs())
        tower = backbone.text_encoder
        if sequence_length and int(sequence_length) > int(tower.max_sequence_length):
            raise ConfigError(f"model.text_encoder.sequence_length={sequence_length}: the preset's text tower "
                              f"takes at most {tower.max_sequence_length} tokens")
        extra = {"sequence_length": int(sequence_length)} if sequence_length else {}
        if not (Path(folder) / "tokenizer.json").is_file():
            raise ConfigError(f"{key}={preset!r}: {folder} has no tokenizer.json (the backbone alone was saved). "
                              + preset_help(cls.family, key))
        preprocessor_cls = getattr(keras_hub.models, cls.family.preprocessor)
        # the text side needs no image converter
        preprocessor = preprocessor_cls.from_preset(folder, image_converter=None, **extra)
        return cls(tower, preprocessor, getattr(backbone, "text_pooler", None),
                   getattr(backbone, "text_projection", None), preset=folder, finetune=finetune, **kwargs)

    # a frozen tower's text embeddings may be stored on disk across runs (keras_irtf.data.feature_cache)
    persistent_cache = True

    def fingerprint_extra(self) -> dict:
        """What the stored text features depend on beyond the weights and the config: the
        tokenizer's vocabulary (and BPE merges), which are Keras assets, not config."""
        tok = self.preprocessor.tokenizer
        digest = hashlib.sha1()
        for token in tok.get_vocabulary():
            digest.update(str(token).encode("utf-8") + b"\n")
        for merge in getattr(tok, "merges", None) or ():
            digest.update(b"merge:" + str(merge).encode("utf-8") + b"\n")
        proto = getattr(tok, "proto", None)  # SigLIP's SentencePiece model: its pieces' scores choose the split
        if isinstance(proto, bytes):
            digest.update(b"proto:" + proto)
        return {"vocabulary": digest.hexdigest(), "sequence_length": int(self.preprocessor.sequence_length)}

    @classmethod
    def _preset_of(cls, settings, shared_presets=()):
        """(folder, the key it came from): model.text_encoder.preset, else the first folder of
        `shared_presets` ((key, folder) pairs the assembler passes: model.clip_preset, then the
        image encoder's preset when it is of the same family)."""
        if settings.preset:
            return settings.preset, "model.text_encoder.preset"
        for key, folder in shared_presets:
            if folder:
                return folder, key
        raise ConfigError(
            f"model.text_encoder.preset is not set: set it (or model.clip_preset, tools/train.py --clip-preset) "
            f"to a local {cls.family.name} preset folder (it defaults to model.image_encoder.preset only when "
            f"model.image_encoder={cls.family.name}). " + preset_help(cls.family, "model.text_encoder.preset"))

    @classmethod
    def from_settings(cls, settings, *, finetune=False, shared_presets=(), **context):
        """`finetune`: whether this tower trains (model.finetune); `shared_presets`: (key, folder)
        pairs read when model.text_encoder.preset is unset."""
        preset, key = cls._preset_of(settings, shared_presets)
        return cls.from_preset(preset, settings.sequence_length, finetune=finetune, key=key, name="text_encoder")

    @classmethod
    def check(cls, settings, *, shared_presets=(), **context):
        """Fail fast (ConfigError with the how-to) when the preset folder is missing or wrong, or
        keras-hub is not installed."""
        cls._check_preset(*cls._preset_of(settings, shared_presets))

    def attach_cache(self, cache):
        if cache is not None and self.finetune:
            raise ValueError(f"{self.name} is fine-tuned (model.finetune=text|both): its embeddings change during "
                             "training, so they cannot be cached; set model.text_encoder.cache=false")
        super().attach_cache(cache)

    @property
    def cacheable(self) -> bool:
        return not self.finetune

    def token_ids(self, texts):
        """tf.string [B] -> int32 [B, sequence_length]: the preset preprocessor's token ids."""
        pre = self.preprocessor
        if not self._packer_ready:
            # built now, not when deserialised: the packer reads the tokenizer's special-token
            # ids, which exist only once the vocabulary (a Keras asset) has been loaded
            pre.build(None)
            _force_graph_tokenization(getattr(pre, "packer", None))
            self._packer_ready = True
        return pre({"prompts": texts, "images": None})["token_ids"]

    def _encode(self, texts):
        ids = self.token_ids(texts)
        x = self.tower({"token_ids": ids}, training=False)
        if self.pooler is not None:
            x = self.pooler(x, ids)
        if self.projection is not None:
            x = self.projection(x)
        return x

    def get_config(self):
        config = super().get_config()
        config.update(self._tower_config(), preprocessor=_serialize(self.preprocessor))
        return config


@register_text_encoder("siglip", config=PresetTextConfig)
@keras.saving.register_keras_serializable(package="keras_irtf")
class SigLIPTextEncoder(CLIPTextEncoder):
    """The text tower of a keras-hub SigLIP preset (its head included)."""

    family = SIGLIP
