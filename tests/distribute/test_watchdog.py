"""CollectiveWatchdog: one thread that aborts stalled collectives (no TF collectives needed here)."""

import threading
import time

import keras
import numpy as np
import pytest

from tfscale.distribute import CollectiveWatchdog


class _Abort:
    def __init__(self):
        self.messages = []
        self.called = threading.Event()

    def __call__(self, message):
        self.messages.append(message)
        self.called.set()


def test_fires_once_when_an_armed_step_stalls():
    abort = _Abort()
    dog = CollectiveWatchdog(timeout_seconds=0.3, poll_seconds=0.02, abort_fn=abort)
    dog.on_train_begin()
    dog.on_train_batch_begin(0)
    assert abort.called.wait(5.0)
    time.sleep(0.2)
    assert dog.fired and len(abort.messages) == 1
    assert "timeout_seconds=0.3" in abort.messages[0] and "peer worker" in abort.messages[0]


def test_progress_keeps_it_quiet():
    abort = _Abort()
    dog = CollectiveWatchdog(timeout_seconds=0.3, poll_seconds=0.02, abort_fn=abort)
    dog.on_train_begin()
    for step in range(20):  # 1 s of steps of 50 ms each: never 0.3 s without an event
        dog.on_train_batch_begin(step)
        time.sleep(0.05)
        dog.on_train_batch_end(step)
    dog.on_train_end()
    assert not dog.fired and not abort.messages


def test_disarmed_between_calls_and_nesting_is_counted():
    abort = _Abort()
    dog = CollectiveWatchdog(timeout_seconds=0.2, poll_seconds=0.02, abort_fn=abort)
    dog.on_train_begin()
    dog.on_test_begin()  # the validation inside fit
    dog.on_test_end()
    assert dog.armed  # still inside fit
    dog.on_train_end()
    assert not dog.armed
    time.sleep(0.6)  # e.g. saving the model between fit and evaluate: not a stall
    assert not dog.fired
    dog.on_test_begin()  # a later evaluate that stalls
    assert abort.called.wait(5.0)


def test_as_a_keras_callback_in_fit():
    abort = _Abort()
    dog = CollectiveWatchdog(timeout_seconds=30.0, abort_fn=abort)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.ones((32, 3), "float32"), np.ones((32, 1), "float32")
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, validation_data=(x, y), callbacks=[dog])
    model.evaluate(x, y, verbose=0, callbacks=[dog])
    assert not dog.armed and not dog.fired and not abort.messages


@pytest.mark.parametrize("kwargs, error", [({"timeout_seconds": 0}, ValueError), ({"timeout_seconds": -1.0}, ValueError),
                                           ({"timeout_seconds": "300"}, TypeError), ({"timeout_seconds": True}, TypeError),
                                           ({"poll_seconds": 0.0}, ValueError)])
def test_bad_arguments(kwargs, error):
    name = next(iter(kwargs))
    with pytest.raises(error, match=f"Argument `{name}` must be .*> 0.* Received: {name}="):
        CollectiveWatchdog(**kwargs)
