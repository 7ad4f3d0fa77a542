"""All-reduce algorithms as data: a `Schedule` is a list of `Phase`s over groups of ranks.

Pure Python, no TensorFlow. An all-reduce algorithm (the 2D torus, hierarchical,
halving-doubling, a flat all-reduce) is described once, as the sequence of collectives it
makes, and three kinds of code consume that one description:

* the backends that run it: one process with explicit device placement
  (`tfscale.distribute.local`), TF's collective ops across processes
  (`tfscale.distribute.collective`), and Horovod process sets;
* the cost model that prices it (`tfscale.planning.cost_model.schedule_cost`);
* the validator here (`Schedule.check`), which proves that a schedule leaves every rank
  with the sum of every rank's buffer.

This is the design of NCCL's tuner and Open MPI's ``coll/tuned``: the algorithm that is
costed is the algorithm that runs.

Semantics. Every rank starts with a full buffer of ``n`` elements. A phase is one
collective `kind` run at the same time by disjoint `groups` of ranks (a rank in no group
idles during the phase); ``member j`` of a group is ``group[j]``:

* ``reduce_scatter``: the members hold the same piece of the buffer; it is cut into
  ``len(group)`` contiguous shards and member ``j`` receives the sum of shard ``j``;
* ``all_reduce``: the members hold the same piece; each receives its sum;
* ``all_gather``: member ``j`` holds shard ``j`` of a piece (as a `reduce_scatter` over
  the same group left it); each receives the whole piece;
* ``reduce``: the members hold the same piece; member `root` receives its sum and the
  others drop out (hold nothing) until a ``broadcast``;
* ``broadcast``: member `root`'s piece is copied to every member.

After the last phase every rank must hold the whole buffer summed over all ranks;
`Schedule.check` verifies this symbolically and computes the fraction of the buffer that
each phase acts on (`Schedule.shard_fractions`), which is what the cost model needs.
"""

import dataclasses
import fractions

from tfscale.distribute import validation

__all__ = [
    "ALL_GATHER",
    "ALL_REDUCE",
    "BROADCAST",
    "KINDS",
    "Phase",
    "REDUCE",
    "REDUCE_SCATTER",
    "REDUCING_KINDS",
    "Schedule",
]

REDUCE_SCATTER = "reduce_scatter"
ALL_REDUCE = "all_reduce"
ALL_GATHER = "all_gather"
REDUCE = "reduce"
BROADCAST = "broadcast"
KINDS = (REDUCE_SCATTER, ALL_REDUCE, ALL_GATHER, REDUCE, BROADCAST)
"""The collective kinds a `Phase` may have."""
REDUCING_KINDS = (REDUCE_SCATTER, ALL_REDUCE, REDUCE)
"""The kinds that add buffers (the others only move them)."""


@dataclasses.dataclass(frozen=True)
class Phase:
    """One collective run at once by disjoint groups of ranks.

    Attributes:
      kind: one of `KINDS`.
      groups: tuple of tuples of int ranks; pairwise disjoint, each of >= 2 ranks, all of
        the same size. Member ``j`` of a group is ``group[j]``.
      root: int, the member index (not the rank) that receives a ``reduce`` or sends a
        ``broadcast``; 0 for the other kinds.
      tier: str, a label of what the phase crosses, for tables and logs (``"row"``,
        ``"column"``, ``"intra_node"``, ``"inter_node"``, ``"world"``, ``"pairs/4"``).

    Raises:
      ValueError: for an unknown kind, empty, overlapping or unequal groups, a group of
        fewer than 2 ranks, or a root outside the groups.
      TypeError: if a rank is not an int.
    """

    kind: str
    groups: tuple
    root: int = 0
    tier: str = ""

    def __post_init__(self):
        validation.check_choice("kind", self.kind, KINDS)
        groups = tuple(tuple(validation.as_int("rank", r) for r in g) for g in self.groups)
        if not groups:
            raise ValueError(f"Argument `groups` of a {self.kind} phase must not be empty. Received: groups=()")
        sizes = {len(g) for g in groups}
        if len(sizes) != 1 or min(sizes) < 2:
            raise ValueError(
                f"Argument `groups` of a {self.kind} phase must all have the same size >= 2. "
                f"Received: group sizes {sorted(len(g) for g in groups)}"
            )
        seen = set()
        for g in groups:
            for r in g:
                if r < 0 or r in seen:
                    raise ValueError(
                        f"Argument `groups` of a {self.kind} phase must hold distinct ranks >= 0. "
                        f"Received: rank {r} in groups={groups}"
                    )
                seen.add(r)
        root = validation.as_int("root", self.root)
        if not 0 <= root < len(groups[0]):
            raise ValueError(f"Argument `root` must be a member index in [0, {len(groups[0])}). Received: root={root}")
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "root", root)

    @property
    def group_size(self):
        """int: the number of members of each group."""
        return len(self.groups[0])

    @property
    def ranks(self):
        """frozenset of int: the ranks taking part in this phase."""
        return frozenset(r for g in self.groups for r in g)

    def position(self, rank):
        """Returns ``(group_index, member_index)`` of `rank`, or None if it idles."""
        for i, g in enumerate(self.groups):
            if rank in g:
                return i, g.index(rank)
        return None

    def describe(self):
        """str: e.g. ``"reduce_scatter over 2 groups of 4 (row)"``."""
        root = f", root member {self.root}" if self.kind in (REDUCE, BROADCAST) else ""
        tier = f" ({self.tier})" if self.tier else ""
        return f"{self.kind} over {len(self.groups)} group(s) of {self.group_size}{tier}{root}"


@dataclasses.dataclass(frozen=True)
class _Held:
    """What one rank holds during the symbolic check: a piece of the buffer and whose sum."""

    path: tuple  # ((member index, group size), ...) of the reduce-scatters that cut this piece
    contributors: frozenset


@dataclasses.dataclass(frozen=True)
class Schedule:
    """An all-reduce algorithm instantiated for a number of ranks: its phases, in order.

    Built by a registered builder (`tfscale.distribute.algorithms.build_schedule`), never
    by a backend: a schedule does not know how it will be run.

    Attributes:
      algorithm: str, the registered name it was built from.
      num_ranks: int >= 1.
      phases: tuple of `Phase`; empty for one rank.
      params: tuple of ``(name, value)`` pairs, the topology parameters it was built with
        (e.g. ``(("grid_shape", (2, 4)),)``).
      shard_fractions: tuple of `fractions.Fraction`, one per phase: the fraction of the
        whole buffer that each participating rank holds when the phase starts (1 for the
        torus's row reduce-scatter, ``1/cols`` for its column all-reduce). Computed.

    Raises:
      ValueError: if the phases do not leave every rank with the full sum (see `check`),
        or a rank is outside ``[0, num_ranks)``.
    """

    algorithm: str
    num_ranks: int
    phases: tuple
    params: tuple = ()
    shard_fractions: tuple = dataclasses.field(default=(), compare=False)

    def __post_init__(self):
        object.__setattr__(self, "num_ranks", validation.check_positive_int("num_ranks", self.num_ranks))
        phases = tuple(self.phases)
        for p in phases:
            if not isinstance(p, Phase):
                raise TypeError(f"Argument `phases` must hold Phase objects. Received: {p!r}")
            bad = [r for r in p.ranks if r >= self.num_ranks]
            if bad:
                raise ValueError(
                    f"Phase {p.describe()} names rank {bad[0]}, but num_ranks={self.num_ranks}"
                )
        object.__setattr__(self, "phases", phases)
        object.__setattr__(self, "params", tuple(self.params))
        object.__setattr__(self, "shard_fractions", self.check())

    def param(self, name, default=None):
        """Returns the value of topology parameter `name` (or `default`)."""
        return dict(self.params).get(name, default)

    @property
    def last_reduction(self):
        """int: index of the last phase that adds (-1 if none): after it, sums are final."""
        idx = [i for i, p in enumerate(self.phases) if p.kind in REDUCING_KINDS]
        return idx[-1] if idx else -1

    def check(self):
        """Verifies symbolically that the phases all-reduce; returns `shard_fractions`.

        Each rank's holding is tracked as (which piece of the buffer, whose contributions
        it sums). The rules of each kind are those of the module docstring.

        Returns:
          tuple of `fractions.Fraction`, one per phase (see the attribute).

        Raises:
          ValueError: naming the phase and the rank where the rules break, or the rank
            that does not end with the whole buffer summed over every rank.
        """
        held = {r: _Held((), frozenset([r])) for r in range(self.num_ranks)}
        shares = []
        for index, phase in enumerate(self.phases):
            where = f"phase {index} ({phase.describe()}) of {self.algorithm!r}"
            share = None
            new = dict(held)
            for group in phase.groups:
                states = [held[r] for r in group]
                k = len(group)
                if phase.kind in (REDUCE_SCATTER, ALL_REDUCE, REDUCE):
                    if any(s is None for s in states) or len({s.path for s in states}) != 1:
                        raise ValueError(f"{where}: the members {list(group)} do not hold the same piece")
                    if any(a.contributors & b.contributors for i, a in enumerate(states) for b in states[i + 1:]):
                        raise ValueError(f"{where}: the members {list(group)} would add a contribution twice")
                    total = frozenset().union(*(s.contributors for s in states))
                    path = states[0].path
                    share = _fraction(path)
                    for j, r in enumerate(group):
                        if phase.kind == REDUCE_SCATTER:
                            new[r] = _Held(path + ((j, k),), total)
                        elif phase.kind == ALL_REDUCE or j == phase.root:
                            new[r] = _Held(path, total)
                        else:
                            new[r] = None
                elif phase.kind == ALL_GATHER:
                    if any(s is None or not s.path or s.path[-1] != (j, k) for j, s in enumerate(states)):
                        raise ValueError(f"{where}: member j of {list(group)} must hold shard j of a {k}-way reduce-scatter")
                    if len({s.path[:-1] for s in states}) != 1 or len({s.contributors for s in states}) != 1:
                        raise ValueError(f"{where}: the members {list(group)} hold shards of different pieces or sums")
                    share = _fraction(states[0].path)
                    for r in group:
                        new[r] = _Held(states[0].path[:-1], states[0].contributors)
                else:  # BROADCAST
                    source = states[phase.root]
                    if source is None:
                        raise ValueError(f"{where}: the root rank {group[phase.root]} holds nothing to broadcast")
                    share = _fraction(source.path)
                    for r in group:
                        new[r] = source
            held = new
            shares.append(share)
        everyone = frozenset(range(self.num_ranks))
        for r, s in held.items():
            if s is None or s.path or s.contributors != everyone:
                raise ValueError(
                    f"Schedule {self.algorithm!r} for num_ranks={self.num_ranks} is not an all-reduce: "
                    f"rank {r} ends with {'nothing' if s is None else f'piece {s.path} summed over {sorted(s.contributors)}'}"
                )
        return tuple(shares)

    def for_small_messages(self):
        """Returns the latency-bound variant: each reduce-scatter becomes an all-reduce over
        the same groups, and the all-gathers that undo them are dropped.

        Fewer collective calls (the torus makes 2 instead of 3: row all-reduce, column
        all-reduce; halving-doubling becomes recursive doubling) at the price of more bytes;
        the backends use it for packs below their small-pack threshold, where the cost of a
        call dominates.

        Returns:
          A `Schedule` (this one if it has no reduce-scatter).
        """
        if not any(p.kind == REDUCE_SCATTER for p in self.phases):
            return self
        phases = []
        for p in self.phases:
            if p.kind == ALL_GATHER:
                continue
            if p.kind == REDUCE_SCATTER:
                p = dataclasses.replace(p, kind=ALL_REDUCE)
            phases.append(p)
        return Schedule(self.algorithm, self.num_ranks, tuple(phases), self.params)

    def describe(self):
        """str: one line per phase, with the fraction of the buffer it acts on."""
        params = ", ".join(f"{k}={v}" for k, v in self.params)
        lines = [f"{self.algorithm}({params}) on {self.num_ranks} ranks: {len(self.phases)} phase(s)"]
        for i, (p, f) in enumerate(zip(self.phases, self.shard_fractions)):
            lines.append(f"  {i}. {p.describe()} on {f} of the buffer")
        return "\n".join(lines)


def _fraction(path):
    f = fractions.Fraction(1)
    for _, k in path:
        f /= k
    return f
