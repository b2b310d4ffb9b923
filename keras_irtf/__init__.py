"""keras_irtf: image retrieval with text feedback (composed image retrieval) in TensorFlow/Keras 3.

Public entry points:
    load_config, Config                 configuration (dataclasses <- YAML <- overrides)
    load_dataset                        CSS (built-in or published), ...
    build_model, make_optimizer, train  models and training runs
    evaluate                            Recall@K, training recall, WHM
    load_model                          reload a saved .keras model
    load_benchmark, create_model, save_run   user scripts (keras_irtf.api)
    export_run                          SavedModel for TF Serving (keras_irtf.serving.export)
"""

__version__ = "0.1.0"

from keras_irtf.config import Config, ConfigError, load_config  # noqa: E402


def __getattr__(name):
    # Heavy imports (TensorFlow) only when used.
    if name == "train":
        from keras_irtf.training.loop import train

        return train
    if name in ("Experiment", "load_model", "save_model"):
        from keras_irtf import experiment

        return getattr(experiment, name)
    if name == "load_dataset":
        from keras_irtf.data import load_dataset

        return load_dataset
    if name == "evaluate":
        from keras_irtf.evaluation.protocol import evaluate

        return evaluate
    if name in ("Benchmark", "load_benchmark", "create_model", "save_run", "export_run"):
        from keras_irtf import api

        return getattr(api, name)
    if name == "ComposedRetrievalModel":
        from keras_irtf.model.retrieval_model import ComposedRetrievalModel

        return ComposedRetrievalModel
    raise AttributeError(f"module 'keras_irtf' has no attribute {name!r}")


__all__ = ["Config", "ConfigError", "load_config", "load_dataset", "Experiment", "train", "evaluate",
           "load_model", "save_model", "ComposedRetrievalModel", "Benchmark", "load_benchmark", "create_model",
           "save_run", "export_run"]
