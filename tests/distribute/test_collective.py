"""In-process tests of tfscale.distribute.collective and _tf_compat (no worker processes).

Nothing here creates a MultiWorkerMirroredStrategy (that would start a gRPC server in the
test process): the error paths are checked to fail before it, and the group layout is
pure Python. The multi-process behaviour is in test_collective_multiworker.py.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfscale import _tf_compat
from tfscale.distribute import collective


def _mirrored(devices):
    # Not MirroredStrategy's default CollectiveAllReduce: its group key 1 is shared by every default strategy of
    # the process, so a second one of another size (another test module) would fail to join it.
    return tf.distribute.MirroredStrategy(devices, cross_device_ops=tf.distribute.ReductionToOneDevice())


def _reducer(algorithm, num_workers, devices_per_worker=1, rank=0, **kwargs):
    devices = [f"/job:worker/replica:0/task:{rank}/device:CPU:{i}" for i in range(devices_per_worker)]
    return collective.MultiWorkerAllReduce(algorithm, devices, worker_rank=rank, num_workers=num_workers, **kwargs)


def _groups(reducer):
    return [(p.kind, [list(g) for g in p.groups]) for p in reducer.schedule.phases]


class TestGroups:
    def test_torus_rows_and_columns_span_workers(self):
        # 4 workers x 2 devices as a 2x4 grid: replica g = task * 2 + local device.
        r = _reducer("torus", 4, devices_per_worker=2, rank=3, grid_shape="2x4")
        assert r.num_replicas == 8
        assert _groups(r) == [("reduce_scatter", [[0, 1, 2, 3], [4, 5, 6, 7]]),
                              ("all_reduce", [[0, 4], [1, 5], [2, 6], [3, 7]]),
                              ("all_gather", [[0, 1, 2, 3], [4, 5, 6, 7]])]
        assert [r.replica_id(i) for i in range(2)] == [6, 7]

    def test_torus_default_grid_is_most_square(self):
        assert (_reducer("torus", 8).grid.rows, _reducer("torus", 8).grid.cols) == (2, 4)

    def test_hierarchical_nodes(self):
        r = _reducer("hierarchical", 4, devices_per_worker=2)
        assert _groups(r)[:2] == [("reduce_scatter", [[0, 1], [2, 3], [4, 5], [6, 7]]),
                                  ("all_reduce", [[0, 2, 4, 6], [1, 3, 5, 7]])]
        r = _reducer("hierarchical", 4, devices_per_node=2)
        assert _groups(r)[:2] == [("reduce_scatter", [[0, 1], [2, 3]]), ("all_reduce", [[0, 2], [1, 3]])]
        # Small packs: two all-reduces (node, then across nodes), no all-gather.
        assert [(p.kind, [list(g) for g in p.groups]) for p in r.small_schedule.phases] == [
            ("all_reduce", [[0, 1], [2, 3]]), ("all_reduce", [[0, 2], [1, 3]])]

    def test_ring_is_one_group(self):
        r = _reducer("ring", 3)
        assert r.algorithm == "flat" and _groups(r) == [("all_reduce", [[0, 1, 2]])]

    def test_halving_doubling_pairs(self):
        assert _groups(_reducer("halving_doubling", 4)) == [
            ("reduce_scatter", [[0, 1], [2, 3]]), ("reduce_scatter", [[0, 2], [1, 3]]),
            ("all_gather", [[0, 2], [1, 3]]), ("all_gather", [[0, 1], [2, 3]])]

    def test_one_group_key_per_distinct_group(self):
        r = _reducer("torus", 4, grid_shape="2x2", key_base=5_000_000)
        keys = r._group_keys  # pylint: disable=protected-access
        assert sorted(keys.values()) == list(range(5_000_000, 5_000_004))  # 2 rows + 2 columns
        assert keys[(0, 1)] == 5_000_000

    @pytest.mark.parametrize(
        "algorithm, kwargs, pattern",
        [
            ("tree", {}, r"Unknown all_reduce algorithm 'tree'; expected one of \['flat', 'halving_doubling', 'hierarchical', 'torus'\]"),
            ("torus", {"grid_shape": "2x3"}, r"grid_shape.*2x3=6 devices.*num_devices=4"),
            ("hierarchical", {"devices_per_node": 3}, r"devices_per_node.*must divide num_devices=4"),
            ("ring", {"grid_shape": "2x2"}, r"`grid_shape` does not apply to all_reduce algorithm 'flat' \(it applies to \['torus'\]\)"),
            ("torus", {"devices_per_node": 2}, r"`devices_per_node` does not apply.*'torus' \(it applies to \['hierarchical'\]\)"),
            ("torus", {"compression": "int8"}, "compression"),
            ("torus", {"timeout_seconds": 0}, r"timeout_seconds.*> 0.*Received: timeout_seconds=0"),
            ("torus", {"bytes_per_pack": -1}, "bytes_per_pack"),
            ("torus", {"small_pack_bytes": -1}, r"small_pack_bytes.*>= 0.*small_pack_bytes=-1"),
        ],
    )
    def test_bad_arguments(self, algorithm, kwargs, pattern):
        with pytest.raises(ValueError, match=pattern):
            _reducer(algorithm, 4, **kwargs)

    def test_bad_rank(self):
        with pytest.raises(ValueError, match=r"worker_rank.*\[0, 2\).*worker_rank=2"):
            collective.MultiWorkerAllReduce("ring", ["/cpu:0"], worker_rank=2, num_workers=2)

    def test_rejects_integers(self):
        r = _reducer("ring", 1)
        with pytest.raises(ValueError, match="floating-point.*int32"):
            r([tf.constant([1, 2])], 0)


class TestCreateStrategyErrors:
    """Every one of these must fail before MWMS starts a server in this process."""

    def test_no_cluster(self, monkeypatch):
        for key in ("TF_CONFIG", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS"):
            monkeypatch.delenv(key, raising=False)
        with pytest.raises(ValueError, match="needs a cluster of >= 2 workers"):
            collective.create_multi_worker_strategy()

    def test_malformed_tf_config(self, monkeypatch):
        monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": ')
        with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
            collective.create_multi_worker_strategy()
        assert not collective.in_multi_worker_environment({"TF_CONFIG": json.dumps(
            {"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}})})

    def test_grid_does_not_match_replicas(self, monkeypatch):
        monkeypatch.setenv("TF_CONFIG", json.dumps(
            {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 0}}))
        monkeypatch.delenv("TFSCALE_DEVICES_PER_WORKER", raising=False)
        with pytest.raises(ValueError, match=r"grid_shape.*2x2=4 devices.*num_devices=2"):
            collective.create_multi_worker_strategy("torus", grid_shape="2x2")

    @pytest.mark.parametrize("workers, expected", [
        (["10.0.0.1:1", "10.0.0.1:2", "10.0.0.2:1", "10.0.0.2:2"], 2),  # 2 hosts x 2 workers: a node per host
        (["10.0.0.1:1", "10.0.0.2:1", "10.0.0.1:2", "10.0.0.2:2"], 1),  # hosts not contiguous: a node per worker
    ])
    def test_hierarchical_nodes_default_to_hosts(self, monkeypatch, workers, expected):
        """Without devices_per_node, the hierarchical all-reduce's nodes are the hosts of the cluster spec (a
        node per worker made every inter-node group the whole cluster: a flat all-reduce)."""
        from tfscale.distribute import multi_worker

        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": workers},
                                                    "task": {"type": "worker", "index": 0}}))
        monkeypatch.delenv("TFSCALE_DEVICES_PER_WORKER", raising=False)
        seen = {}

        class Stop(Exception):
            pass

        def build_schedule(name, n, **params):  # stop before a server starts
            seen.update(params, name=name, n=n)
            raise Stop

        monkeypatch.setattr(multi_worker.algorithms, "build_schedule", build_schedule)
        with pytest.raises(Stop):
            collective.create_multi_worker_strategy("hierarchical")
        assert seen["name"] == "hierarchical" and seen["n"] == 4 and seen["devices_per_node"] == expected

    def test_bad_devices_per_worker_env(self, monkeypatch):
        monkeypatch.setenv("TFSCALE_DEVICES_PER_WORKER", "two")
        with pytest.raises(ValueError, match="TFSCALE_DEVICES_PER_WORKER must be an int"):
            collective.create_multi_worker_strategy()


class TestCompat:
    def test_version_guard(self, monkeypatch):
        monkeypatch.delenv("TFSCALE_ALLOW_UNTESTED_TF", raising=False)
        with pytest.raises(RuntimeError, match=r"tested only with TensorFlow 2\.21; found tensorflow==2\.15\.0"):
            _tf_compat.check_versions("2.15.0", "3.15.1")
        with pytest.raises(RuntimeError, match=r"Keras 3\.15; found keras==3\.3\.3"):
            _tf_compat.check_versions("2.21.0", "3.3.3")
        _tf_compat.check_versions()  # The installed versions are the tested ones.
        monkeypatch.setenv("TFSCALE_ALLOW_UNTESTED_TF", "1")
        _tf_compat.check_versions("2.15.0", "3.0.0")

    def test_keras_fixes_leave_other_strategies_alone(self, cpu_devices):
        from keras.src.backend.tensorflow import trainer

        _tf_compat.apply_keras_multi_worker_fixes()
        _tf_compat.apply_keras_multi_worker_fixes()  # Idempotent.
        assert _tf_compat.keras_multi_worker_fixes_applied()
        original = _tf_compat._ORIGINALS["reduce_per_replica"]
        assert trainer.reduce_per_replica is not original
        strategy = _mirrored(cpu_devices[:2])
        values = strategy.experimental_distribute_values_from_function(
            lambda ctx: {"loss": tf.constant(float(ctx.replica_id_in_sync_group + 1)),
                         "v": tf.fill([3], float(ctx.replica_id_in_sync_group))})
        for reduction in ("auto", "sum", "first"):
            got = trainer.reduce_per_replica(values, strategy, reduction)
            want = original(values, strategy, reduction)
            np.testing.assert_array_equal(got["loss"].numpy(), want["loss"].numpy())
            np.testing.assert_array_equal(got["v"].numpy(), want["v"].numpy())
        assert float(trainer.reduce_per_replica(values, strategy, "mean")["loss"]) == 1.5

    def test_fit_under_mirrored_strategy_still_matches(self, cpu_devices):
        """With the patches applied, a 2-replica MirroredStrategy fit equals a 1-device fit."""
        _tf_compat.apply_keras_multi_worker_fixes()
        rng = np.random.RandomState(0)
        x, y = rng.randn(32, 4).astype("float32"), rng.randn(32, 1).astype("float32")

        def train(strategy):
            with strategy.scope():
                keras.utils.set_random_seed(3)
                model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
                model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
            model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
            return model.get_weights()

        for a, b in zip(train(_mirrored(cpu_devices[:2])),
                        train(tf.distribute.OneDeviceStrategy(cpu_devices[0]))):
            np.testing.assert_allclose(a, b, atol=1e-6)

    def test_instance_keys_count_per_group_and_device(self):
        keys = _tf_compat.InstanceKeys(start=5)
        assert [keys.next_key(1, "a"), keys.next_key(1, "a"), keys.next_key(2, "a"), keys.next_key(1, "b")] == [5, 6, 5, 5]

    def test_install_rejects_other_strategies(self, cpu_devices):
        with pytest.raises(TypeError, match="MultiWorkerMirroredStrategy"):
            _tf_compat.install_all_reduce(_mirrored(cpu_devices[:2]), lambda v, r: v)


def test_explain_worker_failures():
    with pytest.raises(collective.WorkerFailureError, match=r"collective timeout \(timeout_seconds=7\).*Cause \(DeadlineExceededError\): Collective has timed out") as info:
        with collective.explain_worker_failures(timeout_seconds=7):
            raise tf.errors.DeadlineExceededError(None, None, "Graph execution error:\n\nCollective has timed out during execution.")
    assert isinstance(info.value.__cause__, tf.errors.DeadlineExceededError)
    assert info.value.timeout_seconds == 7
    with pytest.raises(ValueError):  # Other errors pass through unchanged.
        with collective.explain_worker_failures(timeout_seconds=7):
            raise ValueError("not a peer failure")


def test_worker_backup_dir(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}))
    assert collective.worker_backup_dir("/ckpt") == "/ckpt/worker1"
