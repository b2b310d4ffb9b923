#!/usr/bin/env python
"""Query an exported model and draw the qualitative figure of the paper: the query image and
text, then the top results with their scores, the ground-truth target framed in green.

    python tools/query.py --model exported/css_tirg_s0/1 --image q.png --text "make it red" \\
        --gallery data/gallery --top 10 [--target data/gallery/t.png] [--out queries/red]

Writes the figure (grid.png) and the ranking (results.json) into a folder of their own: --out,
by default queries/<image name>_<text> under the working folder, and prints the ranking and
where it wrote. The folder must be new or empty, or one tools/query.py wrote before (it is
replaced); anything else there is refused, never overwritten.

Needs only TensorFlow, Pillow and PyYAML (the SavedModel decodes the images and reads the
text), plus tensorflow-text for an export whose text encoder tokenises with it (CLIP, SigLIP,
BERT): the export records the op libraries it needs and they are loaded first
(docs/serving.md). With an export made with --gallery over the same folder, the ranking runs in
the graph (`retrieve`); otherwise the gallery is embedded with `embed_image` first. The query
image is left out of the results when it is a gallery file (--keep-query to keep it).

With --index instead of --gallery, the neighbours come from a gallery index built for this very
export by tools/index.py (an index of another export is refused): only the query is embedded,
its scores are cosine similarities, and the results are shown from the index's images folder
(a file that leads out of it is refused). --gallery may be given too only when it is that folder.

    python tools/query.py --model exported/css_tirg_s0/1 --image q.png --text "make it red" --index indexes/css

With --json, standard output is one JSON object (the query and its ranked results, what
results.json holds) and nothing else, and nothing is written unless --out is given:

    python tools/query.py --model ... --image q.png --text "make it red" --gallery data/gallery --json
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None):
    from keras_irtf import cli

    cli.preparse(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common(p)
    p.add_argument("--model", required=True, help="export version folder, e.g. exported/<name>/<version>")
    p.add_argument("--image", required=True, help="query image (JPEG/PNG/GIF/BMP)")
    p.add_argument("--text", required=True, help="modification text")
    p.add_argument("--gallery", help="folder of gallery images (recursive)")
    p.add_argument("--index", metavar="DIR",
                   help="a gallery index built by tools/index.py for this export (e.g. indexes/<name>): the "
                        "neighbours come from it, the images from its images folder (instead of --gallery)")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--out", metavar="DIR",
                   help="folder for the figure (grid.png) and the ranking (results.json): new, empty or one this tool "
                        "wrote (default queries/<image name>_<text>; nothing is written with --json unless given)")
    p.add_argument("--target", action="append", default=[],
                   help="ground-truth image (a gallery file; repeatable): framed when retrieved")
    p.add_argument("--keep-query", action="store_true", help="do not drop the query image from the results")
    p.add_argument("--thumb", type=int, default=128, help="thumbnail size in pixels")
    p.add_argument("--json", action="store_true",
                   help="print the ranked results as one JSON object on standard output (and nothing else)")
    args = p.parse_args(argv)
    if args.top < 1:
        p.error("--top must be >= 1")
    if args.gallery is None and args.index is None:
        p.error("give --gallery DIR (a folder of images) or --index DIR (a gallery index built by tools/index.py)")

    from keras_irtf.serving.reader import ExportError, file_sha256, gallery_file
    from keras_irtf.image_limits import ImageTooLarge
    from keras_irtf.safety import NotOwnedError
    from keras_irtf.index.ann import GalleryIndexError
    from keras_irtf.serving.query import (FIGURE_NAME, RANKING_NAME, RESULTS_ROOT, ExportedModel, QueryError,
                                          check_results_folder, draw_results, results_folder_name, save_results,
                                          search, search_index)

    out = None
    if args.out is not None or not args.json:
        out = Path(args.out) if args.out is not None else Path(RESULTS_ROOT) / results_folder_name(args.image, args.text)
        try:
            check_results_folder(out)  # before the model loads: a folder of someone else's is refused
        except NotOwnedError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    index = None
    if args.index is not None:
        try:
            index = open_index(args.index, args.model, args.gallery, needs_images=out is not None)
        except (ValueError, ImportError) as e:  # GalleryIndexError; MissingExtra names the faiss extra
            print(f"error: {e}", file=sys.stderr)
            return 2
    gallery = Path(args.gallery) if index is None else index.images_root
    targets = []
    for t in args.target:
        t = Path(t)
        if gallery is None:  # an index without images: results are ids, nothing to compare a target with
            print(f"error: --target: the index {args.index} records no images folder (built from TFRecords), so "
                  f"its results cannot be compared with {t}; drop --target", file=sys.stderr)
            return 2
        try:
            t = t if t.is_file() else gallery_file(gallery, t)  # relative to --gallery: kept inside it
        except ExportError as e:
            print(f"error: --target {e}", file=sys.stderr)
            return 2
        if not t.is_file():
            where = "--gallery" if index is None else "the index's images folder"
            print(f"error: --target {t} is not a file (give a path, or a path relative to {where})", file=sys.stderr)
            return 2
        targets.append(t)
    try:
        model = ExportedModel(args.model)  # a damaged export: one "damaged export: <file>" line
        if index is None:
            results = search(model, args.image, args.text, gallery, args.top, exclude_query=not args.keep_query)
        else:
            results = search_index(model, args.image, args.text, index, args.top, exclude_query=not args.keep_query)
    except (ExportError, OSError, ImageTooLarge, QueryError, GalleryIndexError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    target_hashes = {file_sha256(t) for t in targets}  # by content, as draw_results frames them
    ranking = {
        "model": str(args.model), "image": str(args.image), "text": args.text,
        "gallery": str(gallery) if gallery is not None else None,
        "results": [{"rank": r.rank, "path": str(r.path) if r.path is not None else None, "score": r.score,
                     "gallery_id": r.gallery_id, "sha256": r.sha256, "target": r.sha256 in target_hashes}
                    | ({"id": r.index_id} if index is not None else {}) for r in results],
        "figure": str(out / FIGURE_NAME) if out is not None else None,
    }
    if index is not None:
        ranking["index"] = {"folder": str(args.index), "kind": index.kind, "size": index.size,
                            "scores": "cosine similarity"}
    if out is not None:
        title = f"{model.info.get('method', '')} | {Path(args.model).parent.name}/{Path(args.model).name}"
        if index is not None:
            title += f" | {index.kind} index {Path(args.index).name}"
        figure = draw_results(args.image, args.text, results, targets=targets, thumb=args.thumb, title=title)
        try:
            save_results(out, figure, ranking)
        except (NotOwnedError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(ranking, indent=2))
        if out is not None:
            print(f"wrote {out}: {FIGURE_NAME}, {RANKING_NAME}", file=sys.stderr)
        return 0
    for r in results:
        mark = "  <- target" if r.sha256 in target_hashes else ""
        print(f"{r.rank:3d}  {r.score:9.4f}  {r.path if r.path is not None else r.index_id}{mark}")
    print(f"wrote {out}: {FIGURE_NAME}, {RANKING_NAME}")
    return 0


def open_index(folder, model, gallery=None, needs_images=True):
    """The gallery index `folder`, loaded with the fingerprint of the export `model` (an index of
    another export is refused). `gallery` (--gallery) must be the index's images folder, and an
    index without one is refused when the results are to be drawn (`needs_images`): each a
    GalleryIndexError saying what to change."""
    from keras_irtf.index.ann import GalleryIndex, GalleryIndexError, export_fingerprint
    from keras_irtf.serving.query import index_gallery_conflict

    index = GalleryIndex.load(folder, fingerprint=export_fingerprint(model))
    conflict = index_gallery_conflict(gallery, folder, index.images_root)
    if conflict is not None:
        raise GalleryIndexError(conflict)
    if index.images_root is None and needs_images:
        raise GalleryIndexError(f"--index {folder} records no images folder (it was built from TFRecords): its "
                                f"results are ids, with no image to draw; pass --json (without --out) to print "
                                f"the ranking")
    return index


if __name__ == "__main__":
    sys.exit(main())
