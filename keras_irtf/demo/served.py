"""The exported SavedModel as the demo serves it: loaded with `tf.saved_model.load` alone.

Neither keras nor the rest of keras_irtf's model code is imported, so the demo runs exactly what
TF Serving runs: the signatures of the version folder, with the gallery stored inside it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path
from typing import Optional

from keras_irtf.demo.limits import DemoError

# What the exporter writes beside the SavedModel, in <version>/assets.extra/ (TF Serving's folder
# for extra files): the export's description and the gallery's paths in id order. The demo reads
# them as files, like any client of the export, so it imports nothing of the exporter.
EXPORT_INFO_NAME = "keras_irtf_export.json"
GALLERY_LIST_NAME = "gallery.txt"


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
        import tensorflow as tf

        self.path = Path(path).resolve()
        if not (self.path / "saved_model.pb").is_file():
            raise DemoError(f"{path} holds no saved_model.pb: pass an export version folder such as "
                            f"exported/<name>/1 (written by tools/export.py)")
        info_path = self.path / "assets.extra" / EXPORT_INFO_NAME
        self.info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        self.name = name or self.path.parent.name
        self.version = int(self.path.name) if self.path.name.isdigit() else 1
        if str(self.info.get("text_encoder", "")).startswith("bert"):
            _register_text_ops()  # BERT exports hold tensorflow-text ops (TF Serving links them too)
        start = time.perf_counter()
        try:
            self.module = tf.saved_model.load(str(self.path))
        except tf.errors.NotFoundError as e:
            if "not registered" not in str(e) or not _register_text_ops():
                raise
            self.module = tf.saved_model.load(str(self.path))
        self.load_seconds = time.perf_counter() - start
        self.functions = dict(self.module.signatures)
        self.signatures = {name: _signature_info(fn) for name, fn in self.functions.items()}

        gallery_list = self.path / "assets.extra" / GALLERY_LIST_NAME
        self.gallery_paths = gallery_list.read_text().split("\n")[:-1] if gallery_list.is_file() else []
        recorded = (self.info.get("gallery") or {}).get("root")
        root = gallery_root or recorded
        self.gallery_root = Path(root).resolve() if root else None

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
        that no request ever names a path. An entry of the list that would lead outside the gallery
        folder (absolute, or through "..") is refused; symbolic links inside it are followed, as
        the export followed them when it embedded the gallery."""
        if self.gallery_root is None:
            raise DemoError("this export records no gallery folder: start the demo with --gallery DIR", status=404)
        if not 0 <= gallery_id < len(self.gallery_paths):
            raise DemoError(f"no gallery image {gallery_id}: ids run from 0 to {len(self.gallery_paths) - 1}",
                            status=404)
        path = Path(os.path.normpath(self.gallery_root / self.gallery_paths[gallery_id]))
        if not path.is_relative_to(self.gallery_root):
            raise DemoError(f"gallery entry {gallery_id} points outside the gallery folder", status=404)
        return path

    def gallery_bytes(self, gallery_id: int) -> bytes:
        path = self.gallery_file(gallery_id)
        if not path.is_file():
            raise DemoError(f"gallery image {path} is missing: start the demo with --gallery DIR pointing at the "
                            f"folder the export was made from", status=404)
        return path.read_bytes()

    # ---- calling the signatures ----------------------------------------------------------------

    def call(self, signature_name: str, columns: dict) -> dict:
        """Run one signature on a batch: `columns` maps every input name to a list (one value per
        instance; bytes for string inputs). Returns numpy arrays by output name. Errors the model
        reports about the input (TensorFlow's INVALID_ARGUMENT) become DemoError 400."""
        import tensorflow as tf

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
        """One query through the `retrieve` signature: {"ids", "paths", "scores"} of the top k."""
        if not self.has_retrieve:
            raise DemoError("this export has no retrieve endpoint: export the run with --gallery DIR", status=404)
        out = self.call("retrieve", {"image_bytes": [image_bytes], "text": [text.encode("utf-8")], "k": [int(k)]})
        return {"ids": [int(i) for i in out["ids"][0]],
                "paths": [p.decode("utf-8", "replace") for p in out["paths"][0]],
                "scores": [float(s) for s in out["scores"][0]]}

    def warm_up(self) -> float:
        """Call every signature once on a small white PNG, so that the first visitor does not wait
        for TensorFlow's first-call set-up. Returns the seconds it took."""
        import io

        from PIL import Image

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
        from google.protobuf import json_format
        from tensorflow.core.protobuf import saved_model_pb2

        saved = saved_model_pb2.SavedModel()
        saved.ParseFromString((self.path / "saved_model.pb").read_bytes())
        defs = {}
        for meta_graph in saved.meta_graphs:
            for key, sig in meta_graph.signature_def.items():
                if key in self.functions:
                    defs[key] = json_format.MessageToDict(sig, preserving_proto_field_name=True)
        return {"model_spec": {"name": self.name, "signature_name": "", "version": str(self.version)},
                "metadata": {"signature_def": {"signature_def": defs}}}


def _register_text_ops() -> bool:
    """Register tensorflow-text's ops (a dependency of keras_irtf); False if it is missing."""
    try:
        import tensorflow_text  # noqa: F401
    except ImportError:
        return False
    return True


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

