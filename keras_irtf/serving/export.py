"""SavedModel export for TF Serving: raw bytes and raw strings in, embeddings or top-k out.

    from keras_irtf.serving.export import export_run
    path = export_run("runs/css_tirg_s0", gallery="data/gallery")   # exported/css_tirg_s0/1

The SavedModel is written through `keras.export.ExportArchive` into TF Serving's layout
`<out>/<name>/<version>/` and holds everything a client needs: image decoding (JPEG, PNG, GIF,
BMP), resizing and normalisation, and text vectorisation are inside the graph. It loads with
`tf.saved_model.load` alone (no keras, no keras_irtf). Endpoints (signatures):

    serving_default  image_bytes string [B], text string [B] -> embedding float32 [B, D]
    embed_image      image_bytes string [B]                  -> embedding float32 [B, D]
    retrieve         image_bytes string [B], text string [B], k int32 [B]
                     -> ids int64 [B, k], paths string [B, k], scores float32 [B, k]
                     (only with a gallery: its embeddings are stored in the SavedModel)

Preprocessing is the model's own: images go through the image encoder's ImagePreprocessor
(keras_irtf.layers.preprocessing, the same object the training and evaluation pipelines use),
text through the text encoder's input kind ("tokens": the run's vocab.txt vectoriser inside the
graph; "strings": the raw strings, for encoders that tokenise themselves). A new encoder
therefore exports without any change here.

Writing is atomic: the SavedModel goes to a hidden `.partial-*` folder next to the version
folders (TF Serving ignores non-integer folders) and is renamed to its integer version only when
complete, so an interrupted export never leaves a half-written version for a server to load.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

EXPORT_INFO_NAME = "keras_irtf_export.json"  # in <version>/assets.extra/ (TF Serving's extras folder)
GALLERY_LIST_NAME = "gallery.txt"  # one gallery path a line, in id order, next to the info file
GALLERY_HASHES_NAME = "gallery_sha256.txt"  # the sha256 of each gallery file's bytes, in id order
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp")
DECODE_ERROR = "image_bytes could not be decoded: expected the bytes of a JPEG, PNG, GIF or BMP image"


class ExportError(ValueError):
    """An export that cannot be made (bad run folder, gallery, version); the message says why."""


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
    """The image encoder's preprocessing (keras_irtf.layers.preprocessing.ImagePreprocessor)."""
    from keras_irtf.experiment import Experiment

    return Experiment(cfg, verbose=False).preprocessor


def text_preprocessing_for(cfg, run_dir=None) -> TextPreprocessing:
    """The text encoder's input from raw strings: the run's vocabulary ("tokens" encoders) or
    the strings themselves ("strings" encoders)."""
    from keras_irtf.experiment import Experiment

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
    import tensorflow as tf

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
    import tensorflow as tf

    from keras_irtf.serving.limits import assert_pixel_limit_graph

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
    import tensorflow as tf

    s = preprocessor.size
    return tf.map_fn(
        lambda b: preprocessor(decode_image(b, max_pixels)),
        image_bytes,
        fn_output_signature=tf.TensorSpec([s, s, 3], tf.float32),
    )


# ---- the export module ------------------------------------------------------------------------


def list_gallery(folder) -> list:
    """Image files under `folder` (recursive, sorted), as paths relative to it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"gallery folder {folder} does not exist")
    files = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise ExportError(f"gallery folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def embed_gallery_files(model, image_prep, folder, paths, batch_size=64, max_pixels=None):
    """Embeddings [N, D] of the gallery files, decoded and preprocessed exactly as the exported
    graph does. A file that cannot be decoded, or is over `max_pixels`, raises ExportError naming it."""
    import tensorflow as tf

    from keras_irtf.serving.limits import ImageTooLarge, check_image_file

    folder = Path(folder)
    for p in paths:
        try:
            check_image_file(folder / p, max_pixels)
        except ImageTooLarge as e:
            raise ExportError(f"gallery {e}") from None

    @tf.function(reduce_retracing=True)
    def embed(raw):
        return model.embed_images(images_from_bytes(raw, image_prep), training=False)

    out = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        raw = [(folder / p).read_bytes() for p in chunk]
        try:
            out.append(embed(tf.constant(raw)).numpy())
        except tf.errors.InvalidArgumentError:
            for p, r in zip(chunk, raw):
                try:
                    decode_image(tf.constant(r))
                except tf.errors.InvalidArgumentError:
                    raise ExportError(f"gallery image {folder / p} could not be decoded (corrupt or not an image)") from None
            raise
    return np.concatenate(out).astype(np.float32)


def build_export_archive(model, image_prep, text_prep: TextPreprocessing,
                         gallery_embeddings=None, gallery_paths=None, max_pixels=None):
    """A keras.export.ExportArchive with the serving endpoints (see the module docstring).

    `max_pixels`: images whose header declares more pixels are refused (INVALID_ARGUMENT) before
    decoding (keras_irtf.serving.limits); None = DEFAULT_MAX_PIXELS, 0 = no limit."""
    import keras
    import tensorflow as tf

    from keras_irtf.serving.limits import DEFAULT_MAX_PIXELS, empty_batch_guard

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
    final = Path(base) / str(int(version))
    if final.exists() and not force:
        raise ExportError(
            f"{final} already exists: TF Serving versions are immutable once served. Export to the "
            f"next free version (omit --version: {next_version(base)}), or pass --force to replace it."
        )


def write_atomically(base, version: int, write: Callable, force: bool = False) -> Path:
    """Call `write(tmp_folder)`, then rename the folder to `base/<version>`.

    The folder is hidden and non-integer while being written (TF Serving ignores it) and removed
    if `write` raises, so `base/<version>` exists only complete. An existing version is replaced
    only with `force=True`.
    """
    base = Path(base)
    version = int(version)
    if version < 0:
        raise ExportError(f"version must be a non-negative integer, got {version}")
    final = base / str(version)
    check_version_free(base, version, force)
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f".partial-{version}-{os.getpid()}-{time.time_ns()}"
    try:
        write(tmp)
        if final.exists():  # force: swap the old version out, then delete it
            old = base / f".replaced-{version}-{os.getpid()}-{time.time_ns()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ---- the whole export of a run ----------------------------------------------------------------


def load_run(run_dir):
    """(config, Keras model) of a run folder written by training."""
    from keras_irtf.experiment import Experiment

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
    header declares more pixels (default keras_irtf.serving.limits.DEFAULT_MAX_PIXELS; 0 = no
    limit). Returns the version folder.
    """
    from keras_irtf.serving.limits import DEFAULT_MAX_PIXELS

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
            print(f"embedding {len(gallery_paths)} gallery images from {gallery}", flush=True)
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
        extra = Path(tmp) / "assets.extra"
        extra.mkdir(exist_ok=True)
        (extra / EXPORT_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        if gallery_paths is not None:
            (extra / GALLERY_LIST_NAME).write_text("\n".join(gallery_paths) + "\n")
            # the stored embeddings are only valid for these exact files (serving/query.py checks)
            (extra / GALLERY_HASHES_NAME).write_text("\n".join(file_sha256(Path(gallery) / p) for p in gallery_paths) + "\n")

    path = write_atomically(out, version, write, force=force)
    if verbose:
        print(f"exported {path} (endpoints: {', '.join(endpoints)})", flush=True)
    return path


def export_run(run_dir, out_root="exported", name=None, gallery=None, version=None, force=False,
               verbose=True, max_pixels=None) -> Path:
    """Export a training run folder to `<out_root>/<name or the run's name>/<version>/`."""
    run_dir = Path(run_dir)
    cfg, model = load_run(run_dir)
    name = name or run_dir.resolve().name
    return export_model(model, cfg, Path(out_root) / name, run_dir=run_dir, gallery=gallery, version=version,
                        force=force, verbose=verbose, max_pixels=max_pixels)


def file_sha256(path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_export_info(version_dir) -> dict:
    """The export's description (endpoints, image size, gallery) from assets.extra/."""
    path = Path(version_dir) / "assets.extra" / EXPORT_INFO_NAME
    if not path.is_file():
        raise ExportError(f"{path} not found: {version_dir} is not a keras_irtf export version folder")
    return json.loads(path.read_text())
