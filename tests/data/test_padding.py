"""pad_eval_batches: every replica gets a full batch, padding carries weight 0, nothing real is lost."""

import numpy as np
import pytest
import tensorflow as tf

from tfscale.data import pad_eval_batches


def _batches(num_images, batch_size):
    x = np.arange(num_images, dtype=np.float32).reshape(-1, 1, 1, 1) + 1.0
    y = np.eye(3, dtype=np.float32)[np.arange(num_images) % 3]
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


@pytest.mark.parametrize("num_images, batch_size, num_replicas", [(10, 4, 1), (10, 4, 2), (10, 4, 4), (8, 4, 2),
                                                                  (1, 4, 4), (13, 3, 3)])
def test_pads_to_full_batches_with_zero_weight(num_images, batch_size, num_replicas):
    out = list(pad_eval_batches(_batches(num_images, batch_size), batch_size, num_replicas).as_numpy_iterator())
    assert len(out) % num_replicas == 0
    real = []
    for x, y, w in out:
        assert x.shape == (batch_size, 1, 1, 1) and y.shape == (batch_size, 3) and w.shape == (batch_size,)
        assert set(np.unique(w)) <= {0.0, 1.0}
        real.extend(x[w == 1].ravel().tolist())
        assert np.all(x[w == 0] == 0) and np.all(y[w == 0] == 0)
    assert sorted(real) == list(np.arange(num_images, dtype=np.float32) + 1.0)  # Each real image once.
    # No more padding batches than needed to round the count up to a multiple of num_replicas.
    assert len(out) == -(-(-(-num_images // batch_size)) // num_replicas) * num_replicas


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"num_replicas": 0}, {"batch_size": 2.5}])
def test_bad_arguments(kwargs):
    args = {"batch_size": 4, "num_replicas": 2, **kwargs}
    with pytest.raises(ValueError, match=f"{list(kwargs)[0]}"):
        pad_eval_batches(_batches(4, 4), **args)
