"""Frozen BERT sentence encoders: strings -> the pooled sentence embedding (768-d for BERT-Base).

ComposeAE and TIRG-BERT read the modification text through uncased BERT-Base, frozen (the
reference implementations precompute the embeddings with a BERT server). Two local sources:

- HubBertEncoder: a TF-Hub BERT encoder SavedModel and its tensorflow-text preprocessing
  SavedModel, from local folders through `tensorflow_hub.load` (URLs and hub handles are refused
  before it is called: nothing is downloaded at run time). `hub.KerasLayer` is a Keras 2 layer
  and fails inside Keras 3 models, hence this wrapper.
- KerasHubBertEncoder: a keras-hub preset folder (BertBackbone + BertTextClassifierPreprocessor),
  read with keras-hub, the optional `hub` extra (`pip install -e '.[hub]'`).

Both are Keras 3 layers that store their local paths in `get_config()` (a reloaded `.keras` model
loads BERT again from the same folders) and are never trainable. They accept two kinds of input:

- tf.string texts [batch]: run the preprocessing and the encoder (inside a tf.function too, so an
  exported SavedModel can take raw text);
- integer ids [batch] into an attached `keras_irtf.data.text_cache.TextEmbeddingCache`: gather the
  embeddings precomputed once per run (training never re-runs BERT for a text it has seen).

Nothing is ever downloaded: a URL or a missing folder is an error saying how to get a local copy.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import keras
import tensorflow as tf
import tensorflow_hub as hub
import tensorflow_text  # noqa: F401  (registers the ops the BERT preprocessing models use)
from keras.src.saving.serialization_lib import SafeModeScope  # not public API: keras is pinned (3.15)

from keras_irtf.config import AT_LEAST_ONE, NON_NEGATIVE, ConfigError
from keras_irtf.layers.base import TextEncoder
from keras_irtf.layers.pretrained import HUB_INSTALL, import_keras_hub, require_keras_hub
from keras_irtf.registry import register_text_encoder

HUB_HELP = (
    "keras_irtf never downloads models. Download the TF-Hub BERT models once (on a machine with "
    "network), e.g. from https://www.kaggle.com/models/tensorflow/bert (TensorFlow 2 variations "
    "'en-uncased-l-12-h-768-a-12' for the encoder and 'en-uncased-preprocess' for the "
    "preprocessing; the same models as tfhub.dev/tensorflow/bert_en_uncased_L-12_H-768_A-12 and "
    "bert_en_uncased_preprocess), extract each archive into a folder holding saved_model.pb, "
    "and pass the folders: --set model.text_encoder=bert_hub --set model.text_encoder.encoder=/path/encoder --set model.text_encoder.preprocess=/path/preprocess"
)
KERAS_HUB_HELP = (
    "keras_irtf never downloads models. Make a local keras-hub preset folder once (on a machine "
    "with network): `b = keras_hub.models.BertBackbone.from_preset('bert_base_en_uncased'); "
    "p = keras_hub.models.BertTextClassifierPreprocessor.from_preset('bert_base_en_uncased'); "
    "b.save_to_preset(DIR); p.save_to_preset(DIR)` (or download and extract the Kaggle preset "
    "keras/bert/keras/bert_base_en_uncased), then pass --set model.text_encoder=bert_keras_hub --set model.text_encoder.preset=DIR. "
    f"keras_irtf reads it with keras-hub, its optional `hub` extra (`{HUB_INSTALL}` in the keras_irtf checkout)"
)
# the encoder named when keras-hub is missing
KERAS_HUB_BERT = "the bert_keras_hub text encoder (model.text_encoder=bert_keras_hub)"


def _is_url(handle: str) -> bool:
    h = handle.strip().lower()
    return "://" in h or h.startswith(("tfhub.dev", "www.", "kaggle.com"))


def check_local_folder(handle, key: str, help_text: str, marker: str = None) -> str:
    """The absolute path of a local model folder, or a ValueError saying how to obtain one."""
    if not handle:
        raise ValueError(f"{key} is not set: it must be the path of a local folder. {help_text}")
    handle = str(handle)
    if _is_url(handle):
        raise ValueError(f"{key}={handle!r} is a URL, not a local folder. {help_text}")
    path = os.path.abspath(os.path.expanduser(handle))
    if not os.path.isdir(path):
        raise ValueError(f"{key}={handle!r}: folder {path} does not exist. {help_text}")
    if marker and not os.path.exists(os.path.join(path, marker)):
        raise ValueError(f"{key}={handle!r}: folder {path} has no {marker}, so it is not the expected model. {help_text}")
    return path


def _unsafe_deserialization():
    return SafeModeScope(False)


class FrozenTextEncoder(TextEncoder):
    """Base class: a frozen sentence encoder taking strings, or ids into an attached cache."""

    input_kind = "strings"

    def __init__(self, output_dim=768, seq_length=None, **kwargs):
        kwargs["trainable"] = False
        super().__init__(**kwargs)
        self.output_dim = int(output_dim)
        self.seq_length = int(seq_length) if seq_length else None
        self._cache = None
        # how many times the real encoder ran (graph executions included): a tf.Variable, not a
        # Keras weight, so it is neither saved in .keras files nor trained
        self._encoder_runs = tf.Variable(0, dtype=tf.int64, trainable=False, name="encoder_runs")

    @property
    def encoder_runs(self) -> int:
        """Number of batches the underlying BERT encoder has processed so far."""
        return int(self._encoder_runs.numpy())

    def attach_cache(self, cache):
        """Read integer inputs as row ids of `cache` (a keras_irtf.data.text_cache.TextEmbeddingCache)."""
        self._cache = cache

    @property
    def cache(self):
        return self._cache

    def encode_strings(self, texts):
        """tf.string [batch] -> float32 [batch, output_dim] (runs BERT)."""
        texts = tf.reshape(tf.convert_to_tensor(texts, tf.string), [-1])
        out = tf.cast(self._encode(texts), tf.float32)
        width = out.shape[-1]
        if width is not None and width != self.output_dim:
            raise ValueError(
                f"{type(self).__name__}: the encoder's pooled output is {width}-d but output_dim="
                f"{self.output_dim} (model.text_encoder.dim); set it to {width}"
            )
        ctx = tf.distribute.get_replica_context()
        if ctx is None or ctx.num_replicas_in_sync == 1:  # a plain variable: not per replica
            self._encoder_runs.assign_add(1)
        # frozen: no gradient reaches the encoder (a subclass that fine-tunes sets trainable)
        return out if self.trainable else tf.stop_gradient(out)

    def _encode(self, texts):
        raise NotImplementedError

    def build(self, input_shape=None):
        self.built = True

    def call(self, inputs, training=False):
        inputs = tf.convert_to_tensor(inputs)
        if inputs.dtype == tf.string:
            return self.encode_strings(inputs)
        if not inputs.dtype.is_integer:
            raise TypeError(f"{self.name}: expected tf.string texts or integer cache ids, got {inputs.dtype}")
        if self._cache is None:
            raise ValueError(
                f"{self.name} got integer ids but has no text-embedding cache attached: pass raw "
                "strings, or build a keras_irtf.data.text_cache.TextEmbeddingCache and call attach_cache()"
            )
        return self._cache.gather(tf.reshape(inputs, [-1]))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.output_dim)

    def get_config(self):
        config = super().get_config()
        config.update(output_dim=self.output_dim, seq_length=self.seq_length)
        config.pop("trainable", None)
        return config


@dataclasses.dataclass
class HubBertConfig:
    DOMAINS = {"dim": AT_LEAST_ONE, "seq_length": NON_NEGATIVE}
    preprocess: Optional[str] = None  # folder of the TF-Hub preprocessing SavedModel
    encoder: Optional[str] = None  # folder of the TF-Hub BERT encoder SavedModel
    dim: int = 768  # width of BERT's pooled output (768 for BERT-Base)
    seq_length: int = 0  # tokens per text; 0 = the preprocessing model's default
    cache: bool = True  # embed each distinct text once per run


@dataclasses.dataclass
class KerasHubBertConfig:
    DOMAINS = {"dim": AT_LEAST_ONE, "seq_length": NON_NEGATIVE}
    preset: Optional[str] = None  # local keras-hub preset folder (BertBackbone + preprocessor)
    dim: int = 768
    seq_length: int = 0
    cache: bool = True


@register_text_encoder("bert_hub", config=HubBertConfig)
@keras.saving.register_keras_serializable(package="keras_irtf")
class HubBertEncoder(FrozenTextEncoder):
    """A TF-Hub BERT encoder + its preprocessing model, from local SavedModel folders.

    Args:
        preprocess_handle: folder of the preprocessing SavedModel (e.g. bert_en_uncased_preprocess).
        encoder_handle: folder of the encoder SavedModel (e.g. bert_en_uncased_L-12_H-768_A-12).
        output_dim: width of the pooled output (768 for BERT-Base).
        seq_length: tokens per text; None keeps the preprocessing model's default (128).
    """

    def __init__(self, preprocess_handle, encoder_handle, output_dim=768, seq_length=None, **kwargs):
        super().__init__(output_dim, seq_length, **kwargs)
        self.preprocess_handle = str(preprocess_handle) if preprocess_handle else preprocess_handle
        self.encoder_handle = str(encoder_handle) if encoder_handle else encoder_handle
        pre = check_local_folder(preprocess_handle, "model.text_encoder.preprocess (preprocess_handle)", HUB_HELP,
                                 "saved_model.pb")
        enc = check_local_folder(encoder_handle, "model.text_encoder.encoder (encoder_handle)", HUB_HELP,
                                 "saved_model.pb")
        # local folders only (checked above): hub.load reads them without any network access
        self.preprocess_model = hub.load(pre)
        self.encoder_model = hub.load(enc)

    @classmethod
    def from_settings(cls, settings, **context):
        try:
            return cls(settings.preprocess, settings.encoder, settings.dim, settings.seq_length or None,
                       name="text_encoder")
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def _encode(self, texts):
        if self.seq_length:
            tokens = self.preprocess_model.tokenize(texts)
            inputs = self.preprocess_model.bert_pack_inputs([tokens], seq_length=self.seq_length)
        else:
            inputs = self.preprocess_model(texts)
        return self.encoder_model(inputs)["pooled_output"]

    def get_config(self):
        config = super().get_config()
        config.update(preprocess_handle=self.preprocess_handle, encoder_handle=self.encoder_handle)
        return config


@register_text_encoder("bert_keras_hub", config=KerasHubBertConfig)
@keras.saving.register_keras_serializable(package="keras_irtf")
class KerasHubBertEncoder(FrozenTextEncoder):
    """A keras-hub BertBackbone and its BertTextClassifierPreprocessor from a local preset folder.

    The backbone's weights are saved with the model's `.keras` file (frozen); reloading also needs
    the preset folder (its tokenizer and architecture).
    """

    def __init__(self, preset, output_dim=768, seq_length=None, **kwargs):
        super().__init__(output_dim, seq_length, **kwargs)
        self.preset = str(preset) if preset else preset
        path = check_local_folder(preset, "model.text_encoder.preset (preset)", KERAS_HUB_HELP, "config.json")
        keras_hub = import_keras_hub(KERAS_HUB_BERT)
        # an absolute path: a bare preset name would go to the network even if a folder exists
        extra = {"sequence_length": self.seq_length} if self.seq_length else {}
        # Reloading a .keras model runs in Keras' safe mode, which refuses vocabulary files outside
        # the archive. The preset folder is the one the user configured, so it is trusted here.
        with _unsafe_deserialization():
            self.preprocessor = keras_hub.models.BertTextClassifierPreprocessor.from_preset(path, **extra)
            self.backbone = keras_hub.models.BertBackbone.from_preset(path)
        # keras-hub builds a preprocessor (its packer) on its first call; the vocabulary is loaded
        # here, so it is built now, as the model's check wants every sub-layer built
        self.preprocessor.build(None)
        self.backbone.trainable = False

    @classmethod
    def from_settings(cls, settings, **context):
        try:
            return cls(settings.preset, settings.dim, settings.seq_length or None, name="text_encoder")
        except ValueError as e:
            raise ConfigError(str(e)) from None

    @classmethod
    def check(cls, settings, **context):
        """Fail fast (ConfigError with the how-to) when the preset folder is missing, or keras-hub,
        which reads it, is not installed."""
        try:
            check_local_folder(settings.preset, "model.text_encoder.preset (preset)", KERAS_HUB_HELP, "config.json")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        require_keras_hub(KERAS_HUB_BERT)

    def _encode(self, texts):
        inputs = self.preprocessor(texts)
        inputs = {k: inputs[k] for k in ("token_ids", "segment_ids", "padding_mask")}
        return self.backbone(inputs, training=False)["pooled_output"]

    def get_config(self):
        config = super().get_config()
        config.update(preset=self.preset)
        return config
