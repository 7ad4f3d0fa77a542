"""One-process collective primitives over groups of devices, and the CrossDeviceOps base.

The torus (`torus.py`, Mikami et al., arXiv:1811.05233; Ying et al., arXiv:1811.06992) and
hierarchical (`hierarchical.py`, Jia et al., arXiv:1807.11205) all-reduces are both built
from the primitives here, which move 1-D buffers between the devices of one process
(GPUs, TPU cores or logical CPUs under `tf.distribute.MirroredStrategy`):

* `reduce_scatter`: member ``k`` of a group ends up owning shard ``k`` of the sum;
* `all_reduce`: `reduce_scatter` then `all_gather` (Rabenseifner's algorithm);
* `all_gather`: every member receives every member's fragments;
* `reduce` to one member, and `broadcast` from one member.

Every op is placed explicitly with ``tf.device``: a slice runs on the device that holds
the data (so only the slice crosses the link), a sum runs on the device that owns the
shard, and each hop of a gather is a ``tf.identity`` on the receiving device (or, for a
last hop, the receiver's own consuming op, see `all_gather(copy=False)`). Buffers are
handled as lists of `Fragment` (pieces of fused packs) and are never concatenated after
fusion: shard boundaries are moved to tensor edges when that keeps the shards balanced
(`split_ranges`), and cuts inside a tensor are 64-byte aligned, so on CPU slicing shares
memory and the gathered tensors are cut straight out of the reduced fragments
(`packing.unpack_from_shards`). The only full-size memory passes left are the additions.

`LocalAllReduce` is the `tf.distribute.CrossDeviceOps` base class that both algorithms
subclass: it packs gradients (`packing.pack`), compresses them for the wire, runs the
subclass's schedule on all packs at once, unpacks on every device, and handles the cases the
schedules do not (sparse `IndexedSlices`, integer dtypes, reductions to devices other than
the replicas', all-gather).
"""

import bisect
import collections
import dataclasses

import tensorflow as tf

# Non-public TensorFlow API, confined to this block: building `Mirrored` values and
# reading the devices of a `destinations` argument are what every CrossDeviceOps in TF
# itself does; there is no public equivalent. Tested against TF 2.21.
from tensorflow.python.distribute import cross_device_ops as _cross_device_ops_lib
from tensorflow.python.distribute import distribute_utils as _distribute_utils
from tensorflow.python.distribute import values as _values_lib

from tfscale.distribute import packing

__all__ = [
    "DEFAULT_BYTES_PER_PACK",
    "DEFAULT_SNAP_TOLERANCE",
    "Fragment",
    "FusionPlan",
    "LocalAllReduce",
    "all_gather",
    "all_reduce",
    "broadcast",
    "reduce",
    "reduce_scatter",
    "split_ranges",
]

DEFAULT_BYTES_PER_PACK = 256 * 1024
"""Default fusion threshold in bytes (256 KiB; see docs/benchmarks_allreduce.md)."""

DEFAULT_SNAP_TOLERANCE = 0.25
"""How far (fraction of an ideal shard) a shard boundary may move to meet a tensor edge."""

Fragment = collections.namedtuple("Fragment", ["pack", "start", "end", "tensor"])
Fragment.__doc__ = """Elements ``[start, end)`` of fused buffer number `pack`, as a 1-D `tensor`.

Attributes:
  pack: int, index of the buffer (a pack from `packing.pack`).
  start: int, first element (inclusive) of the pack that `tensor` holds.
  end: int, last element (exclusive); ``tensor.shape == [end - start]``.
  tensor: 1-D `tf.Tensor` placed on the device that holds this fragment.
"""


@dataclasses.dataclass(frozen=True)
class FusionPlan:
    """Per-pack facts the primitives need: where to cut and which dtypes to use.

    Attributes:
      cut_points: tuple (one per pack) of sorted tuples of element offsets at which a
        pack may be cut without splitting a tensor (the tensors' start offsets and the
        pack's end).
      wire_dtypes: tuple of `tf.DType`, the dtype each pack travels in.
      accum_dtypes: tuple of `tf.DType`, the dtype each pack is summed in.
      alignment: tuple of ints, the element granularity of a cut inside a tensor
        (64 bytes worth).
      snap_tolerance: float in [0, 1]: a shard boundary moves to the nearest tensor edge
        when that is within this fraction of an ideal shard, else it cuts the tensor
        (which is then re-assembled with one concat per device).
    """

    cut_points: tuple
    wire_dtypes: tuple
    accum_dtypes: tuple
    alignment: tuple
    snap_tolerance: float = DEFAULT_SNAP_TOLERANCE

    @classmethod
    def from_spec(cls, spec, compression=None, snap_tolerance=DEFAULT_SNAP_TOLERANCE):
        """Builds the plan for the packs described by `spec` (a `packing.PackSpec`)."""
        cuts = [{0, size} for size in spec.pack_sizes]
        for slot in spec.slots:
            cuts[slot.pack].add(slot.offset)
        wire, accum, align = [], [], []
        for dtype in spec.pack_dtypes:
            w = packing.wire_dtype(dtype, compression)
            a = packing.accumulation_dtype(w)
            if a.size < dtype.size:  # float64 sent as 16-bit: still summed in float64.
                a = dtype
            wire.append(w)
            accum.append(a)
            align.append(max(1, packing.DEFAULT_ALIGNMENT_BYTES // min(dtype.size, w.size)))
        return cls(tuple(tuple(sorted(c)) for c in cuts), tuple(wire), tuple(accum),
                   tuple(align), snap_tolerance)


def split_ranges(ranges, num_shards, plan):
    """Cuts an ordered list of pack ranges into `num_shards` balanced contiguous shards.

    The ranges are viewed as one stream of elements; the ideal boundaries are at
    ``k * total / num_shards``. Each boundary moves to the nearest tensor edge
    (`FusionPlan.cut_points`) when that is within ``plan.snap_tolerance`` of an ideal
    shard, so no tensor is split and the all-gathered tensors need no re-assembly;
    otherwise it cuts inside a tensor at an aligned offset. Pure Python.

    Args:
      ranges: sequence of ``(pack, start, end)`` int tuples, in stream order.
      num_shards: int >= 1.
      plan: a `FusionPlan`.

    Returns:
      A list of `num_shards` lists of ``(pack, start, end)``; concatenated in order they
      equal `ranges` (empty ranges dropped). A shard may be empty.
    """
    ranges = [r for r in ranges if r[2] > r[1]]
    total = sum(e - s for _, s, e in ranges)
    if num_shards == 1 or total == 0:
        return [ranges] + [[] for _ in range(num_shards - 1)]
    # Stream offset of each range, and every allowed (tensor-edge) stream position.
    offsets, candidates, pos = [], [], 0
    for p, s, e in ranges:
        offsets.append(pos)
        candidates.extend(pos + c - s for c in plan.cut_points[p] if s <= c <= e)
        candidates.extend((pos, pos + e - s))
        pos += e - s
    candidates = sorted(set(candidates))
    ideal_size = total / num_shards
    cuts = []
    for k in range(1, num_shards):
        ideal = k * ideal_size
        i = bisect.bisect_left(candidates, ideal)
        near = [c for c in candidates[max(0, i - 1) : i + 1]]
        best = min(near, key=lambda c: abs(c - ideal))
        if abs(best - ideal) <= plan.snap_tolerance * ideal_size:
            cut = best
        else:  # Cut inside a tensor, at an aligned offset of its pack.
            r = bisect.bisect_right(offsets, ideal) - 1
            p, s, e = ranges[r]
            local_offset = int(ideal - offsets[r]) + s
            local_offset -= local_offset % plan.alignment[p]
            cut = offsets[r] + min(max(local_offset, s), e) - s
        cuts.append(max(cut, cuts[-1] if cuts else 0))
    bounds = [0] + cuts + [total]
    shards = []
    for k in range(num_shards):
        lo, hi = bounds[k], bounds[k + 1]
        shard = []
        for (p, s, e), o in zip(ranges, offsets):
            a, b = max(lo, o), min(hi, o + e - s)
            if a < b:
                shard.append((p, s + a - o, s + b - o))
        shards.append(shard)
    return shards


def _check_group(fragments, devices):
    if len(fragments) != len(devices) or not devices:
        raise ValueError(
            "Arguments `fragments` and `devices` must be non-empty and of equal length. "
            f"Received: len(fragments)={len(fragments)}, len(devices)={len(devices)}"
        )
    layout = [(f.pack, f.start, f.end) for f in fragments[0]]
    for member in fragments[1:]:
        if [(f.pack, f.start, f.end) for f in member] != layout:
            raise ValueError(
                "Argument `fragments` must hold the same (pack, start, end) layout on "
                "every member of the group"
            )
    return layout


def _slice(t, start, end):
    """``t[start:end]`` without an op when the slice is the whole tensor."""
    if start == 0 and end == int(t.shape[0]):
        return t
    return t[start:end]


def _sum(tensors, accum_dtype):
    tensors = [packing.decompress(t, accum_dtype) for t in tensors]
    return tensors[0] if len(tensors) == 1 else tf.math.add_n(tensors)


def reduce_scatter(fragments, devices, plan, finalize=None):
    """Sums the members' buffers so that member ``k`` owns shard ``k`` of the sum.

    The common layout is cut with `split_ranges`; each piece of shard ``k`` is sliced on
    every source device and summed (in the pack's accumulation dtype) on ``devices[k]``.
    Each member sends ``(k - 1) / k`` of its data; the additions are spread evenly.

    Args:
      fragments: list of ``k`` lists of `Fragment` with one common
        ``(pack, start, end)`` layout, ``fragments[i]`` on ``devices[i]``.
      devices: list of ``k`` device names, the group.
      plan: the `FusionPlan` of the packs.
      finalize: optional ``f(tensor, pack) -> tensor`` applied to each summed piece on
        its owner (e.g. scale for MEAN, cast to the wire dtype).

    Returns:
      A list of ``k`` lists of `Fragment`: member ``i``'s shard, on ``devices[i]``.

    Raises:
      ValueError: if `fragments` and `devices` differ in length or the layouts differ.
    """
    layout = _check_group(fragments, devices)
    shards = split_ranges(layout, len(devices), plan)
    owned = []
    for owner, shard in enumerate(shards):
        mine = []
        for p, s, e in shard:
            i = _find(layout, p, s, e)
            _, ls, _ = layout[i]
            pieces = []
            for src, member in enumerate(fragments):
                with tf.device(devices[src]):
                    pieces.append(_slice(member[i].tensor, s - ls, e - ls))
            with tf.device(devices[owner]):
                total = _sum(pieces, plan.accum_dtypes[p])
                if finalize is not None:
                    total = finalize(total, p)
            mine.append(Fragment(p, s, e, total))
        owned.append(mine)
    return owned


def _find(layout, p, s, e):
    for i, (lp, ls, le) in enumerate(layout):
        if lp == p and ls <= s and e <= le:
            return i
    raise AssertionError(f"range {(p, s, e)} not in layout")  # Unreachable.


def all_gather(fragments, devices, copy=True):
    """Sends every member's fragments to every member of the group.

    Args:
      fragments: list of ``k`` lists of `Fragment` (a member may hold zero or more),
        ``fragments[i]`` on ``devices[i]``.
      devices: list of ``k`` device names.
      copy: bool (default True): each received fragment is a ``tf.identity`` placed on
        the receiver (an explicit hop). False returns the senders' tensors themselves, for
        a last hop whose consumer (e.g. the unpacking slice and reshape) is placed on the
        receiver anyway: TF then inserts the transfer into that op, one op fewer per
        fragment.

    Returns:
      A list of ``k`` lists of `Fragment`: what member ``j`` holds afterwards, in member
      order (with `copy`, each on ``devices[j]``).

    Raises:
      ValueError: if `fragments` and `devices` differ in length.
    """
    if len(fragments) != len(devices):
        raise ValueError(
            "Arguments `fragments` and `devices` must have equal length. Received: "
            f"len(fragments)={len(fragments)}, len(devices)={len(devices)}"
        )
    gathered = []
    for dst, device in enumerate(devices):
        held = []
        for src, member_fragments in enumerate(fragments):
            for frag in member_fragments:
                if src == dst or not copy:
                    held.append(frag)
                else:
                    with tf.device(device):
                        held.append(frag._replace(tensor=tf.identity(frag.tensor)))
        gathered.append(held)
    return gathered


def all_reduce(fragments, devices, plan, finalize=None):
    """All-reduces the members' buffers: `reduce_scatter`, `finalize`, `all_gather`.

    Rabenseifner's reduce-scatter + all-gather: each member sends and receives
    ``2 (k - 1) / k`` of the data and performs ``1 / k`` of the additions.

    Args:
      fragments: list of ``k`` lists of `Fragment` with a common layout, ``fragments[i]``
        on ``devices[i]``.
      devices: list of ``k`` device names.
      plan: the `FusionPlan` of the packs.
      finalize: optional ``f(tensor, pack)`` applied to each summed piece on its owner
        before it is gathered.

    Returns:
      A list of ``k`` lists of `Fragment` covering the layout, list ``j`` on
      ``devices[j]``.

    Raises:
      ValueError: as `reduce_scatter`.
    """
    return all_gather(reduce_scatter(fragments, devices, plan, finalize), devices)


def two_level_all_reduce(fragments, devices, groups, plan, finalize=None, partial_finalize=None):
    """All-reduce in two levels: inside equal groups, then across them, shard by shard.

    The schedule shared by the 2D torus (groups = grid rows; Mikami et al., arXiv:1811.05233;
    Ying et al., arXiv:1811.06992) and the hierarchical all-reduce in reduce-scatter mode
    (groups = nodes; Jia et al., arXiv:1807.11205):

    1. reduce-scatter inside each group: its j-th member owns group shard j;
    2. all-reduce shard j across the groups, among their j-th members (a torus column, or
       the devices of local rank j);
    3. all-gather inside each group.

    A group of one member skips step 1 (and 3 is a no-op); a single group skips step 2.
    Every group cuts the common layout identically, so the j-th members of all groups
    hold the same ranges in step 2.

    Args:
      fragments: list (one per device, replica order) of lists of `Fragment` with a common
        layout, ``fragments[i]`` on ``devices[i]``.
      devices: list of device names, one per replica.
      groups: list of equal-sized lists of replica indices partitioning
        ``range(len(devices))`` (the rows, or the nodes).
      plan: the `FusionPlan` of the packs.
      finalize: optional ``f(tensor, pack)`` applied once to each fully reduced piece on
        its owner (after step 2, or after step 1 when there is one group).
      partial_finalize: optional ``f(tensor, pack)`` applied to the partial sums of step 1
        before step 2 sends them (the cast back to the wire dtype).

    Returns:
      A list (one per device) of lists of `Fragment` covering the layout, list ``i`` on
      ``devices[i]``.

    Raises:
      ValueError: as `reduce_scatter`.
    """
    size = len(groups[0])
    single_group = len(groups) == 1
    # 1. Reduce-scatter inside each group.
    if size == 1:
        shards = [[fragments[group[0]]] for group in groups]
    else:
        shards = [
            reduce_scatter(
                [fragments[k] for k in group],
                [devices[k] for k in group],
                plan,
                finalize=finalize if single_group else partial_finalize,
            )
            for group in groups
        ]
    # 2. All-reduce shard j across the groups, among their j-th members.
    held = [None] * len(devices)
    for j in range(size):
        peers = [group[j] for group in groups]
        parts = [shards[m][j] for m in range(len(groups))]
        per_member = parts if single_group else all_reduce(
            parts, [devices[k] for k in peers], plan, finalize=finalize
        )
        for k, frags in zip(peers, per_member):
            held[k] = frags
    # 3. All-gather inside each group.
    result = [None] * len(devices)
    for group in groups:
        gathered = all_gather([held[k] for k in group], [devices[k] for k in group], copy=False)
        for k, frags in zip(group, gathered):
            result[k] = frags
    return result


def reduce(fragments, devices, root, plan, finalize=None):
    """Sums the members' buffers onto ``devices[root]``.

    Args:
      fragments: list of ``k`` lists of `Fragment` with a common layout, ``fragments[i]``
        on ``devices[i]``.
      devices: list of ``k`` device names.
      root: int in ``[0, k)``, the member that receives the sum.
      plan: the `FusionPlan` of the packs.
      finalize: optional ``f(tensor, pack)`` applied to each sum on the root.

    Returns:
      A list of `Fragment` (the layout) on ``devices[root]``.

    Raises:
      ValueError: if `root` is out of range, or as `reduce_scatter`.
    """
    layout = _check_group(fragments, devices)
    if not 0 <= root < len(devices):
        raise ValueError(
            f"Argument `root` must be in [0, {len(devices)}). Received: root={root}"
        )
    out = []
    for i, (p, s, e) in enumerate(layout):
        with tf.device(devices[root]):
            total = _sum([member[i].tensor for member in fragments], plan.accum_dtypes[p])
            if finalize is not None:
                total = finalize(total, p)
        out.append(Fragment(p, s, e, total))
    return out


def broadcast(fragments, root, devices, copy=True):
    """Sends the fragments held by ``devices[root]`` to every member.

    Args:
      fragments: list of `Fragment` held by ``devices[root]``.
      root: int in ``[0, k)``.
      devices: list of ``k`` device names.
      copy: bool, as in `all_gather`.

    Returns:
      A list of ``k`` lists of `Fragment`, list ``j`` on ``devices[j]`` (the root's
      unchanged, the others one ``tf.identity`` hop).
    """
    per_member = [[] for _ in devices]
    per_member[root] = list(fragments)
    return all_gather(per_member, devices, copy=copy)


def _devices_of(value):
    return tuple(v.device for v in value.values)


def _destination_devices(destinations):
    return tuple(_cross_device_ops_lib.get_devices_from(destinations))


def _same_devices(a, b):
    canon = tf.DeviceSpec.from_string
    return len(a) == len(b) and all(canon(x) == canon(y) for x, y in zip(a, b))


def _mirrored(tensors):
    return _distribute_utils.regroup(tuple(tensors), wrap_class=_values_lib.Mirrored)


def _is_sparse(value):
    return isinstance(value.values[0], tf.IndexedSlices)


class LocalAllReduce(tf.distribute.CrossDeviceOps):
    """Base class of tfscale's one-process all-reduce `tf.distribute.CrossDeviceOps`.

    It does what is common to `TorusAllReduce` and `HierarchicalAllReduce`:

    1. Dense float values whose destinations are their own devices (an all-reduce, which
       is what Keras's gradient aggregation under `MirroredStrategy` asks for) are fused
       per device with `packing.pack` into buffers of about `bytes_per_pack` bytes,
       cast to the wire dtype (`compression`), all-reduced by the subclass's
       `_all_reduce_fragments` schedule, cast back and unpacked on every device; MEAN is a
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
      ValueError: if `bytes_per_pack` < 0 or `compression` is unknown.
    """

    def __init__(self, bytes_per_pack=DEFAULT_BYTES_PER_PACK, compression=None):
        super().__init__()
        if isinstance(bytes_per_pack, bool) or not isinstance(bytes_per_pack, int):
            raise TypeError(
                "Argument `bytes_per_pack` must be an int. "
                f"Received: bytes_per_pack={bytes_per_pack!r}"
            )
        if bytes_per_pack < 0:
            raise ValueError(
                "Argument `bytes_per_pack` must be >= 0. "
                f"Received: bytes_per_pack={bytes_per_pack}"
            )
        self.bytes_per_pack = bytes_per_pack
        self.compression = packing.validate_compression(compression)
        self.num_batch_reduce_calls = 0
        self.num_reduced_tensors = 0
        self._fallback = tf.distribute.ReductionToOneDevice()

    # ----------------------------------------------------------- subclass interface
    def _check_num_devices(self, num_devices):
        """Raises ValueError if the schedule cannot run on `num_devices` devices."""

    def _all_reduce_fragments(self, fragments, devices, plan, finalize):
        """The schedule: all-reduces the fused buffers of every device.

        Args:
          fragments: list (one per device, replica order) of lists of `Fragment`, one
            per non-empty pack, in the wire dtype, ``fragments[i]`` on ``devices[i]``.
          devices: the replica devices.
          plan: the `FusionPlan`.
          finalize: ``f(tensor, pack)``, to apply once to each fully reduced piece, on
            its owner (MEAN scaling and the cast to the wire dtype).

        Returns:
          A list (one per device) of lists of `Fragment` covering every pack, on that
          device.
        """
        raise NotImplementedError

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
                _destination_devices(dest), devices
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
        if not _same_devices(_destination_devices(destinations), devices):
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
        return _mirrored(gathered)

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
            _mirrored([outputs_by_device[d][i] for d in range(num_devices)])
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
        return _mirrored(outputs)
