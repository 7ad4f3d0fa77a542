"""Private Linux network namespaces for local workers: loopback only, unreachable from the network.

TensorFlow's gRPC servers (the worker server and the tf.data service) always listen on every interface:
``grpc_server_lib.cc`` hard-codes ``AddListeningPort("0.0.0.0:" + port)``, and the gRPC runtime has no
authentication. Anyone who can reach a worker's port can run operations in it. On one machine the launcher
therefore places its workers in a private network namespace whose only interface is ``lo``: ``0.0.0.0`` inside
it means the namespace's own loopback, and nothing outside the namespace can connect.

The machinery, all through the ``ip`` command of iproute2 (needs root or ``CAP_NET_ADMIN``):

    ip netns add tfscale-<launcher pid>        # a new network stack, with only a "down" lo
    ip -n tfscale-<pid> link set lo up         # loopback up: 127.0.0.1 works inside
    ip netns exec tfscale-<pid> CMD ...        # each worker runs inside (files, env, cwd shared)
    ip netns del tfscale-<pid>                 # on exit: normal, Ctrl-C, SIGTERM or a worker's death

A namespace is never left half-created (a failed ``lo up`` deletes it again), and the namespaces of launchers that
died without cleaning up (``kill -9``) are removed by the next launcher (`remove_stale_namespaces`): the pid in the
name no longer runs.

Names: ``tfscale-<pid>`` for the one-node case; an emulated cluster of several nodes (several namespaces joined by
veth pairs and a bridge, with ``tc tbf`` bandwidth shaping, issue 13) would use ``tfscale-<pid>-<node>``, which the
same prefix, staleness rule and `NetworkNamespace` class cover. `NetworkNamespace.ip` runs any ``ip -n NAME ...``
command inside the namespace, for the veth and address set-up such a cluster needs.
"""

import os
import re
import shutil
import subprocess

__all__ = [
    "NAME_PREFIX",
    "NamespaceError",
    "NetworkNamespace",
    "namespace_support",
    "namespace_name",
    "list_namespaces",
    "remove_stale_namespaces",
]

#: Every namespace tfscale creates starts with this prefix, followed by ``-<creator pid>[-<suffix>]``.
NAME_PREFIX = "tfscale"
_NAME_RE = re.compile(rf"^{NAME_PREFIX}-(\d+)(?:-[A-Za-z0-9_]+)?$")
_CAP_NET_ADMIN = 12  # bit of CapEff in /proc/self/status (linux/capability.h)
_IP_TIMEOUT_SECONDS = 20


class NamespaceError(RuntimeError):
    """Creating, configuring or deleting a network namespace failed (the message has ``ip``'s error)."""


def _has_cap_net_admin():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_NET_ADMIN & 1)
    except (OSError, ValueError):
        pass
    return False


def namespace_support():
    """Says whether this process can create network namespaces.

    Returns:
      A pair ``(supported, reason)``: bool, and a str explaining why not (empty when supported). Requires Linux,
      the ``ip`` command (iproute2) and root or the ``CAP_NET_ADMIN`` capability.
    """
    if not os.path.isdir("/proc/self/ns") or not os.path.exists("/proc/self/ns/net"):
        return False, "this system has no Linux network namespaces"
    if shutil.which("ip") is None:
        return False, "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0 and not _has_cap_net_admin():
        return False, "creating a network namespace needs root or CAP_NET_ADMIN"
    return True, ""


def namespace_name(pid=None, suffix=None):
    """Returns the name tfscale gives the namespace of process `pid`: ``tfscale-<pid>[-<suffix>]``.

    Args:
      pid: int, the creating (launcher) process; default this process.
      suffix: optional str of letters, digits and ``_`` (e.g. a node name ``node0`` of an emulated cluster).

    Raises:
      ValueError: if `suffix` has other characters or `pid` is not a positive int.
    """
    pid = os.getpid() if pid is None else pid
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise ValueError(f"Argument `pid` must be an int > 0. Received: pid={pid!r}")
    name = f"{NAME_PREFIX}-{pid}"
    if suffix is not None:
        if not isinstance(suffix, str) or not re.fullmatch(r"[A-Za-z0-9_]+", suffix):
            raise ValueError(f"Argument `suffix` must be letters, digits or '_'. Received: suffix={suffix!r}")
        name += f"-{suffix}"
    return name


def _run_ip(args, check=True):
    try:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=_IP_TIMEOUT_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise NamespaceError(f"`ip {' '.join(args)}` failed: {err}") from None
    if check and proc.returncode != 0:
        raise NamespaceError(f"`ip {' '.join(args)}` failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc


def list_namespaces():
    """Returns the names of all network namespaces that ``ip netns list`` shows (any creator)."""
    proc = _run_ip(["netns", "list"], check=False)
    if proc.returncode != 0:
        return []
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_namespaces():
    """Deletes the ``tfscale-<pid>...`` namespaces whose creating process no longer runs.

    A launcher killed with SIGKILL cannot clean up; the next launcher calls this before creating its own. Other
    namespaces (other prefixes, or a live creator) are left alone.

    Returns:
      The list of deleted names.
    """
    removed = []
    for name in list_namespaces():
        match = _NAME_RE.match(name)
        if match and not _pid_alive(int(match.group(1))):
            if _run_ip(["netns", "del", name], check=False).returncode == 0:
                removed.append(name)
    return removed


class NetworkNamespace:
    """One private network namespace with its loopback up; usable as a context manager.

    Example:
      >>> with NetworkNamespace(namespace_name()) as ns:
      ...     subprocess.run(ns.wrap(["python", "worker.py"]))   # runs with only 127.0.0.1

    Args:
      name: str, the namespace name (see `namespace_name`).

    Attributes:
      name: the name.
      created: bool, whether this object created it and has not deleted it yet.
    """

    def __init__(self, name):
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
            raise ValueError(f"Argument `name` must be a namespace name (letters, digits, '_.-'). "
                             f"Received: name={name!r}")
        self.name = name
        self.created = False

    def create(self):
        """Creates the namespace and brings its ``lo`` up; on any failure nothing is left behind.

        Raises:
          NamespaceError: if ``ip`` fails (the namespace exists already, no privilege, ...).
        """
        _run_ip(["netns", "add", self.name])
        self.created = True
        try:
            self.ip("link", "set", "lo", "up")
        except BaseException:
            self.delete()
            raise
        return self

    def ip(self, *args):
        """Runs ``ip -n NAME ARGS...`` (e.g. ``ns.ip("addr", "add", "10.0.0.1/24", "dev", "veth0")``).

        Returns:
          The `subprocess.CompletedProcess` (stdout, stderr as text).

        Raises:
          NamespaceError: when the command fails.
        """
        return _run_ip(["-n", self.name, *args])

    def wrap(self, command):
        """Returns `command` (list of str) prefixed so that it runs inside this namespace."""
        return ["ip", "netns", "exec", self.name, *command]

    def delete(self):
        """Deletes the namespace if this object created it; safe to call twice. Processes still inside keep their
        network stack until they exit."""
        if self.created:
            _run_ip(["netns", "del", self.name], check=False)
            self.created = False

    def __enter__(self):
        return self.create() if not self.created else self

    def __exit__(self, *exc):
        self.delete()
        return False

    def __repr__(self):
        return f"NetworkNamespace({self.name!r}, created={self.created})"
