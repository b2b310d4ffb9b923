#!/usr/bin/env python
"""Try an exported model in the browser: a web page and TF Serving's REST API over one export.

    python tools/demo.py --model exported/css_tirg_s0/1                # http://127.0.0.1:8080/
    python tools/demo.py --model exported/css_tirg_s0/1 --port 0       # any free port (printed)
    python tools/demo.py --model exported/css_tirg_s0/1 --gallery data/my_gallery --queries q.jsonl

The export must have been made with --gallery (the `retrieve` endpoint) for the page's search;
--gallery (or the folder the export recorded) must hold the very images the export embedded
(checked by sha256 at start, as tools/query.py does), and only files inside it are served;
the REST API serves every signature either way: POST /v1/models/<name>:predict (its answers are
the SavedModel's own; the page shows each result's cosine similarity, and searches an uploaded
file byte-identical to a gallery image as that image's query). The model is
loaded with tf.saved_model.load only (no keras). Binds to 127.0.0.1 unless --host says otherwise:
the demo has no authentication, so only bind to another address on a network you trust.
Needs the demo extra: pip install -e '.[demo]'.

With --index, the gallery is a gallery index built for this very export by tools/index.py (an
index of another export is refused at start): the export embeds the query (serving_default), the
index finds its neighbours, and the page and the REST API's `retrieve` answer from it, in the same
format, with cosine similarities as scores; the images are served from the index's images
folder only (an index built from TFRecords has none and is refused). Needs the faiss extra too:

    python tools/demo.py --model exported/css_tirg_s0/1 --index indexes/css
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="export version folder, e.g. exported/<name>/<version>")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 = any free port)")
    p.add_argument("--name", help="model name in the REST URLs (default: the export's folder name)")
    p.add_argument("--gallery", help="folder of the gallery images, if not where the export recorded it")
    p.add_argument("--index", metavar="DIR",
                   help="a gallery index built by tools/index.py for this export (e.g. indexes/<name>): the "
                        "gallery is the index's, its images those of the index's images folder")
    p.add_argument("--queries", help="known queries for the ground-truth marker: a queries or triplets .jsonl "
                                     "file, or a CSS, FashionIQ, CIRR or triplets dataset folder (or a file in "
                                     "it, such as a caption file) (default: found next to the export or the "
                                     "gallery)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest uploaded image (default 10)")
    p.add_argument("--max-megapixels", type=float, default=40.0, help="most pixels of an image (default 40)")
    p.add_argument("--max-request-mb", type=float, default=32.0, help="largest request body (default 32)")
    p.add_argument("--max-instances", type=int, default=64, help="most queries in one predict request (default 64)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:  # Ctrl-C while loading or serving: uvicorn has closed its connections
        print("keras_irtf demo: stopped (Ctrl-C)", file=sys.stderr, flush=True)
        return 130


def run(args):
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from keras_irtf.cli import start_tensorflow

    start_tensorflow(verbose=args.log_level == "debug")  # without its C++ start-up lines (kept with debug)
    try:
        from keras_irtf.demo import DemoError, Limits, build_app, missing_extra, serve
    except ImportError as e:
        print(f"error: the demo cannot start: {e}", file=sys.stderr)
        return 2
    problem = missing_extra()  # before the (slow) model load
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        limits = Limits(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
                        max_pixels=int(args.max_megapixels * 1e6),
                        max_request_bytes=int(args.max_request_mb * 1024 * 1024),
                        max_instances=args.max_instances)
        # a damaged export, or a --gallery other than the embedded one, is a one-line error
        app = build_app(args.model, gallery=args.gallery, queries=args.queries, limits=limits, name=args.name,
                        index=args.index)
    except (DemoError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    demo = app.state.demo
    model = demo.model
    print(f"loaded {model.path} in {model.load_seconds:.1f} s (+{model.warm_up_seconds:.1f} s warm-up): "
          f"model {model.name!r} version {model.version}, signatures {', '.join(sorted(model.signatures))}, "
          f"gallery of {model.gallery_size} images", flush=True)
    index = getattr(model, "index", None)
    if index is not None:
        recall = (index.manifest.get("holdout") or {}).get("recall_at_10")
        print(f"gallery index {index.folder}: {index.kind}, {index.size} images under {model.gallery_root}"
              + (f", recall@10 {recall:.4f} against exact search when built" if recall is not None else "")
              + "; scores are cosine similarities", flush=True)
    if model.gallery_size and not model.gallery_files_present:
        print(f"warning: the gallery images are not under {model.gallery_root}: thumbnails and gallery picks "
              f"will fail; " + ("pass --gallery DIR" if index is None else "rebuild the index where its images are"),
              file=sys.stderr, flush=True)
    if not model.has_retrieve:
        print("warning: the export has no retrieve endpoint (exported without --gallery): the page cannot "
              "search; the REST API still serves serving_default and embed_image", file=sys.stderr, flush=True)
    gt = demo.ground_truth
    print(f"ground truth: {gt.source} ({len(gt)} known queries)" if gt is not None else
          "ground truth: none found (see --queries)", flush=True)
    scores = demo.cosine.describe()
    print(f"scores on the page: {scores['text']}", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding to {args.host}: the demo has no authentication; anyone who can reach this "
              f"address can query the model", file=sys.stderr, flush=True)

    def ready(url):
        print(f"keras_irtf demo: serving on {url} (REST: {url}v1/models/{model.name}:predict); Ctrl-C stops",
              flush=True)

    try:
        serve(app, host=args.host, port=args.port, log_level=args.log_level, on_ready=ready)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
