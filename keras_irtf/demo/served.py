"""The exported SavedModel as the demo serves it: loaded with `tf.saved_model.load` alone.

Neither keras nor the rest of keras_irtf's model code is imported, so the demo runs exactly what
TF Serving runs: the signatures of the version folder, with the gallery stored inside it. The
folder is read by keras_irtf.serving.reader.open_export (TensorFlow and numpy only), as
tools/query.py reads it: a damaged export is one "damaged export: <file>" error for both.

Gallery files are opened only by id, each resolved (symbolic links followed) and refused unless
it lies inside the gallery folder (keras_irtf.safety.resolve_under): a link in the gallery
pointing elsewhere answers 404, never the file it points to.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import re
import time
from pathlib import Path
from typing import Optional

import tensorflow as tf
from google.protobuf import json_format
from PIL import Image
from tensorflow.core.protobuf import saved_model_pb2

from keras_irtf.demo.limits import DemoError, check_k
from keras_irtf.safety import OutsideRootError, resolve_under
from keras_irtf.serving.reader import gallery_difference, open_export

log = logging.getLogger("keras_irtf.demo")


@dataclasses.dataclass
class TensorInfo:
    dtype: str  # numpy-style name: "string", "int32", "float32", ...
    shape: tuple  # None for an unknown dimension


@dataclasses.dataclass
class SignatureInfo:
    inputs: dict  # name -> TensorInfo, in the signature's order
    outputs: dict  # name -> TensorInfo, sorted by name


class ServedModel:
    """A keras_irtf export version folder (`exported/<name>/<version>`), ready to call.

    `gallery_root` overrides where the gallery images are read from (the export records the folder
    it embedded; pass another when the export was moved). `name` is the model name of the REST
    URLs (default: the version folder's parent, as TF Serving's MODEL_NAME usually is).
    """

    def __init__(self, path, gallery_root=None, name: Optional[str] = None):
        self.path = Path(path).resolve()
        if not (self.path / "saved_model.pb").is_file():
            raise DemoError(f"{path} holds no saved_model.pb: pass an export version folder such as "
                            f"exported/<name>/1 (written by tools/export.py)")
        self.name = name or self.path.parent.name
        self.version = int(self.path.name) if self.path.name.isdigit() and len(self.path.name) < 19 else 1
        start = time.perf_counter()
        opened = open_export(self.path, require_info=False)  # DamagedExport names a damaged file
        self.load_seconds = time.perf_counter() - start
        self.info, self.module = opened.info, opened.module
        self.functions = dict(self.module.signatures)
        self.signatures = {name: _signature_info(fn) for name, fn in self.functions.items()}

        self.gallery_paths = opened.gallery_paths or []
        self.gallery_hashes = opened.gallery_hashes
        recorded = self.info.get("gallery")
        recorded = recorded.get("root") if isinstance(recorded, dict) else None
        root = gallery_root or recorded
        self.gallery_root = Path(root).resolve() if root else None
        # the export's description is not trusted with where files are read from: a gallery file
        # is served only when its bytes have the sha256 the export recorded for it, or, for an
        # export that records none, from a folder the user named with --gallery
        self.gallery_root_given = gallery_root is not None

    # ---- gallery -------------------------------------------------------------------------------

    @property
    def has_retrieve(self) -> bool:
        return "retrieve" in self.functions

    @property
    def gallery_size(self) -> int:
        return len(self.gallery_paths)

    @property
    def gallery_files_present(self) -> bool:
        if self.gallery_root is None or not self.gallery_root.is_dir() or not self.gallery_paths:
            return False
        try:
            return self.gallery_file(0).is_file()
        except DemoError:
            return False

    def gallery_file(self, gallery_id: int) -> Path:
        """The file of gallery image `gallery_id`: looked up by position in the export's list, so
        that no request ever names a path, and resolved with every symbolic link followed. A file
        that resolves outside the gallery folder (an entry that is absolute or climbs with "..", or
        a link pointing elsewhere) is refused with 404: its content is never read or served.
        Links that stay inside the folder are followed."""
        if self.gallery_root is None:
            raise DemoError("this export records no gallery folder: start the demo with --gallery DIR", status=404)
        if isinstance(gallery_id, bool) or not isinstance(gallery_id, int) or \
                not 0 <= gallery_id < len(self.gallery_paths):
            raise DemoError(f"no gallery image {gallery_id}: ids run from 0 to {len(self.gallery_paths) - 1}",
                            status=404)
        entry = self.gallery_paths[gallery_id]
        try:
            return resolve_under(self.gallery_root, entry, f"gallery image {gallery_id}")
        except OutsideRootError as e:
            log.warning("%s: refused", e)  # where it leads is for the server's log, not for the client
            raise DemoError(f"gallery image {gallery_id} ({entry!r}) points outside the gallery folder: the demo "
                            f"serves only the files inside it", status=404) from None

    def gallery_bytes(self, gallery_id: int) -> bytes:
        """The bytes of gallery image `gallery_id` (see gallery_file); 404 when it is missing or
        cannot be read."""
        path = self.gallery_file(gallery_id)
        if not path.is_file():
            raise DemoError(f"gallery image {path} is missing: start the demo with --gallery DIR pointing at the "
                            f"folder the export was made from", status=404)
        hashes = self.gallery_hashes
        expected = hashes[gallery_id] if hashes is not None and len(hashes) == len(self.gallery_paths) else None
        if expected is None and not self.gallery_root_given:
            raise DemoError("this export records no checksums of its gallery files, so the demo serves gallery "
                            "images only from a folder named with --gallery DIR", status=404)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DemoError(f"gallery image {path} cannot be read ({e.strerror or e})", status=404) from None
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            log.warning("gallery image %d (%s): its sha256 is not the one the export recorded: refused", gallery_id,
                        path)
            raise DemoError(f"gallery image {gallery_id} is not the image the export embedded (its sha256 differs): "
                            f"start the demo with --gallery DIR holding the exported images", status=404)
        return data

    def check_gallery(self):
        """Refuse (DemoError) a gallery folder that does not hold the very images the export
        embedded: the page would show other pictures than the ones the stored embeddings ranked.
        The same check tools/query.py makes (keras_irtf.serving.reader.gallery_difference; query
        embeds such a folder again, the demo serves the stored embeddings only). Nothing is
        checked when the export has no gallery or the folder is not there (thumbnails then fail
        with 404, and tools/demo.py warns)."""
        if not self.gallery_paths or self.gallery_root is None or not self.gallery_root.is_dir():
            return
        if not self.has_retrieve and self.gallery_hashes is None:
            return  # nothing ranked from stored embeddings; gallery_bytes serves files only under --gallery
        difference = gallery_difference(self.gallery_root, self.gallery_paths, self.gallery_hashes)
        if difference is not None:
            raise DemoError(
                f"the gallery folder {self.gallery_root} does not hold the images the export embedded: {difference}. "
                f"The page would show other pictures than the ones ranked: pass --gallery the folder given to "
                f"tools/export.py --gallery, or export again with --gallery {self.gallery_root}")

    # ---- calling the signatures ----------------------------------------------------------------

    def call(self, signature_name: str, columns: dict) -> dict:
        """Run one signature on a batch: `columns` maps every input name to a list (one value per
        instance; bytes for string inputs). Returns numpy arrays by output name. Errors the model
        reports about the input (TensorFlow's INVALID_ARGUMENT) become DemoError 400."""
        fn = self.functions.get(signature_name)
        if fn is None:
            raise DemoError(f'Serving signature name: "{signature_name}" not found in signature def '
                            f'(this model has: {", ".join(sorted(self.functions))})')
        spec = self.signatures[signature_name]
        missing = [n for n in spec.inputs if n not in columns]
        extra = [n for n in columns if n not in spec.inputs]
        if missing or extra:
            raise DemoError(f"signature {signature_name} takes inputs {list(spec.inputs)}; "
                            + (f"missing {missing}" if missing else "") + ("; " if missing and extra else "")
                            + (f"unknown {extra}" if extra else ""))
        kwargs = {}
        for name, t in spec.inputs.items():
            try:
                kwargs[name] = tf.constant(columns[name], dtype=t.dtype)
            except (TypeError, ValueError) as e:
                raise DemoError(f"input {name!r} must hold {t.dtype} values of shape {_shape_text(t.shape)}: {e}") from None
        try:
            out = fn(**kwargs)
        except tf.errors.InvalidArgumentError as e:
            raise DemoError(model_error_text(e.message)) from None
        except (TypeError, ValueError) as e:  # shapes the signature does not accept
            raise DemoError(f"signature {signature_name}: {e}") from None
        return {name: value.numpy() for name, value in out.items()}

    def retrieve(self, image_bytes: bytes, text: str, k: int) -> dict:
        """One query through the `retrieve` signature: {"ids", "paths", "scores"} of the top k
        (k from 1 to the gallery's size, checked before it becomes an int32)."""
        if not self.has_retrieve:
            raise DemoError("this export has no retrieve endpoint: export the run with --gallery DIR", status=404)
        k = check_k(k, "k", max(1, self.gallery_size))
        try:
            text_bytes = text.encode("utf-8")
        except UnicodeEncodeError:
            raise DemoError("text is not valid Unicode (it holds a lone surrogate such as \\ud800)") from None
        out = self.call("retrieve", {"image_bytes": [image_bytes], "text": [text_bytes], "k": [k]})
        return {"ids": [int(i) for i in out["ids"][0]],
                "paths": [p.decode("utf-8", "replace") for p in out["paths"][0]],
                "scores": [float(s) for s in out["scores"][0]]}

    def warm_up(self) -> float:
        """Call every signature once on a small white PNG, so that the first visitor does not wait
        for TensorFlow's first-call set-up. Returns the seconds it took."""
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (255, 255, 255)).save(buf, format="PNG")
        png = buf.getvalue()
        start = time.perf_counter()
        samples = {"image_bytes": [png], "text": [b""], "k": [1]}
        for name, spec in self.signatures.items():
            if set(spec.inputs) <= set(samples):
                self.call(name, {n: samples[n] for n in spec.inputs})
        return time.perf_counter() - start

    # ---- TF Serving's model status and metadata -----------------------------------------------

    def status(self) -> dict:
        return {"model_version_status": [{"version": str(self.version), "state": "AVAILABLE",
                                          "status": {"error_code": "OK", "error_message": ""}}]}

    def metadata(self) -> dict:
        """The GetModelMetadata answer: the SignatureDefs read from saved_model.pb."""
        saved = saved_model_pb2.SavedModel()
        saved.ParseFromString((self.path / "saved_model.pb").read_bytes())
        defs = {}
        for meta_graph in saved.meta_graphs:
            for key, sig in meta_graph.signature_def.items():
                if key in self.functions:
                    defs[key] = json_format.MessageToDict(sig, preserving_proto_field_name=True)
        return {"model_spec": {"name": self.name, "signature_name": "", "version": str(self.version)},
                "metadata": {"signature_def": {"signature_def": defs}}}


def model_error_text(message: str) -> str:
    """TensorFlow's INVALID_ARGUMENT text without the graph-execution framing: the model's own
    assertion message when there is one (e.g. "retrieve: k must be >= 1"), else the error lines."""
    asserted = re.search(r"assertion failed: \[(.+?)\]", message)
    if asserted:
        return asserted.group(1).strip()
    lines = [line.strip() for line in message.splitlines()]
    keep = [line for line in lines if line and not line.startswith(("Graph execution error", "Detected at node",
                                                                    "<stack traces", "[[{{node"))]
    text = " ".join(keep) or message
    return re.sub(r"\s*\[Op:[^\]]*\]$", "", re.sub(r"\s*\[\[\{\{node [^}]*\}\}\]\]", "", text)).strip()


def _signature_info(fn) -> SignatureInfo:
    _, kwargs = fn.structured_input_signature
    inputs = {name: TensorInfo(spec.dtype.name, tuple(spec.shape.as_list())) for name, spec in kwargs.items()}
    outputs = {name: TensorInfo(spec.dtype.name, tuple(spec.shape.as_list()))
               for name, spec in sorted(fn.structured_outputs.items())}
    return SignatureInfo(inputs, outputs)


def _shape_text(shape) -> str:
    return "[" + ", ".join("B" if i == 0 and d is None else ("?" if d is None else str(d))
                           for i, d in enumerate(shape)) + "]"

