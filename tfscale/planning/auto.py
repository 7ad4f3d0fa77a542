"""`all_reduce="auto"`: pick the all-reduce algorithm, grid and pack size for a topology with the cost model.

Pure Python. `tfscale.distribute.create_strategy("auto")` and `create_multi_worker_strategy("auto")`
describe what they see as a `Topology` (how many ranks, how many share a node, whether they
share one memory) and call `choose_all_reduce`, which prices every registered schedule
(`tfscale.distribute.algorithms`: flat, torus on every grid, hierarchical, halving-doubling,
and any registered by the user) on a `Cluster` built from a calibration file
(`scripts/plan_allreduce.py --calibrate`) or from built-in defaults, and returns the
cheapest, with the predicted time of every alternative. This is NCCL's tuner in small: the
model that predicts and the code that runs share one list of algorithms.

One case has no link to price: replicas that are logical devices of one CPU share one
memory, and there every schedule moves the same bytes through the same memory bus while a
two-level schedule adds passes over partial sums. There a one-level reduction (TF's
``reduction_to_one_device``) was measured fastest (docs/benchmarks_allreduce.md: the
torus takes 1.42x its time on 4 logical devices, 1.38x on 8), and `choose_all_reduce`
picks it, saying why.
"""

import dataclasses


from tfscale.distribute import algorithms
from tfscale.planning import cluster as cluster_lib
from tfscale.planning import cost_model

__all__ = [
    "AutoChoice",
    "DEFAULT_INTER_NODE",
    "DEFAULT_INTRA_NODE",
    "Topology",
    "choose_all_reduce",
    "cluster_for",
]

DEFAULT_INTRA_NODE = {
    # Processes of one host on loopback, TF collectives over gRPC: docs/scaling.md's fit at 4 processes.
    "processes": dict(latency_s=900e-6, bandwidth_bytes_per_s=186e6, launch_overhead_s=2.9e-3),
    # GPUs (or TPU cores) of one host: NVLink-class links.
    "accelerators": dict(latency_s=10e-6, bandwidth_bytes_per_s=50e9, launch_overhead_s=20e-6),
}
"""Built-in link of ranks inside one node, per kind of rank, when no calibration is given."""

DEFAULT_INTER_NODE = dict(latency_s=50e-6, bandwidth_bytes_per_s=1.25e9)
"""Built-in link between nodes (10 Gbit/s Ethernet) when no calibration or bandwidth is given."""

_SHARED_MEMORY_CHOICE = "reduction_to_one_device"
RUNTIME_CHOICE = "collective"
"""The runtime's own all-reduce (MWMS's ``CollectiveAllReduce``: one fused all-reduce, NCCL on GPUs)."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """What a strategy factory sees of the replicas it will all-reduce over.

    Attributes:
      num_ranks: int >= 1, replicas in sync.
      ranks_per_node: int >= 1 dividing `num_ranks`: replicas that share a node (fast
        links), contiguous in rank order. Equal to `num_ranks` on one machine.
      kind: ``"shared_memory"`` (logical devices of one CPU), ``"accelerators"`` (GPUs or
        TPU cores in one process) or ``"processes"`` (worker processes, TF's collective
        runtime).
      inter_node_bandwidth_bytes_per_s: float or None: the network bandwidth of a node
        when known (e.g. set by the emulated cluster of `tfscale.launch`), bytes/s.
      source: str, how it was found (for the log).

    Raises:
      ValueError: for a bad count or kind.
    """

    num_ranks: int
    ranks_per_node: int
    kind: str = "processes"
    inter_node_bandwidth_bytes_per_s: object = None
    source: str = ""

    def __post_init__(self):
        n = cluster_lib._check_int("num_ranks", self.num_ranks, 1)
        k = cluster_lib._check_int("ranks_per_node", self.ranks_per_node, 1)
        if n % k:
            raise ValueError(f"Argument `ranks_per_node`={k} must divide num_ranks={n}")
        if self.kind not in ("shared_memory", "accelerators", "processes"):
            raise ValueError(
                "Argument `kind` must be one of ['shared_memory', 'accelerators', 'processes']. "
                f"Received: kind={self.kind!r}"
            )

    @property
    def num_nodes(self):
        """int: ``num_ranks // ranks_per_node``."""
        return self.num_ranks // self.ranks_per_node


@dataclasses.dataclass(frozen=True)
class AutoChoice:
    """The algorithm `choose_all_reduce` picked, and why.

    Attributes:
      algorithm: str, a registered algorithm name, ``"reduction_to_one_device"`` (logical devices of one
        CPU), or ``"collective"`` (the runtime's own flat all-reduce, MWMS's ``CollectiveAllReduce``).
      params: dict, its topology parameters (``grid_shape``, ``devices_per_node``, ...).
      bytes_per_pack: int or None, the fusion threshold to use (None: the backend's default).
      predicted_s: float or None, predicted seconds of one all-reduce of the gradients.
      alternatives: tuple of ``(label, predicted seconds)``, every candidate, fastest first.
      reason: str, one line for the log.
    """

    algorithm: str
    params: dict
    bytes_per_pack: object
    predicted_s: object
    alternatives: tuple
    reason: str

    def describe(self):
        """str: the choice and the table of alternatives, for the log."""
        lines = [f"all_reduce=auto chose {self.algorithm} {self.params or ''}: {self.reason}"]
        for label, seconds in self.alternatives:
            lines.append(f"  {label:<40} {seconds * 1e3:10.2f} ms predicted")
        return "\n".join(lines)


def _fit_link(fits, n):
    """The fitted (Link, delta, gamma) at the process count nearest to `n` in a calibration's fits."""
    if not fits:
        return None
    key = min(fits, key=lambda k: (abs(int(k) - n), -int(k)))
    f = fits[key]
    bandwidth = 1.0 / f["beta_s_per_byte"] if f.get("beta_s_per_byte") else 1e12
    return (cluster_lib.Link(f["alpha_s"], bandwidth), f.get("launch_overhead_s", 0.0),
            f.get("gamma_s_per_byte", 0.0))


def cluster_for(topology, calibration=None):
    """Builds the `Cluster` the cost model prices `topology` on.

    Args:
      topology: `Topology`.
      calibration: None, or a dict read by `tfscale.planning.load_calibration`: its fits
        per process count (``fits.per_num_processes``) give the intra-node link (the
        nearest count to the node size), and, if present, ``fits.inter_node`` the link
        between nodes. A known `inter_node_bandwidth_bytes_per_s` overrides the
        inter-node bandwidth.

    Returns:
      `Cluster`.
    """
    intra_defaults = DEFAULT_INTRA_NODE["processes" if topology.kind == "processes" else "accelerators"]
    intra = cluster_lib.Link(intra_defaults["latency_s"], intra_defaults["bandwidth_bytes_per_s"])
    delta = intra_defaults["launch_overhead_s"]
    gamma = 0.0
    inter = cluster_lib.Link(**DEFAULT_INTER_NODE)
    if calibration is not None:
        fitted = _fit_link(calibration.get("fits", {}).get("per_num_processes", {}), topology.ranks_per_node)
        if fitted is not None:
            intra, delta, gamma = fitted
        inter_fit = calibration.get("fits", {}).get("inter_node")
        if inter_fit:
            bandwidth = 1.0 / inter_fit["beta_s_per_byte"] if inter_fit.get("beta_s_per_byte") else 1e12
            inter = cluster_lib.Link(inter_fit["alpha_s"], bandwidth)
        elif fitted is not None:
            inter = intra
    if topology.num_nodes == 1:
        inter = intra
    if topology.inter_node_bandwidth_bytes_per_s:
        inter = cluster_lib.Link(inter.latency_s, float(topology.inter_node_bandwidth_bytes_per_s))
    return cluster_lib.Cluster(topology.num_ranks, topology.ranks_per_node, intra, inter, gamma_s_per_byte=gamma,
                               launch_overhead_s=delta, name="auto")


def _candidates(topology):
    """``(name, params)`` of every registered schedule, with the topologies it can take."""
    n, k = topology.num_ranks, topology.ranks_per_node
    for name in algorithms.algorithm_names():
        entry = algorithms.get_algorithm(name)
        if name == "torus":
            for rows, cols in cost_model.grid_shapes(n):
                if rows > 1 and cols > 1:
                    yield name, {"grid_shape": (rows, cols)}
        elif name == "hierarchical":
            if 1 < k < n:
                yield name, {"devices_per_node": k}
                if k & (k - 1) == 0 and (n // k) & (n // k - 1) == 0:
                    yield name, {"devices_per_node": k, "inter_node": "halving_doubling"}
        elif "devices_per_node" in entry.parameters or "grid_shape" in entry.parameters:
            continue  # A user algorithm that needs a topology we cannot guess.
        else:
            yield name, {}


def choose_all_reduce(topology, num_bytes, calibration=None, bytes_per_pack=None, compression=None,
                      small_pack_bytes=None):
    """Picks the all-reduce for `topology` and gradients of `num_bytes`, with the cost model.

    Args:
      topology: `Topology`.
      num_bytes: number > 0, bytes of all gradients of one replica (e.g. 4 x parameters
        for float32).
      calibration: None or a calibration dict (`tfscale.planning.load_calibration`).
      bytes_per_pack: None (one pack per 32 MiB, the multi-process default; in one process
        256 KiB) or int > 0: the fusion threshold the backend will use, which sets how
        many packs each all-reduce is split into.
      compression: None, ``"fp16"``/``"float16"`` or ``"bf16"``/``"bfloat16"``.
      small_pack_bytes: None or int >= 0: packs below it run the small-message variant
        (the multi-process backend's default is 1 MiB).

    Returns:
      `AutoChoice`.

    Raises:
      TypeError: if `topology` is not a `Topology`.
      ValueError: if `num_bytes` <= 0.
    """
    if not isinstance(topology, Topology):
        raise TypeError(f"Argument `topology` must be a tfscale.planning.Topology. Received: {topology!r}")
    num_bytes = cluster_lib._check_number("num_bytes", num_bytes, 0.0, strict=True)
    if topology.num_ranks == 1:
        return AutoChoice("flat", {}, bytes_per_pack, 0.0, (("flat", 0.0),), "one replica: nothing to all-reduce")
    if topology.kind == "shared_memory":
        return AutoChoice(
            _SHARED_MEMORY_CHOICE, {}, None, None, (),
            "the replicas are logical devices of one CPU sharing one memory: every schedule moves the same bytes "
            "through one memory bus and a one-level reduction makes the fewest passes (measured: "
            "docs/benchmarks_allreduce.md)")
    cluster = cluster_for(topology, calibration)
    if bytes_per_pack is None:
        bytes_per_pack = 32 * 1024 * 1024 if topology.kind == "processes" else 256 * 1024
    packs = cost_model.num_packs(num_bytes, bytes_per_pack)
    if small_pack_bytes is None and topology.kind == "processes":
        small_pack_bytes = 1024 * 1024
    wire = {"fp16": "float16", "bf16": "bfloat16"}.get(compression, compression)
    rows = []
    for name, params in _candidates(topology):
        cost = cost_model.allreduce_cost(name, cluster, num_bytes, num_packs=packs, compression=wire,
                                         small_pack_bytes=small_pack_bytes, **params)
        label = name + ("" if not params else " " + ", ".join(f"{k}={v}" for k, v in sorted(params.items())))
        rows.append((cost.total_s, len(cost.phases), label, name, params))
    if topology.kind == "processes" and topology.num_nodes > 1 and wire is None:
        # Across nodes, the runtime's own flat all-reduce (one fused buffer; it cannot compress) is a candidate:
        # the same flat schedule in one pack. Measured on emulated 2- and 4-node clusters, it was level with or
        # 3-13% faster than tfscale's packed flat on large messages (docs/benchmarks_multiworker.md); inside one
        # host tfscale's packed flat was 12-39% faster, so it is offered across nodes only. It sorts before
        # `flat` when they tie (a small message is one pack either way).
        cost = cost_model.allreduce_cost("flat", cluster, num_bytes, num_packs=1)
        rows.append((cost.total_s, len(cost.phases), f"{RUNTIME_CHOICE} (MWMS's own flat all-reduce)",
                     RUNTIME_CHOICE, {}))
    rows.sort(key=lambda r: (round(r[0], 12), r[1], r[2]))
    best = rows[0]
    tiers = (f"{topology.num_nodes} node(s) of {topology.ranks_per_node}, intra {cluster.intra_node.bandwidth_bytes_per_s / 1e6:.0f} MB/s"
             f" / inter {cluster.inter_node.bandwidth_bytes_per_s / 1e6:.0f} MB/s, "
             f"{'calibration' if calibration else 'built-in links'}, {num_bytes / 2**20:.1f} MiB in {packs} pack(s)")
    return AutoChoice(best[3], dict(best[4]), bytes_per_pack, best[0],
                      tuple((r[2], r[0]) for r in rows), f"fastest predicted on {tiers}")


