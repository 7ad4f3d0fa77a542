"""Tests for tfscale.launch (real processes on 127.0.0.1; no TensorFlow in the workers)."""

import json
import signal
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
            launch.check_ports_free([port], host="127.0.0.1")
        # TensorFlow binds every interface, so a port held on 127.0.0.1 only is in use for it too.
        with pytest.raises(launch.LaunchError, match=f"Port {port} \\(on some interface\\) is already in use"):
            launch.check_ports_free([port])
        code, out, _ = _run_cli(["--num_workers", "2", "--isolation", "none", "--base_port", str(port), "--",
                                 sys.executable, "-c", "print('never runs')"])
        assert code == 2
        assert f"Port {port} (on some interface) is already in use" in out
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


# A worker that behaves like TensorFlow's gRPC server: it listens on 0.0.0.0 at its TF_CONFIG port, says so, and
# waits. `WORKER_1_SLEEPS` makes worker 1 a wrapper that sleeps instead of starting (issue 18, item 4).
_LISTENING_WORKER = """
import json, os, socket, sys, time
config = json.loads(os.environ["TF_CONFIG"])
index = config["task"]["index"]
if index == 1 and os.environ.get("WORKER_1_SLEEPS"):
    time.sleep(600)
port = int(config["cluster"]["worker"][index].rsplit(":", 1)[1])
server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
server.bind(("0.0.0.0", port))
server.listen(8)
print("listening", index, os.getpid(), port, flush=True)
time.sleep(600)
"""


def _external_ipv4():
    """The first global-scope IPv4 address of this machine, or None."""
    try:
        text = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True,
                              text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in text.splitlines():
        fields = line.split()
        if "inet" in fields:
            return fields[fields.index("inet") + 1].split("/")[0]
    return None


def _connects(host, port):
    """One connection attempt to this machine's own `host:port` (2 s at most); True when it is accepted."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(2.0)
    try:
        sock.connect((host, port))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def _start_listening_workers(isolation, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_LISTENING_WORKER)
    proc = subprocess.Popen([sys.executable, "-m", "tfscale.launch", "--num_workers", "2", "--grace_seconds", "2",
                             "--isolation", isolation, "--", sys.executable, str(script)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, workers = [], {}
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "] listening" in line:
                index, pid, port = line.split("listening", 1)[1].split()
                workers[int(index)] = (int(pid), int(port))
    except BaseException:
        _stop_launcher(proc)
        raise
    return proc, workers, lines


def _stop_launcher(proc):
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=30)
    return rest, time.monotonic() - start


def test_workers_are_unreachable_from_the_external_address(tmp_path):
    """Issue 18, item 2: with the privilege, no socket of a 2-worker run answers on the machine's external
    address; the namespace is gone after the launcher stops. Without isolation the same port does answer (so the
    check is a real one)."""
    from tfscale import netns

    supported, why = netns.namespace_support()
    if not supported:
        pytest.skip(f"cannot create network namespaces here: {why}")
    external = _external_ipv4()
    if external is None:
        pytest.skip("this machine has no global IPv4 address to test reachability from")

    proc, workers, lines = _start_listening_workers("auto", tmp_path)
    try:
        assert len(workers) == 2, "".join(lines)
        name = netns.namespace_name(proc.pid)
        assert name in netns.list_namespaces()
        assert any(f"inside network namespace {name}" in line for line in lines), "".join(lines)
        for pid, port in workers.values():
            listening = launch._listening_ports(pid)  # every listening socket of the worker's network stack
            assert port in listening
            for each in sorted(listening):
                assert not _connects(external, each), f"port {each} of worker pid {pid} is reachable"
    finally:
        rest, seconds = _stop_launcher(proc)
    assert seconds < 10, rest  # SIGTERM stops the workers at once (no grace period needed by these)
    assert name not in netns.list_namespaces()

    proc, workers, lines = _start_listening_workers("none", tmp_path)
    try:
        assert len(workers) == 2, "".join(lines)
        assert any("are reachable from the network" in line for line in lines), "".join(lines)
        assert _connects(external, workers[0][1])  # the control: without a namespace the port is open
    finally:
        _stop_launcher(proc)


def test_stale_namespace_of_a_dead_launcher_is_removed(tmp_path):
    from tfscale import netns

    supported, why = netns.namespace_support()
    if not supported:
        pytest.skip(f"cannot create network namespaces here: {why}")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = netns.NetworkNamespace(netns.namespace_name(dead.pid, "test")).create()
    try:
        assert stale.name in netns.list_namespaces()
        code, out, _ = _run_cli(["--num_workers", "1", "--", sys.executable, "-c", "print('ran')"])
        assert code == 0, out
        assert stale.name not in netns.list_namespaces()
        assert "removed network namespaces left by launchers" in out
    finally:
        stale.delete()


def test_isolation_none_warns_that_ports_are_reachable():
    code, out, _ = _run_cli(["--num_workers", "1", "--isolation", "none", "--", sys.executable, "-c", "pass"])
    assert code == 0, out
    assert out.count("are reachable from the network") == 1
    assert "no authentication" in out


def test_a_worker_that_never_starts_stops_the_job_within_the_startup_timeout(tmp_path):
    """Issue 18, item 4: worker 1 is a wrapper that sleeps instead of starting; worker 0 listens and waits for
    it. The launcher names worker 1 and stops both within the start-up timeout."""
    script = tmp_path / "worker.py"
    script.write_text(_LISTENING_WORKER)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tfscale.launch", "--num_workers", "2", "--grace_seconds", "2",
                           "--startup_timeout", "4", "--", sys.executable, str(script)],
                          cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, WORKER_1_SLEEPS="1"))
    seconds = time.monotonic() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode == launch.EXIT_STARTUP_TIMEOUT, out
    assert "start-up timeout: worker 1 (pid" in out and "worker 0 (pid" not in out.split("start-up timeout")[1]
    assert seconds < 30, out


def test_worker_side_startup_watchdog_names_the_missing_worker(tmp_path):
    """Item 4, without the launcher (mpirun, SLURM): worker 0 blocks at start-up (as in
    MultiWorkerMirroredStrategy()) while worker 1 never starts; the watchdog names worker 1 and ends worker 0."""
    free = launch.find_free_ports(2)
    script = (
        "import json, os, socket, time\n"
        "from tfscale import launch\n"
        f"os.environ['TF_CONFIG'] = json.dumps({{'cluster': {{'worker': ['127.0.0.1:{free[0]}', "
        f"'127.0.0.1:{free[1]}']}}, 'task': {{'type': 'worker', 'index': 0}}}})\n"
        f"server = socket.socket(); server.bind(('0.0.0.0', {free[0]})); server.listen(4)\n"
        "launch.StartupWatchdog(2).start()\n"
        "time.sleep(60)  # stands for the blocked strategy creation\n"
    )
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stdout + proc.stderr
    assert f"not reachable: worker 1 (127.0.0.1:{free[1]})" in proc.stdout
    assert time.monotonic() - start < 30
    environ = {"TF_CONFIG": json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                                        "task": {"type": "worker", "index": 0}})}
    stopped = launch.StartupWatchdog(1, environ=environ).start()  # helper for this (pytest) process
    stopped.stop()
    time.sleep(1.5)  # still alive: the stopped helper did not kill us
