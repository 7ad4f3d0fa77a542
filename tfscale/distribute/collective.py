"""Torus, hierarchical and ring all-reduce across worker processes on TF's collective runtime.

`create_multi_worker_strategy` returns a `tf.distribute.MultiWorkerMirroredStrategy`
(MWMS, gRPC between workers, NCCL inside a GPU worker) whose all-reduce of dense
floating-point values (the gradients in Keras ``fit``, ``strategy.reduce``,
``ReplicaContext.all_reduce``) is `MultiWorkerAllReduce`: one of three algorithms built
from TF collective ops on sub-groups of the ``N = num_workers * devices_per_worker``
replicas (global replica id ``task * devices_per_worker + local index``, the order TF's
collective runtime ranks devices in):

* ``"torus"`` -- the 2D-torus all-reduce of Mikami et al., "Massively Distributed SGD:
  ImageNet/ResNet-50 Training in a Flash", arXiv:1811.05233, and Ying et al., "Image
  Classification at Supercomputer Scale", arXiv:1811.06992, on a ``rows x cols`` grid
  (row-major, `tfscale.distribute.topology.Grid`; e.g. 4 workers x 2 devices as 2x4):

  1. reduce-scatter along each row: the pack is cut into ``cols`` equal chunks (zero
     padded), ``all_to_all`` sends chunk j to the row's j-th member, which sums what it
     receives (TF has no reduce-scatter kernel on CPU);
  2. all-reduce that 1/cols shard along each column (one group key per column);
  3. all-gather the shards along each row.

  ``2(cols - 1) + 2(rows - 1)`` sequential steps instead of the ring's ``2(N - 1)``.

* ``"hierarchical"`` -- Jia et al., "Highly Scalable Deep Learning Training System with
  Mixed-Precision", arXiv:1807.11205 (as in Horovod and ChainerMN): reduce-scatter
  inside each node of `devices_per_node` contiguous replicas (one node per worker by
  default) -> all-reduce across nodes, each local rank on its own shard -> all-gather
  inside the node.

* ``"ring"`` -- one all-reduce over all N replicas (TF's ring), with tfscale's packing,
  compression and timeout.

Every algorithm first fuses the values into packs of about `bytes_per_pack` bytes
(`tfscale.distribute.packing.pack`), optionally casts them to float16 / bfloat16 for the
wire (`compression`; local sums in float32). A dead or hung worker makes the others fail
with ``DeadlineExceeded`` instead of hanging: by default through one
`tfscale.distribute.watchdog.CollectiveWatchdog` per process (``strategy.tfscale_watchdog``,
a Keras callback), optionally through a timeout on every collective
(``per_collective_timeout=True``, which costs one sleeping thread per collective).

Rank order: TF's collective runtime ranks a group's members by (job, task, device index),
so the j-th member of every row is in column j. This holds on CPUs and for one device per
worker; on a worker with several GPUs TF may order its GPUs by interconnect, and the
torus rows/columns then follow that order (sums stay correct only if every worker has
the same GPU topology, which MWMS assumes anyway).

All non-public TF API used here is in `tfscale.distribute._tf_compat`.
"""

import contextlib
import os

import tensorflow as tf

from tfscale.distribute import _tf_compat
from tfscale.distribute import cluster as cluster_lib
from tfscale.distribute import packing
from tfscale.distribute import topology
from tfscale.distribute import watchdog as watchdog_lib

__all__ = [
    "ALGORITHMS",
    "DEFAULT_BYTES_PER_PACK",
    "DEFAULT_SMALL_PACK_BYTES",
    "DEFAULT_TIMEOUT_SECONDS",
    "MultiWorkerAllReduce",
    "WorkerFailureError",
    "create_multi_worker_strategy",
    "explain_worker_failures",
    "in_multi_worker_environment",
    "use_all_reduce",
    "worker_backup_dir",
]

ALGORITHMS = ("hierarchical", "ring", "torus")
"""Names accepted by `create_multi_worker_strategy(algorithm=...)`."""

DEFAULT_BYTES_PER_PACK = 32 * 1024 * 1024
"""Fusion threshold in bytes (32 MiB): ResNet-50's 98 MiB of fp32 gradients make 4 packs."""

DEFAULT_SMALL_PACK_BYTES = 1024 * 1024
"""Packs below 1 MiB take the two-all-reduce latency path (torus / hierarchical)."""

DEFAULT_TIMEOUT_SECONDS = 300.0
"""Seconds a collective may wait for its peers before failing (covers first-step tracing)."""

_KEY_STRIDE = 1_000_000  # group keys per strategy; far above MWMS's own (1, 2, ...)
_KIND_OFFSETS = {"inner": 0, "outer": 200_000, "world": 400_000}
_STRATEGIES_CREATED = [0]


def in_multi_worker_environment(environ=None):
    """Whether ``TF_CONFIG``, Open MPI or SLURM variables describe more than one worker.

    Args:
      environ: mapping of environment variables; default `os.environ`.

    Returns:
      bool.

    Raises:
      ValueError: if the variables are malformed (e.g. a ``TF_CONFIG`` that is not JSON).
    """
    return cluster_lib.in_multi_worker_environment(environ)


def _check_algorithm(algorithm):
    if algorithm not in ALGORITHMS:
        raise ValueError(
            f"Unknown all_reduce algorithm {algorithm!r}; expected one of {list(ALGORITHMS)}"
        )
    return algorithm


def _check_timeout(timeout_seconds):
    if timeout_seconds is not None and (
        isinstance(timeout_seconds, bool) or not isinstance(timeout_seconds, (int, float))
        or timeout_seconds <= 0
    ):
        raise ValueError(
            "Argument `timeout_seconds` must be a number > 0 or None. "
            f"Received: timeout_seconds={timeout_seconds!r}"
        )
    return None if timeout_seconds is None else float(timeout_seconds)


def _check_bytes_per_pack(bytes_per_pack):
    if isinstance(bytes_per_pack, bool) or not isinstance(bytes_per_pack, int) or bytes_per_pack < 0:
        raise ValueError(
            "Argument `bytes_per_pack` must be an int >= 0 (0: one pack per dtype). "
            f"Received: bytes_per_pack={bytes_per_pack!r}"
        )
    return bytes_per_pack


class MultiWorkerAllReduce:
    """Sums dense float tensors over all replicas of all workers (torus / hierarchical / ring).

    One instance per worker process; it is called once per local replica with that
    replica's tensors (`__call__`) and returns their sums over all ``num_replicas``
    replicas. `create_multi_worker_strategy` installs it into MWMS; calling it directly
    needs a process whose collective runtime is up (an MWMS has been created).

    Args:
      algorithm: ``"torus"``, ``"hierarchical"`` or ``"ring"``.
      local_devices: sequence of str, this worker's replica devices in local order
        (``strategy.extended.worker_devices``), e.g.
        ``["/job:worker/replica:0/task:1/device:CPU:0"]``.
      worker_rank: int in ``[0, num_workers)``, this worker's position among the workers
        (the chief, if any, is 0).
      num_workers: int >= 1, the number of worker processes.
      grid_shape: torus only: None (most square, `topology.factor_grid`), ``"RxC"`` or
        ``(rows, cols)`` with ``rows * cols == num_replicas``.
      devices_per_node: hierarchical only: int dividing `num_replicas`, replicas per
        node (contiguous replica ids); default ``len(local_devices)`` (a node per
        worker). Must be > 1 somewhere for the inner step to do anything.
      bytes_per_pack: int >= 0, fusion threshold in bytes; default 32 MiB; 0 packs all
        tensors of a dtype into one buffer.
      compression: None, ``"fp16"`` or ``"bf16"``: dtype of float32/float64 values on the
        wire; sums inside a worker are in float32. Each cast rounds with relative error
        <= 2**-11 (fp16) or 2**-8 (bf16): the torus and hierarchical algorithms round a
        value 3 times (input, partial sum, result), the ring once per hop. TF's
        collective reduce kernels have no bfloat16, so with ``"bf16"`` only the
        all_to_all / all_gather steps carry bf16 (bit-cast to int32) and the reduction
        steps (torus columns, hierarchical across nodes, the whole ring) use float32.
      timeout_seconds: float > 0 or None, per-collective timeout in seconds; default 300.
        Each collective with a timeout holds an OS thread for the whole timeout (see
        `tfscale.distribute.watchdog`); None relies on a `CollectiveWatchdog` instead.
      communication_hint: ``"auto"``, ``"ring"`` or ``"nccl"`` for the collectives;
        default ``"auto"`` (NCCL on GPUs when available).
      key_base: int, first group key of this instance; must be the same on every worker
        and not overlap another instance's ``[key_base, key_base + 1e6)``.
      small_pack_bytes: int >= 0, torus / hierarchical only: a pack smaller than this
        many bytes is summed with two all-reduces (inside the row / node, then along the
        column / across nodes: two collectives instead of three, more bytes, the same
        ring steps), which is cheaper when per-collective latency dominates; default
        1 MiB (`DEFAULT_SMALL_PACK_BYTES`); 0 turns it off.

    Attributes:
      num_replicas: int, ``num_workers * len(local_devices)``.
      groups: dict mapping ``"inner"`` / ``"outer"`` / ``"world"`` to lists of
        replica-id lists (the rows and columns for the torus, the nodes and the
        cross-node groups for hierarchical, everything for ring).

    Raises:
      ValueError: for an unknown `algorithm`, a `grid_shape` whose product is not the
        replica count, a `devices_per_node` that does not divide it, or out-of-range
        numbers; the message names the argument and the value.
    """

    def __init__(self, algorithm, local_devices, worker_rank, num_workers, grid_shape=None,
                 devices_per_node=None, bytes_per_pack=DEFAULT_BYTES_PER_PACK, compression=None,
                 timeout_seconds=DEFAULT_TIMEOUT_SECONDS, communication_hint="auto", key_base=_KEY_STRIDE,
                 small_pack_bytes=DEFAULT_SMALL_PACK_BYTES):
        self.algorithm = _check_algorithm(algorithm)
        self.local_devices = tuple(local_devices)
        if not self.local_devices:
            raise ValueError("Argument `local_devices` must name at least one device. Received: []")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"Argument `num_workers` must be an int >= 1. Received: num_workers={num_workers!r}")
        if isinstance(worker_rank, bool) or not isinstance(worker_rank, int) or not 0 <= worker_rank < num_workers:
            raise ValueError(
                f"Argument `worker_rank` must be an int in [0, {num_workers}). Received: worker_rank={worker_rank!r}"
            )
        self.worker_rank = worker_rank
        self.num_workers = num_workers
        self.devices_per_worker = len(self.local_devices)
        self.num_replicas = num_workers * self.devices_per_worker
        self.bytes_per_pack = _check_bytes_per_pack(bytes_per_pack)
        self.compression = packing.validate_compression(compression)
        self.timeout_seconds = _check_timeout(timeout_seconds)
        self.communication_hint = communication_hint
        self.key_base = int(key_base)
        if isinstance(small_pack_bytes, bool) or not isinstance(small_pack_bytes, int) or small_pack_bytes < 0:
            raise ValueError(
                f"Argument `small_pack_bytes` must be an int >= 0. Received: small_pack_bytes={small_pack_bytes!r}"
            )
        self.small_pack_bytes = small_pack_bytes
        self.grid = None
        if algorithm == "torus":
            self.grid = topology.Grid.from_shape(grid_shape, self.num_replicas)
            inner, outer = self.grid.row_groups(), self.grid.column_groups()
        elif algorithm == "hierarchical":
            per_node = self.devices_per_worker if devices_per_node is None else devices_per_node
            inner = topology.node_groups(self.num_replicas, per_node)
            outer = [[node[k] for node in inner] for k in range(len(inner[0]))]
        else:
            inner = outer = None
        if algorithm != "torus" and grid_shape is not None:
            raise ValueError(
                f"Argument `grid_shape` only applies to algorithm='torus'. "
                f"Received: grid_shape={grid_shape!r} with algorithm={algorithm!r}"
            )
        if algorithm != "hierarchical" and devices_per_node is not None:
            raise ValueError(
                f"Argument `devices_per_node` only applies to algorithm='hierarchical'. "
                f"Received: devices_per_node={devices_per_node!r} with algorithm={algorithm!r}"
            )
        self.groups = (
            {"world": [list(range(self.num_replicas))]} if inner is None
            else {"inner": inner, "outer": outer}
        )
        self._launchers = {}  # (kind, local replica) -> SubgroupLauncher
        self._instance_keys = _tf_compat.InstanceKeys()
        self._tokens = [None] * self.devices_per_worker

    def replica_id(self, local_replica):
        """int: the global replica id of local replica `local_replica`."""
        return self.worker_rank * self.devices_per_worker + local_replica

    def _launcher(self, kind, local_replica):
        key = (kind, local_replica)
        if key not in self._launchers:
            replica = self.replica_id(local_replica)
            groups = self.groups[kind]
            index = next(i for i, g in enumerate(groups) if replica in g)
            if self._tokens[local_replica] is None:
                self._tokens[local_replica] = _tf_compat.new_ordering_token(self.local_devices[local_replica])
            self._launchers[key] = _tf_compat.SubgroupLauncher(
                group_key=self.key_base + _KIND_OFFSETS[kind] + index,
                group_size=len(groups[index]),
                device=self.local_devices[local_replica],
                instance_keys=self._instance_keys,
                ordering_token=self._tokens[local_replica],
                timeout_seconds=self.timeout_seconds,
                communication_hint=self.communication_hint,
            )
        return self._launchers[key]

    def __call__(self, values, local_replica):
        """All-reduces (sums) this replica's `values` with every other replica's.

        Must be called for every local replica with tensors of the same shapes and dtypes
        on every replica of every worker, in the same order (as MWMS does).

        Args:
          values: list of dense floating-point `tf.Tensor`s (any shapes, static), on
            device ``local_devices[local_replica]``.
          local_replica: int in ``[0, len(local_devices))``.

        Returns:
          A list of tensors with the shapes and dtypes of `values`: the element-wise sums
          over all `num_replicas` replicas, on the same device.

        Raises:
          ValueError: if `local_replica` is out of range or a value is not floating point.
        """
        if not 0 <= local_replica < self.devices_per_worker:
            raise ValueError(
                f"Argument `local_replica` must be in [0, {self.devices_per_worker}). "
                f"Received: local_replica={local_replica}"
            )
        values = list(values)
        if not values:
            return []
        for i, v in enumerate(values):
            if not v.dtype.is_floating:
                raise ValueError(
                    f"MultiWorkerAllReduce sums floating-point tensors only. Received: values[{i}] of dtype {v.dtype.name}"
                )
        device = self.local_devices[local_replica]
        with tf.device(device):
            packs, spec = packing.pack(values, self.bytes_per_pack)
            reduced = [self._reduce_pack(p, local_replica) for p in packs]
            return packing.unpack(reduced, spec)

    def _reduce_pack(self, x, local_replica):
        """Sums one 1-D pack `x` over all replicas; returns it in `x`'s dtype."""
        dtype = x.dtype
        acc = packing.accumulation_dtype(dtype)
        comp = self.compression
        # TF's collective reduce kernels have no bfloat16: bf16 travels bit-cast to int32
        # through the data-movement steps (all_to_all, all_gather) and the reduction
        # steps run in float32.
        reduce_comp = None if packing.wire_dtype(dtype, comp) == tf.bfloat16 else comp
        if self.algorithm == "ring":
            world = self._launcher("world", local_replica)
            if world.group_size == 1:
                return x
            wire = packing.compress(x, reduce_comp)
            if wire.dtype == tf.bfloat16:
                wire = tf.cast(wire, tf.float32)
            return packing.decompress(world.all_reduce(wire), dtype)
        inner = self._launcher("inner", local_replica)
        outer = self._launcher("outer", local_replica)
        n = int(x.shape[0])
        cols = inner.group_size
        if n * dtype.size < self.small_pack_bytes:
            # Latency path for small packs: two all-reduces (row / node, then column /
            # across nodes) instead of three collectives; same number of ring steps.
            wire = packing.compress(x, reduce_comp)
            if wire.dtype == tf.bfloat16:
                wire = tf.cast(wire, tf.float32)
            for group in (inner, outer):
                if group.group_size > 1:
                    wire = group.all_reduce(wire)
            return packing.decompress(wire, dtype)
        if cols > 1:
            # 1. Reduce-scatter inside the row / node: all_to_all of cols equal chunks, then
            #    a local sum; this replica keeps the chunk of its rank (= its column).
            wire = packing.compress(x, comp)
            chunk = -(-n // cols)
            if wire.dtype == tf.bfloat16:
                chunk += chunk % 2  # Even, to bit-cast pairs of bf16 into int32.
            if chunk * cols != n:
                wire = tf.pad(wire, [[0, chunk * cols - n]])
            received = _move(inner.all_to_all, tf.reshape(wire, [cols, chunk]), [cols, chunk])
            shard = tf.reduce_sum(packing.decompress(received, acc), axis=0)
        else:
            shard = packing.decompress(x, acc)
        if outer.group_size > 1:
            # 2. All-reduce the shard along the column / across nodes.
            wire = packing.compress(shard, reduce_comp)
            shard = packing.decompress(outer.all_reduce(wire), acc)
        if cols > 1:
            # 3. All-gather the shards along the row / inside the node, in rank order.
            full = _move(inner.all_gather, packing.compress(shard, comp), [cols * chunk])
            shard = full[:n] if chunk * cols != n else full
        return packing.decompress(shard, dtype)


def _move(collective, t, out_shape):
    """Runs a data-movement collective on `t` (result of static `out_shape`).

    bfloat16 values are bit-cast in pairs to int32 first (the last dimension is even).
    """
    if t.dtype != tf.bfloat16:
        return tf.reshape(collective(t), out_shape)
    shape = t.shape.as_list()
    bits = tf.bitcast(tf.reshape(t, shape[:-1] + [shape[-1] // 2, 2]), tf.int32)
    return tf.reshape(tf.bitcast(collective(bits), tf.bfloat16), out_shape)


def _devices_per_worker_from_env(devices_per_worker):
    if devices_per_worker is not None:
        value = devices_per_worker
    elif os.environ.get("TFSCALE_DEVICES_PER_WORKER", "").strip():
        value = os.environ["TFSCALE_DEVICES_PER_WORKER"].strip()
        try:
            value = int(value)
        except ValueError:
            raise ValueError(
                f"TFSCALE_DEVICES_PER_WORKER must be an int >= 1. Received: {value!r}"
            ) from None
    else:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"Argument `devices_per_worker` must be an int >= 1. Received: devices_per_worker={value!r}"
        )
    return value


def _ensure_cpu_devices(count):
    """Splits the CPU into `count` logical devices (before TF initialises) for CPU workers."""
    cpus = tf.config.list_physical_devices("CPU")
    existing = tf.config.get_logical_device_configuration(cpus[0])
    if existing is not None and len(existing) >= count:
        return
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have < count:
            raise ValueError(
                f"devices_per_worker={count} needs {count} logical CPU devices, but TensorFlow "
                f"is already initialised with {have}. Create the strategy before running any "
                "TensorFlow op, or split the CPU with tf.config.set_logical_device_configuration."
            ) from None


def _worker_rank(resolver):
    spec = resolver.cluster_spec().as_dict()
    if resolver.task_type == "chief":
        return 0
    return int(resolver.task_id) + (1 if "chief" in spec else 0)


def create_multi_worker_strategy(algorithm="torus", grid_shape=None, devices_per_node=None,
                                 bytes_per_pack=DEFAULT_BYTES_PER_PACK, compression=None,
                                 timeout_seconds=DEFAULT_TIMEOUT_SECONDS, cluster_resolver=None,
                                 devices_per_worker=None, small_pack_bytes=DEFAULT_SMALL_PACK_BYTES,
                                 per_collective_timeout=False):
    """Creates an MWMS whose all-reduce is tfscale's torus, hierarchical or ring.

    The cluster comes from `cluster_resolver` or else from the environment
    (`tfscale.distribute.cluster.cluster_from_environment`: ``TF_CONFIG``, Open MPI or
    SLURM). Also applies the Keras 3 multi-worker ``fit`` fixes
    (`_tf_compat.apply_keras_multi_worker_fixes`), so plain ``model.fit`` works. Must be
    called at program start, before any other TF op (MWMS starts a gRPC server).

    Args:
      algorithm: ``"torus"`` (default), ``"hierarchical"`` or ``"ring"``.
      grid_shape: torus grid over all replicas: None (most square), ``"RxC"`` or
        ``(rows, cols)``; ``rows * cols`` must equal ``num_workers * devices_per_worker``.
      devices_per_node: hierarchical only: replicas per node; default one node per worker.
      bytes_per_pack: int >= 0, fusion threshold in bytes; default 32 MiB.
      compression: None, ``"fp16"`` or ``"bf16"`` (wire dtype of float32 gradients).
      timeout_seconds: float > 0, seconds a step may wait for its peers before its
        collectives fail with ``DeadlineExceeded``; default 300. Enforced by
        ``strategy.tfscale_watchdog`` (pass it to ``fit`` / ``evaluate`` as a callback) and,
        with `per_collective_timeout`, by every collective (tfscale's and MWMS's own).
      cluster_resolver: a `tf.distribute.cluster_resolver.ClusterResolver` or None.
      devices_per_worker: int >= 1 or None: replicas per worker. None reads
        ``TFSCALE_DEVICES_PER_WORKER`` (set by ``python -m tfscale.launch``) and
        otherwise uses MWMS's choice (all visible GPUs, or one CPU). On a CPU-only worker
        a value > 1 splits the CPU into that many logical devices.
      small_pack_bytes: int >= 0, torus / hierarchical packs smaller than this many bytes
        use two all-reduces instead of reduce-scatter / all-reduce / all-gather (see
        `MultiWorkerAllReduce`); default 1 MiB; 0 turns it off.
      per_collective_timeout: bool, default False. True puts `timeout_seconds` on every
        collective as well: tfscale's and MWMS's own (``CommunicationOptions``; MWMS's
        input pipeline makes an integer all-reduce per step). TF starts one thread per
        such collective that sleeps for the whole timeout, so at several collectives per
        step a long run exhausts the process's threads (the 4-worker default job did in
        its 2nd epoch; 240 steps of a small fit left 9,200 threads per worker); use it
        only for short custom loops that cannot take the watchdog callback. With False,
        a peer that dies outside ``fit`` / ``evaluate`` (e.g. while variables are
        created) is still reported by TF's coordination service (missed heartbeats),
        but a peer that hangs there is not.

    Returns:
      A `tf.distribute.MultiWorkerMirroredStrategy` with ``num_replicas_in_sync ==
      num_workers * devices_per_worker``. ``strategy.tfscale_all_reduce`` is the installed
      `MultiWorkerAllReduce`; ``strategy.tfscale_watchdog`` is this process's
      `CollectiveWatchdog` with `timeout_seconds`.

    Raises:
      ValueError: for a malformed ``TF_CONFIG`` (or MPI/SLURM variables), no multi-worker
        cluster, an unknown `algorithm`, a `grid_shape` that does not match the total
        replica count, a bad `compression`, `timeout_seconds` or `bytes_per_pack`.
      RuntimeError: on a TF/Keras version that `_tf_compat` was not tested with.

    Example:
      >>> # In each worker, e.g. under `python -m tfscale.launch --num_workers 4 -- ...`:
      >>> strategy = create_multi_worker_strategy("torus", grid_shape="2x2")
      >>> with strategy.scope():
      ...     model = build_model(); model.compile(...)
      >>> with explain_worker_failures(strategy):
      ...     model.fit(dataset, epochs=..., callbacks=[strategy.tfscale_watchdog])
    """
    _tf_compat.check_versions()
    _check_algorithm(algorithm)
    compression = packing.validate_compression(compression)
    timeout_seconds = _check_timeout(timeout_seconds)
    _check_bytes_per_pack(bytes_per_pack)
    devices_per_worker = _devices_per_worker_from_env(devices_per_worker)
    info = None
    if cluster_resolver is None:
        info = cluster_lib.cluster_from_environment()
        if info is None or info.num_workers < 2:
            raise ValueError(
                "create_multi_worker_strategy needs a cluster of >= 2 workers from TF_CONFIG, "
                "Open MPI (OMPI_COMM_WORLD_*) or SLURM (SLURM_*); none was found. Start the "
                "workers with `python -m tfscale.launch --num_workers N -- ...`, or use "
                "tfscale.distribute.create_strategy for one process."
            )
        if info.source != "TF_CONFIG":
            cluster_resolver = cluster_lib.make_cluster_resolver(info)
    num_gpus = len(tf.config.list_physical_devices("GPU"))
    # Validate the grid before starting the gRPC server, so a mistake costs nothing.
    if info is not None:
        per_worker = devices_per_worker or (num_gpus if num_gpus else 1)
        total = info.num_workers * per_worker
        if algorithm == "torus":
            topology.parse_grid_shape(grid_shape, total)
        elif algorithm == "hierarchical" and devices_per_node is not None:
            topology.node_groups(total, devices_per_node)
    use_cpu_devices = devices_per_worker is not None and devices_per_worker > 1 and not num_gpus
    if use_cpu_devices:
        _ensure_cpu_devices(devices_per_worker)
    _tf_compat.apply_keras_multi_worker_fixes()
    # The timeout each collective carries itself (tfscale's and MWMS's own); None leaves it to the watchdog.
    collective_timeout = timeout_seconds if per_collective_timeout else None
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=collective_timeout)
    if use_cpu_devices:
        with _tf_compat.multi_worker_local_devices(devices_per_worker):
            strategy = tf.distribute.MultiWorkerMirroredStrategy(
                cluster_resolver=cluster_resolver, communication_options=options
            )
    else:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=cluster_resolver, communication_options=options
        )
    local_devices = tuple(strategy.extended.worker_devices)
    if devices_per_worker is not None and len(local_devices) != devices_per_worker:
        raise ValueError(
            f"devices_per_worker={devices_per_worker} but this worker has {len(local_devices)} "
            f"replica devices {list(local_devices)}; expose exactly {devices_per_worker} GPUs "
            "(CUDA_VISIBLE_DEVICES) per worker."
        )
    resolver = strategy.cluster_resolver
    workers = _tf_compat.num_workers(strategy)
    _STRATEGIES_CREATED[0] += 1
    reducer = MultiWorkerAllReduce(
        algorithm, local_devices, worker_rank=_worker_rank(resolver), num_workers=workers,
        grid_shape=grid_shape, devices_per_node=devices_per_node, bytes_per_pack=bytes_per_pack,
        compression=compression, timeout_seconds=collective_timeout,
        key_base=_KEY_STRIDE * _STRATEGIES_CREATED[0], small_pack_bytes=small_pack_bytes,
    )
    _tf_compat.install_all_reduce(strategy, reducer)
    strategy.tfscale_all_reduce = reducer
    strategy.tfscale_watchdog = watchdog_lib.CollectiveWatchdog(timeout_seconds)
    return strategy


def use_all_reduce(strategy, all_reduce):
    """Switches the all-reduce of an MWMS built by `create_multi_worker_strategy`.

    Takes effect for functions traced afterwards (a ``tf.function`` traced before keeps
    the all-reduce it was traced with). Used by the benchmark to time several algorithms
    and MWMS's own ``CollectiveAllReduce`` in one process.

    Args:
      strategy: a `tf.distribute.MultiWorkerMirroredStrategy` from
        `create_multi_worker_strategy`.
      all_reduce: a `MultiWorkerAllReduce` built for this strategy's devices (with its
        own `key_base`, the same on every worker), or None for MWMS's own all-reduce.

    Raises:
      TypeError: if `strategy` is not an MWMS or `all_reduce` is neither None nor a
        `MultiWorkerAllReduce`.
    """
    if all_reduce is not None and not isinstance(all_reduce, MultiWorkerAllReduce):
        raise TypeError(
            "Argument `all_reduce` must be a MultiWorkerAllReduce or None. "
            f"Received: all_reduce={all_reduce!r}"
        )
    _tf_compat.install_all_reduce(strategy, all_reduce)
    strategy.tfscale_all_reduce = all_reduce


class WorkerFailureError(RuntimeError):
    """A peer worker died or stopped responding during multi-worker training.

    Attributes:
      timeout_seconds: float or None, the collective timeout that was in force.
    """

    def __init__(self, message, timeout_seconds=None):
        super().__init__(message)
        self.timeout_seconds = timeout_seconds


_PEER_FAILURE_ERRORS = (
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.AbortedError,
    tf.errors.CancelledError,
)


_CAUSE_KEYWORDS = ("unhealthy", "timeout", "timed out", "deadline", "aborted", "unavailable", "failed to")


def _summarize_error(err):
    """The most telling line of a TF error message (it often starts 'Graph execution error:')."""
    lines = [l.strip() for l in (getattr(err, "message", None) or str(err)).splitlines() if l.strip()]
    for line in lines:
        if any(k in line.lower() for k in _CAUSE_KEYWORDS):
            return line[:500]
    return lines[0][:500] if lines else type(err).__name__


@contextlib.contextmanager
def explain_worker_failures(strategy=None, timeout_seconds=None):
    """Turns the TF errors a dead peer causes into one clear `WorkerFailureError`.

    When a worker dies, each survivor's next collective fails either after the
    collective timeout (``DeadlineExceeded: Collective ops timeout``) or earlier, when
    TF's coordination service notices the missing heartbeats (``Unavailable: ... tasks
    are unhealthy``). Wrap ``model.fit`` (or a custom loop) in this context to get an
    error that says what happened and what to do.

    Args:
      strategy: the strategy from `create_multi_worker_strategy` (its watchdog's timeout
        is reported) or None.
      timeout_seconds: float or None, the timeout to report when `strategy` is None.

    Yields:
      None.

    Raises:
      WorkerFailureError: from ``UnavailableError``, ``DeadlineExceededError``,
        ``AbortedError`` or ``CancelledError`` raised inside the block; the original error
        is chained as ``__cause__``.

    Example:
      >>> with explain_worker_failures(strategy):
      ...     model.fit(dataset, epochs=90, callbacks=[strategy.tfscale_watchdog, backup])
    """
    watchdog = getattr(strategy, "tfscale_watchdog", None)
    if watchdog is not None and timeout_seconds is None:
        timeout_seconds = watchdog.timeout_seconds
    try:
        yield
    except _PEER_FAILURE_ERRORS as err:
        cause = _summarize_error(err)
        raise WorkerFailureError(
            "Multi-worker training stopped: a peer worker died or stopped responding. "
            f"A collective did not complete within the collective timeout "
            f"(timeout_seconds={timeout_seconds}) or TF's coordination service saw a worker "
            "stop sending heartbeats. A failed collective poisons this process, so restart "
            "all workers; with keras.callbacks.BackupAndRestore the run resumes from the last "
            f"completed epoch. Cause ({type(err).__name__}): {cause}",
            timeout_seconds=timeout_seconds,
        ) from err


def worker_backup_dir(backup_dir, strategy=None):
    """Returns this worker's ``BackupAndRestore`` directory under `backup_dir`.

    Keras 3's ``BackupAndRestore`` is not multi-worker aware: two workers writing one
    file collide on the HDF5 file lock. Every worker therefore backs up into its own
    sub-directory ``backup_dir/worker{rank}``; the weights are identical on all workers
    after each synchronous epoch, so each one restores its own copy.

    Args:
      backup_dir: str, the directory given on the command line.
      strategy: a strategy from `create_multi_worker_strategy`, or None (then the rank is
        read from the environment; one process gives rank 0).

    Returns:
      str, ``os.path.join(backup_dir, f"worker{rank}")``.
    """
    reducer = getattr(strategy, "tfscale_all_reduce", None)
    if reducer is not None:
        rank = reducer.worker_rank
    else:
        info = cluster_lib.cluster_from_environment()
        rank = 0 if info is None else info.rank
    return os.path.join(backup_dir, f"worker{rank}")
