"""Image classification models, installed as `tfscale.models`.

The normalisation layer of every model is an argument, so group-synchronised BN plugs in unchanged.
"""

from tfscale.models.resnet import MODELS
from tfscale.models.resnet import build_model
from tfscale.models.resnet import default_norm_layer
from tfscale.models.resnet import input_normalization_layer
from tfscale.models.resnet import resnet8
from tfscale.models.resnet import resnet20
from tfscale.models.resnet import resnet50
from tfscale.models.resnet import resnet_cifar
from tfscale.models.resnet import resnet_imagenet
from tfscale.models.shapes import gradient_shapes

__all__ = [
    "MODELS",
    "build_model",
    "default_norm_layer",
    "gradient_shapes",
    "input_normalization_layer",
    "resnet8",
    "resnet20",
    "resnet50",
    "resnet_cifar",
    "resnet_imagenet",
]
