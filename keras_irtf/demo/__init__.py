"""A web demo served straight from an exported SavedModel (what TF Serving would serve).

    python tools/demo.py --model exported/css_tirg_s0/1        # http://127.0.0.1:8080/

    from keras_irtf.demo import build_app, serve
    app = build_app("exported/css_tirg_s0/1")
    serve(app, port=8080)

The page lets a person pick a reference image from the export's gallery (or upload one), type
the modification, and see the top-k results with rank, cosine similarity (keras_irtf.demo.app.
Cosine), a ground-truth marker where the query is known (CSS, FashionIQ, CIRR, triplets or a
queries file: keras_irtf.demo.ground_truth), and the latency. An upload with the very bytes of a
gallery file (its sha256 is among those the export recorded) is that gallery image's query: it
is left out of its own results, as the evaluation does. Beside it, `/v1/models/<name>:predict` answers TF Serving's
REST predict requests for every signature of the export. The model is loaded with
`tf.saved_model.load` only: keras is not needed. Needs the `[demo]` extra (FastAPI, uvicorn):
`missing_extra()` says which of its packages is missing, before anything slow is done. With a
gallery index (`build_app(..., index="indexes/css")`, keras_irtf.demo.indexed) the neighbours
come from the index and the images from its images folder.
"""

from __future__ import annotations

from keras_irtf.demo.app import create_app
from keras_irtf.demo.app import serve as _serve
from keras_irtf.demo.ground_truth import find_ground_truth
from keras_irtf.demo.indexed import IndexedModel, load_index
from keras_irtf.demo.limits import DemoError, Limits, check_image
from keras_irtf.demo.served import ServedModel
from keras_irtf.utils import MissingExtra, optional_import

EXTRA_PACKAGES = ("fastapi", "uvicorn")  # what the page needs of setup.cfg's [demo] extra


def missing_extra():
    """None when the `[demo]` extra's packages import; else the one-line message naming the
    missing package and how to install the extra."""
    for package in EXTRA_PACKAGES:
        try:
            optional_import(package, "demo", "the demo")
        except MissingExtra as e:
            return str(e)
    return None


def build_app(model_path, gallery=None, queries=None, limits=None, name=None, index=None):
    """Load the export version folder `model_path` and return the FastAPI application.

    `gallery`: the folder of the gallery images when it moved since the export; `queries`: a
    queries or triplets file, or a CSS, FashionIQ, CIRR or triplets folder, for the ground-truth
    marker (see keras_irtf.demo.ground_truth);
    `limits`: a keras_irtf.demo.Limits; `name`: the model name in the REST URLs; `index`: a
    gallery index folder built by tools/index.py for this export, which then is the gallery
    (keras_irtf.demo.indexed). A gallery folder that does not hold the images the export
    embedded is refused (DemoError), as are an index of another export or without an images
    folder, a damaged export (keras_irtf.serving.reader.DamagedExport) and a missing `[demo]`
    extra.
    """
    problem = missing_extra()
    if problem is not None:
        raise DemoError(problem)
    if index is not None:  # checked before the (slow) model load: another export's index is refused at once
        model = IndexedModel(model_path, load_index(index, model_path, gallery), name=name,
                             folder_named=gallery is not None)
    else:
        model = ServedModel(model_path, gallery_root=gallery, name=name)
    model.check_gallery()  # thumbnails must show the images the stored embeddings ranked
    model.warm_up_seconds = model.warm_up()
    return create_app(model, limits or Limits(), find_ground_truth(model, queries))


def serve(app, host="127.0.0.1", port=8080, log_level="info", on_ready=None):
    return _serve(app, host=host, port=port, log_level=log_level, on_ready=on_ready)


__all__ = ["DemoError", "Limits", "build_app", "check_image", "missing_extra", "serve"]
