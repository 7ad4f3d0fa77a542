"""TorusAllReduce against ReductionToOneDevice and numpy on logical CPU devices."""

import numpy as np
import pytest
import tensorflow as tf
from _allreduce_helpers import assert_all_reduced
from _allreduce_helpers import batch_reduce
from _allreduce_helpers import make_values
from _allreduce_helpers import per_replica
from _allreduce_helpers import reference
from _allreduce_helpers import same_device

from tfscale.distribute import TorusAllReduce

GRIDS = [(1, None), (2, None), (4, None), (6, None), (8, None), (4, "1x4"), (4, "4x1"),
         (4, "2x2"), (6, "2x3"), (6, "3x2"), (8, "2x4"), (8, "4x2")]


@pytest.mark.parametrize("reduce_op", ["SUM", "MEAN"])
@pytest.mark.parametrize("num_devices, grid_shape", GRIDS)
def test_exact_on_integer_valued_floats(cpu_devices, num_devices, grid_shape, reduce_op):
    op = TorusAllReduce(grid_shape=grid_shape, bytes_per_pack=64)
    atol = 0.0 if reduce_op == "SUM" else 1e-6  # MEAN of integers is not an integer.
    assert_all_reduced(op, cpu_devices[:num_devices], reduce_op, atol=atol)


@pytest.mark.parametrize("num_devices, grid_shape", [(4, "2x2"), (6, "3x2"), (8, "2x4")])
@pytest.mark.parametrize("bytes_per_pack", [0, 1, 256, 1 << 20])
def test_random_float32_within_1e6(cpu_devices, num_devices, grid_shape, bytes_per_pack):
    op = TorusAllReduce(grid_shape=grid_shape, bytes_per_pack=bytes_per_pack)
    assert_all_reduced(op, cpu_devices[:num_devices], "MEAN", integer_valued=False, rtol=1e-6,
                       atol=1e-6)


@pytest.mark.parametrize("dtype, rtol", [(tf.float16, 2e-3), (tf.bfloat16, 1.6e-2),
                                         (tf.float32, 1e-6), (tf.float64, 1e-12)])
def test_dtypes(cpu_devices, dtype, rtol):
    op = TorusAllReduce(grid_shape="2x2", bytes_per_pack=0)
    # Integer-valued sums below 2**8 are exact in every float dtype.
    assert_all_reduced(op, cpu_devices[:4], "SUM", dtype=dtype)
    # Random values: the dtype's own rounding of the inputs, partial and final sums.
    values = make_values(4, integer_valued=False, seed=3)
    rounded = [[tf.cast(tf.cast(v, dtype), tf.float64).numpy() for v in vs] for vs in values]
    got, _ = batch_reduce(op, values, cpu_devices[:4], "SUM", dtype)
    ref = reference(rounded)
    bound = [sum(np.abs(rounded[d][i]) for d in range(4)) for i in range(len(ref))]
    for i in range(len(ref)):
        for d in range(4):
            assert np.all(np.abs(got[i][d] - ref[i]) <= 2 * rtol * bound[i] + 1e-300)


def test_mixed_dtypes_in_one_batch(cpu_devices):
    devices = cpu_devices[:4]
    op = TorusAllReduce(bytes_per_pack=32)
    values = make_values(4, integer_valued=True, seed=5)
    p32 = per_replica(values, devices, tf.float32)
    p64 = per_replica(values, devices, tf.float64)
    p16 = per_replica(values, devices, tf.float16)
    pairs = [(v, v) for trio in zip(p32, p64, p16) for v in trio]
    reduced = op.batch_reduce("SUM", pairs)
    ref = reference(values)
    for k, r in enumerate(reduced):
        assert r.values[0].dtype == pairs[k][0].values[0].dtype
        for t in r.values:
            np.testing.assert_array_equal(tf.cast(t, tf.float64).numpy(), ref[k // 3])


@pytest.mark.parametrize("compression, u", [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
@pytest.mark.parametrize("grid_shape", ["2x2", "1x4", "4x1"])
def test_compression_error_bound(cpu_devices, compression, u, grid_shape):
    """|S_hat - S| <= 3 u sum|x_i| (+ fp16's subnormal absolute error), as documented."""
    devices = cpu_devices[:4]
    values = make_values(4, integer_valued=False, seed=7)
    op = TorusAllReduce(grid_shape=grid_shape, bytes_per_pack=64, compression=compression)
    got, _ = batch_reduce(op, values, devices, "SUM", tf.float32)
    exact = reference(values)
    plain, _ = batch_reduce(TorusAllReduce(grid_shape=grid_shape), values, devices)
    worst = 0.0
    for i in range(len(exact)):
        bound = sum(np.abs(values[d][i]) for d in range(4))
        for d in range(4):
            err = np.abs(got[i][d] - exact[i])
            assert np.all(err <= 3 * u * bound + 4 * 2.0**-25), (i, d)
            if err.size:
                worst = max(worst, float(np.max(err / np.maximum(bound, 1e-30))))
                assert got[i][d].dtype == np.float64  # Cast back to float32 by the op.
    # The compression really happened: errors are far above float32's.
    assert worst > u / 8
    plain_err = max(float(np.max(np.abs(plain[i][0] - exact[i]), initial=0)) for i in
                    range(len(exact)))
    assert plain_err < 1e-5


def test_mean_with_compression_scales_once(cpu_devices):
    values = make_values(8, integer_valued=True, seed=9)
    op = TorusAllReduce(grid_shape="2x4", compression="bf16")
    got, _ = batch_reduce(op, values, cpu_devices[:8], "MEAN")
    for g, r in zip(got, reference(values, "MEAN")):
        np.testing.assert_allclose(g[0], r, atol=3 * 2.0**-8 * 8)


def test_indexed_slices_sum_and_mean(cpu_devices):
    devices = cpu_devices[:4]
    rng = np.random.default_rng(11)
    dense_shape = [10, 3]
    per_device, dense = [], np.zeros([4] + dense_shape)
    for d, device in enumerate(devices):
        idx = rng.integers(0, 10, 5)
        vals = rng.standard_normal((5, 3)).astype(np.float32)
        np.add.at(dense[d], idx, vals)
        with tf.device(device):
            per_device.append(tf.IndexedSlices(tf.constant(vals), tf.constant(idx),
                                               tf.constant(dense_shape, tf.int64)))
    from tensorflow.python.distribute import values as values_lib

    value = values_lib.PerReplica(tuple(per_device))
    for reduce_op, ref in [("SUM", dense.sum(0)), ("MEAN", dense.mean(0))]:
        out = TorusAllReduce("2x2").reduce(reduce_op, value, value)
        rotd = tf.distribute.ReductionToOneDevice().reduce(
            tf.distribute.ReduceOp(reduce_op), value, value)
        for t, r, device in zip(out.values, rotd.values, devices):
            assert isinstance(t, tf.IndexedSlices) and same_device(t.values.device, device)
            np.testing.assert_allclose(tf.convert_to_tensor(t).numpy(), ref, rtol=1e-6,
                                       atol=1e-6)
            np.testing.assert_allclose(tf.convert_to_tensor(t).numpy(),
                                       tf.convert_to_tensor(r).numpy(), rtol=1e-6, atol=1e-6)


def test_all_gather_and_broadcast(cpu_devices):
    devices = cpu_devices[:4]
    values = make_values(4, shapes=[(2, 3)], seed=13)
    (value,) = per_replica(values, devices)
    op = TorusAllReduce("2x2")
    for axis in (0, 1):
        out = op._gather(value, value, axis=axis)
        ref = np.concatenate([values[d][0] for d in range(4)], axis=axis)
        for t, device in zip(out.values, devices):
            assert same_device(t.device, device)
            np.testing.assert_allclose(t.numpy(), ref, rtol=1e-6)
    out = op.broadcast(tf.constant([1.0, 2.0]), value)
    for t, device in zip(out.values, devices):
        assert same_device(t.device, device)
        np.testing.assert_array_equal(t.numpy(), [1.0, 2.0])


def test_reduce_to_other_destination_and_int_use_fallback(cpu_devices):
    devices = cpu_devices[:4]
    values = make_values(4, integer_valued=True, seed=15)
    op = TorusAllReduce("2x2")
    prs = per_replica(values, devices)
    out = op.reduce("SUM", prs[3], "/device:CPU:0")  # Not an all-reduce.
    np.testing.assert_array_equal(out.numpy(), reference(values)[3])
    ints = per_replica(values, devices, tf.int64)
    out = op.batch_reduce("SUM", [(v, v) for v in ints])
    for o, r in zip(out, reference(values)):
        assert o.values[0].dtype == tf.int64
        np.testing.assert_array_equal(o.values[1].numpy(), r)
    assert op.num_batch_reduce_calls == 0  # Neither went through the torus.


def test_graph_placement_and_no_concat_for_large_tensors(cpu_devices):
    """In a tf.function every hop is placed, and a torus spreads sums over all devices."""
    devices = cpu_devices[:4]
    op = TorusAllReduce("2x2", bytes_per_pack=16)

    @tf.function
    def f():
        per_device = []
        for device in devices:
            with tf.device(device):
                per_device.append([tf.ones([64, 8]), tf.ones([512]), tf.ones([8, 64]),
                                   tf.ones([2, 256])])
        from tensorflow.python.distribute import values as values_lib

        prs = [values_lib.PerReplica(tuple(p[i] for p in per_device)) for i in range(4)]
        out = op.batch_reduce("SUM", [(p, p) for p in prs])
        return [list(o.values) for o in out]

    graph = f.get_concrete_function().graph
    add_devices = {tf.DeviceSpec.from_string(o.device).device_index
                   for o in graph.get_operations() if o.type == "AddN"}
    assert add_devices == {0, 1, 2, 3}
    # Tensors of at least bytes_per_pack are not fused, and shards end on tensor edges:
    # nothing is concatenated.
    assert not [o for o in graph.get_operations() if o.type == "ConcatV2"]
    result = f()
    for per_tensor in result:
        for t in per_tensor:
            np.testing.assert_array_equal(t.numpy(), 4.0)
    assert op.num_batch_reduce_calls == 1 and op.num_reduced_tensors == 4


def test_errors(cpu_devices):
    with pytest.raises(ValueError, match="grid_shape"):
        TorusAllReduce(grid_shape="2by2")
    with pytest.raises(ValueError, match="compression='int8'"):
        TorusAllReduce(compression="int8")
    with pytest.raises(ValueError, match="bytes_per_pack=-1"):
        TorusAllReduce(bytes_per_pack=-1)
    op = TorusAllReduce(grid_shape="2x3")
    values = make_values(4, seed=1)
    with pytest.raises(ValueError) as err:
        batch_reduce(op, values, cpu_devices[:4])
    assert "'2x3'" in str(err.value) or "(2, 3)" in str(err.value)
    assert "num_devices=4" in str(err.value)
