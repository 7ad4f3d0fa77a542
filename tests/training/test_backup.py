"""Tests of tfscale.training.backup.SafeBackupAndRestore (issue 18, items 3 and 8): a backup damaged mid-save never
blocks a resume, and an epoch with a NaN loss is not backed up and does not delete the last good backup."""

import os

import keras
import numpy as np
import pytest

from tfscale.training.backup import SafeBackupAndRestore


def _model(lr=0.01):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    return model


def _data():
    rng = np.random.RandomState(0)
    return rng.normal(size=(32, 4)).astype("float32"), rng.normal(size=(32, 3)).astype("float32")


class _StopAfter(keras.callbacks.Callback):
    """Simulates a crash: stops fit after `epochs` epochs by raising."""

    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epochs:
            raise KeyboardInterrupt


def _interrupted_run(backup_dir, epochs_before_crash=2):
    model = _model()
    x, y = _data()
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, epochs=5, batch_size=8, verbose=0,
                  callbacks=[SafeBackupAndRestore(backup_dir), _StopAfter(epochs_before_crash)])


def test_resume_after_a_truncated_latest_backup_uses_the_previous_one(tmp_path):
    backup_dir = str(tmp_path / "backup")
    _interrupted_run(backup_dir)
    latest = os.path.join(backup_dir, "latest.weights.h5")
    assert os.path.exists(os.path.join(backup_dir, "previous.weights.h5"))
    with open(latest, "r+b") as f:  # a write cut short, as Keras's in-place save leaves it
        f.truncate(os.path.getsize(latest) // 2)
    messages = []
    model = _model()
    x, y = _data()
    history = model.fit(x, y, epochs=5, batch_size=8, verbose=0,
                        callbacks=[SafeBackupAndRestore(backup_dir, print_fn=messages.append)])
    assert history.epoch == [1, 2, 3, 4]  # the previous backup (1 epoch done) was used
    assert any("could not be read" in m and "previous backup (epoch 1)" in m for m in messages)
    # Keras's own callback is blocked by the same damage (the bug this fixes).
    _interrupted_run(str(tmp_path / "plain"))
    with open(os.path.join(str(tmp_path / "plain"), "latest.weights.h5"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(OSError):
        _model().fit(x, y, epochs=5, batch_size=8, verbose=0,
                     callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path / "plain"))])


def test_unreadable_backup_is_moved_aside_and_training_starts_over(tmp_path):
    backup_dir = str(tmp_path / "backup")
    _interrupted_run(backup_dir)
    for name in ("latest.weights.h5", "previous.weights.h5"):
        with open(os.path.join(backup_dir, name), "wb") as f:
            f.write(b"\x89HDF\r\n\x1a\n truncated")
    messages = []
    history = _model().fit(*_data(), epochs=2, batch_size=8, verbose=0,
                           callbacks=[SafeBackupAndRestore(backup_dir, print_fn=messages.append)])
    assert history.epoch == [0, 1]
    assert any("moved to" in m for m in messages)
    assert [p for p in os.listdir(tmp_path) if p.startswith("backup.unreadable-")]


def test_nan_epoch_is_not_backed_up_and_the_good_backup_is_kept(tmp_path):
    backup_dir = str(tmp_path / "backup")
    model = _model()
    x, y = _data()

    class _PoisonAtEpoch2(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                self.model.layers[0].kernel.assign(np.full((4, 3), np.nan, "float32"))

    messages = []
    backup = SafeBackupAndRestore(backup_dir, print_fn=messages.append)
    history = model.fit(x, y, epochs=4, batch_size=8, verbose=0,
                        callbacks=[_PoisonAtEpoch2(), keras.callbacks.TerminateOnNaN(), backup])
    assert len(history.epoch) == 2 and backup.diverged_epoch == 1
    assert os.path.isdir(backup_dir)  # not deleted at the end of training
    restored = _model()
    resumed = restored.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[SafeBackupAndRestore(backup_dir)])
    assert resumed.epoch == [1]  # resumes after the last good epoch
    assert np.isfinite(restored.layers[0].kernel.numpy()).all()
