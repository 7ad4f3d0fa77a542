"""HierarchicalAllReduce against ReductionToOneDevice and numpy on logical CPU devices."""

import numpy as np
import pytest
import tensorflow as tf
from _allreduce_helpers import assert_all_reduced
from _allreduce_helpers import batch_reduce
from _allreduce_helpers import make_values
from _allreduce_helpers import reference

from tfscale.distribute import HierarchicalAllReduce
from tfscale.distribute import primitives

LAYOUTS = [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4), (6, 2), (6, 3), (8, 2), (8, 4),
           (8, 8)]


@pytest.mark.parametrize("intra_node", ["reduce_scatter", "reduce"])
@pytest.mark.parametrize("reduce_op", ["SUM", "MEAN"])
@pytest.mark.parametrize("num_devices, devices_per_node", LAYOUTS)
def test_exact_on_integer_valued_floats(cpu_devices, num_devices, devices_per_node, reduce_op,
                                        intra_node):
    op = HierarchicalAllReduce(devices_per_node, bytes_per_pack=64, intra_node=intra_node)
    atol = 0.0 if reduce_op == "SUM" else 1e-6
    assert_all_reduced(op, cpu_devices[:num_devices], reduce_op, atol=atol)


@pytest.mark.parametrize("intra_node", ["reduce_scatter", "reduce"])
@pytest.mark.parametrize("bytes_per_pack", [0, 256, 1 << 20])
def test_random_float32_within_1e6(cpu_devices, bytes_per_pack, intra_node):
    op = HierarchicalAllReduce(4, bytes_per_pack=bytes_per_pack, intra_node=intra_node)
    assert_all_reduced(op, cpu_devices[:8], "MEAN", integer_valued=False, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float32, tf.float64])
@pytest.mark.parametrize("intra_node", ["reduce_scatter", "reduce"])
def test_dtypes_exact_on_small_integers(cpu_devices, dtype, intra_node):
    op = HierarchicalAllReduce(2, bytes_per_pack=0, intra_node=intra_node)
    assert_all_reduced(op, cpu_devices[:4], "SUM", dtype=dtype)


@pytest.mark.parametrize("compression, u", [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
@pytest.mark.parametrize("intra_node", ["reduce_scatter", "reduce"])
def test_compression_error_bound(cpu_devices, compression, u, intra_node):
    values = make_values(8, integer_valued=False, seed=21)
    op = HierarchicalAllReduce(4, compression=compression, intra_node=intra_node)
    got, _ = batch_reduce(op, values, cpu_devices[:8])
    exact = reference(values)
    worst = 0.0
    for i in range(len(exact)):
        bound = sum(np.abs(values[d][i]) for d in range(8))
        for d in range(8):
            err = np.abs(got[i][d] - exact[i])
            assert np.all(err <= 3 * u * bound + 8 * 2.0**-25)
            if err.size:
                worst = max(worst, float(np.max(err / np.maximum(bound, 1e-30))))
    assert worst > u / 8  # The values really travelled in 16 bits.


def test_reduce_scatter_mode_is_the_torus_schedule_with_nodes_as_rows():
    """2 nodes of 4 and a 2x4 torus run the same phases over the same groups (one definition, two names)."""
    from tfscale.distribute import TorusAllReduce

    hier = HierarchicalAllReduce(4).schedule(8)
    torus = TorusAllReduce("2x4").schedule(8)
    assert [(p.kind, p.groups) for p in hier.phases] == [(p.kind, p.groups) for p in torus.phases]
    assert [(p.kind, p.groups) for p in hier.phases] == [
        ("reduce_scatter", ((0, 1, 2, 3), (4, 5, 6, 7))),
        ("all_reduce", ((0, 4), (1, 5), (2, 6), (3, 7))),
        ("all_gather", ((0, 1, 2, 3), (4, 5, 6, 7)))]
    # The leader variant is a different schedule: reduce to the leader, leaders all-reduce, broadcast.
    assert [p.kind for p in HierarchicalAllReduce(4, intra_node="reduce").schedule(8).phases] == [
        "reduce", "all_reduce", "broadcast"]


def test_errors(cpu_devices):
    with pytest.raises(ValueError, match="devices_per_node=0"):
        HierarchicalAllReduce(0)
    with pytest.raises(TypeError, match="devices_per_node"):
        HierarchicalAllReduce("4")
    with pytest.raises(ValueError, match="intra_node='tree'"):
        HierarchicalAllReduce(2, intra_node="tree")
    with pytest.raises(ValueError, match="compression='fp8'"):
        HierarchicalAllReduce(2, compression="fp8")
    op = HierarchicalAllReduce(3)
    with pytest.raises(ValueError, match="devices_per_node=3") as err:
        batch_reduce(op, make_values(4), cpu_devices[:4])
    assert "num_devices=4" in str(err.value)


@pytest.mark.parametrize("ranges, k, expected", [
    # Cuts snap to tensor edges (multiples of 16 here) when near the ideal point...
    ([(0, 0, 64)], 4, [[(0, 0, 16)], [(0, 16, 32)], [(0, 32, 48)], [(0, 48, 64)]]),
    # ... and cut inside a tensor, aligned, when the nearest edge is too far.
    ([(0, 0, 64), (1, 0, 1000)], 2, [[(0, 0, 64), (1, 0, 464)], [(1, 464, 1000)]]),
    # Two packs of one tensor each: the cut lands between them.
    ([(0, 0, 64), (1, 0, 64)], 2, [[(0, 0, 64)], [(1, 0, 64)]]),
    # More shards than aligned granules: some shards are empty.
    ([(0, 0, 16)], 3, [[], [], [(0, 0, 16)]]),
])
def test_split_ranges(ranges, k, expected):
    plan = primitives.FusionPlan(cut_points=((0, 16, 32, 48, 64), (0, 1000)),
                            wire_dtypes=(tf.float32, tf.float32),
                            accum_dtypes=(tf.float32, tf.float32), alignment=(16, 16))
    shards = primitives.split_ranges(ranges, k, plan)
    assert shards == expected
    flat = [r for s in shards for r in s]
    assert sum(e - s for _, s, e in flat) == sum(e - s for _, s, e in ranges)
