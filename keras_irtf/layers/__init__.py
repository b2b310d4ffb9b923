"""Keras 3 layers of keras_irtf: image and text encoders, composers, normalisation, preprocessing.

Every layer has `get_config()` and is registered for `.keras` serialisation under the package
name "keras_irtf"; the pluggable ones (composers, encoders) are also registered by name in
keras_irtf.registry, which is how a config names them.
"""

from keras_irtf.layers.base import Composer, ImageEncoder, TextEncoder
from keras_irtf.layers.bert import HubBertEncoder, KerasHubBertEncoder
from keras_irtf.layers.clip import CLIPImageEncoder, CLIPTextEncoder, SigLIPImageEncoder, SigLIPTextEncoder
from keras_irtf.layers.composeae import ComposeAEComposer, RealSpaceConcatAEComposer
from keras_irtf.layers.composers import (CombinerComposer, ConcatComposer, ImageOnlyComposer, SumComposer,
                                         TextOnlyComposer, TIRGComposer)
from keras_irtf.layers.dropout import Dropout
from keras_irtf.layers.image_encoders import ResNet18Encoder, SmallCNNEncoder
from keras_irtf.layers.normalization import ScaledL2Normalization, SyncBatchNormalization
from keras_irtf.layers.pretrained import PretrainedImageEncoder
from keras_irtf.layers.text_encoders import LSTMTextEncoder
from keras_irtf.preprocessing import ImagePreprocessor

__all__ = [
    "CLIPImageEncoder",
    "CLIPTextEncoder",
    "CombinerComposer",
    "ComposeAEComposer",
    "Composer",
    "ConcatComposer",
    "Dropout",
    "HubBertEncoder",
    "ImageEncoder",
    "ImageOnlyComposer",
    "ImagePreprocessor",
    "KerasHubBertEncoder",
    "LSTMTextEncoder",
    "PretrainedImageEncoder",
    "RealSpaceConcatAEComposer",
    "ResNet18Encoder",
    "ScaledL2Normalization",
    "SigLIPImageEncoder",
    "SigLIPTextEncoder",
    "SmallCNNEncoder",
    "SumComposer",
    "SyncBatchNormalization",
    "TIRGComposer",
    "TextEncoder",
    "TextOnlyComposer",
]
