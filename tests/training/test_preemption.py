"""Preemption (issue 15): `SafeBackupAndRestore.request_stop` backs up the current step and stops; a new
`fit_with_batch_schedule` resumes at that step and ends where an uninterrupted run ends."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfscale import training

STEPS, BATCH = 10, 8


def _data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((STEPS * BATCH, 4)).astype(np.float32)
    y = rng.standard_normal((STEPS * BATCH, 1)).astype(np.float32)
    return x, y


def make_dataset(batch, skip_steps=0):
    x, y = _data()
    # The same batches every epoch, in order: an uninterrupted run's stream is known exactly.
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True).repeat().skip(skip_steps)


def _model():
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse")
    return model


class StopAt(keras.callbacks.Callback):
    def __init__(self, backup, epoch, batch):
        super().__init__()
        self.backup, self.epoch, self.batch, self.current = backup, epoch, batch, None

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.current, batch) == (self.epoch, self.batch):
            self.backup.request_stop()  # as the SIGTERM handler does


def _fit(model, callbacks):
    return training.fit_with_batch_schedule(model, make_dataset, f"0:{BATCH}", STEPS * BATCH, epochs=3,
                                            callbacks=callbacks, verbose=0)


@pytest.mark.parametrize("epoch, batch", [(0, 3), (1, 0), (2, 8)])
def test_stop_backs_up_the_step_and_resume_matches_an_uninterrupted_run(tmp_path, epoch, batch):
    reference = _model()
    _fit(reference, [])

    backup_dir = str(tmp_path / "backup")
    backup = training.SafeBackupAndRestore(backup_dir)
    with pytest.raises(training.TrainingPreempted) as stopped:
        _fit(_model(), [StopAt(backup, epoch, batch), backup])
    assert (stopped.value.epoch, stopped.value.step) == (epoch, batch + 1)
    with open(os.path.join(backup_dir, "training_metadata.json")) as f:
        assert json.load(f) == {"epoch": epoch, "batch": batch + 1}

    lines = []
    resumed_backup = training.SafeBackupAndRestore(backup_dir, print_fn=lines.append)
    model = _model()
    history = _fit(model, [resumed_backup])
    assert any(f"Resuming epoch {epoch + 1} at step {batch + 2}" in line for line in lines)
    assert history.epoch == list(range(epoch, 3))
    assert int(model.optimizer.iterations.numpy()) == 3 * STEPS
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not os.path.exists(backup_dir)  # a finished run deletes its backup, as Keras does


class SigtermAt(keras.callbacks.Callback):
    """Sends this process SIGTERM at the start of one training step, as a preemption notice does."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.epoch, self.batch, self.current = epoch, batch, None

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.current, batch) == (self.epoch, self.batch):
            import signal

            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_through_tf_preemption_handler_backs_up_a_step_and_resume_matches(tmp_path):
    """PreemptionCallback (TF's PreemptionCheckpointHandler in one process): SIGTERM during step S of epoch E
    backs up the state a step or two later, raises TrainingPreempted, and the resumed run ends where an
    uninterrupted one ends."""
    import signal

    reference = _model()
    _fit(reference, [])
    backup_dir = str(tmp_path / "backup")
    previous_handler = signal.getsignal(signal.SIGTERM)
    try:
        backup = training.SafeBackupAndRestore(backup_dir)
        stop = training.PreemptionCallback(backup)  # installs its SIGTERM handler
        with pytest.raises(training.TrainingPreempted) as stopped:
            _fit(_model(), [SigtermAt(1, 4), backup, stop])
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    assert stopped.value.epoch == 1 and 5 <= stopped.value.step <= 6, (stopped.value.epoch, stopped.value.step)
    with open(os.path.join(backup_dir, "training_metadata.json")) as f:
        assert json.load(f) == {"epoch": 1, "batch": stopped.value.step}

    model = _model()
    history = _fit(model, [training.SafeBackupAndRestore(backup_dir)])
    assert history.epoch == [1, 2]
    assert int(model.optimizer.iterations.numpy()) == 3 * STEPS
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_preemption_callback_needs_a_safe_backup():
    with pytest.raises(TypeError, match="backup"):
        training.PreemptionCallback(keras.callbacks.BackupAndRestore("/tmp/x"))


def test_close_stops_the_handler_once_and_the_callback_is_spent(tmp_path):
    """close() (called on every worker before it leaves the cluster) is idempotent; a closed callback refuses to
    train again instead of silently not watching for SIGTERM."""
    import signal

    previous_handler = signal.getsignal(signal.SIGTERM)
    try:
        stop = training.PreemptionCallback(training.SafeBackupAndRestore(str(tmp_path / "backup")))
        stop.close()
        stop.close()
        with pytest.raises(RuntimeError, match="close"):
            stop.on_train_batch_end(0)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
