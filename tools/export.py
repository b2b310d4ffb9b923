#!/usr/bin/env python
"""Export a trained run as a SavedModel for TF Serving (raw image bytes and raw text in).

    python tools/export.py --run runs/css_tirg_s0                         # exported/css_tirg_s0/1
    python tools/export.py --run runs/css_tirg_s0 --gallery data/gallery  # + the `retrieve` endpoint
    python tools/export.py --run runs/css_tirg_s0 --version 3 --force     # replace version 3

Writes <out>/<name>/<version>/ (TF Serving's layout; default: exported/<run name>/<next free
integer>). The version folder appears only when complete; an existing version is never
overwritten unless --force is given, and --force replaces only a version folder keras_irtf
wrote (it carries the marker file .keras_irtf.json): a folder of anyone else's is refused.
--name is one plain folder name inside --out. Endpoints: serving_default (image_bytes + text ->
embedding), embed_image (image_bytes -> embedding) and, with --gallery, retrieve (image_bytes +
text + k -> top-k gallery ids, paths, scores). The export records the op libraries its graph
needs beyond core TensorFlow (tensorflow-text for CLIP, SigLIP and BERT text encoders) in
assets.extra/keras_irtf_export.json ("op_libraries"); a client must load them before
tf.saved_model.load (docs/serving.md).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None):
    from keras_irtf import cli

    cli.preparse(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common(p)
    p.add_argument("--run", required=True, help="run folder written by tools/train.py")
    p.add_argument("--gallery", help="folder of gallery images (recursive): adds the retrieve endpoint")
    p.add_argument("--version", type=int, help="integer version (default: the next free one)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --version (only a version folder keras_irtf wrote)")
    p.add_argument("--out", default="exported", help="base folder (default: exported)")
    p.add_argument("--name", help="model name: one folder name under --out, no '/' or '..' (default: the run "
                                   "folder's name)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="refuse served images whose header declares more pixels, before decoding them "
                        "(default 40000000; 0 = no limit)")
    args = p.parse_args(argv)

    from keras_irtf.config import ConfigError
    from keras_irtf.serving.export import ExportError, export_run

    try:
        path = export_run(args.run, out_root=args.out, name=args.name, gallery=args.gallery,
                          version=args.version, force=args.force, verbose=not args.quiet,
                          max_pixels=args.max_pixels)
    except (ConfigError, ExportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
