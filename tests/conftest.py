"""Test set-up shared by the whole suite.

TensorFlow's CPU is split into 8 logical devices before anything else touches TensorFlow,
the way Keras's own `distribute_test.py` does, so that multi-replica code (MirroredStrategy
with tfscale's all-reduce algorithms) runs on a CPU-only machine.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

NUM_LOGICAL_CPUS = 8


def _configure_logical_cpus(n):
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * n
        )
    except RuntimeError:
        # Already initialised (e.g. by a plugin); the tests that need N devices check.
        pass


_configure_logical_cpus(NUM_LOGICAL_CPUS)


@pytest.fixture
def cpu_devices():
    """The names of the logical CPU devices, e.g. ['/device:CPU:0', ...]."""
    return [d.name for d in tf.config.list_logical_devices("CPU")]
