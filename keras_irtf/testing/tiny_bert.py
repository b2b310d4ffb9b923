"""Tiny, randomly initialised BERT-like models in the two on-disk formats keras_irtf reads.

For tests and CPU benchmarks only: they have the interfaces of the real models (so every code
path that loads BERT runs) but none of the knowledge. Nothing is downloaded.

- `make_tiny_hub_bert(folder, texts)` writes a TF-Hub pair of SavedModels in the layout of
  TF Hub's `bert_en_uncased_preprocess` / `bert_en_uncased_L-12_H-768_A-12`:
    folder/preprocess: strings -> {"input_word_ids", "input_mask", "input_type_ids"} (int32,
        [batch, 128]), with `tokenize` (strings -> ragged word pieces) and
        `bert_pack_inputs([segments], seq_length)`; tokenised by tensorflow-text's
        BertTokenizer over a vocabulary made of the words of `texts`;
    folder/encoder: that dict -> {"pooled_output" [batch, hidden], "sequence_output",
        "default"}: embeddings, one self-attention block, tanh pooler on [CLS].
- `make_tiny_keras_hub_bert(folder, texts)` saves a keras-hub BertBackbone (1 layer) and its
  BertTextClassifierPreprocessor with `save_to_preset`.
"""

from __future__ import annotations

import re
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
import tensorflow_text as text

from keras_irtf.utils import optional_import

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
HUB_SEQ_LENGTH = 128  # the default sequence length of TF Hub's BERT preprocessing models


def word_vocabulary(texts) -> list:
    """BERT-style vocabulary over the words and punctuation marks of `texts` (lower case)."""
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", str(t).lower())})
    return SPECIAL_TOKENS + [w for w in words if w not in SPECIAL_TOKENS]


def make_tiny_hub_bert(folder, texts, hidden_size: int = 32, seed: int = 0):
    """Write folder/preprocess and folder/encoder; returns their paths (str, str)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = word_vocabulary(texts)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    cls_id, sep_id = vocab.index("[CLS]"), vocab.index("[SEP]")

    class Preprocess(tf.Module):
        def __init__(self):
            super().__init__()
            self.vocab_file = tf.saved_model.Asset(str(vocab_file))
            init = tf.lookup.TextFileInitializer(
                self.vocab_file, tf.string, tf.lookup.TextFileIndex.WHOLE_LINE,
                tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER,
            )
            self.table = tf.lookup.StaticHashTable(init, default_value=vocab.index("[UNK]"))
            self.tokenizer = text.BertTokenizer(self.table, token_out_type=tf.int64, lower_case=True)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def tokenize(self, strings):
            return tf.cast(self.tokenizer.tokenize(strings), tf.int32)

        @tf.function
        def bert_pack_inputs(self, segments, seq_length=HUB_SEQ_LENGTH):
            pieces = [s.merge_dims(-2, -1) for s in segments]
            pieces = [p[:, : seq_length - 1 - len(pieces)] for p in pieces]
            ids, types = text.combine_segments(pieces, start_of_sequence_id=cls_id, end_of_segment_id=sep_id)
            word_ids, mask = text.pad_model_inputs(ids, seq_length)
            type_ids, _ = text.pad_model_inputs(types, seq_length)
            return {"input_word_ids": word_ids, "input_mask": mask, "input_type_ids": type_ids}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def __call__(self, strings):
            return self.bert_pack_inputs([self.tokenize(strings)], HUB_SEQ_LENGTH)

    pre = Preprocess()
    ragged = tf.RaggedTensorSpec([None, None, None], tf.int32, ragged_rank=2)
    for n in (16, 32, HUB_SEQ_LENGTH):  # the sequence lengths the saved model accepts
        pre.bert_pack_inputs.get_concrete_function([ragged], n)
    pre_dir = folder / "preprocess"
    tf.saved_model.save(pre, str(pre_dir))

    rng = np.random.default_rng(seed)
    h = int(hidden_size)

    def var(*shape, scale=0.2):
        return tf.Variable(rng.normal(0.0, scale, size=shape).astype(np.float32))

    class Encoder(tf.Module):
        def __init__(self):
            super().__init__()
            self.word = var(len(vocab), h)
            self.position = var(512, h)
            self.type = var(2, h)
            self.qkv = var(h, 3 * h, scale=1.0 / np.sqrt(h))
            self.out = var(h, h, scale=1.0 / np.sqrt(h))
            self.pool_w = var(h, h, scale=1.0 / np.sqrt(h))
            self.pool_b = tf.Variable(np.zeros(h, np.float32))

        @tf.function(input_signature=[{
            "input_word_ids": tf.TensorSpec([None, None], tf.int32),
            "input_mask": tf.TensorSpec([None, None], tf.int32),
            "input_type_ids": tf.TensorSpec([None, None], tf.int32),
        }])
        def __call__(self, inputs):
            ids, mask, types = inputs["input_word_ids"], inputs["input_mask"], inputs["input_type_ids"]
            length = tf.shape(ids)[1]
            x = tf.gather(self.word, ids) + tf.gather(self.type, types) + self.position[None, :length]
            x = tf.nn.l2_normalize(x, -1) * np.sqrt(h)
            q, k, v = tf.split(tf.einsum("bld,de->ble", x, self.qkv), 3, axis=-1)
            logits = tf.einsum("bqd,bkd->bqk", q, k) / np.sqrt(h)
            logits += (1.0 - tf.cast(mask, tf.float32))[:, None, :] * -1e9
            x = x + tf.einsum("bqk,bkd->bqd", tf.nn.softmax(logits), v) @ self.out
            pooled = tf.tanh(x[:, 0] @ self.pool_w + self.pool_b)
            return {"pooled_output": pooled, "sequence_output": x, "default": pooled}

    enc_dir = folder / "encoder"
    tf.saved_model.save(Encoder(), str(enc_dir))
    return str(pre_dir), str(enc_dir)


def make_tiny_keras_hub_bert(folder, texts, hidden_size: int = 32, sequence_length: int = 32, seed: int = 0):
    """Save a 1-layer keras-hub BertBackbone + BertTextClassifierPreprocessor preset; returns the
    folder (str)."""
    keras_hub = optional_import("keras_hub", "hub", "the tiny keras-hub presets of keras_irtf.testing")

    folder = Path(folder)
    keras.utils.set_random_seed(seed)
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=word_vocabulary(texts), lowercase=True)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=sequence_length)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=tokenizer.vocabulary_size(), num_layers=1, num_heads=2, hidden_dim=int(hidden_size),
        intermediate_dim=2 * int(hidden_size), max_sequence_length=max(64, sequence_length),
    )
    backbone.save_to_preset(str(folder))
    preprocessor.save_to_preset(str(folder))
    return str(folder)
