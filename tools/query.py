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
    p.add_argument("--gallery", required=True, help="folder of gallery images (recursive)")
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

    from keras_irtf.serving.reader import ExportError, file_sha256, gallery_file
    from keras_irtf.image_limits import ImageTooLarge
    from keras_irtf.safety import NotOwnedError
    from keras_irtf.serving.query import (FIGURE_NAME, RANKING_NAME, RESULTS_ROOT, ExportedModel, QueryError,
                                          check_results_folder, draw_results, results_folder_name, save_results,
                                          search)

    out = None
    if args.out is not None or not args.json:
        out = Path(args.out) if args.out is not None else Path(RESULTS_ROOT) / results_folder_name(args.image, args.text)
        try:
            check_results_folder(out)  # before the model loads: a folder of someone else's is refused
        except NotOwnedError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    gallery = Path(args.gallery)
    targets = []
    for t in args.target:
        t = Path(t)
        try:
            t = t if t.is_file() else gallery_file(gallery, t)  # relative to --gallery: kept inside it
        except ExportError as e:
            print(f"error: --target {e}", file=sys.stderr)
            return 2
        if not t.is_file():
            print(f"error: --target {t} is not a file (give a path, or a path relative to --gallery)", file=sys.stderr)
            return 2
        targets.append(t)
    try:
        model = ExportedModel(args.model)  # a damaged export: one "damaged export: <file>" line
        results = search(model, args.image, args.text, gallery, args.top, exclude_query=not args.keep_query)
    except (ExportError, OSError, ImageTooLarge, QueryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    target_hashes = {file_sha256(t) for t in targets}  # by content, as draw_results frames them
    ranking = {
        "model": str(args.model), "image": str(args.image), "text": args.text, "gallery": str(gallery),
        "results": [{"rank": r.rank, "path": str(r.path), "score": r.score, "gallery_id": r.gallery_id,
                     "sha256": r.sha256, "target": r.sha256 in target_hashes} for r in results],
        "figure": str(out / FIGURE_NAME) if out is not None else None,
    }
    if out is not None:
        figure = draw_results(args.image, args.text, results, targets=targets, thumb=args.thumb,
                              title=f"{model.info.get('method', '')} | {Path(args.model).parent.name}/{Path(args.model).name}")
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
        print(f"{r.rank:3d}  {r.score:9.4f}  {r.path}{mark}")
    print(f"wrote {out}: {FIGURE_NAME}, {RANKING_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
