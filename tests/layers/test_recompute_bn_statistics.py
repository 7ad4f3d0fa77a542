"""Tests for `tfscale.layers.recompute_batch_norm_statistics` (Akiba et al., arXiv:1711.04325).

The reference recomputes every BN layer's input in numpy, batch by batch, with the
earlier BN layers normalising with their batch statistics (the training-time forward pass)
and dropout off, then pools all values: `np.mean` and `np.var` (biased) per channel.
"""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfscale.layers import DistributedBatchNormalization
from tfscale.layers import recompute_batch_norm_statistics

EPS = 1e-3


def _build_model(first_norm=keras.layers.BatchNormalization):
    """conv → BN (Keras's by default) → relu → dropout → [nested: conv → tfscale BN] →
    pool → dense."""
    inputs = keras.Input((5, 5, 2))
    h = keras.layers.Conv2D(3, 3, padding="same", name="conv1")(inputs)
    h = first_norm(
        epsilon=EPS,
        gamma_initializer=keras.initializers.Constant([0.5, 1.5, 2.0]),
        beta_initializer=keras.initializers.Constant([0.1, -0.2, 0.3]),
        name="bn1",
    )(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Dropout(0.5, name="dropout")(h)
    inner_in = keras.Input((5, 5, 3))
    g = keras.layers.Conv2D(4, 1, name="conv2")(inner_in)
    g = DistributedBatchNormalization(group_size=2, epsilon=EPS, name="bn2")(g)
    inner = keras.Model(inner_in, g, name="inner")
    h = inner(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(2, name="dense")(h)
    return keras.Model(inputs, outputs)


def _batches(sizes, seed=0):
    rng = np.random.RandomState(seed)
    return [(rng.randn(n, 5, 5, 2) * 2 + 1).astype(np.float32) for n in sizes]


def _numpy_reference(model, batches):
    """Population mean and biased variance of the inputs of bn1 and bn2, pooled."""
    conv1 = model.get_layer("conv1")
    bn1 = model.get_layer("bn1")
    conv2 = model.get_layer("inner").get_layer("conv2")
    inputs1, inputs2 = [], []
    for x in batches:
        a = np.asarray(conv1(x), np.float64)
        inputs1.append(a.reshape(-1, 3))
        mean, var = a.mean(axis=(0, 1, 2)), a.var(axis=(0, 1, 2))
        h = np.asarray(bn1.gamma) * (a - mean) / np.sqrt(var + EPS) + np.asarray(bn1.beta)
        h = np.maximum(h, 0.0)  # ReLU; dropout is off.
        inputs2.append(np.asarray(conv2(h.astype(np.float32)), np.float64).reshape(-1, 4))
    pooled1, pooled2 = np.concatenate(inputs1), np.concatenate(inputs2)
    return (pooled1.mean(0), pooled1.var(0)), (pooled2.mean(0), pooled2.var(0))


@pytest.mark.parametrize("as_dataset", [True, False], ids=["tf_data", "list_of_tuples"])
def test_exact_population_statistics_against_numpy(as_dataset):
    model = _build_model()
    batches = _batches([8, 8, 5, 8])
    labels = [np.zeros(len(x), np.int32) for x in batches]
    if as_dataset:
        data = tf.data.Dataset.from_tensor_slices(
            (np.concatenate(batches), np.concatenate(labels))
        ).batch(8)
        data = data.take(2).concatenate(
            tf.data.Dataset.from_tensors((batches[2], labels[2]))
        ).concatenate(tf.data.Dataset.from_tensors((batches[3], labels[3])))
    else:
        data = list(zip(batches, labels))
    trainable_before = [np.array(v) for v in model.trainable_weights]

    used = recompute_batch_norm_statistics(model, data, num_batches=3)

    assert used == {"bn1": 21, "bn2": 21}
    (mean1, var1), (mean2, var2) = _numpy_reference(model, batches[:3])
    bn1 = model.get_layer("bn1")
    bn2 = model.get_layer("inner").get_layer("bn2")
    np.testing.assert_allclose(bn1.moving_mean, mean1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn1.moving_variance, var1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn2.moving_mean, mean2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn2.moving_variance, var2, rtol=1e-5, atol=1e-5)
    # Not the unbiased variance, and not a running average.
    n = 21 * 25
    assert np.abs(np.asarray(bn1.moving_variance) - var1 * n / (n - 1)).max() > 1e-5
    for before, after in zip(trainable_before, model.trainable_weights):
        np.testing.assert_array_equal(before, after)
    # The layers' own `call` is back: inference uses the new statistics.
    assert "call" not in bn1.__dict__ and "call" not in bn2.__dict__
    x = batches[0]
    a = np.asarray(model.get_layer("conv1")(x))
    want = np.asarray(bn1.gamma) * (a - mean1) / np.sqrt(var1 + EPS) + np.asarray(bn1.beta)
    np.testing.assert_allclose(bn1(a, training=False), want, rtol=1e-4, atol=1e-4)


def test_frozen_bn_layers_are_left_alone():
    model = _build_model()
    bn1 = model.get_layer("bn1")
    bn1.trainable = False
    used = recompute_batch_norm_statistics(model, _batches([4]), num_batches=1)
    assert used == {"bn2": 4}
    np.testing.assert_array_equal(bn1.moving_mean, np.zeros(3))
    np.testing.assert_array_equal(bn1.moving_variance, np.ones(3))


def _bn(model, name):
    return model.get_layer(name) if name == "bn1" else model.get_layer("inner").get_layer(name)


@pytest.mark.parametrize(
    "case", ["tf_data_local_bn", "tf_data_group_bn", "tf_data_synchronized", "list_one_device"]
)
def test_model_under_a_strategy(cpu_devices, case):
    """A tf.data.Dataset is split across the replicas like `fit` does, and each BN layer
    normalises as in training (bn1: local, group of 2 replicas, or synchronised); any
    other iterable runs on one device with the whole batch."""
    if len(cpu_devices) < 2:
        pytest.skip("needs the logical CPUs of tests/conftest.py")
    strategy = tf.distribute.MirroredStrategy(
        cpu_devices[:2], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    first_norm = {
        "tf_data_group_bn": lambda **kw: DistributedBatchNormalization(group_size=2, **kw),
        "tf_data_synchronized": lambda **kw: keras.layers.BatchNormalization(
            synchronized=True, **kw
        ),
    }.get(case, keras.layers.BatchNormalization)
    reference = _build_model()
    with strategy.scope():
        model = _build_model(first_norm)
    model.set_weights(reference.get_weights())
    batches = _batches([6, 6, 6])
    split = [half for b in batches[:2] for half in (b[:3], b[3:])]
    if case == "list_one_device":
        data = batches
    else:
        data = tf.data.Dataset.from_tensor_slices(np.concatenate(batches)).batch(6)
    used = recompute_batch_norm_statistics(model, data, num_batches=2)
    assert used == {"bn1": 12, "bn2": 12}
    # bn1 sees conv outputs whatever the split; bn2's inputs depend on how bn1 normalised:
    # per replica (rows 3r..3r+2 of each global batch) only for local BN.
    (mean1, var1), (mean2, var2) = _numpy_reference(
        reference, split if case == "tf_data_local_bn" else batches[:2]
    )
    for name, mean, var in (("bn1", mean1, var1), ("bn2", mean2, var2)):
        layer = _bn(model, name)
        for replica_value in strategy.experimental_local_results(layer.moving_mean.value):
            np.testing.assert_allclose(replica_value, mean, rtol=1e-5, atol=1e-5)
        for replica_value in strategy.experimental_local_results(layer.moving_variance.value):
            np.testing.assert_allclose(replica_value, var, rtol=1e-5, atol=1e-5)
    # The two references differ, so the assertions above tell the cases apart.
    (_, _), (_, var2_split) = _numpy_reference(reference, split)
    (_, _), (_, var2_whole) = _numpy_reference(reference, batches[:2])
    assert np.abs(var2_whole - var2_split).max() > 1e-4


@pytest.mark.parametrize("num_batches", [0, -1, 1.5, True, None])
def test_bad_num_batches(num_batches):
    with pytest.raises(ValueError, match="num_batches"):
        recompute_batch_norm_statistics(_build_model(), _batches([2]), num_batches)


def test_empty_dataset():
    empty = tf.data.Dataset.from_tensor_slices(np.zeros((0, 5, 5, 2), np.float32)).batch(4)
    with pytest.raises(ValueError, match="no batches"):
        recompute_batch_norm_statistics(_build_model(), empty, num_batches=2)


def test_model_without_batch_norm_warns_and_changes_nothing():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs), name="no_bn")
    before = [np.array(v) for v in model.weights]
    with pytest.warns(UserWarning, match="no trainable BatchNormalization"):
        assert recompute_batch_norm_statistics(model, [np.ones((2, 3))], num_batches=1) == {}
    for b, a in zip(before, model.weights):
        np.testing.assert_array_equal(b, a)


def test_fewer_batches_than_requested_warns_and_uses_all():
    model = _build_model()
    with pytest.warns(UserWarning, match="only 2 batches"):
        used = recompute_batch_norm_statistics(model, _batches([3, 4]), num_batches=5)
    assert used == {"bn1": 7, "bn2": 7}


def test_unbuilt_model_raises():
    layer = keras.layers.BatchNormalization()
    model = keras.Sequential([layer])
    with pytest.raises(ValueError, match="not built"):
        recompute_batch_norm_statistics(model, [np.ones((2, 3))], num_batches=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.build((None, 3))
        assert recompute_batch_norm_statistics(model, [np.ones((2, 3))], num_batches=1) == {
            layer.name: 2
        }
