"""`PreemptionCallback`: when any worker is told to stop (SIGTERM), every worker backs up the same step and stops.

Built on TensorFlow's own mechanism, `tf.distribute.experimental.PreemptionCheckpointHandler`:

1. The handler replaces the process's SIGTERM handler. A worker that receives SIGTERM claims the preemption in the
   coordination service of the cluster (`MultiWorkerMirroredStrategy`'s), or, in one process, just notes it.
2. At its next training-step end, that worker publishes the step at which everyone saves (its own step count + 1)
   and waits until every worker acknowledged it; a watcher thread in every worker receives it.
3. Each worker, on reaching that step (they differ by at most one, since every step all-reduces), calls the
   handler's `save_fn`, here this worker's `SafeBackupAndRestore.back_up_current_step()` (the weights, optimizer
   state and ``{"epoch": E, "batch": S}``, atomically), and then its `exit_fn`, here raising `TrainingPreempted`
   out of `fit`.

So every worker's backup holds the same step, and the same command resumes all of them there
(`fit_with_batch_schedule`). The handler's own `tf.train.Checkpoint` files are not used: Keras's backup format
stays the one resumed from.

Limits of TensorFlow's handler: on a Google Cloud CPU-only VM it does nothing (TensorFlow's choice: "does not
support usage with TPU or CPU device on GCP"), and a stop requested during evaluation or after the last training
step takes effect at the next training step, or not at all when none is left.
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf

from tfscale import _tf_compat
from tfscale.training.backup import SafeBackupAndRestore

__all__ = ["PreemptionCallback"]


class PreemptionCallback(keras.callbacks.Callback):
    """Every worker backs up the same training step and stops when any one of them receives SIGTERM.

    Create it in the main thread, after the strategy and outside `strategy.scope()` (it installs the SIGTERM
    handler and, across processes, a watcher thread on the coordination service), and pass it to `fit` after the
    `backup` callback. When the stop comes, `fit` raises `TrainingPreempted` on every worker, with the same epoch
    and step, and each worker's backup holds that step.

    Args:
      backup: this worker's `SafeBackupAndRestore` (also in the callbacks of `fit`); its
        `back_up_current_step()` writes the backup.
      cluster_resolver: the strategy's `cluster_resolver` (`MultiWorkerMirroredStrategy`), or None in one process
        (`MirroredStrategy`, `OneDeviceStrategy`).
      work_dir: str, a directory of this worker for the handler's checkpoint manager (nothing is written to it;
        default `<backup_dir>/preemption`).

    Raises:
      TypeError: if `backup` is not a `SafeBackupAndRestore`.

    Example:
      >>> backup = SafeBackupAndRestore(backup_dir)
      >>> stop = PreemptionCallback(backup, strategy.cluster_resolver)
      >>> fit_with_batch_schedule(model, ..., callbacks=[backup, stop])  # raises TrainingPreempted on SIGTERM
    """

    def __init__(self, backup, cluster_resolver=None, work_dir=None):
        super().__init__()
        if not isinstance(backup, SafeBackupAndRestore):
            raise TypeError(f"Argument `backup` must be a SafeBackupAndRestore. Received: backup={backup!r}")
        self.backup = backup
        self.stopped = None  # the TrainingPreempted of the stop, once it happened
        work_dir = work_dir or os.path.join(backup.backup_dir, "preemption")
        manager = tf.train.CheckpointManager(tf.train.Checkpoint(), directory=work_dir, max_to_keep=1)
        config = tf.distribute.experimental.TerminationConfig(exit_fn=self._stop, save_fn=self._save, grace_period=0)
        self._handler = tf.distribute.experimental.PreemptionCheckpointHandler(
            cluster_resolver if cluster_resolver is not None and cluster_resolver.cluster_spec().jobs else None,
            manager, termination_config=config)

    def close(self):
        """Stops the handler's watcher threads (idempotent). Call it on every worker once training is over and
        before the process exits, so that no watcher is left waiting on a coordination service that is gone."""
        if self._handler is not None:
            _tf_compat.stop_preemption_watchers(self._handler)
            self._handler = None

    def _save(self):
        self.stopped = self.backup.back_up_current_step()

    def _stop(self):
        raise self.stopped

    def on_train_batch_end(self, batch, logs=None):
        if self._handler is None:
            raise RuntimeError("PreemptionCallback.close() was called; create a new one to train again.")
        # Every worker calls this once per step: the handler counts the calls to agree on the step to save at.
        self._handler.save_checkpoint_if_preempted()
