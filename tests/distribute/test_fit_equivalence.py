"""Keras model.fit under MirroredStrategy with tfscale's all-reduce equals a 1-device run."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfscale.distribute import create_strategy

GLOBAL_BATCH = 32
STEPS = 20


def _data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((GLOBAL_BATCH * STEPS, 8)).astype(np.float32)
    w = rng.standard_normal((8, 3)).astype(np.float32)
    y = np.argmax(x @ w + 0.1 * rng.standard_normal((len(x), 3)), axis=1).astype(np.int32)
    return x, y


def _model(initial_weights=None):
    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="tanh"),
        keras.layers.Dense(3),
    ])
    if initial_weights is not None:
        model.set_weights(initial_weights)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.5, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _fit(model, x, y):
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    history = model.fit(dataset, epochs=1, shuffle=False, verbose=0)
    return [w.numpy() if hasattr(w, "numpy") else np.asarray(w) for w in model.weights], history


@pytest.mark.parametrize("algorithm, num_replicas, kwargs", [
    ("torus", 4, {}),
    ("torus", 8, {"grid_shape": "4x2"}),
    ("hierarchical", 8, {"devices_per_node": 4}),
    ("ring", 4, {"bytes_per_pack": 0}),
])
def test_fit_matches_one_device(algorithm, num_replicas, kwargs):
    x, y = _data()
    keras.utils.set_random_seed(1)
    initial = _model().get_weights()

    reference, _ = _fit(_model(initial), x, y)

    strategy = create_strategy(algorithm, num_replicas=num_replicas, **kwargs)
    op = strategy.extended._cross_device_ops  # pylint: disable=protected-access
    with strategy.scope():
        model = _model(initial)
    weights, history = _fit(model, x, y)

    # The counter proves Keras's gradient aggregation went through our op.
    assert op.num_batch_reduce_calls >= 1
    assert op.num_reduced_tensors >= 4  # 2 kernels + 2 biases per call.
    moved = max(float(np.max(np.abs(w - i))) for w, i in zip(reference, initial))
    assert moved > 1e-2  # Training really changed the weights.
    for w, r in zip(weights, reference):
        np.testing.assert_allclose(w, r, atol=1e-5, rtol=0)
    assert np.isfinite(history.history["loss"][-1])
