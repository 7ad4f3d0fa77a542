"""The schedule registry: every algorithm's schedule, its checks, and the same schedule on every backend.

Pure-Python tests first (no TensorFlow needed), then each registered algorithm executed by the in-process
backend against a numpy sum (the multi-process backend's equivalents are in test_collective_multiworker.py),
then a toy algorithm registered here and found by create_strategy, the multi-worker reducer and the planner.
"""

import fractions
import os
import sys

import numpy as np
import pytest

from tfscale.distribute import algorithms

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _toy_algorithm  # noqa: E402


def _phases(schedule):
    return [(p.kind, [list(g) for g in p.groups]) for p in schedule.phases]


# --- schedules (pure Python) -----------------------------------------------------------------------------------


def test_builtin_names():
    assert set(algorithms.algorithm_names()) >= {"flat", "torus", "hierarchical", "halving_doubling"}
    assert algorithms.canonical_name("ring") == "flat"


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16])
@pytest.mark.parametrize("name", ["flat", "torus", "hierarchical", "halving_doubling"])
def test_every_builtin_schedule_is_an_all_reduce(name, num_ranks):
    schedule = algorithms.build_schedule(name, num_ranks)  # Schedule.check ran in the constructor.
    assert schedule.num_ranks == num_ranks
    assert len(schedule.shard_fractions) == len(schedule.phases)
    if num_ranks == 1:
        assert schedule.phases == ()


def test_torus_phases_and_fractions():
    s = algorithms.build_schedule("torus", 6, grid_shape="2x3")
    assert _phases(s) == [("reduce_scatter", [[0, 1, 2], [3, 4, 5]]),
                          ("all_reduce", [[0, 3], [1, 4], [2, 5]]),
                          ("all_gather", [[0, 1, 2], [3, 4, 5]])]
    assert s.shard_fractions == (1, fractions.Fraction(1, 3), fractions.Fraction(1, 3))
    assert s.param("grid_shape") == (2, 3)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_halving_doubling_pairs(n):
    s = algorithms.build_schedule("halving_doubling", n)
    k = n.bit_length() - 1
    assert [p.kind for p in s.phases] == ["reduce_scatter"] * k + ["all_gather"] * k
    for i, p in enumerate(s.phases[:k]):  # Distance 1, 2, 4, ...
        assert all(len(g) == 2 and g[1] - g[0] == 2 ** i for g in p.groups)
    assert s.shard_fractions[k - 1] == fractions.Fraction(2, n)
    # The small-message variant is recursive doubling: k pairwise all-reduces.
    assert [p.kind for p in s.for_small_messages().phases] == ["all_reduce"] * k


def test_halving_doubling_folds_extra_ranks():
    s = algorithms.build_schedule("halving_doubling", 6)
    assert _phases(s)[0] == ("reduce", [[0, 4], [1, 5]])
    assert _phases(s)[-1] == ("broadcast", [[0, 4], [1, 5]])


def test_hierarchical_variants():
    s = algorithms.build_schedule("hierarchical", 8, devices_per_node=4)
    assert _phases(s)[:2] == [("reduce_scatter", [[0, 1, 2, 3], [4, 5, 6, 7]]),
                              ("all_reduce", [[0, 4], [1, 5], [2, 6], [3, 7]])]
    s = algorithms.build_schedule("hierarchical", 8, devices_per_node=4, intra_node="reduce")
    assert _phases(s) == [("reduce", [[0, 1, 2, 3], [4, 5, 6, 7]]), ("all_reduce", [[0, 4]]),
                          ("broadcast", [[0, 1, 2, 3], [4, 5, 6, 7]])]


@pytest.mark.parametrize("name, params, pattern", [
    ("butterfly", {}, r"Unknown all_reduce algorithm 'butterfly'; expected one of \['flat', 'halving_doubling'"),
    ("torus", {"grid_shape": "3x3"}, r"3x3=9 devices, but there are num_devices=8"),
    ("flat", {"grid_shape": "2x4"}, r"`grid_shape` does not apply to all_reduce algorithm 'flat' \(it applies to \['torus'\]\)"),
    ("hierarchical", {"devices_per_node": 3}, r"devices_per_node.*must divide num_devices=8"),
    ("hierarchical", {"intra_node": "tree"}, r"intra_node.*Received: intra_node='tree'"),
])
def test_build_errors(name, params, pattern):
    with pytest.raises(ValueError, match=pattern):
        algorithms.build_schedule(name, 8, **params)


def test_check_rejects_schedules_that_do_not_all_reduce():
    P = algorithms.Phase
    with pytest.raises(ValueError, match=r"rank 0 ends with piece \(\) summed over \[0, 1\]"):  # 0 never hears from 2, 3.
        algorithms.Schedule("bad", 4, [P("all_reduce", [[0, 1], [2, 3]])])
    with pytest.raises(ValueError, match="add a contribution twice"):
        algorithms.Schedule("bad", 2, [P("all_reduce", [[0, 1]]), P("all_reduce", [[0, 1]])])
    with pytest.raises(ValueError, match="must hold shard j"):
        algorithms.Schedule("bad", 2, [P("all_gather", [[0, 1]])])
    with pytest.raises(ValueError, match="same size >= 2"):
        P("all_reduce", [[0, 1], [2]])
    with pytest.raises(ValueError, match="distinct ranks"):
        P("all_reduce", [[0, 1], [1, 2]])


def test_register_validates():
    with pytest.raises(ValueError, match="already registered"):
        algorithms.register_algorithm("torus", lambda n: [])
    with pytest.raises(ValueError, match="alias"):
        algorithms.register_algorithm("ring", lambda n: [])
    with pytest.raises(ValueError, match="must have a default"):
        algorithms.register_algorithm("needs_arg", lambda n, k: [])
    with pytest.raises(TypeError, match="callable"):
        algorithms.register_algorithm("not_callable", 3)


# --- the in-process backend, every algorithm against numpy ----------------------------------------------------

_SHAPES = [(1,), (7,), (3, 5), (1001,), (17, 3, 2)]
_TOL = {"float32": 1e-6, "float64": 1e-12, "float16": 2e-3, "bfloat16": 2e-2}


@pytest.fixture
def toy_registered():
    _toy_algorithm.register()
    yield _toy_algorithm.NAME
    algorithms.unregister_algorithm(_toy_algorithm.NAME)


def _all_reduce(strategy, arrays, dtype):
    import tensorflow as tf

    @tf.function
    def step():
        def fn():
            ctx = tf.distribute.get_replica_context()
            g = tf.cast(ctx.replica_id_in_sync_group, tf.float64)
            return ctx.all_reduce("SUM", [tf.cast(tf.constant(a) + g * tf.constant(b), dtype) for a, b in arrays])

        return strategy.run(fn)

    return [[t.numpy().astype("float64") for t in strategy.experimental_local_results(o)] for o in step()]


def _arrays(dtype):
    rng = np.random.RandomState(0)
    out = []
    for shape in _SHAPES:
        a, b = rng.uniform(-1, 1, shape), rng.uniform(-1, 1, shape)
        if dtype in ("float16", "bfloat16"):
            a, b = np.round(a * 8) / 8, np.round(b * 8) / 8
        out.append((a, b))
    return out


@pytest.mark.parametrize("num_replicas", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("name", ["flat", "torus", "hierarchical", "halving_doubling", "toy"])
def test_in_process_backend_matches_numpy(cpu_devices, toy_registered, name, dtype, num_replicas):
    import tensorflow as tf

    from tfscale.distribute import ScheduledAllReduce, get_cross_device_ops

    name = toy_registered if name == "toy" else name
    op = ScheduledAllReduce(name, bytes_per_pack=2048)  # Several packs, shards cutting tensors.
    strategy = tf.distribute.MirroredStrategy(cpu_devices[:num_replicas], cross_device_ops=op)
    assert get_cross_device_ops(strategy) is op
    arrays = _arrays(dtype)
    out = _all_reduce(strategy, arrays, dtype)
    for (a, b), per_replica in zip(arrays, out):
        contributions = [(a + g * b) for g in range(num_replicas)]
        expected, scale = np.sum(contributions, 0), np.sum(np.abs(contributions), 0)
        for got in per_replica:
            assert np.all(np.abs(got - expected) <= _TOL[dtype] * scale + 1e-30), (name, dtype)
    assert op.num_batch_reduce_calls == 1


# --- a toy algorithm registered here is usable everywhere ------------------------------------------------------


def test_toy_algorithm_in_create_strategy_multi_worker_and_planner(cpu_devices, toy_registered):
    from tfscale import planning
    from tfscale.distribute import collective, create_strategy, strategy_handle

    strategy = create_strategy(toy_registered, num_replicas=4)
    handle = strategy_handle(strategy)
    assert handle.algorithm == toy_registered
    assert [p.kind for p in handle.schedule.phases] == ["reduce", "broadcast"]
    out = _all_reduce(strategy, _arrays("float32")[:1], "float32")
    np.testing.assert_allclose(out[0][3], sum(_arrays("float32")[0][0] + g * _arrays("float32")[0][1]
                                              for g in range(4)), rtol=1e-6)
    # The multi-worker backend builds the same schedule (its 2-process run: test_collective_multiworker.py).
    reducer = collective.MultiWorkerAllReduce(toy_registered, ["/job:worker/task:0/device:CPU:0"], 0, 4)
    assert reducer.schedule == handle.schedule
    # The planner prices it, and the recommendation considers it.
    link = planning.Link(1e-5, 1e9)
    cluster = planning.Cluster(4, 2, link, link)
    cost = planning.allreduce_cost(toy_registered, cluster, 1e6)
    assert cost.algorithm == toy_registered and cost.num_launches == 2
    names = {r.cost.algorithm for r in planning.plan(cluster, planning.Workload(), algorithms=(toy_registered, "flat"))}
    assert names == {toy_registered, "flat"}


def test_planner_phases_are_the_executed_schedule(cpu_devices):
    from tfscale import planning
    from tfscale.distribute import create_strategy, strategy_handle

    strategy = create_strategy("torus", num_replicas=8, grid_shape="2x4")
    executed = strategy_handle(strategy).schedule
    link = planning.Link(1e-5, 1e9)
    cost = planning.torus_allreduce_cost(planning.Cluster(8, 4, link, link), 1e6, (2, 4))
    assert cost.phases == tuple(p.describe() for p in executed.phases)
    assert cost.num_launches == len(executed.phases) == 3


@pytest.mark.parametrize("compression, unit", [("fp16", 2.0 ** -11), ("bf16", 2.0 ** -8)])
@pytest.mark.parametrize("name", ["flat", "torus", "hierarchical", "halving_doubling"])
def test_in_process_compression_bound(cpu_devices, name, compression, unit):
    """|S_hat - S| <= (reducing phases + 1) u sum|x|: one rounding on input, one per partial sum sent on, one final."""
    import tensorflow as tf

    from tfscale.distribute import ScheduledAllReduce

    op = ScheduledAllReduce(name, bytes_per_pack=2048, compression=compression)
    n = 4
    strategy = tf.distribute.MirroredStrategy(cpu_devices[:n], cross_device_ops=op)
    roundings = sum(p.kind in algorithms.schedule.REDUCING_KINDS for p in op.schedule(n).phases) + 1
    arrays = _arrays("float32")
    out = _all_reduce(strategy, arrays, "float32")
    worst = 0.0
    for (a, b), per_replica in zip(arrays, out):
        contributions = [(a + g * b) for g in range(n)]
        expected, scale = np.sum(contributions, 0), np.sum(np.abs(contributions), 0)
        for got in per_replica:
            err = np.abs(got - expected)
            assert np.all(err <= roundings * unit * scale + 1e-30), (name, compression, float(np.max(err / scale)))
            worst = max(worst, float(np.max(err / np.maximum(scale, 1e-30))))
    assert worst > unit / 16  # The values really travelled in 16 bits.
