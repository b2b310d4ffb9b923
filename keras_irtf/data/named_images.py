"""What FashionIQ, CIRR and triplet folders share: images identified by name, triplets, JSON files.

In these datasets every image is its own identity: an image's caption is its name (FashionIQ's
ASIN, CIRR's image name, a triplet folder's relative path), so a hit under the TIRG protocol's
"retrieved caption == target caption" rule is retrieving the target image itself.

A training query is one of the published (reference, text, target) triplets, drawn uniformly
(seeded); a triplet may have several texts (FashionIQ's caption orders), one drawn per query.
Files are read defensively: a file that is not valid JSON, an entry without a key or with a value
of the wrong type raises DatasetError naming the file, the line (or entry) and the key.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from keras_irtf.data.base import DatasetError, Queries, RetrievalDataset, Split, index_captions, refuse_css_only_keys
from keras_irtf.data.image_files import prepare_split_images

log = logging.getLogger(__name__)

_TYPE_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object", float: "a number"}


def read_json_file(path, help_text: str = ""):
    """The parsed content of a JSON file, or DatasetError naming the file and the line/column."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{path} not found. {help_text}".rstrip()) from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path} is not UTF-8 text ({e}). {help_text}".rstrip()) from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}, line {e.lineno}, column {e.colno}: not valid JSON ({e.msg}). "
                           f"{help_text}".rstrip()) from None


def json_lines(path, help_text: str = ""):
    """(line number, object) of every non-blank line of a JSON-lines file; DatasetError naming
    the file and line for a line that is not a JSON object."""
    path = Path(path)
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno}). "
                                   f"{help_text}".rstrip()) from None
            if not isinstance(obj, dict):
                raise DatasetError(f"{path}, line {n}: expected a JSON object, got {type(obj).__name__}. "
                                   f"{help_text}".rstrip())
            yield n, obj


def field(entry, key: str, kind, where: str, help_text: str = ""):
    """entry[key], checked to be of `kind` (a type or a tuple of types); DatasetError naming
    `where` (file and line or entry), the key and what was expected otherwise."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    expected = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: expected an object with key {key!r}, got {type(entry).__name__}. "
                           f"{help_text}".rstrip())
    if key not in entry:
        raise DatasetError(f"{where}: missing key {key!r} (expected {expected}). {help_text}".rstrip())
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise DatasetError(f"{where}: key {key!r} must be {expected}, got {value!r:.80}. {help_text}".rstrip())
    return value


def named_split(split_name: str, names, paths, *, on_bad_image="error", file_cache=None, image_size=224,
                cache_name="images", desc=None, verbose=True):
    """A Split of images identified by name: caption of an image = its name.

    names, paths: one per image (names distinct). Returns (split, kept names {name: id}, bad
    [(path, reason)]): images that fail the checks are left out with on_bad_image="skip" (and
    raise DatasetError with "error", naming them)."""
    keep, images, bad = prepare_split_images(
        [str(p) for p in paths], on_bad_image=on_bad_image, file_cache=file_cache, image_size=image_size,
        name=cache_name, desc=desc or cache_name, verbose=verbose,
    )
    kept = [i for i in range(len(names)) if keep[i]]
    captions = [names[i] for i in kept]
    caption_ids, vocab = index_captions(captions)
    split = Split(name=split_name, captions=captions, caption_ids=caption_ids, caption_vocab=vocab,
                  image_paths=[str(paths[i]) for i in kept], images=images, on_bad_image=on_bad_image)
    return split, {n: i for i, n in enumerate(captions)}, bad


def named_queries(split: Split, ids: dict, sources, texts, targets) -> Queries:
    """Queries of (source name, text, target name) triples; every name must be in `ids`."""
    src = np.array([ids[s] for s in sources], np.int64)
    tgt = np.array([ids[t] for t in targets], np.int64)
    return Queries(src, np.array(list(texts), dtype=object), tgt, split.caption_ids[tgt].astype(np.int64))


def report_dropped(count: int, desc: str, verbose: bool = True):
    """Warn that `count` queries of `desc` were left out because an image they name was skipped."""
    if count and verbose:
        log.warning(f"{count} {desc} left out: an image they name was skipped (data.on_bad_image=skip)")


def unique(items) -> list:
    """Distinct items in first-appearance order."""
    return list(dict.fromkeys(items))


class NamedImageDataset(RetrievalDataset):
    """Base of the datasets whose images are their own identity and whose training queries are
    published triplets (FashionIQ, CIRR, triplet folders).

    A subclass sets, for the training split, `_train_source_ids`, `_train_target_ids` (int64 [T])
    and `_train_texts` (object [T, V]: the texts one triplet may be shown with, one drawn
    uniformly per query; V = 1 for a single text).
    """

    _train_source_ids: np.ndarray
    _train_target_ids: np.ndarray
    _train_texts: np.ndarray

    @classmethod
    def from_settings(cls, settings, cfg, image_size: int, verbose: bool = True):
        refuse_css_only_keys(cfg, cls.name)
        return cls(cfg.data.root, settings=settings, image_size=image_size, on_bad_image=cfg.data.on_bad_image,
                   file_cache=cfg.data.file_cache, verbose=verbose)

    def _set_training_triplets(self, source_ids, target_ids, texts):
        texts = np.asarray(texts, dtype=object)
        if texts.ndim == 1:
            texts = texts[:, None]
        self._train_source_ids = np.asarray(source_ids, np.int64)
        self._train_target_ids = np.asarray(target_ids, np.int64)
        self._train_texts = texts
        if not len(self._train_source_ids):
            raise DatasetError(f"{self.name} under {self.root}: no training triplet is left (every one names an "
                               f"image that was skipped).")

    @property
    def num_training_triplets(self) -> int:
        return len(self._train_source_ids)

    def training_texts(self) -> list:
        """Every text the sampler can produce (each distinct text once, in triplet order): the
        vocabulary and the frozen text encoder's cache are built from it."""
        return unique(str(t) for t in self._train_texts.reshape(-1))

    def sample_training_queries(self, n, rng, paired=True):
        """n triplets drawn uniformly (with replacement) from the training triplets, each with
        one of its texts drawn uniformly. The references sample triplets, not pairs sharing a
        source: `paired` is ignored."""
        rows = rng.integers(len(self._train_source_ids), size=int(n))
        variant = rng.integers(self._train_texts.shape[1], size=int(n))
        tgt = self._train_target_ids[rows]
        return Queries(self._train_source_ids[rows].copy(), self._train_texts[rows, variant], tgt,
                       self.train.caption_ids[tgt].astype(np.int64))
