"""One MultiWorkerMirroredStrategy worker for tests/layers/test_batch_norm_multiworker.py.

Usage: TF_CONFIG=... python _mwms_bn_worker.py GROUP_SIZE OUT_JSON [recompute]

Runs one `DistributedBatchNormalization(group_size=GROUP_SIZE)(x, training=True)` step on
this worker's replica (slice `replica_id * 2 : replica_id * 2 + 2` of a fixed global batch),
with gradients of `sum(y * w)`, and writes the replica's output, gradients and moving
statistics to OUT_JSON. With `recompute`, instead builds a small model
(1x1 conv → DistributedBatchNormalization(GROUP_SIZE) → relu → 1x1 conv → Keras BN), runs
`recompute_batch_norm_statistics` on a `tf.data.Dataset` of global batches, and writes the
first conv's kernel and bias and both layers' new moving statistics.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras  # noqa: E402

from tfscale.layers import DistributedBatchNormalization  # noqa: E402
from tfscale.layers import recompute_batch_norm_statistics  # noqa: E402

PER_REPLICA_BATCH = 2


def global_batch(num_replicas):
    """The fixed global inputs and upstream gradients, float64 `[n * 2, 2, 2, 3]`."""
    rng = np.random.RandomState(0)
    shape = (num_replicas * PER_REPLICA_BATCH, 2, 2, 3)
    return rng.randn(*shape) * np.array([0.5, 2.0, 1.0]) + 1.0, rng.randn(*shape)


def main(group_size, out_path):
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    n = strategy.num_replicas_in_sync
    x, w = (a.astype(np.float32) for a in global_batch(n))
    b = PER_REPLICA_BATCH
    with strategy.scope():
        layer = DistributedBatchNormalization(group_size=group_size)
        layer.build(x.shape)

    @tf.function
    def step():
        def slice_of(array):
            return lambda ctx: tf.constant(
                array[ctx.replica_id_in_sync_group * b : (ctx.replica_id_in_sync_group + 1) * b]
            )

        xs = strategy.experimental_distribute_values_from_function(slice_of(x))
        ws = strategy.experimental_distribute_values_from_function(slice_of(w))

        def replica_fn(xr, wr):
            with tf.GradientTape() as tape:
                tape.watch(xr)
                y = layer(xr, training=True)
                loss = tf.reduce_sum(y * wr)
            gx, gg, gb = tape.gradient(loss, [xr, layer.gamma, layer.beta])
            return y, gx, gg, gb, tf.distribute.get_replica_context().replica_id_in_sync_group

        return strategy.run(replica_fn, (xs, ws))

    outputs = step()
    names = ["y", "dx", "dgamma", "dbeta", "replica_id"]
    result = {
        name: [v.numpy().tolist() for v in strategy.experimental_local_results(value)]
        for name, value in zip(names, outputs)
    }
    for name in ("moving_mean", "moving_variance"):
        result[name] = [
            v.numpy().tolist()
            for v in strategy.experimental_local_results(getattr(layer, name).value)
        ]
    with open(out_path, "w") as f:
        json.dump(result, f)


def recompute_data():
    """Fixed float32 inputs `[16, 4, 4, 2]` for the recompute mode (global batches of 8)."""
    return (np.random.RandomState(1).randn(16, 4, 4, 2) * 2 + 1).astype(np.float32)


def main_recompute(group_size, out_path):
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    keras.utils.set_random_seed(0)
    with strategy.scope():
        inputs = keras.Input((4, 4, 2))
        h = keras.layers.Conv2D(3, 1, name="conv1")(inputs)
        h = DistributedBatchNormalization(group_size=group_size, name="bn1")(h)
        h = keras.layers.ReLU()(h)
        h = keras.layers.Conv2D(2, 1, name="conv2")(h)
        h = keras.layers.BatchNormalization(name="bn2")(h)
        model = keras.Model(inputs, h)
    data = tf.data.Dataset.from_tensor_slices(recompute_data()).batch(8)
    used = recompute_batch_norm_statistics(model, data, num_batches=2)
    result = {"used": used}
    for name in ("bn1", "bn2"):
        layer = model.get_layer(name)
        result[name] = [np.asarray(layer.moving_mean).tolist(), np.asarray(layer.moving_variance).tolist()]
    for name in ("conv1", "conv2"):
        kernel, bias = model.get_layer(name).get_weights()
        result[name] = [kernel.tolist(), bias.tolist()]
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    group = None if sys.argv[1] == "None" else int(sys.argv[1])
    if len(sys.argv) > 3 and sys.argv[3] == "recompute":
        main_recompute(group, sys.argv[2])
    else:
        main(group, sys.argv[2])
