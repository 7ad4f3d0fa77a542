"""Tests for tfscale.launch (real processes on 127.0.0.1; no TensorFlow in the workers)."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tfscale import launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_cli(args, timeout=60):
    """Runs `python -m tfscale.launch ARGS`; returns (exit code, combined output, seconds)."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "tfscale.launch", *args], cwd=REPO, capture_output=True,
        text=True, timeout=timeout,
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def test_find_free_ports_are_distinct_and_bindable():
    ports = launch.find_free_ports(4)
    assert len(set(ports)) == 4
    launch.check_ports_free(ports)  # Does not raise.
    with pytest.raises(ValueError, match="count"):
        launch.find_free_ports(0)


def test_port_in_use_is_a_clear_error():
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        with pytest.raises(launch.LaunchError, match=f"Port 127.0.0.1:{port} is already in use"):
            launch.check_ports_free([port])
        code, out, _ = _run_cli(["--num_workers", "2", "--base_port", str(port), "--",
                                 sys.executable, "-c", "print('never runs')"])
        assert code == 2
        assert f"Port 127.0.0.1:{port} is already in use" in out
        assert "never runs" not in out
    finally:
        holder.close()


def test_worker_environments():
    envs = launch.worker_environments([1000, 1001], devices_per_worker=2,
                                      environ={"CUDA_VISIBLE_DEVICES": "0,1,2,3", "OMPI_COMM_WORLD_RANK": "0"})
    configs = [json.loads(e["TF_CONFIG"]) for e in envs]
    assert configs[1] == {"cluster": {"worker": ["127.0.0.1:1000", "127.0.0.1:1001"]},
                          "task": {"type": "worker", "index": 1}}
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0,1", "2,3"]
    assert all(e["TFSCALE_DEVICES_PER_WORKER"] == "2" for e in envs)
    assert all("OMPI_COMM_WORLD_RANK" not in e for e in envs)
    with pytest.raises(ValueError, match="needs 6"):
        launch.worker_environments([1, 2, 3], 2, environ={"CUDA_VISIBLE_DEVICES": "0,1"})
    with pytest.raises(ValueError, match="devices_per_worker"):
        launch.worker_environments([1], 0, environ={})


def test_all_succeed_with_rank_prefixes_and_tf_config():
    code, out, _ = _run_cli([
        "--num_workers", "3", "--", sys.executable, "-c",
        "import json, os; c = json.loads(os.environ['TF_CONFIG']); "
        "print('index', c['task']['index'], 'of', len(c['cluster']['worker']))",
    ])
    assert code == 0, out
    for rank in range(3):
        assert f"[worker {rank}] index {rank} of 3" in out
    assert "[launch] all 3 workers exited 0" in out


def test_first_failure_stops_the_others():
    # Worker 1 exits 3 at once; worker 0 would sleep 60 s but must be stopped.
    script = (
        "import json, os, sys, time; i = json.loads(os.environ['TF_CONFIG'])['task']['index']; "
        "sys.exit(3) if i == 1 else time.sleep(60)"
    )
    code, out, seconds = _run_cli(["--num_workers", "2", "--grace_seconds", "2", "--",
                                   sys.executable, "-c", script])
    assert code == 3, out
    assert seconds < 30
    assert "worker 1 (pid" in out and "exited with code 3; stopping workers [0]" in out


def test_killed_worker_is_reported_with_its_signal():
    script = (
        "import json, os, signal, time; i = json.loads(os.environ['TF_CONFIG'])['task']['index']; "
        "time.sleep(0.5); os.kill(os.getpid(), signal.SIGKILL) if i == 0 else time.sleep(60)"
    )
    code, out, seconds = _run_cli(["--num_workers", "2", "--grace_seconds", "2", "--",
                                   sys.executable, "-c", script])
    assert code == 128 + 9, out
    assert "worker 0 (pid" in out and "was killed by SIGKILL" in out
    assert seconds < 30


def test_timeout():
    code, out, seconds = _run_cli(["--num_workers", "2", "--timeout_seconds", "1", "--grace_seconds", "1",
                                   "--", sys.executable, "-c", "import time; time.sleep(60)"])
    assert code == 124, out
    assert "timeout after 1 s" in out
    assert seconds < 30


def test_no_command_is_an_error():
    code, out, _ = _run_cli(["--num_workers", "2"])
    assert code == 2
    assert "no command given" in out
