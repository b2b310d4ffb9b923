"""Querying an exported SavedModel and drawing the paper's qualitative figure.

    from keras_irtf.serving.query import ExportedModel, search, draw_results, save_results
    model = ExportedModel("exported/css_tirg_s0/1")
    results = search(model, "q.png", "make the red cube blue", "data/gallery", top=10)
    figure = draw_results("q.png", "make the red cube blue", results, targets=["data/gallery/t.png"])
    save_results("queries/q_make-the-red-cube-blue", figure, {"text": "make the red cube blue", ...})

Only TensorFlow and Pillow are needed: the exported graph decodes the images and vectorises the
text (an export that tokenises with tensorflow-text ops, CLIP / SigLIP / BERT, also needs that
package: keras_irtf.serving.reader.load_export registers the op libraries the export records).
When the export has a `retrieve` endpoint over the same gallery, the top-k is computed in the
graph; otherwise the gallery is embedded through `embed_image` and ranked here. `search_index`
answers from a gallery index instead (keras_irtf.index.ann.GalleryIndex, built by
tools/index.py from this export's embeddings): only the query is embedded.

A query's figure and ranking are saved as one folder (`save_results`: grid.png and
results.json), which keras_irtf marks as its own: a later query saved to the same folder
replaces it, and a folder or file that keras_irtf did not write is never replaced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import textwrap
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw, ImageFont

from keras_irtf.image_limits import DEFAULT_MAX_PIXELS, ImageTooLarge, check_image_bytes
from keras_irtf.safety import mark_owned, prepare_output_folder, remove_owned, replace_folder
from keras_irtf.utils import write_json
from keras_irtf.serving.reader import (ExportError, file_sha256, gallery_difference, gallery_file, list_gallery,
                                       open_export)

INT32_MAX = 2**31 - 1  # k reaches the graph as int32

FRAME_COLOR = (20, 170, 40)  # ground truth
QUERY_COLOR = (40, 90, 220)

RESULTS_KIND = "query folder"  # the ownership marker's kind of a saved query's results
RESULTS_ROOT = "queries"  # where tools/query.py saves a query unless told (--out)
FIGURE_NAME, RANKING_NAME = "grid.png", "results.json"


class QueryError(ValueError):
    """A query that cannot be run (an input file that is not an image); the message names it."""


@dataclasses.dataclass
class Result:
    rank: int  # 1-based
    path: Optional[Path]  # the gallery file (None: an index that records no images folder)
    score: float
    gallery_id: int  # the position in the gallery: the export's id, or the index's row
    sha256: Optional[str] = None  # of the file's bytes: targets are recognised by content
    index_id: Optional[str] = None  # the index's id of the image (search_index only)


class ExportedModel:
    """A SavedModel version folder written by keras_irtf.serving.export, loaded with TensorFlow only.
    A damaged export (truncated saved_model.pb, missing variables, garbled description) raises
    keras_irtf.serving.reader.DamagedExport naming the file (keras_irtf.serving.reader.open_export)."""

    def __init__(self, path):
        self.path = Path(path)
        opened = open_export(self.path)
        self.info = opened.info
        self.module = opened.module
        self.signatures = self.module.signatures
        self.gallery_paths = opened.gallery_paths
        # without hashes (an older export) the stored embeddings cannot be checked: never used
        self.gallery_hashes = opened.gallery_hashes

    def embed_queries(self, image_bytes: list, texts: list) -> np.ndarray:
        out = self.signatures["serving_default"](image_bytes=tf.constant(image_bytes), text=tf.constant(texts))
        return out["embedding"].numpy()

    def embed_images(self, image_bytes: list, batch_size: int = 64) -> np.ndarray:
        fn = self.signatures["embed_image"]
        parts = [fn(image_bytes=tf.constant(image_bytes[i : i + batch_size]))["embedding"].numpy()
                 for i in range(0, len(image_bytes), batch_size)]
        return np.concatenate(parts)

    def retrieve(self, image_bytes: bytes, text: str, k: int):
        """(ids, paths, scores) of the top-k of the stored gallery for one query."""
        if "retrieve" not in self.signatures:
            raise ExportError(f"{self.path} was exported without a gallery: no retrieve endpoint")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= INT32_MAX:
            raise QueryError(f"k must be an integer from 1 to {INT32_MAX}, got {k!r}")  # before the int32 cast
        out = self.signatures["retrieve"](image_bytes=tf.constant([image_bytes]), text=tf.constant([text]),
                                          k=tf.constant([int(k)], tf.int32))
        return (out["ids"].numpy()[0], [p.decode() for p in out["paths"].numpy()[0]], out["scores"].numpy()[0])


def _check_top(top):
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
        raise QueryError(f"top must be an integer >= 1, got {top!r}")


def _query_bytes(model: ExportedModel, image: Path) -> bytes:
    """The query image's bytes, its header checked before the graph decodes it."""
    if not image.is_file():
        raise FileNotFoundError(f"query image {image} not found")
    data = image.read_bytes()
    if check_image_bytes(data, model.info.get("max_pixels", DEFAULT_MAX_PIXELS), f"query image {image}") is None:
        raise QueryError(f"query image {image} is not a JPEG, PNG, GIF or BMP image (or its header is damaged)")
    return data


def search(model: ExportedModel, image, text: str, gallery, top: int = 10, exclude_query: bool = True) -> list:
    """The top `top` gallery images for (image, text), best first.

    `gallery` is a folder of images. The query image itself is left out of the results when it
    is one of the gallery files (as in the evaluation protocol) unless exclude_query=False; it is
    recognised by content (the file at the query's path if its bytes are the query's, else the
    first gallery file with the same bytes). The export's stored gallery embeddings (`retrieve`)
    are used only when the gallery holds exactly the exported files, by name and by sha256;
    otherwise the gallery is embedded again (keras_irtf.serving.reader.gallery_difference, the
    check the demo makes too). Gallery files are read only inside `gallery`: a link out of it
    raises ExportError naming it. `top` beyond the gallery's size gives the whole gallery.
    """
    gallery = Path(gallery)
    image = Path(image)
    _check_top(top)
    if not image.is_file():
        raise FileNotFoundError(f"query image {image} not found")
    paths = list_gallery(gallery)
    files = [gallery_file(gallery, p) for p in paths]  # each resolved inside the gallery folder
    query_bytes = _query_bytes(model, image)
    max_pixels = model.info.get("max_pixels", DEFAULT_MAX_PIXELS)
    hashes = [file_sha256(f) for f in files]
    own = None
    if exclude_query:
        query_hash = hashlib.sha256(query_bytes).hexdigest()
        resolved = image.resolve()
        same = [i for i, h in enumerate(hashes) if h == query_hash]
        own = next((i for i in same if files[i] == resolved), same[0] if same else None)
    want = min(top + (own is not None), len(paths))  # never more than the gallery holds
    if paths == model.gallery_paths and gallery_difference(gallery, model.gallery_paths, model.gallery_hashes,
                                                           dict(zip(paths, hashes))) is None:
        ids, _, scores = model.retrieve(query_bytes, text, want)
    else:
        raw = []
        for p, f in zip(paths, files):
            raw.append(f.read_bytes())
            try:
                dims = check_image_bytes(raw[-1], max_pixels, f"gallery image {gallery / p}")
            except ImageTooLarge as e:
                raise ImageTooLarge(f"{e}; remove it from the gallery") from None
            if dims is None:
                raise QueryError(f"gallery image {gallery / p} is not a JPEG, PNG, GIF or BMP image (or its header "
                                 f"is damaged); remove it from the gallery")
        emb = model.embed_images(raw)
        q = model.embed_queries([query_bytes], [text])[0]
        all_scores = emb @ q
        ids = np.argsort(-all_scores, kind="stable")[:want]
        scores = all_scores[ids]
    results = []
    for i, s in zip(ids, scores):
        if own is not None and int(i) == own:
            continue
        results.append(Result(len(results) + 1, gallery / paths[int(i)], float(s), int(i), hashes[int(i)]))
    return results[:top]


def l2_normalised(vectors: np.ndarray) -> np.ndarray:
    """Each row divided by its L2 norm (float32): a gallery index holds L2-normalised image
    embeddings, so a query is normalised too and the index's scores are cosine similarities."""
    vectors = np.asarray(vectors, np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def index_gallery_conflict(gallery, index_folder, images_root) -> Optional[str]:
    """None when a --gallery given with --index names the index's own images folder (or is not
    given); else the one-line message saying how the two conflict, for tools/query.py and the
    demo. `images_root`: the index's images folder (None for an index built from TFRecords)."""
    if gallery is None:
        return None
    if images_root is None:
        return (f"--gallery {gallery} and --index {index_folder} conflict: the index records no images folder (it was "
                f"built from TFRecords), so its ids are not files of --gallery; drop --gallery")
    if Path(gallery).resolve() != Path(images_root).resolve():
        return (f"--gallery {gallery} and --index {index_folder} conflict: the index ranks the images under "
                f"{images_root}, not those of --gallery; drop --gallery (the index's images are shown), or build an "
                f"index of {gallery} with tools/index.py")
    return None


def search_index(model: ExportedModel, image, text: str, index, top: int = 10, exclude_query: bool = True) -> list:
    """The top `top` images of a gallery index for (image, text), best first.

    `index` is a keras_irtf.index.ann.GalleryIndex built from this export's embeddings (load it
    with the export's fingerprint, so that another export's index is refused). The query is
    embedded by `serving_default`, L2-normalised, and its neighbours are the index's: each
    result's score is the cosine similarity of the two embeddings, its gallery_id the index's row
    and its index_id the index's id. Result files are found under the index's images folder
    (index.image_path: resolved, and refused when a link leads out of it); an index without one
    (built from TFRecords) gives results without a path. The query image is left out of the
    results when it is one of the gallery files (by content, as `search` does: the file at the
    query's own path in the images folder, else a result with the very same bytes), unless
    exclude_query=False. Only the results' files are read, never the whole gallery.
    """
    _check_top(top)
    image = Path(image)
    query_bytes = _query_bytes(model, image)
    query = l2_normalised(model.embed_queries([query_bytes], [text]))
    root = index.images_root
    exclude_query = exclude_query and root is not None  # without files, no result can be recognised
    want = min(top + int(exclude_query), index.size)
    scores, rows = index.search(query, want)
    found = [(int(r), float(s)) for r, s in zip(rows[0], scores[0]) if r >= 0]
    paths = {r: index.image_path(r) for r, _ in found} if root is not None else {}
    # the checksums recorded as embedded where the index has them; else the files' own
    hashes = {r: index.hashes[r] if index.hashes is not None else _sha256_or_none(p) for r, p in paths.items()}
    own = None
    if exclude_query:
        query_hash = hashlib.sha256(query_bytes).hexdigest()
        resolved = image.resolve()
        same = sorted(r for r, h in hashes.items() if h == query_hash)
        own = next((r for r in same if paths[r] == resolved), same[0] if same else None)
    results = []
    for r, s in found:
        if r == own:
            continue
        results.append(Result(len(results) + 1, paths.get(r), s, r, hashes.get(r), index.ids[r]))
    return results[:top]


def _sha256_or_none(path):
    try:
        return file_sha256(path)
    except OSError:  # a gallery file deleted since the index was built: a result without checksum
        return None


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed-size bitmap font
        return ImageFont.load_default()


def _thumbnail(path, size):
    """The image scaled to fit a size x size white square (small images enlarged without blur)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = size / max(im.size)
        resample = Image.NEAREST if scale >= 2 else Image.LANCZOS
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), resample)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return canvas


def draw_results(query_image, text: str, results: Iterable[Result], out=None, targets: Optional[Iterable] = None,
                 thumb: int = 128, title: Optional[str] = None):
    """The qualitative figure: the query image with its text, an arrow, then the results with
    their rank and score; results that are a ground-truth target are framed in green.

    `targets` are paths of ground-truth images (compared by content: a result whose bytes equal
    a target's is framed). Returns the PIL image (and writes it to `out` when given).
    """
    results = list(results)
    target_set = {file_sha256(t) for t in (targets or ())}
    pad, gap, arrow_w, frame = 10, 8, 40, 4
    font, small = _font(14), _font(12)
    chars = max(12, thumb // 7)
    lines = textwrap.wrap(f'"{text}"', chars)[:6] or ['""']
    line_h = 16
    title_h = 22 if title else 0
    cell_h = thumb + 2 * frame + 2 * line_h + 4
    query_h = thumb + 2 * frame + len(lines) * line_h + 4
    width = pad * 2 + (thumb + 2 * frame) + arrow_w + len(results) * (thumb + 2 * frame + gap)
    height = pad * 2 + title_h + max(cell_h, query_h)
    fig = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(fig)
    if title:
        draw.text((pad, pad), title, fill=(0, 0, 0), font=font)
    top = pad + title_h

    # query: blue frame, text below
    x = pad
    draw.rectangle([x, top, x + thumb + 2 * frame - 1, top + thumb + 2 * frame - 1], outline=QUERY_COLOR, width=2)
    fig.paste(_thumbnail(query_image, thumb), (x + frame, top + frame))
    for j, line in enumerate(lines):
        draw.text((x, top + thumb + 2 * frame + 2 + j * line_h), line, fill=(0, 0, 0), font=font)
    # arrow
    x += thumb + 2 * frame
    mid = top + frame + thumb // 2
    draw.line([x + 8, mid, x + arrow_w - 8, mid], fill=(0, 0, 0), width=3)
    draw.polygon([(x + arrow_w - 6, mid), (x + arrow_w - 16, mid - 7), (x + arrow_w - 16, mid + 7)], fill=(0, 0, 0))
    x += arrow_w
    # results
    for r in results:
        is_target = (r.sha256 or file_sha256(r.path)) in target_set
        if is_target:
            draw.rectangle([x, top, x + thumb + 2 * frame - 1, top + thumb + 2 * frame - 1], fill=FRAME_COLOR)
        else:
            draw.rectangle([x + frame - 1, top + frame - 1, x + frame + thumb, top + frame + thumb], outline=(200, 200, 200))
        fig.paste(_thumbnail(r.path, thumb), (x + frame, top + frame))
        y = top + thumb + 2 * frame + 2
        draw.text((x, y), f"#{r.rank}  {r.score:.3f}", fill=FRAME_COLOR if is_target else (0, 0, 0), font=font)
        name = Path(r.path).name
        if len(name) > chars:
            name = name[: chars - 1] + "…"
        draw.text((x, y + line_h), name, fill=(90, 90, 90), font=small)
        x += thumb + 2 * frame + gap
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.save(out)
    return fig


def results_folder_name(image, text: str) -> str:
    """A query's default folder name: the query image's name without its extension, then the
    text, each reduced to letters, digits and dashes ("css_test_000000_remove-top-left-object")."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(image).stem).strip("-.") or "image"
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60].rstrip("-") or "no-text"
    return f"{stem}_{words}"


def check_results_folder(folder) -> Path:
    """`folder` can receive a query's results: it is missing, empty, or a query folder keras_irtf
    wrote (which saving replaces). Anything else raises keras_irtf.safety.NotOwnedError naming
    it, before any work is done."""
    prepare_output_folder(folder, RESULTS_KIND, "choose another --out", replace=True)
    return Path(folder)


def save_results(folder, figure, ranking: dict) -> Path:
    """Write `figure` (a PIL image, from draw_results) as grid.png and `ranking` as results.json
    into `folder`, atomically: they are written into a hidden sibling folder, marked as a query
    folder of keras_irtf's, which then takes `folder`'s place (check_results_folder's rules).
    Returns `folder`."""
    folder = check_results_folder(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.parent / f".{folder.name}.partial-{os.getpid()}"
    remove_owned(partial, RESULTS_KIND)  # left by an interrupted save of this process id: ours only
    mark_owned(partial, RESULTS_KIND)
    try:
        figure.save(partial / FIGURE_NAME)
        write_json(partial / RANKING_NAME, ranking)
        replace_folder(partial, folder, RESULTS_KIND)
    except BaseException:
        remove_owned(partial, RESULTS_KIND)
        raise
    return folder
