"""Tests for `tfscale.training.bn_statistics.RecomputeBatchNormStatistics`.

References: `tfscale.layers.recompute_batch_norm_statistics` called directly (itself checked
against numpy in tests/layers/test_recompute_bn_statistics.py), and a run without the
callback for the recovery of evaluation accuracy after a short, high-momentum run.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfscale.layers import DistributedBatchNormalization
from tfscale.layers import recompute_batch_norm_statistics
from tfscale.training.bn_statistics import RecomputeBatchNormStatistics


def _rings(n, seed):
    """Two classes split by radius (inside/outside the median circle) in 2 features,
    far from zero mean (mean 4, scale 3): the ReLU thresholds must sit at the right
    place, which only the right normalisation statistics give."""
    rng = np.random.RandomState(seed)
    x = rng.randn(n, 2)
    y = (np.sum(x**2, axis=1) > 2 * np.log(2)).astype(np.int32)  # Median of chi2(2).
    return (3.0 * x + 4.0).astype(np.float32), y


def _model(norm, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((2,))
    h = keras.layers.Dense(32, use_bias=False)(inputs)
    h = norm()(h)
    h = keras.layers.ReLU()(h)
    outputs = keras.layers.Dense(2)(h)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(0.02),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _train_data():
    x, y = _rings(1024, seed=1)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(32)


def test_runs_at_train_end_and_sets_recomputed_statistics():
    norm = lambda: DistributedBatchNormalization(momentum=0.99)  # noqa: E731
    plain = _model(norm)
    plain.fit(_train_data(), epochs=1, verbose=0, shuffle=False)
    model = _model(norm)
    callback = RecomputeBatchNormStatistics(_train_data(), num_batches=4)
    model.fit(_train_data(), epochs=1, verbose=0, callbacks=[callback], shuffle=False)
    assert callback.results == [{model.layers[2].name: 128}]
    bn, plain_bn = model.layers[2], plain.layers[2]
    # Same trainable weights as without the callback, different moving statistics...
    for a, b in zip(model.trainable_weights, plain.trainable_weights):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert np.abs(np.asarray(bn.moving_mean) - np.asarray(plain_bn.moving_mean)).max() > 0.1
    # ... equal to those the function computes directly on the trained weights.
    recompute_batch_norm_statistics(plain, _train_data(), num_batches=4)
    np.testing.assert_allclose(bn.moving_mean, plain_bn.moving_mean, rtol=1e-6)
    np.testing.assert_allclose(bn.moving_variance, plain_bn.moving_variance, rtol=1e-6)


def test_before_each_evaluation():
    model = _model(lambda: keras.layers.BatchNormalization(momentum=0.99))
    callback = RecomputeBatchNormStatistics(
        _train_data(), num_batches=2, before_each_evaluation=True
    )
    x_val, y_val = _rings(64, seed=2)
    model.fit(
        _train_data().take(3), epochs=2, verbose=0, callbacks=[callback], shuffle=False,
        validation_data=(x_val, y_val),
    )
    assert len(callback.results) == 3  # Two validation passes, then the end of training.
    model.evaluate(x_val, y_val, verbose=0, callbacks=[callback])
    assert len(callback.results) == 4
    quiet = RecomputeBatchNormStatistics(_train_data(), num_batches=2)
    model.evaluate(x_val, y_val, verbose=0, callbacks=[quiet])
    assert quiet.results == []


def test_recovers_accuracy_lost_by_moving_averages():
    """Akiba et al.'s point: after a short run at momentum 0.99 (32 steps) the moving
    averages are still near their initial values (mean 0, variance 1) while the BN inputs
    have means and variances of order 10 and 100, so evaluation with them is at chance;
    recomputed statistics give back the accuracy of the batch-statistics network."""
    x_test, y_test = _rings(1024, seed=3)
    model = _model(lambda: keras.layers.BatchNormalization(momentum=0.99))
    model.fit(_train_data(), epochs=1, verbose=0, shuffle=False)
    _, moving_average_accuracy = model.evaluate(x_test, y_test, verbose=0)
    recompute_batch_norm_statistics(model, _train_data(), num_batches=32)
    _, recomputed_accuracy = model.evaluate(x_test, y_test, verbose=0)
    # Reference: the training-mode (batch statistics) accuracy on the whole test set.
    logits = model(x_test, training=True)
    batch_stat_accuracy = float(np.mean(np.argmax(logits, axis=1) == y_test))
    assert batch_stat_accuracy > 0.8
    assert recomputed_accuracy > batch_stat_accuracy - 0.03
    assert moving_average_accuracy < 0.6


def test_under_mirrored_strategy(cpu_devices):
    if len(cpu_devices) < 2:
        pytest.skip("needs the logical CPUs of tests/conftest.py")
    strategy = tf.distribute.MirroredStrategy(
        cpu_devices[:2], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    with strategy.scope():
        model = _model(lambda: DistributedBatchNormalization(group_size=1))
    callback = RecomputeBatchNormStatistics(_train_data(), num_batches=3)
    model.fit(_train_data().take(4), epochs=1, verbose=0, callbacks=[callback], shuffle=False)
    bn = model.layers[2]
    values = strategy.experimental_local_results(bn.moving_variance.value)
    np.testing.assert_array_equal(values[0], values[1])
    # Equal to a one-device recomputation with the trained weights.
    reference = _model(lambda: DistributedBatchNormalization(group_size=1))
    reference.set_weights(model.get_weights())
    recompute_batch_norm_statistics(reference, _train_data(), num_batches=3)
    np.testing.assert_allclose(values[0], reference.layers[2].moving_variance, rtol=1e-6)


@pytest.mark.parametrize("num_batches", [0, 2.5])
def test_bad_num_batches(num_batches):
    with pytest.raises(ValueError, match="num_batches"):
        RecomputeBatchNormStatistics(_train_data(), num_batches=num_batches)
