"""Predict step time and scaling efficiency per all-reduce algorithm and pick the best.

Pure Python. For a `Cluster` and a `Workload`, every candidate (flat ring, recursive
halving-doubling, hierarchical with a ring or halving-doubling across nodes, and the 2D
torus on every ``rows x cols`` grid with both sides >= 2) is costed with
`tfscale.planning.cost_model`, and the step time is::

    step_s = compute_s + (1 - overlap) * allreduce_s
    scaling efficiency = compute_s / step_s

(weak scaling at a fixed per-accelerator batch, the definition the seed papers use: the
throughput of N accelerators over N times the throughput of one). The efficiency does not
model input pipelines, stragglers or the optimizer update, so it is an upper bound on
what a real run reaches unless `overlap` is set.
"""

import dataclasses

from tfscale.distribute import algorithms as algorithms_lib
from tfscale.planning import cluster as cluster_lib
from tfscale.planning import cost_model

__all__ = [
    "PlanRow",
    "plan",
    "recommend",
    "scaling_curve",
    "scaling_efficiency",
]

# Preference among equally fast candidates: the simplest first.
_SIMPLICITY = {"flat": 0, "halving_doubling": 1, "hierarchical": 2, "torus": 3}  # others (registered): 4


def scaling_efficiency(compute_s, allreduce_s, overlap=0.0):
    """Returns ``compute_s / (compute_s + (1 - overlap) * allreduce_s)``.

    Args:
      compute_s: float > 0, seconds of forward + backward on one accelerator.
      allreduce_s: float >= 0, seconds of the gradient all-reduce.
      overlap: float in [0, 1], fraction of the all-reduce hidden behind compute.

    Returns:
      float in (0, 1].

    Raises:
      ValueError: for `compute_s` <= 0, `allreduce_s` < 0 or `overlap` outside [0, 1].
    """
    compute_s = cluster_lib._check_number("compute_s", compute_s, 0.0, strict=True)
    allreduce_s = cluster_lib._check_number("allreduce_s", allreduce_s, 0.0)
    overlap = cluster_lib._check_number("overlap", overlap, 0.0)
    if overlap > 1:
        raise ValueError(f"Argument `overlap` must be <= 1. Received: overlap={overlap}")
    return compute_s / (compute_s + (1.0 - overlap) * allreduce_s)


@dataclasses.dataclass(frozen=True)
class PlanRow:
    """One candidate of `plan`.

    Attributes:
      cost: `AllReduceCost` of the gradient all-reduce.
      compute_s: float, seconds of compute per step (``workload.compute_time_s``).
      step_s: float, predicted seconds per step.
      scaling_efficiency: float in (0, 1].
      images_per_second: float, predicted throughput of the whole cluster.
    """

    cost: cost_model.AllReduceCost
    compute_s: float
    step_s: float
    scaling_efficiency: float
    images_per_second: float

    def to_dict(self):
        """Returns a flat JSON-friendly dict for tables and JSON output."""
        return {
            "algorithm": self.cost.algorithm,
            "label": self.cost.label,
            "grid_shape": list(self.cost.grid_shape) if self.cost.grid_shape else None,
            "num_workers": self.cost.num_workers,
            "num_steps": self.cost.num_steps,
            "num_packs": self.cost.num_packs,
            "allreduce_ms": self.cost.total_s * 1e3,
            "latency_ms": self.cost.latency_s * 1e3,
            "bandwidth_ms": self.cost.bandwidth_s * 1e3,
            "reduction_ms": self.cost.reduction_s * 1e3,
            "step_ms": self.step_s * 1e3,
            "scaling_efficiency": self.scaling_efficiency,
            "images_per_second": self.images_per_second,
        }


def _candidates(cluster, names):
    """Yields ``(algorithm, kwargs)`` pairs for `allreduce_cost`, one per topology variant.

    The names are the registry's (`tfscale.distribute.algorithms`; aliases such as
    ``ring`` resolved); the torus gets every grid with both sides >= 2, hierarchical both
    inter-node algorithms, and an algorithm registered by the user its defaults.
    """
    n, k = cluster.num_accelerators, cluster.accelerators_per_node
    for name in names:
        name = algorithms_lib.canonical_name(name)
        if name == "halving_doubling":
            if n > 1:
                yield name, {}
        elif name == "hierarchical":
            if k > 1 and cluster.num_nodes > 1:
                yield name, {"inter_algorithm": "ring"}
                yield name, {"inter_algorithm": "halving_doubling"}
        elif name == "torus":
            for rows, cols in cost_model.grid_shapes(n):
                if rows > 1 and cols > 1:
                    yield name, {"grid_shape": (rows, cols)}
        else:
            yield name, {}


def plan(
    cluster,
    workload,
    *,
    compression=None,
    bytes_per_pack=None,
    fuse=True,
    algorithms=("flat", "halving_doubling", "hierarchical", "torus"),
):
    """Costs every candidate all-reduce for one training step; fastest first.

    Args:
      cluster: `Cluster`.
      workload: `Workload` (gradient size and dtype, compute time per step, overlap).
      compression: None, ``"float16"`` or ``"bfloat16"``, the wire dtype.
      bytes_per_pack: None (all gradients in one pack) or int > 0, bytes per fused pack
        (of the gradients in their own dtype).
      fuse: bool; False sends one all-reduce per gradient tensor (``num_tensors`` packs)
        and ignores `bytes_per_pack`. Default True.
      algorithms: iterable of algorithm names to consider. Default all four.

    Returns:
      list of `PlanRow`, ascending step time (ties: simplest algorithm, then fewest steps).

    Raises:
      TypeError: if `cluster` or `workload` has the wrong type.
      ValueError: for an unknown algorithm or compression.
    """
    if not isinstance(workload, cluster_lib.Workload):
        raise TypeError(
            f"Argument `workload` must be a tfscale.planning.Workload. Received: workload={workload!r}"
        )
    if not isinstance(cluster, cluster_lib.Cluster):
        raise TypeError(
            f"Argument `cluster` must be a tfscale.planning.Cluster. Received: cluster={cluster!r}"
        )
    payload = workload.gradient_bytes
    packs = cost_model.num_packs(payload, bytes_per_pack) if fuse else workload.num_tensors
    compute = workload.compute_time_s
    rows = []
    for algorithm, kwargs in _candidates(cluster, list(algorithms)):
        cost = cost_model.allreduce_cost(
            algorithm,
            cluster,
            payload,
            value_bytes=workload.bytes_per_value,
            compression=compression,
            num_packs=packs,
            **kwargs,
        )
        step = compute + (1.0 - workload.overlap) * cost.total_s
        rows.append(
            PlanRow(
                cost=cost,
                compute_s=compute,
                step_s=step,
                scaling_efficiency=compute / step,
                images_per_second=cluster.num_accelerators * workload.per_accelerator_batch / step,
            )
        )
    rows.sort(key=lambda r: (round(r.step_s, 12), _SIMPLICITY.get(r.cost.algorithm, 4), r.cost.num_steps))
    return rows


def recommend(cluster, workload, **kwargs):
    """Returns the fastest `PlanRow` of `plan(cluster, workload, **kwargs)`.

    Raises:
      ValueError: if no candidate applies (e.g. ``algorithms=("torus",)`` with a prime N),
        and as `plan`.
    """
    rows = plan(cluster, workload, **kwargs)
    if not rows:
        raise ValueError(
            f"No candidate all-reduce applies to num_accelerators={cluster.num_accelerators} "
            f"with algorithms={kwargs.get('algorithms')!r} (a torus needs a grid with both "
            "sides >= 2)."
        )
    return rows[0]


def scaling_curve(cluster, workload, counts, **kwargs):
    """The best candidate of each algorithm at several cluster sizes (for plots).

    Args:
      cluster: `Cluster` whose links and node size are kept; only N changes.
      workload: `Workload`.
      counts: iterable of ints, numbers of accelerators, each a multiple of
        ``cluster.accelerators_per_node``.
      **kwargs: passed to `plan` (compression, bytes_per_pack, fuse, algorithms).

    Returns:
      dict mapping algorithm name -> list of `PlanRow` (one per count where that algorithm
      applies, its best grid or variant), in the order of `counts`.

    Raises:
      ValueError: if a count is not a positive multiple of the node size, and as `plan`.
    """
    curves = {}
    for count in counts:
        rows = plan(cluster.with_num_accelerators(count), workload, **kwargs)
        seen = set()
        for row in rows:  # fastest first, so the first of each algorithm is its best
            if row.cost.algorithm not in seen:
                seen.add(row.cost.algorithm)
                curves.setdefault(row.cost.algorithm, []).append(row)
    return curves
