#!/usr/bin/env python
"""List every registered plug-in: composers, image and text encoders, datasets, retrieval losses
and gradient-augmentation methods, with the config key that names each and its own keys.

    python tools/plugins.py                          # the table README.md shows
    python tools/plugins.py --import my_composer     # with the plug-ins of your own module
    python tools/plugins.py --names                  # one kind a line: its registered names

Prints a Markdown table (kind, config key, registered names with their own keys, decorator)
read from keras_irtf.registry, after the modules given with --import have registered theirs.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None):
    from keras_irtf import cli

    cli.preparse(argv)  # --import: the user's plug-ins join the registries first
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common(p)
    p.add_argument("--names", action="store_true", help="one kind a line with its names, instead of the table")
    args = p.parse_args(argv)

    from keras_irtf.registry import describe, markdown_table

    print(describe() if args.names else markdown_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
