"""Keras 3 layers of keras_irtf: image and text encoders, composers, normalisation.

Every layer has `get_config()` and is registered for `.keras` serialisation under the package
name "keras_irtf".
"""

from keras_irtf.layers.composers import (
    COMPOSERS,
    ConcatComposer,
    ImageOnlyComposer,
    TextOnlyComposer,
    TIRGComposer,
)
from keras_irtf.layers.composeae import (  # registers "composeae" and "composeae_real" in COMPOSERS
    ComposeAEComposer,
    RealSpaceConcatAEComposer,
)
from keras_irtf.layers.image_encoders import ResNet18Encoder, SmallCNNEncoder
from keras_irtf.layers.normalization import ScaledL2Normalization, SyncBatchNormalization
from keras_irtf.layers.pretrained import PretrainedImageEncoder
from keras_irtf.layers.text_encoders import LSTMTextEncoder

__all__ = [
    "COMPOSERS",
    "ComposeAEComposer",
    "ConcatComposer",
    "ImageOnlyComposer",
    "LSTMTextEncoder",
    "RealSpaceConcatAEComposer",
    "PretrainedImageEncoder",
    "ResNet18Encoder",
    "ScaledL2Normalization",
    "SyncBatchNormalization",
    "SmallCNNEncoder",
    "TIRGComposer",
    "TextOnlyComposer",
]
