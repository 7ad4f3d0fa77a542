"""Mixed precision (issue 15, `--dtype`): LARS under loss scaling, a distributed fit per policy, save and load."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfscale import optimizers
from tfscale.distribute import create_strategy

POLICIES = ["float32", "mixed_bfloat16", "mixed_float16"]
# Largest weight difference allowed between the 4-replica torus fit and the one-device fit, per policy: float16
# rounds to 2**-11, bfloat16 to 2**-8, and the two runs sum in different orders.
FIT_ATOL = {"float32": 1e-5, "mixed_float16": 3e-3, "mixed_bfloat16": 3e-2}


@pytest.fixture
def policy():
    """Sets a global mixed-precision policy for one test, then restores float32."""
    def _set(name):
        keras.mixed_precision.set_global_policy(name)
    yield _set
    keras.mixed_precision.set_global_policy("float32")


def test_lars_under_loss_scaling_equals_lars_in_float32():
    rng = np.random.default_rng(0)
    init = [rng.standard_normal((16, 8)).astype(np.float32), rng.standard_normal((8,)).astype(np.float32)]
    grads = [[0.01 * rng.standard_normal(w.shape).astype(np.float32) for w in init] for _ in range(3)]

    def make():
        return optimizers.build_optimizer("lars", 0.1, momentum=0.9, weight_decay=1e-4, lars_eta=0.001)

    plain = make()
    scaled = optimizers.build_optimizer("lars", 0.1, momentum=0.9, weight_decay=1e-4, lars_eta=0.001,
                                        loss_scale=True)
    assert isinstance(scaled, keras.optimizers.LossScaleOptimizer)
    assert isinstance(scaled.inner_optimizer, optimizers.LARS)
    v_plain = [keras.Variable(w, name=f"w{i}") for i, w in enumerate(init)]
    v_scaled = [keras.Variable(w, name=f"w{i}") for i, w in enumerate(init)]
    plain.build(v_plain)
    scaled.build(v_scaled)
    for step in grads:
        scale = float(scaled.dynamic_scale.numpy())
        # What a float16 model hands the optimizer: the gradients of the scaled loss, rounded to float16.
        g16 = [tf.cast(tf.cast(g * scale, tf.float16), tf.float32) for g in step]
        scaled.apply(g16, v_scaled)
        plain.apply([tf.constant(g) for g in step], v_plain)
    moved = max(float(np.max(np.abs(v.numpy() - w))) for v, w in zip(v_plain, init))
    assert moved > 1e-5
    for a, b in zip(v_scaled, v_plain):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-6)
    assert int(scaled.iterations.numpy()) == 3


def test_rmsprop_warmup_is_wrapped_too():
    opt = optimizers.build_optimizer("rmsprop_warmup", 0.1, steps_per_epoch=10, loss_scale=True)
    assert isinstance(opt.inner_optimizer, optimizers.RMSpropWarmup)


def _model(initial=None):
    model = keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(8, 3, padding="same", use_bias=False),
        keras.layers.BatchNormalization(synchronized=True, momentum=0.9),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10, dtype="float32", name="logits"),  # as tfscale.models' logits
    ])
    if initial is not None:
        model.set_weights(initial)
    return model


def _compile(model, loss_scale):
    model.compile(optimizer=optimizers.build_optimizer("lars", 0.5, momentum=0.9, weight_decay=1e-4,
                                                       loss_scale=loss_scale),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def _fit(model):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32 * 4, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 10, len(x)).astype(np.int32)
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(32), epochs=1, verbose=0, shuffle=False)
    return [w.numpy() for w in model.weights]


@pytest.mark.parametrize("dtype", POLICIES)
def test_fit_under_the_torus_matches_one_device(dtype, policy):
    policy(dtype)
    loss_scale = dtype == "mixed_float16"
    keras.utils.set_random_seed(0)
    initial = _model().get_weights()
    model = _model(initial)
    assert model.layers[-1].compute_dtype == "float32"  # the logits stay float32
    _compile(model, loss_scale)
    reference = _fit(model)
    strategy = create_strategy("torus", num_replicas=4, grid_shape="2x2")
    with strategy.scope():
        model = _model(initial)
        _compile(model, loss_scale)
    weights = _fit(model)
    bn = model.layers[1]
    assert bn.moving_mean.dtype == "float32" and bn.gamma.dtype == "float32"  # BN variables stay float32
    moved = max(float(np.max(np.abs(r - i))) for r, i in zip(reference, initial))
    assert moved > 1e-2
    for w, r in zip(weights, reference):
        assert np.all(np.isfinite(w))
        np.testing.assert_allclose(w, r, atol=FIT_ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", ["mixed_bfloat16", "mixed_float16"])
def test_a_model_saved_under_a_mixed_policy_loads_back(dtype, policy, tmp_path):
    from tfscale import models

    policy(dtype)
    model = models.build_model("resnet8", num_classes=10, image_size=28, input_normalization="imagenet")
    model.compile(optimizer=optimizers.build_optimizer("lars", 0.1, loss_scale=dtype == "mixed_float16"),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(2).integers(0, 256, (4, 28, 28, 3)).astype(np.uint8)
    expected = model.predict(x, verbose=0)
    assert expected.dtype == np.float32
    path = str(tmp_path / "model.keras")
    model.save(path)
    keras.mixed_precision.set_global_policy("float32")  # the saved layers carry their own policy
    loaded = keras.saving.load_model(path)
    assert loaded.layers[2].dtype_policy.name == dtype
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, rtol=1e-3, atol=1e-3)
    assert type(loaded.optimizer).__name__ == type(model.optimizer).__name__
