"""A web demo served straight from an exported SavedModel (what TF Serving would serve).

    python tools/demo.py --model exported/css_tirg_s0/1        # http://127.0.0.1:8080/

    from keras_irtf.demo import build_app, serve
    app = build_app("exported/css_tirg_s0/1")
    serve(app, port=8080)

The page lets a person pick a reference image from the export's gallery (or upload one), type
the modification, and see the top-k results with rank, score, a ground-truth marker where the
query is known, and the latency. Beside it, `/v1/models/<name>:predict` answers TF Serving's
REST predict requests for every signature of the export. The model is loaded with
`tf.saved_model.load` only: keras is not needed. Needs the `[demo]` extra (FastAPI, uvicorn).
"""

from __future__ import annotations

from keras_irtf.demo.limits import DemoError, Limits, check_image


def build_app(model_path, gallery=None, queries=None, limits=None, name=None):
    """Load the export version folder `model_path` and return the FastAPI application.

    `gallery`: the folder of the gallery images when it moved since the export; `queries`: a
    queries file or CSS folder for the ground-truth marker (see keras_irtf.demo.ground_truth);
    `limits`: a keras_irtf.demo.Limits; `name`: the model name in the REST URLs.
    """
    from keras_irtf.demo.app import create_app
    from keras_irtf.demo.ground_truth import find_ground_truth
    from keras_irtf.demo.served import ServedModel

    model = ServedModel(model_path, gallery_root=gallery, name=name)
    model.warm_up_seconds = model.warm_up()
    return create_app(model, limits or Limits(), find_ground_truth(model, queries))


def serve(app, host="127.0.0.1", port=8080, log_level="info", on_ready=None):
    from keras_irtf.demo.app import serve as _serve

    return _serve(app, host=host, port=port, log_level=log_level, on_ready=on_ready)


__all__ = ["DemoError", "Limits", "build_app", "check_image", "serve"]
