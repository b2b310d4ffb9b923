"""Embedding a gallery of millions with Apache Beam, then indexing it (tools/index.py).

    from keras_irtf.index.pipeline import embed_gallery, build_gallery_index
    summary = embed_gallery("exported/css/1", "data/gallery", "indexes/css", shards=4)
    index = build_gallery_index("indexes/css", kind="hnsw")

The images (`parse_images`): a folder (every JPEG, PNG, GIF or BMP below it, recursively; ids
are the POSIX paths relative to it), a text file listing image paths (one a line, relative to
the list's folder), a glob pattern (ids relative to the pattern's fixed leading folders), or
TFRecord files (`tfrecord:PATTERN`, tf.train.Example records with the bytes features `id` and
`image`). For the first three the images' folder is recorded as the index's images_root, so
the demo can show results; a file is read only after it is resolved under that folder
(keras_irtf.safety.resolve_under): a link leading out of it is not read.

The Beam pipeline: each image's bytes are read and checked (size, the header's format and
pixel count against the export's max_pixels, then a full decode with the op the export's graph
decodes with), bad ones leaving through a dead-letter output; the good ones are batched into
`RunInference`, whose model handler loads the export once per worker and calls its
`embed_image` signature on batches of raw bytes (a batch that fails all the same is embedded
one image at a time, so a single bad image never costs its batch). Embeddings are
L2-normalised, grouped into shards by a hash of their id, and each shard is written by the
worker that holds it. Nothing crashes the job for one image: every image not embedded is a
line {"id", "path", "reason"} of <out>/dead_letter.jsonl.

The output folder (keras_irtf.index.embeddings for the shards' layout) is tied to the export:
a later run with the same export embeds only the ids not embedded yet; a run with another
export is refused (use another folder, or `replace=True`, which deletes only a folder
keras_irtf marked as its own gallery index).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import math
import os
import re
import socket
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import tensorflow as tf
from google.protobuf.message import DecodeError

from keras_irtf.image_limits import DEFAULT_MAX_PIXELS, ImageTooLarge, check_image_bytes, image_dimensions
from keras_irtf.index.ann import INDEX_KIND, build_index, export_fingerprint, fingerprints_match
from keras_irtf.index.embeddings import (DEAD_LETTER_NAME, EMBEDDINGS_DIR, EmbeddingsError, EmbeddingStore,
                                         read_shard, write_shard)
from keras_irtf.safety import NotOwnedError, OutsideRootError, is_empty_folder, mark_owned, owned_kind, \
    remove_owned, resolve_under
from keras_irtf.serving.query import ExportedModel
from keras_irtf.serving.reader import IMAGE_EXTENSIONS, ExportError, read_export_info
from keras_irtf.utils import atomic_write_text, optional_import, process_alive

log = logging.getLogger(__name__)

SOURCE_KINDS = ("folder", "list", "glob", "tfrecord")
TFRECORD_PREFIX = "tfrecord:"
SHARD_ROWS = 50_000  # rows a shard by default (512-d float32: 100 MB)
DEFAULT_MAX_FILE_BYTES = 100 * 2**20  # a bigger file is not read (a 40-megapixel JPEG is far smaller)
STAGING_KIND = "embeddings in progress"  # the ownership marker's kind of a run's staging folder
METRICS_NAMESPACE = "keras_irtf.index"
DEAD = "dead"  # the dead-letter outputs' tag
_GLOB_MAGIC = re.compile(r"[*?\[]")


def _beam(module: str = "apache_beam"):
    return optional_import(module, "beam", "the embedding pipeline (tools/index.py)")


# ---- the images -----------------------------------------------------------------------------------
@dataclasses.dataclass
class ImageSource:
    """Where the images come from (parse_images)."""

    kind: str  # one of SOURCE_KINDS
    spec: str  # as given
    root: Optional[Path]  # the images' folder (None for TFRecords)
    ids: Optional[list] = None  # folder, list, glob: the ids, sorted (list: in the list's order)
    files: Optional[list] = None  # tfrecord: the record files
    dead: list = dataclasses.field(default_factory=list)  # dead letters found while listing

    def describe(self) -> dict:
        return {"kind": self.kind, "spec": self.spec,
                "images_root": str(self.root.resolve()) if self.root is not None else None}


def id_problem(image_id: str) -> Optional[str]:
    """Why `image_id` cannot name a row of an index (ids.txt holds one a line), or None."""
    if not image_id:
        return "an empty id"
    if "\n" in image_id or "\r" in image_id:
        return "its name holds a line break (an index holds one id a line); rename it"
    try:
        image_id.encode("utf-8")
    except UnicodeEncodeError:  # a file name in another encoding (os.fsdecode's surrogates)
        return "its name is not valid UTF-8 text; rename it"
    return None


def _dead(image_id, path, reason) -> dict:
    return {"id": image_id, "path": str(path), "reason": reason}


def _fixed_prefix(pattern: str) -> Path:
    """The leading folders of a glob pattern before its first wildcard ("." when none)."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if _GLOB_MAGIC.search(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def parse_images(spec: str) -> ImageSource:
    """The images named by `spec` (see the module's docstring). EmbeddingsError naming the spec
    when it names nothing usable."""
    spec = str(spec)
    if spec.startswith(TFRECORD_PREFIX):
        pattern = spec[len(TFRECORD_PREFIX):]
        files = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
        if not files:
            raise EmbeddingsError(f"--images {spec}: no file matches {pattern!r} (expected TFRecord files of "
                                  f"tf.train.Example records with bytes features 'id' and 'image')")
        return ImageSource("tfrecord", spec, None, files=files)
    if _GLOB_MAGIC.search(spec):
        root = _fixed_prefix(spec)
        if not root.is_dir():
            raise EmbeddingsError(f"--images {spec}: the folder {root} does not exist")
        matches = sorted(m for m in glob.glob(spec, recursive=True) if os.path.isfile(m) or os.path.islink(m))
        source = ImageSource("glob", spec, root, [])
        for m in matches:
            _add_id(source, Path(os.path.relpath(m, root)).as_posix())
        if not source.ids and not source.dead:
            raise EmbeddingsError(f"--images {spec}: the pattern matches no file")
        return source
    path = Path(spec)
    if path.is_dir():
        return _list_folder(spec, path)
    if path.is_file():
        return _read_list(spec, path)
    raise EmbeddingsError(f"--images {spec}: no such folder or file, and not a glob pattern or tfrecord:PATTERN")


def _add_id(source: ImageSource, image_id: str):
    problem = id_problem(image_id)
    if problem:
        source.dead.append(_dead(image_id, source.root / image_id, problem))
    else:
        source.ids.append(image_id)


def _list_folder(spec: str, root: Path) -> ImageSource:
    """Every image file below `root` (by extension), recursively; links to folders are not
    followed (they are dead letters, each image being read once, under the folder)."""
    source = ImageSource("folder", spec, root, [])
    found = []
    for top, dirs, files in os.walk(root, followlinks=False):
        for d in dirs:
            if os.path.islink(os.path.join(top, d)):
                rel = Path(os.path.relpath(os.path.join(top, d), root)).as_posix()
                source.dead.append(_dead(rel, os.path.join(top, d), "a link to a folder: links to folders are not "
                                                                     "followed; put the images in the folder"))
        found += [Path(os.path.relpath(os.path.join(top, f), root)).as_posix() for f in files
                  if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    for image_id in sorted(found):
        _add_id(source, image_id)
    if not source.ids and not source.dead:
        raise EmbeddingsError(f"--images {spec}: the folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    source.dead.sort(key=lambda d: d["id"])
    return source


def _read_list(spec: str, path: Path) -> ImageSource:
    """A text file of image paths relative to its folder, one a line (blank lines skipped, a
    path listed twice embedded once)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EmbeddingsError(f"--images {spec}: cannot be read as a UTF-8 list of image paths ({e})") from None
    source = ImageSource("list", spec, path.parent, [])
    seen = set()
    for line in lines:
        image_id = line.strip()
        if image_id and image_id not in seen:
            seen.add(image_id)
            _add_id(source, image_id)
    if not source.ids and not source.dead:
        raise EmbeddingsError(f"--images {spec}: the list names no image (one path a line, relative to {path.parent})")
    return source


# ---- reading and checking one image (on the workers) ----------------------------------------------
def _tf_message(error) -> str:
    """TensorFlow's error message without its function-node prefix and op suffix, one line."""
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", getattr(error, "message", None) or str(error))
    return re.sub(r"\s*\[Op:[^\]]*\]", "", text).strip().splitlines()[0] if text.strip() else type(error).__name__


def image_problem(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Optional[str]:
    """Why the export could not embed the image `data`, or None: not one of its formats, more
    pixels than its limit (read from the header), or bytes the decoder of its graph refuses."""
    if not data:
        return "an empty file"
    if image_dimensions(data) is None:
        return "not a JPEG, PNG, GIF or BMP image (or its header is damaged)"
    try:
        check_image_bytes(data, max_pixels, "the image")
    except ImageTooLarge as e:
        return str(e)
    try:
        tf.io.decode_image(data, channels=3, expand_animations=False)
    except tf.errors.OpError as e:
        return f"cannot be decoded (a corrupt or truncated image): {_tf_message(e)}"
    return None


def read_image(root, image_id: str, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_bytes: int = DEFAULT_MAX_FILE_BYTES):
    """(id, path, bytes) of the image file `image_id` under `root`, checked (image_problem), or
    the dead letter {"id", "path", "reason"} saying why not. A name resolving outside `root`
    (a link out of it, "..") is not opened."""
    path = os.path.join(str(root), image_id)
    try:
        real = resolve_under(root, image_id, "image")
    except OutsideRootError as e:
        return _dead(image_id, path, f"{e}: only files under the images folder are read")
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        return _dead(image_id, path, f"cannot be opened: {e.strerror or e}")
    try:
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if not real.is_file():
                return _dead(image_id, path, "not a regular file")
            if max_bytes and size > max_bytes:
                return _dead(image_id, path, f"{size} bytes, over the limit of {max_bytes} bytes a file "
                                             f"(--max-file-mb)")
            data = f.read()
    except OSError as e:
        return _dead(image_id, path, f"cannot be read: {e.strerror or e}")
    problem = image_problem(data, max_pixels)
    return _dead(image_id, path, problem) if problem else (image_id, path, data)


def parse_record(filename: str, record: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_bytes: int = DEFAULT_MAX_FILE_BYTES, done=frozenset()):
    """(id, path, bytes) of one TFRecord record (a tf.train.Example with the bytes features `id`
    and `image`), checked as read_image checks a file, or its dead letter; None for an id in
    `done` (embedded already: its image is not decoded)."""
    try:
        example = tf.train.Example.FromString(record)
    except DecodeError:
        return _dead("", filename, "a record that is not a tf.train.Example")
    features = example.features.feature
    ids = features["id"].bytes_list.value if "id" in features else []
    if len(ids) != 1:
        return _dead("", filename, f"a record without one bytes feature 'id' (found {len(ids)} values)")
    try:
        image_id = ids[0].decode("utf-8")
    except UnicodeDecodeError:
        return _dead(repr(ids[0]), filename, "its id is not UTF-8 text")
    problem = id_problem(image_id)
    if problem:
        return _dead(image_id, filename, problem)
    if image_id in done:  # embedded by an earlier run: its image is not decoded again
        return None
    images = features["image"].bytes_list.value if "image" in features else []
    if len(images) != 1:
        return _dead(image_id, filename, f"a record without one bytes feature 'image' (found {len(images)} values)")
    data = images[0]
    if max_bytes and len(data) > max_bytes:
        return _dead(image_id, filename, f"{len(data)} bytes, over the limit of {max_bytes} bytes an image "
                                         f"(--max-file-mb)")
    problem = image_problem(data, max_pixels)
    return _dead(image_id, filename, problem) if problem else (image_id, filename, data)


def embed_batch(model, raw: list) -> list:
    """The L2-normalised embedding of each image of `raw` (encoded bytes) by the export `model`
    (keras_irtf.serving.query.ExportedModel), or for an image the graph still refuses, the
    reason (a str); the batch is then embedded one image at a time, so the others are kept."""
    try:
        vectors = list(model.embed_images(raw, batch_size=len(raw)))
    except tf.errors.OpError:
        vectors = []
        for data in raw:
            try:
                vectors.append(model.embed_images([data], batch_size=1)[0])
            except tf.errors.OpError as e:
                vectors.append(f"the export could not embed it: {_tf_message(e)}")
    out = []
    for v in vectors:
        if isinstance(v, str):
            out.append(v)
            continue
        v = np.asarray(v, np.float32)
        norm = float(np.linalg.norm(v))
        out.append(v / norm if norm > 0 and np.isfinite(norm) else
                   "the export gave it an embedding of norm 0 or a non-finite one")
    return out


def shard_of(image_id: str, shards: int) -> int:
    """The shard of an id: a stable hash (the same on every worker and every run)."""
    return zlib.crc32(image_id.encode("utf-8")) % shards


# ---- the Beam steps (module functions: workers import them by name) ------------------------------
def _read_files_step(image_id, root, max_pixels, max_bytes):
    got = read_image(root, image_id, max_pixels, max_bytes)
    yield _beam().pvalue.TaggedOutput(DEAD, got) if isinstance(got, dict) else got


def _read_records_step(file_record, max_pixels, max_bytes, done):
    beam = _beam()
    filename, record = file_record
    got = parse_record(filename, record, max_pixels, max_bytes, done)
    if isinstance(got, dict):
        yield beam.pvalue.TaggedOutput(DEAD, got)
    elif got is None:
        beam.metrics.Metrics.counter(METRICS_NAMESPACE, "skipped").inc()
    else:
        yield got


def _as_key(image_id):
    return image_id, True


def _route_step(result, shards):
    (image_id, path, sha256), vector = result.example, result.inference
    if isinstance(vector, str):
        yield _beam().pvalue.TaggedOutput(DEAD, _dead(image_id, path, vector))
    else:
        yield shard_of(image_id, shards), (image_id, path, sha256, vector)


def _write_shard_step(keyed, staging):
    """Write one shard's rows to the staging folder; an id met twice (TFRecords naming one id
    twice: both land in its shard) is kept once, the others are dead letters."""
    key, rows = keyed
    rows = sorted(rows, key=lambda r: (r[0], r[1]))
    kept, ids = [], set()
    for image_id, path, sha256, vector in rows:
        if image_id in ids:
            yield _beam().pvalue.TaggedOutput(DEAD, _dead(image_id, path, "its id was met before: embedded once"))
            continue
        ids.add(image_id)
        kept.append((image_id, sha256, vector))
    write_shard(Path(staging) / f"shard-{key:05d}.npz", [i for i, _, _ in kept], np.stack([v for _, _, v in kept]),
                sha256=[h for _, h, _ in kept])


def _model_handler(export, batch_size: int):
    """The RunInference model handler of an export: load_model opens it once per worker;
    run_inference embeds a batch of (id, path, bytes) through its embed_image signature."""
    base = _beam("apache_beam.ml.inference.base")

    class ExportEmbedder(base.ModelHandler):
        def __init__(self, export_dir: str, size: int):
            super().__init__(min_batch_size=size, max_batch_size=size)
            self.export_dir = export_dir

        def load_model(self):
            return ExportedModel(self.export_dir)

        def run_inference(self, batch, model, inference_args=None):
            vectors = embed_batch(model, [data for _, _, data in batch])
            # each image's checksum travels with it: the demo serves a file only with these bytes
            return [base.PredictionResult((image_id, path, hashlib.sha256(data).hexdigest()), v)
                    for (image_id, path, data), v in zip(batch, vectors)]

        def get_num_bytes(self, batch) -> int:
            return sum(len(data) for _, _, data in batch)

        def get_metrics_namespace(self) -> str:
            return METRICS_NAMESPACE

    return ExportEmbedder(str(export), int(batch_size))


class _SpuriousBeamWarning(logging.Filter):
    """Drops the warning RunInference logs for each batch when PyTorch is not installed (its
    model manager imports torch, and a failed import makes it think the resource module is
    missing): it says nothing about the run."""

    def filter(self, record):
        return "Resource module is not available" not in record.getMessage()


def quiet_beam_log(verbose: bool = False):
    """Beam's own log silenced (unless `verbose`: a failure reaches the caller as an exception),
    and its one spurious warning dropped:
    the tool's standard error keeps the lines that say something about the run."""
    root = logging.getLogger()
    if not any(isinstance(f, _SpuriousBeamWarning) for f in root.filters):
        root.addFilter(_SpuriousBeamWarning())
    if not verbose:
        logging.getLogger("apache_beam").setLevel(logging.CRITICAL)  # a failure reaches the tool as an exception


def pipeline_options(beam_args=()):
    """Beam's PipelineOptions from command-line flags (--runner, --direct_num_workers, ...).
    No --runner, or --runner DirectRunner, runs on this machine with the FnApiRunner: the engine
    the DirectRunner runs a batch pipeline with, once it has tried the Prism runner, which it
    downloads from the network first (nothing here reaches the network). Another --runner is
    used as named."""
    options = _beam("apache_beam.options.pipeline_options").PipelineOptions(list(beam_args))
    standard = options.view_as(_beam("apache_beam.options.pipeline_options").StandardOptions)
    if standard.runner is None or str(standard.runner).lower() in ("directrunner", "direct"):
        standard.runner = "FnApiRunner"
    return options


def unknown_beam_flags(beam_args) -> list:
    """The flags of `beam_args` that are no Beam pipeline option (a typo would otherwise be
    dropped with a warning)."""
    known = set(_beam("apache_beam.options.pipeline_options").PipelineOptions([]).get_all_options())
    return [a for a in beam_args if a.startswith("-")
            and a.lstrip("-").split("=", 1)[0].replace("-", "_") not in known]


def _pipeline_failure(error: Exception) -> Exception:
    """The error to report for a failed pipeline: an export that cannot be loaded (DamagedExport,
    MissingOpLibrary) as the ExportError it is, in one line, whether the runner raised it as it
    was (in this process) or as text in another error (from a worker process); anything else as
    an EmbeddingsError with its last line."""
    text = str(error)
    found = re.findall(r"^(?:[\w.]+\.)?(?:DamagedExport|MissingOpLibrary|ExportError): (.+)$", text, re.M)
    if isinstance(error, ExportError) or found:
        line = found[-1] if found else text.splitlines()[0]
        return ExportError(re.sub(r" \[while running '[^']*'\]$", "", line.strip()))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return EmbeddingsError(f"the embedding pipeline failed: {lines[-1] if lines else type(error).__name__} (run "
                           f"with --verbose to see Beam's log)")


def _run_pipeline(source: ImageSource, todo_file: Optional[Path], export, staging: Path, *, shards: int,
                  batch_size: int, max_pixels: int, max_bytes: int, done_file: Optional[Path], beam_args) -> int:
    """Run the Beam pipeline; shards and dead letters land in `staging`. Returns how many
    TFRecord ids were skipped as already embedded (the ids of `done_file`, one a line, reach the
    workers as a side input rather than inside the pipeline's graph)."""
    beam = _beam()
    inference = _beam("apache_beam.ml.inference.base")
    pipeline = beam.Pipeline(options=pipeline_options(beam_args))
    if source.kind == "tfrecord":
        done = beam.pvalue.AsDict(pipeline
                                  | "embedded ids" >> beam.io.ReadFromText(str(done_file))
                                  | "as keys" >> beam.Map(_as_key))
        read = (pipeline
                | "record files" >> beam.Create(source.files)
                | "records" >> beam.io.ReadAllFromTFRecord(with_filename=True)
                | "read and check" >> beam.FlatMap(_read_records_step, max_pixels, max_bytes, done)
                .with_outputs(DEAD, main="images"))
    else:
        read = (pipeline
                | "ids" >> beam.io.ReadFromText(str(todo_file))
                | "read and check" >> beam.FlatMap(_read_files_step, str(source.root.absolute()), max_pixels,
                                                   max_bytes)
                .with_outputs(DEAD, main="images"))
    routed = (read.images
              | "embed" >> inference.RunInference(_model_handler(export, batch_size))
              | "route" >> beam.FlatMap(_route_step, shards).with_outputs(DEAD, main="rows"))
    written = (routed.rows
               | "by shard" >> beam.GroupByKey()
               | "write shards" >> beam.FlatMap(_write_shard_step, str(staging)).with_outputs(DEAD, main="done"))
    _ = ((read[DEAD], routed[DEAD], written[DEAD])
         | "dead letters" >> beam.Flatten()
         | "as json" >> beam.Map(json.dumps)
         | "write dead letters" >> beam.io.WriteToText(str(staging / "dead-letter"), file_name_suffix=".jsonl"))
    try:
        result = pipeline.run()
        result.wait_until_finish()
    except Exception as e:  # a worker's failure, as each runner reports it: one line for the tool
        raise _pipeline_failure(e) from None
    if source.kind != "tfrecord":
        return 0
    metrics = _beam("apache_beam.metrics.metric")
    counters = result.metrics().query(metrics.MetricsFilter().with_namespace(METRICS_NAMESPACE)
                                      .with_name("skipped"))["counters"]
    return int(sum(c.committed or 0 for c in counters))


# ---- one run: embed what is new, then index everything ---------------------------------------------
@dataclasses.dataclass
class EmbedSummary:
    out: Path
    new: int  # images embedded by this run
    skipped: int  # images already embedded by an earlier run
    dead: int  # images not embedded (dead_letter.jsonl)
    total: int  # embeddings in the folder now
    shards_added: list
    gone: int  # ids embedded earlier and no longer among the images (still in the index)
    source: ImageSource
    fingerprint: dict


def check_output(out, fingerprint: dict, source: ImageSource, replace: bool = False) -> EmbeddingStore:
    """The embeddings of the folder `out` this run adds to, after checking that it may: `out`
    is missing or empty, or a gallery index keras_irtf wrote whose embeddings come from the
    same export (fingerprint) and the same images' folder. With `replace`, a gallery index
    keras_irtf wrote is deleted first (anything else in the way is refused all the same)."""
    out = Path(out)
    if replace and (out.exists() or out.is_symlink()) and not is_empty_folder(out):
        remove_owned(out, INDEX_KIND, "--replace deletes only a gallery index folder keras_irtf wrote; choose "
                                      "another --out")
    if (out.exists() or out.is_symlink()) and not is_empty_folder(out) and owned_kind(out) != INDEX_KIND:
        raise NotOwnedError(f"{out} is a folder keras_irtf did not write as a {INDEX_KIND}, so it will not write "
                            f"embeddings or an index into it; choose another --out")
    store = EmbeddingStore(out)
    if store.manifest is not None:
        if not fingerprints_match(store.fingerprint, fingerprint):
            raise EmbeddingsError(
                f"{out} holds the embeddings of another export ({store.fingerprint.get('export')}, checksum "
                f"{store.fingerprint.get('saved_model_checksum')}), not of {fingerprint.get('export')} (checksum "
                f"{fingerprint.get('saved_model_checksum')}); use another --out, or --replace to delete them and "
                f"embed the images anew")
        had, now = store.images.get("images_root"), source.describe()["images_root"]
        if had != now:
            raise EmbeddingsError(
                f"{out} holds embeddings of images under {had or 'TFRecords'}, not under {now or 'TFRecords'} "
                f"(--images {source.spec}): their ids would name other files; use another --out, or --replace")
    return store


def _staging_name(pid: int) -> str:
    """A run's staging folder: named by the machine and the process that launched it."""
    return f".staging-{re.sub(r'[^A-Za-z0-9_.-]', '_', socket.gethostname())}-{pid}"


def _remove_dead_staging(folder: Path) -> list:
    """Remove the staging folders of this machine's runs whose process has ended (a run killed
    before its clean-up), each only when its marker says keras_irtf wrote it; a live run's, another
    machine's and a folder without the marker are left alone. Returns the folders removed."""
    removed = []
    prefix = _staging_name(0)[:-1]
    for path in sorted(Path(folder).glob(".staging-*")):
        pid = path.name[len(prefix):] if path.name.startswith(prefix) else ""
        if not pid.isdigit() or process_alive(int(pid)) or owned_kind(path) != STAGING_KIND:
            continue
        remove_owned(path, STAGING_KIND)
        removed.append(path)
    return removed


def embed_gallery(export, images, out, *, batch_size: int = 64, shards: Optional[int] = None,
                  replace: bool = False, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, beam_args=()) -> EmbedSummary:
    """Embed the images `images` (parse_images) with the export version folder `export` into
    `out`/embeddings, only those not embedded yet, on the Beam runner of `beam_args` (the
    DirectRunner by default). Writes <out>/dead_letter.jsonl (this run's images not embedded)."""
    source = parse_images(images)
    export = Path(export)
    if not (export / "saved_model.pb").is_file():
        raise ExportError(f"{export} holds no saved_model.pb: pass a version folder such as exported/<name>/1")
    info = read_export_info(export)
    if "embed_image" not in info.get("endpoints", ["embed_image"]):
        raise ExportError(f"{export} has no embed_image endpoint (its endpoints: {info.get('endpoints')})")
    max_pixels = int(info.get("max_pixels", DEFAULT_MAX_PIXELS) or 0)
    fingerprint = export_fingerprint(export)
    if batch_size < 1 or (shards is not None and shards < 1):
        raise EmbeddingsError(f"--batch-size and --shards must be >= 1, got {batch_size} and {shards}")
    store = check_output(out, fingerprint, source, replace)
    out = Path(out)
    if owned_kind(out) != INDEX_KIND:
        mark_owned(out, INDEX_KIND)
    done = store.embedded_ids()
    todo, skipped = None, 0
    if source.kind != "tfrecord":
        todo = [i for i in source.ids if i not in done]
        skipped = len(source.ids) - len(todo)
        shards = shards or max(1, math.ceil(len(todo) / SHARD_ROWS))
    else:
        shards = shards or len(source.files)
    dead = list(source.dead)
    staged = []
    if todo or source.kind == "tfrecord":
        _remove_dead_staging(store.folder)
        staging = store.folder.absolute() / _staging_name(os.getpid())  # the workers may run elsewhere
        remove_owned(staging, STAGING_KIND)  # left by an interrupted run of this process id: ours only
        mark_owned(staging, STAGING_KIND)
        try:
            todo_file = done_file = None
            if todo is not None:
                todo_file = staging / "todo.txt"
                todo_file.write_text("".join(i + "\n" for i in todo), encoding="utf-8")
            else:
                done_file = staging / "embedded.txt"
                done_file.write_text("".join(i + "\n" for i in sorted(done)), encoding="utf-8")
            log.info(f"embedding {len(todo) if todo is not None else 'the new'} images of {source.spec} with "
                     f"{export} ({shards} shard{'s' * (shards > 1)}, batches of {batch_size})")
            skipped += _run_pipeline(source, todo_file, export, staging, shards=shards, batch_size=batch_size,
                                     max_pixels=max_pixels, max_bytes=max_file_bytes, done_file=done_file,
                                     beam_args=beam_args)
            for path in sorted(staging.glob("dead-letter*.jsonl")):
                dead += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
            dim = None
            for path in sorted(staging.glob("shard-*.npz")):
                ids, emb = read_shard(path)
                staged.append((path, len(ids)))
                dim = emb.shape[1]
            if staged:
                store.add(staged, fingerprint=fingerprint, images=source.describe(), dim=dim)
        finally:
            remove_owned(staging, STAGING_KIND)
    dead.sort(key=lambda d: (d["id"], d["path"]))
    atomic_write_text(out / DEAD_LETTER_NAME, "".join(json.dumps(d) + "\n" for d in dead))
    gone = len(done - set(source.ids)) if source.ids is not None else 0
    return EmbedSummary(out, sum(count for _, count in staged), skipped, len(dead), store.count,
                        store.shards[len(store.shards) - len(staged):], gone, source, fingerprint)


def build_gallery_index(out, *, kind: str = "auto", params: Optional[dict] = None, holdout: int = 200):
    """Build the index of every embedding in `out`/embeddings into `out` (keras_irtf.index.ann)."""
    store = EmbeddingStore(out)
    ids, embeddings = store.read_all()
    return build_index(embeddings, ids, out, fingerprint=store.fingerprint, kind=kind, params=params,
                       hashes=store.read_hashes() if store.images.get("images_root") else None,
                       images_root=store.images.get("images_root"), holdout=holdout,
                       extra_manifest={"embeddings": {"folder": EMBEDDINGS_DIR, "shards": store.shards,
                                                      "images": store.images}},
                       log=log.info)


__all__ = ["DEAD_LETTER_NAME", "EmbedSummary", "ImageSource", "SOURCE_KINDS", "build_gallery_index",
           "check_output", "embed_batch", "embed_gallery", "image_problem", "parse_images", "parse_record",
           "pipeline_options", "read_image", "shard_of", "unknown_beam_flags"]
