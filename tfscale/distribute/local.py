"""The in-process backend: any all-reduce `Schedule` as a `tf.distribute.CrossDeviceOps`.

`LocalAllReduce` is the `tf.distribute.CrossDeviceOps` base of tfscale's one-process
all-reduce (GPUs, TPU cores or logical CPUs under `tf.distribute.MirroredStrategy`): it
packs gradients (`packing.pack`), compresses them for the wire, runs a schedule of the
registry (`tfscale.distribute.algorithms`) on all packs at once with the device-placed
primitives of `tfscale.distribute.primitives` (`run_schedule`), and unpacks on every device.
It also handles the cases the schedules do not (sparse `IndexedSlices`, integer dtypes,
reductions to devices other than the replicas', all-gather).

`ScheduledAllReduce` runs any registered algorithm by name; `TorusAllReduce` (Mikami et al.,
arXiv:1811.05233; Ying et al., arXiv:1811.06992) and `HierarchicalAllReduce` (Jia et al.,
arXiv:1807.11205) are the same class with their topology arguments named.

Compression error: with ``compression="fp16"`` (or ``"bf16"``) a value is rounded to the
wire dtype once on input, once per reducing phase that is not the last (its partial sums
travel in the wire dtype) and once for the result: 3 times for the torus and the
hierarchical schedules, so the all-reduced sum ``S = sum_i x_i`` satisfies
``|S_hat - S| <= 3 u sum_i |x_i|`` to first order, with ``u = 2**-11`` for fp16 and
``2**-8`` for bf16 (normal range; fp16 overflows to inf above 65504);
halving-doubling on ``2^k`` ranks rounds ``k + 1`` times.
"""

import tensorflow as tf

from tfscale import _tf_compat
from tfscale.distribute import algorithms
from tfscale.distribute import packing
from tfscale.distribute import primitives
from tfscale.distribute import topology
from tfscale.distribute import validation
from tfscale.distribute.algorithms import schedule as schedule_lib
from tfscale.distribute.primitives import Fragment
from tfscale.distribute.primitives import FusionPlan

__all__ = [
    "DEFAULT_BYTES_PER_PACK",
    "IN_PROCESS_BYTES_PER_PACK",
    "HierarchicalAllReduce",
    "LocalAllReduce",
    "ScheduledAllReduce",
    "TorusAllReduce",
    "run_schedule",
]

IN_PROCESS_BYTES_PER_PACK = 256 * 1024
"""Default fusion threshold of the in-process backend, bytes (256 KiB; docs/benchmarks_allreduce.md)."""

DEFAULT_BYTES_PER_PACK = IN_PROCESS_BYTES_PER_PACK
"""The former name of `IN_PROCESS_BYTES_PER_PACK`."""


def run_schedule(schedule, fragments, devices, plan, finalize=None, partial_finalize=None):
    """Runs the phases of `schedule` on the devices of one process.

    Phase by phase, each group runs its collective with the primitives of
    `tfscale.distribute.primitives`: ``reduce_scatter``, ``all_reduce`` (direct
    reduce-scatter + all-gather), ``all_gather``, ``reduce`` and ``broadcast``. The last
    phase's data movement leaves the received tensors on the sender (``copy=False``): the
    receiver's own unpacking ops make that hop, one op fewer per fragment.

    Args:
      schedule: a `tfscale.distribute.algorithms.Schedule` for ``len(devices)`` ranks.
      fragments: list (one per device, replica order) of lists of `Fragment` with a
        common layout, ``fragments[i]`` on ``devices[i]``, in the wire dtype.
      devices: list of device names, one per replica.
      plan: the `FusionPlan` of the packs.
      finalize: optional ``f(tensor, pack)`` applied once to each fully reduced piece on
        its owner, in the schedule's last reducing phase (MEAN scaling, cast to wire).
      partial_finalize: optional ``f(tensor, pack)`` applied to the partial sums of the
        earlier reducing phases (the cast back to the wire dtype).

    Returns:
      A list (one per device) of lists of `Fragment` covering the layout, list ``i`` on
      (or, for the last hop, consumed on) ``devices[i]``.

    Raises:
      ValueError: if the schedule is for another number of ranks.
    """
    if schedule.num_ranks != len(devices):
        raise ValueError(
            f"The {schedule.algorithm!r} schedule is for {schedule.num_ranks} ranks, but there are "
            f"{len(devices)} devices"
        )
    held = list(fragments)
    last_reduction = schedule.last_reduction
    last = len(schedule.phases) - 1
    for index, phase in enumerate(schedule.phases):
        fin = finalize if index == last_reduction else partial_finalize
        copy = index != last
        new = list(held)
        for group in phase.groups:
            frags = [held[r] for r in group]
            devs = [devices[r] for r in group]
            if phase.kind == schedule_lib.REDUCE_SCATTER:
                out = primitives.reduce_scatter(frags, devs, plan, finalize=fin)
            elif phase.kind == schedule_lib.ALL_REDUCE:
                out = primitives.all_gather(primitives.reduce_scatter(frags, devs, plan, finalize=fin), devs, copy=copy)
            elif phase.kind == schedule_lib.ALL_GATHER:
                out = primitives.all_gather(frags, devs, copy=copy)
            elif phase.kind == schedule_lib.REDUCE:
                out = [None] * len(group)
                out[phase.root] = primitives.reduce(frags, devs, phase.root, plan, finalize=fin)
            else:  # BROADCAST
                out = primitives.broadcast(frags[phase.root], phase.root, devs, copy=copy)
            for r, o in zip(group, out):
                new[r] = o
        held = new
    return held


def _devices_of(value):
    return tuple(v.device for v in value.values)


def _same_devices(a, b):
    canon = tf.DeviceSpec.from_string
    return len(a) == len(b) and all(canon(x) == canon(y) for x, y in zip(a, b))


def _is_sparse(value):
    return isinstance(value.values[0], tf.IndexedSlices)


class LocalAllReduce(tf.distribute.CrossDeviceOps):
    """Base class of tfscale's one-process all-reduce `tf.distribute.CrossDeviceOps`.

    It does what is common to every schedule (`ScheduledAllReduce`, `TorusAllReduce`,
    `HierarchicalAllReduce`):

    1. Dense float values whose destinations are their own devices (an all-reduce, which
       is what Keras's gradient aggregation under `MirroredStrategy` asks for) are fused
       per device with `packing.pack` into buffers of about `bytes_per_pack` bytes,
       cast to the wire dtype (`compression`), all-reduced by the subclass's
       `schedule` (`run_schedule`), cast back and unpacked on every device; MEAN is a
       scale by ``1 / num_replicas`` applied once, on the shard owners, in the
       accumulation dtype.
    2. Sparse `tf.IndexedSlices` are all-gathered (values and indices concatenated on
       every device), which is their exact sum; no densification, so memory stays
       proportional to the touched rows.
    3. Integer and bool values, and reductions to devices other than the values' own
       (e.g. ``strategy.reduce`` to the host), go through
       `tf.distribute.ReductionToOneDevice`.
    4. `all_gather` (Keras's synchronised BatchNormalization) concatenates the replicas'
       tensors on every device with one explicit hop each.

    Attributes:
      bytes_per_pack: int, the fusion threshold (bytes).
      compression: None, ``"fp16"`` or ``"bf16"``.
      num_batch_reduce_calls: int, how many all-reduces this object has built (traced),
        i.e. proof that a `MirroredStrategy` used it.
      num_reduced_tensors: int, how many dense tensors those all-reduces carried.

    Args:
      bytes_per_pack: int >= 0, fusion threshold in bytes (default 256 KiB); 0 fuses all
        tensors of a dtype into one buffer.
      compression: None, ``"fp16"`` or ``"bf16"``: the dtype values travel in (see
        `packing`); sums are in float32.

    Raises:
      TypeError: if `bytes_per_pack` is not an int.
      ValueError: if `bytes_per_pack` < 0 or `compression` is unknown.
    """

    def __init__(self, bytes_per_pack=DEFAULT_BYTES_PER_PACK, compression=None):
        super().__init__()
        self.bytes_per_pack = validation.check_non_negative_int("bytes_per_pack", bytes_per_pack)
        self.compression = packing.validate_compression(compression)
        self.num_batch_reduce_calls = 0
        self.num_reduced_tensors = 0
        self._fallback = tf.distribute.ReductionToOneDevice()

    # ----------------------------------------------------------- subclass interface
    def schedule(self, num_devices):
        """Returns the `Schedule` this op runs on `num_devices` replicas (subclasses define it).

        Raises:
          ValueError: if the algorithm cannot run on `num_devices` devices.
        """
        raise NotImplementedError

    def _check_num_devices(self, num_devices):
        """Raises ValueError if the schedule cannot run on `num_devices` devices."""
        self.schedule(num_devices)

    def _all_reduce_fragments(self, fragments, devices, plan, finalize):
        """Runs `schedule(len(devices))` on the fused buffers (see `run_schedule`)."""
        return run_schedule(self.schedule(len(devices)), fragments, devices, plan,
                            finalize=finalize, partial_finalize=self._to_wire(plan))

    def _to_wire(self, plan):
        """Returns ``f(tensor, pack)`` casting a partial sum to the pack's wire dtype."""

        def to_wire(t, p):
            return packing.decompress(t, plan.wire_dtypes[p])

        return to_wire

    # ---------------------------------------------------------------- CrossDeviceOps
    def reduce_implementation(self, reduce_op, per_replica_value, destinations, options):
        return self.batch_reduce_implementation(
            reduce_op, [(per_replica_value, destinations)], options
        )[0]

    def batch_reduce_implementation(self, reduce_op, value_destination_pairs, options):
        del options  # `bytes_per_pack` and the algorithm are this object's.
        reduce_op = tf.distribute.ReduceOp(reduce_op)
        pairs = list(value_destination_pairs)
        results = [None] * len(pairs)
        dense, sparse, other = [], [], []
        devices = _devices_of(pairs[0][0])
        for i, (value, dest) in enumerate(pairs):
            own = _same_devices(_devices_of(value), devices) and _same_devices(
                _tf_compat.destination_devices(dest), devices
            )
            if not own or len(devices) == 1:
                other.append(i)
            elif _is_sparse(value):
                sparse.append(i)
            elif value.values[0].dtype.is_floating:
                dense.append(i)
            else:
                other.append(i)
        if dense:
            reduced = self._batch_all_reduce(
                reduce_op, [pairs[i][0] for i in dense], list(devices)
            )
            for i, r in zip(dense, reduced):
                results[i] = r
        for i in sparse:
            results[i] = self._all_reduce_sparse(reduce_op, pairs[i][0], list(devices))
        if other:
            fallback = self._fallback.batch_reduce(reduce_op, [pairs[i] for i in other])
            for i, r in zip(other, fallback):
                results[i] = r
        return results

    def _gather_implementation(self, per_replica_value, destinations, axis, options):
        devices = _devices_of(per_replica_value)
        if not _same_devices(_tf_compat.destination_devices(destinations), devices):
            return self._fallback._gather(  # pylint: disable=protected-access
                per_replica_value, destinations, axis, options
            )
        values = list(per_replica_value.values)
        gathered = []
        for device in devices:
            with tf.device(device):
                gathered.append(
                    tf.concat([v if v.device == device else tf.identity(v) for v in values],
                              axis=axis)
                )
        return _tf_compat.mirrored(gathered)

    # -------------------------------------------------------------------- internals
    def _batch_all_reduce(self, reduce_op, per_replica_values, devices):
        num_devices = len(devices)
        self._check_num_devices(num_devices)
        self.num_batch_reduce_calls += 1
        self.num_reduced_tensors += len(per_replica_values)
        scale = 1.0 / num_devices if reduce_op == tf.distribute.ReduceOp.MEAN else None

        # 1. Fuse on each device (same layout everywhere: same shapes and dtypes), then
        #    cast to the wire dtype.
        fragments, spec = [], None
        for d, device in enumerate(devices):
            with tf.device(device):
                packs, spec = packing.pack(
                    [v.values[d] for v in per_replica_values], self.bytes_per_pack
                )
                fragments.append([
                    Fragment(p, 0, int(t.shape[0]), packing.compress(t, self.compression))
                    for p, t in enumerate(packs)
                    if t.shape[0]
                ])
        plan = FusionPlan.from_spec(spec, self.compression)

        def finalize(t, p):
            if scale is not None:
                t = t * tf.constant(scale, t.dtype)
            return packing.decompress(t, plan.wire_dtypes[p])

        # 2. The subclass's schedule.
        reduced = self._all_reduce_fragments(fragments, list(devices), plan, finalize)

        # 3. Cast back and unpack on each device, straight from the reduced fragments.
        outputs_by_device = []
        for d, device in enumerate(devices):
            by_pack = [[] for _ in range(spec.num_packs)]
            with tf.device(device):
                for f in sorted(reduced[d], key=lambda f: (f.pack, f.start)):
                    by_pack[f.pack].append(
                        (f.start, f.end, packing.decompress(f.tensor, spec.pack_dtypes[f.pack]))
                    )
                outputs_by_device.append(packing.unpack_from_shards(by_pack, spec))
        return [
            _tf_compat.mirrored([outputs_by_device[d][i] for d in range(num_devices)])
            for i in range(len(per_replica_values))
        ]

    def _all_reduce_sparse(self, reduce_op, per_replica_value, devices):
        """All-gathers `IndexedSlices`: the concatenation is the exact sum."""
        slices = list(per_replica_value.values)
        outputs = []
        for device in devices:
            with tf.device(device):
                values = tf.concat([tf.identity(s.values) for s in slices], axis=0)
                indices = tf.concat([tf.identity(s.indices) for s in slices], axis=0)
                if reduce_op == tf.distribute.ReduceOp.MEAN:
                    values = values / tf.cast(len(devices), values.dtype)
                dense_shape = slices[0].dense_shape
                if dense_shape is not None:
                    dense_shape = tf.identity(dense_shape)
                outputs.append(tf.IndexedSlices(values, indices, dense_shape))
        return _tf_compat.mirrored(outputs)


class ScheduledAllReduce(LocalAllReduce):
    """Any registered all-reduce algorithm as a one-process `tf.distribute.CrossDeviceOps`.

    The schedule (`tfscale.distribute.algorithms.build_schedule`) is built for the number
    of replicas at the first reduce, and cached per replica count.

    Args:
      algorithm: a name of `tfscale.distribute.algorithms.algorithm_names()` or an alias
        (``"ring"`` is ``"flat"``). Default ``"flat"``.
      bytes_per_pack: int >= 0, fusion threshold in bytes (default 256 KiB,
        `IN_PROCESS_BYTES_PER_PACK`); 0 fuses all gradients of a dtype into one buffer.
      compression: None, ``"fp16"``/``"float16"`` or ``"bf16"``/``"bfloat16"``: the dtype
        gradients travel in; sums are accumulated in float32.
      **params: the algorithm's topology parameters (``grid_shape``, ``devices_per_node``,
        ...); None means the algorithm's default.

    Attributes:
      algorithm: str, the registered name.
      params: dict, the topology parameters given.

    Raises:
      ValueError: for an unknown algorithm (listing the valid names), a parameter the
        algorithm does not take, `bytes_per_pack` < 0 or an unknown compression; at the
        first reduce, a topology that does not fit the replica count.

    Example:
      >>> op = ScheduledAllReduce("halving_doubling")
      >>> strategy = tf.distribute.MirroredStrategy(devices, cross_device_ops=op)
    """

    def __init__(self, algorithm="flat", bytes_per_pack=IN_PROCESS_BYTES_PER_PACK, compression=None, **params):
        super().__init__(bytes_per_pack=bytes_per_pack, compression=compression)
        entry = algorithms.get_algorithm(algorithm)
        for key in params:
            if key not in entry.parameters:
                raise ValueError(
                    f"Argument `{key}` does not apply to all_reduce algorithm {entry.name!r} "
                    f"(its parameters: {list(entry.parameters)}). Received: {key}={params[key]!r}"
                )
        self.algorithm = entry.name
        self.params = {k: v for k, v in params.items() if v is not None}
        self._schedules = {}

    def schedule(self, num_devices):
        if num_devices not in self._schedules:
            self._schedules[num_devices] = algorithms.build_schedule(self.algorithm, num_devices, **self.params)
        return self._schedules[num_devices]


class TorusAllReduce(ScheduledAllReduce):
    """2D-torus all-reduce for `tf.distribute.MirroredStrategy` (arXiv:1811.05233).

    Reduce-scatter along rows, all-reduce of each shard along columns, all-gather along
    rows (`tfscale.distribute.algorithms.torus`); see the module docstring for the
    compression error bound. The replicas are laid out row-major in the strategy's device
    order. Degenerate grids work: ``1 x N`` is a flat reduce-scatter + all-gather,
    ``N x 1`` a column all-reduce of the whole buffer, ``1 x 1`` an identity.

    Args:
      grid_shape: None (the most square grid, `topology.factor_grid`), ``"RxC"`` or
        ``(rows, cols)``; checked against the number of replicas at the first reduce
        (`create_strategy` checks it at creation).
      bytes_per_pack: int >= 0, fusion threshold in bytes (default 256 KiB); 0 fuses all
        gradients of a dtype into one buffer.
      compression: None, ``"fp16"`` or ``"bf16"``: the dtype gradients travel in; sums
        are accumulated in float32.

    Raises:
      ValueError: if `grid_shape` is malformed, `bytes_per_pack` < 0 or `compression`
        unknown; at the first reduce, if ``rows * cols`` differs from the number of
        replicas (the message names both).

    Example:
      >>> strategy = tf.distribute.MirroredStrategy(
      ...     devices, cross_device_ops=TorusAllReduce(grid_shape="2x4"))
    """

    def __init__(self, grid_shape=None, bytes_per_pack=IN_PROCESS_BYTES_PER_PACK, compression=None):
        grid_shape = topology.parse_grid_format(grid_shape)
        super().__init__("torus", bytes_per_pack=bytes_per_pack, compression=compression, grid_shape=grid_shape)
        self.grid_shape = grid_shape

    def grid(self, num_devices):
        """Returns the `topology.Grid` used for `num_devices` replicas.

        Raises:
          ValueError: if the configured `grid_shape` does not multiply to `num_devices`.
        """
        return topology.Grid(*topology.parse_grid_shape(self.grid_shape, num_devices))


class HierarchicalAllReduce(ScheduledAllReduce):
    """Hierarchical (intra-node, inter-node, intra-node) all-reduce (arXiv:1807.11205).

    See `tfscale.distribute.algorithms.hierarchical` for the two schedules and the module
    docstring for the compression error bound. Replicas are grouped into nodes of
    contiguous devices in the strategy's device order.

    Args:
      devices_per_node: int >= 1 that divides the number of replicas (checked at the
        first reduce; `create_strategy` checks it at creation). 1 or the number of
        replicas gives a flat all-reduce.
      bytes_per_pack: int >= 0, fusion threshold in bytes (default 256 KiB); 0 fuses all
        gradients of a dtype into one buffer.
      compression: None, ``"fp16"`` or ``"bf16"``: the dtype gradients travel in; sums
        are accumulated in float32.
      intra_node: ``"reduce_scatter"`` (default, Horovod's form) or ``"reduce"`` (to the
        node leader, Jia et al.'s and ChainerMN's form).

    Raises:
      TypeError: if `devices_per_node` is not an int.
      ValueError: if `devices_per_node` < 1, `bytes_per_pack` < 0, `compression` or
        `intra_node` unknown; at the first reduce, if `devices_per_node` does not divide
        the number of replicas.

    Example:
      >>> strategy = tf.distribute.MirroredStrategy(
      ...     devices, cross_device_ops=HierarchicalAllReduce(devices_per_node=4))
    """

    def __init__(self, devices_per_node, bytes_per_pack=IN_PROCESS_BYTES_PER_PACK, compression=None,
                 intra_node="reduce_scatter"):
        devices_per_node = validation.check_positive_int("devices_per_node", devices_per_node)
        validation.check_choice("intra_node", intra_node, ("reduce_scatter", "reduce"))
        super().__init__("hierarchical", bytes_per_pack=bytes_per_pack, compression=compression,
                         devices_per_node=devices_per_node, intra_node=intra_node)
        self.devices_per_node = devices_per_node
        self.intra_node = intra_node
