"""Base classes of the three pluggable model parts, and how the assembler builds them.

A registered part (keras_irtf.registry) is a Keras layer subclassing one of these. The assembler
(keras_irtf.experiment) calls `from_settings(settings, **context)`, where `settings` is the
instance of the dataclass the class was registered with (None if it has none): the part's own
section of the config and nothing else. What a part needs to know about the rest of the run, the
assembler computes and passes as named arguments (`Experiment.part_context`); a part takes the
ones it uses and ignores the others (`**context`):

    output_dim       the feature width to produce: model.embed_dim for the encoders; the image
                     encoder's feature width for the composer
    image_size       the image encoders' input side (data.image_size)
    finetune         whether this tower trains (model.finetune names the towers)
    shared_presets   (key, folder) pairs to read when the part's own preset key is unset
                     (model.clip_preset; for a text encoder of the image encoder's family, then
                     the image encoder's preset)
    vocab_size       the vocabulary of a token-reading text encoder
    double_backprop  the training differentiates a gradient taken through the text encoder's
                     output (GA^A or FGSM at ga.point=text_feature): it needs second-order
                     gradients
    image_dim, text_dim   the encoders' feature widths (composer)

The default `from_settings` passes the settings' fields as keyword arguments to the
constructor, with `output_dim` and the part's name; override it when the constructor needs
something else. `check(settings, **context)` and `preprocessor(settings, **context)` (image
encoders) receive the same arguments.

- ImageEncoder: preprocessed images [B, S, S, 3] -> [B, D]. Owns its preprocessing
  (`preprocessor`, keras_irtf.preprocessing.ImagePreprocessor).
- TextEncoder: the text input -> [B, D_text]. `input_kind` says what it reads: "tokens" (int ids
  from a vocabulary built over the training texts; `vocab_size` is passed to from_settings) or
  "strings" (raw text, e.g. a frozen BERT with its own tokenizer; the assembler embeds each
  distinct text once when the encoder is frozen and its settings have `cache: true`).
- Composer: [f_img, f_text] -> the composed query feature [B, output_dim], output_dim being the
  image encoder's feature width (`text_dim` is passed too). Optional extra loss terms:
  `auxiliary_loss_names` and `auxiliary_losses(...)` (see ComposeAE).
"""

from __future__ import annotations

import dataclasses

import keras

from keras_irtf.preprocessing import ImagePreprocessor


def _settings_kwargs(settings) -> dict:
    return dataclasses.asdict(settings) if settings is not None else {}


class ImageEncoder(keras.layers.Layer):
    """Base of image encoders."""

    @classmethod
    def min_image_size(cls, settings) -> int:
        """The smallest input side (data.image_size) the architecture turns into a feature."""
        return 1

    @classmethod
    def from_settings(cls, settings, *, output_dim, **context):
        return cls(output_dim=output_dim, name="image_encoder", **_settings_kwargs(settings))

    @classmethod
    def preprocessor(cls, settings, *, image_size, **context):
        """The preprocessing the encoder's inputs get (default: centre crop to `image_size`,
        data.image_size, ImageNet mean/std)."""
        return ImagePreprocessor(image_size)

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
    def from_settings(cls, settings, *, output_dim, vocab_size=0, **context):
        kwargs = _settings_kwargs(settings)
        if cls.input_kind == "tokens":
            kwargs["vocab_size"] = vocab_size
        return cls(output_dim=output_dim, name="text_encoder", **kwargs)


class Composer(keras.layers.Layer):
    """Base of composers: a call on [f_img, f_text] returns a feature of width output_dim."""

    def __init__(self, output_dim=512, **kwargs):
        super().__init__(**kwargs)
        self.output_dim = int(output_dim)

    @classmethod
    def from_settings(cls, settings, *, output_dim, **context):
        """`output_dim`: the image encoder's feature width (the composed query must live in the
        image-feature space the targets are embedded in)."""
        return cls(output_dim=output_dim, name="composer", **_settings_kwargs(settings))

    def compute_output_shape(self, input_shapes):
        return (input_shapes[0][0], self.output_dim)

    def get_config(self):
        config = super().get_config()
        config.update(output_dim=self.output_dim)
        return config
