"""Fashion200k (Han et al., ICCV 2017), read in the layout its authors publish, with TIRG's protocol.

    <root>/labels/<category>_train_detect_all.txt   one image a line: path TAB score TAB caption
    <root>/labels/<category>_test_detect_all.txt
    <root>/women/<category>/<...>/<id>_<n>.jpeg     images, at the paths the label files give
    <root>/test_queries.txt                         "source_path target_path" a line (TIRG's)

A split is read from every label file whose name contains the split's name. Captions are
post-processed as the reference does (strip; "." -> "dotmark", "?" -> "questionmark",
"&" -> "andmark", "*" -> "starmark").

Training pairs (the reference's construction): a "parent" of a caption is the caption with one of
its words removed (string replacement of that word, double spaces collapsed, stripped); captions
with a common parent differ by one word. An image is modifiable when its caption shares a parent
with another caption. A training query takes a modifiable source image, one of its parents,
another child caption of that parent and a random image of it; the text is
"replace <source word> with <target word>" (the first source word absent from the target caption,
the first target word absent from the source caption).

Test queries: the pairs of the published test_queries.txt (33,480 in the GA paper), texts derived
the same way. Without that file, queries are generated from the test split with the training
construction (one per modifiable test image, seeded) and a warning says the numbers are then not
comparable with published ones.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from keras_irtf.data.base import DatasetError, Queries, RetrievalDataset, Split, index_captions
from keras_irtf.data.image_files import prepare_split_images
from keras_irtf.data.safe_files import contained_path, report_outside
from keras_irtf.data.sampling import Groups, passes
from keras_irtf.registry import register_dataset

log = logging.getLogger(__name__)

PUBLISHED_AT = "https://github.com/xthan/fashion-200k"
TEST_QUERIES_AT = "https://github.com/google/tirg (README, 'Fashion200k dataset': test_queries.txt)"
TEST_QUERIES_NAME = "test_queries.txt"


def layout_help(root=None) -> str:
    where = f" under {root}" if root else ""
    return (
        f"Fashion200k is expected in its published layout{where}: labels/<category>_train_detect_all.txt "
        f"and labels/<category>_test_detect_all.txt (TAB-separated: image path, detection score, caption), "
        f"the images at the paths they name (women/<category>/...), and test_queries.txt. "
        f"Download the dataset from {PUBLISHED_AT} and the standard test queries from {TEST_QUERIES_AT}, "
        f"and pass the folder that contains labels/ with --data-root DIR (or --set data.root=DIR)."
    )


def check_layout(root):
    """Cheap check (no TensorFlow) that `root` looks like Fashion200k; raises DatasetError if not."""
    if root is None:
        raise DatasetError("no dataset folder given (--data-root). " + layout_help())
    labels = Path(root) / "labels"
    if not labels.is_dir():
        raise DatasetError(f"{labels} is not a folder. " + layout_help(root))
    for split in ("train", "test"):
        if not label_files(root, split):
            raise DatasetError(f"{labels} has no label file with '{split}' in its name. " + layout_help(root))


def label_files(root, split):
    labels = Path(root) / "labels"
    return sorted(p for p in labels.iterdir() if p.is_file() and split in p.name and not p.name.startswith("."))


def clean_caption(text: str) -> str:
    return (text.strip().replace(".", "dotmark").replace("?", "questionmark")
            .replace("&", "andmark").replace("*", "starmark"))


def read_labels(root, split, on_outside: str = "error", dropped=None):
    """[(relative path, caption)] of every line of the split's label files, in file order.

    A listed path that leaves `root` (absolute, `..`, a symlink out) raises UnsafeFileError
    naming the file and line; with on_outside="skip" the line is left out and (where, path) is
    appended to `dropped`."""
    out = []
    for path in label_files(root, split):
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                fields = line.split("\t")
                if len(fields) < 3:
                    raise DatasetError(
                        f"{path}, line {n}: expected 'image path<TAB>detection score<TAB>caption', got "
                        f"{line.strip()[:120]!r}. " + layout_help(root)
                    )
                rel = fields[0].strip()
                if contained_path(root, rel, f"{path}, line {n}", on_outside) is None:
                    if dropped is not None:
                        dropped.append((f"{path}, line {n}", rel))
                    continue
                out.append((rel, clean_caption(fields[2])))
    return out


def different_words(source_caption: str, target_caption: str):
    """(source word, target word, text): the first source word not in the target and the first target
    word not in the source (the last word when there is none, as the reference's loop leaves it)."""
    source_words, target_words = source_caption.split(), target_caption.split()
    source_word = next((w for w in source_words if w not in target_words), source_words[-1] if source_words else "")
    target_word = next((w for w in target_words if w not in source_words), target_words[-1] if target_words else "")
    return source_word, target_word, f"replace {source_word} with {target_word}"


def replace_texts(vocab, source_captions, target_captions, chunk: int = 65536) -> np.ndarray:
    """`different_words(...)[2]` for many (source, target) caption-id pairs at once (vectorised over
    word ids: the sampler draws millions of pairs)."""
    words = sorted({w for c in vocab for w in c.split()})
    word_id = {w: i for i, w in enumerate(words)}
    width = max((len(c.split()) for c in vocab), default=1) or 1
    table = np.full((len(vocab), width), -1, np.int64)
    for i, c in enumerate(vocab):
        ids = [word_id[w] for w in c.split()]
        table[i, : len(ids)] = ids
    src = np.asarray(source_captions, np.int64)
    tgt = np.asarray(target_captions, np.int64)
    codes, inverse = np.unique(src * len(vocab) + tgt, return_inverse=True)
    a_all, b_all = codes // len(vocab), codes % len(vocab)
    src_word = np.empty(len(codes), np.int64)
    tgt_word = np.empty(len(codes), np.int64)

    def first_missing(x, y):
        """Per row, the first word of x absent from y (else x's last word), as a word id."""
        missing = ~(x[:, :, None] == y[:, None, :]).any(-1) & (x >= 0)
        last = np.maximum((x >= 0).sum(1) - 1, 0)
        pos = np.where(missing.any(1), missing.argmax(1), last)
        return x[np.arange(len(x)), pos]

    for start in range(0, len(codes), chunk):
        a, b = table[a_all[start:start + chunk]], table[b_all[start:start + chunk]]
        src_word[start:start + chunk] = first_missing(a, b)
        tgt_word[start:start + chunk] = first_missing(b, a)
    word_pairs, pair_index = np.unique(src_word * (len(words) + 1) + tgt_word, return_inverse=True)

    def name(i):
        return words[i] if i >= 0 else ""

    texts = np.array([f"replace {name(k // (len(words) + 1))} with {name(k % (len(words) + 1))}"
                      for k in word_pairs], dtype=object)
    return texts[pair_index.reshape(-1)][inverse.reshape(-1)]


def parent_captions(caption: str):
    """The reference's parents of a caption: remove one word (every occurrence of that string)."""
    out = []
    for w in caption.split():
        p = caption.replace(w, "").replace("  ", " ").strip()
        if p not in out:
            out.append(p)
    return out


class _PairIndex:
    """Captions -> parents -> sibling captions, for one split (the reference's caption index)."""

    def __init__(self, captions):
        self.caption_images = {}
        for i, c in enumerate(captions):
            self.caption_images.setdefault(c, []).append(i)
        self.children = {}
        for c in self.caption_images:
            for p in parent_captions(c):
                kids = self.children.setdefault(p, [])
                if c not in kids:
                    kids.append(c)
        self.image_parents = [[] for _ in captions]
        for p, kids in self.children.items():
            if len(kids) >= 2:
                for c in kids:
                    for i in self.caption_images[c]:
                        self.image_parents[i].append(p)
        self.modifiable = np.array([bool(ps) for ps in self.image_parents], dtype=bool)

    def sample_target(self, i, caption, rng):
        parents = self.image_parents[i]
        while True:
            p = parents[int(rng.integers(len(parents)))]
            kids = self.children[p]
            c = kids[int(rng.integers(len(kids)))]
            if c != caption:
                break
        imgs = self.caption_images[c]
        return imgs[int(rng.integers(len(imgs)))]


@register_dataset("fashion200k")
class Fashion200kDataset(RetrievalDataset):
    """Fashion200k with the TIRG protocol ("replace X with Y" pairs, published test queries)."""

    name = "fashion200k"

    @classmethod
    def check(cls, settings, cfg):
        check_layout(cfg.data.root)
    whm_ks = (1, 10, 50)

    def __init__(self, root, image_size: int = 224, on_bad_image: str = "error", file_cache=None,
                 verbose: bool = True, test_query_seed: int = 0):
        self.root = Path(root) if root is not None else None
        check_layout(root)
        self.skipped_images = []
        self._index = {}
        self._relpaths = {}
        self.dropped_test_queries = 0
        self.test_queries_source = None
        for split_name in ("train", "test"):
            outside = []
            recs = read_labels(self.root, split_name, on_bad_image, outside)
            if outside:
                report_outside([f"{w}: {rel}" for w, rel in outside], f"Fashion200k {split_name} labels", verbose)
            if not recs:
                raise DatasetError(f"the {split_name} label files under {self.root / 'labels'} are empty. "
                                   + layout_help(self.root))
            paths = [str(self.root / rel) for rel, _ in recs]
            keep, images, bad = prepare_split_images(
                paths, on_bad_image=on_bad_image, file_cache=file_cache, image_size=image_size,
                name=f"fashion200k_{split_name}", desc=f"Fashion200k {split_name} split", verbose=verbose,
            )
            self.skipped_images += bad
            dropped_paths = {recs[i][0] for i in np.flatnonzero(~keep)} | {rel for _, rel in outside}
            recs = [r for r, k in zip(recs, keep) if k]
            captions = [c for _, c in recs]
            caption_ids, vocab = index_captions(captions)
            split = Split(
                name=split_name, captions=captions, caption_ids=caption_ids, caption_vocab=vocab,
                image_paths=[str(self.root / rel) for rel, _ in recs], images=images,
                on_bad_image=on_bad_image,
            )
            self._relpaths[split_name] = [rel for rel, _ in recs]
            setattr(self, split_name, split)
            if split_name == "train":
                self._index["train"] = _PairIndex(captions)
                if not self._index["train"].modifiable.any():
                    raise DatasetError(
                        f"Fashion200k under {self.root}: no two training captions differ by one word, so "
                        f"no training pair can be formed. " + layout_help(self.root)
                    )
            else:
                split.test_queries = self._test_queries(dropped_paths, test_query_seed, verbose)
        if verbose:
            log.info(f"Fashion200k: {self.train.num_images} train images "
                     f"({int(self._index['train'].modifiable.sum())} modifiable), {self.test.num_images} test "
                     f"images, {len(self.test.test_queries)} test queries ({self.test_queries_source})")

    # ---- test queries -----------------------------------------------------------------------
    def _test_queries(self, dropped_paths, seed, verbose):
        split = self.test
        path = self.root / TEST_QUERIES_NAME
        lookup = {c: i for i, c in enumerate(split.caption_vocab)}
        src, tgt = [], []
        if path.is_file():
            self.test_queries_source = "official test_queries.txt"
            file_to_id = {rel: i for i, rel in enumerate(self._relpaths["test"])}
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    parts = line.split()
                    if len(parts) != 2:
                        raise DatasetError(f"{path}, line {n}: expected 'source_path target_path', got "
                                           f"{line.strip()[:120]!r}")
                    if parts[0] in dropped_paths or parts[1] in dropped_paths:
                        self.dropped_test_queries += 1
                        continue
                    for p in parts:
                        if p not in file_to_id:
                            raise DatasetError(
                                f"{path}, line {n}: image {p} is not in the test label files "
                                f"({', '.join(f.name for f in label_files(self.root, 'test'))}). "
                                + layout_help(self.root)
                            )
                    src.append(file_to_id[parts[0]])
                    tgt.append(file_to_id[parts[1]])
            if self.dropped_test_queries and verbose:
                log.warning(f"{self.dropped_test_queries} test queries dropped: their images were skipped")
        else:
            self.test_queries_source = "generated: no test_queries.txt"
            log.warning(f"{path} not found; generating test queries from the test split with the training "
                        f"construction (seed {seed}). Recalls are NOT comparable with published Fashion200k numbers: "
                        f"get test_queries.txt from {TEST_QUERIES_AT}.")
            index = _PairIndex(split.captions)
            rng = np.random.default_rng(seed)
            for i in np.flatnonzero(index.modifiable):
                src.append(int(i))
                tgt.append(index.sample_target(int(i), split.captions[i], rng))
        texts = [different_words(split.captions[s], split.captions[t])[2] for s, t in zip(src, tgt)]
        return Queries(np.array(src, np.int64), np.array(texts, dtype=object), np.array(tgt, np.int64),
                       np.array([lookup[split.captions[t]] for t in tgt], np.int64))

    # ---- training ---------------------------------------------------------------------------
    def training_texts(self):
        """The reference builds its vocabulary from every training caption."""
        return list(self.train.captions)

    def sample_training_queries(self, n, rng, paired=True):
        """The reference sampler: sources follow shuffled passes over the training images, a source
        that is not modifiable is replaced by random images until one is; then a parent, a sibling
        caption and a random image of it. (The reference draws no pairs for Fashion200k: `paired`
        is ignored.)"""
        split, index = self.train, self._index["train"]
        vocab = split.caption_vocab
        lookup = {c: i for i, c in enumerate(vocab)}
        # parents with at least two children, as ids; caption -> such parents; parent -> children
        parents = sorted(p for p, kids in index.children.items() if len(kids) >= 2)
        parent_id = {p: k for k, p in enumerate(parents)}
        children = Groups([[lookup[c] for c in index.children[p]] for p in parents])
        caption_parents = [[] for _ in vocab]
        for p in parents:
            for c in index.children[p]:
                caption_parents[lookup[c]].append(parent_id[p])
        caption_parents = Groups(caption_parents)
        images_of = Groups([index.caption_images[c] for c in vocab])

        modifiable = np.flatnonzero(index.modifiable)
        src = passes(rng, np.arange(split.num_images), n)
        # a source that is not modifiable is replaced by random images until one is: a uniform
        # draw among the modifiable ones
        fix = ~index.modifiable[src]
        src[fix] = modifiable[np.floor(rng.random(int(fix.sum())) * len(modifiable)).astype(np.int64)]
        src_cap = split.caption_ids[src]
        tcap = np.empty(n, np.int64)
        pending = np.arange(n)
        while len(pending):  # a parent, then one of its children; again if that is the source's caption
            p, _ = caption_parents.pick(src_cap[pending], rng)
            c, _ = children.pick(p, rng)
            ok = c != src_cap[pending]
            tcap[pending[ok]] = c[ok]
            pending = pending[~ok]
        tgt, _ = images_of.pick(tcap, rng)
        return Queries(src, replace_texts(vocab, src_cap, tcap), tgt, tcap)
