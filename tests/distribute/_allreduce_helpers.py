"""Shared helpers for the all-reduce tests: build PerReplica values, run, compare."""

import numpy as np
import tensorflow as tf
from tensorflow.python.distribute import values as values_lib

# Odd sizes on purpose: scalars, 1, 7 and 1001 elements, a matrix, an empty tensor.
SHAPES = [(), (1,), (7,), (1001,), (3, 5), (2, 0), (17, 3)]


def make_values(num_devices, shapes=SHAPES, integer_valued=False, seed=0, scale=1.0):
    """Returns values[d][i]: float64 numpy arrays, one list per device."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_devices):
        if integer_valued:
            out.append([rng.integers(-8, 9, s).astype(np.float64) for s in shapes])
        else:
            out.append([scale * rng.standard_normal(s) for s in shapes])
    return out


def per_replica(values, devices, dtype=tf.float32):
    """Turns values[d][i] into a list (one per tensor) of PerReplica on `devices`."""
    per_device = []
    for d, device in enumerate(devices):
        with tf.device(device):
            per_device.append([tf.cast(tf.constant(v), dtype) for v in values[d]])
    return [values_lib.PerReplica(tuple(per_device[d][i] for d in range(len(devices))))
            for i in range(len(values[0]))]


def batch_reduce(op, values, devices, reduce_op="SUM", dtype=tf.float32):
    """Eagerly batch-reduces; returns out[i][d] numpy (float64) and out devices."""
    prs = per_replica(values, devices, dtype)
    reduced = op.batch_reduce(tf.distribute.ReduceOp(reduce_op), [(p, p) for p in prs])
    reduced = [local_values(r) for r in reduced]
    arrays = [[tf.cast(t, tf.float64).numpy() for t in r] for r in reduced]
    placed = [[t.device for t in r] for r in reduced]
    for r in reduced:
        for t in r:
            assert t.dtype == dtype
    return arrays, placed


def reference(values, reduce_op="SUM"):
    """numpy sum (or mean) over devices, one array per tensor."""
    n = len(values)
    out = [sum(values[d][i] for d in range(n)) for i in range(len(values[0]))]
    if reduce_op == "MEAN":
        out = [o / n for o in out]
    return out


def assert_all_reduced(op, devices, reduce_op="SUM", dtype=tf.float32, integer_valued=True,
                       rtol=0.0, atol=0.0, seed=0, shapes=SHAPES):
    """Checks `op` against ReductionToOneDevice and numpy on every device."""
    values = make_values(len(devices), shapes, integer_valued=integer_valued, seed=seed)
    got, placed = batch_reduce(op, values, devices, reduce_op, dtype)
    ref_op, _ = batch_reduce(tf.distribute.ReductionToOneDevice(), values, devices, reduce_op,
                             dtype)
    ref_np = reference(values, reduce_op)
    for i in range(len(shapes)):
        for d, device in enumerate(devices):
            assert got[i][d].shape == tuple(shapes[i])
            np.testing.assert_allclose(got[i][d], ref_op[i][d], rtol=rtol, atol=atol)
            np.testing.assert_allclose(got[i][d], ref_np[i], rtol=rtol, atol=atol + 1e-300)
            assert same_device(placed[i][d], device), (placed[i][d], device)
    return got


def same_device(a, b):
    """True when device strings `a` and `b` name the same device."""
    a, b = tf.DeviceSpec.from_string(a), tf.DeviceSpec.from_string(b)
    return (a.device_type, a.device_index) == (b.device_type, b.device_index)


def local_values(value):
    """The per-device tensors of a Mirrored value (a lone tensor on one device)."""
    if isinstance(value, (tf.Tensor, tf.IndexedSlices)):
        return [value]
    return list(value.values)
