"""Cluster resolution for multi-worker training: TF_CONFIG, Open MPI and SLURM.

`MultiWorkerMirroredStrategy` needs to know every worker's ``host:port`` and which one it
is. Three launchers describe that in three ways; this module turns each into one
`ClusterInfo`:

1. ``TF_CONFIG`` (tfscale's launcher, Kubernetes/TFJob, Vertex AI): a JSON string
   ``{"cluster": {"chief": [...], "worker": [...]}, "task": {"type": ..., "index": ...}}``.
2. Open MPI (``mpirun -np N python ...``): ``OMPI_COMM_WORLD_SIZE`` / ``_RANK`` /
   ``_LOCAL_RANK`` / ``_LOCAL_SIZE``. MPI does not export the other ranks' host names,
   so a job on one node uses ``127.0.0.1``; a job on several nodes needs
   ``TFSCALE_WORKER_HOSTS`` (one host per node in rank order, block distribution).
3. SLURM (``srun python ...``): ``SLURM_PROCID``, ``SLURM_NTASKS``,
   ``SLURM_STEP_NODELIST`` (or ``SLURM_JOB_NODELIST``) and ``SLURM_STEP_TASKS_PER_NODE``
   (or ``SLURM_TASKS_PER_NODE``), expanded here without calling ``scontrol``; ranks fill
   the nodes in block order, as `tf.distribute.cluster_resolver.SlurmClusterResolver`
   assumes.

Ports for MPI and SLURM are ``TFSCALE_BASE_PORT`` (default 23456) plus the local rank.

Precedence: ``TF_CONFIG`` wins over Open MPI, which wins over SLURM (``mpirun`` inside a
SLURM allocation sets both, and the MPI ranks are the processes that run).

This module is pure Python; only `make_cluster_resolver` imports TensorFlow.
"""

import dataclasses
import json
import os
import re

__all__ = [
    "DEFAULT_BASE_PORT",
    "ClusterInfo",
    "parse_tf_config",
    "cluster_from_environment",
    "in_multi_worker_environment",
    "expand_slurm_nodelist",
    "expand_slurm_tasks_per_node",
    "make_cluster_resolver",
]

DEFAULT_BASE_PORT = 23456
_ADDRESS_RE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")
_WORKER_JOBS = ("chief", "worker")


@dataclasses.dataclass(frozen=True)
class ClusterInfo:
    """Where every worker of a synchronous data-parallel job listens, and who we are.

    Attributes:
      workers: tuple of ``"host:port"`` strings, one per worker task, in task order
        (the chief first when the cluster has a ``chief`` job).
      task_type: ``"worker"`` or ``"chief"``: this process's job name.
      task_id: int, this process's index inside its job.
      rank: int in ``[0, num_workers)``, this process's position in `workers`.
      source: where it came from: ``"TF_CONFIG"``, ``"OMPI"`` or ``"SLURM"``.
      chief: bool, whether the cluster has a separate ``chief`` job (only from TF_CONFIG).
    """

    workers: tuple
    task_type: str
    task_id: int
    rank: int
    source: str
    chief: bool = False

    @property
    def num_workers(self):
        """int: the number of worker processes (chief included)."""
        return len(self.workers)

    @property
    def is_chief(self):
        """bool: whether this process writes checkpoints and results (rank 0)."""
        return self.rank == 0

    def cluster_dict(self):
        """Returns the cluster as ``{"chief": [...], "worker": [...]}`` (TF_CONFIG's form)."""
        if self.chief:
            return {"chief": [self.workers[0]], "worker": list(self.workers[1:])}
        return {"worker": list(self.workers)}

    def to_tf_config(self):
        """Returns this cluster as a ``TF_CONFIG`` JSON string for this process."""
        return json.dumps(
            {"cluster": self.cluster_dict(), "task": {"type": self.task_type, "index": self.task_id}}
        )


def _check_address(address, where):
    if not isinstance(address, str) or not _ADDRESS_RE.match(address):
        raise ValueError(
            f"TF_CONFIG {where} must be a 'host:port' string. Received: {address!r}"
        )
    port = int(address.rsplit(":", 1)[1])
    if not 0 < port < 65536:
        raise ValueError(f"TF_CONFIG {where} has port {port}, expected 1..65535. Received: {address!r}")


def parse_tf_config(text):
    """Parses and validates a ``TF_CONFIG`` JSON string.

    Only the ``chief`` and ``worker`` jobs take part in the all-reduce; ``ps`` is rejected
    (tfscale is synchronous data-parallel) and ``evaluator`` is ignored.

    Args:
      text: str, the value of the ``TF_CONFIG`` environment variable.

    Returns:
      A `ClusterInfo` with ``source="TF_CONFIG"``.

    Raises:
      ValueError: if `text` is not JSON, is not an object, lacks ``cluster`` or ``task``,
        has no ``worker``/``chief`` job, has a ``ps`` job, an address that is not
        ``host:port``, duplicate addresses, more than one chief, a ``task.type`` that is
        not ``chief``/``worker`` or a ``task.index`` out of range. The message quotes the
        offending value.
    """
    shown = text if len(text) <= 400 else text[:400] + "..."
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"TF_CONFIG is not valid JSON ({err}). Received: TF_CONFIG={shown!r}") from None
    if not isinstance(config, dict):
        raise ValueError(f"TF_CONFIG must be a JSON object. Received: TF_CONFIG={shown!r}")
    cluster = config.get("cluster")
    task = config.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise ValueError(
            "TF_CONFIG must have a non-empty 'cluster' object, e.g. "
            '{"cluster": {"worker": ["host0:port", "host1:port"]}, "task": {"type": "worker", '
            f'"index": 0}}}}. Received: TF_CONFIG={shown!r}'
        )
    if not isinstance(task, dict):
        raise ValueError(
            "TF_CONFIG must have a 'task' object with 'type' and 'index'. "
            f"Received: TF_CONFIG={shown!r}"
        )
    if "ps" in cluster:
        raise ValueError(
            "TF_CONFIG has a 'ps' job: tfscale trains synchronously with "
            "MultiWorkerMirroredStrategy and takes only 'chief' and 'worker' jobs. "
            f"Received: cluster={cluster!r}"
        )
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not addresses:
            raise ValueError(
                f"TF_CONFIG cluster['{job}'] must be a non-empty list of 'host:port' strings. "
                f"Received: {addresses!r}"
            )
        for i, address in enumerate(addresses):
            _check_address(address, f"cluster['{job}'][{i}]")
    chief = list(cluster.get("chief", []))
    if len(chief) > 1:
        raise ValueError(f"TF_CONFIG cluster['chief'] must have one address. Received: {chief!r}")
    workers = chief + list(cluster.get("worker", []))
    if not workers:
        raise ValueError(
            "TF_CONFIG cluster must have a 'worker' (or 'chief') job. "
            f"Received: cluster={cluster!r}"
        )
    if len(set(workers)) != len(workers):
        raise ValueError(f"TF_CONFIG cluster lists an address twice. Received: {workers!r}")
    task_type = task.get("type")
    task_id = task.get("index")
    if task_type not in _WORKER_JOBS or task_type not in cluster:
        raise ValueError(
            "TF_CONFIG task['type'] must be one of the cluster's jobs "
            f"{sorted(j for j in cluster if j in _WORKER_JOBS)}. Received: task={task!r}"
        )
    if isinstance(task_id, bool) or not isinstance(task_id, int) or not (
        0 <= task_id < len(cluster[task_type])
    ):
        raise ValueError(
            f"TF_CONFIG task['index'] must be an int in [0, {len(cluster[task_type])}) for "
            f"job '{task_type}'. Received: task={task!r}"
        )
    rank = task_id + (len(chief) if task_type == "worker" else 0)
    return ClusterInfo(
        workers=tuple(workers),
        task_type=task_type,
        task_id=task_id,
        rank=rank,
        source="TF_CONFIG",
        chief=bool(chief),
    )


def _env_int(environ, name):
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"Environment variable {name} must be an int. Received: {name}={value!r}") from None


def _base_port(environ):
    port = _env_int(environ, "TFSCALE_BASE_PORT") if "TFSCALE_BASE_PORT" in environ else DEFAULT_BASE_PORT
    if not 0 < port < 65536:
        raise ValueError(f"TFSCALE_BASE_PORT must be in 1..65535. Received: TFSCALE_BASE_PORT={port}")
    return port


def _block_addresses(hosts, tasks_per_node, base_port):
    """Ranks fill nodes in order: node i runs tasks_per_node[i] ranks on consecutive ports."""
    addresses = []
    for host, count in zip(hosts, tasks_per_node):
        addresses.extend(f"{host}:{base_port + local}" for local in range(count))
    return tuple(addresses)


def _cluster_from_ompi(environ):
    size = _env_int(environ, "OMPI_COMM_WORLD_SIZE")
    rank = _env_int(environ, "OMPI_COMM_WORLD_RANK")
    if size < 1 or not 0 <= rank < size:
        raise ValueError(
            "OMPI_COMM_WORLD_RANK must be in [0, OMPI_COMM_WORLD_SIZE). Received: "
            f"OMPI_COMM_WORLD_RANK={rank}, OMPI_COMM_WORLD_SIZE={size}"
        )
    local_size = (
        _env_int(environ, "OMPI_COMM_WORLD_LOCAL_SIZE")
        if "OMPI_COMM_WORLD_LOCAL_SIZE" in environ
        else size
    )
    base_port = _base_port(environ)
    hosts_text = environ.get("TFSCALE_WORKER_HOSTS", "").strip()
    if hosts_text:
        hosts = [h.strip() for h in hosts_text.split(",") if h.strip()]
    elif local_size == size:
        hosts = ["127.0.0.1"]
    else:
        raise ValueError(
            f"Open MPI runs {size} ranks on several nodes ({local_size} on this one) but MPI "
            "does not export the other nodes' names: set TFSCALE_WORKER_HOSTS to the node "
            "host names in rank order, e.g. TFSCALE_WORKER_HOSTS=node1,node2 (ranks are "
            "assumed block-distributed, as `mpirun --map-by slot` does), or use TF_CONFIG."
        )
    if size % len(hosts):
        raise ValueError(
            f"OMPI_COMM_WORLD_SIZE={size} must be a multiple of the number of hosts in "
            f"TFSCALE_WORKER_HOSTS={hosts_text!r} ({len(hosts)})."
        )
    workers = _block_addresses(hosts, [size // len(hosts)] * len(hosts), base_port)
    return ClusterInfo(workers=workers, task_type="worker", task_id=rank, rank=rank, source="OMPI")


def expand_slurm_nodelist(nodelist):
    """Expands a SLURM host list such as ``"gpu[01-03,07],cpu5"`` into host names.

    Args:
      nodelist: str, the value of ``SLURM_JOB_NODELIST`` or ``SLURM_STEP_NODELIST``.
        Zero-padding of ranges is kept (``n[08-10]`` gives ``n08, n09, n10``).

    Returns:
      A list of host-name strings in order.

    Raises:
      ValueError: if `nodelist` is empty, has unbalanced brackets or a bad range.
    """
    if not isinstance(nodelist, str) or not nodelist.strip():
        raise ValueError(f"SLURM node list must be a non-empty string. Received: {nodelist!r}")
    # Split on commas that are not inside brackets.
    parts, depth, current = [], 0, ""
    for ch in nodelist.strip():
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"SLURM node list has an unbalanced ']'. Received: {nodelist!r}")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if depth:
        raise ValueError(f"SLURM node list has an unbalanced '['. Received: {nodelist!r}")
    parts.append(current)
    hosts = []
    for part in parts:
        hosts.extend(_expand_host_pattern(part, nodelist))
    return hosts


def _expand_host_pattern(pattern, nodelist):
    match = re.match(r"^([^\[\]]*)\[([^\[\]]+)\](.*)$", pattern)
    if not match:
        if not pattern or "[" in pattern or "]" in pattern:
            raise ValueError(f"Cannot parse SLURM node list. Received: {nodelist!r}")
        return [pattern]
    prefix, ranges, rest = match.groups()
    expanded = []
    for item in ranges.split(","):
        bounds = item.split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            names = [bounds[0]]
        elif len(bounds) == 2 and bounds[0].isdigit() and bounds[1].isdigit():
            lo, hi = int(bounds[0]), int(bounds[1])
            if hi < lo:
                raise ValueError(f"SLURM node range {item!r} is decreasing. Received: {nodelist!r}")
            width = len(bounds[0])
            names = [str(i).zfill(width) for i in range(lo, hi + 1)]
        else:
            raise ValueError(f"Bad SLURM node range {item!r}. Received: {nodelist!r}")
        for name in names:
            expanded.extend(_expand_host_pattern(prefix + name + rest, nodelist))
    return expanded


def expand_slurm_tasks_per_node(text):
    """Expands ``SLURM_STEP_TASKS_PER_NODE`` such as ``"2(x3),1"`` into ``[2, 2, 2, 1]``.

    Args:
      text: str, the value of ``SLURM_STEP_TASKS_PER_NODE`` or ``SLURM_TASKS_PER_NODE``.

    Returns:
      A list of ints, the number of tasks on each node in node-list order.

    Raises:
      ValueError: if an item is not ``N`` or ``N(xK)`` with positive ints.
    """
    counts = []
    for item in str(text).split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not match or int(match.group(1)) < 1 or (match.group(2) and int(match.group(2)) < 1):
            raise ValueError(
                f"Cannot parse SLURM tasks per node item {item!r}; expected 'N' or 'N(xK)'. "
                f"Received: {text!r}"
            )
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def _cluster_from_slurm(environ):
    ntasks = _env_int(environ, "SLURM_NTASKS")
    procid = _env_int(environ, "SLURM_PROCID")
    if ntasks < 1 or not 0 <= procid < ntasks:
        raise ValueError(
            "SLURM_PROCID must be in [0, SLURM_NTASKS). Received: "
            f"SLURM_PROCID={procid}, SLURM_NTASKS={ntasks}"
        )
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise ValueError("SLURM_NTASKS is set but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is.")
    hosts = expand_slurm_nodelist(nodelist)
    per_node_text = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if per_node_text:
        per_node = expand_slurm_tasks_per_node(per_node_text)
    elif ntasks % len(hosts) == 0:
        per_node = [ntasks // len(hosts)] * len(hosts)
    else:
        raise ValueError(
            f"SLURM_NTASKS={ntasks} does not divide over {len(hosts)} nodes and "
            "SLURM_STEP_TASKS_PER_NODE is not set."
        )
    if len(per_node) != len(hosts) or sum(per_node) != ntasks:
        raise ValueError(
            f"SLURM tasks per node {per_node} do not match {len(hosts)} nodes {hosts} and "
            f"SLURM_NTASKS={ntasks}."
        )
    workers = _block_addresses(hosts, per_node, _base_port(environ))
    return ClusterInfo(workers=workers, task_type="worker", task_id=procid, rank=procid, source="SLURM")


def cluster_from_environment(environ=None):
    """Reads the cluster from ``TF_CONFIG``, Open MPI or SLURM variables, in that order.

    Args:
      environ: mapping of environment variables; defaults to `os.environ`.

    Returns:
      A `ClusterInfo`, or None when none of the three is set.

    Raises:
      ValueError: if the variables that are set are malformed (see `parse_tf_config`).
    """
    environ = os.environ if environ is None else environ
    if environ.get("TF_CONFIG", "").strip():
        return parse_tf_config(environ["TF_CONFIG"])
    if "OMPI_COMM_WORLD_SIZE" in environ and "OMPI_COMM_WORLD_RANK" in environ:
        return _cluster_from_ompi(environ)
    if "SLURM_NTASKS" in environ and "SLURM_PROCID" in environ:
        return _cluster_from_slurm(environ)
    return None


def in_multi_worker_environment(environ=None):
    """Whether this process is one of > 1 workers (``TF_CONFIG``, Open MPI or SLURM).

    Args:
      environ: mapping of environment variables; defaults to `os.environ`.

    Returns:
      bool: True when a cluster is described and it has more than one worker.

    Raises:
      ValueError: if the variables that are set are malformed.
    """
    info = cluster_from_environment(environ)
    return info is not None and info.num_workers > 1


def make_cluster_resolver(info, num_gpus=None):
    """Builds the `tf.distribute.cluster_resolver.ClusterResolver` for `info`.

    Args:
      info: a `ClusterInfo`.
      num_gpus: int or None, GPUs per worker to announce; None counts the visible ones.

    Returns:
      A `tf.distribute.cluster_resolver.SimpleClusterResolver` with ``rpc_layer="grpc"``
      whose `task_type`/`task_id` are this process's.

    Raises:
      TypeError: if `info` is not a `ClusterInfo`.
    """
    if not isinstance(info, ClusterInfo):
        raise TypeError(f"Argument `info` must be a ClusterInfo. Received: info={info!r}")
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    if num_gpus is None:
        num_gpus = len(tf.config.list_physical_devices("GPU"))
    accelerators = {"GPU": num_gpus} if num_gpus else {}
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(info.cluster_dict()),
        task_type=info.task_type,
        task_id=info.task_id,
        num_accelerators=accelerators,
        rpc_layer="grpc",
    )


def worker_nodes(workers):
    """Groups workers into nodes by host: workers whose addresses share a host share a node.

    Args:
      workers: sequence of ``"host:port"`` strings in rank order (`ClusterInfo.workers`).

    Returns:
      ``workers_per_node`` (int) if every host runs the same number of workers and each
      host's workers are contiguous in rank order (what the hierarchical and torus
      schedules assume), else None. A single host gives ``len(workers)``.
    """
    hosts = [w.rsplit(":", 1)[0] for w in workers]
    runs = []
    for h in hosts:
        if runs and runs[-1][0] == h:
            runs[-1][1] += 1
        else:
            runs.append([h, 1])
    if len({h for h, _ in runs}) != len(runs) or len({c for _, c in runs}) != 1:
        return None
    return runs[0][1]


def parse_bandwidth(text):
    """Parses a node's network bandwidth: bytes/s as a plain number, or a ``tc`` rate (``"400mbit"``).

    Returns:
      float, bytes per second.

    Raises:
      ValueError: for anything else, or a value <= 0 (naming it).
    """
    from tfscale import emulated  # noqa: PLC0415 (no TensorFlow)

    try:
        value = float(text)
    except (TypeError, ValueError):
        return emulated.parse_rate(text, "bandwidth")[1]
    if not value > 0:
        raise ValueError(f"Argument `bandwidth` must be > 0 bytes/s. Received: bandwidth={text!r}")
    return value
