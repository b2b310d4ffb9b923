"""Base classes of the three pluggable model parts, and how the assembler builds them.

A registered part (keras_irtf.registry) is a Keras layer subclassing one of these. The assembler
(keras_irtf.experiment) calls `from_settings(settings, cfg, **context)`, where `settings` is the
instance of the dataclass the class was registered with (None if it has none) and `cfg` the whole
resolved keras_irtf.config.Config. The default `from_settings` passes the settings' fields as
keyword arguments to the constructor, with `output_dim=cfg.model.embed_dim` and the part's name;
override it when the constructor needs something else.

- ImageEncoder: preprocessed images [B, S, S, 3] -> [B, D]. Owns its preprocessing
  (`preprocessor`, keras_irtf.layers.preprocessing.ImagePreprocessor).
- TextEncoder: the text input -> [B, D_text]. `input_kind` says what it reads: "tokens" (int ids
  from a vocabulary built over the training texts; `vocab_size` is passed to from_settings) or
  "strings" (raw text, e.g. a frozen BERT with its own tokenizer; the assembler embeds each
  distinct text once when the encoder is frozen and its settings have `cache: true`).
- Composer: [f_img, f_text] -> the composed query feature [B, output_dim], output_dim being the
  image encoder's feature width (context `image_dim`; `text_dim` too). Optional extra loss
  terms: `auxiliary_loss_names` and `auxiliary_losses(...)` (see ComposeAE).
"""

from __future__ import annotations

import dataclasses

import keras


def _settings_kwargs(settings) -> dict:
    return dataclasses.asdict(settings) if settings is not None else {}


class ImageEncoder(keras.layers.Layer):
    """Base of image encoders."""

    @classmethod
    def min_image_size(cls, settings) -> int:
        """The smallest input side (data.image_size) the architecture turns into a feature."""
        return 1

    @classmethod
    def from_settings(cls, settings, cfg, **context):
        return cls(output_dim=cfg.model.embed_dim, name="image_encoder", **_settings_kwargs(settings))

    @classmethod
    def preprocessor(cls, settings, cfg):
        """The preprocessing the encoder's inputs get (default: centre crop to data.image_size,
        ImageNet mean/std)."""
        from keras_irtf.layers.preprocessing import ImagePreprocessor

        return ImagePreprocessor(cfg.data.image_size)

    # the optim key whose multiplier pretrained_variables() train at
    lr_multiplier_key = "backbone_lr_multiplier"

    def pretrained_variables(self) -> list:
        """Variables that come from pretrained weights (trained at the optim multiplier named by
        `lr_multiplier_key`)."""
        return []


class TextEncoder(keras.layers.Layer):
    """Base of text encoders."""

    input_kind = "tokens"  # "tokens" (vocabulary ids) | "strings" (raw text)

    @classmethod
    def from_settings(cls, settings, cfg, vocab_size=0, **context):
        kwargs = _settings_kwargs(settings)
        if cls.input_kind == "tokens":
            kwargs["vocab_size"] = vocab_size
        return cls(output_dim=cfg.model.embed_dim, name="text_encoder", **kwargs)


class Composer(keras.layers.Layer):
    """Base of composers: a call on [f_img, f_text] returns a feature of width output_dim."""

    def __init__(self, output_dim=512, **kwargs):
        super().__init__(**kwargs)
        self.output_dim = int(output_dim)

    @classmethod
    def from_settings(cls, settings, cfg, image_dim=None, **context):
        """`image_dim`: the image encoder's feature width (the assembler passes it; the composed
        query must live in the image-feature space the targets are embedded in)."""
        return cls(output_dim=image_dim or cfg.model.embed_dim, name="composer", **_settings_kwargs(settings))

    def compute_output_shape(self, input_shapes):
        return (input_shapes[0][0], self.output_dim)

    def get_config(self):
        config = super().get_config()
        config.update(output_dim=self.output_dim)
        return config
