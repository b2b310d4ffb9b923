"""SavedModel export for TF Serving: raw bytes and raw strings in, embeddings or top-k out.

    from keras_irtf.serving.export import export_run
    path = export_run("runs/css_tirg_s0", gallery="data/gallery")   # exported/css_tirg_s0/1

The SavedModel is written through `keras.export.ExportArchive` into TF Serving's layout
`<out>/<name>/<version>/` and holds everything a client needs: image decoding (JPEG, PNG, GIF,
BMP), resizing and normalisation, and text vectorisation are inside the graph. It loads with
`tf.saved_model.load` alone (no keras, no keras_irtf), once the op libraries its graph runs beyond
core TensorFlow are registered: a CLIP, SigLIP or BERT text encoder tokenises with tensorflow-text
ops, so `import tensorflow_text` comes first. The export's description records them
("op_libraries", keras_irtf.serving.op_libraries) and `load_export` registers them. Endpoints
(signatures):

    serving_default  image_bytes string [B], text string [B] -> embedding float32 [B, D]
    embed_image      image_bytes string [B]                  -> embedding float32 [B, D]
    retrieve         image_bytes string [B], text string [B], k int32 [B]
                     -> ids int64 [B, k], paths string [B, k], scores float32 [B, k]
                     (only with a gallery: its embeddings are stored in the SavedModel)

Preprocessing is the model's own: images go through the image encoder's ImagePreprocessor
(keras_irtf.preprocessing, the same object the training and evaluation pipelines use),
text through the text encoder's input kind ("tokens": the run's vocab.txt vectoriser inside the
graph; "strings": the raw strings, for encoders that tokenise themselves). A new encoder
therefore exports without any change here.

Writing is atomic: the SavedModel goes to a hidden `.partial-*` folder next to the version
folders (TF Serving ignores non-integer folders) and is renamed to its integer version only when
complete, so an interrupted export never leaves a half-written version for a server to load.
Each version folder carries keras_irtf's ownership marker (`.keras_irtf.json`, kind "export
version"; TF Serving and `tf.saved_model.load` ignore it): `--force` replaces only a version
folder that holds it, never a folder someone else put there.

Reading an export back is keras_irtf.serving.reader (`open_export`, `load_export`, the gallery
checks), which needs no Keras: tools/query.py and the demo import it, not this module. Its names
are importable from here too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from keras_irtf.experiment import Experiment
from keras_irtf.image_limits import (DEFAULT_MAX_PIXELS, ImageTooLarge, assert_pixel_limit_graph, check_image_file,
                                     empty_batch_guard)
from keras_irtf.safety import (NotOwnedError, OutsideRootError, is_empty_folder, mark_owned, not_owned_error,
                               owned_kind, remove_owned, replace_folder, resolve_under)
from keras_irtf.serving import op_libraries
from keras_irtf.serving.errors import EXPORT_INFO_NAME, DamagedExport, ExportError, damaged_export  # noqa: F401
# the reader's names, importable from here as well (the reader needs no Keras; query and demo use it)
from keras_irtf.serving.reader import (GALLERY_HASHES_NAME, GALLERY_LIST_NAME, IMAGE_EXTENSIONS,  # noqa: F401
                                       OpenedExport, file_sha256, gallery_difference, gallery_file, list_gallery,
                                       load_export, open_export, read_export_info)

log = logging.getLogger(__name__)

DECODE_ERROR = "image_bytes could not be decoded: expected the bytes of a JPEG, PNG, GIF or BMP image"
VERSION_KIND = "export version"  # the ownership marker's kind in every version folder written here
STAGING_KIND = "export in progress"  # the hidden folder a version is written in


# ---- preprocessing ---------------------------------------------------------------------------


@dataclasses.dataclass
class TextPreprocessing:
    """How a batch of raw strings becomes the text encoder's input.

    `trackables` are the objects holding state the graph needs (lookup tables, vocabularies):
    the export archive tracks them so they are saved with the SavedModel.
    """

    name: str
    transform: Callable
    trackables: list = dataclasses.field(default_factory=list)


def image_preprocessing_for(cfg, run_dir=None):
    """The image encoder's preprocessing (keras_irtf.preprocessing.ImagePreprocessor)."""
    return Experiment(cfg, verbose=False).preprocessor


def text_preprocessing_for(cfg, run_dir=None) -> TextPreprocessing:
    """The text encoder's input from raw strings: the run's vocabulary ("tokens" encoders) or
    the strings themselves ("strings" encoders)."""
    exp = Experiment(cfg, verbose=False)
    if exp.text_input_kind != "tokens":
        return TextPreprocessing("raw_strings", lambda texts: texts, [])
    vocab = Path(run_dir) / "vocab.txt" if run_dir is not None else None
    if vocab is None or not vocab.is_file():
        raise ExportError(f"{vocab} not found: the {cfg.model.text_encoder.type!r} text encoder needs the run's "
                          f"vocabulary (written by training)")
    exp.build_text_input(vocabulary=vocab)
    vectorizer = exp.vectorizer
    vectorizer(["warm up"])  # an unbuilt TextVectorization cannot be tracked by the archive
    return TextPreprocessing("vocabulary", vectorizer, [vectorizer.layer])


# ---- in-graph image decoding ------------------------------------------------------------------


def _looks_like_image(data):
    """True when the bytes start with a JPEG, PNG, GIF or BMP signature (a scalar string)."""
    head = tf.strings.substr(data, 0, 8)
    return tf.reduce_any(tf.stack([
        tf.equal(tf.strings.substr(head, 0, 3), b"\xff\xd8\xff"),
        tf.equal(head, b"\x89PNG\r\n\x1a\n"),
        tf.equal(tf.strings.substr(head, 0, 4), b"GIF8"),
        tf.equal(tf.strings.substr(head, 0, 2), b"BM"),
    ]))


def decode_image(data, max_pixels=None):
    """One encoded image (scalar string) -> uint8 [H, W, 3]. Bytes that are not an image raise
    InvalidArgumentError with DECODE_ERROR (TF's own message would only name formats); with
    `max_pixels`, an image whose header declares more pixels raises it before decoding."""
    checks = [tf.debugging.assert_equal(_looks_like_image(data), True, message=DECODE_ERROR)]
    if max_pixels:
        with tf.control_dependencies(checks):
            checks.append(assert_pixel_limit_graph(data, max_pixels))
    with tf.control_dependencies(checks):
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def images_from_bytes(image_bytes, preprocessor, max_pixels=None):
    """string [B] of encoded images -> float32 [B, S, S, 3] model inputs (inside a graph), through
    the image encoder's preprocessor; images over `max_pixels` are refused before decoding."""
    s = preprocessor.size
    return tf.map_fn(
        lambda b: preprocessor(decode_image(b, max_pixels)),
        image_bytes,
        fn_output_signature=tf.TensorSpec([s, s, 3], tf.float32),
    )


# ---- the export module ------------------------------------------------------------------------


def embed_gallery_files(model, image_prep, folder, paths, batch_size=64, max_pixels=None):
    """Embeddings [N, D] of the gallery files, decoded and preprocessed exactly as the exported
    graph does. A file that cannot be decoded, or is over `max_pixels`, raises ExportError naming it."""
    files = {p: gallery_file(folder, p) for p in paths}
    for p in paths:
        try:
            check_image_file(files[p], max_pixels)
        except ImageTooLarge as e:
            raise ExportError(f"gallery {e}") from None

    @tf.function(reduce_retracing=True)
    def embed(raw):
        return model.embed_images(images_from_bytes(raw, image_prep), training=False)

    out = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        raw = [files[p].read_bytes() for p in chunk]
        try:
            out.append(embed(tf.constant(raw)).numpy())
        except tf.errors.InvalidArgumentError:
            for p, r in zip(chunk, raw):
                try:
                    decode_image(tf.constant(r))
                except tf.errors.InvalidArgumentError:
                    raise ExportError(f"gallery image {files[p]} could not be decoded (corrupt or not an image)") from None
            raise
    return np.concatenate(out).astype(np.float32)


def build_export_archive(model, image_prep, text_prep: TextPreprocessing,
                         gallery_embeddings=None, gallery_paths=None, max_pixels=None):
    """A keras.export.ExportArchive with the serving endpoints (see the module docstring).

    `max_pixels`: images whose header declares more pixels are refused (INVALID_ARGUMENT) before
    decoding (keras_irtf.image_limits); None = DEFAULT_MAX_PIXELS, 0 = no limit."""
    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    side = image_prep.size
    dim = int(model.embed_images(tf.zeros([1, side, side, 3]), training=False).shape[-1])
    archive = keras.export.ExportArchive()
    archive.track(model)
    if hasattr(model.text_encoder, "encode_strings"):
        # a frozen BERT layer holds tf.saved_model-loaded objects (tokenizer tables, encoder
        # variables) that tracking the model alone does not reach
        archive.track(model.text_encoder)
    for t in text_prep.trackables:
        archive.track(t)

    def query_embedding(image_bytes, text):
        check = tf.debugging.assert_equal(
            tf.shape(image_bytes)[0], tf.shape(text)[0],
            message="image_bytes and text must have the same number of entries (one text per query image)",
        )
        with tf.control_dependencies([check]):
            # float32 whatever the run's precision policy: the signatures do not change with it
            return empty_batch_guard(image_bytes, dim, lambda: tf.cast(model.embed_queries(
                images_from_bytes(image_bytes, image_prep, max_pixels), text_prep.transform(text), training=False),
                tf.float32))

    def serving_default(image_bytes, text):
        return {"embedding": query_embedding(image_bytes, text)}

    def embed_image(image_bytes):
        return {"embedding": empty_batch_guard(image_bytes, dim, lambda: tf.cast(model.embed_images(
            images_from_bytes(image_bytes, image_prep, max_pixels), training=False), tf.float32))}

    archive.add_endpoint("serving_default", serving_default,
                         input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes"),
                                          tf.TensorSpec([None], tf.string, name="text")])
    archive.add_endpoint("embed_image", embed_image,
                         input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])

    if gallery_embeddings is not None:
        emb = np.asarray(gallery_embeddings, np.float32)
        if len(gallery_paths) != len(emb):
            raise ExportError(f"{len(emb)} gallery embeddings but {len(gallery_paths)} gallery paths")
        # variables (not graph constants): saved in variables/, no 2 GB GraphDef limit
        g_emb = tf.Variable(emb, trainable=False, name="gallery_embeddings")
        g_paths = tf.Variable(np.asarray(gallery_paths, dtype=object), trainable=False, dtype=tf.string,
                              name="gallery_paths")
        size = len(emb)

        def retrieve(image_bytes, text, k):
            q = query_embedding(image_bytes, text)
            k = tf.cast(k, tf.int32)
            count = tf.debugging.assert_equal(
                tf.shape(k)[0], tf.shape(image_bytes)[0],
                message="retrieve: give one k per query image (the same value for all of them)")
            k_any = tf.cond(tf.size(k) > 0, lambda: k, lambda: tf.ones([1], tf.int32))  # empty batch
            kmax, kmin = tf.reduce_max(k_any), tf.reduce_min(k_any)
            check_pos = tf.debugging.assert_positive(kmin, message="retrieve: k must be >= 1")
            check = tf.debugging.assert_equal(
                kmin, kmax, message="retrieve: every query of a request must ask for the same k")
            with tf.control_dependencies([count, check, check_pos]):
                kk = tf.minimum(kmax, size)
            scores = tf.matmul(q, g_emb, transpose_b=True)
            top_scores, top_ids = tf.math.top_k(scores, k=kk, sorted=True)
            return {
                "ids": tf.cast(top_ids, tf.int64),
                "paths": tf.gather(g_paths, top_ids),
                "scores": top_scores,
            }

        archive.add_endpoint("retrieve", retrieve,
                             input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes"),
                                              tf.TensorSpec([None], tf.string, name="text"),
                                              tf.TensorSpec([None], tf.int32, name="k")])
    return archive


# ---- versions and the atomic write ------------------------------------------------------------


def existing_versions(base) -> list:
    """Integer version folders under `base` (what TF Serving would load), sorted."""
    base = Path(base)
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit())


def next_version(base) -> int:
    versions = existing_versions(base)
    return versions[-1] + 1 if versions else 1


def check_version_free(base, version: int, force: bool = False):
    """Refuse a version folder that is in the way: any, without `force`; with `force`, one that
    keras_irtf did not write (no "export version" marker: NotOwnedError, nothing is touched)."""
    final = Path(base) / str(int(version))
    if not (final.exists() or final.is_symlink()) or is_empty_folder(final):
        return
    if not force:
        raise ExportError(
            f"{final} already exists: TF Serving versions are immutable once served. Export to the "
            f"next free version (omit --version: {next_version(base)}), or pass --force to replace it."
        )
    if owned_kind(final) != VERSION_KIND:
        raise not_owned_error(final, VERSION_KIND, f"move it away, or export to the next free version "
                                                   f"(omit --version: {next_version(base)})")


def write_atomically(base, version: int, write: Callable, force: bool = False) -> Path:
    """Call `write(tmp_folder)`, then move the folder to `base/<version>`.

    `tmp_folder` does not exist yet; it lies in a hidden, non-integer staging folder (TF Serving
    ignores it) that is removed whether `write` succeeds or raises, so `base/<version>` exists
    only complete. The finished folder gets the ownership marker; an existing version is replaced
    only with `force=True`, and only when it holds that marker (else NotOwnedError).
    """
    base = Path(base)
    version = int(version)
    if version < 0:
        raise ExportError(f"version must be a non-negative integer, got {version}")
    final = base / str(version)
    check_version_free(base, version, force)
    base.mkdir(parents=True, exist_ok=True)
    staging = base / f".partial-{version}-{os.getpid()}-{time.time_ns()}"
    mark_owned(staging, STAGING_KIND)
    try:
        tmp = staging / str(version)
        write(tmp)
        mark_owned(tmp, VERSION_KIND, version=version)
        replace_folder(tmp, final, VERSION_KIND)  # a folder of ours in the way is swapped out, then deleted
    finally:
        with contextlib.suppress(OSError, NotOwnedError):  # never hide the error of `write`
            remove_owned(staging, STAGING_KIND)
    return final


def check_export_name(name, out_root) -> Path:
    """`out_root/name` for an export name that is one plain folder name; ExportError naming
    --name otherwise (a '/', '..', '.', an absolute path, an empty name, a NUL byte, or a link in
    `out_root` leading out of it)."""
    text = str(name)
    if (not text or "\x00" in text or "/" in text or os.sep in text or text in (".", "..")
            or os.path.isabs(text)):
        raise ExportError(f"--name {text!r} must be one plain folder name (no '/', '..' or absolute path, not "
                          f"empty): the export is written to <--out>/<name>/<version>")
    try:
        resolve_under(out_root, text, "--name")
    except OutsideRootError as e:
        raise ExportError(f"{e}: the export must stay inside --out {out_root}") from None
    return Path(out_root) / text


# ---- the whole export of a run ----------------------------------------------------------------


def load_run(run_dir):
    """(config, Keras model) of a run folder written by training."""
    try:
        exp, model = Experiment.from_run(run_dir, verbose=False, load_data=False)
    except FileNotFoundError as e:
        raise ExportError(str(e)) from None
    return exp.cfg, model


def export_model(model, cfg, out, run_dir=None, gallery=None, version=None, force=False,
                 batch_size=64, verbose=True, extra_info=None, max_pixels=None) -> Path:
    """Export a Keras ComposedRetrievalModel to `<out>/<version>/` (TF Serving's layout).

    `out` is the model's folder (e.g. exported/css_tirg_s0); `run_dir` holds the run's vocab.txt
    (for vocabulary text encoders); `gallery` is a folder of images for the `retrieve` endpoint.
    `version=None` takes the next free integer. `max_pixels`: the serving graph refuses images whose
    header declares more pixels (default keras_irtf.image_limits.DEFAULT_MAX_PIXELS; 0 = no
    limit). Returns the version folder.
    """
    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    own = getattr(model.image_encoder, "own_preprocessor", None)  # recorded in the model (CLIP / SigLIP)
    image_prep = (own() if own is not None else None) or image_preprocessing_for(cfg, run_dir)
    text_prep = text_preprocessing_for(cfg, run_dir)
    out = Path(out)
    version = next_version(out) if version is None else int(version)
    check_version_free(out, version, force)  # before the (slow) gallery embedding

    gallery_paths = gallery_emb = None
    if gallery is not None:
        gallery_paths = list_gallery(gallery)
        if verbose:
            log.info(f"embedding {len(gallery_paths)} gallery images from {gallery}")
        gallery_emb = embed_gallery_files(model, image_prep, gallery, gallery_paths, batch_size, max_pixels)

    archive = build_export_archive(model, image_prep, text_prep, gallery_emb, gallery_paths, max_pixels)
    endpoints = ["serving_default", "embed_image"] + (["retrieve"] if gallery is not None else [])
    info = {
        "format": "keras_irtf SavedModel export 1",
        "run": str(run_dir) if run_dir else None,
        "method": cfg.model.method,
        "image_encoder": cfg.model.image_encoder.type,
        "text_encoder": cfg.model.text_encoder.type,
        "image_preprocessing": image_prep.describe(),
        "text_preprocessing": text_prep.name,
        "image_size": image_prep.size,
        "max_pixels": max_pixels,  # images over this many pixels are refused before decoding (0 = no limit)
        # the image encoder's width (model.embed_dim, or a CLIP / SigLIP projection's)
        "embedding_dim": int(getattr(model.image_encoder, "output_dim", cfg.model.embed_dim)),
        # the policy the encoders compute in; the endpoints return float32 embeddings whatever it is
        "precision": getattr(model, "precision", "float32"),
        "endpoints": endpoints,
        "gallery": None if gallery is None else {"root": str(Path(gallery).resolve()), "size": len(gallery_paths)},
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra_info or {}),
    }

    def write(tmp):
        archive.write_out(str(tmp), verbose=False)
        # the op libraries beyond core TensorFlow the written graph runs (tensorflow-text for the
        # CLIP / SigLIP / BERT tokenizers): every loader registers them first (load_export)

        info.update(op_libraries.describe(op_libraries.required_op_libraries(
            op_libraries.read_graph_op_names(tmp))))
        extra = Path(tmp) / "assets.extra"
        extra.mkdir(exist_ok=True)
        (extra / EXPORT_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        if gallery_paths is not None:
            (extra / GALLERY_LIST_NAME).write_text("\n".join(gallery_paths) + "\n")
            # the stored embeddings are only valid for these exact files (serving/query.py checks)
            hashes = (file_sha256(gallery_file(gallery, p)) for p in gallery_paths)
            (extra / GALLERY_HASHES_NAME).write_text("\n".join(hashes) + "\n")

    path = write_atomically(out, version, write, force=force)
    if verbose:
        log.info(f"exported {path} (endpoints: {', '.join(endpoints)})")
        for library, d in info["op_library_details"].items():
            log.info(f"loading it needs {d['package']} {d['version'] or ''}".rstrip()
                     + f": `import {library}` before tf.saved_model.load (keras_irtf's loaders do it)")
    return path


def export_run(run_dir, out_root="exported", name=None, gallery=None, version=None, force=False,
               verbose=True, max_pixels=None) -> Path:
    """Export a training run folder to `<out_root>/<name or the run's name>/<version>/`."""
    run_dir = Path(run_dir)
    out = check_export_name(run_dir.resolve().name if name is None else name, out_root)  # before the slow load
    cfg, model = load_run(run_dir)
    return export_model(model, cfg, out, run_dir=run_dir, gallery=gallery, version=version,
                        force=force, verbose=verbose, max_pixels=max_pixels)


