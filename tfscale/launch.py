"""Start N training workers on this machine, each with its own ``TF_CONFIG``.

Usage::

    python -m tfscale.launch --num_workers 4 [--devices_per_worker 2] -- \\
        python scripts/train.py --all_reduce=torus --grid_shape=2x2
    python -m tfscale.launch --nodes 2 --workers_per_node 4 --inter_node_bandwidth 400mbit -- \\
        python scripts/train.py --all_reduce=auto       # an emulated 2-node cluster (root)

What it does:

1. Isolates the workers (``--isolation``, default ``auto``). TensorFlow's gRPC servers listen on
   every interface (``0.0.0.0``, hard-coded in ``grpc_server_lib.cc``) and **have no
   authentication**. With root or ``CAP_NET_ADMIN`` the workers therefore run inside a private
   network namespace ``tfscale-<launcher pid>`` whose only interface is loopback
   (`tfscale.netns`): nothing outside it can connect. It is deleted when the launcher exits
   (normally, on Ctrl-C, SIGTERM or a worker's death); one left by a launcher killed with
   SIGKILL is deleted by the next launcher. Without the privilege the launcher prints one
   warning that the ports are reachable from the network (``--isolation=none`` does the same
   without trying; ``--isolation=netns`` fails instead).
2. Picks `num_workers` free TCP ports (free on every interface), or checks ``--base_port ..
   base_port + num_workers - 1`` and fails with a clear message if one is in use.
3. Starts one copy of the command per worker with ``TF_CONFIG`` set to
   ``{"cluster": {"worker": [...]}, "task": {"type": "worker", "index": i}}``, plus
   ``TFSCALE_DEVICES_PER_WORKER`` (read by
   `tfscale.distribute.collective.create_multi_worker_strategy`) and, when GPUs are
   listed in ``CUDA_VISIBLE_DEVICES``, a disjoint slice of them per worker.
4. Prints every line a worker writes (stdout and stderr) prefixed with ``[worker i]``.
5. Start-up timeout (``--startup_timeout``, default 300 s): a worker that is still running
   but has not opened its port (its TensorFlow server) by then is named, and every worker is
   stopped (exit code 3). A worker waiting for a peer that never comes therefore does not hang.
6. When a worker exits with a non-zero code (or is killed by a signal), stops the others
   (SIGTERM, then SIGKILL after ``--grace_seconds``), says which worker died and why, and
   exits with that first non-zero code (128 + signal number for a signal, as a shell does).
   With ``--timeout_seconds`` the whole job is stopped after that many seconds (exit 124).

The exit code of the launcher is 0 only when every worker exited 0.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

__all__ = [
    "DEFAULT_STARTUP_TIMEOUT_SECONDS",
    "EXIT_STARTUP_TIMEOUT",
    "ISOLATION_MODES",
    "LaunchError",
    "StartupWatchdog",
    "find_free_ports",
    "check_ports_free",
    "worker_environments",
    "launch",
    "main",
]

_HOST = "127.0.0.1"
#: Seconds a worker has to open its port (start its TensorFlow server) before the job is stopped.
DEFAULT_STARTUP_TIMEOUT_SECONDS = 300.0
#: The launcher's exit code when a worker did not start within the start-up timeout.
EXIT_STARTUP_TIMEOUT = 3
#: ``auto``: a private network namespace when possible, else a warning; ``netns``: the namespace or an error;
#: ``none``: no isolation (ports reachable from the network), with a warning.
ISOLATION_MODES = ("auto", "netns", "none")
_EXPOSED_WARNING = (
    "WARNING: the workers' ports {ports} are reachable from the network: TensorFlow's gRPC servers listen on "
    "every interface (0.0.0.0) and have no authentication, so anyone who can reach them can run operations in "
    "the workers. {why}Run as root (or with CAP_NET_ADMIN) to isolate the workers in a private network "
    "namespace, or use a firewalled, trusted network."
)


class LaunchError(RuntimeError):
    """The launcher could not start the workers (bad argument, port in use)."""


def find_free_ports(count, host=""):
    """Returns `count` distinct TCP ports that were free on `host` a moment ago.

    The sockets are bound to port 0 (the kernel picks), all held open until every port is
    chosen so the ports are distinct, then closed; a worker binds its port about a second
    later. Another program could take one in between: the worker then fails to start its
    gRPC server and the launcher reports it.

    Args:
      count: int >= 1, the number of ports.
      host: str, the interface to bind; default ``""`` (every interface, as TensorFlow's
        servers bind).

    Returns:
      A list of `count` ints.

    Raises:
      ValueError: if `count` < 1.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"Argument `count` must be an int >= 1. Received: count={count!r}")
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def check_ports_free(ports, host=""):
    """Raises `LaunchError` naming the first port of `ports` that cannot be bound on `host`.

    Args:
      ports: iterable of ints in 1..65535.
      host: str, the interface; default ``""``: every interface, which is what TensorFlow's
        gRPC servers bind (a port held on any one address is in use for them).

    Raises:
      LaunchError: if a port is in use (or not bindable), with the port and the OS error.
    """
    for port in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((host, port))
        except OSError as err:
            where = f"{host}:{port}" if host else f"{port} (on some interface)"
            raise LaunchError(
                f"Port {where} is already in use ({err.strerror}); the workers need "
                f"ports {list(ports)}. Stop the program that holds it, pick another "
                "--base_port, or leave --base_port unset to use free ports."
            ) from None
        finally:
            sock.close()


class StartupWatchdog:
    """The worker-side half of the start-up timeout: ends the process when the cluster does not form in time.

    `MultiWorkerMirroredStrategy()` blocks until every worker of ``TF_CONFIG`` has joined, with no timeout, while
    holding Python's GIL (no Python thread or signal handler runs) and ignoring SIGTERM. So the watchdog is a small
    helper process (plain Python, no TensorFlow), started before the strategy is created and told to stop right
    after through a pipe. If `timeout_seconds` pass first, it tries one TCP connection (2 s at most) to each other
    worker's address, prints (to stdout) which workers did not answer, and kills the blocked worker with SIGKILL (exit status
    137), so the launcher, ``mpirun`` or SLURM sees it end. If the worker dies first, the pipe closes and the helper
    exits.

    Example:
      >>> watchdog = StartupWatchdog(300).start()   # a no-op outside a multi-worker environment
      >>> strategy = tfscale.distribute.create_strategy(...)
      >>> watchdog.stop()

    Args:
      timeout_seconds: float > 0, or None / 0 to disable.
      environ: mapping read for the cluster (``TF_CONFIG``, Open MPI, SLURM); default `os.environ`.

    Raises:
      ValueError: if `timeout_seconds` is negative.
    """

    def __init__(self, timeout_seconds, environ=None):
        if timeout_seconds is not None and timeout_seconds < 0:
            raise ValueError(f"Argument `timeout_seconds` must be > 0, or 0/None to disable. "
                             f"Received: timeout_seconds={timeout_seconds}")
        self.timeout_seconds = timeout_seconds or None
        self._environ = os.environ if environ is None else environ
        self._pipe = None
        self._helper = None

    def _cluster(self):
        from tfscale.distribute.cluster import cluster_from_environment

        try:
            return cluster_from_environment(self._environ)
        except ValueError:
            return None

    def start(self):
        """Starts the helper process when this process is one worker of several; returns self."""
        info = self._cluster() if self.timeout_seconds else None
        if info is None or len(info.workers) < 2:
            return self
        read_end, self._pipe = os.pipe()
        try:
            self._helper = subprocess.Popen(
                [sys.executable, "-c", _STARTUP_HELPER, str(os.getpid()), repr(float(self.timeout_seconds)),
                 json.dumps(list(info.workers)), str(info.rank)],
                stdin=read_end, close_fds=True)
        finally:
            os.close(read_end)
        return self

    def stop(self):
        """Stops the helper (the cluster has formed)."""
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None
        if self._helper is not None:
            self._helper.wait(timeout=10)
            self._helper = None


# The helper of StartupWatchdog: argv = parent pid, timeout in seconds, JSON list of "host:port", own rank.
_STARTUP_HELPER = r"""
import json, os, select, signal, socket, sys
pid, timeout, workers, rank = int(sys.argv[1]), float(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
if select.select([sys.stdin], [], [], timeout)[0]:
    sys.exit(0)  # the pipe closed: the cluster formed, or the worker ended
def accepts(address):
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2.0).close()
        return True
    except (OSError, ValueError):
        return False
missing = [f"worker {r} ({a})" for r, a in enumerate(workers) if r != rank and not accepts(a)]
who = ", ".join(missing) or "every worker accepts connections, but the cluster did not form"
# stdout: the worker's stderr may be a pipe read by a thread of the (blocked) worker itself.
sys.stdout.write(f"[worker {rank}] start-up timeout: the cluster did not form within {timeout:g} s "
                 f"(--startup_timeout); not reachable: {who}. Stopping this worker (pid {pid}, SIGKILL).\n")
sys.stdout.flush()
try:
    os.kill(pid, signal.SIGKILL)
except ProcessLookupError:
    pass
"""


def _visible_gpus(environ):
    text = environ.get("CUDA_VISIBLE_DEVICES")
    if text is None or not text.strip() or text.strip() == "-1":
        return []
    return [g.strip() for g in text.split(",") if g.strip()]


def worker_environments(ports, devices_per_worker=1, environ=None, hosts=None):
    """Builds each worker's environment: ``TF_CONFIG`` and the device settings.

    Args:
      ports: list of ints, one port on 127.0.0.1 per worker.
      devices_per_worker: int >= 1, replicas per worker. Exported as
        ``TFSCALE_DEVICES_PER_WORKER``; when ``CUDA_VISIBLE_DEVICES`` lists at least
        ``len(ports) * devices_per_worker`` GPUs, worker i gets GPUs
        ``[i * devices_per_worker, (i + 1) * devices_per_worker)`` of that list.
      environ: the base environment; default `os.environ`.
      hosts: None (every worker on 127.0.0.1) or a list of str, worker i's address (the
        node address of an emulated cluster).

    Returns:
      A list of dicts (full environments), one per worker.

    Raises:
      ValueError: if `devices_per_worker` < 1, or GPUs are listed but too few.
    """
    environ = dict(os.environ if environ is None else environ)
    if isinstance(devices_per_worker, bool) or not isinstance(devices_per_worker, int) or devices_per_worker < 1:
        raise ValueError(
            "Argument `devices_per_worker` must be an int >= 1. "
            f"Received: devices_per_worker={devices_per_worker!r}"
        )
    gpus = _visible_gpus(environ)
    if gpus and len(gpus) < len(ports) * devices_per_worker:
        raise ValueError(
            f"CUDA_VISIBLE_DEVICES lists {len(gpus)} GPUs but --num_workers={len(ports)} x "
            f"--devices_per_worker={devices_per_worker} needs {len(ports) * devices_per_worker}."
        )
    if hosts is not None and len(hosts) != len(ports):
        raise ValueError(f"Argument `hosts` must have one address per port ({len(ports)}). Received: {hosts!r}")
    workers = [f"{_HOST if hosts is None else hosts[i]}:{port}" for i, port in enumerate(ports)]
    envs = []
    for index in range(len(ports)):
        env = dict(environ)
        env["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        )
        env["TFSCALE_DEVICES_PER_WORKER"] = str(devices_per_worker)
        env["PYTHONUNBUFFERED"] = "1"
        if gpus:
            start = index * devices_per_worker
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[start:start + devices_per_worker])
        # mpirun/SLURM variables would describe another cluster: TF_CONFIG wins anyway,
        # but drop them so that nothing downstream is confused.
        for key in list(env):
            if key.startswith("OMPI_COMM_WORLD_") or key in ("SLURM_PROCID", "SLURM_NTASKS"):
                del env[key]
        envs.append(env)
    return envs


def _describe_exit(code):
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


def _shell_code(code):
    return 128 - code if code < 0 else code


def _pump(rank, stream, out, lock):
    prefix = f"[worker {rank}] "
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace").rstrip("\n")
        with lock:
            out.write(prefix + line + "\n")
            out.flush()
    stream.close()


def _listening_ports(pid):
    """The TCP ports in LISTEN state in the network namespace of process `pid` (read from /proc, no traffic)."""
    ports = set()
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) > 3 and fields[3] == "0A":  # TCP_LISTEN
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        except (OSError, ValueError):
            pass
    return ports


def _prepare_isolation(isolation, say):
    """Returns a created `NetworkNamespace` or None (after the exposure warning)."""
    from tfscale import netns

    if isolation == "none":
        return None, "--isolation=none. "
    supported, why = netns.namespace_support()
    if supported:
        try:
            removed = netns.remove_stale_namespaces()
            if removed:
                say(f"removed network namespaces left by launchers that no longer run: {removed}")
            return netns.NetworkNamespace(netns.namespace_name()).create(), ""
        except netns.NamespaceError as err:
            why = str(err)
    if isolation == "netns":
        raise LaunchError(f"--isolation=netns: cannot create a private network namespace: {why}")
    return None, f"No private network namespace: {why}. "


def launch(command, num_workers, devices_per_worker=1, base_port=None, grace_seconds=10.0,
           timeout_seconds=None, out=None, poll_seconds=0.1, *, isolation="auto",
           startup_timeout_seconds=DEFAULT_STARTUP_TIMEOUT_SECONDS, nodes=None, workers_per_node=None,
           inter_node_bandwidth=None, intra_node_bandwidth=None):
    """Runs `command` as `num_workers` workers on 127.0.0.1 and waits for them.

    Args:
      command: list of str, the program and its arguments (e.g.
        ``["python", "scripts/train.py", "--all_reduce=torus"]``).
      num_workers: int >= 1, the number of worker processes.
      devices_per_worker: int >= 1, replicas per worker (see `worker_environments`).
      base_port: int or None. None picks free ports; an int uses ports
        ``base_port .. base_port + num_workers - 1`` and fails if one is in use.
      grace_seconds: float >= 0, seconds between SIGTERM and SIGKILL when stopping the
        surviving workers; default 10.
      timeout_seconds: float or None, stop everything after this many seconds (wall clock)
        and return 124; default None (no limit).
      out: a text stream for the prefixed output and the launcher's messages; default
        `sys.stdout`.
      poll_seconds: float, how often the worker processes are polled; default 0.1 s.
      isolation: one of `ISOLATION_MODES`. ``"auto"`` (default) runs the workers in a private
        network namespace with only loopback when this process has root or ``CAP_NET_ADMIN``,
        else prints a warning that the ports are reachable from the network; ``"netns"``
        raises `LaunchError` when the namespace cannot be made; ``"none"`` never isolates
        (and warns).
      nodes: None (one machine, loopback) or int >= 2: run the workers on an emulated cluster of
        that many nodes (`tfscale.emulated.EmulatedCluster`: a network namespace per node on a
        bridge, each node's card shaped to `inter_node_bandwidth`); needs root or
        ``CAP_NET_ADMIN``. Worker i runs on node ``i // workers_per_node`` and its ``TF_CONFIG``
        carries that node's address; ``TFSCALE_INTER_NODE_BANDWIDTH`` (bytes/s) tells
        ``all_reduce="auto"`` the card's speed.
      workers_per_node: int >= 1 with ``nodes * workers_per_node == num_workers`` (nodes only).
      inter_node_bandwidth: str, a ``tc`` rate such as ``"400mbit"`` (nodes only, required).
      intra_node_bandwidth: None (the node's loopback, unshaped) or a ``tc`` rate.
      startup_timeout_seconds: float > 0 or None: a worker still running without a listening
        port (its TensorFlow server) this many seconds after it started is named, and the job
        is stopped with `EXIT_STARTUP_TIMEOUT`. Default 300; None disables the check.

    Returns:
      int: 0 when all workers exited 0; else the first non-zero exit code (128 + N for a
      worker killed by signal N; 124 on `timeout_seconds`; `EXIT_STARTUP_TIMEOUT` when a
      worker did not start).

    Raises:
      ValueError: if `command` is empty or a numeric argument is out of range.
      LaunchError: if a port in ``base_port ..`` is in use, or ``isolation="netns"`` (or an
        emulated cluster) is not possible; the message says what to do.
    """
    out = sys.stdout if out is None else out
    if not command:
        raise ValueError("Argument `command` must be a non-empty list, e.g. ['python', 'train.py'].")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"Argument `num_workers` must be an int >= 1. Received: num_workers={num_workers!r}")
    if grace_seconds < 0:
        raise ValueError(f"Argument `grace_seconds` must be >= 0. Received: grace_seconds={grace_seconds}")
    if timeout_seconds is not None and timeout_seconds <= 0:
        raise ValueError(
            f"Argument `timeout_seconds` must be > 0 or None. Received: timeout_seconds={timeout_seconds}"
        )
    if startup_timeout_seconds is not None and not startup_timeout_seconds > 0:
        raise ValueError(
            "Argument `startup_timeout_seconds` must be > 0 or None. "
            f"Received: startup_timeout_seconds={startup_timeout_seconds}"
        )
    if isolation not in ISOLATION_MODES:
        raise ValueError(f"Argument `isolation` must be one of {list(ISOLATION_MODES)}. "
                         f"Received: isolation={isolation!r}")
    if base_port is not None and not 0 < base_port <= 65536 - num_workers:
        raise ValueError(
            f"Argument `base_port` must be in 1..{65536 - num_workers}. Received: base_port={base_port}"
        )
    lock = threading.Lock()

    def say(message):
        with lock:
            out.write(f"[launch] {message}\n")
            out.flush()

    if nodes is not None:
        return _launch_emulated(command, num_workers, devices_per_worker, base_port, grace_seconds,
                                timeout_seconds, startup_timeout_seconds, out, lock, say, poll_seconds,
                                nodes, workers_per_node, inter_node_bandwidth, intra_node_bandwidth)
    if workers_per_node is not None or inter_node_bandwidth is not None or intra_node_bandwidth is not None:
        raise ValueError("Arguments `workers_per_node`, `inter_node_bandwidth` and `intra_node_bandwidth` need "
                         "`nodes` (an emulated cluster). Received: nodes=None")
    namespace, why_exposed = _prepare_isolation(isolation, say)
    try:
        if namespace is None:
            if base_port is None:
                ports = find_free_ports(num_workers)
            else:
                ports = list(range(base_port, base_port + num_workers))
                check_ports_free(ports)
            say(_EXPOSED_WARNING.format(ports=ports, why=why_exposed))
            where = ""
        else:  # a fresh network stack: every port is free there
            ports = find_free_ports(num_workers) if base_port is None else list(
                range(base_port, base_port + num_workers))
            where = f" inside network namespace {namespace.name} (loopback only, unreachable from the network)"
        envs = worker_environments(ports, devices_per_worker)
        say(f"starting {num_workers} workers on {', '.join(f'{_HOST}:{p}' for p in ports)}{where}: "
            f"{' '.join(command)}")
        return _run_workers(command if namespace is None else namespace.wrap(command), envs, ports,
                            grace_seconds, timeout_seconds, startup_timeout_seconds, out, lock, say,
                            poll_seconds)
    finally:
        if namespace is not None:
            namespace.delete()


def _launch_emulated(command, num_workers, devices_per_worker, base_port, grace_seconds, timeout_seconds,
                     startup_timeout_seconds, out, lock, say, poll_seconds, nodes, workers_per_node,
                     inter_node_bandwidth, intra_node_bandwidth):
    """`launch` on an emulated cluster of `nodes` network namespaces (see `tfscale.emulated`)."""
    from tfscale import emulated
    from tfscale import netns

    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 2:
        raise ValueError(f"Argument `nodes` must be an int >= 2. Received: nodes={nodes!r}")
    if isinstance(workers_per_node, bool) or not isinstance(workers_per_node, int) or workers_per_node < 1:
        raise ValueError(f"Argument `workers_per_node` must be an int >= 1. Received: workers_per_node={workers_per_node!r}")
    if nodes * workers_per_node != num_workers:
        raise ValueError(f"Argument `num_workers`={num_workers} must equal nodes={nodes} x "
                         f"workers_per_node={workers_per_node}")
    if inter_node_bandwidth is None:
        raise ValueError("Argument `inter_node_bandwidth` is required with `nodes`, e.g. '400mbit'. "
                         "Received: inter_node_bandwidth=None")
    cluster = emulated.EmulatedCluster(nodes, inter_node_bandwidth, intra_node_bandwidth)  # checks the rates
    supported, why = netns.namespace_support()
    if not supported:
        raise LaunchError(f"--nodes={nodes} needs network namespaces: {why}. Run the launcher as root "
                          "(e.g. with sudo) or give it CAP_NET_ADMIN, or drop --nodes to run on loopback.")
    removed = netns.remove_stale_namespaces()
    if removed:
        say(f"removed network namespaces left by launchers that no longer run: {removed}")
    try:
        cluster.create()
    except netns.NamespaceError as err:
        raise LaunchError(f"--nodes={nodes}: could not build the emulated network (nothing was left behind): "
                          f"{err}") from None
    try:
        # Fresh network stacks: every port is free; ports differ inside a node, addresses between nodes.
        first = 23456 if base_port is None else base_port
        ports = [first + rank % workers_per_node for rank in range(num_workers)]
        hosts = [cluster.addresses[rank // workers_per_node] for rank in range(num_workers)]
        envs = worker_environments(ports, devices_per_worker, hosts=hosts)
        for env in envs:
            env["TFSCALE_INTER_NODE_BANDWIDTH"] = repr(cluster.inter_node_bytes_per_s)
        say(cluster.describe())
        say(f"starting {num_workers} workers ({workers_per_node} per node) on "
            f"{', '.join(f'{h}:{p}' for h, p in zip(hosts, ports))}: {' '.join(command)}")
        commands = [cluster.wrap(rank // workers_per_node, command) for rank in range(num_workers)]
        return _run_workers(commands, envs, ports, grace_seconds, timeout_seconds, startup_timeout_seconds, out,
                            lock, say, poll_seconds)
    finally:
        cluster.delete()


def _run_workers(command, envs, ports, grace_seconds, timeout_seconds, startup_timeout_seconds, out, lock,
                 say, poll_seconds):
    """Runs the workers; `command` is one command for all, or a list of one command per worker."""
    num_workers = len(envs)
    procs, pumps = [], []
    first_failure = None
    try:
        per_worker = command if command and isinstance(command[0], (list, tuple)) else [command] * len(envs)
        for rank, env in enumerate(envs):
            proc = subprocess.Popen(
                per_worker[rank], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
            procs.append(proc)
            pump = threading.Thread(target=_pump, args=(rank, proc.stdout, out, lock), daemon=True)
            pump.start()
            pumps.append(pump)
        started = time.monotonic()
        deadline = None if timeout_seconds is None else started + timeout_seconds
        startup_deadline = None if startup_timeout_seconds is None else started + startup_timeout_seconds
        joined = set()
        while True:
            codes = [proc.poll() for proc in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed and first_failure is None:
                first_failure = failed[0]
                rank, code = first_failure
                alive = [r for r, c in enumerate(codes) if c is None]
                say(
                    f"worker {rank} (pid {procs[rank].pid}) {_describe_exit(code)}; "
                    + (f"stopping workers {alive}" if alive else "no other worker is running")
                )
                break
            if all(c is not None for c in codes):
                break
            now = time.monotonic()
            if deadline is not None and now > deadline:
                alive = [r for r, c in enumerate(codes) if c is None]
                say(f"timeout after {timeout_seconds:g} s; stopping workers {alive}")
                first_failure = (None, 124)
                break
            if startup_deadline is not None:
                for r, proc in enumerate(procs):
                    if r not in joined and codes[r] is None and ports[r] in _listening_ports(proc.pid):
                        joined.add(r)
                missing = [r for r, c in enumerate(codes) if c is None and r not in joined]
                if not missing:
                    startup_deadline = None  # every running worker has its server up
                elif now > startup_deadline:
                    names = ", ".join(f"worker {r} (pid {procs[r].pid}, port {ports[r]})" for r in missing)
                    say(f"start-up timeout: {names} did not start its server within "
                        f"{startup_timeout_seconds:g} s (--startup_timeout); stopping all workers")
                    first_failure = (None, EXIT_STARTUP_TIMEOUT)
                    break
            time.sleep(poll_seconds)
    except KeyboardInterrupt:
        say("interrupted; stopping all workers")
        first_failure = (None, 130)
    finally:
        _stop(procs, grace_seconds)
        for pump in pumps:
            pump.join(timeout=5)
    if first_failure is None:
        say(f"all {num_workers} workers exited 0")
        return 0
    rank, code = first_failure
    if rank is None:
        return code
    others = {r: p.returncode for r, p in enumerate(procs) if r != rank}
    say(f"exit codes: {dict(sorted({rank: code, **others}.items()))}; returning {_shell_code(code)}")
    return _shell_code(code)


def _stop(procs, grace_seconds):
    """SIGTERM each running worker's process group, then SIGKILL after the grace period."""
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_seconds
    for proc in running:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m tfscale.launch",
        description="Run a training command as N MultiWorkerMirroredStrategy workers on 127.0.0.1 "
                    "(in a private network namespace when possible).",
        epilog="Example: python -m tfscale.launch --num_workers 4 -- python scripts/train.py --all_reduce=torus",
    )
    parser.add_argument("--num_workers", type=int, default=None,
                        help="number of worker processes (>= 1); default --nodes x --workers_per_node")
    parser.add_argument("--nodes", type=int, default=None,
                        help="run on an emulated cluster of this many nodes (network namespaces on a bridge; "
                             "needs root or CAP_NET_ADMIN)")
    parser.add_argument("--workers_per_node", type=int, default=None, help="workers per emulated node")
    parser.add_argument("--inter_node_bandwidth", default=None,
                        help="each emulated node's network card, a tc rate such as 400mbit or 1gbit")
    parser.add_argument("--intra_node_bandwidth", default=None,
                        help="shape traffic inside an emulated node too (a tc rate); default: loopback speed")
    parser.add_argument("--devices_per_worker", type=int, default=1,
                        help="replicas per worker (GPUs are split between workers); default 1")
    parser.add_argument("--base_port", type=int, default=None,
                        help="use ports base_port..base_port+N-1 instead of free ones")
    parser.add_argument("--grace_seconds", type=float, default=10.0,
                        help="seconds between SIGTERM and SIGKILL when stopping workers; default 10")
    parser.add_argument("--timeout_seconds", type=float, default=None,
                        help="stop all workers after this many seconds (exit 124); default: no limit")
    parser.add_argument("--isolation", choices=ISOLATION_MODES, default="auto",
                        help="auto (default): run the workers in a private network namespace with only "
                             "loopback when root/CAP_NET_ADMIN allows it, else warn that their ports are "
                             "reachable from the network; netns: the namespace or an error; none: no isolation")
    parser.add_argument("--startup_timeout", type=float, default=DEFAULT_STARTUP_TIMEOUT_SECONDS,
                        help="seconds a worker has to start its server before the job is stopped (exit 3), "
                             "naming the missing worker; 0 disables; default %(default)g")
    parser.add_argument("--verbosity", type=int, default=None,
                        help="show TensorFlow's INFO lines and known-harmless warnings (the cuInit failure of "
                             "CPU-only machines, oneDNN banners), in the launcher and, through "
                             "TF_CPP_MIN_LOG_LEVEL=0, in the workers; default: hidden")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given; put it after '--', e.g. -- python scripts/train.py")
    if args.num_workers is None:
        if args.nodes is None or args.workers_per_node is None:
            parser.error("--num_workers is required (or --nodes and --workers_per_node)")
        args.num_workers = args.nodes * args.workers_per_node
    return args, command


def main(argv=None):
    """Command-line entry point; returns the exit code (see `launch`)."""
    args, command = _parse_args(sys.argv[1:] if argv is None else argv)
    from tfscale import _process

    # TF_CPP_MIN_LOG_LEVEL=1 (or 0 with --verbosity) reaches every worker through its environment.
    _process.quiet_tensorflow_logs(verbose=args.verbosity is not None)

    def _on_sigterm(signum, frame):  # stop the workers when the launcher itself is stopped
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return launch(
            command, args.num_workers, devices_per_worker=args.devices_per_worker,
            base_port=args.base_port, grace_seconds=args.grace_seconds,
            timeout_seconds=args.timeout_seconds, isolation=args.isolation,
            startup_timeout_seconds=args.startup_timeout or None, nodes=args.nodes,
            workers_per_node=args.workers_per_node, inter_node_bandwidth=args.inter_node_bandwidth,
            intra_node_bandwidth=args.intra_node_bandwidth,
        )
    except (LaunchError, ValueError) as err:
        sys.stderr.write(f"[launch] error: {err}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
