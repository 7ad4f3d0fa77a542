"""ResNet image classifiers as Keras 3 functional models.

Two families share one set of building blocks:

* `resnet50` (and `resnet_imagenet(depth)`): ResNet v1.5 for 224×224 ImageNet images, the model of every seed
  paper (He et al., "Deep Residual Learning for Image Recognition", arXiv:1512.03385). v1.5 puts the stride-2 of a
  down-sampling bottleneck on its 3×3 convolution instead of the first 1×1 (as in NVIDIA's and MLPerf's reference
  models and torchvision). With 1000 classes ResNet-50 v1.5 has 25,557,032 trainable parameters.
* `resnet_cifar(depth)` (`resnet8`, `resnet20`, …): the CIFAR-style ResNet-(6n+2) of He et al. §4.2 for small
  (28–64 px) inputs: a 3×3 stem, three stages of n basic blocks with 16, 32 and 64 filters (times `width`), global
  average pooling and a dense classifier.

Large-batch details from Goyal et al., "Accurate, Large Minibatch SGD", arXiv:1706.02677, §5.1:

* the last normalisation layer of each residual block has its gamma initialised to zero, so every block starts as
  the identity;
* weight decay (an L2 penalty on the loss, `weight_decay/2 · ‖w‖²`, i.e. a gradient term `weight_decay · w`) is
  applied to convolution and dense kernels only, never to normalisation parameters or biases.

The normalisation layer is an argument (`norm_layer`), so tfscale's `DistributedBatchNormalization` (or any
`keras.layers.BatchNormalization`-compatible layer) can be plugged in.

Input normalisation on the accelerator (`input_normalization`): as in the TPU reference (Ying et al.,
arXiv:1811.06992), the input pipeline can feed raw pixels (uint8, or bfloat16, values 0..255) and the model's first
layer, a `keras.layers.Rescaling` named "input_normalization", computes `(x / 255 - mean) / stddev` per channel on
the device. A saved `model.keras` then carries its normalisation and predicts correctly from raw images.
"""

from __future__ import annotations

import functools
from typing import Callable

import keras
import numpy as np

NormLayerFactory = Callable[..., keras.layers.Layer]

# Moving-average decay 0.9 and epsilon 1e-5, as in the TPU and MLPerf references (Ying et al., arXiv:1811.06992).
# Keras's default momentum 0.99 can leave the moving statistics far from the population after a short run.
DEFAULT_BN_MOMENTUM = 0.9
DEFAULT_BN_EPSILON = 1e-5
#: Per-channel RGB mean and standard deviation of ImageNet on the [0, 1] scale (`tfscale.data`'s defaults too).
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)
#: Name of the input-normalisation layer (see `input_normalization_layer`).
INPUT_NORMALIZATION_LAYER = "input_normalization"


def input_normalization_layer(input_normalization="imagenet") -> keras.layers.Layer:
    """Returns the layer that maps raw pixel values to `(x / 255 - mean) / stddev` per RGB channel.

    It is a `keras.layers.Rescaling(scale=1 / (255 * stddev), offset=-mean / stddev)` with per-channel scale and
    offset, the same arithmetic as `tfscale.data.normalize_images` on the host, so the two agree to float32
    rounding. It casts its input (uint8, bfloat16 or float32 `[..., 3]`, values in [0, 255]) to its compute dtype.

    Args:
        input_normalization: "imagenet" (default: mean (0.485, 0.456, 0.406), stddev (0.229, 0.224, 0.225)) or a
            pair `(mean, stddev)` of 3 floats each, on the [0, 1] scale, stddev > 0.

    Returns:
        A `keras.layers.Rescaling` layer named "input_normalization".

    Raises:
        ValueError: for anything else, naming the value.
    """
    if isinstance(input_normalization, str):
        if input_normalization != "imagenet":
            raise ValueError("Argument `input_normalization` must be None, 'imagenet' or a pair (mean, stddev) of "
                             f"3 floats each. Received: input_normalization={input_normalization!r}")
        mean, stddev = IMAGENET_MEAN_RGB, IMAGENET_STDDEV_RGB
    else:
        try:
            mean, stddev = input_normalization
            mean = [float(v) for v in mean]
            stddev = [float(v) for v in stddev]
        except (TypeError, ValueError):
            mean = stddev = ()
        if len(mean) != 3 or len(stddev) != 3 or min(stddev) <= 0:
            raise ValueError("Argument `input_normalization` must be None, 'imagenet' or a pair (mean, stddev) of "
                             f"3 floats each, stddev > 0. Received: input_normalization={input_normalization!r}")
    # float32 constants, computed as normalize_images computes them, so host and model agree bit for bit in float32.
    scale = [float(np.float32(1.0 / (255.0 * s))) for s in stddev]
    offset = [-float(np.float32(m / s)) for m, s in zip(mean, stddev)]
    return keras.layers.Rescaling(scale, offset, name=INPUT_NORMALIZATION_LAYER)


def _model_input(image_size, input_normalization):
    """The `keras.Input` and the tensor the stem reads: normalised in the model when `input_normalization`."""
    inputs = keras.Input((image_size, image_size, 3), name="images")
    if input_normalization is None:
        return inputs, inputs
    return inputs, input_normalization_layer(input_normalization)(inputs)


def default_norm_layer(**kwargs) -> keras.layers.Layer:
    """Returns `keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, **kwargs)`.

    Args:
        **kwargs: forwarded to `keras.layers.BatchNormalization`; the models pass `name` and, for the last layer of
            each residual block, `gamma_initializer="zeros"`.

    Returns:
        A `keras.layers.BatchNormalization` layer.
    """
    kwargs.setdefault("momentum", DEFAULT_BN_MOMENTUM)
    kwargs.setdefault("epsilon", DEFAULT_BN_EPSILON)
    return keras.layers.BatchNormalization(**kwargs)


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Argument `{name}` must be a positive integer. Received: {name}={value!r}")


def _check_weight_decay(weight_decay):
    if not weight_decay >= 0:  # also rejects NaN
        raise ValueError(f"Argument `weight_decay` must be >= 0. Received: weight_decay={weight_decay!r}")


class _Builder:
    """Creates layers with the shared conventions (He-normal kernels, no conv bias, L2 on kernels only)."""

    def __init__(self, norm_layer: NormLayerFactory | None, weight_decay: float):
        _check_weight_decay(weight_decay)
        self.norm_layer = norm_layer or default_norm_layer
        # Keras's L2(l) adds l·Σw² to the loss; its gradient is 2l·w, so l = weight_decay / 2.
        self.regularizer = keras.regularizers.L2(weight_decay / 2.0) if weight_decay > 0 else None

    def conv(self, filters, kernel_size, strides, name):
        return keras.layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding="same",
            use_bias=False,
            kernel_initializer=keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal"),
            kernel_regularizer=self.regularizer,
            name=name,
        )

    def norm(self, name, zero_gamma=False):
        kwargs = {"name": name}
        if zero_gamma:
            kwargs["gamma_initializer"] = "zeros"
        return self.norm_layer(**kwargs)

    def dense(self, units, name):
        # float32 whatever the global policy: under mixed precision the logits (and the softmax of the loss) stay
        # float32, as Keras's mixed-precision guide recommends.
        return keras.layers.Dense(
            units,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
            kernel_regularizer=self.regularizer,
            name=name,
            dtype="float32",
        )


def _bottleneck_block(b: _Builder, x, filters, strides, name):
    """ResNet v1.5 bottleneck: 1×1 → 3×3 (stride here) → 1×1 (4·filters), projection shortcut when shapes change."""
    shortcut = x
    if strides != 1 or x.shape[-1] != 4 * filters:
        shortcut = b.conv(4 * filters, 1, strides, f"{name}_proj_conv")(x)
        shortcut = b.norm(f"{name}_proj_bn")(shortcut)
    y = b.conv(filters, 1, 1, f"{name}_conv1")(x)
    y = b.norm(f"{name}_bn1")(y)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = b.conv(filters, 3, strides, f"{name}_conv2")(y)
    y = b.norm(f"{name}_bn2")(y)
    y = keras.layers.ReLU(name=f"{name}_relu2")(y)
    y = b.conv(4 * filters, 1, 1, f"{name}_conv3")(y)
    y = b.norm(f"{name}_bn3", zero_gamma=True)(y)
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def _basic_block(b: _Builder, x, filters, strides, name):
    """Two 3×3 convolutions, projection shortcut (1×1 conv + norm) when the shape changes."""
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = b.conv(filters, 1, strides, f"{name}_proj_conv")(x)
        shortcut = b.norm(f"{name}_proj_bn")(shortcut)
    y = b.conv(filters, 3, strides, f"{name}_conv1")(x)
    y = b.norm(f"{name}_bn1")(y)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = b.conv(filters, 3, 1, f"{name}_conv2")(y)
    y = b.norm(f"{name}_bn2", zero_gamma=True)(y)
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


_IMAGENET_BLOCKS = {
    18: (_basic_block, (2, 2, 2, 2)),
    34: (_basic_block, (3, 4, 6, 3)),
    50: (_bottleneck_block, (3, 4, 6, 3)),
    101: (_bottleneck_block, (3, 4, 23, 3)),
    152: (_bottleneck_block, (3, 8, 36, 3)),
}


def resnet_imagenet(
    depth: int = 50,
    num_classes: int = 1000,
    image_size: int = 224,
    norm_layer: NormLayerFactory | None = None,
    weight_decay: float = 0.0,
    name: str | None = None,
    input_normalization=None,
) -> keras.Model:
    """Builds an ImageNet ResNet v1.5 (He et al., arXiv:1512.03385; Goyal et al., arXiv:1706.02677).

    Args:
        depth: 18, 34, 50, 101 or 152. Default 50.
        num_classes: number of output classes; the model outputs logits. Default 1000.
        image_size: input height and width in pixels (inputs are `float32 [batch, image_size, image_size, 3]`,
            normalised). Default 224.
        norm_layer: a callable returning a normalisation layer, called with `name=` and, for the last layer of
            each residual block, `gamma_initializer="zeros"`. Default: `default_norm_layer` (Keras BN, momentum
            0.9, epsilon 1e-5).
        weight_decay: L2 weight decay on convolution and dense kernels only (gradient term `weight_decay · w`);
            0 disables it (use 0 with optimizers that apply their own decay, such as LARS). Default 0.
        name: optional model name. Default "resnet{depth}_v1_5".
        input_normalization: None (default: the inputs are already normalised, today's behaviour), "imagenet" or a
            pair `(mean, stddev)` on the [0, 1] scale: the model takes raw pixel values in [0, 255] (uint8, bfloat16
            or float32) and normalises them in its first layer (`input_normalization_layer`).

    Returns:
        A `keras.Model` mapping `[batch, image_size, image_size, 3]` images (float32 normalised, or raw pixels with
        `input_normalization`) to logits `float32 [batch, num_classes]`.

    Raises:
        ValueError: for an unknown `depth`, a non-positive `num_classes` or `image_size`, a negative
            `weight_decay` or a bad `input_normalization`.
    """
    if depth not in _IMAGENET_BLOCKS:
        raise ValueError(
            f"Argument `depth` must be one of {sorted(_IMAGENET_BLOCKS)}. Received: depth={depth!r}"
        )
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("image_size", image_size)
    block, counts = _IMAGENET_BLOCKS[depth]
    b = _Builder(norm_layer, weight_decay)

    inputs, x = _model_input(image_size, input_normalization)
    x = b.conv(64, 7, 2, "stem_conv")(x)
    x = b.norm("stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    for stage, count in enumerate(counts):
        filters = 64 * 2**stage
        for i in range(count):
            strides = 2 if (i == 0 and stage > 0) else 1
            x = block(b, x, filters, strides, f"stage{stage + 1}_block{i + 1}")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = b.dense(num_classes, "logits")(x)
    return keras.Model(inputs, outputs, name=name or f"resnet{depth}_v1_5")


def resnet_cifar(
    depth: int = 20,
    num_classes: int = 10,
    image_size: int = 32,
    width: int = 1,
    norm_layer: NormLayerFactory | None = None,
    weight_decay: float = 0.0,
    name: str | None = None,
    input_normalization=None,
) -> keras.Model:
    """Builds a CIFAR-style ResNet-(6n+2) for small images (He et al., arXiv:1512.03385, §4.2).

    Args:
        depth: 6n+2 layers (8, 14, 20, 32, 44, 56, 110, …): n basic blocks in each of three stages. Default 20.
        num_classes: number of output classes; the model outputs logits. Default 10.
        image_size: input height and width in pixels, 16 to 64 typically (inputs are
            `float32 [batch, image_size, image_size, 3]`). Default 32.
        width: filter multiplier; stages have 16·width, 32·width and 64·width filters. Default 1.
        norm_layer: see `resnet_imagenet`.
        weight_decay: see `resnet_imagenet`.
        name: optional model name. Default "resnet{depth}_cifar".
        input_normalization: see `resnet_imagenet` (None, the default, keeps normalised float32 inputs).

    Returns:
        A `keras.Model` mapping `[batch, image_size, image_size, 3]` images (float32 normalised, or raw pixels with
        `input_normalization`) to logits `float32 [batch, num_classes]`.

    Raises:
        ValueError: if `depth` is not 6n+2 with n >= 1, or another argument is out of range.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"Argument `depth` must be 6n+2 with n >= 1 (8, 14, 20, …). Received: depth={depth!r}")
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("image_size", image_size)
    _check_positive_int("width", width)
    blocks_per_stage = (depth - 2) // 6
    b = _Builder(norm_layer, weight_decay)

    inputs, x = _model_input(image_size, input_normalization)
    x = b.conv(16 * width, 3, 1, "stem_conv")(x)
    x = b.norm("stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    for stage in range(3):
        for i in range(blocks_per_stage):
            strides = 2 if (i == 0 and stage > 0) else 1
            x = _basic_block(b, x, 16 * width * 2**stage, strides, f"stage{stage + 1}_block{i + 1}")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = b.dense(num_classes, "logits")(x)
    return keras.Model(inputs, outputs, name=name or f"resnet{depth}_cifar")


resnet50 = functools.partial(resnet_imagenet, 50)
resnet50.__doc__ = "ResNet-50 v1.5: `resnet_imagenet(50, ...)`; 25,557,032 trainable parameters with 1000 classes."
resnet8 = functools.partial(resnet_cifar, 8)
resnet8.__doc__ = "ResNet-8 for small images: `resnet_cifar(8, ...)`."
resnet20 = functools.partial(resnet_cifar, 20)
resnet20.__doc__ = "ResNet-20 for small images: `resnet_cifar(20, ...)`."

MODELS: dict[str, Callable[..., keras.Model]] = {
    "resnet8": resnet8,
    "resnet14": functools.partial(resnet_cifar, 14),
    "resnet20": resnet20,
    "resnet32": functools.partial(resnet_cifar, 32),
    "resnet18": functools.partial(resnet_imagenet, 18),
    "resnet34": functools.partial(resnet_imagenet, 34),
    "resnet50": resnet50,
    "resnet101": functools.partial(resnet_imagenet, 101),
    "resnet152": functools.partial(resnet_imagenet, 152),
}


def build_model(name: str, **kwargs) -> keras.Model:
    """Builds a model by name (`MODELS` keys: 'resnet8', 'resnet20', …, 'resnet50', …).

    Args:
        name: a key of `MODELS`.
        **kwargs: forwarded to `resnet_cifar` or `resnet_imagenet` (num_classes, image_size, norm_layer, …).

    Returns:
        The `keras.Model`.

    Raises:
        ValueError: for an unknown name, listing the valid ones.
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)
