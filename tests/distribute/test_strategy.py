"""create_strategy: every algorithm inside MirroredStrategy's replica all-reduce path."""

import numpy as np
import pytest
import tensorflow as tf

from tfscale.distribute import ALGORITHMS
from tfscale.distribute import HierarchicalAllReduce
from tfscale.distribute import ScheduledAllReduce
from tfscale.distribute import TorusAllReduce
from tfscale.distribute import configure_logical_devices
from tfscale.distribute import create_strategy
from tfscale.distribute import strategy as strategy_lib

SHAPES = [(), (7,), (1001,), (3, 5)]


def test_names_come_from_the_registry_and_tf_builtins():
    from tfscale.distribute import algorithms

    assert set(ALGORITHMS) == (set(algorithms.algorithm_names()) | set(algorithms.ALIASES)
                               | set(strategy_lib.TF_BUILTINS) | {"auto"})
    # The 4 built-in schedules and TF's 3 built-ins are all there.
    assert {"torus", "hierarchical", "halving_doubling", "flat", "ring", "collective"} <= set(ALGORITHMS)


def _replica_all_reduce(strategy, reduce_op):
    """Replica r contributes (r + 1) * base_i; returns per-replica results as numpy."""
    bases = [np.arange(np.prod(s), dtype=np.float32).reshape(s) - 3.0 for s in SHAPES]

    @tf.function
    def step():
        def fn():
            ctx = tf.distribute.get_replica_context()
            factor = tf.cast(ctx.replica_id_in_sync_group + 1, tf.float32)
            return ctx.all_reduce(reduce_op, [factor * tf.constant(b) for b in bases])

        return strategy.run(fn)

    out = step()
    return bases, [[t.numpy() for t in strategy.experimental_local_results(o)] for o in out]


@pytest.mark.parametrize("num_replicas", [1, 2, 4, 6, 8])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_all_reduces(algorithm, num_replicas):
    _check_algorithm(algorithm, num_replicas)


def test_strategy_handle_describes_the_strategy():
    from tfscale.distribute import get_cross_device_ops, strategy_handle

    strategy = create_strategy("torus", num_replicas=4, grid_shape="2x2")
    handle = strategy_handle(strategy)
    assert handle.algorithm == "torus" and handle.num_replicas == 4
    assert handle.cross_device_ops is get_cross_device_ops(strategy)
    assert [p.kind for p in handle.schedule.phases] == ["reduce_scatter", "all_reduce", "all_gather"]
    assert handle.callbacks() == [] and handle.all_reduce is None
    assert strategy_handle(tf.distribute.MirroredStrategy(["/cpu:0"])) is None


def _check_algorithm(algorithm, num_replicas):
    strategy = create_strategy(algorithm, num_replicas=num_replicas)
    assert strategy.num_replicas_in_sync == num_replicas
    op = strategy_lib.handle_lib.get_cross_device_ops(strategy)
    for reduce_op, factor in [("SUM", num_replicas * (num_replicas + 1) / 2),
                              ("MEAN", (num_replicas + 1) / 2)]:
        bases, out = _replica_all_reduce(strategy, reduce_op)
        for base, per_replica in zip(bases, out):
            assert len(per_replica) == num_replicas
            for value in per_replica:
                np.testing.assert_allclose(value, factor * base, rtol=1e-6)
    if algorithm in strategy_lib.algorithm_names(include_builtins=False) and num_replicas > 1:
        assert op.num_batch_reduce_calls == 2  # Our op did the work, once per reduce_op.


def test_collective_strategies_of_different_sizes_coexist():
    """TF's CollectiveAllReduce reuses group key 1 per strategy; ours get their own keys."""
    for n in (4, 2, 8):
        strategy = create_strategy("collective", num_replicas=n)
        _, out = _replica_all_reduce(strategy, "SUM")
        assert out[0][-1] == pytest.approx(-3.0 * n * (n + 1) / 2)


def test_ring_and_defaults_map_to_tfscale_ops():
    op = strategy_lib.create_cross_device_ops("ring", 8)  # "ring" is the flat all-reduce.
    assert isinstance(op, ScheduledAllReduce) and op.algorithm == "flat"
    assert [(p.kind, p.groups) for p in op.schedule(8).phases] == [("all_reduce", (tuple(range(8)),))]
    op = strategy_lib.create_cross_device_ops("hierarchical", 8)
    assert isinstance(op, HierarchicalAllReduce) and op.devices_per_node == 4
    op = strategy_lib.create_cross_device_ops("torus", 8, grid_shape="4x2", bytes_per_pack=0,
                                              compression="bf16")
    assert op.grid(8).rows == 4 and op.bytes_per_pack == 0 and op.compression == "bf16"
    assert isinstance(strategy_lib.create_cross_device_ops("hierarchical_copy", 4),
                      tf.distribute.HierarchicalCopyAllReduce)
    assert strategy_lib.create_cross_device_ops("collective", 4) is None


def test_create_strategy_errors():
    with pytest.raises(ValueError) as err:
        create_strategy("butterfly", num_replicas=4)
    assert "'butterfly'" in str(err.value)
    for name in ALGORITHMS:  # The error lists every valid name.
        assert repr(name) in str(err.value)
    with pytest.raises(ValueError) as err:
        create_strategy("torus", num_replicas=8, grid_shape="2x2")
    assert "'2x2'" in str(err.value) and "num_devices=8" in str(err.value)
    with pytest.raises(ValueError, match="devices_per_node=3"):
        create_strategy("hierarchical", num_replicas=8, devices_per_node=3)
    with pytest.raises(ValueError, match="compression='fp8'"):
        create_strategy("torus", num_replicas=4, compression="fp8")
    with pytest.raises(ValueError, match="compression='fp16'"):
        create_strategy("reduction_to_one_device", num_replicas=4, compression="fp16")
    with pytest.raises(ValueError, match="grid_shape"):
        create_strategy("ring", num_replicas=4, grid_shape="2x2")
    with pytest.raises(ValueError, match="devices_per_node"):
        create_strategy("torus", num_replicas=4, devices_per_node=2)


def test_configure_logical_devices(cpu_devices):
    assert configure_logical_devices(4) == cpu_devices[:4]
    with pytest.raises(ValueError, match="num_devices=0"):
        configure_logical_devices(0)
    # TF is initialised with 8 logical CPUs (conftest): more cannot be created now.
    with pytest.raises(RuntimeError, match="num_devices=64"):
        configure_logical_devices(64)


def test_configure_logical_devices_fresh_process(tmp_path):
    """In a fresh process the CPU really is split into N devices."""
    import subprocess
    import sys

    code = ("from tfscale.distribute import create_strategy\n"
            "s = create_strategy('torus', num_replicas=3)\n"
            "print(s.num_replicas_in_sync, type(s.extended._cross_device_ops).__name__)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ,
                                            "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["3", "TorusAllReduce"]


def test_more_logical_devices_than_cores_run_one_thread_per_op(tmp_path):
    """Oversubscribed logical CPU devices get 1 intra-op thread, unless the user set one; fewer keep TF's default."""
    import os
    import subprocess
    import sys

    cores = os.cpu_count() or 1
    code = ("import sys, tensorflow as tf\n"
            "from tfscale.distribute import configure_logical_devices\n"
            "configure_logical_devices(int(sys.argv[1]))\n"
            "print(tf.config.threading.get_intra_op_parallelism_threads())\n")
    env = {k: v for k, v in os.environ.items() if k != "TF_NUM_INTRAOP_THREADS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"

    def intra_op_threads(num_devices, **extra_env):
        proc = subprocess.run([sys.executable, "-c", code, str(num_devices)], capture_output=True, text=True,
                              timeout=120, env={**env, **extra_env})
        assert proc.returncode == 0, proc.stderr[-2000:]
        return int(proc.stdout.split()[-1])

    assert intra_op_threads(cores + 1) == 1
    assert intra_op_threads(cores) == 0  # TF's default: all cores
    assert intra_op_threads(cores + 1, TF_NUM_INTRAOP_THREADS="3") == 0  # the user's choice wins (read by TF)


def test_public_surface():
    import inspect

    import tfscale.distribute as dist

    for name in dist.__all__:
        assert hasattr(dist, name), name
    assert list(inspect.signature(dist.TorusAllReduce).parameters)[:3] == [
        "grid_shape", "bytes_per_pack", "compression"]
    assert list(inspect.signature(dist.HierarchicalAllReduce).parameters)[:3] == [
        "devices_per_node", "bytes_per_pack", "compression"]
    params = inspect.signature(dist.create_strategy).parameters
    assert list(params)[:6] == ["algorithm", "num_replicas", "grid_shape", "devices_per_node",
                                "bytes_per_pack", "compression"]
    assert params["algorithm"].default == "torus"
    assert issubclass(dist.TorusAllReduce, tf.distribute.CrossDeviceOps)


def test_auto_on_logical_cpu_devices_picks_one_level_reduction(capsys):
    from tfscale.distribute import get_cross_device_ops, strategy_handle

    strategy = create_strategy("auto", num_replicas=4)
    assert isinstance(get_cross_device_ops(strategy), tf.distribute.ReductionToOneDevice)
    handle = strategy_handle(strategy)
    assert handle.algorithm == "reduction_to_one_device" and handle.auto_choice is not None
    assert "all_reduce=auto chose reduction_to_one_device" in capsys.readouterr().out
    _, out = _replica_all_reduce(strategy, "SUM")
    assert out[0][-1] == pytest.approx(-3.0 * 10)
    with pytest.raises(ValueError, match="do not apply to algorithm='auto'"):
        create_strategy("auto", num_replicas=4, grid_shape="2x2")
