"""Worker failures in multi-worker training: one clear error, and per-worker backups.

A dead or hung peer surfaces in the survivors as one of several TF errors
(``DeadlineExceeded``, ``Unavailable``, ``Aborted``, ``Cancelled``); `explain_worker_failures`
turns them into one `WorkerFailureError` that says what happened and what to do. The
watchdog that bounds how long a step may wait is `tfscale.distribute.watchdog`.
"""

import contextlib
import os

import tensorflow as tf

from tfscale.distribute import cluster as cluster_lib
from tfscale.distribute import handle as handle_lib

__all__ = ["WorkerFailureError", "explain_worker_failures", "worker_backup_dir"]


class WorkerFailureError(RuntimeError):
    """A peer worker died or stopped responding during multi-worker training.

    Attributes:
      timeout_seconds: float or None, the collective timeout that was in force.
    """

    def __init__(self, message, timeout_seconds=None):
        super().__init__(message)
        self.timeout_seconds = timeout_seconds


_PEER_FAILURE_ERRORS = (
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.AbortedError,
    tf.errors.CancelledError,
)


_CAUSE_KEYWORDS = ("unhealthy", "timeout", "timed out", "deadline", "aborted", "unavailable", "failed to")


def _summarize_error(err):
    """The most telling line of a TF error message (it often starts 'Graph execution error:')."""
    lines = [l.strip() for l in (getattr(err, "message", None) or str(err)).splitlines() if l.strip()]
    for line in lines:
        if any(k in line.lower() for k in _CAUSE_KEYWORDS):
            return line[:500]
    return lines[0][:500] if lines else type(err).__name__


@contextlib.contextmanager
def explain_worker_failures(strategy=None, timeout_seconds=None):
    """Turns the TF errors a dead peer causes into one clear `WorkerFailureError`.

    When a worker dies, each survivor's next collective fails either after the
    collective timeout (``DeadlineExceeded: Collective ops timeout``) or earlier, when
    TF's coordination service notices the missing heartbeats (``Unavailable: ... tasks
    are unhealthy``). Wrap ``model.fit`` (or a custom loop) in this context to get an
    error that says what happened and what to do.

    Args:
      strategy: the strategy from `create_multi_worker_strategy` (its watchdog's timeout
        is reported) or None.
      timeout_seconds: float or None, the timeout to report when `strategy` is None.

    Yields:
      None.

    Raises:
      WorkerFailureError: from ``UnavailableError``, ``DeadlineExceededError``,
        ``AbortedError`` or ``CancelledError`` raised inside the block; the original error
        is chained as ``__cause__``.

    Example:
      >>> with explain_worker_failures(strategy):
      ...     model.fit(dataset, epochs=90, callbacks=[*strategy_handle(strategy).callbacks(), backup])
    """
    handle = handle_lib.strategy_handle(strategy) if strategy is not None else None
    watchdog = handle.watchdog if handle is not None else None
    if watchdog is not None and timeout_seconds is None:
        timeout_seconds = watchdog.timeout_seconds
    try:
        yield
    except _PEER_FAILURE_ERRORS as err:
        cause = _summarize_error(err)
        raise WorkerFailureError(
            "Multi-worker training stopped: a peer worker died or stopped responding. "
            f"A collective did not complete within the collective timeout "
            f"(timeout_seconds={timeout_seconds}) or TF's coordination service saw a worker "
            "stop sending heartbeats. A failed collective poisons this process, so restart "
            "all workers; with keras.callbacks.BackupAndRestore the run resumes from the last "
            f"completed epoch. Cause ({type(err).__name__}): {cause}",
            timeout_seconds=timeout_seconds,
        ) from err


def worker_backup_dir(backup_dir, strategy=None):
    """Returns this worker's ``BackupAndRestore`` directory under `backup_dir`.

    Keras 3's ``BackupAndRestore`` is not multi-worker aware: two workers writing one
    file collide on the HDF5 file lock. Every worker therefore backs up into its own
    sub-directory ``backup_dir/worker{rank}``; the weights are identical on all workers
    after each synchronous epoch, so each one restores its own copy.

    Args:
      backup_dir: str, the directory given on the command line.
      strategy: a strategy from `create_multi_worker_strategy`, or None (then the rank is
        read from the environment; one process gives rank 0).

    Returns:
      str, ``os.path.join(backup_dir, f"worker{rank}")``.
    """
    handle = handle_lib.strategy_handle(strategy) if strategy is not None else None
    reducer = handle.all_reduce if handle is not None else None
    if reducer is not None:
        rank = reducer.worker_rank
    else:
        info = cluster_lib.cluster_from_environment()
        rank = 0 if info is None else info.rank
    return os.path.join(backup_dir, f"worker{rank}")
