"""Text vectorisation: the reference tokeniser (ASCII only, lower case, no punctuation, split on
white space), a sorted vocabulary built from the training texts, padded integer sequences.

Id 0 is padding and id 1 the out-of-vocabulary token (Keras' convention); words follow, sorted.
The vocabulary is saved with each run as a text file (one word a line) so the export and the
evaluation tool rebuild exactly the same vectoriser.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import keras
import tensorflow as tf

from keras_irtf.utils import atomic_write_text

_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]")


def tokenize_py(text: str) -> list:
    """The same tokenisation in plain Python (for building vocabularies)."""
    text = text.encode("ascii", "ignore").decode("ascii").lower()
    return _PUNCT.sub("", text).split()


def standardize(texts):
    """TF version of `tokenize_py`'s normalisation (before the white-space split)."""
    texts = tf.strings.regex_replace(texts, r"[^\x00-\x7F]", "")
    texts = tf.strings.lower(texts)
    return tf.strings.regex_replace(texts, r"[[:punct:]]", "")


def build_vocabulary(texts) -> list:
    return sorted({w for t in texts for w in tokenize_py(str(t))})


class TextVectorizer:
    """Strings -> int32 [batch, max_length] token ids, usable in tf.data and in exported graphs."""

    def __init__(self, vocabulary, max_length: int = 16):
        self.vocabulary = list(vocabulary)
        self.max_length = int(max_length)
        self.layer = keras.layers.TextVectorization(
            standardize=standardize,
            split="whitespace",
            output_mode="int",
            output_sequence_length=self.max_length,
            vocabulary=self.vocabulary if self.vocabulary else ["[empty]"],
        )

    @property
    def vocab_size(self) -> int:
        """Embedding rows needed: padding + OOV + words."""
        return len(self.layer.get_vocabulary())

    def __call__(self, texts):
        return tf.cast(self.layer(texts), tf.int32)

    @classmethod
    def from_texts(cls, texts, max_length: int = 16) -> "TextVectorizer":
        return cls(build_vocabulary(texts), max_length)

    def save(self, path):
        atomic_write_text(path, "\n".join(self.vocabulary) + "\n")

    @classmethod
    def load(cls, path, max_length: int = 16) -> "TextVectorizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file {path} not found (it is written by training as vocab.txt)")
        words = [w for w in path.read_text().split("\n") if w]
        return cls(words, max_length)
