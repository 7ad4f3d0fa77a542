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

Launch overhead: each phase that is a separate collective call (the ring and
halving-doubling make 1 per pack, the torus and hierarchical 3: reduce-scatter, all-reduce,
all-gather) also pays a fixed ``delta = cluster.launch_overhead_s`` (0 by default; the
single-machine calibration measures it).

Fusion: a buffer sent as ``P`` packs (``bytes_per_pack``) pays the alpha and delta terms
``P`` times and the beta and gamma terms once over all bytes (packs run one after the
other, no overlap). Compression: sending float16/bfloat16 instead of float32 halves the wire bytes
(and the gamma term, which counts added wire bytes).
"""

import collections
import dataclasses
import math

from tfscale.planning import cluster as cluster_lib

__all__ = [
    "ALGORITHMS",
    "AllReduceCost",
    "allreduce_cost",
    "grid_shapes",
    "halving_doubling_allreduce_cost",
    "hierarchical_allreduce_cost",
    "num_packs",
    "ring_allreduce_cost",
    "torus_allreduce_cost",
    "wire_bytes",
]

_WIRE_DTYPE_BYTES = {None: None, "float32": 4, "float16": 2, "bfloat16": 2}


@dataclasses.dataclass(frozen=True)
class AllReduceCost:
    """The predicted cost of one all-reduce of a buffer on every worker.

    Attributes:
      algorithm: str, ``"ring"``, ``"torus"``, ``"hierarchical"`` or
        ``"halving_doubling"``.
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
      inter_algorithm: str or None, the across-node algorithm of ``"hierarchical"``.
      num_launches: int, collective calls per pack (1 for ring and halving-doubling, up
        to 3 for torus and hierarchical).
      launch_s: float, the delta part, seconds (``num_packs * num_launches * delta``).
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


# --- step machinery -------------------------------------------------------------------


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


class _Tally:
    """Accumulates steps: ``count`` steps of ``chunk`` bytes over a link."""

    def __init__(self, gamma, launch_overhead=0.0):
        self.gamma = gamma
        self.launch_overhead = launch_overhead
        self.launches = 0
        self.steps = 0
        self.latency = self.bandwidth = self.reduction = self.sent = 0.0

    def add(self, count, chunk, link, reduce):
        if count <= 0:
            return
        alpha, beta = link
        self.steps += count
        self.latency += count * alpha
        self.bandwidth += count * chunk * beta
        self.sent += count * chunk
        if reduce:
            self.reduction += count * chunk * self.gamma

    def ring_allreduce(self, cluster, groups, n):
        """Reduce-scatter then all-gather on concurrent rings of equal size p, n bytes each."""
        p = len(groups[0])
        if p < 2:
            return
        self.launches += 1
        link = _step_link(cluster, _ring_edges(groups))
        self.add(p - 1, n / p, link, reduce=True)  # reduce-scatter
        self.add(p - 1, n / p, link, reduce=False)  # all-gather

    def halving_doubling_allreduce(self, cluster, groups, n):
        """Rabenseifner's reduce-scatter (recursive halving) + all-gather (doubling).

        Each group (a list of ranks) runs its own copy; member i of a group is "virtual
        rank" i. Non-power-of-two sizes fold the extra members in first and out last.
        """
        p = len(groups[0])
        if p < 2:
            return
        self.launches += 1
        p2 = 1 << (p.bit_length() - 1)
        extra = p - p2
        if extra:
            fold = [(g[p2 + i], g[i]) for g in groups for i in range(extra)]
            self.add(1, n, _step_link(cluster, fold), reduce=True)
        distances = [1 << j for j in range(p2.bit_length() - 1)]
        links = [
            _step_link(cluster, [(g[i], g[i ^ d]) for g in groups for i in range(p2)])
            for d in distances
        ]
        chunk = n
        for link in links:  # recursive halving, nearest partners first
            chunk /= 2
            self.add(1, chunk, link, reduce=True)
        for link in reversed(links):  # recursive doubling
            self.add(1, chunk, link, reduce=False)
            chunk *= 2
        if extra:
            unfold = [(g[i], g[p2 + i]) for g in groups for i in range(extra)]
            self.add(1, n, _step_link(cluster, unfold), reduce=False)

    def result(self, algorithm, cluster, grid_shape, n_wire, packs, inter_algorithm=None):
        steps = self.steps
        return AllReduceCost(
            algorithm=algorithm,
            num_workers=cluster.num_accelerators,
            grid_shape=grid_shape,
            num_steps=steps,
            num_packs=packs,
            wire_bytes=n_wire,
            bytes_sent_per_worker=self.sent,
            latency_s=self.latency * packs,
            bandwidth_s=self.bandwidth,
            reduction_s=self.reduction,
            inter_algorithm=inter_algorithm,
            num_launches=self.launches,
            launch_s=self.launches * packs * self.launch_overhead,
        )


def _prepare(cluster, num_bytes, value_bytes, compression, packs):
    if not isinstance(cluster, cluster_lib.Cluster):
        raise TypeError(
            f"Argument `cluster` must be a tfscale.planning.Cluster. Received: cluster={cluster!r}"
        )
    n_wire = wire_bytes(num_bytes, value_bytes, compression)
    packs = cluster_lib._check_int("num_packs", packs, 1)
    return n_wire, packs


def ring_allreduce_cost(cluster, num_bytes, *, value_bytes=4, compression=None, num_packs=1):
    """Predicts a flat ring all-reduce: reduce-scatter then all-gather around all N ranks.

    Formula (uniform link; Thakur, Rabenseifner, Gropp 2005, §4; Patarasuk and Yuan 2009
    prove the beta term optimal)::

        T = P * (2(N-1) * alpha + delta) + 2(N-1)/N * n * beta + (N-1)/N * n * gamma

    with ``n`` the wire bytes, ``P`` the packs and ``delta`` the launch overhead. On a `Cluster`, alpha and beta are those
    of the slowest hop (node-major ranks: one message leaves each node per step).

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
    n, packs = _prepare(cluster, num_bytes, value_bytes, compression, num_packs)
    tally = _Tally(cluster.gamma_s_per_byte, cluster.launch_overhead_s)
    tally.ring_allreduce(cluster, [list(range(cluster.num_accelerators))], n)
    return tally.result("ring", cluster, None, n, packs)


def _check_grid(grid_shape, num_workers):
    try:
        rows, cols = grid_shape
        rows = cluster_lib._check_int("grid_shape[0]", rows, 1)
        cols = cluster_lib._check_int("grid_shape[1]", cols, 1)
    except (TypeError, ValueError) as e:
        raise ValueError(
            "Argument `grid_shape` must be a pair (rows, cols) of ints >= 1. "
            f"Received: grid_shape={grid_shape!r} ({e})"
        ) from None
    if rows * cols != num_workers:
        raise ValueError(
            f"Argument `grid_shape`={grid_shape!r} has {rows}x{cols}={rows * cols} workers, but "
            f"the cluster has num_accelerators={num_workers}. Expected rows * cols == "
            "num_accelerators."
        )
    return rows, cols


def torus_allreduce_cost(
    cluster, num_bytes, grid_shape, *, value_bytes=4, compression=None, num_packs=1
):
    """Predicts the 2D-torus all-reduce of Mikami et al. (arXiv:1811.05233) and Ying et al.

    (arXiv:1811.06992) on a row-major ``rows x cols`` grid (rank ``r`` at row
    ``r // cols``, column ``r % cols``; rows are contiguous ranks, as in
    `tfscale.distribute.topology.Grid`):

    1. reduce-scatter along each row (a ring of `cols`): ``cols-1`` steps of ``n/cols``;
    2. all-reduce each ``n/cols`` shard along each column (a ring of `rows`):
       ``2(rows-1)`` steps of ``n/(rows*cols)``;
    3. all-gather along each row: ``cols-1`` steps of ``n/cols``.

    On a uniform link::

        T = P * ((2(cols-1) + 2(rows-1)) * alpha + 3 * delta)
            + 2(N-1)/N * n * beta + (N-1)/N * n * gamma

    the ring's bytes in fewer steps; a ``1 x N`` or ``N x 1`` grid is exactly the ring.

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
    n, packs = _prepare(cluster, num_bytes, value_bytes, compression, num_packs)
    rows, cols = _check_grid(grid_shape, cluster.num_accelerators)
    row_groups = [list(range(r * cols, (r + 1) * cols)) for r in range(rows)]
    col_groups = [list(range(c, rows * cols, cols)) for c in range(cols)]
    tally = _Tally(cluster.gamma_s_per_byte, cluster.launch_overhead_s)
    if cols > 1:
        row_link = _step_link(cluster, _ring_edges(row_groups))
        tally.add(cols - 1, n / cols, row_link, reduce=True)
        tally.launches += 1
    tally.ring_allreduce(cluster, col_groups, n / cols)
    if cols > 1:
        tally.add(cols - 1, n / cols, row_link, reduce=False)
        tally.launches += 1
    return tally.result("torus", cluster, (rows, cols), n, packs)


def halving_doubling_allreduce_cost(
    cluster, num_bytes, *, value_bytes=4, compression=None, num_packs=1
):
    """Predicts Rabenseifner's recursive halving-doubling all-reduce.

    Reduce-scatter by recursive halving (exchange half the vector with the partner at
    distance 1, 2, 4, ...), then all-gather by recursive doubling (Thakur, Rabenseifner,
    Gropp 2005, §4.4). For N a power of two, on a uniform link::

        T = P * (2 log2(N) * alpha + delta) + 2(N-1)/N * n * beta + (N-1)/N * n * gamma

    Otherwise the ``r = N - 2^floor(log2 N)`` extra ranks first send their whole buffer to
    a partner (``alpha + n*beta + n*gamma``) and get the result back at the end
    (``alpha + n*beta``): ``2 floor(log2 N) + 2`` steps.

    Args, Returns, Raises: as `ring_allreduce_cost`.
    """
    n, packs = _prepare(cluster, num_bytes, value_bytes, compression, num_packs)
    tally = _Tally(cluster.gamma_s_per_byte, cluster.launch_overhead_s)
    tally.halving_doubling_allreduce(cluster, [list(range(cluster.num_accelerators))], n)
    return tally.result("halving_doubling", cluster, None, n, packs)


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

    With ``k = accelerators_per_node`` and ``M`` nodes:

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
      inter_algorithm: ``"ring"`` (default) or ``"halving_doubling"``.
      value_bytes, compression, num_packs: as `ring_allreduce_cost`.

    Returns:
      `AllReduceCost` with ``grid_shape == (M, k)``.

    Raises:
      ValueError: for an unknown `inter_algorithm`, and as `ring_allreduce_cost`.
    """
    if inter_algorithm not in _INTER_ALGORITHMS:
        raise ValueError(
            f"Unknown inter_algorithm {inter_algorithm!r}; expected one of {list(_INTER_ALGORITHMS)}"
        )
    n, packs = _prepare(cluster, num_bytes, value_bytes, compression, num_packs)
    k, m = cluster.accelerators_per_node, cluster.num_nodes
    nodes = [list(range(i * k, (i + 1) * k)) for i in range(m)]
    peers = [list(range(j, m * k, k)) for j in range(k)]
    tally = _Tally(cluster.gamma_s_per_byte, cluster.launch_overhead_s)
    if k > 1:
        intra_link = _step_link(cluster, _ring_edges(nodes))
        tally.add(k - 1, n / k, intra_link, reduce=True)
        tally.launches += 1
    if inter_algorithm == "ring":
        tally.ring_allreduce(cluster, peers, n / k)
    else:
        tally.halving_doubling_allreduce(cluster, peers, n / k)
    if k > 1:
        tally.add(k - 1, n / k, intra_link, reduce=False)
        tally.launches += 1
    return tally.result("hierarchical", cluster, (m, k), n, packs, inter_algorithm)


ALGORITHMS = {
    "ring": ring_allreduce_cost,
    "torus": torus_allreduce_cost,
    "hierarchical": hierarchical_allreduce_cost,
    "halving_doubling": halving_doubling_allreduce_cost,
}
"""dict: algorithm name -> cost function."""


def allreduce_cost(algorithm, cluster, num_bytes, *, grid_shape=None, **kwargs):
    """Predicts the all-reduce `algorithm` (a key of `ALGORITHMS`) by name.

    Args:
      algorithm: str, ``"ring"``, ``"torus"``, ``"hierarchical"`` or
        ``"halving_doubling"``.
      cluster: `Cluster`.
      num_bytes: number >= 0, bytes per worker in the buffer's own dtype.
      grid_shape: ``(rows, cols)`` for ``"torus"`` (required there, refused elsewhere).
      **kwargs: passed to the cost function (`value_bytes`, `compression`, `num_packs`,
        `inter_algorithm` for hierarchical).

    Returns:
      `AllReduceCost`.

    Raises:
      ValueError: for an unknown algorithm (the message lists the valid names), a missing
        or unexpected `grid_shape`, and as the cost function.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"Unknown all_reduce_alg {algorithm!r}; expected one of {sorted(ALGORITHMS)}")
    if algorithm == "torus":
        if grid_shape is None:
            raise ValueError("Argument `grid_shape` is required for algorithm='torus'. Received: None")
        return torus_allreduce_cost(cluster, num_bytes, grid_shape, **kwargs)
    if grid_shape is not None:
        raise ValueError(
            f"Argument `grid_shape` only applies to algorithm='torus'. Received: "
            f"grid_shape={grid_shape!r} with algorithm={algorithm!r}"
        )
    return ALGORITHMS[algorithm](cluster, num_bytes, **kwargs)
