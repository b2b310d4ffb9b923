#!/usr/bin/env python
"""Embed a gallery of millions with an export (Apache Beam), then build its nearest-neighbour index.

    python tools/index.py --model exported/css_tirg_s0/1 --images data/gallery --out indexes/css
    python tools/index.py --model exported/css_tirg_s0/1 --images gallery.txt --out indexes/css --kind hnsw \\
        --param M=32 --param ef_search=200
    python tools/index.py --model exported/css_tirg_s0/1 --images 'tfrecord:shards/*.tfrecord' --out indexes/tf \\
        --runner DirectRunner --direct_num_workers 2 --direct_running_mode multi_processing

--images is a folder (every JPEG, PNG, GIF or BMP below it, recursively; an image's id is its
path relative to the folder), a text file listing image paths (one a line, relative to the
list's folder), a glob pattern (ids relative to its leading folders), or tfrecord:PATTERN
(tf.train.Example records with the bytes features `id` and `image`). A file is read only if it
lies under the images' folder: a link leading out of it is not read.

Writes into --out: embeddings/ (shards part-*.npz of ids and L2-normalised embeddings, and
manifest.json naming the export), dead_letter.jsonl (one JSON line {"id", "path", "reason"} for
each image this run could not embed: unreadable, not an image, corrupt, over the export's pixel
limit), then the index (index.faiss, ids.txt, index.json with its recall@10 against exact
search). Run again with the same export and --out, only the images not embedded yet are
embedded (an image already embedded is not read again); with another export, --out is refused:
use another folder, or --replace to delete this one (only a folder keras_irtf wrote as a
gallery index) and embed everything anew.

Beam runs the embedding: on this machine unless --runner names another runner. Flags this tool
does not define are Beam pipeline options (--direct_num_workers, --direct_running_mode, ...);
the output folder must be one the workers can write to. The default runner, DirectRunner, runs
the pipeline on Beam's FnApiRunner, the engine the DirectRunner runs batch pipelines on, without
first trying the Prism runner, which Beam would download. Needs the beam and faiss extras:
pip install -e '.[beam,faiss]'.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _params(items, parser):
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--param {item!r}: expected KEY=VALUE, e.g. --param ef_search=200")
        params[key] = value
    return params


def main(argv=None):
    from keras_irtf import cli

    pre = cli.preparse(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common(p)
    p.add_argument("--model", required=True, help="export version folder, e.g. exported/<name>/<version>")
    p.add_argument("--images", required=True,
                   help="a folder of images, a text file of image paths, a glob pattern, or tfrecord:PATTERN")
    p.add_argument("--out", required=True, help="the index folder, e.g. indexes/<name>: new, empty, or one this tool "
                                                "wrote with the same export (new images are added)")
    p.add_argument("--kind", default="auto", help="index kind: auto (by gallery size), flat, hnsw or ivfpq")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="an index parameter (repeatable): hnsw M, ef_construction, ef_search; ivfpq nlist, m, nbits, "
                        "nprobe, refine")
    p.add_argument("--batch-size", type=int, default=64, help="images a batch of the export's embed_image (default 64)")
    p.add_argument("--shards", type=int, help="shard files this run writes (default: one per 50000 images, or one "
                                              "per TFRecord file)")
    p.add_argument("--max-file-mb", type=float, default=100.0,
                   help="an image file larger than this is not read but dead-lettered (default 100)")
    p.add_argument("--replace", action="store_true",
                   help="delete --out first (only a gallery index folder keras_irtf wrote) and embed everything anew")
    p.add_argument("--runner", help="the Beam runner (default DirectRunner: this machine); other Beam pipeline "
                                    "options may follow")
    args, beam_args = p.parse_known_args(argv)
    params = _params(args.param, p)
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.shards is not None and args.shards < 1:
        p.error("--shards must be >= 1")
    if args.max_file_mb <= 0:
        p.error("--max-file-mb must be > 0")

    from keras_irtf.index.ann import KINDS, GalleryIndexError, resolve_params
    from keras_irtf.index.embeddings import EmbeddingsError
    from keras_irtf.index.pipeline import build_gallery_index, embed_gallery, quiet_beam_log, unknown_beam_flags
    from keras_irtf.safety import NotOwnedError
    from keras_irtf.serving.reader import ExportError
    from keras_irtf.utils import MissingExtra

    if args.kind not in ("auto", *KINDS):
        p.error(f"--kind {args.kind!r}: expected auto or one of {', '.join(KINDS)}")
    quiet_beam_log(pre.verbose)
    if args.runner:
        beam_args = ["--runner", args.runner, *beam_args]
    try:
        unknown = unknown_beam_flags(beam_args)
        if unknown:
            p.error(f"unrecognised arguments: {' '.join(unknown)} (neither this tool's options nor Beam pipeline "
                    f"options)")
        if args.kind != "auto":
            resolve_params(args.kind, 1000, 8, params)  # a wrong --param before hours of embedding
        summary = embed_gallery(args.model, args.images, args.out, batch_size=args.batch_size, shards=args.shards,
                                replace=args.replace, max_file_bytes=int(args.max_file_mb * 2**20),
                                beam_args=beam_args)
        print(f"{summary.new} new images embedded, {summary.skipped} skipped as already embedded, {summary.dead} "
              f"dead-lettered ({Path(args.out) / 'dead_letter.jsonl'})")
        if summary.gone:
            print(f"note: {summary.gone} images embedded earlier are no longer among --images; they stay in the index "
                  f"(--replace to embed anew)")
        if not summary.total:
            print(f"error: no image could be embedded, so there is no index: see "
                  f"{Path(args.out) / 'dead_letter.jsonl'}", file=sys.stderr)
            return 2
        index = build_gallery_index(args.out, kind=args.kind, params=params)
    except (EmbeddingsError, GalleryIndexError, ExportError, NotOwnedError, MissingExtra, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    recall = index.manifest.get("holdout", {}).get("recall_at_10")
    measured = f", recall@10 {recall:.4f} against exact search" if recall is not None else ""
    print(f"{index.kind} index of {index.size} images{measured}: {index.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
