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
(keras_irtf.layers.preprocessing, the same object the training and evaluation pipelines use),
text through the text encoder's input kind ("tokens": the run's vocab.txt vectoriser inside the
graph; "strings": the raw strings, for encoders that tokenise themselves). A new encoder
therefore exports without any change here.

Writing is atomic: the SavedModel goes to a hidden `.partial-*` folder next to the version
folders (TF Serving ignores non-integer folders) and is renamed to its integer version only when
complete, so an interrupted export never leaves a half-written version for a server to load.
Each version folder carries keras_irtf's ownership marker (`.keras_irtf.json`, kind "export
version"; TF Serving and `tf.saved_model.load` ignore it): `--force` replaces only a version
folder that holds it, never a folder someone else put there.

Reading an export back (`open_export`, used by tools/query.py and tools/demo.py, which loads the
SavedModel through `load_export`) checks every file it reads and reports a truncated, missing or
garbled one as a `DamagedExport` naming it, and an op library that cannot be loaded as a
`MissingOpLibrary` naming the package to install.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from keras_irtf.safety import (NotOwnedError, OutsideRootError, is_empty_folder, mark_owned, not_owned_error,
                               owned_kind, remove_owned, replace_folder, resolve_under)

from keras_irtf.serving import op_libraries
from keras_irtf.serving.errors import EXPORT_INFO_NAME, DamagedExport, ExportError, damaged_export  # noqa: F401

log = logging.getLogger(__name__)

GALLERY_LIST_NAME = "gallery.txt"  # one gallery path a line, in id order, next to the info file
GALLERY_HASHES_NAME = "gallery_sha256.txt"  # the sha256 of each gallery file's bytes, in id order
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp")
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

    from keras_irtf.image_limits import assert_pixel_limit_graph

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


def gallery_file(folder, name) -> Path:
    """The gallery file `name` (a path relative to the gallery `folder`), every symlink resolved.
    A name leading out of the folder (absolute, "..", a link to a file elsewhere) raises
    ExportError naming it: the exporter, tools/query.py and the demo read only files inside the
    gallery folder (the folder itself may be a link)."""
    try:
        return resolve_under(folder, name, "gallery file")
    except OutsideRootError as e:
        raise ExportError(f"{e}: only files inside the gallery folder are read; copy the file into it, or give "
                          f"--gallery the folder that holds the images") from None


def list_gallery(folder) -> list:
    """Image files under `folder` (recursive, sorted), as paths relative to it. A file that is a
    link out of the folder raises ExportError naming it (see gallery_file)."""
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
    for name in files:
        gallery_file(folder, name)
    return files


def embed_gallery_files(model, image_prep, folder, paths, batch_size=64, max_pixels=None):
    """Embeddings [N, D] of the gallery files, decoded and preprocessed exactly as the exported
    graph does. A file that cannot be decoded, or is over `max_pixels`, raises ExportError naming it."""
    import tensorflow as tf

    from keras_irtf.image_limits import ImageTooLarge, check_image_file

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
    import keras
    import tensorflow as tf

    from keras_irtf.image_limits import DEFAULT_MAX_PIXELS, empty_batch_guard

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
    header declares more pixels (default keras_irtf.image_limits.DEFAULT_MAX_PIXELS; 0 = no
    limit). Returns the version folder.
    """
    from keras_irtf.image_limits import DEFAULT_MAX_PIXELS

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


def file_sha256(path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_export_info(version_dir) -> dict:
    """The export's description (endpoints, image size, gallery) from assets.extra/; DamagedExport
    naming the file when it is not a JSON object."""
    path = Path(version_dir) / "assets.extra" / EXPORT_INFO_NAME
    if not path.is_file():
        raise ExportError(f"{path} not found: {version_dir} is not a keras_irtf export version folder")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise damaged_export(path, e) from None
    if not isinstance(info, dict):
        raise damaged_export(path, f"expected a JSON object, found {type(info).__name__}")
    return info


# ---- reading an export back: tools/query.py and the demo ----------------------------------------


def _read_lines(path, what: str) -> Optional[list]:
    """The lines of an assets.extra list file (None when there is none); DamagedExport when it
    cannot be read as UTF-8 text."""
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8").split("\n")[:-1]
    except (OSError, ValueError) as e:
        raise damaged_export(path, f"cannot read the {what} ({e})") from None


def load_export(path, info: Optional[dict] = None):
    """`tf.saved_model.load(path)` of an export version folder, after registering the op libraries
    its graph runs beyond core TensorFlow (the export's description records them under
    "op_libraries"; keras_irtf.serving.op_libraries). The one loader of exports: tools/query.py,
    the demo and open_export go through it. `info`: the export's description (read here when None).

    A truncated saved_model.pb, missing or truncated variables, or any other load failure raises
    DamagedExport naming the file or folder; an op library that cannot be loaded raises
    keras_irtf.serving.op_libraries.MissingOpLibrary naming the export, the op and the package."""
    import tensorflow as tf
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    from keras_irtf.serving.op_libraries import MissingOpLibrary, graph_op_names, register_op_libraries

    path = Path(path)
    pb = path / "saved_model.pb"
    try:
        saved = saved_model_pb2.SavedModel()
        saved.ParseFromString(pb.read_bytes())
    except (OSError, DecodeError) as e:
        raise damaged_export(pb, f"not a SavedModel protocol buffer ({e})") from None
    if not saved.meta_graphs:
        raise damaged_export(pb, "it holds no MetaGraph (an empty or cut-short file)")
    if info is None:
        info = read_export_info(path) if (path / "assets.extra" / EXPORT_INFO_NAME).is_file() else {}
    register_op_libraries(path, info, graph_op_names(saved))
    try:
        return tf.saved_model.load(str(path))
    except (tf.errors.NotFoundError, RuntimeError) as e:
        found = re.search(r"Op type not registered '([^']+)'", str(e))
        if found:  # not damage: an op library this process lacks (a graph function the scan missed)
            raise MissingOpLibrary(f"{path}: its graph runs the op {found.group(1)}, which TensorFlow "
                                   f"{tf.__version__} does not register: install the package that provides it "
                                   f"(for tensorflow-text: pip install tensorflow-text=="
                                   f"{'.'.join(tf.__version__.split('.')[:2])}.*)") from None
        raise damaged_export(_damaged_part(path, e), e) from None
    except (tf.errors.OpError, OSError, ValueError, IndexError, KeyError, TypeError) as e:
        raise damaged_export(_damaged_part(path, e), e) from None


def _damaged_part(path: Path, error) -> Path:
    """The file or folder of the export an error of tf.saved_model.load is about: a path inside
    the export its message names, else variables/ for a checkpoint read, else the folder."""
    text = str(error)
    named = re.search(re.escape(str(path)) + r"/[^\s;:'\"]+", text)
    if named:
        return Path(named.group(0))
    if "variables" in text or "checkpoint" in text.lower() or isinstance(error, IndexError):
        return path / "variables"
    return path


@dataclasses.dataclass
class OpenedExport:
    """An export version folder read back: its SavedModel and the files beside it."""

    path: Path
    info: dict  # keras_irtf_export.json ({} for a SavedModel not written by keras_irtf)
    module: object  # what tf.saved_model.load returned
    gallery_paths: Optional[list]  # assets.extra/gallery.txt, in id order (None without a gallery)
    gallery_hashes: Optional[list]  # assets.extra/gallery_sha256.txt (None: an export without them)


def open_export(path, require_info: bool = True) -> OpenedExport:
    """Load the export version folder `path` for tools/query.py and the demo. Every file is
    checked as it is read: a damaged one raises DamagedExport ("damaged export: <file>: ...", one
    line). `require_info=False` also serves a SavedModel without keras_irtf's description."""
    path = Path(path)
    if not (path / "saved_model.pb").is_file():
        raise ExportError(f"{path} holds no saved_model.pb: pass a version folder such as exported/<name>/1")
    extra = path / "assets.extra"
    info = read_export_info(path) if require_info or (extra / EXPORT_INFO_NAME).exists() else {}
    paths = _read_lines(extra / GALLERY_LIST_NAME, "gallery list")
    hashes = _read_lines(extra / GALLERY_HASHES_NAME, "gallery checksums")
    recorded = info.get("gallery")
    if paths is not None and isinstance(recorded, dict) and isinstance(recorded.get("size"), int) \
            and recorded["size"] != len(paths):
        raise damaged_export(extra / GALLERY_LIST_NAME, f"it lists {len(paths)} images, the export embedded "
                                                        f"{recorded['size']} ({EXPORT_INFO_NAME})")
    if hashes is not None and (paths is None or len(hashes) != len(paths)
                               or not all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes)):
        raise damaged_export(extra / GALLERY_HASHES_NAME, f"expected one sha256 a line for each entry of "
                                                          f"{GALLERY_LIST_NAME}")
    module = load_export(path, info)  # registers the op libraries the export records first
    return OpenedExport(path, info, module, paths, hashes)


def gallery_difference(folder, export_paths, export_hashes, hashes: Optional[dict] = None) -> Optional[str]:
    """None when `folder` holds, under every path of the export's gallery list, the very file the
    export embedded (the same sha256): only then do the stored gallery embeddings (`retrieve`)
    rank the pictures a viewer of the folder sees. Otherwise what differs, for a message.
    `hashes` maps gallery paths to sha256s already computed. Files are resolved under `folder`:
    a link out of it is a difference (and is not read)."""
    if export_paths is None:
        return "the export has no gallery"
    if export_hashes is None or len(export_hashes) != len(export_paths):
        return f"the export records no gallery checksums ({GALLERY_HASHES_NAME}), so its gallery cannot be checked"
    hashes = hashes or {}
    for name, want in zip(export_paths, export_hashes):
        try:
            path = gallery_file(folder, name)
        except ExportError:
            return f"{name} leads outside {folder}"
        if name not in hashes and not path.is_file():
            return f"{name} is missing"
        try:
            have = hashes[name] if name in hashes else file_sha256(path)
        except OSError as e:
            return f"{name} cannot be read ({e.strerror or e})"
        if have != want:
            return f"{name} is not the image the export embedded (its sha256 differs)"
    return None
