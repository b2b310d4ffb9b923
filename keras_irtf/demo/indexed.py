"""The demo over a gallery index: the export embeds the query, a gallery index answers it.

    python tools/demo.py --model exported/css_tirg_s0/1 --index indexes/css

`IndexedModel` is the export (keras_irtf.demo.served.ServedModel) with a gallery index built by
tools/index.py from this very export's embeddings (keras_irtf.index.ann.GalleryIndex, loaded with
the export's fingerprint: an index of another export is refused at start). Its gallery is the
index's: the ids are the index's rows, the files lie under the index's images folder. What the
page and TF Serving's REST API send and receive is unchanged; `retrieve` (served even when the
export was made without --gallery) embeds the queries with `serving_default`, L2-normalises them
and asks the index, answering `ids` int64 [B, k], `paths` string [B, k] (the index's ids) and
`scores` float32 [B, k], best first. The index holds L2-normalised embeddings, so its scores are
cosine similarities (the export's own `retrieve` answers the dot product of the unnormalised
embeddings). A row the index cannot fill (an approximate index may find fewer than k) is id -1
with an empty path.

Gallery files are served by id only, each resolved under the images folder with every link
followed and refused (404) when it leads out (GalleryIndex.image_path, keras_irtf.safety.
resolve_under), and only with the bytes that were embedded: tools/index.py records each image's
sha256, and a file whose bytes differ is refused (GalleryIndex.image_bytes). So an index.json
naming another folder cannot turn the demo into a server of other files. An index without
recorded checksums (built from Python without them) serves files only from a folder the operator
names with --gallery; one without an images folder (built from TFRecords) has no file to show:
the demo refuses it. Served files must also be images (a JPEG, PNG, GIF or BMP header).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
from google.protobuf import json_format
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from keras_irtf.demo.limits import DemoError
from keras_irtf.demo.served import ServedModel, SignatureInfo, TensorInfo
from keras_irtf.image_limits import image_dimensions
from keras_irtf.index.ann import GalleryIndex, GalleryIndexError, export_fingerprint
from keras_irtf.serving.query import index_gallery_conflict, l2_normalised
from keras_irtf.utils import MissingExtra

log = logging.getLogger("keras_irtf.demo")

# retrieve's interface, as tools/export.py --gallery writes it: (dtype, rank) by name
RETRIEVE_INPUTS = {"image_bytes": ("string", 1), "text": ("string", 1), "k": ("int32", 1)}
RETRIEVE_OUTPUTS = {"ids": ("int64", 2), "paths": ("string", 2), "scores": ("float32", 2)}
_PROTO_TYPES = {"string": types_pb2.DT_STRING, "int32": types_pb2.DT_INT32, "int64": types_pb2.DT_INT64,
                "float32": types_pb2.DT_FLOAT}


def load_index(index_folder, model_path, gallery=None) -> GalleryIndex:
    """The gallery index `index_folder` for the export `model_path`, or DemoError saying why not:
    an index of another export (its fingerprint differs), a damaged one, a missing faiss, an index
    without an images folder, a `gallery` other than its images folder."""
    try:
        index = GalleryIndex.load(index_folder, fingerprint=export_fingerprint(model_path))
    except (GalleryIndexError, MissingExtra) as e:
        raise DemoError(str(e)) from None
    if index.images_root is None:
        raise DemoError(f"--index {index_folder} records no images folder (it was built from TFRecords): the demo "
                        f"shows the images it ranks and has none to show; build the index from a folder, a list or "
                        f"a glob of image files (tools/index.py --images), or query it with tools/query.py --json")
    conflict = index_gallery_conflict(gallery, index_folder, index.images_root)
    if conflict is not None:
        raise DemoError(conflict)
    if not Path(index.images_root).is_dir():
        raise DemoError(f"the images folder of --index {index_folder}, {index.images_root}, does not exist: the "
                        f"demo shows the images the index ranks from there")
    return index


class IndexedModel(ServedModel):
    """An export whose gallery is a gallery index (see the module's docstring)."""

    def __init__(self, path, index, name: Optional[str] = None, folder_named: bool = False):
        super().__init__(path, name=name)
        self.index = index
        self.folder_named = folder_named  # the operator named the images folder (--gallery)
        self.gallery_paths = index.ids
        self.gallery_hashes = index.hashes  # an upload with a gallery image's bytes is its query (None: not recorded)
        self.gallery_root = Path(index.images_root).resolve()
        self.gallery_root_given = True
        if "retrieve" not in self.signatures:  # an export made without --gallery: the index answers retrieve
            self.signatures["retrieve"] = SignatureInfo(
                {n: TensorInfo(t, (None,) * rank) for n, (t, rank) in RETRIEVE_INPUTS.items()},
                {n: TensorInfo(t, (None,) * rank) for n, (t, rank) in sorted(RETRIEVE_OUTPUTS.items())})

    @property
    def has_retrieve(self) -> bool:
        return True

    def describe_index(self) -> dict:
        index = self.index
        return {"folder": str(index.folder), "kind": index.kind, "size": index.size, "params": index.params,
                "images_root": str(self.gallery_root), "recall_at_10": (index.manifest.get("holdout") or {}).get(
                    "recall_at_10"), "scores": "cosine similarity"}

    # ---- the gallery: the index's rows, files under its images folder ----------------------------

    def gallery_file(self, gallery_id: int) -> Path:
        if isinstance(gallery_id, bool) or not isinstance(gallery_id, int) or not 0 <= gallery_id < self.index.size:
            raise DemoError(f"no gallery image {gallery_id}: ids run from 0 to {self.index.size - 1}", status=404)
        try:
            return self.index.image_path(gallery_id)  # resolved; a link leading out of the folder is refused
        except GalleryIndexError as e:
            log.warning("%s: refused", e)  # where it leads is for the server's log, not for the client
            raise DemoError(f"gallery image {gallery_id} ({self.index.ids[gallery_id]!r}) points outside the index's "
                            f"images folder: the demo serves only the files inside it", status=404) from None

    def gallery_bytes(self, gallery_id: int) -> bytes:
        path = self.gallery_file(gallery_id)
        try:
            # the bytes that were embedded (their recorded sha256), or, for an index without
            # checksums, a file of the folder the operator named with --gallery
            data = self.index.image_bytes(gallery_id, trust_folder=self.folder_named)
        except GalleryIndexError as e:
            log.warning("%s: refused", e)
            raise DemoError(f"gallery image {gallery_id} ({self.index.ids[gallery_id]!r}) is not served: {e}",
                            status=404) from None
        if image_dimensions(data) is None:
            log.warning("gallery image %d (%s) is not a JPEG, PNG, GIF or BMP image: refused", gallery_id, path)
            raise DemoError(f"gallery image {gallery_id} is not a JPEG, PNG, GIF or BMP image: the demo serves "
                            f"images only", status=404)
        return data

    def check_gallery(self):
        """Nothing to compare with checksums: an index is tied to its export by the fingerprint,
        checked when it was loaded, and its files are checked one by one as they are served."""

    # ---- retrieve, answered by the index -----------------------------------------------------------

    def call(self, signature_name: str, columns: dict) -> dict:
        if signature_name != "retrieve":
            return super().call(signature_name, columns)
        missing = [n for n in RETRIEVE_INPUTS if n not in columns]
        extra = [n for n in columns if n not in RETRIEVE_INPUTS]
        if missing or extra:
            raise DemoError(f"signature retrieve takes inputs {list(RETRIEVE_INPUTS)}; "
                            + (f"missing {missing}" if missing else "") + ("; " if missing and extra else "")
                            + (f"unknown {extra}" if extra else ""))
        ks = columns["k"]
        if len(ks) != len(columns["image_bytes"]):
            raise DemoError("retrieve: give one k per query image (the same value for all of them)")
        if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) for k in ks):
            raise DemoError("retrieve: k must be one integer per query")
        if ks and min(ks) < 1:
            raise DemoError("retrieve: k must be >= 1")
        if ks and min(ks) != max(ks):
            raise DemoError("retrieve: every query of a request must ask for the same k")
        embedded = super().call("serving_default", {"image_bytes": columns["image_bytes"], "text": columns["text"]})
        queries = l2_normalised(embedded["embedding"])
        k = min(int(ks[0]) if ks else 1, self.index.size)
        if len(queries) == 0:
            return {"ids": np.zeros((0, k), np.int64), "paths": np.zeros((0, k), object),
                    "scores": np.zeros((0, k), np.float32)}
        scores, rows = self.index.search(queries, k)
        ids = self.index.ids
        paths = np.array([[ids[r].encode("utf-8") if r >= 0 else b"" for r in row] for row in rows], dtype=object)
        return {"ids": rows.astype(np.int64), "paths": paths, "scores": scores.astype(np.float32)}

    def retrieve(self, image_bytes: bytes, text: str, k: int) -> dict:
        out = super().retrieve(image_bytes, text, k)  # k checked, then call("retrieve") above
        keep = [i for i, gid in enumerate(out["ids"]) if gid >= 0]  # rows an approximate index left empty
        return {name: [values[i] for i in keep] for name, values in out.items()}

    def metadata(self) -> dict:
        answer = super().metadata()
        defs = answer["metadata"]["signature_def"]["signature_def"]
        if "retrieve" not in defs:
            defs["retrieve"] = json_format.MessageToDict(retrieve_signature_def(), preserving_proto_field_name=True)
        return answer


def retrieve_signature_def():
    """The SignatureDef of `retrieve` as tools/export.py --gallery writes it, for an export made
    without it (the index answers it)."""
    sig = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
    for where, specs in ((sig.inputs, RETRIEVE_INPUTS), (sig.outputs, RETRIEVE_OUTPUTS)):
        for name, (dtype, rank) in specs.items():
            info = where[name]
            info.name = f"retrieve_{name}:0"
            info.dtype = _PROTO_TYPES[dtype]
            for _ in range(rank):
                info.tensor_shape.dim.add(size=-1)
    return sig
