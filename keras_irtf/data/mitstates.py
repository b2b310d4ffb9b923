"""MIT-States (Isola, Lim and Adelson, CVPR 2015), read in the layout its authors publish.

    <root>/images/<adjective> <noun>/*.jpg

Folders whose name has no space, and the adjective "adj" (the unlabelled "adj <noun>" folders),
are not used. With the protocol of the TIRG reference code (which the GA paper follows):

- the split is by noun: the 49 nouns of TEST_NOUNS form the test split, all others train, so no
  noun is seen in both;
- an image's caption is "<adjective> <noun>"; a query's text is the target adjective alone;
- training queries: a source image, a target adjective drawn among the adjectives seen with the
  source's noun, a random image of that target caption; queries come in pairs that share the
  source and have two different target adjectives;
- test queries: every test image with every OTHER adjective seen with its noun in the test split;
  the targets are all images captioned "<target adjective> <noun>" (one is kept as the query's
  representative target; recall compares captions);
- besides Recall@K: adjective-only and noun-only recall (a top-K caption with the target's
  adjective / noun counts as a hit).
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

PUBLISHED_AT = "http://web.mit.edu/phillipi/Public/states_and_transformations/index.html"

TEST_NOUNS = (
    "armor", "bracelet", "bush", "camera", "candy", "castle", "ceramic", "cheese", "clock",
    "clothes", "coffee", "fan", "fig", "fish", "foam", "forest", "fruit", "furniture", "garden",
    "gate", "glass", "horse", "island", "laptop", "lead", "lightning", "mirror", "orange", "paint",
    "persimmon", "plastic", "plate", "potato", "road", "rubber", "sand", "shell", "sky", "smoke",
    "steel", "stream", "table", "tea", "tomato", "vacuum", "wax", "wheel", "window", "wool",
)


def layout_help(root=None) -> str:
    where = f" under {root}" if root else ""
    return (
        f"MIT-States is expected in its published layout{where}: <root>/images/<adjective> <noun>/*.jpg "
        f"(e.g. images/ancient castle/image_001.jpg). Download the 'release_dataset' archive of "
        f"Isola, Lim and Adelson (CVPR 2015) from {PUBLISHED_AT}, unpack it, and pass the folder "
        f"that contains images/ with --data-root DIR (or --set data.root=DIR)."
    )


def check_layout(root):
    """Cheap check (no TensorFlow) that `root` looks like MIT-States; raises DatasetError if not."""
    if root is None:
        raise DatasetError("no dataset folder given (--data-root). " + layout_help())
    images = Path(root) / "images"
    if not images.is_dir():
        raise DatasetError(f"{images} is not a folder. " + layout_help(root))
    if not any(" " in d.name for d in images.iterdir() if d.is_dir()):
        raise DatasetError(f"{images} has no '<adjective> <noun>' folders. " + layout_help(root))


def list_images(root, on_outside: str = "error", dropped=None):
    """[(path, adjective, noun)] of every usable image, sorted by folder then file name, and the
    number of non-JPEG files ignored.

    A file (or folder) that is a symlink leading out of `root` raises UnsafeFileError; with
    on_outside="skip" it is left out and its path appended to `dropped`."""
    records, ignored = [], 0
    for folder in sorted(p for p in (Path(root) / "images").iterdir() if p.is_dir()):
        parts = folder.name.split()
        if len(parts) != 2 or parts[0] == "adj":
            continue
        adj, noun = parts
        for f in sorted(folder.iterdir()):
            if f.name.startswith("."):
                continue
            if not f.name.lower().endswith("jpg"):
                ignored += 1
                continue
            rel = f.relative_to(root)
            if contained_path(root, rel, f"MIT-States image {f}", on_outside) is None:
                if dropped is not None:
                    dropped.append(str(f))
                continue
            records.append((f, adj, noun))
    return records, ignored


@register_dataset("mitstates")
class MITStatesDataset(RetrievalDataset):
    """MIT-States with the TIRG protocol (noun-disjoint split, adjective texts)."""

    name = "mitstates"

    @classmethod
    def check(cls, settings, cfg):
        check_layout(cfg.data.root)
    whm_ks = (1, 5, 10)

    def __init__(self, root, image_size: int = 224, on_bad_image: str = "error", file_cache=None,
                 verbose: bool = True):
        self.root = Path(root) if root is not None else None
        check_layout(root)
        outside = []
        records, ignored = list_images(self.root, on_bad_image, outside)
        if outside:
            report_outside(outside, "MIT-States images", verbose)
        if verbose and ignored:
            log.info(f"MIT-States: ignored {ignored} file(s) that are not .jpg")
        test_nouns = set(TEST_NOUNS)
        self.skipped_images = []
        self._nouns, self._adjs, self._noun_adjs, self._caption_images = {}, {}, {}, {}
        for split_name in ("train", "test"):
            recs = [r for r in records if (r[2] in test_nouns) == (split_name == "test")]
            if not recs:
                raise DatasetError(
                    f"MIT-States under {self.root} has no {split_name} images (the test split is the "
                    f"49 nouns {', '.join(TEST_NOUNS[:5])}, ...; training is every other noun). "
                    + layout_help(self.root)
                )
            paths = [str(r[0]) for r in recs]
            keep, images, bad = prepare_split_images(
                paths, on_bad_image=on_bad_image, file_cache=file_cache, image_size=image_size,
                name=f"mitstates_{split_name}", desc=f"MIT-States {split_name} split", verbose=verbose,
            )
            self.skipped_images += bad
            recs = [r for r, k in zip(recs, keep) if k]
            self._build_split(split_name, recs, images, on_bad_image)
        if verbose:
            log.info(f"MIT-States: {self.train.num_images} train images ({len(self._noun_adjs['train'])} nouns), "
                     f"{self.test.num_images} test images ({len(self._noun_adjs['test'])} nouns), "
                     f"{len(self.test.test_queries)} test queries")

    # ---- indexing ---------------------------------------------------------------------------
    def _build_split(self, split_name, recs, images, on_bad_image):
        adjs = [r[1] for r in recs]
        nouns = [r[2] for r in recs]
        captions = [f"{a} {n}" for a, n in zip(adjs, nouns)]
        caption_ids, vocab = index_captions(captions)
        caption_images = {}
        noun_adjs = {}
        for i, (a, n) in enumerate(zip(adjs, nouns)):
            caption_images.setdefault(captions[i], []).append(i)
            if a not in noun_adjs.setdefault(n, []):
                noun_adjs[n].append(a)
        self._nouns[split_name] = np.array(nouns, dtype=object)
        self._adjs[split_name] = np.array(adjs, dtype=object)
        self._noun_adjs[split_name] = noun_adjs
        self._caption_images[split_name] = caption_images
        test_queries = self._test_queries(split_name, captions, adjs, nouns, vocab) if split_name == "test" else None
        split = Split(
            name=split_name, captions=captions, caption_ids=caption_ids, caption_vocab=vocab,
            image_paths=[str(r[0]) for r in recs], images=images, test_queries=test_queries,
            on_bad_image=on_bad_image,
        )
        setattr(self, split_name, split)

    def _test_queries(self, split_name, captions, adjs, nouns, vocab):
        lookup = {c: i for i, c in enumerate(vocab)}
        noun_adjs = self._noun_adjs[split_name]
        caption_images = self._caption_images[split_name]
        src, txt, tgt, tcap = [], [], [], []
        for i, (a, n) in enumerate(zip(adjs, nouns)):
            for target_adj in noun_adjs[n]:
                if target_adj == a:
                    continue
                target = f"{target_adj} {n}"
                src.append(i)
                txt.append(target_adj)
                tgt.append(caption_images[target][0])
                tcap.append(lookup[target])
        return Queries(np.array(src, np.int64), np.array(txt, dtype=object), np.array(tgt, np.int64),
                       np.array(tcap, np.int64))

    def num_targets(self, queries: Queries = None, split_name: str = "test") -> np.ndarray:
        """How many images of the split share each query's target caption (every one is a target)."""
        queries = queries if queries is not None else getattr(self, split_name).test_queries
        counts = np.bincount(getattr(self, split_name).caption_ids,
                             minlength=len(getattr(self, split_name).caption_vocab))
        return counts[queries.target_captions]

    # ---- training ---------------------------------------------------------------------------
    def training_texts(self):
        """The reference builds its vocabulary from every training caption."""
        return list(self.train.captions)

    def sample_training_queries(self, n, rng, paired=True):
        """The reference sampler. Sources follow shuffled passes over the training images; for each
        source a target adjective is drawn among those of its noun (its own included, as in the
        reference) and a random image of that caption is the target. When `paired`, each source
        gives two consecutive queries whose target adjectives differ."""
        split = self.train
        nouns = self._nouns["train"]
        noun_adjs, caption_images = self._noun_adjs["train"], self._caption_images["train"]
        eligible = np.array([len(noun_adjs[nn]) >= 2 for nn in nouns], dtype=bool)
        if not eligible.any():
            raise DatasetError(
                f"MIT-States under {self.root}: no training noun has two adjectives, so no training "
                f"query can be formed. " + layout_help(self.root)
            )
        lookup = {c: i for i, c in enumerate(split.caption_vocab)}
        noun_names = sorted(noun_adjs)
        noun_index = {nn: k for k, nn in enumerate(noun_names)}
        # noun -> the caption ids of its adjectives; caption -> its images
        noun_captions = Groups([[lookup[f"{a} {nn}"] for a in noun_adjs[nn]] for nn in noun_names])
        images_of = Groups([caption_images[c] for c in split.caption_vocab])
        adjective_of = np.array([c.split()[0] for c in split.caption_vocab], dtype=object)

        per_source = 2 if paired else 1
        sources = passes(rng, np.flatnonzero(eligible), -(-n // per_source))
        source_nouns = np.array([noun_index[nn] for nn in nouns], np.int64)[sources]
        first, pos = noun_captions.pick(source_nouns, rng)
        caps = [first]
        if paired:  # a second, different adjective of the same noun
            second, _ = noun_captions.pick(source_nouns, rng, exclude_position=pos)
            caps.append(second)
        src = np.repeat(sources, per_source)[:n]
        tcap = np.stack(caps, axis=1).reshape(-1)[:n]
        tgt, _ = images_of.pick(tcap, rng)
        return Queries(src, adjective_of[tcap], tgt, tcap)

    # ---- evaluation -------------------------------------------------------------------------
    def extra_recalls(self):
        """adjective / noun: a retrieved caption sharing the target's adjective / noun is a hit."""
        vocab = self.test.caption_vocab
        adj_names = sorted({c.split()[0] for c in vocab})
        noun_names = sorted({c.split()[1] for c in vocab})
        # one extra slot (-1) for padded results that must never match
        adj_of = np.array([adj_names.index(c.split()[0]) for c in vocab] + [-1], np.int64)
        noun_of = np.array([noun_names.index(c.split()[1]) for c in vocab] + [-2], np.int64)

        def by(table):
            def hits(retrieved, queries):
                r = np.asarray(retrieved, np.int64)
                r = np.where(r < 0, len(vocab), r)
                return table[r] == table[np.asarray(queries.target_captions, np.int64)][:, None]

            return hits

        return {"adjective": by(adj_of), "noun": by(noun_of)}
