"""One rank's walk through a `Schedule`: the phase logic shared by the backends that run across processes.

`tfscale.distribute.collective` (TF's collective ops under ``MultiWorkerMirroredStrategy``) and
`tfscale.distribute.horovod` (Horovod process sets) both run a schedule of the registry the same way: each
process is one rank, walks the phases in order, skips the phases where it idles, and for each phase it takes part
in calls one collective over its group. What differs is only how a collective is made; that is the backend's
`RankCollectives`. Everything else is here, once:

* the wire dtypes: every data-movement collective (reduce-scatter input, all-gather) carries the pack's wire
  dtype (`packing.wire_dtype`: the compression's, or the pack's own), and every all-reduce one fixed dtype (the
  compression's; float32 for bf16 compression, which neither TF's collective reduce kernels nor Horovod has),
  whatever the rank's partial sum, so that ranks that took part in different phases before (the fold of a
  non-power-of-two halving-doubling) send the same dtype; local sums are in the accumulation dtype (float32 for
  16-bit packs, `packing.accumulation_dtype`);
* the padding of a reduce-scatter to ``k`` equal chunks (zeros, which sum to zero) and its trimming at the
  matching all-gather;
* ``reduce`` as an all-reduce whose result the non-roots drop, and ``broadcast`` as the backend's
  `RankCollectives.broadcast` (by default an all-reduce to which the non-roots contribute zeros): correct, not
  bandwidth-optimal;
* the choice between the schedule and its small-message variant (`Schedule.for_small_messages`) by pack size.

With compression ``u`` (``2**-11`` for fp16, ``2**-8`` for bf16), a value is rounded once on input, once per
reducing phase that is not the last, and once for the result: 3 times for the torus and hierarchical schedules,
so the sum ``S`` of the ranks' ``x_i`` satisfies ``|S_hat - S| <= 3 u sum_i |x_i|`` to first order (fp16
overflows to inf above 65504).
"""

import tensorflow as tf

from tfscale.distribute import packing
from tfscale.distribute.algorithms import schedule as schedule_lib

__all__ = ["RankCollectives", "run_rank_schedule", "run_rank_schedules"]


class RankCollectives:
    """How one backend makes the collectives of a phase, for one rank (the interface `run_rank_schedule` calls).

    Every method is called by every member of `group` with tensors of the same shape and dtype, in the same
    order on every member; `member` is this rank's index in `group` (member ``j`` is ``group[j]``); `key` is a
    string that is the same on every member for the same collective and different for any two collectives of
    one walk (``"<pack>/<phase>"``), for backends that match collectives by name.
    """

    def reduce_scatter(self, t, group, member, key, acc_dtype):
        """Sums `t` over `group` and returns this member's chunk.

        Args:
          t: 1-D tensor of ``k * chunk`` elements (``k = len(group)``), in the pack's wire dtype.
          group: tuple of int ranks.
          member: int, this rank's index in `group`.
          key: str, the collective's name (see the class docstring).
          acc_dtype: `tf.DType`, the accumulation dtype, for a backend that sums locally.

        Returns:
          1-D tensor of ``chunk`` elements: the sum over the group of chunk `member`, in `acc_dtype` or the wire
          dtype (the walker casts it to `acc_dtype`).
        """
        raise NotImplementedError

    def all_gather(self, t, group, member, key):
        """Concatenates the members' `t` (member order); 1-D in, 1-D of ``k`` times the length out, same dtype."""
        raise NotImplementedError

    def all_reduce(self, t, group, member, key):
        """Sums `t` over `group`; returns a tensor of `t`'s shape and dtype."""
        raise NotImplementedError

    def broadcast(self, t, group, member, root, key):
        """Copies member `root`'s `t` to every member of `group`.

        Every member passes a tensor of the same shape and dtype; only the root's values matter (the others pass
        what they last held, which a backend may send unread). The default is an all-reduce in which the other
        members contribute zeros: correct with any backend that has an all-reduce, not bandwidth-optimal.
        Backends whose collectives must not take a constant input (Horovod's would be run once by TF's constant
        folding while the graph is optimised) override it.

        Returns:
          A tensor of `t`'s shape and dtype holding the root's values.
        """
        if member != root:
            t = tf.zeros_like(t)
        return self.all_reduce(t, group, member, key)


def run_rank_schedule(x, rank, schedule, small_schedule, collectives, compression=None, small_pack_bytes=0,
                      key_prefix=""):
    """Runs `schedule` (or `small_schedule`, for a small pack) on one rank's pack `x`; returns the sum over ranks.

    Args:
      x: 1-D floating-point `tf.Tensor`, this rank's pack (`packing.pack`), the same length and dtype on every
        rank.
      rank: int, this rank's id in ``[0, schedule.num_ranks)``.
      schedule: the `tfscale.distribute.algorithms.Schedule` run on packs of at least `small_pack_bytes` bytes.
      small_schedule: the `Schedule` run on smaller packs (usually ``schedule.for_small_messages()``).
      collectives: the backend's `RankCollectives`.
      compression: None, ``"fp16"`` or ``"bf16"`` (see `packing.validate_compression`): the wire dtype of
        float32/float64 values.
      small_pack_bytes: int >= 0, bytes; 0 never picks `small_schedule`.
      key_prefix: str, prepended to every collective's key (e.g. the pack index).

    Returns:
      A 1-D tensor of `x`'s length and dtype: the element-wise sum over all ranks.
    """
    return run_rank_schedules([x], rank, schedule, small_schedule, collectives, compression=compression,
                              small_pack_bytes=small_pack_bytes, key_prefixes=[key_prefix])[0]


def run_rank_schedules(xs, rank, schedule, small_schedule, collectives, compression=None, small_pack_bytes=0,
                       key_prefixes=None):
    """Runs the schedule on several packs, phase-major: phase 1 of every pack, then phase 2 of every pack, ...

    The result is `run_rank_schedule` on each pack; only the order in which the collectives are issued differs.
    Issued phase by phase, pack ``p + 1``'s first phase comes before pack ``p``'s second, so a backend that lets
    collectives of different groups run at the same time (`tfscale.distribute.collective` on CPU: one ordering
    token per group) overlaps the slow tier with the fast one: while pack ``p`` crosses between nodes, pack
    ``p + 1`` is reduce-scattered inside them, as NCCL and Horovod pipeline their chunks. Every group still sees
    its collectives in the same order on every member, since every rank issues the same program.

    Args:
      xs: list of 1-D floating-point `tf.Tensor` packs (`packing.pack`), the same lengths and dtypes on every rank.
      rank, schedule, small_schedule, collectives, compression, small_pack_bytes: as `run_rank_schedule`.
      key_prefixes: None (``"<pack index>/"``) or one str per pack, prepended to its collectives' keys.

    Returns:
      list of 1-D tensors, the element-wise sums over all ranks, one per pack, in `xs`'s lengths and dtypes.

    Raises:
      ValueError: if `key_prefixes` does not have one entry per pack.
    """
    xs = list(xs)
    if key_prefixes is None:
        key_prefixes = [f"{i}/" for i in range(len(xs))]
    if len(key_prefixes) != len(xs):
        raise ValueError(f"Argument `key_prefixes` must have one entry per pack ({len(xs)}). "
                         f"Received: {len(key_prefixes)} entries")
    walks = [_walk(x, rank, schedule, small_schedule, collectives, compression, small_pack_bytes, prefix)
             for x, prefix in zip(xs, key_prefixes)]
    results = [None] * len(xs)
    active = list(range(len(xs)))
    while active:
        for i in list(active):
            try:
                next(walks[i])
            except StopIteration as done:
                results[i] = done.value
                active.remove(i)
    return results


def _walk(x, rank, schedule, small_schedule, collectives, compression, small_pack_bytes, key_prefix):
    """`run_rank_schedule` on one pack as a generator: yields after each phase; returns the sum."""
    dtype = x.dtype
    acc = packing.accumulation_dtype(dtype)
    wire_dtype = packing.wire_dtype(dtype, compression)
    # All-reduces add on the wire: in the compression's dtype when there is one (no bfloat16 reduction kernels:
    # then float32), else in the accumulation dtype (float32 for 16-bit packs).
    reduce_comp = None if wire_dtype == tf.bfloat16 else compression
    reduce_dtype = packing.wire_dtype(acc, reduce_comp)
    small = int(x.shape[0]) * dtype.size < small_pack_bytes
    sched = small_schedule if small else schedule
    t = x
    lengths = []  # Length before each reduce-scatter, to trim the padding at its all-gather.
    dropped = None  # What a non-root held after a `reduce` (its sum, unused), until the `broadcast`.
    for index, phase in enumerate(sched.phases):
        where = phase.position(rank)
        if where is None:
            yield  # Idle phases count too: every rank then issues in (phase, pack) order, whatever it idles in.
            continue
        group = phase.groups[where[0]]
        member = where[1]
        k = len(group)
        key = f"{key_prefix}{'s' if small else ''}{index}"
        if phase.kind == schedule_lib.REDUCE_SCATTER:
            n = int(t.shape[0])
            wire = packing.decompress(t, wire_dtype)
            chunk = -(-n // k)
            if wire.dtype == tf.bfloat16:
                chunk += chunk % 2  # Even, so that backends can bit-cast pairs of bf16 into int32.
            if chunk * k != n:
                wire = tf.pad(wire, [[0, chunk * k - n]])
            t = packing.decompress(collectives.reduce_scatter(wire, group, member, key, acc), acc)
            lengths.append(n)
        elif phase.kind == schedule_lib.ALL_GATHER:
            n = lengths.pop()
            chunk = int(t.shape[0])
            full = tf.reshape(collectives.all_gather(packing.decompress(t, wire_dtype), group, member, key),
                              [k * chunk])
            t = full[:n] if k * chunk != n else full
        elif phase.kind == schedule_lib.BROADCAST:
            held = t if member == phase.root else dropped
            t = packing.decompress(
                collectives.broadcast(packing.decompress(held, reduce_dtype), group, member, phase.root, key), acc)
        else:  # all_reduce, reduce: one all-reduce of the group (a reduce's non-roots drop the result).
            t = packing.decompress(collectives.all_reduce(packing.decompress(t, reduce_dtype), group, member, key),
                                   acc)
            if phase.kind == schedule_lib.REDUCE and member != phase.root:
                dropped, t = t, None
        yield
    return packing.decompress(t, dtype)
