"""`tfscale.distribute.leave_cluster`: its argument checks and the one-process no-op. The 2-worker path (barrier,
then the chief leaves last) is tested end to end through train.py under the launcher
(tests/scripts/test_train_usability.py, slow)."""

import time

import pytest
import tensorflow as tf

from tfscale import distribute


@pytest.mark.parametrize("kwargs, match", [
    ({"timeout_seconds": 0}, "timeout_seconds=0"),
    ({"timeout_seconds": -1.0}, "timeout_seconds=-1.0"),
    ({"chief_grace_seconds": -0.5}, "chief_grace_seconds=-0.5"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        distribute.leave_cluster(tf.distribute.get_strategy(), **kwargs)


def test_one_process_strategies_return_at_once():
    start = time.time()
    assert distribute.leave_cluster(tf.distribute.get_strategy(), chief_grace_seconds=30.0) is True
    assert distribute.leave_cluster(tf.distribute.OneDeviceStrategy("/cpu:0"), chief_grace_seconds=30.0) is True
    assert time.time() - start < 5  # no barrier and no chief's grace without a cluster
