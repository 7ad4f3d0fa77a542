"""One-process collective primitives over groups of devices, and the fusion plan.

The in-process backend (`tfscale.distribute.local`) runs every phase of an all-reduce
`Schedule` (`tfscale.distribute.algorithms`) with these primitives, which move 1-D buffers
between the devices of one process (GPUs, TPU cores or logical CPUs under
`tf.distribute.MirroredStrategy`):

* `reduce_scatter`: member ``k`` of a group ends up owning shard ``k`` of the sum (each
  member sends each shard straight to its owner: a "direct" reduce-scatter);
* `all_reduce`: `reduce_scatter` then `all_gather`;
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
"""

import bisect
import collections
import dataclasses

import tensorflow as tf

from tfscale.distribute import packing

__all__ = [
    "DEFAULT_SNAP_TOLERANCE",
    "Fragment",
    "FusionPlan",
    "all_gather",
    "all_reduce",
    "broadcast",
    "reduce",
    "reduce_scatter",
    "split_ranges",
]

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
