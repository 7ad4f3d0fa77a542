"""The emulated multi-node cluster: namespaces, addresses, shaping, connectivity and cleanup.

Skipped, with the reason printed, where network namespaces cannot be made (no root / CAP_NET_ADMIN, no `ip`).
"""

import subprocess
import sys

import pytest

from tfscale import emulated
from tfscale import netns

SUPPORTED, WHY = netns.namespace_support()
needs_netns = pytest.mark.skipif(not SUPPORTED, reason=f"network namespaces unavailable: {WHY}")


def _ours():
    return [n for n in netns.list_namespaces() if n.startswith(netns.NAME_PREFIX)]


def test_parse_rate():
    assert emulated.parse_rate("400mbit") == ("400mbit", 50e6)
    assert emulated.parse_rate("1gbit")[1] == 125e6
    assert emulated.parse_rate("2.5MBPS")[1] == 2.5e6
    for bad in ("400", "fast", "0mbit", "-1gbit", None):
        with pytest.raises(ValueError, match="inter_node_bandwidth"):
            emulated.parse_rate(bad)


def test_bad_node_count():
    with pytest.raises(ValueError, match="num_nodes"):
        emulated.EmulatedCluster(1, "400mbit")


@needs_netns
def test_nodes_addresses_shaping_and_cleanup():
    before = set(_ours())
    cluster = emulated.EmulatedCluster(2, "200mbit", intra_node_bandwidth="1gbit")
    with cluster:
        assert set(_ours()) - before == {cluster.hub.name, *(n.name for n in cluster.namespaces)}
        for i, address in enumerate(cluster.addresses):
            shown = subprocess.run(cluster.wrap(i, ["ip", "-4", "addr", "show", "eth0"]), capture_output=True,
                                   text=True, check=True).stdout
            assert f"{address}/24" in shown
            qdiscs = subprocess.run(cluster.wrap(i, ["tc", "qdisc", "show"]), capture_output=True, text=True,
                                    check=True).stdout
            assert "tbf" in qdiscs and "200Mbit" in qdiscs and "1Gbit" in qdiscs  # card and loopback shaped
        # Node 0 reaches node 1's address (one bounded connection inside our own namespaces).
        server = subprocess.Popen(cluster.wrap(1, [sys.executable, "-c",
                                  "import socket; s=socket.socket(); s.bind(('0.0.0.0', 5557)); s.listen(1); "
                                  "s.settimeout(20); c, _ = s.accept(); c.sendall(b'ok')"]))
        try:
            reply = subprocess.run(cluster.wrap(0, [sys.executable, "-c",
                                   "import socket, time\nfor _ in range(50):\n try:\n  s = socket.create_connection("
                                   f"('{cluster.addresses[1]}', 5557), timeout=2); break\n except OSError: time.sleep(0.1)\n"
                                   "print(s.recv(2).decode())"]), capture_output=True, text=True, timeout=30)
            assert reply.stdout.strip() == "ok", reply.stderr
        finally:
            server.wait(timeout=30)
    assert set(_ours()) == before  # Nothing left behind.


@needs_netns
def test_a_failure_half_way_leaves_nothing(monkeypatch):
    before = set(_ours())
    calls = []
    real = emulated._tc

    def failing_tc(namespace, *args):
        calls.append(args)
        if len(calls) == 3:
            raise netns.NamespaceError("injected failure")
        return real(namespace, *args)

    monkeypatch.setattr(emulated, "_tc", failing_tc)
    with pytest.raises(netns.NamespaceError, match="injected failure"):
        emulated.EmulatedCluster(2, "400mbit").create()
    assert set(_ours()) == before


@needs_netns
def test_stale_namespaces_of_a_dead_launcher_are_removed():
    # A pid that cannot be running (beyond pid_max): as if its launcher had been killed with SIGKILL.
    dead = emulated.EmulatedCluster(2, "400mbit", pid=4_999_999).create()
    names = {dead.hub.name, *(n.name for n in dead.namespaces)}
    assert names <= set(_ours())
    removed = netns.remove_stale_namespaces()
    assert names <= set(removed) and not names & set(_ours())
