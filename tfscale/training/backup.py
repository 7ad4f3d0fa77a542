"""`SafeBackupAndRestore`: Keras's `BackupAndRestore` with atomic writes, a fallback, and no backup of NaN weights.

Keras's `keras.callbacks.BackupAndRestore` overwrites ``latest.weights.h5`` in place. A process killed in the
middle of that write leaves a truncated HDF5 file, and every later resume fails with h5py's
``OSError: truncated file`` until the user deletes the backup by hand. It also backs up whatever the weights are,
NaN included, and deletes the backup when a `TerminateOnNaN` stop ends the training.

`SafeBackupAndRestore` keeps Keras's file layout (so `fit_with_batch_schedule` and the resume logic read it as
before) and changes three things:

1. **Atomic writes.** Each epoch's weights and metadata are written to temporary files in the backup directory,
   flushed to disk, and renamed over the previous ones (``os.replace``). The previous backup stays as
   ``previous.weights.h5`` and ``previous_training_metadata.json`` (hard links, made before the renames), so a
   backup is always complete: the old one or the new one.
2. **Fallback.** When the latest backup cannot be read (damaged by something else, or written by a version without
   atomic writes), the previous one is used with a warning; when neither can be read, the directory is moved aside
   to ``<backup_dir>.unreadable-<time>`` with a warning and training starts from epoch 0. A damaged backup never
   blocks a resume.
3. **No backup of a diverged model.** An epoch whose loss is NaN or infinite is not backed up, and the backup is
   kept (not deleted) when training stops that way, so the last good epoch can be resumed.

A crash between the two renames leaves the new weights with the old epoch number: the resumed run repeats one epoch.
The Keras-private details (where the parent class keeps its file names, the model's resume epoch) go through
`tfscale._tf_compat`.
"""

import json
import math
import os
import shutil
import time

import keras

from tfscale import _tf_compat

__all__ = ["SafeBackupAndRestore", "TrainingPreempted"]


class TrainingPreempted(Exception):
    """Training stopped at a step because a stop was requested (SIGTERM); the state is backed up at that step.

    Attributes:
      epoch: int, the 0-based epoch that was interrupted.
      step: int, the training steps of that epoch that were done and backed up.
      backup_dir: str, where the backup is.
    """

    def __init__(self, epoch, step, backup_dir):
        super().__init__(f"training stopped by request at epoch {epoch + 1}, step {step}; the state at that step "
                         f"is backed up in {backup_dir}")
        self.epoch, self.step, self.backup_dir = epoch, step, backup_dir


def _write_json_atomically(path, payload):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _previous(path):
    """``previous.weights.h5`` / ``previous_training_metadata.json`` beside ``path`` (Keras loads only
    ``*.weights.h5``)."""
    directory, name = os.path.split(path)
    return os.path.join(directory, "previous" + name[len("latest"):] if name.startswith("latest") else
                        "previous_" + name)


def _fsync(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class SafeBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Backs up the training state at every epoch end, atomically, and restores it at the start of `fit`.

    A drop-in replacement of `keras.callbacks.BackupAndRestore` (a subclass, same files) for `save_freq="epoch"`.

    Args:
      backup_dir: str, the directory of the backup (created when needed).
      delete_checkpoint: bool, delete the backup when training ends normally (default True, as Keras). It is
        never deleted after an epoch with a non-finite loss.
      print_fn: callable taking a str, for the warnings; default `print`.

    Preemption: `request_stop()` (safe to call from a signal handler, e.g. SIGTERM) makes the next training-step
    end back up the state at that step (metadata ``{"epoch": E, "batch": S}``: epoch E interrupted after S steps) and
    raise `TrainingPreempted` out of `fit`; no epoch end, evaluation or clean-up runs, and the backup is kept.
    `fit_with_batch_schedule` resumes such a backup at that step (`resume_step`). `back_up_current_step()` does the
    backup without the stop; `tfscale.training.PreemptionCallback` uses it to make every worker of a cluster back up
    the same step when any one of them is told to stop.

    Attributes:
      diverged_epoch: None, or the 0-based epoch whose loss was not finite (that epoch was not backed up).
      last_backed_up_epoch: None, or the number of epochs completed in the newest backup.
      resume_step: int, the steps of epoch `last_backed_up_epoch` already done in the restored backup (0: the
        backup is at an epoch boundary).

    Raises:
      ValueError: if `backup_dir` is empty.
    """

    def __init__(self, backup_dir, delete_checkpoint=True, print_fn=print):
        super().__init__(backup_dir, save_freq="epoch", double_checkpoint=False,
                         delete_checkpoint=delete_checkpoint)
        self.print_fn = print_fn
        self.diverged_epoch = None
        self.last_backed_up_epoch = None
        self.resume_step = 0
        self.step_offset = 0  # steps of the current epoch done before this fit began (a resumed partial epoch)
        self._stop_requested = False
        self._epoch = 0
        self._batch = -1  # the last training step that ended in the current fit (0-based), -1 before the first

    def request_stop(self, *unused_signal_args):
        """Asks for a backup at the end of the current training step and a `TrainingPreempted` stop.

        Only sets a flag, so it can be a signal handler: `signal.signal(signal.SIGTERM, backup.request_stop)`.
        """
        self._stop_requested = True

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._batch = -1

    @property
    def weights_path(self):
        """Path of the newest backed-up weights (``latest.weights.h5``)."""
        return _tf_compat.backup_file_paths(self)[0]

    @property
    def metadata_path(self):
        """Path of the newest backup's metadata (``training_metadata.json``: the epochs completed)."""
        return _tf_compat.backup_file_paths(self)[1]

    def _restore(self, weights_path, metadata_path):
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)  # optimizer variables exist before loading
        self.model.load_weights(weights_path)
        epoch, step = 0, 0
        if os.path.exists(metadata_path):
            with open(metadata_path) as f:
                meta = json.load(f)
            epoch, step = int(meta["epoch"]), int(meta.get("batch") or 0)
        _tf_compat.set_resume_epoch(self.model, epoch)
        self.last_backed_up_epoch = epoch
        self.resume_step = step
        if step:
            self.print_fn(f"Resuming epoch {epoch + 1} at step {step + 1} (the backup in {self.backup_dir} was "
                          f"taken after step {step}).")
        return epoch

    def on_train_begin(self, logs=None):
        weights, metadata = self.weights_path, self.metadata_path
        self.diverged_epoch = None
        if not os.path.exists(weights):
            if os.path.exists(_previous(weights)):  # only the previous weights survived
                self._fall_back(weights, metadata, "the latest weights file is missing")
            return
        try:
            self._restore(weights, metadata)
        except (OSError, ValueError, KeyError) as err:
            self._fall_back(weights, metadata, f"{type(err).__name__}: {err}")

    def _fall_back(self, weights, metadata, why):
        previous = _previous(weights)
        if os.path.exists(previous):
            try:
                self._restore(previous, _previous(metadata))
                self.print_fn(f"WARNING: the backup in {self.backup_dir} could not be read ({why}); resumed from "
                              f"the previous backup (epoch {self.last_backed_up_epoch}).")
                return
            except (OSError, ValueError, KeyError) as err:
                why += f"; the previous backup neither: {type(err).__name__}: {err}"
        aside = f"{self.backup_dir.rstrip(os.sep)}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
        shutil.move(self.backup_dir, aside)
        _tf_compat.set_resume_epoch(self.model, 0)
        self.last_backed_up_epoch = None
        self.print_fn(f"WARNING: the backup in {self.backup_dir} could not be read ({why}); it was moved to "
                      f"{aside} and training starts from epoch 0.")

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.diverged_epoch = epoch
            kept = f"epoch {self.last_backed_up_epoch}" if self.last_backed_up_epoch else "none yet"
            self.print_fn(f"Epoch {epoch + 1}: loss is {loss}; this epoch is not backed up (the last good "
                          f"backup is kept: {kept}).")
            return
        self._save(epoch + 1)

    def on_train_batch_end(self, batch, logs=None):
        self._batch = batch
        if not self._stop_requested:
            return  # otherwise save_freq="epoch" only
        self._stop_requested = False
        raise self.back_up_current_step()

    def back_up_current_step(self):
        """Backs up the state after the last training step that ended (metadata ``{"epoch": E, "batch": S}``).

        Returns:
          A `TrainingPreempted` (not raised) naming the epoch, the steps of it done and the backup directory.

        Raises:
          RuntimeError: if no training step of this epoch has ended yet.
        """
        if self._batch < 0 and not self.step_offset:
            raise RuntimeError("back_up_current_step() needs a training step of the current epoch to have ended.")
        step = self.step_offset + self._batch + 1
        self._save(self._epoch, step=step)
        return TrainingPreempted(self._epoch, step, self.backup_dir)

    def _save(self, epochs_done, step=0):
        weights, metadata = self.weights_path, self.metadata_path
        os.makedirs(self.backup_dir, exist_ok=True)
        tmp = os.path.join(self.backup_dir, f"tmp-{os.getpid()}.weights.h5")  # Keras requires the suffix
        self.model.save_weights(tmp, overwrite=True)
        _fsync(tmp)
        for path in (weights, metadata):  # keep the previous backup, atomically, while the latest stays in place
            if os.path.exists(path):
                link = f"{_previous(path)}.tmp-{os.getpid()}"
                if os.path.exists(link):
                    os.remove(link)
                os.link(path, link)
                os.replace(link, _previous(path))
        os.replace(tmp, weights)
        _write_json_atomically(metadata, {"epoch": epochs_done, "batch": step})
        self.last_backed_up_epoch = epochs_done

    def on_train_end(self, logs=None):
        if self.diverged_epoch is not None:
            return  # keep the last good backup for a resume
        super().on_train_end(logs)
