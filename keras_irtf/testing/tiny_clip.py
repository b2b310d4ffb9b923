"""Randomly initialised CLIP and SigLIP keras-hub presets, written with `save_to_preset`.

For tests and CPU benchmarks only: they have the files and interfaces of real presets (so every
code path that reads a preset folder runs: `CLIPBackbone.from_preset(folder)`,
`CLIPTokenizer.from_preset(folder)`, `CLIPImageConverter.from_preset(folder)`, the SigLIP ones
likewise) but none of the knowledge. Nothing is downloaded.

- `make_tiny_clip_preset(folder, texts)`: a CLIPBackbone with one layer of width 32 per tower,
  32 x 32 images in 8 x 8 patches, a 16-d projection, and a byte-level BPE vocabulary learnt
  from `texts` (every byte is in it, so any text tokenises; `<|endoftext|>` is the largest id,
  where CLIP's text pooler looks for the end of the text).
- `make_tiny_siglip_preset(folder, texts)`: a SigLIPBackbone of the same size and a
  SentencePiece model trained (with the `sentencepiece` package) on `texts` plus filler sentences.
- `make_random_clip_preset(folder, size="vit_b16")`: ViT-B/16 CLIP's shapes (about 150M
  parameters, a 600 MB weights file) for a speed benchmark.

A preset folder holds config.json + model.weights.h5 (the backbone), tokenizer.json + assets/
(the tokenizer), preprocessor.json and image_converter.json.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import keras

from keras_irtf.utils import optional_import

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
START_TOKEN, END_TOKEN = "<|startoftext|>", "<|endoftext|>"
FILLER = (
    "a photo of a dress with short sleeves",
    "make it blue and add a red stripe",
    "the shirt is darker and has a collar",
    "replace the cube with a large green sphere",
    "remove the small yellow cylinder on the left",
    "is longer, more elegant and has no pattern",
)


def _byte_symbols() -> list:
    """GPT-2 / CLIP byte-level BPE: the printable character standing for each byte 0..255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _words(text: str) -> list:
    # close to CLIP's pre-tokenisation: letter runs, single digits, runs of other symbols
    return re.findall(r"[^\W\d_]+|\d|[^\w\s]+|_", str(text).lower())


def clip_bpe_vocabulary(texts, num_merges: int = 200, vocabulary_size: int = 0):
    """(vocabulary {token: id}, merges ["a b", ...]) of a byte-level BPE learnt on `texts`.

    Ids: the 256 byte symbols, the same with CLIP's end-of-word mark `</w>`, the merged tokens,
    unused filler tokens up to `vocabulary_size` (if larger), then `<|startoftext|>` and
    `<|endoftext|>` (the largest id)."""
    symbols = _byte_symbols()
    vocab = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    counts = {}
    for text in list(texts) + list(FILLER):
        for word in _words(text):
            chars = [symbols[b] for b in word.encode("utf-8")]
            chars[-1] += "</w>"
            counts[tuple(chars)] = counts.get(tuple(chars), 0) + 1
    merges = []
    for _ in range(int(num_merges)):
        pairs = {}
        for word, n in counts.items():
            for pair in zip(word, word[1:]):
                pairs[pair] = pairs.get(pair, 0) + n
        if not pairs:
            break
        best = max(sorted(pairs), key=lambda p: pairs[p])  # ties: the first in sorted order
        merged = best[0] + best[1]
        merges.append(f"{best[0]} {best[1]}")
        if merged not in vocab:
            vocab[merged] = len(vocab)
        new_counts = {}
        for word, n in counts.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_counts[tuple(out)] = new_counts.get(tuple(out), 0) + n
        counts = new_counts
    if not merges:  # keras-hub cannot build its merge table from an empty list
        merges.append(f"{symbols[ord('a')]} {symbols[ord('b')]}</w>")
        vocab.setdefault(symbols[ord("a")] + symbols[ord("b")] + "</w>", len(vocab))
    for i in range(int(vocabulary_size) - 2 - len(vocab)):  # never produced by the merges
        vocab[f"<|unused{i}|>"] = len(vocab)
    vocab[START_TOKEN] = len(vocab)
    vocab[END_TOKEN] = len(vocab)
    return vocab, merges


def _clip_preset(folder, texts, seed, *, patch, image_size, vision_width, vision_layers, vision_heads,
                 vision_mlp, text_width, text_layers, text_heads, text_mlp, context, projection,
                 num_merges, vocabulary_size=0):
    keras_hub = optional_import("keras_hub", "hub", "the tiny keras-hub presets of keras_irtf.testing")

    folder = Path(folder)
    keras.utils.set_random_seed(int(seed))
    vocab, merges = clip_bpe_vocabulary(texts, num_merges, vocabulary_size)
    tokenizer = keras_hub.models.CLIPTokenizer(vocabulary=vocab, merges=merges)
    converter = keras_hub.layers.CLIPImageConverter(
        image_size=(image_size, image_size),
        scale=[1.0 / (255.0 * s) for s in CLIP_STD],
        offset=[-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)],
        interpolation="bicubic",
    )
    preprocessor = keras_hub.models.CLIPPreprocessor(tokenizer, converter, sequence_length=context)
    vision = keras_hub.models.CLIPVisionEncoder(
        patch_size=patch, hidden_dim=vision_width, num_layers=vision_layers, num_heads=vision_heads,
        intermediate_dim=vision_mlp, image_shape=(image_size, image_size, 3),
    )
    text = keras_hub.models.CLIPTextEncoder(
        vocabulary_size=len(vocab), embedding_dim=text_width, hidden_dim=text_width, num_layers=text_layers,
        num_heads=text_heads, intermediate_dim=text_mlp, max_sequence_length=context,
    )
    backbone = keras_hub.models.CLIPBackbone(vision, text, projection_dim=projection)
    backbone.save_to_preset(str(folder))
    preprocessor.save_to_preset(str(folder))  # tokenizer.json + assets, image_converter.json too
    return str(folder)


def make_tiny_clip_preset(folder, texts=(), seed: int = 0, width: int = 32, layers: int = 1,
                          image_size: int = 32, patch_size: int = 8, projection_dim: int = 16,
                          sequence_length: int = 16, num_merges: int = 200) -> str:
    """A tiny random CLIP preset in `folder` (created); returns the folder (str)."""
    return _clip_preset(
        folder, texts, seed, patch=patch_size, image_size=image_size, vision_width=width,
        vision_layers=layers, vision_heads=2, vision_mlp=2 * width, text_width=width, text_layers=layers,
        text_heads=2, text_mlp=2 * width, context=sequence_length, projection=projection_dim,
        num_merges=num_merges,
    )


VIT_SIZES = {
    # ViT-B/16 CLIP (OpenAI's clip-vit-base-patch16): 224 px, 16 px patches
    # (149,620,934 parameters, as keras-hub's clip_vit_base_patch16 preset)
    "vit_b16": dict(patch=16, image_size=224, vision_width=768, vision_layers=12, vision_heads=12,
                    vision_mlp=3072, text_width=512, text_layers=12, text_heads=8, text_mlp=2048,
                    context=77, projection=512, vocabulary_size=49408),
}


def make_random_clip_preset(folder, size: str = "vit_b16", seed: int = 0, texts=(), num_merges: int = 2000) -> str:
    """A randomly initialised CLIP preset with the shapes of `size` (VIT_SIZES): ViT-B/16's towers
    and its 49,408-token embedding (a small BPE vocabulary padded with unused tokens), ~150M
    parameters and a 600 MB weights file: for speed benchmarks only. Returns the folder (str)."""
    if size not in VIT_SIZES:
        raise ValueError(f"size={size!r}: one of {sorted(VIT_SIZES)}")
    return _clip_preset(folder, texts, seed, num_merges=num_merges, **VIT_SIZES[size])


def train_sentencepiece(texts, vocab_size: int = 96) -> bytes:
    """A unigram SentencePiece model (serialised proto) over `texts` + filler sentences, with
    SigLIP's special pieces: <pad> 0, </s> 1 (end and padding), <unk> 2."""
    spm = optional_import("sentencepiece", "hub", "the tiny SigLIP tokenizer of keras_irtf.testing")

    sentences = [s for s in (str(t).strip().lower() for t in list(texts) + list(FILLER) * 4) if s]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=out, vocab_size=int(vocab_size),
        hard_vocab_limit=False, model_type="unigram", character_coverage=1.0,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        minloglevel=2,
    )
    return out.getvalue()


def make_tiny_siglip_preset(folder, texts=(), seed: int = 0, width: int = 32, layers: int = 1,
                            image_size: int = 32, patch_size: int = 8, sequence_length: int = 16,
                            vocab_size: int = 96) -> str:
    """A tiny random SigLIP preset in `folder` (created); returns the folder (str). Both towers
    output `width`-d features (SigLIP's text head projects to the vision width)."""
    keras_hub = optional_import("keras_hub", "hub", "the tiny keras-hub presets of keras_irtf.testing")

    folder = Path(folder)
    keras.utils.set_random_seed(int(seed))
    tokenizer = keras_hub.models.SigLIPTokenizer(proto=train_sentencepiece(texts, vocab_size))
    converter = keras_hub.layers.SigLIPImageConverter(
        image_size=(image_size, image_size),
        scale=1.0 / (255.0 * SIGLIP_STD[0]),
        offset=-SIGLIP_MEAN[0] / SIGLIP_STD[0],
        interpolation="bicubic",
    )
    preprocessor = keras_hub.models.SigLIPPreprocessor(tokenizer, converter, sequence_length=sequence_length)
    vision = keras_hub.models.SigLIPVisionEncoder(
        patch_size=patch_size, hidden_dim=width, num_layers=layers, num_heads=2, intermediate_dim=2 * width,
        image_shape=(image_size, image_size, 3),
    )
    text = keras_hub.models.SigLIPTextEncoder(
        vocabulary_size=tokenizer.vocabulary_size(), embedding_dim=width, hidden_dim=width, num_layers=layers,
        num_heads=2, intermediate_dim=2 * width, max_sequence_length=sequence_length, projection_dim=width,
    )
    backbone = keras_hub.models.SigLIPBackbone(vision, text)
    backbone.save_to_preset(str(folder))
    preprocessor.save_to_preset(str(folder))
    return str(folder)
