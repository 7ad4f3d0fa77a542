"""Tests for tfscale.models.resnet."""

import keras
import numpy as np
import pytest

from tfscale import models


def _num_trainable(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def test_resnet50_v15_parameter_count():
    # torchvision's resnet50 (v1.5) has 25,557,032 parameters with 1000 classes.
    model = models.resnet50()
    assert _num_trainable(model) == 25_557_032
    assert model.output_shape == (None, 1000)


def test_resnet50_stride_is_on_the_3x3_conv():
    model = models.resnet50(image_size=64)
    assert model.get_layer("stage2_block1_conv1").strides == (1, 1)
    assert model.get_layer("stage2_block1_conv2").strides == (2, 2)


@pytest.mark.parametrize("depth, blocks", [(8, 1), (20, 3)])
def test_resnet_cifar_shapes_and_depth(depth, blocks):
    model = models.resnet_cifar(depth, num_classes=7, image_size=28)
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D) and "proj" not in l.name]
    dense = [l for l in model.layers if isinstance(l, keras.layers.Dense)]
    assert len(convs) + len(dense) == depth  # 6n+2 weighted layers on the main path
    assert sum("block" in l.name and l.name.endswith("_add") for l in model.layers) == 3 * blocks
    x = np.random.default_rng(0).normal(size=(2, 28, 28, 3)).astype("float32")
    assert model(x, training=False).shape == (2, 7)


def test_last_gamma_of_each_block_is_zero_and_blocks_start_as_identity():
    model = models.resnet20(image_size=16)
    last_bns = [l for l in model.layers if l.name.endswith("_bn2")]
    assert len(last_bns) == 9
    for layer in last_bns:
        np.testing.assert_array_equal(layer.gamma.numpy(), 0.0)
    other_bns = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization) and l not in last_bns]
    assert all(np.all(l.gamma.numpy() == 1.0) for l in other_bns)


def test_weight_decay_only_on_kernels():
    model = models.resnet8(image_size=16, weight_decay=1e-4)
    kernels = [l for l in model.layers if isinstance(l, (keras.layers.Conv2D, keras.layers.Dense))]
    assert len(model.losses) == len(kernels)
    expected = sum(0.5e-4 * float(np.sum(l.kernel.numpy() ** 2)) for l in kernels)
    np.testing.assert_allclose(float(sum(model.losses)), expected, rtol=1e-5)
    bns = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert all(l.gamma_regularizer is None and l.beta_regularizer is None for l in bns)
    assert model.get_layer("logits").bias_regularizer is None
    assert not models.resnet8(image_size=16).losses  # weight_decay=0: no penalty


def test_norm_layer_is_pluggable():
    calls = []

    def norm_layer(**kwargs):
        calls.append(kwargs)
        return keras.layers.LayerNormalization(name=kwargs["name"])

    model = models.resnet8(image_size=16, norm_layer=norm_layer)
    assert len(calls) == sum(isinstance(l, keras.layers.LayerNormalization) for l in model.layers) > 0
    assert sum(c.get("gamma_initializer") == "zeros" for c in calls) == 3  # one per residual block


def test_default_bn_momentum_and_epsilon():
    bn = models.resnet8(image_size=16).get_layer("stem_bn")
    assert bn.momentum == pytest.approx(0.9)
    assert bn.epsilon == pytest.approx(1e-5)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: models.resnet_cifar(21), "depth"),
        (lambda: models.resnet_imagenet(49), "depth"),
        (lambda: models.resnet8(num_classes=0), "num_classes"),
        (lambda: models.resnet8(weight_decay=-1.0), "weight_decay"),
        (lambda: models.build_model("vgg16"), "resnet20"),
    ],
)
def test_bad_arguments_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_gradient_shapes_are_the_planner_default():
    """One definition of ResNet-50's gradients: the benchmarks' shapes and the planner's default workload agree."""
    import numpy as np

    from tfscale import models, planning

    shapes = models.gradient_shapes("resnet50")
    assert len(shapes) == 161
    assert sum(int(np.prod(s)) for s in shapes) == planning.Workload().num_parameters == 25_557_032
    assert models.gradient_shapes("resnet8", num_classes=10)[-1] == (10,)
