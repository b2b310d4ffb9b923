"""Image encoders: ImageNet-normalised images [B, H, W, 3] -> a feature [B, output_dim].

- SmallCNNEncoder: the default for the 64x64 CSS scenes. A strided 5x5 stem, Conv-BN-ReLU-pool
  blocks, then the final feature map is FLATTENED (not pooled) before the projection, because
  CSS texts refer to positions ("top-left") and global pooling would discard where things are.
- ResNet18Encoder: ResNet-18 (basic blocks 2/2/2/2, 64..512 filters) with global average
  pooling and a linear projection, as in TIRG. Random initialisation; a pretrained keras-hub
  backbone can be loaded from a local preset folder (see keras_irtf.layers.pretrained).

Batch normalisation is synchronized across replicas (a no-op on one device), so that a
multi-replica step normalises with the global batch's statistics exactly as one device does.
"""

import dataclasses
import logging
from typing import Optional

import keras

from keras_irtf.config import AT_LEAST_ONE
from keras_irtf.layers.base import ImageEncoder
from keras_irtf.layers.normalization import SyncBatchNormalization
from keras_irtf.layers.pretrained import PretrainedImageEncoder
from keras_irtf.registry import register_image_encoder

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SmallCNNConfig:
    DOMAINS = {"filters": AT_LEAST_ONE, "stem_stride": AT_LEAST_ONE}
    filters: tuple = (16, 32, 64, 128)  # one conv block each
    stem_stride: int = 2  # stride of the first convolution (downsampling first is cheaper)


@register_image_encoder("small_cnn", config=SmallCNNConfig)
@keras.saving.register_keras_serializable(package="keras_irtf")
class SmallCNNEncoder(ImageEncoder):
    @classmethod
    def min_image_size(cls, settings) -> int:
        # stem: ceil(size / stride); each later block pools by 2; the last map must keep a pixel
        stride = max(int(settings.stem_stride), 1)
        pools = max(len(settings.filters) - (1 if stride > 1 else 0), 0)
        return stride * (2**pools - 1) + 1

    def __init__(self, filters=(16, 32, 64, 128), output_dim=512, stem_stride=2, **kwargs):
        super().__init__(**kwargs)
        self.filters = tuple(int(f) for f in filters)
        self.output_dim = int(output_dim)
        self.stem_stride = int(stem_stride)
        self.blocks = []
        for i, f in enumerate(self.filters):
            if i == 0 and self.stem_stride > 1:
                # downsample first: full-resolution convolutions dominate the step time on a CPU
                conv = keras.layers.Conv2D(f, 5, strides=self.stem_stride, padding="same", use_bias=False, name="conv0")
                pool = keras.layers.Identity()
            else:
                conv = keras.layers.Conv2D(f, 3, padding="same", use_bias=False, name=f"conv{i}")
                pool = keras.layers.MaxPooling2D(2)
            self.blocks.append([conv, SyncBatchNormalization(name=f"bn{i}"), keras.layers.ReLU(), pool])
        self.flatten = keras.layers.Flatten()
        self.projection = keras.layers.Dense(self.output_dim, name="projection")

    def build(self, input_shape):
        shape = tuple(input_shape)
        for block in self.blocks:
            for layer in block:
                layer.build(shape)
                shape = layer.compute_output_shape(shape)
        shape = self.flatten.compute_output_shape(shape)
        self.projection.build(shape)

    def call(self, images, training=False):
        x = images
        for conv, bn, relu, pool in self.blocks:
            x = pool(relu(bn(conv(x), training=training)))
        return self.projection(self.flatten(x))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.output_dim)

    def get_config(self):
        config = super().get_config()
        config.update(filters=list(self.filters), output_dim=self.output_dim, stem_stride=self.stem_stride)
        return config


class _BasicBlock(keras.layers.Layer):
    def __init__(self, filters, stride, **kwargs):
        super().__init__(**kwargs)
        self.conv1 = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)
        self.bn1 = SyncBatchNormalization(epsilon=1e-5)
        self.conv2 = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)
        self.bn2 = SyncBatchNormalization(epsilon=1e-5)
        self.shortcut = None
        self.filters, self.stride = filters, stride

    def build(self, input_shape):
        if self.stride != 1 or input_shape[-1] != self.filters:
            self.shortcut = keras.Sequential(
                [
                    keras.layers.Conv2D(self.filters, 1, strides=self.stride, use_bias=False),
                    SyncBatchNormalization(epsilon=1e-5),
                ]
            )
            self.shortcut.build(input_shape)
        self.conv1.build(input_shape)
        mid = self.conv1.compute_output_shape(input_shape)
        self.bn1.build(mid)
        self.conv2.build(mid)
        self.bn2.build(mid)

    def call(self, x, training=False):
        y = keras.ops.relu(self.bn1(self.conv1(x), training=training))
        y = self.bn2(self.conv2(y), training=training)
        s = self.shortcut(x, training=training) if self.shortcut is not None else x
        return keras.ops.relu(y + s)

    def compute_output_shape(self, input_shape):
        return self.conv1.compute_output_shape(input_shape)


@dataclasses.dataclass
class ResNet18Config:
    # a local keras-hub preset folder (e.g. resnet_18_imagenet) for pretrained weights; None:
    # random initialisation
    weights: Optional[str] = None


@register_image_encoder("resnet18", config=ResNet18Config)
@keras.saving.register_keras_serializable(package="keras_irtf")
class ResNet18Encoder(ImageEncoder):
    @classmethod
    def min_image_size(cls, settings) -> int:
        return 32  # a total stride of 32

    @classmethod
    def from_settings(cls, settings, *, output_dim, **context):
        if settings is not None and settings.weights:
            encoder = PretrainedImageEncoder.from_preset(settings.weights, output_dim, name="image_encoder")
            log.info(f"image encoder: pretrained keras-hub backbone from {encoder.preset}")
            return encoder
        log.info("image encoder: ResNet-18 from random initialisation (no --image-weights / "
                 "model.image_encoder.weights)")
        return cls(output_dim=output_dim, name="image_encoder")

    def __init__(self, output_dim=512, **kwargs):
        super().__init__(**kwargs)
        self.output_dim = int(output_dim)
        self.stem = [
            keras.layers.Conv2D(64, 7, strides=2, padding="same", use_bias=False, name="stem_conv"),
            SyncBatchNormalization(epsilon=1e-5, name="stem_bn"),
            keras.layers.ReLU(),
            keras.layers.MaxPooling2D(3, strides=2, padding="same"),
        ]
        self.stages = []
        for i, (f, s) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2))):
            self.stages += [_BasicBlock(f, s, name=f"stage{i}_block0"), _BasicBlock(f, 1, name=f"stage{i}_block1")]
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.projection = keras.layers.Dense(self.output_dim, name="projection")

    def build(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.stem + self.stages:
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
        self.projection.build((shape[0], 512))

    def call(self, images, training=False):
        x = images
        for layer in self.stem:
            x = layer(x, training=training) if isinstance(layer, keras.layers.BatchNormalization) else layer(x)
        for block in self.stages:
            x = block(x, training=training)
        return self.projection(self.pool(x))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.output_dim)

    def get_config(self):
        config = super().get_config()
        config.update(output_dim=self.output_dim)
        return config
