"""The latency-bandwidth-compute (alpha-beta-gamma) cost of all-reduce algorithms.

Pure Python, no TensorFlow. Every collective is a sequence of synchronous steps; in one
step each worker sends one chunk of ``m`` bytes to one peer and (in a reduce step) adds
the chunk it receives. One step costs ``alpha + m * beta (+ m * gamma)``: Hockney's model
("The communication challenge for MPP: Intel Paragon and Meiko CS-2", Parallel Computing
20(3), 1994) with the reduction term of Thakur, Rabenseifner and Gropp ("Optimization of
Collective Communication Operations in MPICH", IJHPCA 19(1), 2005). For N workers and an
``n``-byte buffer on each, the closed forms on one uniform link are:

=====================  ==============================  =============================  ===================
algorithm              alpha term (sequential steps)   beta term (bytes per worker)   gamma term
=====================  ==============================  =============================  ===================
ring                   2(N-1)                          2(N-1)/N * n                   (N-1)/N * n
2D torus R x C         2(C-1) + 2(R-1)                 2(N-1)/N * n                   (N-1)/N * n
halving-doubling       2 log2 N                        2(N-1)/N * n                   (N-1)/N * n
hierarchical (k/node)  2(k-1) + inter-node steps       as the torus with C = k         as the torus
=====================  ==============================  =============================  ===================

(halving-doubling: N a power of two; otherwise two extra steps of the full ``n`` bytes.)
The ring's bandwidth term is optimal for any all-reduce on a tree or ring topology
(Patarasuk and Yuan, "Bandwidth optimal all-reduce algorithms for clusters of
workstations", J. Parallel Distrib. Comput. 69(2), 2009). The 2D torus keeps those bytes
and cuts the steps (Mikami et al., "Massively Distributed SGD", arXiv:1811.05233; Ying et
al., "Image Classification at Supercomputer Scale", arXiv:1811.06992).

On a `Cluster` the links differ: each step's alpha is the largest latency any message in
that step pays, and its beta the slowest flow: the intra-node beta, or the inter-node beta
times the number of messages leaving one node at once (they share its network cards).
Ranks are node-major, so a flat ring crosses each node boundary once per step while, for
example, the column phase of a torus whose rows fill a node sends one message per column.
All the formulas above are exactly what this module computes when all links are equal.

Launch overhead: each phase of a schedule is a separate collective call per pack (the
flat all-reduce makes 1, the torus and hierarchical 3: reduce-scatter, all-reduce,
all-gather; halving-doubling ``2 log2 N``) and also pays a fixed
``delta = cluster.launch_overhead_s`` (0 by default; the single-machine calibration
measures it).

One definition: the algorithms are not described here. Every cost is computed from the
`Schedule` object (`tfscale.distribute.algorithms`) that the backends execute, phase by
phase (`schedule_cost`); the closed forms above are what that gives on one uniform link.

Fusion: a buffer sent as ``P`` packs (``bytes_per_pack``) pays the alpha and delta terms
``P`` times and the beta and gamma terms once over all bytes (packs run one after the
other, no overlap). Compression: sending float16/bfloat16 instead of float32 halves the wire bytes
(and the gamma term, which counts added wire bytes).
"""

import collections
import collections.abc
import dataclasses
import functools
import math

from tfscale.distribute import algorithms
from tfscale.planning import cluster as cluster_lib

__all__ = [
    "ALGORITHMS",
    "AllReduceCost",
    "allreduce_cost",
    "grid_shapes",
    "halving_doubling_allreduce_cost",
    "hierarchical_allreduce_cost",
    "num_packs",
    "phase_steps",
    "ring_allreduce_cost",
    "schedule_coefficients",
    "schedule_cost",
    "torus_allreduce_cost",
    "wire_bytes",
]

_WIRE_DTYPE_BYTES = {None: None, "float32": 4, "float16": 2, "bfloat16": 2, "fp16": 2, "bf16": 2}


@dataclasses.dataclass(frozen=True)
class AllReduceCost:
    """The predicted cost of one all-reduce of a buffer on every worker.

    Attributes:
      algorithm: str, a registered algorithm name (``"flat"``, ``"torus"``,
        ``"hierarchical"``, ``"halving_doubling"``, ...; `tfscale.distribute.algorithms`).
      num_workers: int, N.
      grid_shape: ``(rows, cols)`` for the torus, ``(num_nodes, accelerators_per_node)``
        for hierarchical, None otherwise.
      num_steps: int, sequential communication steps of ONE pack (the number that
        multiplies alpha): ``2(N-1)`` for the ring, ``2(rows-1) + 2(cols-1)`` for the torus.
      num_packs: int >= 1, how many all-reduces the buffer was split into (fusion).
      wire_bytes: float, bytes of the whole buffer on the wire on each worker (after
        compression), the ``n`` of the formulas.
      bytes_sent_per_worker: float, bytes each worker sends in total.
      latency_s: float, the alpha part, seconds (over all packs).
      bandwidth_s: float, the beta part, seconds.
      reduction_s: float, the gamma part, seconds.
      inter_algorithm: str or None, the across-node algorithm of ``"hierarchical"``
        (``"flat"``, i.e. a ring, or ``"halving_doubling"``).
      num_launches: int, collective calls per pack (1 for ring and halving-doubling, up
        to 3 for torus and hierarchical).
      launch_s: float, the delta part, seconds (``num_packs * num_launches * delta``).
      phases: tuple of str, the schedule's phases (`Phase.describe`), the same objects
        the backends run.
    """

    algorithm: str
    num_workers: int
    grid_shape: object
    num_steps: int
    num_packs: int
    wire_bytes: float
    bytes_sent_per_worker: float
    latency_s: float
    bandwidth_s: float
    reduction_s: float
    inter_algorithm: object = None
    num_launches: int = 0
    launch_s: float = 0.0
    phases: tuple = ()

    @property
    def total_s(self):
        """float: predicted seconds, ``latency_s + bandwidth_s + reduction_s + launch_s``."""
        return self.latency_s + self.bandwidth_s + self.reduction_s + self.launch_s

    @property
    def label(self):
        """str: a short name for tables, e.g. ``"torus 32x34"`` or ``"ring"``."""
        if self.algorithm == "torus":
            return f"torus {self.grid_shape[0]}x{self.grid_shape[1]}"
        if self.algorithm == "hierarchical":
            return f"hierarchical {self.grid_shape[0]}x{self.grid_shape[1]} ({self.inter_algorithm})"
        if self.algorithm == "flat":
            return "flat (ring)"
        return self.algorithm


def wire_bytes(num_bytes, value_bytes=4, compression=None):
    """Returns the bytes on the wire for `num_bytes` of values after compression.

    Args:
      num_bytes: number >= 0, bytes of the buffer in its own dtype.
      value_bytes: int, bytes per value of that dtype (4 for float32, 2 for
        float16/bfloat16). Default 4.
      compression: None (send as is), ``"float16"`` or ``"bfloat16"`` (2 bytes per value;
        halves a float32 buffer, leaves a 16-bit one alone) or ``"float32"``.

    Returns:
      float, ``num_bytes * min(value_bytes, wire value bytes) / value_bytes``.

    Raises:
      ValueError: for an unknown `compression`, a `value_bytes` not in (2, 4), or
        `num_bytes` < 0.
    """
    if compression not in _WIRE_DTYPE_BYTES:
        raise ValueError(
            f"Argument `compression` must be one of {list(_WIRE_DTYPE_BYTES)}. "
            f"Received: compression={compression!r}"
        )
    if value_bytes not in (2, 4):
        raise ValueError(f"Argument `value_bytes` must be 2 or 4. Received: value_bytes={value_bytes!r}")
    num_bytes = cluster_lib._check_number("num_bytes", num_bytes, 0.0)
    if compression is None:
        return num_bytes
    return num_bytes * min(value_bytes, _WIRE_DTYPE_BYTES[compression]) / value_bytes


def num_packs(num_bytes, bytes_per_pack=None):
    """Returns how many all-reduces a fused buffer of `num_bytes` makes.

    Args:
      num_bytes: number >= 0, bytes to all-reduce.
      bytes_per_pack: None or 0 (one pack: everything fused) or int > 0, the pack size in
        bytes (as `tf.distribute.experimental.CommunicationOptions(bytes_per_pack=...)` and
        Horovod's ``HOROVOD_FUSION_THRESHOLD``, 128 MiB by default).

    Returns:
      int >= 1, ``ceil(num_bytes / bytes_per_pack)`` (1 for an empty buffer).

    Raises:
      ValueError: if `bytes_per_pack` < 0 or `num_bytes` < 0.
    """
    num_bytes = cluster_lib._check_number("num_bytes", num_bytes, 0.0)
    if bytes_per_pack is None or bytes_per_pack == 0:
        return 1
    bytes_per_pack = cluster_lib._check_number("bytes_per_pack", bytes_per_pack, 0.0, strict=True)
    return max(1, math.ceil(num_bytes / bytes_per_pack))


def grid_shapes(num_workers):
    """Returns every ``(rows, cols)`` with ``rows * cols == num_workers``, rows ascending.

    Raises:
      ValueError: if `num_workers` < 1.
    """
    num_workers = cluster_lib._check_int("num_workers", num_workers, 1)
    return [(r, num_workers // r) for r in range(1, num_workers + 1) if num_workers % r == 0]


# --- costing a schedule ------------------------------------------------------------------


def _step_link(cluster, edges):
    """Returns ``(alpha, beta)`` of one synchronous step in which every edge sends a chunk.

    alpha is the largest latency any edge pays; beta the slowest flow: the intra-node beta
    if some edge stays in a node, and the inter-node beta times the largest number of edges
    leaving one node if some edge crosses nodes (they share the node's network bandwidth).
    """
    k = cluster.accelerators_per_node
    any_intra = False
    leaving = collections.Counter()
    for src, dst in edges:
        if src // k == dst // k:
            any_intra = True
        else:
            leaving[src // k] += 1
    alpha = beta = 0.0
    if any_intra:
        alpha = cluster.intra_node.latency_s
        beta = cluster.intra_node.beta_s_per_byte
    if leaving:
        alpha = max(alpha, cluster.inter_node.latency_s)
        beta = max(beta, cluster.inter_node.beta_s_per_byte * max(leaving.values()))
    return alpha, beta


def _ring_edges(groups):
    """Edges of one ring step for concurrent rings: member i sends to member i+1."""
    return [(g[i], g[(i + 1) % len(g)]) for g in groups if len(g) > 1 for i in range(len(g))]


def phase_steps(phase, held_bytes):
    """Returns the ring steps of one phase: a list of ``(count, chunk_bytes, reduce)``.

    `held_bytes` is what each member holds when the phase starts (``n`` times the
    schedule's shard fraction); ``p`` is the group size:

    * ``reduce_scatter``: ``p - 1`` steps of ``held/p`` with an addition;
    * ``all_reduce``: that, then ``p - 1`` steps of ``held/p`` (the all-gather);
    * ``all_gather``: ``p - 1`` steps of ``held`` (each member holds one shard);
    * ``reduce`` and ``broadcast``: priced as an ``all_reduce``, which is how the
      multi-process backend runs them.
    """
    p = phase.group_size
    if phase.kind == algorithms.REDUCE_SCATTER:
        return [(p - 1, held_bytes / p, True)]
    if phase.kind == algorithms.ALL_GATHER:
        return [(p - 1, held_bytes, False)]
    return [(p - 1, held_bytes / p, True), (p - 1, held_bytes / p, False)]


def schedule_cost(schedule, cluster, num_bytes, *, value_bytes=4, compression=None, num_packs=1,
                  small_pack_bytes=None, label=None):
    """Predicts the all-reduce that `schedule` describes, phase by phase, on `cluster`.

    Each phase is one collective call per pack (``delta``) made of synchronous ring
    steps (`phase_steps`) over its groups; a step costs ``alpha + chunk * beta (+ chunk *
    gamma)`` with the alpha and beta of the links its edges cross (`_step_link`: the
    slowest edge, and the inter-node beta times the flows that share a node's card). The
    schedule object is the one the backends run, so the model prices exactly the
    algorithm that runs.

    Args:
      schedule: a `tfscale.distribute.algorithms.Schedule` for
        ``cluster.num_accelerators`` ranks (node-major: rank ``r`` on node
        ``r // accelerators_per_node``).
      cluster: `Cluster`.
      num_bytes: number >= 0, bytes of the buffer on each rank in its own dtype.
      value_bytes: int, 4 (float32) or 2 (float16/bfloat16) bytes per value. Default 4.
      compression: None, ``"float16"``/``"fp16"`` or ``"bfloat16"``/``"bf16"``: wire dtype.
      num_packs: int >= 1, all-reduces the buffer is split into (see `num_packs`).
      small_pack_bytes: None, or int >= 0: packs of fewer bytes run
        `Schedule.for_small_messages` (as the multi-process backend does). Default None.
      label: str or None, the `AllReduceCost.algorithm` (default: the schedule's).

    Returns:
      `AllReduceCost`.

    Raises:
      TypeError: if `cluster` is not a `Cluster`.
      ValueError: if the schedule is for another rank count, and as `wire_bytes`.
    """
    n, packs = _prepare(cluster, num_bytes, value_bytes, compression, num_packs)
    if schedule.num_ranks != cluster.num_accelerators:
        raise ValueError(
            f"The {schedule.algorithm!r} schedule is for {schedule.num_ranks} ranks, but the cluster has "
            f"num_accelerators={cluster.num_accelerators}"
        )
    if small_pack_bytes is not None and packs and num_bytes / packs < small_pack_bytes:
        schedule = schedule.for_small_messages()
    gamma = cluster.gamma_s_per_byte
    steps = 0
    latency = bandwidth = reduction = sent = 0.0
    for phase, share in zip(schedule.phases, schedule.shard_fractions):
        link = _step_link(cluster, _ring_edges(phase.groups))
        for count, chunk, reduces in phase_steps(phase, n * float(share)):
            alpha, beta = link
            steps += count
            latency += count * alpha
            bandwidth += count * chunk * beta
            sent += count * chunk
            if reduces:
                reduction += count * chunk * gamma
    launches = len(schedule.phases)
    grid = schedule.param("grid_shape")
    if schedule.algorithm == "hierarchical":
        grid = (cluster.num_accelerators // schedule.param("devices_per_node"), schedule.param("devices_per_node"))
    return AllReduceCost(
        algorithm=label or schedule.algorithm,
        num_workers=cluster.num_accelerators,
        grid_shape=grid,
        num_steps=steps,
        num_packs=packs,
        wire_bytes=n,
        bytes_sent_per_worker=sent,
        latency_s=latency * packs,
        bandwidth_s=bandwidth,
        reduction_s=reduction,
        inter_algorithm=schedule.param("inter_node"),
        num_launches=launches,
        launch_s=launches * packs * cluster.launch_overhead_s,
        phases=tuple(p.describe() for p in schedule.phases),
    )


def schedule_coefficients(schedule, ranks_per_node, num_bytes, *, value_bytes=4, compression=None, num_packs=1,
                          small_pack_bytes=None):
    """The time of `schedule` as a linear function of a two-tier cluster's parameters.

    ``t = a_intra * alpha_intra + b_intra * beta_intra + a_inter * alpha_inter + b_inter * beta_inter
    + c * gamma + d * delta``, exactly what `schedule_cost` computes on a `Cluster` whose inter-node link is the
    slower one (alpha_inter >= alpha_intra and beta_inter >= beta_intra): a step with an edge between nodes
    pays the inter-node link, its bytes times the most flows leaving one node. Calibration fits the six
    parameters to measured times by least squares (`tfscale.planning.fit_two_tier`).

    Args:
      schedule: a `tfscale.distribute.algorithms.Schedule` (node-major ranks).
      ranks_per_node: int >= 1 dividing the schedule's rank count.
      num_bytes, value_bytes, compression, num_packs, small_pack_bytes: as `schedule_cost`.

    Returns:
      dict with float values for ``a_intra``, ``b_intra``, ``a_inter``, ``b_inter``, ``c``, ``d``.

    Raises:
      ValueError: if `ranks_per_node` does not divide the rank count, and as `wire_bytes`.
    """
    k = cluster_lib._check_int("ranks_per_node", ranks_per_node, 1)
    if schedule.num_ranks % k:
        raise ValueError(f"Argument `ranks_per_node`={k} must divide the schedule's {schedule.num_ranks} ranks")
    n = wire_bytes(num_bytes, value_bytes, compression)
    packs = cluster_lib._check_int("num_packs", num_packs, 1)
    if small_pack_bytes is not None and num_bytes / packs < small_pack_bytes:
        schedule = schedule.for_small_messages()
    out = dict.fromkeys(("a_intra", "b_intra", "a_inter", "b_inter", "c", "d"), 0.0)
    for phase, share in zip(schedule.phases, schedule.shard_fractions):
        edges = _ring_edges(phase.groups)
        leaving = collections.Counter(src // k for src, dst in edges if src // k != dst // k)
        for count, chunk, reduces in phase_steps(phase, n * float(share)):
            if leaving:
                out["a_inter"] += count * packs
                out["b_inter"] += count * chunk * max(leaving.values())
            else:
                out["a_intra"] += count * packs
                out["b_intra"] += count * chunk
            if reduces:
                out["c"] += count * chunk
    out["d"] = float(len(schedule.phases) * packs)
    return out


def _prepare(cluster, num_bytes, value_bytes, compression, packs):
    if not isinstance(cluster, cluster_lib.Cluster):
        raise TypeError(
            f"Argument `cluster` must be a tfscale.planning.Cluster. Received: cluster={cluster!r}"
        )
    n_wire = wire_bytes(num_bytes, value_bytes, compression)
    packs = cluster_lib._check_int("num_packs", packs, 1)
    return n_wire, packs


def allreduce_cost(algorithm, cluster, num_bytes, *, grid_shape=None, value_bytes=4, compression=None,
                   num_packs=1, small_pack_bytes=None, **params):
    """Predicts the registered all-reduce `algorithm` by name (any name of the registry).

    Builds the algorithm's schedule for ``cluster.num_accelerators`` ranks
    (`tfscale.distribute.algorithms.build_schedule`; ``hierarchical`` gets
    ``devices_per_node = cluster.accelerators_per_node``) and prices it with
    `schedule_cost`.

    Args:
      algorithm: str, a registered name or alias (``"flat"``/``"ring"``, ``"torus"``,
        ``"hierarchical"``, ``"halving_doubling"``, or a user's).
      cluster: `Cluster`.
      num_bytes: number >= 0, bytes per worker in the buffer's own dtype.
      grid_shape: ``(rows, cols)`` or ``"RxC"`` for ``"torus"`` (None: most square).
      value_bytes, compression, num_packs, small_pack_bytes: as `schedule_cost`.
      **params: further topology parameters of the algorithm (e.g. ``inter_node`` or,
        for compatibility, ``inter_algorithm="ring"|"halving_doubling"`` for
        hierarchical).

    Returns:
      `AllReduceCost`.

    Raises:
      ValueError: for an unknown algorithm (the message lists the valid names), a
        parameter the algorithm does not take, and as `schedule_cost`.
    """
    if not isinstance(cluster, cluster_lib.Cluster):
        raise TypeError(f"Argument `cluster` must be a tfscale.planning.Cluster. Received: cluster={cluster!r}")
    name = algorithms.canonical_name(algorithm)
    if "inter_algorithm" in params:
        inter = params.pop("inter_algorithm")
        if inter not in _INTER_ALGORITHMS:
            raise ValueError(
                f"Unknown inter_algorithm {inter!r}; expected one of {list(_INTER_ALGORITHMS)}"
            )
        params["inter_node"] = "flat" if inter == "ring" else inter
    if name == "hierarchical":
        params.setdefault("devices_per_node", cluster.accelerators_per_node)
    schedule = algorithms.build_schedule(name, cluster.num_accelerators, grid_shape=grid_shape, **params)
    return schedule_cost(schedule, cluster, num_bytes, value_bytes=value_bytes, compression=compression,
                         num_packs=num_packs, small_pack_bytes=small_pack_bytes)


def ring_allreduce_cost(cluster, num_bytes, *, value_bytes=4, compression=None, num_packs=1):
    """Predicts the flat all-reduce (alias ring): one all-reduce over all N ranks.

    Formula (uniform link; Thakur, Rabenseifner, Gropp 2005, section 4; Patarasuk and Yuan
    2009 prove the beta term optimal)::

        T = P * (2(N-1) * alpha + delta) + 2(N-1)/N * n * beta + (N-1)/N * n * gamma

    with ``n`` the wire bytes, ``P`` the packs and ``delta`` the launch overhead.

    Args:
      cluster: `Cluster`, N = ``cluster.num_accelerators``.
      num_bytes: number >= 0, bytes of the buffer on each worker in its own dtype.
      value_bytes: int, 4 (float32) or 2 (float16/bfloat16) bytes per value. Default 4.
      compression: None, ``"float16"`` or ``"bfloat16"``: wire dtype (see `wire_bytes`).
      num_packs: int >= 1, all-reduces the buffer is split into (see `num_packs`).

    Returns:
      `AllReduceCost` with ``num_steps == 2(N-1)``.

    Raises:
      TypeError: if `cluster` is not a `Cluster`.
      ValueError: for a negative size, an unknown compression or `num_packs` < 1.
    """
    return allreduce_cost("flat", cluster, num_bytes, value_bytes=value_bytes, compression=compression,
                          num_packs=num_packs)


def torus_allreduce_cost(
    cluster, num_bytes, grid_shape, *, value_bytes=4, compression=None, num_packs=1
):
    """Predicts the 2D-torus all-reduce of Mikami et al. (arXiv:1811.05233) and Ying et al.

    (arXiv:1811.06992) on a row-major ``rows x cols`` grid (its schedule:
    `tfscale.distribute.algorithms.torus`):

    1. reduce-scatter along each row (a ring of `cols`): ``cols-1`` steps of ``n/cols``;
    2. all-reduce each ``n/cols`` shard along each column (a ring of `rows`):
       ``2(rows-1)`` steps of ``n/(rows*cols)``;
    3. all-gather along each row: ``cols-1`` steps of ``n/cols``.

    On a uniform link::

        T = P * ((2(cols-1) + 2(rows-1)) * alpha + 3 * delta)
            + 2(N-1)/N * n * beta + (N-1)/N * n * gamma

    the ring's bytes in fewer steps; a ``1 x N`` grid has 2 phases, ``N x 1`` one.

    Args:
      cluster: `Cluster`.
      num_bytes: number >= 0, bytes of the buffer on each worker in its own dtype.
      grid_shape: ``(rows, cols)``, ints >= 1 with ``rows * cols == N``.
      value_bytes, compression, num_packs: as `ring_allreduce_cost`.

    Returns:
      `AllReduceCost` with ``num_steps == 2(rows-1) + 2(cols-1)``.

    Raises:
      ValueError: if `grid_shape` is not a pair of ints >= 1 whose product is N, and as
        `ring_allreduce_cost`.
    """
    return allreduce_cost("torus", cluster, num_bytes, grid_shape=_check_grid(grid_shape, cluster),
                          value_bytes=value_bytes, compression=compression, num_packs=num_packs)


def _check_grid(grid_shape, cluster):
    if grid_shape is None:
        raise ValueError("Argument `grid_shape` is required for algorithm='torus'. Received: None")
    return grid_shape


def halving_doubling_allreduce_cost(
    cluster, num_bytes, *, value_bytes=4, compression=None, num_packs=1
):
    """Predicts Rabenseifner's recursive halving-doubling all-reduce.

    Reduce-scatter by recursive halving (exchange half the piece with the partner at
    distance 1, 2, 4, ...), then all-gather by recursive doubling (Thakur, Rabenseifner,
    Gropp 2005, section 4.4; schedule: `tfscale.distribute.algorithms.halving_doubling`).
    For N a power of two, on a uniform link::

        T = P * 2 log2(N) * (alpha + delta) + 2(N-1)/N * n * beta + (N-1)/N * n * gamma

    (one collective call per phase). Otherwise the ``r = N - 2^floor(log2 N)`` extra
    ranks first reduce their buffer onto a partner and get the result back by broadcast
    at the end, each priced as a pairwise all-reduce (``2 (alpha + n/2 beta)``).

    Args, Returns, Raises: as `ring_allreduce_cost`.
    """
    return allreduce_cost("halving_doubling", cluster, num_bytes, value_bytes=value_bytes,
                          compression=compression, num_packs=num_packs)


_INTER_ALGORITHMS = ("ring", "halving_doubling")


def hierarchical_allreduce_cost(
    cluster,
    num_bytes,
    *,
    inter_algorithm="ring",
    value_bytes=4,
    compression=None,
    num_packs=1,
):
    """Predicts the hierarchical all-reduce (Jia et al., arXiv:1807.11205; ChainerMN; Horovod).

    With ``k = accelerators_per_node`` and ``M`` nodes (schedule:
    `tfscale.distribute.algorithms.hierarchical`):

    1. reduce-scatter inside each node (a ring of k over `intra_node`): ``k-1`` steps of
       ``n/k``;
    2. all-reduce each ``n/k`` shard across the nodes, every local rank with its peers on
       the other nodes at the same time (k flows share a node's network), by
       `inter_algorithm`: a ring (``2(M-1)`` steps) or halving-doubling
       (``2 log2 M`` steps);
    3. all-gather inside each node: ``k-1`` steps of ``n/k``.

    With ``inter_algorithm="ring"`` this is the torus with ``grid_shape=(M, k)``.

    Args:
      cluster: `Cluster`.
      num_bytes: number >= 0, bytes of the buffer on each worker in its own dtype.
      inter_algorithm: ``"ring"`` (default; the flat all-reduce) or ``"halving_doubling"``.
      value_bytes, compression, num_packs: as `ring_allreduce_cost`.

    Returns:
      `AllReduceCost` with ``grid_shape == (M, k)``.

    Raises:
      ValueError: for an unknown `inter_algorithm`, and as `ring_allreduce_cost`.
    """
    return allreduce_cost("hierarchical", cluster, num_bytes, inter_algorithm=inter_algorithm,
                          value_bytes=value_bytes, compression=compression, num_packs=num_packs)


class _Algorithms(collections.abc.Mapping):
    """Read-only view of the registry: name -> cost function ``f(cluster, num_bytes, **kw)``."""

    def __getitem__(self, name):
        if name not in self:
            raise KeyError(name)
        return functools.partial(allreduce_cost, name)

    def __iter__(self):
        return iter(algorithms.algorithm_names())

    def __len__(self):
        return len(algorithms.algorithm_names())

    def __contains__(self, name):
        try:
            algorithms.canonical_name(name)
        except ValueError:
            return False
        return True


ALGORITHMS = _Algorithms()
"""Mapping: every registered algorithm name (aliases accepted) -> its cost function."""
