"""Fit alpha, beta and gamma of the cost model to measured all-reduce times: pure Python.

The timing harness (`scripts/plan_allreduce.py --calibrate`, which runs tfscale's real
all-reduce ops) is separate from the fit: it produces `TimingSample`s, and this module
turns them into a `CostFit` by weighted linear least squares. Each sample's predicted
time is linear in the parameters (Hockney 1994; Thakur, Rabenseifner, Gropp 2005)::

    t = a * alpha + b * beta + c * gamma + d * delta

where ``a`` (sequential steps times packs), ``b`` (bytes on the critical path), ``c``
(bytes added) and ``d`` (collective calls times packs; delta is the launch overhead) come
from `tfscale.planning.cost_model` for the sample's algorithm, worker
count, grid and size on one uniform link. The fit minimises the squared *relative* error
``sum(((a*alpha + b*beta + c*gamma) - t) / t)^2`` so that 1 ms and 1 s timings count the
same, and keeps every parameter >= 0 (an active-set refit drops a parameter that would
come out negative).

For every all-reduce algorithm here ``b = 2c`` (each byte sent is added once on the way
in), so beta and gamma are not separable from all-reduce timings alone: measure gamma on
its own (`fit_reduction_rate`, timing local adds) and pass it to `fit_cost_parameters`.
"""

import dataclasses
import json
import math

from tfscale import _atomic
from tfscale.planning import cluster as cluster_lib
from tfscale.planning import cost_model

__all__ = [
    "CostFit",
    "TimingSample",
    "fit_alpha_beta_delta",
    "fit_cost_parameters",
    "fit_reduction_rate",
    "fit_two_tier",
    "TierSample",
    "TwoTierFit",
    "load_calibration",
    "sample_coefficients",
    "save_calibration",
    "validation_rows",
]


@dataclasses.dataclass(frozen=True)
class TimingSample:
    """One measured all-reduce (the median of several repetitions).

    Attributes:
      algorithm: str, a key of `tfscale.planning.ALGORITHMS`.
      num_workers: int >= 1, processes or devices taking part.
      num_bytes: float >= 0, bytes on the wire per worker (after any compression).
      seconds: float > 0, measured time of one all-reduce of the whole buffer.
      grid_shape: ``(rows, cols)`` for ``"torus"``, else None.
      num_packs: int >= 1, all-reduces the buffer was split into. Default 1.

    Raises:
      ValueError, TypeError: for values out of range or of the wrong type.
    """

    algorithm: str
    num_workers: int
    num_bytes: float
    seconds: float
    grid_shape: object = None
    num_packs: int = 1

    def __post_init__(self):
        if self.algorithm not in cost_model.ALGORITHMS:
            raise ValueError(
                f"Unknown all_reduce_alg {self.algorithm!r}; expected one of "
                f"{sorted(cost_model.ALGORITHMS)}"
            )
        cluster_lib._check_int("num_workers", self.num_workers, 1)
        cluster_lib._check_number("num_bytes", self.num_bytes, 0.0)
        cluster_lib._check_number("seconds", self.seconds, 0.0, strict=True)
        cluster_lib._check_int("num_packs", self.num_packs, 1)
        if self.grid_shape is not None:
            object.__setattr__(self, "grid_shape", tuple(self.grid_shape))

    def to_dict(self):
        """Returns a JSON-friendly dict (``TimingSample(**d)`` reads it back)."""
        return dataclasses.asdict(self)


def sample_coefficients(sample):
    """Returns ``(a, b, c, d)``: the time is ``a*alpha + b*beta + c*gamma + d*delta``.

    The workers are taken to share one node with one uniform link (a single machine).

    Args:
      sample: `TimingSample`.

    Returns:
      A tuple of four floats: steps times packs, bytes on the critical path, bytes added,
      collective calls times packs.
    """
    unit = cluster_lib.Cluster(
        num_accelerators=sample.num_workers,
        accelerators_per_node=sample.num_workers,
        intra_node=cluster_lib.Link(1.0, 1.0),
        inter_node=cluster_lib.Link(1.0, 1.0),
        gamma_s_per_byte=1.0,
        launch_overhead_s=1.0,
    )
    cost = cost_model.allreduce_cost(
        sample.algorithm,
        unit,
        sample.num_bytes,
        grid_shape=sample.grid_shape,
        num_packs=sample.num_packs,
    )
    return cost.latency_s, cost.bandwidth_s, cost.reduction_s, cost.launch_s


def _solve(matrix, vector):
    """Solves a small dense linear system by Gaussian elimination with partial pivoting.

    Returns None when the system is singular (relative pivot below 1e-12).
    """
    n = len(vector)
    a = [list(row) + [v] for row, v in zip(matrix, vector)]
    scale = max((abs(x) for row in matrix for x in row), default=0.0) or 1.0
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12 * scale:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(n):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col])]
    return [a[i][n] / a[i][i] for i in range(n)]


def _weighted_least_squares(rows, targets, weights, free):
    """Least squares over the columns in `free`; returns a full-length solution or None."""
    cols = sorted(free)
    normal = [[0.0] * len(cols) for _ in cols]
    rhs = [0.0] * len(cols)
    for row, t, w in zip(rows, targets, weights):
        for i, ci in enumerate(cols):
            rhs[i] += w * row[ci] * t
            for j, cj in enumerate(cols):
                normal[i][j] += w * row[ci] * row[cj]
    # Normalise the columns so that seconds-per-byte and seconds-per-step are comparable.
    diag = [math.sqrt(normal[i][i]) or 1.0 for i in range(len(cols))]
    scaled = [[normal[i][j] / (diag[i] * diag[j]) for j in range(len(cols))] for i in range(len(cols))]
    solution = _solve(scaled, [rhs[i] / diag[i] for i in range(len(cols))])
    if solution is None:
        return None
    full = [0.0] * len(rows[0])
    for i, ci in enumerate(cols):
        full[ci] = solution[i] / diag[i]
    return full


def _nonnegative_least_squares(rows, targets, weights, free, names):
    """Refits without any parameter that comes out negative, until all are >= 0."""
    free = set(free)
    while free:
        solution = _weighted_least_squares(rows, targets, weights, free)
        if solution is None:
            raise ValueError(
                f"The samples cannot separate the parameters {[names[i] for i in sorted(free)]}: "
                "their coefficients are collinear. Time more message sizes or worker counts, "
                "or fix gamma with `gamma_s_per_byte=` (beta and gamma always move together "
                "in an all-reduce) or delta with `launch_overhead_s=` (alpha and delta move "
                "together when every sample has the same worker count and algorithm)."
            )
        negative = [i for i in free if solution[i] < 0]
        if not negative:
            return solution
        free.discard(min(negative, key=lambda i: solution[i]))
    return [0.0] * len(rows[0])


@dataclasses.dataclass(frozen=True)
class CostFit:
    """Fitted parameters of the alpha-beta-gamma model and how well they fit.

    Attributes:
      alpha_s: float >= 0, seconds per step (latency).
      beta_s_per_byte: float >= 0, seconds per byte sent (1 / bandwidth).
      gamma_s_per_byte: float >= 0, seconds per byte added.
      launch_overhead_s: float >= 0, delta: seconds per collective call.
      num_samples: int, samples used.
      rms_relative_error: float, root mean square of (predicted - measured) / measured.
      max_relative_error: float, the largest |predicted - measured| / measured.
    """

    alpha_s: float
    beta_s_per_byte: float
    gamma_s_per_byte: float
    launch_overhead_s: float = 0.0
    num_samples: int = 0
    rms_relative_error: float = 0.0
    max_relative_error: float = 0.0

    @property
    def bandwidth_bytes_per_s(self):
        """float: ``1 / beta`` in bytes/s (inf when beta is 0)."""
        return math.inf if self.beta_s_per_byte == 0 else 1.0 / self.beta_s_per_byte

    def predict(self, sample):
        """Returns the predicted seconds of `sample` (a `TimingSample`; its time is ignored)."""
        a, b, c, d = sample_coefficients(sample)
        return (a * self.alpha_s + b * self.beta_s_per_byte + c * self.gamma_s_per_byte
                + d * self.launch_overhead_s)

    def link(self):
        """Returns the fit as a `Link` (bandwidth capped at 1e18 B/s when beta is 0)."""
        return cluster_lib.Link(self.alpha_s, min(self.bandwidth_bytes_per_s, 1e18))

    def to_dict(self):
        """Returns a JSON-friendly dict, with the parameters also in us, GB/s and ns/byte."""
        d = dataclasses.asdict(self)
        d.update(
            latency_us=self.alpha_s * 1e6,
            bandwidth_gb_per_s=(
                None if self.beta_s_per_byte == 0 else self.bandwidth_bytes_per_s / cluster_lib.GIGA
            ),
            gamma_ns_per_byte=self.gamma_s_per_byte * 1e9,
            launch_overhead_us=self.launch_overhead_s * 1e6,
        )
        return d


def fit_cost_parameters(samples, gamma_s_per_byte=None, launch_overhead_s=0.0):
    """Fits alpha, beta (and gamma, delta unless given) to measured all-reduce times.

    Args:
      samples: sequence of `TimingSample`, at least as many as there are parameters to
        fit, with different coefficients (e.g. two message sizes at two worker counts).
      gamma_s_per_byte: None (fit gamma too; needs samples that separate it from beta,
        which all-reduce timings alone never do) or float >= 0, a gamma measured on its own
        (see `fit_reduction_rate`), subtracted before fitting.
      launch_overhead_s: float >= 0 (default 0: no per-call term) or None to fit delta,
        the fixed cost per collective call; fitting it needs algorithms that make
        different numbers of calls (ring: 1, torus: 3) at the same worker count.

    Returns:
      `CostFit`, with the relative errors of the fitted model on `samples`.

    Raises:
      ValueError: if there are too few samples or they cannot separate the parameters
        (collinear coefficients), or a fixed parameter is < 0.
      TypeError: if a sample is not a `TimingSample`.

    Example:
      >>> fit = fit_cost_parameters(samples, gamma_s_per_byte=0.3e-9, launch_overhead_s=None)
      >>> fit.alpha_s, fit.bandwidth_bytes_per_s, fit.launch_overhead_s
    """
    samples = list(samples)
    for s in samples:
        if not isinstance(s, TimingSample):
            raise TypeError(f"Argument `samples` must hold TimingSample objects. Received: {s!r}")
    fixed = {}
    if gamma_s_per_byte is not None:
        fixed[2] = cluster_lib._check_number("gamma_s_per_byte", gamma_s_per_byte, 0.0)
    if launch_overhead_s is not None:
        fixed[3] = cluster_lib._check_number("launch_overhead_s", launch_overhead_s, 0.0)
    free = {0, 1, 2, 3} - set(fixed)
    if len(samples) < len(free):
        raise ValueError(
            f"Argument `samples` must have at least {len(free)} timings. Received: {len(samples)}"
        )
    rows = [sample_coefficients(s) for s in samples]
    targets = [s.seconds for s in samples]
    weights = [1.0 / (t * t) for t in targets]
    names = ["alpha", "beta", "gamma", "delta"]
    residual_targets = [t - sum(r[i] * v for i, v in fixed.items()) for r, t in zip(rows, targets)]
    solution = _nonnegative_least_squares(rows, residual_targets, weights, free, names)
    for i, v in fixed.items():
        solution[i] = v
    errors = [(sum(r[i] * solution[i] for i in range(4)) - t) / t for r, t in zip(rows, targets)]
    return CostFit(
        alpha_s=solution[0],
        beta_s_per_byte=solution[1],
        gamma_s_per_byte=solution[2],
        launch_overhead_s=solution[3],
        num_samples=len(samples),
        rms_relative_error=math.sqrt(sum(e * e for e in errors) / len(errors)),
        max_relative_error=max(abs(e) for e in errors),
    )


def fit_reduction_rate(num_bytes, seconds):
    """Fits ``seconds = overhead + gamma * num_bytes`` to timings of a local add.

    Gamma is the cost of adding a received chunk into the local buffer (Thakur,
    Rabenseifner, Gropp 2005); time ``x + y`` on buffers of several sizes to measure it.

    Args:
      num_bytes: sequence of numbers > 0, bytes of one operand, at least two distinct.
      seconds: sequence of floats > 0, the matching median times.

    Returns:
      ``(overhead_s, gamma_s_per_byte)``, both floats >= 0.

    Raises:
      ValueError: if the sequences differ in length, have fewer than two distinct sizes,
        or hold a non-positive value.
    """
    num_bytes, seconds = list(num_bytes), list(seconds)
    if len(num_bytes) != len(seconds):
        raise ValueError(
            "Arguments `num_bytes` and `seconds` must have the same length. "
            f"Received: {len(num_bytes)} and {len(seconds)}"
        )
    for b, t in zip(num_bytes, seconds):
        cluster_lib._check_number("num_bytes", b, 0.0, strict=True)
        cluster_lib._check_number("seconds", t, 0.0, strict=True)
    if len(set(num_bytes)) < 2:
        raise ValueError(
            f"Argument `num_bytes` must hold at least two distinct sizes. Received: {num_bytes}"
        )
    rows = [(1.0, float(b)) for b in num_bytes]
    weights = [1.0 / (t * t) for t in seconds]
    solution = _nonnegative_least_squares(rows, seconds, weights, {0, 1}, ["overhead", "gamma"])
    return solution[0], solution[1]


def fit_alpha_beta_delta(samples, gamma_s_per_byte):
    """Fits alpha, beta and the launch overhead delta with gamma fixed; delta = 0 where it cannot be separated.

    With timings of one algorithm only (e.g. the flat ring alone) every sample makes the
    same number of calls per step, so delta is not identifiable; it is then fixed at 0.

    Args:
      samples: list of `TimingSample`.
      gamma_s_per_byte: float >= 0, seconds per byte added (`fit_reduction_rate`).

    Returns:
      `CostFit`.

    Raises:
      ValueError: as `fit_cost_parameters` (e.g. no samples).
    """
    try:
        return fit_cost_parameters(samples, gamma_s_per_byte, launch_overhead_s=None)
    except ValueError:
        return fit_cost_parameters(samples, gamma_s_per_byte, launch_overhead_s=0.0)


def validation_rows(samples, fit_by_num_workers, label):
    """Predicted against measured time of every sample: the rows of the calibration's validation table.

    Args:
      samples: list of `TimingSample`.
      fit_by_num_workers: a `CostFit`, or a dict mapping a worker count to the `CostFit`
        that predicts samples of that count.
      label: str, the name of the fit (e.g. ``"per_n"``), copied into each row.

    Returns:
      list of dicts with ``fit``, ``algorithm``, ``grid_shape``, ``num_workers``,
      ``num_bytes``, ``measured_ms``, ``predicted_ms`` and ``error`` (relative, signed:
      ``(predicted - measured) / measured``).

    Raises:
      KeyError: if a sample's worker count has no fit in the dict.
    """
    rows = []
    for s in samples:
        fit = fit_by_num_workers[s.num_workers] if isinstance(fit_by_num_workers, dict) else fit_by_num_workers
        predicted = fit.predict(s)
        rows.append({
            "fit": label,
            "algorithm": s.algorithm,
            "grid_shape": list(s.grid_shape) if s.grid_shape else None,
            "num_workers": s.num_workers,
            "num_bytes": s.num_bytes,
            "measured_ms": s.seconds * 1e3,
            "predicted_ms": predicted * 1e3,
            "error": (predicted - s.seconds) / s.seconds,
        })
    return rows


def save_calibration(path, calibration):
    """Writes a calibration dict as JSON to `path`, atomically (temporary file, then rename).

    Args:
      path: str, the file (its directory must exist).
      calibration: JSON-serialisable dict (what ``plan_allreduce.py --calibrate`` builds:
        ``machine``, ``command``, ``reduction``, ``samples``, ``fits``, ``validation``).

    Raises:
      OSError: if the file cannot be written.
      TypeError: if `calibration` is not JSON-serialisable.
    """
    _atomic.write_json_atomic(path, calibration, make_dirs=False, trailing_newline=False, indent=1)


def load_calibration(path):
    """Reads a calibration JSON written by `save_calibration`.

    Returns:
      dict, with ``samples`` as stored (``TimingSample(**d)`` rebuilds each).

    Raises:
      FileNotFoundError: if `path` does not exist.
      ValueError: if it is not a JSON object with a ``samples`` list (naming the file).
    """
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"Calibration file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("samples"), list):
        raise ValueError(f"Calibration file {path} has no 'samples' list; write it with plan_allreduce.py --calibrate")
    return data


@dataclasses.dataclass(frozen=True)
class TierSample:
    """One measured all-reduce on a cluster of nodes (e.g. an emulated one, `tfscale.launch --nodes`).

    Attributes:
      algorithm: str, a registered algorithm name.
      num_workers: int >= 1, ranks taking part (node-major).
      ranks_per_node: int >= 1 dividing `num_workers`.
      num_bytes: float >= 0, bytes of the buffer per rank.
      seconds: float > 0, measured time of one all-reduce.
      params: tuple of ``(name, value)``, the schedule's topology parameters (``grid_shape``, ...).
      num_packs: int >= 1. small_pack_bytes: int or None, as the backend ran it.
    """

    algorithm: str
    num_workers: int
    ranks_per_node: int
    num_bytes: float
    seconds: float
    params: tuple = ()
    num_packs: int = 1
    small_pack_bytes: object = None

    def coefficients(self):
        """The six coefficients of `tfscale.planning.cost_model.schedule_coefficients` for this sample."""
        from tfscale.distribute import algorithms  # noqa: PLC0415 (pure Python)

        schedule = algorithms.build_schedule(self.algorithm, self.num_workers, **dict(self.params))
        return cost_model.schedule_coefficients(schedule, self.ranks_per_node, self.num_bytes,
                                                num_packs=self.num_packs, small_pack_bytes=self.small_pack_bytes)


_TIER_NAMES = ("alpha_intra_s", "beta_intra_s_per_byte", "alpha_inter_s", "beta_inter_s_per_byte",
               "gamma_s_per_byte", "launch_overhead_s")
_TIER_KEYS = ("a_intra", "b_intra", "a_inter", "b_inter", "c", "d")


@dataclasses.dataclass(frozen=True)
class TwoTierFit:
    """Intra- and inter-node alpha and beta, gamma and delta fitted to `TierSample`s (`fit_two_tier`).

    Attributes:
      alpha_intra_s, beta_intra_s_per_byte, alpha_inter_s, beta_inter_s_per_byte, gamma_s_per_byte,
      launch_overhead_s: floats >= 0 (seconds, seconds per byte).
      rms_relative_error, max_relative_error: floats, over the fitted samples.
      num_samples: int.
    """

    alpha_intra_s: float
    beta_intra_s_per_byte: float
    alpha_inter_s: float
    beta_inter_s_per_byte: float
    gamma_s_per_byte: float
    launch_overhead_s: float
    rms_relative_error: float = 0.0
    max_relative_error: float = 0.0
    num_samples: int = 0

    def predict(self, sample):
        """Predicted seconds of a `TierSample`."""
        co = sample.coefficients()
        return sum(co[k] * getattr(self, name) for k, name in zip(_TIER_KEYS, _TIER_NAMES))

    def to_fits(self, ranks_per_node):
        """The ``fits`` of a calibration dict that `tfscale.planning.auto.cluster_for` reads."""
        intra = {"alpha_s": self.alpha_intra_s, "beta_s_per_byte": self.beta_intra_s_per_byte,
                 "gamma_s_per_byte": self.gamma_s_per_byte, "launch_overhead_s": self.launch_overhead_s}
        return {"per_num_processes": {str(ranks_per_node): intra},
                "inter_node": {"alpha_s": self.alpha_inter_s, "beta_s_per_byte": self.beta_inter_s_per_byte}}


def fit_two_tier(samples, gamma_s_per_byte=0.0):
    """Fits intra- and inter-node alpha and beta, and delta, to measured all-reduces on a tiered cluster.

    Weighted least squares on the relative error, every parameter kept >= 0 (as `fit_cost_parameters`), on
    the linear model of `tfscale.planning.cost_model.schedule_coefficients`. gamma is fixed (it moves with
    beta in every all-reduce; measure it with `fit_reduction_rate`).

    Args:
      samples: list of `TierSample` (several algorithms, sizes and topologies make the parameters separable).
      gamma_s_per_byte: float >= 0. Default 0.

    Returns:
      `TwoTierFit`.

    Raises:
      ValueError: for no samples, or coefficients that cannot separate the parameters.
    """
    samples = list(samples)
    if not samples:
        raise ValueError("Argument `samples` must hold at least one TierSample. Received: []")
    gamma = cluster_lib._check_number("gamma_s_per_byte", gamma_s_per_byte, 0.0)
    rows, targets, weights = [], [], []
    for s in samples:
        co = s.coefficients()
        rows.append([co[k] for k in _TIER_KEYS[:4]] + [co["d"]])
        targets.append(s.seconds - gamma * co["c"])
        weights.append(1.0 / (s.seconds * s.seconds))
    names = [n for n in _TIER_NAMES if n != "gamma_s_per_byte"]
    free = [i for i in range(5) if any(r[i] for r in rows)]
    a_i, b_i, a_o, b_o, d = _nonnegative_least_squares(rows, targets, weights, free, names)
    fit = TwoTierFit(a_i, b_i, a_o, b_o, gamma, d)
    errors = [(fit.predict(s) - s.seconds) / s.seconds for s in samples]
    return dataclasses.replace(
        fit, rms_relative_error=math.sqrt(sum(e * e for e in errors) / len(errors)),
        max_relative_error=max(abs(e) for e in errors), num_samples=len(samples))
