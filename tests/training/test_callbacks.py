"""Tests for tfscale.training.callbacks and results."""

import json
import math

import keras
import numpy as np
import pytest

from tfscale import training


def _fit(callback, epochs=2, steps=5, batch=8):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x = np.zeros((steps * batch, 4), "float32")
    y = np.zeros((steps * batch, 1), "float32")
    return model.fit(x, y, batch_size=batch, epochs=epochs, validation_data=(x, y), callbacks=[callback],
                     verbose=0)


def test_throughput_counts_images_after_the_first_step():
    cb = training.ThroughputCallback(global_batch_size=8)
    history = _fit(cb)
    assert len(cb.images_per_second) == 2
    for ips, seconds in zip(cb.images_per_second, cb.epoch_seconds):
        assert ips > 0 and seconds > 0
        # 4 timed steps of 8 images can't be faster than 32 images in the whole epoch's wall time.
        assert ips >= 32 / seconds
    assert history.history["images_per_second"] == cb.images_per_second
    assert all(0 < e <= s for e, s in zip(history.history["eval_seconds"], cb.epoch_seconds))


def test_throughput_with_a_batch_schedule_callable():
    seen = []
    cb = training.ThroughputCallback(global_batch_size=lambda epoch: seen.append(epoch) or 8)
    _fit(cb, epochs=2)
    assert seen == [0, 1]


def test_throughput_one_step_epoch_is_nan_not_an_error():
    cb = training.ThroughputCallback(global_batch_size=8)
    _fit(cb, epochs=1, steps=1)
    assert math.isnan(cb.images_per_second[0])


def test_throughput_rejects_bad_batch():
    with pytest.raises(ValueError, match="global_batch_size=0"):
        training.ThroughputCallback(global_batch_size=0)


def test_write_results_is_json_with_nan_as_null(tmp_path):
    path = training.write_results(str(tmp_path / "a" / "results.json"),
                                  {"top1": np.float32(0.5), "ips": float("nan"), "xs": (1, 2), "obj": object})
    with open(path) as f:
        data = json.load(f)
    assert data["top1"] == 0.5 and data["ips"] is None and data["xs"] == [1, 2]
    assert isinstance(data["obj"], str)
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["results.json"]  # no temporary file left


def test_evaluate_top_k_counts_exactly_and_ignores_padding():
    import tensorflow as tf

    model = keras.Sequential([keras.Input((3,)), keras.layers.Identity()])  # logits = inputs
    x = np.array([[3, 2, 1], [1, 3, 2], [1, 2, 3], [9, 9, 9]], "float32")
    y = np.eye(3, dtype="float32")[[0, 2, 0, 1]]  # right, second best, worst, padding
    w = np.array([1, 1, 1, 0], "float32")
    ds = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(3)
    result = training.evaluate_top_k(model, ds, ks=(1, 2, 5))
    assert result == {"top1": 1 / 3, "top2": 2 / 3, "top5": 1.0, "num_examples": 3}
    with pytest.raises(ValueError, match="non-zero weight"):
        training.evaluate_top_k(model, ds.take(0))


def _live_distributed_iterators():
    import gc

    import tensorflow as tf

    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, tf.distribute.DistributedIterator))


def _fit_with_distributed_validation(devices, release):
    """3 epochs with validation on 2 replicas; returns (val_loss per epoch, live iterators per epoch end, callback)."""
    import tensorflow as tf

    # An explicit one-level reduction: MirroredStrategy's default on CPUs uses collectives whose group key 1 is
    # process-wide, and an earlier test's 4-device group would make this 2-device one fail.
    strategy = tf.distribute.MirroredStrategy(devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
    x = np.arange(64 * 4, dtype="float32").reshape(64, 4) / 100.0
    y = x.sum(axis=1, keepdims=True)
    train = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat())
    val = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((x, y)).batch(16))
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(0.01), "mse")
    live = []

    class Count(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):  # after the epoch's validation and its on_test_end
            live.append(_live_distributed_iterators())

    release_cb = training.ReleaseValidationIterator()
    callbacks = [release_cb, Count()] if release else [Count()]
    history = model.fit(train, steps_per_epoch=4, epochs=3, validation_data=val, callbacks=callbacks, verbose=0)
    return history.history["val_loss"], live, release_cb


def test_release_validation_iterator_drops_the_finished_iterator_and_changes_no_result(cpu_devices):
    """After a validation pass only the training iterator is alive with the callback; two without it."""
    val_loss_kept, live_kept, _ = _fit_with_distributed_validation(cpu_devices[:2], release=False)
    val_loss, live, callback = _fit_with_distributed_validation(cpu_devices[:2], release=True)
    assert live_kept[-1] >= 2, live_kept  # Keras keeps the finished validation iterator until the next pass
    assert live == [1, 1, 1], live  # the training iterator only
    assert callback.released == 3
    np.testing.assert_allclose(val_loss, val_loss_kept, rtol=1e-6)


def test_release_validation_iterator_skips_itself_on_an_untested_tensorflow(cpu_devices, monkeypatch):
    """On an untested TF/Keras (Horovod's environment has TF 2.18) the callback leaves the iterator to Keras and
    training goes on; it counts the skipped passes instead of raising from the version guard."""
    import tensorflow as tf

    monkeypatch.delenv("TFSCALE_ALLOW_UNTESTED_TF", raising=False)
    monkeypatch.setattr(tf, "__version__", "2.18.1")
    val_loss, live, callback = _fit_with_distributed_validation(cpu_devices[:2], release=True)
    assert callback.released == 0 and callback.skipped == 3
    assert len(val_loss) == 3
    assert live[-1] >= 2, live  # the finished validation iterator is still alive: nothing was released
