"""The registry of all-reduce algorithms: one name, one schedule builder, every backend.

Pure Python, no TensorFlow (`tfscale.planning` imports it). Each algorithm lives in one
module of this package, which registers a builder ``builder(num_ranks, **params) ->
Schedule`` under its name with `register_algorithm` (or the `algorithm` decorator). Every
module of the package is imported when the registry is first used, so adding an algorithm
is adding one module. Everything that takes an algorithm name reads the names from here:
`tfscale.distribute.create_strategy`, `create_multi_worker_strategy`, the planner
(`tfscale.planning`), `scripts/train.py --all_reduce` and the benchmarks.

Built in:

* ``flat``: one all-reduce over all ranks (alias ``ring``: each backend runs it with its
  bandwidth-optimal all-reduce; the cost model prices it as a ring);
* ``torus``: the 2D torus of Mikami et al., arXiv:1811.05233, and Ying et al.,
  arXiv:1811.06992;
* ``hierarchical``: Jia et al., arXiv:1807.11205 (and its reduce-to-leader variant);
* ``halving_doubling``: Rabenseifner's algorithm (Thakur, Rabenseifner and Gropp, IJHPCA
  19(1), 2005).

Example:
  >>> from tfscale.distribute import algorithms
  >>> print(algorithms.build_schedule("torus", 8, grid_shape="2x4").describe())
  torus(grid_shape=(2, 4)) on 8 ranks: 3 phase(s)
    0. reduce_scatter over 2 group(s) of 4 (row) on 1 of the buffer
    1. all_reduce over 4 group(s) of 2 (column) on 1/4 of the buffer
    2. all_gather over 2 group(s) of 4 (row) on 1/4 of the buffer
"""

import dataclasses
import importlib
import inspect
import pkgutil
import threading

from tfscale.distribute.algorithms.schedule import ALL_GATHER
from tfscale.distribute.algorithms.schedule import ALL_REDUCE
from tfscale.distribute.algorithms.schedule import BROADCAST
from tfscale.distribute.algorithms.schedule import KINDS
from tfscale.distribute.algorithms.schedule import REDUCE
from tfscale.distribute.algorithms.schedule import REDUCE_SCATTER
from tfscale.distribute.algorithms.schedule import Phase
from tfscale.distribute.algorithms.schedule import Schedule

__all__ = [
    "ALL_GATHER",
    "ALL_REDUCE",
    "Algorithm",
    "BROADCAST",
    "KINDS",
    "Phase",
    "REDUCE",
    "REDUCE_SCATTER",
    "Schedule",
    "algorithm",
    "algorithm_names",
    "build_schedule",
    "canonical_name",
    "get_algorithm",
    "register_algorithm",
    "unregister_algorithm",
]

ALIASES = {"ring": "flat"}
"""Old names still accepted: ``ring`` is the flat all-reduce."""


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """A registered all-reduce algorithm.

    Attributes:
      name: str, the registered name.
      builder: callable ``builder(num_ranks, **params) -> Schedule``.
      parameters: tuple of str, the topology parameters the builder accepts (e.g.
        ``("grid_shape",)``), read from its signature.
      description: str, one line (the builder's docstring's first line by default).
    """

    name: str
    builder: object
    parameters: tuple
    description: str = ""


_REGISTRY = {}
_LOCK = threading.RLock()
_LOADED = [False]


def _load_builtins():
    """Imports every module of this package once (each registers its algorithms)."""
    with _LOCK:
        if _LOADED[0]:
            return
        _LOADED[0] = True
        for info in pkgutil.iter_modules(__path__):
            if info.name != "schedule":
                importlib.import_module(f"{__name__}.{info.name}")


def register_algorithm(name, builder, *, description=None, replace=False):
    """Registers `builder` as the all-reduce algorithm `name`.

    Args:
      name: str, a new name (lower case, digits and ``_``), not an alias.
      builder: callable ``builder(num_ranks, **params) -> Schedule`` (or a list of
        `Phase`, which is wrapped in a `Schedule`). Its keyword parameters are the
        topology parameters users may pass (``grid_shape``, ``devices_per_node``, ...);
        each must have a default.
      description: str or None (the builder's docstring's first line).
      replace: bool, allow replacing an existing registration. Default False.

    Returns:
      The `Algorithm` entry.

    Raises:
      TypeError: if `builder` is not callable.
      ValueError: for an invalid or already registered `name`, or a parameter without
        a default.
    """
    if not isinstance(name, str) or not name or not all(c.islower() or c.isdigit() or c == "_" for c in name):
        raise ValueError(f"Argument `name` must be a lower-case identifier. Received: name={name!r}")
    if not callable(builder):
        raise TypeError(f"Argument `builder` must be callable. Received: builder={builder!r}")
    if name in ALIASES:
        raise ValueError(f"Argument `name`={name!r} is an alias of {ALIASES[name]!r}; choose another name")
    params = []
    for i, p in enumerate(inspect.signature(builder).parameters.values()):
        if i == 0 or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if p.default is p.empty:
            raise ValueError(f"Parameter `{p.name}` of the builder of {name!r} must have a default")
        params.append(p.name)
    if description is None:
        description = (inspect.getdoc(builder) or "").split("\n")[0]
    entry = Algorithm(name, builder, tuple(params), description)
    with _LOCK:
        if name in _REGISTRY and not replace:
            raise ValueError(f"An all-reduce algorithm named {name!r} is already registered")
        _REGISTRY[name] = entry
    return entry


def algorithm(name, **kwargs):
    """Decorator form of `register_algorithm`: ``@algorithm("torus")`` above a builder."""

    def decorate(builder):
        register_algorithm(name, builder, **kwargs)
        return builder

    return decorate


def unregister_algorithm(name):
    """Removes `name` from the registry (for tests); a missing name is ignored."""
    with _LOCK:
        _REGISTRY.pop(name, None)


def algorithm_names():
    """Returns the registered names, sorted (aliases not included)."""
    _load_builtins()
    with _LOCK:
        return tuple(sorted(_REGISTRY))


def canonical_name(name):
    """Returns the registered name for `name` (resolving aliases such as ``ring``).

    Raises:
      ValueError: for an unknown name; the message lists the valid names.
    """
    _load_builtins()
    resolved = ALIASES.get(name, name)
    with _LOCK:
        if not isinstance(resolved, str) or resolved not in _REGISTRY:
            raise ValueError(
                f"Unknown all_reduce algorithm {name!r}; expected one of {list(algorithm_names())} "
                f"(aliases: {ALIASES})"
            )
    return resolved


def get_algorithm(name):
    """Returns the `Algorithm` registered as `name` (aliases resolved).

    Raises:
      ValueError: for an unknown name; the message lists the valid names.
    """
    name = canonical_name(name)
    with _LOCK:
        return _REGISTRY[name]


def build_schedule(name, num_ranks, **params):
    """Builds and checks the `Schedule` of algorithm `name` for `num_ranks` ranks.

    Args:
      name: a registered name or alias.
      num_ranks: int >= 1.
      **params: topology parameters; None values are dropped (the builder's default).
        Passing one the algorithm does not take is an error.

    Returns:
      A checked `Schedule` (`Schedule.check` has proved it all-reduces).

    Raises:
      ValueError: for an unknown name, a parameter the algorithm does not take (naming
        the algorithms that do), a topology that does not fit `num_ranks`, or a builder
        whose phases are not an all-reduce.
      TypeError: for a parameter of the wrong type.
    """
    entry = get_algorithm(name)
    params = {k: v for k, v in params.items() if v is not None}
    for key, value in params.items():
        if key not in entry.parameters:
            takers = [a for a in algorithm_names() if key in _REGISTRY[a].parameters]
            raise ValueError(
                f"Argument `{key}` does not apply to all_reduce algorithm {entry.name!r} (it applies to "
                f"{takers}). Received: {key}={value!r}"
            )
    result = entry.builder(num_ranks, **params)
    if isinstance(result, Schedule):
        if result.num_ranks != num_ranks:
            raise ValueError(f"The builder of {entry.name!r} returned a schedule for {result.num_ranks} ranks, not {num_ranks}")
        return result
    return Schedule(entry.name, num_ranks, tuple(result), tuple(sorted(params.items())))
