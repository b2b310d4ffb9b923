"""The demo's web application (FastAPI): the page, its JSON endpoints, and TF Serving's REST API.

    GET  /                                   the page (static/index.html, its JS and CSS: no CDN)
    GET  /api/info                           model, gallery, limits, ground-truth source
    GET  /api/gallery?q=&offset=&limit=&known=   gallery entries whose path contains q
    GET  /api/gallery/<id>/texts             the known modification texts of a gallery image
    GET  /gallery/<id>                       a gallery image, by id only (no path is ever taken
                                             from a request)
    POST /api/search                         one query of the page through `retrieve`, with each
                                             result's cosine similarity (see Cosine)
    GET  /v1/models/<name>[/versions/<v>]    TF Serving's model status
    GET  /v1/models/<name>[/versions/<v>]/metadata   its SignatureDefs
    POST /v1/models/<name>[/versions/<v>]:predict    TF Serving's predict (see tf_serving.py)

Every request body is read up to a size limit and a nesting depth (MAX_JSON_DEPTH), and every
image is checked against the upload and pixel limits (keras_irtf.demo.limits) before TensorFlow
sees it; integers are checked against their range before any cast (retrieve's k: 1 to the
gallery's size). Gallery files are opened only by id and only inside the gallery folder
(keras_irtf.demo.served). Refusals answer `{"error": "..."}` with a 4xx status; nothing a client
sends crashes the server.
"""

import base64
import binascii
import hashlib
import io
import json
import logging
import math
import re
import socket
import time
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from keras_irtf.demo.limits import DemoError, Limits, check_image, k_range, mb_text
from keras_irtf.demo.tf_serving import format_predict_response, parse_predict_request
from keras_irtf.utils import optional_import

log = logging.getLogger("keras_irtf.demo")
STATIC = Path(__file__).resolve().parent / "static"
_MODEL_URL = re.compile(
    r"^(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?(?P<verb>:predict|/metadata)?$")
_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
                ".bmp": "image/bmp"}
MAX_JSON_DEPTH = 32  # nesting of a request body; the page's and TF Serving's requests use 4 or 5
_MAX_ID_DIGITS = 18  # ids and versions in URLs: longer digit strings name nothing (and int() refuses 4300+)


def _web(module: str):
    """A module of FastAPI or Starlette (the `demo` extra), loaded when the app is made."""
    return optional_import(module, "demo", "the demo")


def json_response(content, status: int = 200):
    # TF Serving writes NaN and Infinity as bare tokens; Starlette's JSONResponse would refuse them
    return _web("starlette.responses").Response(json.dumps(content, allow_nan=True, separators=(",", ":")), status_code=status,
                    media_type="application/json")


async def read_json(request, limit: int):
    """The request body parsed as JSON, refused with 413 past `limit` bytes (Content-Length is
    checked first, then the bytes actually received)."""
    length = request.headers.get("content-length")
    too_big = DemoError(f"the request body is over {mb_text(limit)}, this server's limit "
                        f"(demo option --max-request-mb)", status=413)
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    size, chunks = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    too_deep = DemoError(f"the request body nests lists and objects more than {MAX_JSON_DEPTH} levels deep; this "
                         f"server reads at most {MAX_JSON_DEPTH}")
    try:
        body = json.loads(b"".join(chunks) or b"null")
    except RecursionError:  # far deeper than the limit: the parser itself ran out of stack
        raise too_deep from None
    except ValueError as e:
        raise DemoError(f"the request body is not valid JSON: {e}") from None
    if json_depth(body) > MAX_JSON_DEPTH:
        raise too_deep
    return body


def json_depth(value) -> int:
    """How deeply lists and objects nest in a parsed JSON value (a scalar: 0), counted without
    recursion, so that no body can exhaust the stack of the code that reads it."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def url_id(text: str, what: str) -> int:
    """A gallery id from a URL: digits only (no sign, no path), at most _MAX_ID_DIGITS of them;
    else 404 naming `what`."""
    if not text.isascii() or not text.isdigit() or len(text) > _MAX_ID_DIGITS:
        raise DemoError(f"no {what} {text[:40]!r}: ids are the non-negative integers of /api/gallery", status=404)
    return int(text)


def _int_param(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DemoError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise DemoError(f"{name} must be between {low} and {high}, got {value}")
    return value


class Cosine:
    """The cosine similarity of the query and each result, from `retrieve`'s scores.

    `retrieve` ranks the gallery by the dot product of the query embedding with each stored
    gallery embedding (what the REST API returns as "scores", unchanged). keras_irtf's models end
    in ScaledL2Normalization: x / |x| * s, one learned scale s shared by queries and images
    (TIRG's NormalizationLayer), so that dot product is s^2 times the cosine: TIRG learns s from 4
    (s = 9 gives raw scores up to 81), CLIP4Cir's Combiner fixes s = 10 (up to 100), the model's
    `initial_scale` and `learn_scale`. The page shows score / (|q| |g|): |g| from the
    gallery embeddings stored in the export (the `retrieve` signature's `gallery_embeddings`), and
    |q| their common norm s when every stored embedding has one norm and a few probe queries
    embedded at start (serving_default) have it too ("sphere"); otherwise |q| is the norm of the
    query's own embedding from serving_default, one more model call per page query ("query").
    Without stored embeddings (an export not written by keras_irtf) the raw score is shown,
    labelled as such ("raw"). A model served with a gallery index (keras_irtf.demo.indexed) ranks
    by the index, which holds L2-normalised embeddings and is asked with the normalised query:
    its score is the cosine itself ("index").
    """

    TOLERANCE = 1e-4  # relative: float32 norms of x / |x| * s agree to ~1e-7

    def __init__(self, model):
        self.model = model
        self.gallery_norms = None
        self.radius = None
        self.method = "raw"
        if getattr(model, "index", None) is not None:
            self.radius, self.method = 1.0, "index"  # unit query, unit gallery rows
            return
        emb = stored_gallery_embeddings(model)
        if emb is None or "serving_default" not in model.functions:
            return
        norms = np.linalg.norm(emb.astype(np.float64), axis=1)
        try:
            probes = [self._embedding_norm(image, text) for image, text in _probe_queries()]
        except DemoError as e:
            log.warning("the page shows raw scores: the export's serving_default failed on a probe query (%s)", e)
            return
        self.gallery_norms, self.method = norms, "query"
        radius = float(np.median(norms)) if len(norms) else 0.0
        if radius > 0 and all(abs(n - radius) <= self.TOLERANCE * radius for n in list(norms) + probes):
            self.radius, self.method = radius, "sphere"

    def _embedding_norm(self, image: bytes, text: str) -> float:
        out = self.model.call("serving_default", {"image_bytes": [image], "text": [text.encode("utf-8")]})
        return float(np.linalg.norm(np.asarray(out["embedding"][0], np.float64)))

    def query_norm(self, image: bytes, text: str) -> Optional[float]:
        """|q| of the query (image bytes, text); None when scores stay raw."""
        if self.method == "raw":
            return None
        return self.radius if self.radius is not None else self._embedding_norm(image, text)

    def of(self, query_norm: Optional[float], gallery_id: int, score: float) -> Optional[float]:
        """The cosine of one result, in [-1, 1]; None when it cannot be computed."""
        if query_norm is None or not math.isfinite(score):
            return None
        if self.method == "index":
            return min(1.0, max(-1.0, score))
        if not 0 <= gallery_id < len(self.gallery_norms):
            return None
        norm = query_norm * float(self.gallery_norms[gallery_id])
        if not norm > 0:
            return None
        return min(1.0, max(-1.0, score / norm))

    def describe(self) -> dict:
        """What the page says about its scores."""
        if self.method == "raw":
            return {"shown": "raw score", "method": "raw", "scale": None,
                    "text": "raw score: the dot product of the query and image embeddings (this export stores no "
                            "gallery embeddings to turn it into a cosine)"}
        text = "cosine similarity of the query and image embeddings, from -1 to 1"
        if self.method == "index":
            return {"shown": "cosine similarity", "method": "index", "scale": None,
                    "text": text + " (the gallery index's own score: it holds L2-normalised embeddings)"}
        scale = None if self.radius is None else round(self.radius ** 2, 6)
        if scale is not None:
            text += f" (the model's own score, the dot product it ranks by, is {scale:.4g} \u00d7 this)"
        else:
            text += " (the model's own score is the dot product it ranks by; hover a result to see it)"
        return {"shown": "cosine similarity", "method": self.method, "scale": scale, "text": text}


def stored_gallery_embeddings(model):
    """The gallery embeddings the export stores ([gallery size, D] numpy), read from the variables
    of its `retrieve` signature; None when there is none."""
    fn = model.functions.get("retrieve") if model.has_retrieve else None
    for variable in getattr(fn, "variables", ()) if fn is not None else ():
        if variable.name.split(":")[0] == "gallery_embeddings" and len(variable.shape) == 2 \
                and variable.shape[0] == model.gallery_size:
            return variable.numpy()
    return None


def _probe_queries():
    """Two small queries (a white and a noise PNG, with and without text) for Cosine's check."""
    out = []
    rng = np.random.default_rng(0)
    for pixels, text in ((np.full((32, 32, 3), 255, np.uint8), ""),
                         (rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), "make it red")):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        out.append((buf.getvalue(), text))
    return out


class Demo:
    """What the routes share: the served model, the limits, the known queries."""

    def __init__(self, model, limits: Limits, ground_truth=None):
        self.model = model
        self.limits = limits
        self.ground_truth = ground_truth
        self._lower_paths = [p.lower() for p in model.gallery_paths]
        # an upload with the very bytes of a gallery file is that gallery image's query
        self._by_digest = {}
        for i, digest in enumerate(model.gallery_hashes or ()):
            self._by_digest.setdefault(digest, []).append(i)
        self.cosine = Cosine(model)

    def info(self) -> dict:
        m = self.model
        gt = self.ground_truth
        info = {
            "model": {"name": m.name, "version": m.version, "path": str(m.path),
                      "signatures": {n: {"inputs": list(s.inputs), "outputs": list(s.outputs)}
                                     for n, s in sorted(m.signatures.items())},
                      "method": m.info.get("method"), "image_size": m.info.get("image_size"),
                      "embedding_dim": m.info.get("embedding_dim")},
            "gallery": {"size": m.gallery_size, "files": m.gallery_files_present,
                        "root": str(m.gallery_root) if m.gallery_root else None},
            "retrieve": m.has_retrieve,
            "scores": self.cosine.describe(),
            "identical_uploads": bool(self._by_digest),
            "ground_truth": None if gt is None else {"source": gt.source, "protocol": gt.protocol,
                                                     "queries": len(gt), "references": len(gt.reference_ids)},
            "limits": self.limits.describe(),
            "rest_url": f"/v1/models/{m.name}:predict",
        }
        if getattr(m, "index", None) is not None:  # the gallery is a gallery index's (keras_irtf.demo.indexed)
            info["index"] = m.describe_index()
        return info

    def gallery(self, q: str, offset: int, limit: int, known: bool) -> dict:
        q = q.lower().strip()
        ids = [i for i, p in enumerate(self._lower_paths) if q in p] if q else range(self.model.gallery_size)
        if known and self.ground_truth is not None:
            refs = self.ground_truth.reference_ids
            ids = [i for i in ids if i in refs]
        ids = list(ids)
        page = ids[offset : offset + limit]
        refs = self.ground_truth.reference_ids if self.ground_truth is not None else set()
        return {"total": len(ids), "offset": offset,
                "items": [{"id": i, "path": self.model.gallery_paths[i], "known": i in refs} for i in page]}

    def search(self, body) -> dict:
        """One page query: reference (gallery id or uploaded bytes) + text -> top-k via `retrieve`."""
        start = time.perf_counter()
        if not isinstance(body, dict):
            raise DemoError("the request body must be a JSON object")
        text = body.get("text", "")
        if not isinstance(text, str):
            raise DemoError("text must be a string")
        if len(text) > 1000:
            raise DemoError(f"the text is {len(text)} characters long; write at most 1000")
        m = self.model
        if not m.has_retrieve:
            raise DemoError("this export has no retrieve endpoint: export the run with --gallery DIR", status=409)
        low, high, _ = k_range(m.gallery_size, self.limits.max_k)
        k = _int_param(body.get("k", min(10, high)), "k", low, high)  # before any cast to int32
        image_id = body.get("image_id")
        if image_id is not None:
            image_id = _int_param(image_id, "image_id", 0, m.gallery_size - 1)
            data = m.gallery_bytes(image_id)
            reference = {"image_id": image_id, "path": m.gallery_paths[image_id]}
        else:
            image = body.get("image")
            if not isinstance(image, dict) or not isinstance(image.get("b64"), str):
                raise DemoError('pick a gallery image ("image_id") or upload one ("image": {"b64": ...})')
            try:
                data = base64.b64decode(image["b64"], validate=True)
            except (binascii.Error, ValueError):
                raise DemoError("the uploaded image is not valid base64") from None
            name = str(body.get("filename") or "the uploaded image")[:200]
            width, height, fmt = check_image(data, self.limits, what=f"{name}")
            reference = {"image_id": None, "path": None, "filename": name, "width": width, "height": height,
                         "format": fmt, "bytes": len(data), "identical_to": None}
            same = self._by_digest.get(hashlib.sha256(data).hexdigest())
            if same:  # the very bytes of a gallery file: that gallery image's query, as in evaluation
                image_id = same[0]
                reference["identical_to"] = {"image_id": image_id, "path": m.gallery_paths[image_id],
                                             "also": same[1:]}
        exclude = bool(body.get("exclude_reference", True)) and image_id is not None
        want = min(k + 1, max(1, m.gallery_size)) if exclude else k  # the reference may be among the top k
        t0 = time.perf_counter()
        out = m.retrieve(data, text, want)
        model_ms = (time.perf_counter() - t0) * 1000
        t1 = time.perf_counter()
        query_norm = self.cosine.query_norm(data, text)  # a model call only when the norms differ
        cosine_ms = (time.perf_counter() - t1) * 1000
        known = None
        gt = self.ground_truth
        if gt is not None and image_id is not None:
            known = gt.targets(image_id, text)
        results = []
        for gid, path, score in zip(out["ids"], out["paths"], out["scores"]):
            if exclude and gid == image_id:
                continue
            results.append({"rank": len(results) + 1, "id": gid, "path": path,
                            "score": score if math.isfinite(score) else None,
                            "cosine": self.cosine.of(query_norm, gid, score),
                            "target": bool(known is not None and gid in known)})
        results = results[:k]
        server_ms = (time.perf_counter() - start) * 1000
        ground = None
        if known is not None:
            ground = {"known": True, "targets": len(known), "found": sum(r["target"] for r in results),
                      "protocol": gt.protocol}
        elif gt is not None:
            ground = {"known": False, "targets": 0, "found": 0, "protocol": gt.protocol}
        log.info("search k=%d ref=%s text=%r: %.1f ms model, %.1f ms server", k,
                 reference.get("path") or reference.get("filename"), text[:80], model_ms, server_ms)
        return {"query": {**reference, "text": text, "k": k, "exclude_reference": exclude},
                "results": results, "ground_truth": ground, "scores": self.cosine.describe(),
                "timing": {"model_ms": round(model_ms, 2), "cosine_ms": round(cosine_ms, 2),
                           "server_ms": round(server_ms, 2)}}

    def predict_int_bounds(self) -> dict:
        """The ranges of integer inputs, checked while the predict body is parsed: retrieve's k
        runs from 1 to the gallery's size (and this server's max_k)."""
        if not self.model.has_retrieve:
            return {}
        return {("retrieve", "k"): k_range(self.model.gallery_size, self.limits.max_k)}

    def check_predict_k(self, name: str, columns: dict, row_format: bool):
        """retrieve takes one k per query: an integer, not a list."""
        if name != "retrieve" or "k" not in columns:
            return
        for i, value in enumerate(columns["k"]):
            if isinstance(value, list):
                where = f"instances[{i}].k" if row_format else f"inputs.k[{i}]"
                raise DemoError(f"{where}: expected one k per query (an integer), got a list")

    def check_predict_images(self, columns: dict, row_format: bool):
        for name, values in columns.items():
            if not name.endswith("image_bytes"):
                continue
            for i, value in enumerate(values):
                where = f"instances[{i}].{name}" if row_format else f"inputs.{name}[{i}]"
                if not isinstance(value, bytes):
                    raise DemoError(f"{where}: expected one image per query")
                check_image(value, self.limits, what=where)


def create_app(model, limits: Optional[Limits] = None, ground_truth=None):
    """The FastAPI application serving `model` (a keras_irtf.demo.served.ServedModel)."""
    # (this module has no `from __future__ import annotations`: the endpoints' annotations below
    # are evaluated here, where FastAPI's Request is a local name, for FastAPI to inject requests)
    FastAPI, Request = _web("fastapi").FastAPI, _web("fastapi").Request
    RequestValidationError = _web("fastapi.exceptions").RequestValidationError
    run_in_threadpool = _web("starlette.concurrency").run_in_threadpool
    HTTPException = _web("starlette.exceptions").HTTPException
    FileResponse, Response = _web("starlette.responses").FileResponse, _web("starlette.responses").Response
    StaticFiles = _web("starlette.staticfiles").StaticFiles
    demo = Demo(model, limits or Limits(), ground_truth)
    app = FastAPI(title=f"keras_irtf demo: {model.name}", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.demo = demo

    @app.exception_handler(DemoError)
    async def _demo_error(request, exc: DemoError):
        path = request.url.path  # a client's URL: shortened, so that one request cannot flood the log
        path = path if len(path) <= 200 else f"{path[:200]}... ({len(path)} characters)"
        log.warning("refused %s %s with %d: %s", request.method, path, exc.status, exc.message[:500])
        return json_response({"error": exc.message}, exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        return json_response({"error": f"{exc.detail}: {request.method} {request.url.path}"}, exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return json_response({"error": f"bad request: {problems}"}, 400)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return json_response({"error": f"internal error ({type(exc).__name__}): {exc}"}, 500)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/info")
    async def info():
        return json_response(demo.info())

    @app.get("/api/gallery")
    async def gallery(q: str = "", offset: int = 0, limit: int = 60, known: bool = False):
        if offset < 0 or not 1 <= limit <= 500:
            raise DemoError("offset must be >= 0 and limit between 1 and 500")
        return json_response(demo.gallery(q, offset, limit, known))

    @app.get("/api/gallery/{gallery_id}/texts")
    async def gallery_texts(gallery_id: str):
        gallery_id = url_id(gallery_id, "gallery image")
        model.gallery_file(gallery_id)  # 404 for an unknown id
        texts = demo.ground_truth.texts_for(gallery_id) if demo.ground_truth is not None else []
        return json_response({"id": gallery_id, "texts": texts})

    @app.get("/gallery/{gallery_id}")
    async def gallery_image(gallery_id: str):
        gallery_id = url_id(gallery_id, "gallery image")
        path = model.gallery_file(gallery_id)  # resolved inside the gallery folder, else 404
        # the bytes of the very file checked (a link swapped in afterwards is not followed again)
        data = await run_in_threadpool(model.gallery_bytes, gallery_id)
        return Response(data, media_type=_IMAGE_TYPES.get(path.suffix.lower(), "application/octet-stream"),
                        headers={"Cache-Control": "max-age=3600"})

    @app.post("/api/search")
    async def search(request: Request):
        body = await read_json(request, demo.limits.max_request_bytes)
        return json_response(await run_in_threadpool(demo.search, body))

    def _parse_model_url(rest: str):
        m = _MODEL_URL.match(rest)
        if m is None:
            raise DemoError(f"Malformed request: /v1/models/{rest}", status=404)
        if m["name"] != model.name or m["label"] is not None or (
                m["version"] is not None and m["version"].lstrip("0") != str(model.version).lstrip("0")):
            spec = (f"Specific({m['name']}, {m['version'][:24]})" if m["version"] else
                    f"Label({m['name']}, {m['label']})" if m["label"] else f"Latest({m['name']})")
            raise DemoError(f"Servable not found for request: {spec} (this server has {model.name}, "
                            f"version {model.version})", status=404)
        return m["verb"]

    @app.get("/v1/models/{rest:path}")
    async def model_get(rest: str):
        verb = _parse_model_url(rest)
        if verb == ":predict":
            raise DemoError("predict takes POST", status=405)
        return json_response(model.metadata() if verb == "/metadata" else model.status())

    @app.post("/v1/models/{rest:path}")
    async def model_post(rest: str, request: Request):
        verb = _parse_model_url(rest)
        if verb != ":predict":
            raise DemoError(f"POST /v1/models/{rest}: this server implements :predict only", status=404)
        start = time.perf_counter()
        body = await read_json(request, demo.limits.max_request_bytes)
        name, columns, row_format = parse_predict_request(body, model.signatures, demo.limits.max_instances,
                                                          demo.predict_int_bounds())
        demo.check_predict_k(name, columns, row_format)
        demo.check_predict_images(columns, row_format)
        t0 = time.perf_counter()
        outputs = await run_in_threadpool(model.call, name, columns)
        model_ms = (time.perf_counter() - t0) * 1000
        answer = format_predict_response(outputs, row_format)
        log.info("predict %s batch=%d: %.1f ms model, %.1f ms server", name, len(next(iter(columns.values()))),
                 model_ms, (time.perf_counter() - start) * 1000)
        return json_response(answer)

    return app


def serve(app, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info", on_ready=None):
    """Run `app` with uvicorn on host:port (port 0: a free port) until interrupted (Ctrl-C or
    SIGTERM). `on_ready(url)` is called once the socket is bound."""
    uvicorn = optional_import("uvicorn", "demo", "the demo")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    sock.listen(128)  # connections made before uvicorn starts accepting wait in the backlog
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    url = f"http://{shown}:{bound}/"
    config = uvicorn.Config(app, host=host, port=bound, log_level=log_level, access_log=False)
    server = uvicorn.Server(config)
    if on_ready is not None:
        on_ready(url)
    server.run(sockets=[sock])
