"""Tests for `tfscale.layers.DistributedBatchNormalization` (Ying et al., arXiv:1811.06992).

References are independent: a numpy "ghost BN" (forward and analytic backward, float64)
for the group statistics, and one-device Keras models for the `fit` equivalences.
"""

import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfscale.layers import DistributedBatchNormalization

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _ghost_bn_reference import ghost_bn_numpy  # noqa: E402

CHANNELS = 3
PER_REPLICA_BATCH = 2
MOMENTUM = 0.9
EPSILON = 1e-5


# ----------------------------------------------------------------------------- references


def _strategy(devices, cross_device_ops=None):
    if len(tf.config.list_logical_devices("CPU")) < len(devices):
        pytest.skip("needs the logical CPUs of tests/conftest.py")
    return tf.distribute.MirroredStrategy(devices, cross_device_ops=cross_device_ops)


def _run_training_step(strategy, layer, x, w):
    """One `layer(x, training=True)` per replica; per-replica outputs and gradients."""
    n = strategy.num_replicas_in_sync
    b = x.shape[0] // n

    @tf.function
    def step():
        def slice_fn(array):
            return lambda ctx: tf.constant(
                array[ctx.replica_id_in_sync_group * b : (ctx.replica_id_in_sync_group + 1) * b]
            )

        xs = strategy.experimental_distribute_values_from_function(slice_fn(x))
        ws = strategy.experimental_distribute_values_from_function(slice_fn(w))

        def replica_fn(xr, wr):
            with tf.GradientTape() as tape:
                tape.watch(xr)
                yr = layer(xr, training=True)
                loss = tf.reduce_sum(yr * wr)
            gx, gg, gb = tape.gradient(loss, [xr, layer.gamma, layer.beta])
            return yr, gx, gg, gb

        return strategy.run(replica_fn, (xs, ws))

    y, gx, gg, gb = step()
    local = strategy.experimental_local_results
    return (
        np.concatenate([v.numpy() for v in local(y)]),
        np.concatenate([v.numpy() for v in local(gx)]),
        np.sum([v.numpy() for v in local(gg)], axis=0),
        np.sum([v.numpy() for v in local(gb)], axis=0),
    )


def _inputs(num_replicas, seed):
    rng = np.random.RandomState(seed)
    shape = (num_replicas * PER_REPLICA_BATCH, 2, 2, CHANNELS)
    # Non-zero means and unequal scales per channel.
    x = rng.randn(*shape) * np.array([0.5, 2.0, 1.0]) + np.array([1.0, -0.5, 0.0])
    w = rng.randn(*shape)
    gamma = rng.uniform(0.5, 1.5, CHANNELS)
    beta = rng.randn(CHANNELS)
    return x, w, gamma, beta


# ------------------------------------------------------------------- ghost BN equivalence


@pytest.mark.parametrize(
    "num_replicas,group_size",
    [(4, 1), (4, 2), (4, 4), (8, 1), (8, 2), (8, 4), (8, 8), (4, None)],
)
def test_matches_numpy_ghost_bn(cpu_devices, num_replicas, group_size):
    strategy = _strategy(cpu_devices[:num_replicas], tf.distribute.ReductionToOneDevice())
    x, w, gamma, beta = _inputs(num_replicas, seed=num_replicas * 10 + (group_size or 0))
    with strategy.scope():
        layer = DistributedBatchNormalization(
            group_size=group_size,
            momentum=MOMENTUM,
            epsilon=EPSILON,
            gamma_initializer=keras.initializers.Constant(gamma),
            beta_initializer=keras.initializers.Constant(beta),
        )
        layer.build(x.shape)
    y, dx, dgamma, dbeta = _run_training_step(
        strategy, layer, x.astype(np.float32), w.astype(np.float32)
    )
    group_examples = (group_size or num_replicas) * PER_REPLICA_BATCH
    ref = ghost_bn_numpy(x, w, gamma, beta, group_examples)
    np.testing.assert_allclose(y, ref[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(dx, ref[1], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(dgamma, ref[2], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(dbeta, ref[3], atol=1e-5, rtol=1e-5)

    # Moving statistics: identical on every replica, equal to the average of the group
    # statistics folded in with the momentum.
    local = strategy.experimental_local_results
    moving_means = [v.numpy() for v in local(layer.moving_mean.value)]
    moving_variances = [v.numpy() for v in local(layer.moving_variance.value)]
    assert len(moving_means) == num_replicas
    for m, v in zip(moving_means, moving_variances):
        np.testing.assert_array_equal(m, moving_means[0])
        np.testing.assert_array_equal(v, moving_variances[0])
    np.testing.assert_allclose(moving_means[0], (1 - MOMENTUM) * ref[4], atol=1e-5)
    np.testing.assert_allclose(
        moving_variances[0], MOMENTUM + (1 - MOMENTUM) * ref[5], atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize(
    "cross_device_ops",
    [None, tf.distribute.HierarchicalCopyAllReduce(num_packs=1)],
    ids=["default_collective", "hierarchical_copy"],
)
def test_ghost_bn_with_other_cross_device_ops(cpu_devices, cross_device_ops):
    num_replicas, group_size = 4, 2
    strategy = _strategy(cpu_devices[:num_replicas], cross_device_ops)
    x, w, gamma, beta = _inputs(num_replicas, seed=3)
    with strategy.scope():
        layer = DistributedBatchNormalization(
            group_size=group_size,
            gamma_initializer=keras.initializers.Constant(gamma),
            beta_initializer=keras.initializers.Constant(beta),
        )
        layer.build(x.shape)
    y, dx, dgamma, dbeta = _run_training_step(
        strategy, layer, x.astype(np.float32), w.astype(np.float32)
    )
    ref = ghost_bn_numpy(x, w, gamma, beta, group_size * PER_REPLICA_BATCH)
    for got, want in zip((y, dx, dgamma, dbeta), ref[:4]):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_sums_are_shifted_by_the_moving_mean(cpu_devices):
    """Inputs with mean 1000 and std 1: the shift by the moving mean keeps float32 exact."""
    strategy = _strategy(cpu_devices[:4], tf.distribute.ReductionToOneDevice())
    rng = np.random.RandomState(7)
    offset = np.array([1000.0, -500.0, 2000.0])
    x = rng.randn(4 * PER_REPLICA_BATCH, 2, 2, CHANNELS) + offset
    w = rng.randn(*x.shape)
    with strategy.scope():
        layer = DistributedBatchNormalization(
            group_size=2, moving_mean_initializer=keras.initializers.Constant(offset + 0.3)
        )
        layer.build(x.shape)
    y, dx, _, _ = _run_training_step(strategy, layer, x.astype(np.float32), w.astype(np.float32))
    ref = ghost_bn_numpy(
        x.astype(np.float32).astype(np.float64), w, np.ones(3), np.zeros(3), 2 * PER_REPLICA_BATCH
    )
    # The float32 spacing at 2000 is 1.2e-4, so (x - mean) itself is only that exact.
    np.testing.assert_allclose(y, ref[0], atol=5e-4)
    np.testing.assert_allclose(dx, ref[1], atol=5e-4)

    # Unshifted (moving mean 0), E[x^2] - E[x]^2 cancels catastrophically in float32.
    with strategy.scope():
        unshifted = DistributedBatchNormalization(group_size=2)
        unshifted.build(x.shape)
    y_unshifted, _, _, _ = _run_training_step(
        strategy, unshifted, x.astype(np.float32), w.astype(np.float32)
    )
    assert np.abs(y_unshifted - ref[0]).max() > 1e-2


def test_mixed_precision_statistics_in_float32(cpu_devices):
    strategy = _strategy(cpu_devices[:4], tf.distribute.ReductionToOneDevice())
    x, w, gamma, beta = _inputs(4, seed=11)
    x16 = x.astype(np.float16)
    with strategy.scope():
        layer = DistributedBatchNormalization(group_size=2, dtype="mixed_float16")
        layer.build(x.shape)
    assert layer.moving_mean.dtype == "float32" and layer.gamma.dtype == "float32"
    n, b = 4, PER_REPLICA_BATCH

    @tf.function
    def step():
        xs = strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(
                x16[ctx.replica_id_in_sync_group * b : (ctx.replica_id_in_sync_group + 1) * b]
            )
        )
        return strategy.run(lambda xr: layer(xr, training=True), (xs,))

    outputs = strategy.experimental_local_results(step())
    assert all(o.dtype == tf.float16 for o in outputs) and len(outputs) == n
    y = np.concatenate([o.numpy() for o in outputs]).astype(np.float64)
    ref = ghost_bn_numpy(x16.astype(np.float64), w, np.ones(3), np.zeros(3), 2 * b)
    np.testing.assert_allclose(y, ref[0], atol=1e-2)  # float16 output rounding.
    np.testing.assert_allclose(layer.moving_mean, 0.1 * ref[4], atol=1e-5)


# ------------------------------------------------------------- plain BN outside strategies


def test_outside_any_strategy_equals_keras_batch_norm():
    rng = np.random.RandomState(0)
    x = (rng.randn(8, 3, 3, 4) * 2 + 1).astype(np.float32)
    ours = DistributedBatchNormalization(group_size=4, momentum=0.8, epsilon=1e-3)
    keras_bn = keras.layers.BatchNormalization(momentum=0.8, epsilon=1e-3)
    for _ in range(2):
        np.testing.assert_allclose(
            ours(x, training=True), keras_bn(x, training=True), atol=1e-5
        )
    np.testing.assert_allclose(ours.moving_mean, keras_bn.moving_mean, atol=1e-6)
    np.testing.assert_allclose(ours.moving_variance, keras_bn.moving_variance, atol=1e-6)
    np.testing.assert_allclose(ours(x, training=False), keras_bn(x, training=False), atol=1e-5)
    assert [v.name for v in ours.weights] == [v.name for v in keras_bn.weights]


def test_frozen_layer_uses_moving_statistics():
    layer = DistributedBatchNormalization(moving_mean_initializer="ones")
    layer.trainable = False
    x = np.full((2, 3), 5.0, np.float32)
    np.testing.assert_allclose(layer(x, training=True), (5.0 - 1.0) / np.sqrt(1 + 1e-5), rtol=1e-6)
    np.testing.assert_array_equal(layer.moving_mean, np.ones(3))


# ------------------------------------------------------------------------ fit equivalence


def _model(norm_layer, seed=1):
    inputs = keras.Input((4, 4, 2))
    x = keras.layers.Conv2D(
        4, 3, padding="same", use_bias=False,
        kernel_initializer=keras.initializers.GlorotUniform(seed),
    )(inputs)
    x = norm_layer()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, kernel_initializer=keras.initializers.GlorotUniform(seed + 1))(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


class _GhostBatchNorm(keras.layers.Layer):
    """Test reference: one-device BN over `num_splits` contiguous slices of the batch."""

    def __init__(self, num_splits, momentum, epsilon, **kwargs):
        super().__init__(**kwargs)
        self.num_splits = num_splits
        self.momentum = momentum
        self.epsilon = epsilon

    def build(self, input_shape):
        c = (input_shape[-1],)
        self.gamma = self.add_weight(shape=c, initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=c, initializer="zeros", name="beta")
        self.moving_mean = self.add_weight(shape=c, initializer="zeros", trainable=False, name="moving_mean")
        self.moving_variance = self.add_weight(shape=c, initializer="ones", trainable=False, name="moving_variance")

    def call(self, x, training=None):
        if not training:
            return tf.nn.batch_normalization(
                x, self.moving_mean, self.moving_variance, self.beta, self.gamma, self.epsilon
            )
        outputs, means, variances = [], [], []
        for chunk in tf.split(x, self.num_splits, axis=0):
            mean, var = tf.nn.moments(chunk, axes=[0, 1, 2])
            outputs.append(
                tf.nn.batch_normalization(chunk, mean, var, self.beta, self.gamma, self.epsilon)
            )
            means.append(mean)
            variances.append(var)
        m = self.momentum
        self.moving_mean.assign(m * self.moving_mean + (1 - m) * tf.add_n(means) / self.num_splits)
        self.moving_variance.assign(
            m * self.moving_variance + (1 - m) * tf.add_n(variances) / self.num_splits
        )
        return tf.concat(outputs, axis=0)


def _data(n=48, seed=0):
    rng = np.random.RandomState(seed)
    x = (rng.randn(n, 4, 4, 2) + 0.5).astype(np.float32)
    y = rng.randint(0, 3, n).astype(np.int32)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(16)


def _fit_weights(model):
    model.fit(_data(), epochs=1, shuffle=False, verbose=0)
    return [np.asarray(v) for v in model.weights]


@pytest.mark.parametrize(
    "group_size,reference_norm",
    [
        (4, lambda: keras.layers.BatchNormalization(momentum=MOMENTUM, epsilon=EPSILON)),
        (1, lambda: _GhostBatchNorm(4, MOMENTUM, EPSILON)),
        (2, lambda: _GhostBatchNorm(2, MOMENTUM, EPSILON)),
    ],
    ids=["G4_equals_one_device_bn", "G1_equals_ghost_bn", "G2_equals_ghost_bn"],
)
def test_fit_on_four_replicas_equals_one_device_reference(cpu_devices, group_size, reference_norm):
    strategy = _strategy(cpu_devices[:4], tf.distribute.ReductionToOneDevice())
    reference = _model(reference_norm)
    want = _fit_weights(reference)
    with strategy.scope():
        model = _model(lambda: DistributedBatchNormalization(group_size=group_size))
    got = _fit_weights(model)
    assert len(got) == len(want)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)
    # The training actually moved the weights and the statistics.
    bn = model.layers[2]
    assert np.abs(np.asarray(bn.moving_mean)).max() > 1e-3
    for values in (bn.moving_mean.value, bn.moving_variance.value, bn.gamma.value):
        replicas = [v.numpy() for v in strategy.experimental_local_results(values)]
        for v in replicas:
            np.testing.assert_array_equal(v, replicas[0])


def test_keras_local_bn_moving_statistics_drift_but_ours_do_not(cpu_devices):
    """The motivation: Keras's local BN keeps a different moving mean on each replica."""
    strategy = _strategy(cpu_devices[:4], tf.distribute.ReductionToOneDevice())
    with strategy.scope():
        keras_model = _model(lambda: keras.layers.BatchNormalization(momentum=MOMENTUM))
        ours = _model(lambda: DistributedBatchNormalization(group_size=1))
    keras_model.fit(_data(), epochs=1, shuffle=False, verbose=0)
    ours.fit(_data(), epochs=1, shuffle=False, verbose=0)
    local = strategy.experimental_local_results
    keras_means = [v.numpy() for v in local(keras_model.layers[2].moving_mean.value)]
    our_means = [v.numpy() for v in local(ours.layers[2].moving_mean.value)]
    assert max(np.abs(m - keras_means[0]).max() for m in keras_means) > 1e-4
    assert max(np.abs(m - our_means[0]).max() for m in our_means) == 0.0


# --------------------------------------------------------------------- serialisation


def test_get_config_round_trip():
    layer = DistributedBatchNormalization(
        group_size=2, momentum=0.8, epsilon=1e-4, axis=1, gamma_initializer="zeros",
        gamma_regularizer=keras.regularizers.L2(1e-4), name="bn",
    )
    config = layer.get_config()
    assert config["group_size"] == 2
    assert "synchronized" not in config and "renorm" not in config
    clone = DistributedBatchNormalization.from_config(config)
    assert clone.get_config() == config
    assert keras.saving.get_registered_name(DistributedBatchNormalization) == (
        "tfscale>DistributedBatchNormalization"
    )


def test_loads_keras_batch_norm_config():
    config = keras.layers.BatchNormalization(momentum=0.7).get_config()
    layer = DistributedBatchNormalization.from_config(config)
    assert layer.momentum == 0.7 and layer.group_size is None


def test_keras_file_round_trip(tmp_path):
    inputs = keras.Input((3, 3, 2))
    x = keras.layers.Conv2D(4, 1)(inputs)
    x = DistributedBatchNormalization(
        group_size=2, gamma_initializer="zeros", beta_regularizer=keras.regularizers.L2(1e-3)
    )(x)
    model = keras.Model(inputs, x)
    data = np.random.RandomState(0).randn(4, 3, 3, 2).astype(np.float32)
    model(data, training=True)  # Moves the moving statistics away from their init.
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    bn = loaded.layers[-1]
    assert isinstance(bn, DistributedBatchNormalization)
    assert bn.group_size == 2
    np.testing.assert_array_equal(bn.gamma, np.zeros(4))
    np.testing.assert_allclose(loaded(data), model(data), atol=1e-6)
    np.testing.assert_array_equal(bn.moving_mean, model.layers[-1].moving_mean)


# -------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("group_size", [0, -2, 2.0, True, "4"])
def test_bad_group_size_type(group_size):
    with pytest.raises(ValueError, match="group_size"):
        DistributedBatchNormalization(group_size=group_size)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"momentum": 1.0}, "momentum"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"synchronized": True}, "synchronized"),
        ({"renorm": True}, "renorm"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistributedBatchNormalization(**kwargs)


def test_group_size_not_dividing_replicas_raises_at_build(cpu_devices):
    strategy = _strategy(cpu_devices[:4], tf.distribute.ReductionToOneDevice())
    with strategy.scope():
        layer = DistributedBatchNormalization(group_size=3)
        with pytest.raises(ValueError, match=r"group_size=3, num_replicas=4"):
            layer.build((None, 2))


def test_group_size_not_dividing_replicas_raises_at_call(cpu_devices):
    layer = DistributedBatchNormalization(group_size=8)
    layer.build((None, 2))  # Built outside the strategy: checked in the replica context.
    strategy = _strategy(cpu_devices[:4], tf.distribute.ReductionToOneDevice())
    x = tf.ones((2, 2))
    with pytest.raises(ValueError, match=r"group_size=8, num_replicas=4"):
        strategy.run(tf.function(lambda: layer(x, training=True)))
