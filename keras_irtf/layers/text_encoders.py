"""Text encoders: token ids -> a sentence feature.

LSTMTextEncoder follows TIRG's text model: word embedding -> one LSTM layer -> the output at the
last real token -> dropout -> linear projection.
"""

import dataclasses

import keras
from keras import ops

from keras_irtf.config import AT_LEAST_ONE, FRACTION
from keras_irtf.layers.base import TextEncoder
from keras_irtf.layers.dropout import Dropout
from keras_irtf.registry import register_text_encoder


@dataclasses.dataclass
class LSTMConfig:
    DOMAINS = {"word_embed_dim": AT_LEAST_ONE, "hidden_dim": AT_LEAST_ONE, "dropout": FRACTION}
    word_embed_dim: int = 512
    hidden_dim: int = 512
    dropout: float = 0.1  # on the LSTM's output, before the projection


@register_text_encoder("lstm", config=LSTMConfig)
@keras.saving.register_keras_serializable(package="keras_irtf")
class LSTMTextEncoder(TextEncoder):
    """int tokens [B, L] (0 = padding) -> float [B, output_dim]."""

    input_kind = "tokens"

    @classmethod
    def from_settings(cls, settings, *, output_dim, vocab_size=0, double_backprop=False, **context):
        """`double_backprop`: the training differentiates a gradient taken through this encoder
        (GA^A or FGSM with x at the text feature); cuDNN has no second-order LSTM kernel, so the
        generic one is used then."""
        return cls(vocab_size, settings.word_embed_dim, settings.hidden_dim, output_dim,
                   settings.dropout, use_cudnn=False if double_backprop else "auto", name="text_encoder")

    def __init__(self, vocab_size, embed_dim=512, hidden_dim=512, output_dim=512, dropout=0.1,
                 use_cudnn="auto", **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = int(vocab_size)
        self.embed_dim = int(embed_dim)
        self.hidden_dim = int(hidden_dim)
        self.output_dim = int(output_dim)
        self.dropout_rate = float(dropout)
        # cuDNN LSTM kernels have no second-order gradient: double backprop through the LSTM
        # (adversarial GA at the word embeddings) needs use_cudnn=False.
        self.use_cudnn = use_cudnn
        self.embedding = keras.layers.Embedding(self.vocab_size, self.embed_dim, mask_zero=True, name="embedding")
        self.lstm = keras.layers.LSTM(self.hidden_dim, use_cudnn=use_cudnn, name="lstm")
        self.dropout = Dropout(self.dropout_rate)
        self.projection = keras.layers.Dense(self.output_dim, name="projection")

    def build(self, input_shape):
        self.embedding.build(input_shape)
        self.lstm.build(tuple(input_shape) + (self.embed_dim,))
        self.projection.build((input_shape[0], self.hidden_dim))

    def embed_tokens(self, tokens):
        return self.embedding(tokens)

    def call(self, tokens, training=False):
        mask = ops.not_equal(tokens, 0)
        # an all-padding text (empty string) still gets a defined output: unmask its first step
        mask = ops.logical_or(mask, ops.expand_dims(ops.arange(ops.shape(tokens)[1]) == 0, 0))
        h = self.lstm(self.embedding(tokens), mask=mask, training=training)
        return self.projection(self.dropout(h, training=training))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.output_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            vocab_size=self.vocab_size,
            embed_dim=self.embed_dim,
            hidden_dim=self.hidden_dim,
            output_dim=self.output_dim,
            dropout=self.dropout_rate,
            use_cudnn=self.use_cudnn,
        )
        return config
