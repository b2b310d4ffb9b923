"""keras_irtf: image retrieval with text feedback (composed image retrieval) in TensorFlow/Keras 3.

The public API is exactly `keras_irtf.__all__` (TensorFlow is imported on first use):

    Config, ConfigError, load_config     configuration: dataclass defaults <- YAML files <- overrides
    load_dataset                         a dataset named by a config (CSS built-in or published, ...)
    Experiment, Benchmark                the assembler: config -> dataset, text input, model, optimizer
    build_model, make_optimizer          a configured model (built, not compiled) and its optimizer
    load_benchmark, create_model         user scripts: a dataset with its text input; a compiled model
    train                                a whole training run (what tools/train.py runs)
    evaluate                             Recall@K on test and train, and the WHM of the two
    save_run, save_model, load_model     run folders and .keras files
    export_run                           a run as a TF Serving SavedModel
    ComposedRetrievalModel               the Keras model class
"""

__version__ = "0.1.0"

from keras_irtf.config import Config, ConfigError, load_config  # noqa: E402


def __getattr__(name):
    # Heavy imports (TensorFlow) only when used.
    if name == "train":
        from keras_irtf.training.loop import train

        return train
    if name in ("Experiment", "load_model", "save_model", "build_model", "make_optimizer"):
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


__all__ = ["Benchmark", "ComposedRetrievalModel", "Config", "ConfigError", "Experiment", "build_model", "create_model",
           "evaluate", "export_run", "load_benchmark", "load_config", "load_dataset", "load_model", "make_optimizer",
           "save_model", "save_run", "train"]


def __dir__():
    return sorted(set(globals()) | set(__all__))
