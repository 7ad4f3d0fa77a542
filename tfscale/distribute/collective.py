"""The TF-collective backend: any all-reduce `Schedule` across worker processes.

`MultiWorkerAllReduce` runs a schedule of the registry (`tfscale.distribute.algorithms`:
``torus``, ``hierarchical``, ``halving_doubling``, ``flat``/``ring``, or one you register)
with TF collective ops on sub-groups of the ``N = num_workers * devices_per_worker``
replicas (global replica id ``task * devices_per_worker + local index``, the order TF's
collective runtime ranks devices in), inside a `tf.distribute.MultiWorkerMirroredStrategy`
(gRPC between workers, NCCL inside a GPU worker). `create_multi_worker_strategy`
(`tfscale.distribute.multi_worker`) installs it so that Keras ``fit`` sums gradients with it.

Each phase of the schedule is one collective per pack, one group key per group of ranks:

* ``reduce_scatter``: the pack is cut into ``k`` equal chunks (zero padded), ``all_to_all``
  sends chunk j to member j, which sums what it receives (TF has no reduce-scatter kernel
  on CPU; FINDINGS.md);
* ``all_reduce``: ``all_reduce_v2`` (TF's ring, or NCCL on GPUs);
* ``all_gather``: ``all_gather_v2`` of the chunks, padding trimmed;
* ``reduce`` and ``broadcast``: ``all_reduce_v2`` in which the non-roots keep nothing
  (``reduce``) or contribute zeros (``broadcast``): correct, not bandwidth-optimal.

Every algorithm first fuses the values into packs of about `bytes_per_pack` bytes
(`packing.pack`, default `MULTI_WORKER_BYTES_PER_PACK`, 32 MiB) and may cast them to
float16 / bfloat16 for the wire (`compression`; local sums in float32). TF's collective
reduce kernels have no bfloat16, so with ``"bf16"`` only the data-movement steps
(all_to_all, all_gather) carry bf16 (bit-cast to int32) and ``all_reduce`` steps use
float32. Packs smaller than `small_pack_bytes` run `Schedule.for_small_messages` (each
reduce-scatter becomes an all-reduce and its all-gather is dropped: fewer collective
calls, more bytes), which is cheaper where a call's latency dominates.

Rank order: TF's collective runtime ranks a group's members by (job, task, device index),
so member j of every group is the j-th rank listed. This holds on CPUs and for one device
per worker; on a worker with several GPUs TF may order its GPUs by interconnect (sums stay
correct only if every worker has the same GPU topology, which MWMS assumes anyway).

All non-public TF API used here is in `tfscale._tf_compat`.
"""

import importlib

import tensorflow as tf

from tfscale import _tf_compat
from tfscale.distribute import algorithms
from tfscale.distribute import packing
from tfscale.distribute import rank_schedule
from tfscale.distribute import topology
from tfscale.distribute import validation

__all__ = [
    "ALGORITHMS",
    "DEFAULT_BYTES_PER_PACK",
    "DEFAULT_SMALL_PACK_BYTES",
    "DEFAULT_TIMEOUT_SECONDS",
    "MULTI_WORKER_BYTES_PER_PACK",
    "MultiWorkerAllReduce",
    "WorkerFailureError",
    "create_multi_worker_strategy",
    "explain_worker_failures",
    "in_multi_worker_environment",
    "use_all_reduce",
    "worker_backup_dir",
]

MULTI_WORKER_BYTES_PER_PACK = 32 * 1024 * 1024
"""Default fusion threshold across processes, bytes (32 MiB: ResNet-50's 98 MiB of fp32 gradients make 4 packs)."""

DEFAULT_BYTES_PER_PACK = MULTI_WORKER_BYTES_PER_PACK
"""The former name of `MULTI_WORKER_BYTES_PER_PACK`."""

DEFAULT_SMALL_PACK_BYTES = 1024 * 1024
"""Packs below 1 MiB run the schedule's small-message variant (`Schedule.for_small_messages`)."""

DEFAULT_TIMEOUT_SECONDS = 300.0
"""Seconds a collective may wait for its peers before failing (covers first-step tracing)."""

_KEY_STRIDE = 1_000_000  # group keys per strategy; far above MWMS's own (1, 2, ...)

# Names that moved to `multi_worker` and `failures`; still importable from here.
_MOVED = {
    "create_multi_worker_strategy": "multi_worker",
    "use_all_reduce": "multi_worker",
    "in_multi_worker_environment": "multi_worker",
    "WorkerFailureError": "failures",
    "explain_worker_failures": "failures",
    "worker_backup_dir": "failures",
}


def __getattr__(name):
    if name in _MOVED:
        return getattr(importlib.import_module(f"tfscale.distribute.{_MOVED[name]}"), name)
    if name == "ALGORITHMS":  # The registry is the one list of names.
        return algorithms.algorithm_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class MultiWorkerAllReduce:
    """Sums dense float tensors over all replicas of all workers with a registered schedule.

    One instance per worker process; it is called once per local replica with that
    replica's tensors (`__call__`) and returns their sums over all ``num_replicas``
    replicas. `create_multi_worker_strategy` installs it into MWMS; calling it directly
    needs a process whose collective runtime is up (an MWMS has been created).

    Args:
      algorithm: a registered algorithm name (`tfscale.distribute.algorithms.algorithm_names`)
        or alias: ``"torus"``, ``"hierarchical"``, ``"halving_doubling"``, ``"flat"``
        (alias ``"ring"``: TF's own all-reduce over all replicas, with tfscale's packing,
        compression and timeout).
      local_devices: sequence of str, this worker's replica devices in local order
        (``strategy.extended.worker_devices``), e.g.
        ``["/job:worker/replica:0/task:1/device:CPU:0"]``.
      worker_rank: int in ``[0, num_workers)``, this worker's position among the workers
        (the chief, if any, is 0).
      num_workers: int >= 1, the number of worker processes.
      grid_shape: torus only: None (most square, `topology.factor_grid`), ``"RxC"`` or
        ``(rows, cols)`` with ``rows * cols == num_replicas``.
      devices_per_node: hierarchical only: int dividing `num_replicas`, replicas per
        node (contiguous replica ids); default ``len(local_devices)`` (a node per worker).
      bytes_per_pack: int >= 0, fusion threshold in bytes; default 32 MiB
        (`MULTI_WORKER_BYTES_PER_PACK`); 0 packs all tensors of a dtype into one buffer.
      compression: None, ``"fp16"``/``"float16"`` or ``"bf16"``/``"bfloat16"``: dtype of
        float32/float64 values on the wire; sums inside a worker are in float32. Each
        cast rounds with relative error <= 2**-11 (fp16, which overflows to inf above
        65504) or 2**-8 (bf16).
      timeout_seconds: float > 0 or None, per-collective timeout in seconds; default 300.
        Each collective with a timeout holds an OS thread for the whole timeout (see
        `tfscale.distribute.watchdog`); None relies on a `CollectiveWatchdog` instead.
      communication_hint: ``"auto"``, ``"ring"`` or ``"nccl"`` for the collectives;
        default ``"auto"`` (NCCL on GPUs when available).
      key_base: int, first group key of this instance; must be the same on every worker
        and not overlap another instance's ``[key_base, key_base + 1e6)``.
      small_pack_bytes: int >= 0: a pack smaller than this many bytes runs the
        schedule's small-message variant (`Schedule.for_small_messages`); default 1 MiB
        (`DEFAULT_SMALL_PACK_BYTES`); 0 turns it off.
      **params: further topology parameters of the algorithm (e.g. ``intra_node``,
        ``inter_node`` for hierarchical).

    Attributes:
      algorithm: str, the registered name.
      num_replicas: int, ``num_workers * len(local_devices)``.
      schedule: the `tfscale.distribute.algorithms.Schedule` run on packs of at least
        `small_pack_bytes`; `small_schedule` the one run on smaller packs.
      grid: the `topology.Grid` of a torus, else None.

    Raises:
      ValueError: for an unknown `algorithm` (listing the valid names), a parameter the
        algorithm does not take, a `grid_shape` whose product is not the replica count,
        a `devices_per_node` that does not divide it, or out-of-range numbers; the
        message names the argument and the value.
      TypeError: for an argument of the wrong type.
    """

    def __init__(self, algorithm, local_devices, worker_rank, num_workers, grid_shape=None,
                 devices_per_node=None, bytes_per_pack=MULTI_WORKER_BYTES_PER_PACK, compression=None,
                 timeout_seconds=DEFAULT_TIMEOUT_SECONDS, communication_hint="auto", key_base=_KEY_STRIDE,
                 small_pack_bytes=DEFAULT_SMALL_PACK_BYTES, **params):
        self.algorithm = algorithms.canonical_name(algorithm)
        self.local_devices = tuple(local_devices)
        if not self.local_devices:
            raise ValueError("Argument `local_devices` must name at least one device. Received: []")
        self.num_workers = validation.check_positive_int("num_workers", num_workers)
        worker_rank = validation.as_int("worker_rank", worker_rank)
        if not 0 <= worker_rank < num_workers:
            raise ValueError(
                f"Argument `worker_rank` must be an int in [0, {num_workers}). Received: worker_rank={worker_rank!r}"
            )
        self.worker_rank = worker_rank
        self.devices_per_worker = len(self.local_devices)
        self.num_replicas = self.num_workers * self.devices_per_worker
        self.bytes_per_pack = validation.check_non_negative_int("bytes_per_pack", bytes_per_pack)
        self.compression = packing.validate_compression(compression)
        self.timeout_seconds = validation.check_timeout("timeout_seconds", timeout_seconds)
        self.communication_hint = communication_hint
        self.key_base = validation.as_int("key_base", key_base)
        self.small_pack_bytes = validation.check_non_negative_int("small_pack_bytes", small_pack_bytes)
        if self.algorithm == "hierarchical" and devices_per_node is None:
            devices_per_node = self.devices_per_worker  # A node per worker.
        self.schedule = algorithms.build_schedule(
            self.algorithm, self.num_replicas, grid_shape=grid_shape, devices_per_node=devices_per_node, **params
        )
        self.small_schedule = self.schedule.for_small_messages()
        grid = self.schedule.param("grid_shape")
        self.grid = topology.Grid(*grid) if grid is not None else None
        # One group key per distinct group of ranks, numbered in schedule order (the same on every worker).
        self._group_keys = {}
        for sched in (self.schedule, self.small_schedule):
            for phase in sched.phases:
                for group in phase.groups:
                    self._group_keys.setdefault(group, self.key_base + len(self._group_keys))
        self._launchers = {}  # (group, local replica) -> SubgroupLauncher
        self._instance_keys = _tf_compat.InstanceKeys()
        self._tokens = [None] * self.devices_per_worker

    def replica_id(self, local_replica):
        """int: the global replica id of local replica `local_replica`."""
        return self.worker_rank * self.devices_per_worker + local_replica

    def _launcher(self, group, local_replica):
        key = (group, local_replica)
        if key not in self._launchers:
            device = self.local_devices[local_replica]
            if tf.DeviceSpec.from_string(device).device_type == "CPU":
                # One ordering token per group: collectives of one group run in program order, those of different
                # groups (a node's reduce-scatter of pack p + 1 and the inter-node all-reduce of pack p) overlap.
                # Every member issues a group's collectives in the same order (the same program, phase-major).
                token = _tf_compat.new_ordering_token(device)
            else:
                # GPUs: NCCL kernels of different communicators can deadlock if launched concurrently in
                # different orders, so every collective of the device runs in program order (as MWMS's own).
                if self._tokens[local_replica] is None:
                    self._tokens[local_replica] = _tf_compat.new_ordering_token(device)
                token = self._tokens[local_replica]
            self._launchers[key] = _tf_compat.SubgroupLauncher(
                group_key=self._group_keys[group],
                group_size=len(group),
                device=device,
                instance_keys=self._instance_keys,
                ordering_token=token,
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
            # The phase walk, wire dtypes and padding are `rank_schedule`'s (shared with the Horovod backend),
            # phase-major over the packs so that the tiers overlap; the collectives are TF's, one group key per
            # group of ranks (`_TFCollectives`).
            reduced = rank_schedule.run_rank_schedules(
                packs, self.replica_id(local_replica), self.schedule, self.small_schedule,
                _TFCollectives(self, local_replica), compression=self.compression,
                small_pack_bytes=self.small_pack_bytes)
            return packing.unpack(reduced, spec)


class _TFCollectives(rank_schedule.RankCollectives):
    """TF's collective ops for one local replica of a `MultiWorkerAllReduce`.

    ``reduce_scatter`` is an ``all_to_all`` of the ``k`` chunks followed by a local sum in the accumulation dtype
    (TF has no reduce-scatter kernel on CPU; FINDINGS.md); ``all_gather`` and ``all_reduce`` are TF's
    ``all_gather_v2`` and ``all_reduce_v2``; bfloat16 data movement is bit-cast to int32 (`_move`).
    """

    def __init__(self, owner, local_replica):
        self._owner = owner
        self._local_replica = local_replica

    def _launcher(self, group):
        return self._owner._launcher(group, self._local_replica)  # pylint: disable=protected-access

    def reduce_scatter(self, t, group, member, key, acc_dtype):
        del member, key
        k = len(group)
        chunk = int(t.shape[0]) // k
        received = _move(self._launcher(group).all_to_all, tf.reshape(t, [k, chunk]), [k, chunk])
        return tf.reduce_sum(packing.decompress(received, acc_dtype), axis=0)

    def all_gather(self, t, group, member, key):
        del member, key
        return _move(self._launcher(group).all_gather, t, [len(group) * int(t.shape[0])])

    def all_reduce(self, t, group, member, key):
        del member, key
        return self._launcher(group).all_reduce(t)


def _move(collective, t, out_shape):
    """Runs a data-movement collective on `t` (result of static `out_shape`).

    bfloat16 values are bit-cast in pairs to int32 first (the last dimension is even).
    """
    if t.dtype != tf.bfloat16:
        return tf.reshape(collective(t), out_shape)
    shape = t.shape.as_list()
    bits = tf.bitcast(tf.reshape(t, shape[:-1] + [shape[-1] // 2, 2]), tf.int32)
    return tf.reshape(tf.bitcast(collective(bits), tf.bfloat16), out_shape)
