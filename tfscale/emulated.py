"""An emulated multi-node cluster on one machine: network namespaces, a bridge and shaped links.

The torus and hierarchical all-reduce exist for networks with tiers: fast links inside a node, slow
links between nodes. One Linux machine can build such a network (root or ``CAP_NET_ADMIN``):

* each node is a network namespace ``tfscale-<launcher pid>-node<i>`` with its own address
  ``10.213.0.<i+1>/24`` on an interface ``eth0``;
* every ``eth0`` is one end of a veth pair whose other end is attached to a bridge ``br0`` in a hub
  namespace ``tfscale-<pid>-hub`` (the switch; nothing in it reaches the machine's own network);
* the node's network card is emulated by a token-bucket filter (``tc qdisc ... tbf``) on both
  directions of its veth pair: ``eth0``'s egress (what the node sends) and the hub end's egress
  (what it receives), at `inter_node_bandwidth`;
* workers of one node talk through the node's own address, which the kernel routes over the
  namespace's loopback: fast, unless `intra_node_bandwidth` shapes ``lo`` too.

``tc netem`` is not available on the machines this was built on, so only bandwidth is emulated,
not latency (FINDINGS.md: 384 Mbit/s measured through a 400 Mbit/s ``tbf``, 16.7 Gbit/s on a
namespace's loopback). TF's gRPC collective runtime runs unchanged across the nodes.

Everything is named with the ``tfscale-<pid>`` prefix of `tfscale.netns`: it is removed by
`EmulatedCluster.delete` (the launcher calls it on a normal exit, Ctrl-C, SIGTERM and a worker's
death), and the namespaces of a launcher that died without cleaning up are removed by the next one
(`tfscale.netns.remove_stale_namespaces`). A failure half-way through `create` deletes whatever was
made before re-raising.
"""

import ipaddress
import subprocess

from tfscale import netns

__all__ = ["EmulatedCluster", "SUBNET", "parse_rate"]

SUBNET = ipaddress.ip_network("10.213.0.0/24")
"""The addresses of the emulated nodes (inside their private namespaces only)."""

_TBF = ("burst", "256kb", "latency", "50ms")  # FINDINGS.md: 384 Mbit/s through a 400 Mbit/s tbf with these
_TC_TIMEOUT_SECONDS = 20


def parse_rate(text, name="inter_node_bandwidth"):
    """Checks a ``tc`` rate such as ``400mbit`` or ``1gbit``; returns it as ``tc`` reads it, and in bytes/s.

    Args:
      text: str, a number with a ``kbit``, ``mbit``, ``gbit`` (bits per second) or ``kbps``, ``mbps``,
        ``gbps`` (bytes per second) unit, as ``tc`` spells them.
      name: str, the argument's name for the error message.

    Returns:
      ``(rate, bytes_per_second)``: the str for ``tc`` and a float.

    Raises:
      ValueError: for anything else, or a rate <= 0 (naming the argument and the value).
    """
    import re  # noqa: PLC0415

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(kbit|mbit|gbit|kbps|mbps|gbps)\s*", str(text).lower())
    value = float(match.group(1)) if match else 0.0
    if not match or not value > 0:
        raise ValueError(f"Argument `{name}` must be a rate like '400mbit' or '1gbit' (> 0). Received: {name}={text!r}")
    unit = match.group(2)
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}[unit[0]]
    per_second = value * scale / 8 if unit.endswith("bit") else value * scale
    return f"{match.group(1)}{unit}", per_second


def _tc(namespace, *args):
    cmd = ["ip", "netns", "exec", namespace, "tc", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_TC_TIMEOUT_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise netns.NamespaceError(f"`{' '.join(cmd)}` failed: {err}") from None
    if proc.returncode != 0:
        raise netns.NamespaceError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc


class EmulatedCluster:
    """`num_nodes` network namespaces joined by a bridge, each node's card shaped to a bandwidth.

    Example:
      >>> with EmulatedCluster(2, "400mbit") as cluster:
      ...     subprocess.run(cluster.wrap(0, ["python", "worker.py"]))   # runs on node 0, 10.213.0.1

    Args:
      num_nodes: int in [2, 200], the number of nodes.
      inter_node_bandwidth: str, a ``tc`` rate (``"400mbit"``): each node's network card, both ways.
      intra_node_bandwidth: None (the namespace's loopback, unshaped) or a ``tc`` rate for traffic
        between the workers of one node.
      pid: int, the owner's pid in the names (default this process's).

    Attributes:
      addresses: list of str, node i's address (``10.213.0.<i+1>``).
      namespaces: list of `tfscale.netns.NetworkNamespace`, one per node.
      hub: the `tfscale.netns.NetworkNamespace` holding the bridge.
      inter_node_bytes_per_s: float, the shaped rate in bytes/s.

    Raises:
      ValueError: for a bad node count or rate.
    """

    def __init__(self, num_nodes, inter_node_bandwidth, intra_node_bandwidth=None, pid=None):
        if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or not 2 <= num_nodes <= 200:
            raise ValueError(f"Argument `num_nodes` must be an int in [2, 200]. Received: num_nodes={num_nodes!r}")
        self.num_nodes = num_nodes
        self.inter_rate, self.inter_node_bytes_per_s = parse_rate(inter_node_bandwidth)
        self.intra_rate = None
        if intra_node_bandwidth is not None:
            self.intra_rate, _ = parse_rate(intra_node_bandwidth, "intra_node_bandwidth")
        hosts = list(SUBNET.hosts())
        self.addresses = [str(hosts[i]) for i in range(num_nodes)]
        self.hub = netns.NetworkNamespace(netns.namespace_name(pid, "hub"))
        self.namespaces = [netns.NetworkNamespace(netns.namespace_name(pid, f"node{i}")) for i in range(num_nodes)]

    def create(self):
        """Builds the namespaces, the bridge, the veth pairs, the addresses and the shaping.

        On any failure everything made so far is deleted before the error is raised.

        Returns:
          self.

        Raises:
          tfscale.netns.NamespaceError: if an ``ip`` or ``tc`` command fails (its message included).
        """
        try:
            self.hub.create()
            self.hub.ip("link", "add", "br0", "type", "bridge")
            self.hub.ip("link", "set", "br0", "up")
            for i, (node, address) in enumerate(zip(self.namespaces, self.addresses)):
                node.create()
                netns._run_ip(["link", "add", f"v{i}", "netns", self.hub.name, "type", "veth",  # pylint: disable=protected-access
                               "peer", "name", "eth0", "netns", node.name])
                self.hub.ip("link", "set", f"v{i}", "master", "br0")
                self.hub.ip("link", "set", f"v{i}", "up")
                node.ip("addr", "add", f"{address}/{SUBNET.prefixlen}", "dev", "eth0")
                node.ip("link", "set", "eth0", "up")
                _tc(node.name, "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", self.inter_rate, *_TBF)
                _tc(self.hub.name, "qdisc", "add", "dev", f"v{i}", "root", "tbf", "rate", self.inter_rate, *_TBF)
                if self.intra_rate is not None:
                    _tc(node.name, "qdisc", "add", "dev", "lo", "root", "tbf", "rate", self.intra_rate, *_TBF)
        except BaseException:
            self.delete()
            raise
        return self

    def wrap(self, node, command):
        """Returns `command` (list of str) prefixed to run on node `node` (an int in ``[0, num_nodes)``)."""
        if not 0 <= node < self.num_nodes:
            raise ValueError(f"Argument `node` must be in [0, {self.num_nodes}). Received: node={node!r}")
        return self.namespaces[node].wrap(command)

    def delete(self):
        """Deletes every namespace this object created (their veth ends and the bridge go with them)."""
        for space in [*self.namespaces, self.hub]:
            space.delete()

    def describe(self):
        """str: one line for the launcher's log."""
        intra = f", {self.intra_rate} inside a node" if self.intra_rate else ", loopback inside a node"
        return (f"emulated cluster of {self.num_nodes} nodes {self.addresses} (namespaces {self.hub.name[:-4]}-node*), "
                f"{self.inter_rate} per node card both ways{intra}")

    def __enter__(self):
        return self.create()

    def __exit__(self, *exc):
        self.delete()
        return False
