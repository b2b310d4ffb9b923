#!/usr/bin/env python
"""Gallery indexes at a million images: flat, HNSW and IVF-PQ, on this machine, in one run.

    python benchmarks/gallery_index.py                        # 1,000,000 vectors a set (long: see docs)
    python benchmarks/gallery_index.py --quick                # 20,000 vectors, 2,000 images for Beam
    python benchmarks/gallery_index.py --size 20000 --sets gmm --skip-beam
    python benchmarks/gallery_index.py --render-only          # rewrite the report from its .json

Two sets of L2-normalised 512-d vectors:

  css  the image embeddings of generated CSS scenes (keras_irtf.data.css_generator's grammar,
       drawn by css_scenes.render_2d, PNG-encoded) by an export's `embed_image` signature: a
       small-CNN TIRG trained on CSS for --train-steps steps with tools/train.py and exported with
       tools/export.py (kept in benchmarks/.cache/), or the export given with --model. The queries
       are composed queries: `serving_default` on held-out reference scenes, each with a
       modification text of the CSS grammar.
  gmm  a Gaussian mixture: --gmm-clusters centres uniform on the sphere, each point its centre
       plus isotropic noise of relative norm --gmm-spread, normalised. The queries are fresh
       draws from the same mixture.

The vectors are cached in benchmarks/.cache/gallery_index/ (git ignores it), so a rerun skips
generating them. For each set and each index kind, built through keras_irtf.index.ann
(build_index, then GalleryIndex.load of the folder it wrote, as a server would), the report
gives: build time (training and adding), the resident-memory growth of the build and of the
loaded index, the index file's size, single-query latency p50 / p99 (one query a call), batched
throughput (--batch queries a call) and recall@10 against exact search with ties counted
(ann.exact_topk, ann.recall_at_k) on --queries held-out queries. HNSW is swept over ef_search,
IVF-PQ over nprobe x refine, with set_search_params on one built index. The goal on this machine:
p50 <= 2 ms a query at recall@10 >= 0.99; the table marks the settings that reach it.

The Beam part times keras_irtf.index.pipeline (DirectRunner, 1 and 2 workers) against a plain
loop (read the file, embed_image in batches of 64) over the same --beam-images CSS PNGs.

Writes docs/gallery_index.json and docs/gallery_index.md (--out-json, --out-md).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "benchmarks"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

import _common as C  # noqa: E402

NAME = "gallery_index"
CACHE = REPO / "benchmarks" / ".cache" / NAME  # --cache
VECTORS_KIND = "gallery benchmark vectors"  # ownership markers (keras_irtf.safety) of the cache
MODEL_KIND = "gallery benchmark model"
SETS = ("css", "gmm")
GOAL_P50_MS, GOAL_RECALL = 2.0, 0.99
DIM = 512  # the gmm set's; the css set's is the export's embedding size
CHUNK = 4096  # CSS scenes a rendering task
QUERY_STREAM = 1  # the random stream of the held-out queries (the gallery's is 0)
QUERIES_ARE = {
    "css": "composed queries, `serving_default` on held-out reference scenes (of a random stream the gallery's "
           "scenes do not use), each with a modification text of the CSS grammar",
    "gmm": "fresh draws from the same mixture (not gallery rows)",
}


def log(message: str):
    print(f"[{NAME}] {message}", flush=True)


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


# ---- the cache ------------------------------------------------------------------------------------
def cached(folder: Path, description: dict):
    """(gallery, queries, meta) of a cache folder this script wrote for `description`, else None."""
    from keras_irtf.safety import owned_kind

    if owned_kind(folder) != VECTORS_KIND or not (folder / "meta.json").is_file():
        return None
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("description") != description:
        return None
    return np.load(folder / "gallery.npy"), np.load(folder / "queries.npy"), meta


def store(folder: Path, description: dict, gallery, queries, **meta):
    """Write a cache folder atomically (a marked temporary folder, then renamed into place)."""
    from keras_irtf.safety import mark_owned, remove_owned, replace_folder

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.partial-{os.getpid()}"
    remove_owned(tmp, VECTORS_KIND)  # left by a crashed run of a process with this pid
    mark_owned(tmp, VECTORS_KIND)
    np.save(tmp / "gallery.npy", gallery)
    np.save(tmp / "queries.npy", queries)
    (tmp / "meta.json").write_text(json.dumps({"description": description, **meta}, indent=2) + "\n")
    replace_folder(tmp, folder, VECTORS_KIND)


# ---- the gmm set ----------------------------------------------------------------------------------
def gmm_draw(centres, count, spread, rng):
    dim = centres.shape[1]
    out = np.empty((count, dim), np.float32)
    for start in range(0, count, 65536):
        m = min(65536, count - start)
        which = rng.integers(len(centres), size=m)
        noise = rng.standard_normal((m, dim), dtype=np.float32) * np.float32(spread / np.sqrt(dim))
        out[start:start + m] = normalise(centres[which] + noise)
    return out


def gmm_set(args):
    description = {"set": "gmm", "size": args.size, "queries": args.queries, "dim": DIM,
                   "clusters": args.gmm_clusters, "spread": args.gmm_spread, "seed": args.seed}
    folder = args.cache / f"gmm-{args.size}-c{args.gmm_clusters}-sp{args.gmm_spread:g}-q{args.queries}-s{args.seed}"
    hit = cached(folder, description)
    if hit is not None:
        return hit[0], hit[1], dict(hit[2], cached=True)
    start = time.perf_counter()
    centres = normalise(np.random.default_rng([args.seed, 2]).standard_normal((args.gmm_clusters, DIM)))
    gallery = gmm_draw(centres, args.size, args.gmm_spread, np.random.default_rng([args.seed, 0]))
    queries = gmm_draw(centres, args.queries, args.gmm_spread, np.random.default_rng([args.seed, QUERY_STREAM]))
    meta = {"generation_seconds": round(time.perf_counter() - start, 1)}
    store(folder, description, gallery, queries, **meta)
    return gallery, queries, dict(meta, description=description, cached=False)


# ---- the css set ----------------------------------------------------------------------------------
def png_bytes(pixels) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def css_scenes(seed: int, stream: int, chunk: int, count: int, with_text: bool = False):
    """`count` random CSS scenes (2 to 4 objects on the 3x3 grid, any shape-colour combination,
    jittered positions) of the random stream (seed, stream, chunk): their PNG bytes and, with
    `with_text`, a modification text of the CSS grammar for each."""
    from keras_irtf.data import css_generator as G
    from keras_irtf.data.css_scenes import render_2d

    rng = np.random.default_rng([seed, stream, chunk])
    writer = G._SceneWriter(rng)
    texts = []
    while len(writer.objects) < count:
        cells = rng.choice(9, size=int(rng.integers(2, 5)), replace=False)
        scene = {int(c): G._random_object(rng, lambda combination: True) for c in cells}
        if with_text:
            proposal = G._propose_mod(rng, scene)
            if proposal is None:
                continue
            texts.append(proposal[0])
        writer.add(scene)
    images = [png_bytes(render_2d(objects)) for objects in writer.objects]
    return (images, texts) if with_text else images


def _scene_chunk(task):
    return css_scenes(*task)


def ensure_model(args) -> Path:
    """The export the css set is embedded with: --model, or a small-CNN TIRG trained on CSS for
    --train-steps steps and exported, kept in the cache (trained once)."""
    if args.model:
        path = Path(args.model)
        if not (path / "saved_model.pb").is_file():
            raise SystemExit(f"error: --model {path} holds no saved_model.pb: pass an export version folder such as "
                             f"exported/<name>/1")
        return path
    from keras_irtf.safety import mark_owned, owned_kind, prepare_output_folder, remove_owned

    folder = args.cache / f"model-css-tirg-{args.train_steps}steps"
    export = folder / "exported" / "css_tirg" / "1"
    if owned_kind(folder) == MODEL_KIND and (export / "saved_model.pb").is_file():
        return export
    if owned_kind(folder) == MODEL_KIND:
        remove_owned(folder, MODEL_KIND)  # a training this script started and that did not finish
    prepare_output_folder(folder, MODEL_KIND, hint="move it away")
    mark_owned(folder, MODEL_KIND, steps=args.train_steps)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    train = [sys.executable, "tools/train.py", "--config", "configs/css.yaml", "--steps", str(args.train_steps),
             "--out", str(folder / "run"), "--quiet"]
    export_cmd = [sys.executable, "tools/export.py", "--run", str(folder / "run"), "--out", str(folder / "exported"),
                  "--name", "css_tirg", "--version", "1", "--quiet"]
    for what, cmd in (("training", train), ("exporting", export_cmd)):
        log(f"css: {what} the model: {' '.join(cmd[1:])}")
        start = time.perf_counter()
        proc = subprocess_run(cmd, env)
        if proc.returncode != 0:
            raise SystemExit(f"error: {what} the css model failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        log(f"css: {what} took {time.perf_counter() - start:.0f} s")
    return export


def subprocess_run(cmd, env):
    return subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True)


def load_signatures(export: Path):
    from keras_irtf import cli

    cli.start_tensorflow()
    from keras_irtf.serving.reader import load_export

    module = load_export(export)
    return module.signatures["embed_image"], module.signatures["serving_default"]


def embed_batches(embed_image, images, batch: int) -> np.ndarray:
    import tensorflow as tf

    out = [embed_image(image_bytes=tf.constant(images[i:i + batch]))["embedding"].numpy()
           for i in range(0, len(images), batch)]
    return np.concatenate(out).astype(np.float32)


def _embed_css(export: str, size: int, queries: int, seed: int, workers: int, batch: int, result_file: str):
    """Run in a child process (TensorFlow stays out of the measuring process): render the
    gallery's scenes in `workers` processes while this one embeds them, then the queries."""
    embed_image, serving_default = load_signatures(Path(export))
    import tensorflow as tf

    started = time.perf_counter()
    tasks = [(seed, 0, c, min(CHUNK, size - c * CHUNK)) for c in range((size + CHUNK - 1) // CHUNK)]
    done, next_report = 0, 0.1
    parts = []
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(max(1, workers)) as pool:
        for images in pool.imap(_scene_chunk, tasks):
            parts.append(embed_batches(embed_image, images, batch))
            done += len(images)
            if done >= next_report * size or done == size:
                rate = done / (time.perf_counter() - started)
                log(f"css: {done:,} / {size:,} scenes rendered and embedded ({rate:,.0f} a second)")
                next_report += 0.1
    gallery = np.concatenate(parts)
    del parts
    images, texts = css_scenes(seed, QUERY_STREAM, 0, queries, with_text=True)
    q = []
    for i in range(0, queries, batch):
        q.append(serving_default(image_bytes=tf.constant(images[i:i + batch]),
                                 text=tf.constant(texts[i:i + batch]))["embedding"].numpy())
    q = np.concatenate(q).astype(np.float32)
    norms = np.linalg.norm(gallery, axis=1)
    np.save(result_file + ".gallery.npy", normalise(gallery))
    np.save(result_file + ".queries.npy", normalise(q))
    Path(result_file).write_text(json.dumps({
        "generation_seconds": round(time.perf_counter() - started, 1),
        "embedded_norm_range": [round(float(norms.min()), 4), round(float(norms.max()), 4)],
        "query_examples": texts[:3]}))


def css_set(args):
    export = ensure_model(args)
    from keras_irtf.utils import file_sha256

    # the SavedModel's fingerprint file names the model (read without loading TensorFlow here)
    model_key = file_sha256(export / "fingerprint.pb") if (export / "fingerprint.pb").is_file() else \
        file_sha256(export / "saved_model.pb")
    description = {"set": "css", "size": args.size, "queries": args.queries, "seed": args.seed,
                   "export_sha256": model_key}
    folder = args.cache / f"css-{args.size}-q{args.queries}-s{args.seed}-m{model_key[:10]}"
    hit = cached(folder, description)
    if hit is not None:
        return hit[0], hit[1], dict(hit[2], cached=True)
    with tempfile.TemporaryDirectory(prefix="gallery_index_css_") as tmp:
        result = str(Path(tmp) / "css")
        ctx = multiprocessing.get_context("spawn")
        child = ctx.Process(target=_embed_css, args=(str(export), args.size, args.queries, args.seed, args.workers,
                                                     args.embed_batch, result))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"error: embedding the css scenes failed (exit {child.exitcode}); see the lines above")
        gallery, queries = np.load(result + ".gallery.npy"), np.load(result + ".queries.npy")
        produced = json.loads(Path(result).read_text())
    meta = {**produced, "export": str(export.resolve()), "train_steps": None if args.model else args.train_steps}
    store(folder, description, gallery, queries, **meta)
    return gallery, queries, dict(meta, description=description, cached=False)


# ---- measuring one index --------------------------------------------------------------------------
def latency(index, queries, k, count, budget):
    """Seconds of each single-query search (one query a call) over up to `count` queries, or as
    many as fit in `budget` seconds (at least 50), after 10 warm-up calls."""
    for q in queries[:10]:
        index.search(q[None], k)
    times, spent = [], 0.0
    for q in queries[:count]:
        start = time.perf_counter()
        index.search(q[None], k)
        times.append(time.perf_counter() - start)
        spent += times[-1]
        if spent > budget and len(times) >= 50:
            break
    return np.asarray(times)


def batched(index, queries, k, batch, budget):
    """Queries a second searching all `queries` in calls of `batch` (the median of up to 3
    passes, fewer when a pass takes over budget / 3 seconds) and the rows of the last pass."""
    passes = []
    while True:
        start = time.perf_counter()
        rows = np.concatenate([index.search(queries[i:i + batch], k)[1] for i in range(0, len(queries), batch)])
        passes.append(time.perf_counter() - start)
        if len(passes) >= 3 or sum(passes) > budget:
            break
    return len(queries) / float(np.median(passes)), rows


def sweep(kind, args):
    if kind == "hnsw":
        return [{"ef_search": int(e)} for e in args.ef_search.split(",")]
    if kind == "ivfpq":
        return [{"nprobe": int(n), "refine": int(r)} for n in args.nprobe.split(",") for r in args.refine.split(",")]
    return [{}]


def build_params(kind, args) -> dict:
    params = {}
    for item in args.param:
        key, _, value = item.partition("=")
        k, _, name = key.partition(".")
        if k == kind:
            params[name] = value
    return params


def measure_kind(kind, gallery, queries, exact_scores, args, workdir: Path, flat_p50=None) -> dict:
    from keras_irtf.index.ann import GalleryIndex, build_index, recall_at_k

    load_before = load1()
    ids = [f"scene_{i:07d}" for i in range(len(gallery))]
    gc.collect()
    rss0 = C.rss_mb()["rss_mb"]
    start = time.perf_counter()
    built = build_index(gallery, ids, workdir / kind, fingerprint={"saved_model_checksum": "benchmark"}, kind=kind,
                        params=build_params(kind, args), holdout=0, seed=args.seed)
    wall = time.perf_counter() - start
    rss_built = C.rss_mb()["rss_mb"] - rss0
    manifest = built.manifest
    del built
    gc.collect()
    rss1 = C.rss_mb()["rss_mb"]
    start = time.perf_counter()
    index = GalleryIndex.load(workdir / kind)
    load_seconds = time.perf_counter() - start
    rss_loaded = C.rss_mb()["rss_mb"] - rss1
    log(f"{kind}: built in {manifest['build_seconds']:.1f} s ({wall:.1f} s with writing), loaded in "
        f"{load_seconds:.1f} s, file {manifest['files']['index.faiss']['bytes'] / 1e6:,.0f} MB")
    settings = []
    for search in sweep(kind, args):
        if search:
            index.set_search_params(**search)
        times = latency(index, queries, args.k, args.latency_queries, args.latency_budget) * 1000
        qps, rows = batched(index, queries, args.k, args.batch, args.latency_budget)
        recall = recall_at_k(gallery, queries, rows, exact_scores, args.k)
        p50, p99 = float(np.percentile(times, 50)), float(np.percentile(times, 99))
        row = {"search_params": search, "p50_ms": round(p50, 4), "p99_ms": round(p99, 4),
               "latency_queries": int(len(times)), "batch_qps": round(qps, 1), "recall_at_10": round(recall, 4),
               "meets_goal": bool(p50 <= GOAL_P50_MS and recall >= GOAL_RECALL)}
        if flat_p50:
            row["speedup_vs_flat_p50"] = round(flat_p50 / p50, 2)
        settings.append(row)
        label = " ".join(f"{k}={v}" for k, v in search.items()) or "exact"
        log(f"{kind} {label}: p50 {p50:.3f} ms, p99 {p99:.3f} ms, {qps:,.0f} queries/s batched, "
            f"recall@{args.k} {recall:.4f}{'  (goal reached)' if row['meets_goal'] else ''}")
    del index
    gc.collect()
    shutil.rmtree(workdir / kind)  # owned: the index folder build_index wrote in this run's temporary folder
    return {"kind": kind, "build_params": manifest["params"], "build_seconds": manifest["build_seconds"],
            "build_wall_seconds": round(wall, 2), "load_seconds": round(load_seconds, 2),
            "rss_growth_build_mb": round(rss_built, 1), "rss_growth_loaded_mb": round(rss_loaded, 1),
            "index_file_bytes": manifest["files"]["index.faiss"]["bytes"],
            "load_before": load_before, "load_after": load1(), "settings": settings}


def measure_set(name, args) -> dict:
    from keras_irtf.index.ann import exact_topk

    part = {"load_before_generation": load1()}
    log(f"{name}: {args.size:,} vectors (from the cache when it holds them)")
    gallery, queries, meta = (css_set if name == "css" else gmm_set)(args)
    part.update(load_after_generation=load1(), size=len(gallery), dim=int(gallery.shape[1]),
                queries=len(queries), **meta)
    part["queries_are"] = QUERIES_ARE[name]
    log(f"{name}: {'read from the cache' if meta['cached'] else 'generated in %.0f s' % meta['generation_seconds']}")
    start = time.perf_counter()
    exact_scores, _ = exact_topk(gallery, queries, args.k)
    part["exact_seconds"] = round(time.perf_counter() - start, 2)
    log(f"{name}: exact top-{args.k} of {len(queries):,} queries in {part['exact_seconds']:.1f} s (numpy)")
    part["kinds"] = []
    flat_p50 = None
    with tempfile.TemporaryDirectory(prefix="gallery_index_", dir=args.tmp) as tmp:
        for kind in args.kinds.split(","):
            result = measure_kind(kind, gallery, queries, exact_scores, args, Path(tmp), flat_p50)
            if kind == "flat":
                flat_p50 = result["settings"][0]["p50_ms"]
            part["kinds"].append(result)
    return part


# ---- the Beam pipeline against a plain loop -------------------------------------------------------
BEAM_VARIANTS = (("beam, 1 worker", ["--direct_num_workers", "1"]),
                 ("beam, 2 workers", ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]))
LOOP_BATCH = 64


def _write_pngs(folder: Path, count: int, seed: int, workers: int) -> list:
    tasks = [(seed, 2, c, min(CHUNK, count - c * CHUNK)) for c in range((count + CHUNK - 1) // CHUNK)]
    names = []
    with multiprocessing.get_context("spawn").Pool(max(1, workers)) as pool:
        for c, images in enumerate(pool.imap(_scene_chunk, tasks)):
            sub = folder / f"part{c:03d}"
            sub.mkdir()
            for i, data in enumerate(images):
                (sub / f"scene_{i:05d}.png").write_bytes(data)
                names.append(f"part{c:03d}/scene_{i:05d}.png")
    return names


def _beam_child(export: str, count: int, seed: int, workers: int, tmp: str, result_file: str):
    """Run in a child process: write `count` CSS PNGs, then embed them with a plain loop and
    with the Beam pipeline (each variant into a new folder), and compare the embeddings."""
    from keras_irtf import cli

    cli.start_tensorflow()  # quietly, before the pipeline's modules import it
    from keras_irtf.index.embeddings import EmbeddingStore
    from keras_irtf.index.pipeline import embed_gallery, quiet_beam_log

    tmp = Path(tmp)
    images = tmp / "images"
    images.mkdir()
    start = time.perf_counter()
    names = _write_pngs(images, count, seed, workers)
    log(f"beam: wrote {len(names):,} CSS PNGs in {time.perf_counter() - start:.0f} s")
    rows = []
    load_before = load1()
    start = time.perf_counter()
    embed_image, _ = load_signatures(Path(export))
    loaded = time.perf_counter() - start
    import tensorflow as tf

    vectors = []
    for i in range(0, len(names), LOOP_BATCH):
        raw = [(images / n).read_bytes() for n in names[i:i + LOOP_BATCH]]
        vectors.append(embed_image(image_bytes=tf.constant(raw))["embedding"].numpy())
    seconds = time.perf_counter() - start
    loop = normalise(np.concatenate(vectors))
    rows.append({"variant": "plain loop", "images": len(names), "seconds": round(seconds, 2),
                 "model_load_seconds": round(loaded, 2), "load_before": load_before, "load_after": load1()})
    log(f"beam: plain loop {len(names) / seconds:,.0f} images/s")
    quiet_beam_log()
    for variant, flags in BEAM_VARIANTS:
        out = tmp / variant.replace(",", "").replace(" ", "_")
        load_before = load1()
        start = time.perf_counter()
        summary = embed_gallery(export, str(images), out, batch_size=LOOP_BATCH, beam_args=flags)
        seconds = time.perf_counter() - start
        ids, emb = EmbeddingStore(out).read_all()
        row_of = {n: r for r, n in enumerate(names)}
        order = np.asarray([row_of[i] for i in ids])
        rows.append({"variant": variant, "flags": " ".join(flags), "images": int(summary.new), "dead": int(summary.dead),
                     "seconds": round(seconds, 2), "load_before": load_before, "load_after": load1(),
                     "max_abs_difference_to_loop": float(np.abs(emb - loop[order]).max())})
        log(f"beam: {variant}: {summary.new / seconds:,.0f} images/s ({summary.dead} dead-lettered)")
    for row in rows:
        row["images_per_second"] = round(row["images"] / row["seconds"], 1)
        row["vs_loop"] = round(row["images_per_second"] / rows[0]["images_per_second"], 3)
    Path(result_file).write_text(json.dumps(rows))


def measure_beam(args) -> dict:
    if importlib.util.find_spec("keras_irtf.index.pipeline") is None:
        return {"skipped": "keras_irtf.index.pipeline (the Beam embedding pipeline) is not in this checkout"}
    if importlib.util.find_spec("apache_beam") is None:
        return {"skipped": "apache_beam is not installed (pip install -e '.[beam]')"}
    export = ensure_model(args)
    log(f"beam: {args.beam_images:,} CSS PNGs: a plain loop, then tools/index.py's pipeline (DirectRunner)")
    with tempfile.TemporaryDirectory(prefix="gallery_index_beam_", dir=args.tmp) as tmp:
        result = Path(tmp) / "result.json"
        child = multiprocessing.get_context("spawn").Process(
            target=_beam_child, args=(str(export), args.beam_images, args.seed, args.workers, tmp, str(result)))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"error: the Beam comparison failed (exit {child.exitcode}); see the lines above")
        rows = json.loads(result.read_text())
    return {"rows": rows, "export": str(export.resolve()),
            "what": (f"{args.beam_images:,} generated CSS PNGs in a folder, embedded by the export's `embed_image` "
                     f"in batches of {LOOP_BATCH}: the plain loop reads each file and calls the signature (its time "
                     f"includes loading the export); the pipeline is `keras_irtf.index.pipeline.embed_gallery` "
                     f"(tools/index.py without the index build) on the DirectRunner, into a new folder each time "
                     f"(start-up, checks, shards and dead letters included). Its embeddings are compared with the "
                     f"loop's (`max_abs_difference_to_loop` in the .json).")}


# ---- the report -----------------------------------------------------------------------------------
def label(search: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in search.items()) or "exact"


def build_label(kind: str, params: dict) -> str:
    """The build-time parameters (the search-time ones are the sweep's column)."""
    from keras_irtf.index.ann import SEARCH_PARAMS

    shown = {k: v for k, v in params.items() if k not in SEARCH_PARAMS[kind]}
    if kind == "ivfpq":
        shown["full vectors kept"] = "yes" if params.get("refine") else "no"
    return ", ".join(f"{k} {v}" for k, v in shown.items()) or "-"


def reaching(part) -> list:
    """(kind, setting) pairs that meet the goal, fastest p50 first."""
    found = [(k["kind"], s) for k in part["kinds"] for s in k["settings"] if s["meets_goal"]]
    return sorted(found, key=lambda ks: ks[1]["p50_ms"])


def summary_lines(results) -> list:
    lines = []
    for name, part in results["sets"].items():
        good = reaching(part)
        head = f"{name} ({part['size']:,} vectors)"
        if good:
            kind, s = good[0]
            lines.append(f"{head}: goal reached by {len(good)} setting(s); fastest {kind} {label(s['search_params'])}: "
                         f"p50 {s['p50_ms']:.3f} ms, recall@10 {s['recall_at_10']:.4f}")
        else:
            ok = [(k["kind"], s) for k in part["kinds"] for s in k["settings"] if s["p50_ms"] <= GOAL_P50_MS]
            best = max(ok, key=lambda ks: ks[1]["recall_at_10"], default=None)
            lines.append(f"{head}: goal not reached" + (
                f"; best recall@10 within {GOAL_P50_MS:g} ms: {best[0]} {label(best[1]['search_params'])} "
                f"{best[1]['recall_at_10']:.4f}" if best else ""))
    beam = results.get("beam") or {}
    if "skipped" in beam:
        lines.append(f"beam: not measured ({beam['skipped']})")
    else:
        for row in beam.get("rows", []):
            lines.append(f"{row['variant']}: {row['images_per_second']:,.0f} images/s "
                         f"({row['vs_loop']:.2f}x the plain loop)")
    return lines


def shown_path(path) -> str:
    path = Path(path)
    try:
        return path.relative_to(REPO).as_posix()
    except ValueError:
        return str(path)


def write_report(path: Path, results: dict):
    lines = [f"# Gallery indexes: flat, HNSW and IVF-PQ at {results['size']:,} vectors", "",
             f"Command: `{results['command']}` ({results['date']}, {results['total_minutes']:.0f} min)", "",
             C.machine_markdown(results["machine"]), "",
             f"Goal on this machine: a single query answered in p50 <= {GOAL_P50_MS:g} ms at recall@10 >= "
             f"{GOAL_RECALL:g} against exact search. faiss {results['faiss']} with {results['omp_threads']} OpenMP "
             f"thread(s) ({'set with --omp-threads' if results.get('omp_threads_set') else 'its default'}; a batched "
             f"search spreads its queries over them; a flat or IVF-PQ single query may too, which costs it dearly "
             f"when other work holds the cores: see the load averages); OMP_WAIT_POLICY "
             f"{results.get('omp_wait_policy', 'unset')}.",
             "", "## Method", "",
             f"- Each index is built with `keras_irtf.index.ann.build_index` (library defaults unless the build "
             f"column says otherwise), written, then read back with `GalleryIndex.load` and searched as a server "
             f"would; HNSW's `ef_search` and IVF-PQ's `nprobe` and `refine` are swept with `set_search_params` on "
             f"that one index.",
             "- build: training and adding (the manifest's build_seconds); RSS: growth of this process's resident "
             "memory over the build (with the vectors already in memory) and over loading the written index; "
             "file: the size of index.faiss.",
             f"- p50 / p99: one query a call, over {results['latency_queries']:,} queries after 10 warm-up calls (or "
             f"those that fit in {results['latency_budget']:g} s, at least 50: the count is in the .json); "
             f"vs flat: flat's p50 over this p50, in this run.",
             f"- batch q/s: all {results['queries']:,} queries searched in calls of {results['batch']:,} (median of "
             f"up to 3 passes).",
             f"- recall@10: against `ann.exact_topk` (numpy) of the same queries, ties counted "
             f"(`ann.recall_at_k`: a returned row scoring at least the exact 10th score is a hit).", ""]
    for name, part in results["sets"].items():
        d = part["description"]
        if name == "css":
            what = (f"The `embed_image` embeddings of {part['size']:,} generated CSS scenes (seed {d['seed']}) by "
                    f"the export `{shown_path(part['export'])}` of "
                    + (f"a small-CNN TIRG trained {part['train_steps']} steps on CSS `small`" if part.get('train_steps')
                       else "the model given with --model") + f". Queries: {QUERIES_ARE[name]}.")
        else:
            what = (f"A Gaussian mixture of {d['clusters']:,} clusters (centres uniform on the sphere, noise of "
                    f"relative norm {d['spread']:g}, seed {d['seed']}), normalised. Queries: {QUERIES_ARE[name]}.")
        lines += [f"## {name}: {part['size']:,} x {part['dim']}", "", what, "",
                  f"Vectors {'read from the cache' if part['cached'] else 'generated in %s s' % part['generation_seconds']}; "
                  f"exact search of the {part['queries']:,} queries {part['exact_seconds']:.1f} s. 1-minute load "
                  f"before / after generation {part['load_before_generation']} / {part['load_after_generation']}; "
                  "per kind: " + ", ".join(f"{k['kind']} {k['load_before']} / {k['load_after']}" for k in part["kinds"])
                  + ".", "",
                  "| kind | build | search | build (s) | RSS build / loaded (MB) | file (MB) | p50 (ms) | p99 (ms) | "
                  "vs flat | batch q/s | recall@10 | goal |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for k in part["kinds"]:
            for i, s in enumerate(k["settings"]):
                first = i == 0
                lines.append(
                    f"| {k['kind'] if first else ''} | {build_label(k['kind'], k['build_params']) if first else ''} | "
                    f"{label(s['search_params'])} | {C.fmt(k['build_seconds'], 1) if first else ''} | "
                    + (f"{k['rss_growth_build_mb']:,.0f} / {k['rss_growth_loaded_mb']:,.0f} | "
                       f"{k['index_file_bytes'] / 1e6:,.1f} | " if first else "| | ")
                    + f"{s['p50_ms']:.3f} | {s['p99_ms']:.3f} | "
                    f"{'%.1fx' % s['speedup_vs_flat_p50'] if 'speedup_vs_flat_p50' in s else ''} | "
                    f"{s['batch_qps']:,.0f} | {s['recall_at_10']:.4f} | {'**yes**' if s['meets_goal'] else 'no'} |")
        lines.append("")
    beam = results.get("beam") or {}
    lines += ["## Beam embedding pipeline against a plain loop", ""]
    if "skipped" in beam:
        lines.append(f"Not measured: {beam['skipped']}.")
    else:
        lines += [beam.get("what", ""), "",
                  "| variant | Beam flags | images | seconds | images/s | vs plain loop | load before / after |",
                  "|---|---|---|---|---|---|---|"]
        for row in beam["rows"]:
            lines.append(f"| {row['variant']} | {'`%s`' % row['flags'] if row.get('flags') else ''} | "
                         f"{row['images']:,} | {row['seconds']:.1f} | {row['images_per_second']:,.0f} | "
                         f"{row['vs_loop']:.2f}x | {row['load_before']} / {row['load_after']} |")
    lines += ["", "## Summary", ""] + [f"- {ln}" for ln in summary_lines(results)]
    C.write_doc(NAME, "\n".join(lines) + "\n", path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1_000_000, help="vectors a set (default 1,000,000)")
    p.add_argument("--sets", default="css,gmm", help="comma-separated: css, gmm")
    p.add_argument("--kinds", default="flat,hnsw,ivfpq", help="comma-separated index kinds")
    p.add_argument("--queries", type=int, default=1000, help="held-out queries (recall, latency, batches)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch", type=int, default=1000, help="queries a call in the batched search")
    p.add_argument("--latency-queries", type=int, default=1000, help="single-query calls timed per setting")
    p.add_argument("--latency-budget", type=float, default=30.0,
                   help="seconds at most for one setting's single-query calls (at least 50 are timed)")
    p.add_argument("--ef-search", default="16,32,64,128,256", help="HNSW ef_search values swept")
    p.add_argument("--nprobe", default="8,16,32,64,128", help="IVF-PQ nprobe values swept")
    p.add_argument("--refine", default="1,10,50", help="IVF-PQ refine values swept (x k re-ranked exactly)")
    p.add_argument("--param", action="append", default=[], metavar="KIND.KEY=VALUE",
                   help="a build parameter other than the library default, e.g. hnsw.M=48 (repeatable)")
    p.add_argument("--omp-threads", type=int, default=0,
                   help="faiss's OpenMP threads (default 0: faiss's own default, one a logical CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gmm-clusters", type=int, default=1000)
    p.add_argument("--gmm-spread", type=float, default=0.5, help="noise norm relative to the centre's")
    p.add_argument("--model", help="an export version folder to embed the css set with (default: train one)")
    p.add_argument("--train-steps", type=int, default=600, help="training steps of the css model (default 600)")
    p.add_argument("--workers", type=int, default=2, help="processes rendering CSS scenes")
    p.add_argument("--embed-batch", type=int, default=256, help="images an embed_image call (css set)")
    p.add_argument("--skip-beam", action="store_true", help="leave out the Beam pipeline's timing")
    p.add_argument("--beam-images", type=int, default=20_000, help="CSS PNGs the Beam part embeds")
    p.add_argument("--cache", type=Path, default=CACHE, help="folder of the generated vectors and the css model "
                   "(default benchmarks/.cache/gallery_index; git ignores it)")
    p.add_argument("--tmp", help="folder for the temporary index files (default: the system's)")
    p.add_argument("--quick", action="store_true", help="--size 20000 --beam-images 2000")
    p.add_argument("--out-json", help="default docs/gallery_index.json")
    p.add_argument("--out-md", help="default docs/gallery_index.md")
    p.add_argument("--render-only", action="store_true", help="rewrite the .md from the .json of an earlier run")
    args = p.parse_args(argv)
    from keras_irtf import cli

    cli.start_tensorflow()  # keras_irtf.index.ann imports it: quietly, as the tools do
    md = Path(args.out_md) if args.out_md else C.DOCS / f"{NAME}.md"
    js = Path(args.out_json) if args.out_json else md.with_suffix(".json")
    if args.render_only:
        results = json.loads(js.read_text())
        write_report(md, results)
        C.print_summary(NAME, summary_lines(results))
        return 0
    if args.quick:
        args.size, args.beam_images = 20_000, 2_000
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [s for s in sets if s not in SETS]
    if unknown:
        p.error(f"--sets: unknown set {unknown[0]!r}; expected some of {list(SETS)}")
    from keras_irtf.index.ann import KINDS
    from keras_irtf.utils import optional_import

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or any(k not in KINDS for k in kinds):
        p.error(f"--kinds: expected some of {list(KINDS)}, got {args.kinds!r}")
    args.kinds = ",".join(kinds)
    faiss = optional_import("faiss", "faiss", "benchmarks/gallery_index.py")
    if args.omp_threads:
        faiss.omp_set_num_threads(args.omp_threads)
    started = time.time()
    results = {"name": NAME, "command": C.command_line(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "machine": C.machine_info(), "faiss": getattr(faiss, "__version__", "unknown"),
               "omp_threads": int(faiss.omp_get_max_threads()), "omp_threads_set": bool(args.omp_threads),
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (libgomp: spin, then sleep)"),
               "size": args.size, "k": args.k,
               "queries": args.queries, "batch": args.batch, "latency_queries": args.latency_queries,
               "latency_budget": args.latency_budget, "goal": {"p50_ms": GOAL_P50_MS, "recall_at_10": GOAL_RECALL},
               "sets": {}}
    for name in sets:
        results["sets"][name] = measure_set(name, args)
    if args.skip_beam:
        results["beam"] = {"skipped": "--skip-beam"}
    else:
        results["beam"] = measure_beam(args)
    results["total_minutes"] = round((time.time() - started) / 60, 1)
    js.parent.mkdir(parents=True, exist_ok=True)
    js.write_text(json.dumps(results, indent=2) + "\n")
    write_report(md, results)
    C.print_summary(NAME, summary_lines(results))
    log(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
