"""Tests for tfscale.distribute.cluster: TF_CONFIG, Open MPI and SLURM resolution."""

import json

import pytest

from tfscale.distribute import cluster


def _tf_config(cluster_dict, task_type="worker", index=0):
    return json.dumps({"cluster": cluster_dict, "task": {"type": task_type, "index": index}})


class TestParseTfConfig:
    def test_workers(self):
        info = cluster.parse_tf_config(
            _tf_config({"worker": ["127.0.0.1:2000", "127.0.0.1:2001", "h:3"]}, index=2)
        )
        assert info.workers == ("127.0.0.1:2000", "127.0.0.1:2001", "h:3")
        assert (info.task_type, info.task_id, info.rank, info.num_workers) == ("worker", 2, 2, 3)
        assert not info.is_chief
        assert info.source == "TF_CONFIG"

    def test_chief_comes_first(self):
        text = _tf_config({"chief": ["c:1"], "worker": ["w:1", "w:2"], "evaluator": ["e:1"]}, index=1)
        info = cluster.parse_tf_config(text)
        assert info.workers == ("c:1", "w:1", "w:2")
        assert info.rank == 2
        chief = cluster.parse_tf_config(_tf_config({"chief": ["c:1"], "worker": ["w:1"]}, "chief", 0))
        assert chief.is_chief and chief.rank == 0
        # Round trip through to_tf_config.
        again = cluster.parse_tf_config(info.to_tf_config())
        assert again == info

    @pytest.mark.parametrize(
        "text, pattern",
        [
            ("{not json", r"TF_CONFIG is not valid JSON.*Received: TF_CONFIG='\{not json'"),
            ("[1, 2]", "must be a JSON object"),
            (json.dumps({"task": {"type": "worker", "index": 0}}), "non-empty 'cluster'"),
            (json.dumps({"cluster": {"worker": ["a:1"]}}), "'task' object"),
            (_tf_config({"worker": ["a:1"], "ps": ["p:1"]}), "'ps' job"),
            (_tf_config({"worker": ["localhost"]}), r"cluster\['worker'\]\[0\] must be a 'host:port'"),
            (_tf_config({"worker": ["a:99999"]}), "port 99999"),
            (_tf_config({"worker": []}), "non-empty list"),
            (_tf_config({"worker": ["a:1", "a:1"]}), "address twice"),
            (_tf_config({"worker": ["a:1", "b:1"]}, index=2), r"task\['index'\] must be an int in \[0, 2\)"),
            (_tf_config({"worker": ["a:1"]}, index="0"), r"task\['index'\]"),
            (_tf_config({"worker": ["a:1"]}, task_type="chief"), r"task\['type'\] must be one of"),
            (_tf_config({"chief": ["a:1", "b:1"], "worker": ["c:1"]}), "one address"),
        ],
    )
    def test_malformed(self, text, pattern):
        with pytest.raises(ValueError, match=pattern):
            cluster.parse_tf_config(text)


class TestOpenMpi:
    def test_single_node_uses_loopback(self):
        env = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3",
               "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "TFSCALE_BASE_PORT": "30000"}
        info = cluster.cluster_from_environment(env)
        assert info.source == "OMPI"
        assert info.workers == tuple(f"127.0.0.1:{30000 + i}" for i in range(4))
        assert info.rank == 3 and info.task_id == 3

    def test_multi_node_needs_hosts(self):
        env = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
        with pytest.raises(ValueError, match="TFSCALE_WORKER_HOSTS"):
            cluster.cluster_from_environment(env)
        env["TFSCALE_WORKER_HOSTS"] = "n1,n2"
        info = cluster.cluster_from_environment(env)
        assert info.workers == (
            f"n1:{cluster.DEFAULT_BASE_PORT}", f"n1:{cluster.DEFAULT_BASE_PORT + 1}",
            f"n2:{cluster.DEFAULT_BASE_PORT}", f"n2:{cluster.DEFAULT_BASE_PORT + 1}",
        )

    def test_bad_rank(self):
        with pytest.raises(ValueError, match="OMPI_COMM_WORLD_RANK=4"):
            cluster.cluster_from_environment({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "4"})
        with pytest.raises(ValueError, match="must be an int.*'x'"):
            cluster.cluster_from_environment({"OMPI_COMM_WORLD_SIZE": "x", "OMPI_COMM_WORLD_RANK": "0"})


class TestSlurm:
    @pytest.mark.parametrize(
        "text, expected",
        [
            ("node1", ["node1"]),
            ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
            ("n[8-10]", ["n8", "n9", "n10"]),
            ("n[08-10]", ["n08", "n09", "n10"]),
            ("r[1-2]-c[3-4]", ["r1-c3", "r1-c4", "r2-c3", "r2-c4"]),
        ],
    )
    def test_nodelist(self, text, expected):
        assert cluster.expand_slurm_nodelist(text) == expected

    @pytest.mark.parametrize("text", ["", "n[1-2", "n1-2]", "n[3-1]", "n[a-b]"])
    def test_bad_nodelist(self, text):
        with pytest.raises(ValueError):
            cluster.expand_slurm_nodelist(text)

    def test_tasks_per_node(self):
        assert cluster.expand_slurm_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
        with pytest.raises(ValueError, match="N\\(xK\\)"):
            cluster.expand_slurm_tasks_per_node("2(3)")

    def test_cluster(self):
        env = {"SLURM_NTASKS": "3", "SLURM_PROCID": "2", "SLURM_STEP_NODELIST": "a[1-2]",
               "SLURM_STEP_TASKS_PER_NODE": "2,1", "TFSCALE_BASE_PORT": "4000"}
        info = cluster.cluster_from_environment(env)
        assert info.source == "SLURM"
        assert info.workers == ("a1:4000", "a1:4001", "a2:4000")
        assert info.rank == 2
        env["SLURM_STEP_TASKS_PER_NODE"] = "2(x2)"
        with pytest.raises(ValueError, match="do not match"):
            cluster.cluster_from_environment(env)


def test_precedence_and_multi_worker():
    tf_config = _tf_config({"worker": ["a:1", "b:1"]}, index=1)
    env = {"TF_CONFIG": tf_config, "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "0"}
    assert cluster.cluster_from_environment(env).source == "TF_CONFIG"
    assert cluster.in_multi_worker_environment(env)
    assert not cluster.in_multi_worker_environment({})
    assert not cluster.in_multi_worker_environment({"TF_CONFIG": _tf_config({"worker": ["a:1"]})})
    assert not cluster.in_multi_worker_environment({"SLURM_NTASKS": "1", "SLURM_PROCID": "0",
                                                    "SLURM_JOB_NODELIST": "n1"})
    with pytest.raises(ValueError, match="not valid JSON"):
        cluster.in_multi_worker_environment({"TF_CONFIG": "{"})


def test_make_cluster_resolver():
    info = cluster.cluster_from_environment(
        {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1", "TFSCALE_BASE_PORT": "5000"}
    )
    resolver = cluster.make_cluster_resolver(info, num_gpus=0)
    assert resolver.cluster_spec().as_dict() == {"worker": ["127.0.0.1:5000", "127.0.0.1:5001"]}
    assert (resolver.task_type, resolver.task_id, resolver.rpc_layer) == ("worker", 1, "grpc")
    with pytest.raises(TypeError, match="ClusterInfo"):
        cluster.make_cluster_resolver({"worker": []})
