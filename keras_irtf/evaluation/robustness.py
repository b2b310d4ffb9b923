"""Robustness of a trained model: the TIRG test protocol with the QUERY perturbed.

Every test query is ranked against every clean test image (its own source excluded, a hit when a
retrieved image has the target's caption: the clean protocol of keras_irtf.evaluation.protocol;
a dataset with a protocol of its own, e.g. FashionIQ's per-category galleries, is ranked by
that), but its source image or its text is perturbed first:

    noise   Gaussian pixel noise of standard deviation sigma (pixels in [0, 1], before the
            model's ImageNet normalisation), clipped to [0, 1]; sigma in {2, 4, 8, 16} / 255
    jpeg    JPEG re-encoding of the 8-bit image at quality {90, 50, 20}
    fgsm    one signed-gradient step of size eps, eps in {1, 2, 4, 8} / 255
    pgd     10 signed-gradient steps of eps / 4 from a uniform random start in the eps-ball,
            projected on the ball and on [0, 1] after each step
    apgd    the strongest attack here: APGD (Croce and Hein, ICML 2020; step size halved at
            fixed checkpoints when the loss stops rising, momentum 0.75, the best point kept) run
            twice from a uniform random start, once on the cross-entropy below and once on the
            DLR margin loss -(z_hit - z_miss) / (z_1 - z_3), z_hit the best score of a gallery
            image with the target's caption, z_miss the best of the others, z_1 >= z_3 the
            first and third scores; per query the result with the smaller margin z_hit - z_miss
            is kept (for R@1 that is the worse of the two attacks); apgd_steps (50) iterations
            each
    text    drop_word: one random word removed (texts of one word are left alone);
            swap_words: two random words exchanged (texts of one word are left alone)

The attacks are white-box, L-infinity, on the query image's [0, 1] pixels, and maximise the
retrieval loss of the query against its ground-truth target among the FULL test gallery:
softmax cross-entropy over the scores of the query against every test image (embedded clean,
once), the source image masked out, the target image as the label. Batch normalisation and
dropout are in inference mode. Attacked images are not re-quantised to 8 bits.

    input_grad_l1 / input_grad_l2: the mean over the test queries of ||dL/dx_i||_1 (and _2) for
    that same per-query loss, x = the query image as the model receives it (ImageNet-normalised
    pixels: where L_GA^A takes its gradient with ga.point=input), clean images.

Everything random is drawn from the seed (stateless ops seeded per perturbation, level and
batch; numpy generators for the texts), so two runs give identical numbers. Memory is bounded
as in the clean evaluation: queries are processed in batches and ranked in chunks.

    python tools/evaluate.py --run runs/css_tirg_s0 --robustness      # -> runs/.../robustness.json
    from keras_irtf.evaluation.robustness import evaluate_robustness
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import tensorflow as tf

from keras_irtf.data.base import Queries
from keras_irtf.data.pipeline import as_preprocessor, queries_dataset
from keras_irtf.data.text_cache import CachedTextVectorizer
from keras_irtf.evaluation import metrics as M
from keras_irtf.evaluation.protocol import embed_gallery, rank, recalls_from_embeddings
from keras_irtf.utils import Progress

KINDS = ("noise", "jpeg", "fgsm", "pgd", "apgd", "text")
DEFAULT_LEVELS = {
    "noise": (2 / 255, 4 / 255, 8 / 255, 16 / 255),
    "jpeg": (90, 50, 20),
    "fgsm": (1 / 255, 2 / 255, 4 / 255, 8 / 255),
    "pgd": (1 / 255, 2 / 255, 4 / 255, 8 / 255),
    "apgd": (4 / 255,),
    "text": ("drop_word", "swap_words"),
}
# the columns the ablation reports (tools/ablate.py): cheap enough to run after every cell
ABLATION_LEVELS = {"noise": (8 / 255,), "fgsm": (4 / 255,), "pgd": (4 / 255,)}
PGD_STEPS = 10
APGD_STEPS = 50
APGD_MOMENTUM = 0.75
APGD_RHO = 0.75  # a checkpoint halves the step when fewer than this share of its steps raised the loss
GALLERY = "full test gallery (every test image, the source excluded)"


def level_key(kind: str, level) -> str:
    """The JSON key of a level: the value used, as a short string ("0.0157" for 4/255)."""
    if kind == "jpeg":
        return str(int(level))
    if kind == "text":
        return str(level)
    return f"{float(level):.3g}"


def _seed(seed: int, *parts) -> np.ndarray:
    """A stateless-op seed [2] for (seed, parts...): the same parts give the same draws."""
    return np.array([int(seed), zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF], np.int64)


# ---- text perturbations (on the raw strings) -------------------------------------------------------
def drop_word(text: str, rng) -> str:
    words = str(text).split()
    if len(words) < 2:
        return str(text)
    i = int(rng.integers(len(words)))
    return " ".join(words[:i] + words[i + 1:])


def swap_words(text: str, rng) -> str:
    words = str(text).split()
    if len(words) < 2:
        return str(text)
    i, j = (int(v) for v in rng.choice(len(words), size=2, replace=False))
    words[i], words[j] = words[j], words[i]
    return " ".join(words)


TEXT_PERTURBATIONS = {"drop_word": drop_word, "swap_words": swap_words}


def perturb_texts(texts, how: str, seed: int = 0) -> np.ndarray:
    """Every text perturbed by `how` ("drop_word" | "swap_words"), one seeded draw per text."""
    fn = TEXT_PERTURBATIONS[how]
    rng = np.random.default_rng([int(seed), zlib.crc32(how.encode())])
    return np.array([fn(t, rng) for t in texts], dtype=object)


# ---- pixels -------------------------------------------------------------------------------------
def _pixel_ops(preprocessor):
    mean, std = tf.constant(preprocessor.mean), tf.constant(preprocessor.std)

    def to_unit(x):
        """Normalised model input -> [0, 1] pixels exactly as the pipeline divided them (the
        8-bit values are recovered by rounding, so the clean path is bit-identical)."""
        p = tf.clip_by_value(tf.round((x * std + mean) * 255.0), 0.0, 255.0)
        return tf.cast(tf.cast(p, tf.uint8), tf.float32) / 255.0

    def to_input(u):
        return (u - mean) / std  # the encoder's ImagePreprocessor.normalize, on [0, 1] pixels

    return to_unit, to_input, std


def gaussian_noise(u, sigma, seed):
    """[0, 1] pixels + N(0, sigma^2) per pixel (a stateless draw from `seed`, shape [2]), clipped."""
    return _noise(tf.convert_to_tensor(u, tf.float32), tf.constant(float(sigma)), tf.constant(seed, tf.int64))


def jpeg_reencode(u, quality: int):
    """[0, 1] pixels [B, H, W, 3] -> rounded to 8 bits, JPEG-encoded at `quality`, decoded."""
    return _jpeg(tf.convert_to_tensor(u, tf.float32), int(quality))


def _tf_functions():
    @tf.function(reduce_retracing=True)
    def noise(u, sigma, seed):
        return tf.clip_by_value(u + sigma * tf.random.stateless_normal(tf.shape(u), seed=seed), 0.0, 1.0)

    @tf.function(reduce_retracing=True)
    def jpeg(u, quality):
        def one(image):
            data = tf.io.encode_jpeg(tf.cast(tf.round(image * 255.0), tf.uint8), quality=quality)
            return tf.cast(tf.io.decode_jpeg(data, channels=3), tf.float32) / 255.0

        return tf.map_fn(one, u, fn_output_signature=tf.TensorSpec(u.shape[1:], tf.float32))

    return noise, jpeg


_FUNCTIONS = {}


def _noise(u, sigma, seed):
    if not _FUNCTIONS:
        _FUNCTIONS["noise"], _FUNCTIONS["jpeg"] = _tf_functions()
    return _FUNCTIONS["noise"](u, sigma, seed)


def _jpeg(u, quality):
    if not _FUNCTIONS:
        _FUNCTIONS["noise"], _FUNCTIONS["jpeg"] = _tf_functions()
    return _FUNCTIONS["jpeg"](u, quality)


def apgd_checkpoints(steps: int) -> list:
    """The iterations at which APGD may halve its step: ceil(p_j * steps) for p_0 = 0, p_1 = 0.22,
    p_(j+1) = p_j + max(p_j - p_(j-1) - 0.03, 0.06), while p_j <= 1 (0, 22, 41, 57, 70, 80, 87, 93,
    99 for 100 steps)."""
    p = [0.0, 0.22]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)
        if nxt > 1.0:
            break
        p.append(nxt)
    return sorted({int(np.ceil(round(v * steps, 6))) for v in p})


def apgd_subset(n_queries: int, size) -> np.ndarray | None:
    """The indices (sorted) of the `size` queries APGD attacks out of `n_queries`: a fixed draw,
    the same for every model and seed, so that runs are compared on the same queries; None for
    every query (size None or >= n_queries)."""
    if size is None or int(size) >= n_queries:
        return None
    if int(size) < 1:
        raise ValueError(f"apgd_queries must be >= 1, got {size}")
    rng = np.random.default_rng(zlib.crc32(b"apgd queries"))
    return np.sort(rng.permutation(n_queries)[: int(size)])


def _recalls(q, g, split, queries, ks, exclude, query_chunk, gallery_chunk, backend):
    k = min(max(ks), len(g))
    _, top = rank(q, g, k, exclude, query_chunk, gallery_chunk, False, backend)
    retrieved = np.where(top >= 0, split.caption_ids[np.maximum(top, 0)], -1)
    if k < max(ks):
        retrieved = np.pad(retrieved, ((0, 0), (0, max(ks) - k)), constant_values=-1)
    return M.recall_at_k(retrieved, queries.target_captions, ks)


def evaluate_robustness(model, dataset, vectorizer, levels=None, ks=(1, 5, 10, 50), seed=0, batch_size=256,
                        preprocessor=64, query_chunk=1024, gallery_chunk=8192, backend="tf", input_grad=True,
                        pgd_steps=PGD_STEPS, apgd_steps=APGD_STEPS, apgd_queries=None, split_name="test",
                        verbose=True) -> dict:
    """Recall@K of the test queries under each perturbation (see the module docstring).

    apgd_queries: attack with APGD only this many test queries, the same ones for every model
    (apgd_subset(); their clean recall is reported as "apgd_subset_clean"), since APGD costs
    about 100 gradient passes a query; None attacks every query.

    levels: {kind: [levels]} (default DEFAULT_LEVELS; a subset, e.g. ABLATION_LEVELS, runs only
    those). Returns {"clean": {...}, "noise": {"0.0157": {"R@1": ...}}, ..., "input_grad_l1": x,
    "input_grad_l2": x, "settings": {...}}.
    """
    levels = DEFAULT_LEVELS if levels is None else levels
    unknown = [k for k in levels if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown perturbation kind(s) {unknown}; expected a subset of {list(KINDS)}")
    ks = tuple(ks)
    split = getattr(dataset, split_name)
    queries = split.test_queries
    exclude = np.asarray(queries.source_ids, np.int64)
    protocol = dataset.test_protocol(split_name, queries) if hasattr(dataset, "test_protocol") else None
    preprocessor = as_preprocessor(preprocessor)
    gallery = embed_gallery(model, split, np.arange(split.num_images), batch_size, preprocessor, verbose,
                            f"{split_name} gallery")
    G = tf.constant(gallery)
    n_gallery = int(gallery.shape[0])
    to_unit, to_input, std = _pixel_ops(preprocessor)

    @tf.function(reduce_retracing=True)
    def embed(u, text):
        return model.embed_queries(to_input(u), text, training=False)

    caption_of = tf.constant(np.asarray(split.caption_ids, np.int64))

    def scores(u, text, source):
        """The query's scores against every gallery image, its own source masked out."""
        q = model.embed_queries(to_input(u), text, training=False)
        logits = tf.matmul(tf.cast(q, tf.float32), G, transpose_b=True)
        return tf.where(tf.one_hot(source, n_gallery, on_value=True, off_value=False),
                        tf.constant(-1e9, logits.dtype), logits)

    def hit_and_miss(logits, source, target):
        """The best score of a gallery image that counts as a hit (the target's caption, not the
        source) and the best of the others."""
        hit = tf.equal(caption_of[None, :], tf.gather(caption_of, tf.cast(target, tf.int64))[:, None])
        hit = tf.logical_and(hit, tf.logical_not(tf.one_hot(source, n_gallery, on_value=True, off_value=False)))
        low = tf.constant(-1e9, logits.dtype)
        return tf.reduce_max(tf.where(hit, logits, low), axis=1), tf.reduce_max(tf.where(hit, low, logits), axis=1)

    @tf.function(reduce_retracing=True)
    def loss_and_grad(u, text, source, target):
        """Per-query CE against the full gallery (source masked) and its gradient w.r.t. u."""
        with tf.GradientTape() as tape:
            tape.watch(u)
            loss = tf.nn.sparse_softmax_cross_entropy_with_logits(target, scores(u, text, source))
            total = tf.reduce_sum(loss)  # queries do not interact (inference mode)
        return loss, tape.gradient(total, u)

    @tf.function(reduce_retracing=True)
    def dlr_and_grad(u, text, source, target):
        """Per-query DLR margin loss -(z_hit - z_miss) / (z_1 - z_3) and its gradient w.r.t. u."""
        with tf.GradientTape() as tape:
            tape.watch(u)
            logits = scores(u, text, source)
            z_hit, z_miss = hit_and_miss(logits, source, target)
            top = tf.math.top_k(logits, min(3, n_gallery)).values
            loss = -(z_hit - z_miss) / (top[:, 0] - top[:, -1] + 1e-12)
            total = tf.reduce_sum(loss)
        return loss, tape.gradient(total, u)

    @tf.function(reduce_retracing=True)
    def margin(u, text, source, target):
        z_hit, z_miss = hit_and_miss(scores(u, text, source), source, target)
        return z_hit - z_miss

    def fgsm(u, text, source, target, eps, s):
        _, g = loss_and_grad(u, text, source, target)
        return tf.clip_by_value(u + eps * tf.sign(g), 0.0, 1.0)

    def pgd(u, text, source, target, eps, s):
        lo, hi = tf.maximum(u - eps, 0.0), tf.minimum(u + eps, 1.0)
        x = tf.clip_by_value(u + tf.random.stateless_uniform(tf.shape(u), seed=s, minval=-eps, maxval=eps), lo, hi)
        for _ in range(pgd_steps):
            _, g = loss_and_grad(x, text, source, target)
            x = tf.clip_by_value(x + (eps / 4.0) * tf.sign(g), lo, hi)
        return x

    checkpoints = set(apgd_checkpoints(apgd_steps)) - {0}

    def apgd_run(u, text, source, target, eps, s, objective):
        """One APGD run of `apgd_steps` iterations on `objective` (loss, grad); returns the point
        of the highest loss seen and that loss, per query."""
        lo, hi = tf.maximum(u - eps, 0.0), tf.minimum(u + eps, 1.0)
        x = tf.clip_by_value(u + tf.random.stateless_uniform(tf.shape(u), seed=s, minval=-eps, maxval=eps), lo, hi)
        x_prev = x
        step = tf.fill([tf.shape(u)[0], 1, 1, 1], 2.0 * eps)
        best_x, best_loss, best_g = x, None, None
        prev_loss, rises, last_check, check_step, check_best = None, 0.0, 0, step, None
        for k in range(apgd_steps + 1):
            loss, g = objective(x, text, source, target)
            if best_loss is None:
                best_loss, best_g, prev_loss, check_best = loss, g, loss, loss
            else:
                better = loss > best_loss
                b4 = better[:, None, None, None]
                best_x, best_g = tf.where(b4, x, best_x), tf.where(b4, g, best_g)
                best_loss = tf.where(better, loss, best_loss)
                rises = rises + tf.cast(loss > prev_loss, tf.float32)
                prev_loss = loss
            if k == apgd_steps:
                break
            if k in checkpoints:  # halve the step where the loss stalled; go on from the best point
                stalled = rises < APGD_RHO * (k - last_check)
                flat = tf.logical_and(tf.equal(check_step[:, 0, 0, 0], step[:, 0, 0, 0]),
                                      tf.equal(check_best, best_loss))
                halve = tf.logical_or(stalled, flat)
                h4 = halve[:, None, None, None]
                step = tf.where(h4, step / 2.0, step)
                x, x_prev, g = tf.where(h4, best_x, x), tf.where(h4, best_x, x_prev), tf.where(h4, best_g, g)
                rises, last_check, check_step, check_best = 0.0, k, step, best_loss
            z = tf.clip_by_value(x + step * tf.sign(g), lo, hi)
            a = 1.0 if k == 0 else APGD_MOMENTUM
            x, x_prev = tf.clip_by_value(x + a * (z - x) + (1.0 - a) * (x - x_prev), lo, hi), x
        return best_x, best_loss

    def apgd(u, text, source, target, eps, s):
        """APGD on the cross-entropy and on the DLR loss; per query the point with the smaller margin."""
        x_ce, _ = apgd_run(u, text, source, target, eps, s, loss_and_grad)
        x_dlr, _ = apgd_run(u, text, source, target, eps, s + tf.constant([0, 1], tf.int64), dlr_and_grad)
        worse = margin(x_dlr, text, source, target) < margin(x_ce, text, source, target)
        return tf.where(worse[:, None, None, None], x_dlr, x_ce)

    def batches(qs, vec):
        return queries_dataset(split, qs, vec, batch_size, preprocessor, with_target=False)

    jobs = [("clean", None)]
    for kind in KINDS:
        for level in levels.get(kind, ()):
            jobs.append((kind, level))
    subset = apgd_subset(len(queries), apgd_queries) if "apgd" in levels else None
    if subset is not None:
        jobs.append(("apgd_subset_clean", None))
    attack_cost = {"fgsm": 2, "pgd": pgd_steps + 1, "apgd": 2 * (apgd_steps + 2)}

    def n_batches(kind):
        return -(-(len(subset) if kind.startswith("apgd") and subset is not None else len(queries)) // batch_size)

    work = sum(attack_cost.get(kind, 1) * n_batches(kind) for kind, _ in jobs)
    work += n_batches("clean") if input_grad else 0
    progress = Progress(work, f"robustness of {len(queries)} {split_name} queries", enabled=verbose)

    result = {}
    for kind, level in jobs:
        qs, vec, skip = queries, vectorizer, exclude
        if kind.startswith("apgd") and subset is not None:
            qs, skip = queries.subset(subset), exclude[subset]
        if kind == "text":
            qs = Queries(queries.source_ids, perturb_texts(queries.texts, level, seed), queries.target_ids,
                         queries.target_captions)
            if isinstance(vectorizer, CachedTextVectorizer):  # frozen BERT: embed the new texts
                vectorizer.cache.add(qs.texts)
                vec = vectorizer.cache.vectorizer()
        out = []
        for b, batch in enumerate(batches(qs, vec)):
            u = to_unit(batch["source_image"])
            text, source, target = batch["text"], batch["source_id"], batch["target_id"]
            s = tf.constant(_seed(seed, kind, level_key(kind, level) if level is not None else "", b))
            if kind == "noise":
                u = gaussian_noise(u, float(level), s)
            elif kind == "jpeg":
                u = jpeg_reencode(u, int(level))
            elif kind in ("fgsm", "pgd", "apgd"):
                attack = {"fgsm": fgsm, "pgd": pgd, "apgd": apgd}[kind]
                u = attack(u, text, source, target, tf.constant(float(level)), s)
            out.append(embed(u, text).numpy())
            progress.update(attack_cost.get(kind, 1))
        if protocol is None:
            recalls = _recalls(np.concatenate(out), gallery, split, qs, ks, skip, query_chunk, gallery_chunk,
                               backend)
        else:  # the dataset's own test protocol (FashionIQ's per-category galleries, CIRR's subsets)
            recalls = recalls_from_embeddings(np.concatenate(out), np.arange(split.num_images), gallery, qs,
                                              split.caption_ids, protocol, ks, query_chunk=query_chunk,
                                              gallery_chunk=gallery_chunk, verbose=False, backend=backend)
        if kind in ("clean", "apgd_subset_clean"):
            result[kind] = recalls
        else:
            result.setdefault(kind, {})[level_key(kind, level)] = recalls
            if kind == "text":
                result[kind][level_key(kind, level)]["changed"] = float(np.mean(qs.texts != queries.texts))
    if input_grad:
        l1, l2 = [], []
        for batch in batches(queries, vectorizer):
            u = to_unit(batch["source_image"])
            _, g = loss_and_grad(u, batch["text"], batch["source_id"], batch["target_id"])
            g = tf.reshape(g * std, [tf.shape(g)[0], -1])  # dL/d(normalised input) = dL/du * std
            l1.append(tf.reduce_sum(tf.abs(g), axis=1).numpy())
            l2.append(tf.sqrt(tf.reduce_sum(tf.square(g), axis=1)).numpy())
            progress.update(1)
        result["input_grad_l1"] = float(np.mean(np.concatenate(l1)))
        result["input_grad_l2"] = float(np.mean(np.concatenate(l2)))
    progress.close()
    result["settings"] = {
        "split": split_name, "queries": len(queries), "seed": int(seed),
        "gallery": GALLERY if protocol is None else "the dataset's test protocol (keras_irtf.evaluation.protocol.TestProtocol)",
        "pixels": "[0, 1], before ImageNet normalisation; noise and attacks clipped to [0, 1]",
        "attack_loss": "softmax cross-entropy of the query against every test image, target = label",
        "pgd_steps": int(pgd_steps), "pgd_step": "eps / 4", "pgd_start": "uniform in the eps-ball",
        "input_grad": "d(loss above)/d(ImageNet-normalised query image), clean queries",
        "levels": {k: [level_key(k, v) for v in vs] for k, vs in levels.items()},
    }
    if "apgd" in levels:
        result["settings"].update({
            "apgd": (f"APGD, {int(apgd_steps)} iterations from a uniform start, on the cross-entropy and on the "
                     "DLR margin loss (hit = an image with the target's caption); per query the smaller margin"),
            "apgd_steps": int(apgd_steps),
            "apgd_queries": len(queries) if subset is None else int(len(subset)),
            "apgd_queries_asked": None if apgd_queries is None else int(apgd_queries)})
    return result


def format_robustness(result: dict, ks=None) -> str:
    """A Markdown table: one row per perturbation and level, R@K and the R@1 drop from clean."""
    clean = result["clean"]
    ks = ks or [k for k in clean if k.startswith("R@")]
    rows = ["| perturbation | level | " + " | ".join(ks) + " | ΔR@1 vs clean |",
            "|" + "---|" * (len(ks) + 3)]

    def row(name, level, r, base=clean):
        d = "" if r is base else f"{100 * (r['R@1'] - base['R@1']):+.1f}"
        return f"| {name} | {level} | " + " | ".join(f"{100 * r[k]:.1f}" for k in ks) + f" | {d} |"

    rows.append(row("clean", "", clean))
    subset = result.get("apgd_subset_clean")
    if subset is not None:  # APGD attacked a draw of the queries: its drop is from their clean recall
        rows.append(row(f"clean, APGD's {result['settings']['apgd_queries']} queries", "", subset, subset))
    for kind in KINDS:
        for level, r in result.get(kind, {}).items():
            rows.append(row(kind, level, r, subset if kind == "apgd" and subset is not None else clean))
    text = "\n".join(rows)
    if "input_grad_l1" in result:
        text += (f"\n\nmean per-query ||dL/dx||_1 = {result['input_grad_l1']:.4g}, "
                 f"||dL/dx||_2 = {result['input_grad_l2']:.4g} (x = the normalised query image)")
    return text


def robustness_of(exp, model, levels=None, backend=None, input_grad=True, verbose=False,
                  apgd_queries=None) -> dict:
    """evaluate_robustness with an Experiment's dataset, text input, preprocessing and settings."""
    cfg = exp.cfg
    return evaluate_robustness(
        model, exp.dataset, exp.vectorizer, levels=levels, ks=cfg.eval.ks, seed=cfg.train.seed,
        batch_size=cfg.eval.batch_size, preprocessor=exp.preprocessor, query_chunk=cfg.eval.query_chunk,
        gallery_chunk=cfg.eval.gallery_chunk, backend=backend or cfg.eval.backend, input_grad=input_grad,
        verbose=verbose, apgd_queries=apgd_queries,
    )


__all__ = ["ABLATION_LEVELS", "DEFAULT_LEVELS", "KINDS", "apgd_checkpoints", "apgd_subset", "drop_word",
           "evaluate_robustness", "format_robustness", "gaussian_noise", "jpeg_reencode", "level_key", "perturb_texts",
           "robustness_of", "swap_words"]
