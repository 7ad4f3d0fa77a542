"""Replicas that are processes outside `tf.distribute`: the small interface between a backend and the layers.

`tfscale.layers.DistributedBatchNormalization` synchronises its statistics over groups of replicas. Under a
`tf.distribute` strategy the replicas and their all-reduce come from ``tf.distribute.get_replica_context()``.
Under Horovod every process is one replica of the default strategy (one replica in sync), so the layer cannot see
the others there; a backend that runs replicas as processes (`tfscale.distribute.horovod`) installs a
`ProcessReplicaContext` here instead with `install`, and the layer asks `current()`.

This module sits at the top of the package so that `tfscale.layers` and `tfscale.distribute` can both use it
without importing each other. It imports nothing from TensorFlow.
"""

import contextlib
import threading

__all__ = ["ProcessReplicaContext", "current", "install", "suspended"]


class ProcessReplicaContext:
    """The replicas of a process-per-replica backend, as the layers need them (interface; backends subclass it).

    Replica ids are ``0 .. num_replicas_in_sync - 1``; a *group* of size ``G`` is the ``G`` contiguous replicas
    ``g*G .. g*G + G - 1``. Every method is a collective: every replica (of the group) calls it with a tensor of
    the same shape and dtype, in the same order.

    Attributes:
      num_replicas_in_sync: int >= 1, the number of replicas (processes).
      replica_id_in_sync_group: int, this process's replica id.
    """

    num_replicas_in_sync = 1
    replica_id_in_sync_group = 0

    def all_reduce(self, reduce_op, value):
        """Sums (``reduce_op`` ``"sum"``/``tf.distribute.ReduceOp.SUM``) `value` over all replicas.

        Args:
          reduce_op: ``tf.distribute.ReduceOp.SUM`` (or ``"sum"``); the only one the layers use.
          value: float `tf.Tensor`, any shape.

        Returns:
          A tensor of `value`'s shape and dtype. Differentiable: its gradient is the all-reduced sum of the
          incoming gradients, as for ``tf.distribute.ReplicaContext.all_reduce``.
        """
        raise NotImplementedError

    def group_all_reduce(self, value, group_size):
        """Sums `value` over this replica's group of `group_size` contiguous replicas (differentiable, like
        `all_reduce`).

        Args:
          value: float `tf.Tensor`, any shape.
          group_size: int dividing `num_replicas_in_sync`.

        Returns:
          A tensor of `value`'s shape and dtype.
        """
        raise NotImplementedError


_LOCK = threading.Lock()
_STATE = {"context": None, "suspended": 0}


def install(context):
    """Makes `context` (a `ProcessReplicaContext`, or None to remove it) the process's replicas; returns the
    previous one."""
    if context is not None and not isinstance(context, ProcessReplicaContext):
        raise TypeError(f"Argument `context` must be a ProcessReplicaContext or None. Received: context={context!r}")
    with _LOCK:
        previous, _STATE["context"] = _STATE["context"], context
    return previous


def current():
    """Returns the installed `ProcessReplicaContext`, or None (none installed, or inside `suspended()`)."""
    return None if _STATE["suspended"] else _STATE["context"]


@contextlib.contextmanager
def suspended():
    """Inside this block `current()` is None: for work that one process does alone (e.g. rank 0's evaluation or
    BN-statistics pass), where a collective would wait for the other processes forever."""
    with _LOCK:
        _STATE["suspended"] += 1
    try:
        yield
    finally:
        with _LOCK:
            _STATE["suspended"] -= 1
