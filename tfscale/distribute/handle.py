"""What tfscale attached to a strategy it built: a documented handle instead of glued attributes.

`create_strategy` and `create_multi_worker_strategy` record, for each strategy they
return, a `StrategyHandle`: the algorithm, its schedule, the cross-device op, the
multi-worker all-reduce and the collective watchdog. `strategy_handle(strategy)` returns
it; `get_cross_device_ops(strategy)` returns the op any ``MirroredStrategy`` sums with.
"""

import dataclasses
import weakref

__all__ = ["StrategyHandle", "get_cross_device_ops", "strategy_handle"]

_HANDLES = weakref.WeakKeyDictionary()


@dataclasses.dataclass
class StrategyHandle:
    """tfscale's parts of a strategy built by `create_strategy` / `create_multi_worker_strategy`.

    Attributes:
      algorithm: str, the algorithm name the strategy was built with (a registered
        all-reduce name, or one of TF's built-ins: ``"reduction_to_one_device"``,
        ``"hierarchical_copy"``, ``"collective"``).
      num_replicas: int, ``strategy.num_replicas_in_sync``.
      cross_device_ops: the `tf.distribute.CrossDeviceOps` the strategy sums with (a
        `tfscale.distribute.ScheduledAllReduce` in one process), or None (MirroredStrategy's
        default).
      all_reduce: the `tfscale.distribute.MultiWorkerAllReduce` installed in a multi-worker
        strategy, or None (one process, or MWMS's own all-reduce).
      watchdog: the `tfscale.distribute.CollectiveWatchdog` of a multi-worker strategy
        (pass `callbacks()` to ``fit`` / ``evaluate``), or None.
      auto_choice: the `tfscale.planning.AutoChoice` when the strategy was built with
        ``algorithm="auto"`` (the alternatives and their predicted times), else None.
      worker_rank: int >= 0, this process's worker index (0: the chief, which writes checkpoints and
        results); 0 in one process.
      num_workers: int >= 1, worker processes in sync (1 in one process), whichever all-reduce runs, tfscale's
        or MWMS's own (``algorithm="collective"``, where `all_reduce` is None).
    """

    algorithm: str
    num_replicas: int
    cross_device_ops: object = None
    all_reduce: object = None
    watchdog: object = None
    auto_choice: object = None
    worker_rank: int = 0
    num_workers: int = 1

    @property
    def schedule(self):
        """The `tfscale.distribute.algorithms.Schedule` of tfscale's all-reduce, or None.

        In one process the schedule depends on the replica count, known here.
        """
        if self.all_reduce is not None:
            return self.all_reduce.schedule
        op = self.cross_device_ops
        if op is not None and hasattr(op, "schedule"):
            return op.schedule(self.num_replicas)
        return None

    def callbacks(self):
        """list: the Keras callbacks tfscale's strategy needs in ``fit`` / ``evaluate`` (the watchdog)."""
        return [self.watchdog] if self.watchdog is not None else []


def attach(strategy, handle):
    """Records `handle` for `strategy` (used by the strategy factories)."""
    _HANDLES[strategy] = handle
    return handle


def strategy_handle(strategy):
    """Returns the `StrategyHandle` of a strategy built by tfscale, or None for any other.

    Args:
      strategy: a `tf.distribute.Strategy`.

    Returns:
      `StrategyHandle` or None.
    """
    try:
        return _HANDLES.get(strategy)
    except TypeError:  # Not weak-referenceable: not one of ours.
        return None


def get_cross_device_ops(strategy):
    """Returns the `tf.distribute.CrossDeviceOps` that `strategy` sums gradients with.

    The public way to reach what TF keeps in ``strategy.extended._cross_device_ops``
    (read through the version-guarded `_tf_compat`).

    Args:
      strategy: a `tf.distribute.MirroredStrategy` or `MultiWorkerMirroredStrategy`.

    Returns:
      The `tf.distribute.CrossDeviceOps`, or None.
    """
    from tfscale import _tf_compat  # noqa: PLC0415 (keeps this module TF-free to import)

    return _tf_compat.cross_device_ops(strategy)
