"""Tests for tfscale.training.batch_size_control (Mikami et al., arXiv:1811.05233)."""

import os
import re

import numpy as np
import pytest
import keras
import tensorflow as tf

from tfscale.optimizers import LARS, WarmupPolynomialDecay
from tfscale.training.batch_size_control import BatchSizeSchedule, fit_with_batch_schedule

# --- the schedule ------------------------------------------------------------------


def test_parse_and_queries():
    s = BatchSizeSchedule.parse(" 0:4096, 10:8192 ", num_replicas=8)
    assert s.phases == ((0, 4096), (10, 8192))
    assert str(s) == "0:4096,10:8192" and BatchSizeSchedule.parse(str(s), 8) == s
    assert [s.global_batch_size(e) for e in (0, 9, 10, 89)] == [4096, 4096, 8192, 8192]
    assert s.per_replica_batch_size(10) == 1024
    assert s.steps_per_epoch(0, 1_281_167) == 312 and s.steps_per_epoch(10, 1_281_167) == 156
    assert s.steps_per_epoch_phases(1_281_167) == [[0, 312], [10, 156]]
    assert s.steps_before_epoch(12, 1_281_167) == 10 * 312 + 2 * 156
    assert s.phase_ranges(20) == [(0, 10, 4096), (10, 20, 8192)]
    assert s.phase_ranges(20, initial_epoch=12) == [(12, 20, 8192)]
    assert s.phase_ranges(5) == [(0, 5, 4096)]
    assert BatchSizeSchedule.constant(256).phase_ranges(3) == [(0, 3, 256)]


def test_step_to_epoch_is_a_continuous_tf_computation():
    s = BatchSizeSchedule.parse("0:8,2:16,3:24")
    f = tf.function(lambda step: s.step_to_epoch(step, 48))  # 6, 3, 2 steps per epoch
    got = [float(f(tf.constant(k, tf.int64))) for k in (0, 6, 12, 13, 15, 16, 17)]
    np.testing.assert_allclose(got, [0, 1, 2, 2 + 1 / 3, 3, 3.5, 4], rtol=1e-6)


@pytest.mark.parametrize(
    "spec, replicas, match",
    [
        ("", 1, "Argument `batch_schedule` must be a non-empty string like '0:4096,10:8192'. Received: batch_schedule=''"),
        ("4:64,10:128", 1, "Argument `batch_schedule` must start at epoch 0. Received: batch_schedule=4:64,10:128"),
        ("0:64,0:128", 1, "strictly increasing start epochs (0 then 0). Received: batch_schedule=0:64,0:128"),
        ("0:64,9:128,5:256", 1, "strictly increasing start epochs (9 then 5)"),
        ("0:128,5:64", 1, "strictly increasing global batch sizes (128 then 64). Received: batch_schedule=0:128,5:64"),
        ("0:64,5:64", 1, "strictly increasing global batch sizes (64 then 64)"),
        ("0:64,5:100", 8, "divisible by the number of replicas (8); 100 is not. Received: batch_schedule=0:64,5:100"),
        ("0:abc", 1, "'0:abc' is not. Received: batch_schedule='0:abc'"),
        ("0-64", 1, "'0-64' is not"),
        ("0:0", 1, "global batch sizes > 0. Received: batch_schedule=0:0"),
    ],
)
def test_parse_errors_name_argument_and_value(spec, replicas, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        BatchSizeSchedule.parse(spec, num_replicas=replicas)


def test_other_errors():
    s = BatchSizeSchedule.parse("0:32,1:64")
    with pytest.raises(ValueError, match=re.escape("Received: num_train_examples=40")):
        s.steps_per_epoch_phases(40)
    with pytest.raises(ValueError, match=re.escape("Received: num_replicas=0")):
        BatchSizeSchedule([(0, 8)], num_replicas=0)
    with pytest.raises(ValueError, match=re.escape("Received: epoch=-1")):
        s.global_batch_size(-1)
    with pytest.raises(ValueError, match=re.escape("Received: max_steps_per_epoch=0")):
        s.steps_per_epoch(0, 64, max_steps_per_epoch=0)


def test_steps_cap():
    s = BatchSizeSchedule.parse("0:8,1:16")
    assert s.steps_per_epoch_phases(48) == [[0, 6], [1, 3]]
    assert s.steps_per_epoch_phases(48, max_steps_per_epoch=4) == [[0, 4], [1, 3]]
    assert s.steps_before_epoch(2, 48, max_steps_per_epoch=4) == 7


# --- the driver on a tiny model ------------------------------------------------------

N = 48
SPEC = "0:8,2:16,3:24"  # 6, 6, 3, 2 steps in epochs 0..3
PEAK, WARMUP, TOTAL = 0.4, 1.0, 4.0


class _BatchRecorder(keras.layers.Layer):
    """Identity layer that stores the size of the last training batch it saw."""

    def build(self, input_shape):
        self.seen = self.add_weight(shape=(), dtype="int32", initializer="zeros", trainable=False)

    def call(self, x, training=None):
        if training:
            self.seen.assign(tf.shape(x)[0])
        return x


class _StepLog(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.rows = []  # (epoch, iteration before the step, lr used, batch size)
        self._epoch = None
        self._lr = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        self._it = int(self.model.optimizer.iterations.numpy())
        self._lr = float(np.asarray(self.model.optimizer.learning_rate))

    def on_train_batch_end(self, batch, logs=None):
        seen = int(self.model.get_layer("rec").seen.numpy())
        self.rows.append((self._epoch, self._it, self._lr, seen))


class _Interrupt(keras.callbacks.Callback):
    def __init__(self, after_epoch):
        super().__init__()
        self.after_epoch = after_epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.after_epoch:
            raise KeyboardInterrupt("simulated preemption")


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, 5)).astype("float32"), rng.normal(size=(N, 2)).astype("float32")


def _make_dataset_factory(calls):
    x, y = _data()

    def make(global_batch_size):
        calls.append(global_batch_size)
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        return ds.batch(global_batch_size, drop_remainder=True).repeat()

    return make


def _model(schedule):
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [keras.Input((5,)), _BatchRecorder(name="rec"), keras.layers.Dense(4, activation="tanh"),
         keras.layers.Dense(2)]
    )
    lr = WarmupPolynomialDecay(PEAK, WARMUP, TOTAL, schedule.steps_per_epoch_phases(N),
                               end_learning_rate=0.0)
    model.compile(optimizer=LARS(lr, eta=0.1, weight_decay=1e-3), loss="mse")
    return model


def _reference_epoch(step):
    """Independent step -> epoch map for SPEC and N = 48: 6, 6, 3, 2 steps per epoch."""
    if step < 12:
        return step / 6
    if step < 15:
        return 2 + (step - 12) / 3
    return 3 + (step - 15) / 2


def _reference_lr(epoch):
    if epoch < WARMUP:
        return PEAK * epoch / WARMUP
    return PEAK * (1 - (epoch - WARMUP) / (TOTAL - WARMUP)) ** 2


def test_fit_runs_each_phase_with_its_batch_steps_and_continuous_lr():
    schedule = BatchSizeSchedule.parse(SPEC)
    model = _model(schedule)
    calls, log = [], _StepLog()
    history = fit_with_batch_schedule(
        model, _make_dataset_factory(calls), schedule, N, epochs=4, callbacks=[log], verbose=0
    )
    assert calls == [8, 16, 24]
    assert history.epoch == [0, 1, 2, 3]
    assert history.history["global_batch_size"] == [8, 8, 16, 24]
    assert history.history["steps_per_epoch"] == [6, 6, 3, 2]
    assert len(history.history["loss"]) == 4
    assert int(model.optimizer.iterations.numpy()) == 17
    epochs_seen = [r[0] for r in log.rows]
    assert epochs_seen == [0] * 6 + [1] * 6 + [2] * 3 + [3] * 2
    assert [r[3] for r in log.rows] == [8] * 12 + [16] * 3 + [24] * 2
    assert [r[1] for r in log.rows] == list(range(17))
    lrs = np.array([r[2] for r in log.rows])
    want = np.array([_reference_lr(_reference_epoch(s)) for s in range(17)])
    np.testing.assert_allclose(lrs, want, rtol=1e-5, atol=1e-7)
    # Continuity in epochs: the first LR of each phase is the schedule at the phase's start.
    assert lrs[12] == pytest.approx(_reference_lr(2.0), rel=1e-5)
    assert lrs[15] == pytest.approx(_reference_lr(3.0), rel=1e-5)


@pytest.mark.parametrize("interrupt_after", [1, 2], ids=["at_phase_boundary", "inside_phase_run"])
def test_backup_and_restore_resumes_in_the_right_phase(tmp_path, interrupt_after):
    schedule = BatchSizeSchedule.parse(SPEC)
    reference = _model(schedule)
    fit_with_batch_schedule(reference, _make_dataset_factory([]), schedule, N, epochs=4, verbose=0)

    backup_dir = str(tmp_path / "backup")
    interrupted = _model(schedule)
    with pytest.raises(KeyboardInterrupt):
        fit_with_batch_schedule(
            interrupted, _make_dataset_factory([]), schedule, N, epochs=4, verbose=0,
            callbacks=[keras.callbacks.BackupAndRestore(backup_dir), _Interrupt(interrupt_after)],
        )
    assert os.path.exists(os.path.join(backup_dir, "training_metadata.json"))

    resumed = _model(schedule)  # a fresh process would rebuild the same model
    calls, log = [], _StepLog()
    history = fit_with_batch_schedule(
        resumed, _make_dataset_factory(calls), schedule, N, epochs=4, verbose=0,
        callbacks=[keras.callbacks.BackupAndRestore(backup_dir), log],
    )
    first = interrupt_after + 1
    assert history.epoch == list(range(first, 4))
    assert calls == [schedule.global_batch_size(e) for e in sorted({first, 2, 3}) if e >= first]
    assert log.rows[0][1] == schedule.steps_before_epoch(first, N)  # step counter restored
    assert int(resumed.optimizer.iterations.numpy()) == 17
    assert not os.path.exists(backup_dir)  # deleted once, after the last phase
    for a, b in zip(reference.trainable_variables, resumed.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_mirrored_4_replicas_with_distributed_datasets_equals_one_device(cpu_devices):
    if len(cpu_devices) < 4:
        pytest.skip("needs 4 logical CPU devices")
    schedule = BatchSizeSchedule.parse(SPEC, num_replicas=4)
    one = _model(schedule)
    fit_with_batch_schedule(one, _make_dataset_factory([]), schedule, N, epochs=4, verbose=0)

    strategy = tf.distribute.MirroredStrategy(
        devices=cpu_devices[:4], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    plain = _make_dataset_factory([])
    with strategy.scope():
        four = _model(schedule)
    history = fit_with_batch_schedule(
        four, lambda b: strategy.experimental_distribute_dataset(plain(b)), schedule, N,
        epochs=4, verbose=0,
    )
    assert history.history["steps_per_epoch"] == [6, 6, 3, 2]
    assert int(four.optimizer.iterations.numpy()) == 17
    for a, b in zip(one.trainable_variables, four.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_fit_with_a_steps_cap():
    schedule = BatchSizeSchedule.parse(SPEC)
    model = _model(schedule)
    history = fit_with_batch_schedule(model, _make_dataset_factory([]), schedule, N, epochs=4,
                                      steps_per_epoch=4, verbose=0)
    assert history.history["steps_per_epoch"] == [4, 4, 3, 2]
    assert int(model.optimizer.iterations.numpy()) == 13


def test_driver_errors():
    schedule = BatchSizeSchedule.parse("0:8,1:16")
    model = _model(schedule)
    make = _make_dataset_factory([])
    with pytest.raises(ValueError, match=re.escape("Received: epochs=0")):
        fit_with_batch_schedule(model, make, schedule, N, epochs=0)
    with pytest.raises(ValueError, match=re.escape("Received: max_steps_per_epoch=-2")):
        fit_with_batch_schedule(model, make, schedule, N, epochs=2, steps_per_epoch=-2)
    with pytest.raises(ValueError, match=re.escape("['batch_size']")):
        fit_with_batch_schedule(model, make, schedule, N, epochs=2, batch_size=8)
    with pytest.raises(ValueError, match=re.escape("Received: num_train_examples=10")):
        fit_with_batch_schedule(model, make, schedule, 10, epochs=2)
    with pytest.raises(ValueError, match=re.escape("Argument `schedule` must be")):
        fit_with_batch_schedule(model, make, [(0, 8)], N, epochs=2)
