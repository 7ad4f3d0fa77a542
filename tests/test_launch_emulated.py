"""`python -m tfscale.launch --nodes N --workers_per_node K --inter_node_bandwidth R`: the emulated cluster.

Addresses each worker gets, cleanup after a normal exit, a killed worker and a killed launcher, the clear error
without privileges, and an all-reduce over the emulated network against numpy. Skipped, with the reason printed,
where network namespaces cannot be made.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tfscale import launch
from tfscale import netns

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUPPORTED, WHY = netns.namespace_support()
needs_netns = pytest.mark.skipif(not SUPPORTED, reason=f"network namespaces unavailable: {WHY}")

_REPORT = ("import json, os, subprocess; "
           "addr = subprocess.run(['ip', '-4', '-o', 'addr', 'show', 'eth0'], capture_output=True, text=True).stdout; "
           "print('REPORT ' + json.dumps({'tf_config': json.loads(os.environ['TF_CONFIG']), 'eth0': addr.split()[3], "
           "'bandwidth': os.environ.get('TFSCALE_INTER_NODE_BANDWIDTH')}))")


def _launch(args, command, timeout=120, **kwargs):
    cmd = [sys.executable, "-m", "tfscale.launch", *args, "--grace_seconds", "2", "--", *command]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kwargs)


def _ours():
    return {n for n in netns.list_namespaces() if n.startswith(netns.NAME_PREFIX)}


@needs_netns
def test_each_worker_gets_its_nodes_address_and_everything_is_removed():
    before = _ours()
    proc = _launch(["--nodes", "2", "--workers_per_node", "2", "--inter_node_bandwidth", "400mbit"],
                   [sys.executable, "-c", _REPORT])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads(line.split("REPORT ", 1)[1]) for line in proc.stdout.splitlines()
               if line.startswith("[worker") and "REPORT " in line]
    assert len(reports) == 4
    for r in reports:
        workers = r["tf_config"]["cluster"]["worker"]
        index = r["tf_config"]["task"]["index"]
        host = workers[index].rsplit(":", 1)[0]
        assert r["eth0"] == f"{host}/24"  # The worker runs inside the namespace that owns its address.
        assert [w.rsplit(":", 1)[0] for w in workers] == ["10.213.0.1"] * 2 + ["10.213.0.2"] * 2
        assert float(r["bandwidth"]) == 50e6  # 400 Mbit/s, for all_reduce="auto"
    assert "emulated cluster of 2 nodes" in proc.stdout
    assert _ours() == before


@needs_netns
def test_a_dead_worker_stops_the_job_and_the_network_goes():
    before = _ours()
    die = "import os, signal; os.kill(os.getpid(), signal.SIGKILL) if os.environ['TF_CONFIG'].endswith('1}}') else __import__('time').sleep(60)"
    proc = _launch(["--nodes", "2", "--workers_per_node", "1", "--inter_node_bandwidth", "1gbit"],
                   [sys.executable, "-c", die])
    assert proc.returncode != 0
    assert "worker 1" in proc.stdout and "SIGKILL" in proc.stdout
    assert _ours() == before


@needs_netns
def test_a_killed_launchers_network_is_removed_by_the_next_launcher():
    cmd = [sys.executable, "-m", "tfscale.launch", "--nodes", "2", "--workers_per_node", "1",
           "--inter_node_bandwidth", "1gbit", "--", sys.executable, "-c", "import time; time.sleep(120)"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    mine = set()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(mine) < 3:
            mine = {n for n in _ours() if n.startswith(f"{netns.NAME_PREFIX}-{proc.pid}-")}
            time.sleep(0.2)
        assert len(mine) == 3, mine  # hub + 2 nodes
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # The launcher cannot clean up now.
        proc.wait(timeout=30)
        for name in mine:  # Its orphaned workers: stop them (a real crash would leave them to the user).
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
    assert mine <= _ours()  # Left behind by the SIGKILL...
    follow = _launch(["--nodes", "2", "--workers_per_node", "1", "--inter_node_bandwidth", "1gbit"],
                     [sys.executable, "-c", "print('ok')"])
    assert follow.returncode == 0, follow.stdout[-2000:]
    assert not mine & _ours()  # ...and removed by the next launcher, which says so.
    assert "removed network namespaces left by launchers that no longer run" in follow.stdout


def test_without_the_privilege_it_says_what_to_do(monkeypatch):
    monkeypatch.setattr(netns, "namespace_support", lambda: (False, "creating a network namespace needs root or "
                                                                     "CAP_NET_ADMIN"))
    with pytest.raises(launch.LaunchError, match=r"--nodes=2 needs network namespaces.*root or CAP_NET_ADMIN.*sudo"):
        launch.launch(["true"], 4, nodes=2, workers_per_node=2, inter_node_bandwidth="400mbit")


def test_bad_emulation_arguments():
    with pytest.raises(ValueError, match="inter_node_bandwidth"):
        launch.launch(["true"], 4, nodes=2, workers_per_node=2, inter_node_bandwidth="fast")
    with pytest.raises(ValueError, match=r"num_workers`=3 must equal nodes=2 x workers_per_node=2"):
        launch.launch(["true"], 3, nodes=2, workers_per_node=2, inter_node_bandwidth="400mbit")
    with pytest.raises(ValueError, match="inter_node_bandwidth"):
        launch.launch(["true"], 4, nodes=2, workers_per_node=2)
