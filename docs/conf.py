"""Sphinx configuration of the keras_irtf documentation.

    pip install -e '.[docs]'
    sphinx-build -W -b html docs docs/_build/html

Pages are MyST Markdown. The configuration, tool and API references are generated from the code
at build time (docs/_ext). Nothing is fetched from the network, at build time or by a reader's
browser: the theme's assets are served from the built site.
"""

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "_ext"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # the reference pages import TensorFlow

project = "keras_irtf"
author = "the keras_irtf authors"
copyright = "2026, the keras_irtf authors"
release = "0.1.0"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "irtf_sphinx",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store"]

# MyST: heading anchors for links such as [evaluation](evaluate.md#robustness)
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# Generated benchmark and results pages start at a second-level heading.
suppress_warnings = ["myst.header"]

# API reference: each public name's own docstring (not the Keras base classes').
autodoc_inherit_docstrings = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = "keras_irtf"
html_static_path = []
html_copy_source = False
html_show_sourcelink = False
# No web fonts, analytics or CDN scripts: furo ships its CSS and JavaScript with the site.
html_theme_options = {"navigation_with_keys": True}
