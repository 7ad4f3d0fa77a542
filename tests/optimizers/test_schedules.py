"""Tests for tfscale.optimizers.schedules: hand-computed tables, continuity, serialisation."""

import re

import numpy as np
import pytest
import keras
import tensorflow as tf

from tfscale.optimizers import (
    SlowStart,
    WarmupCosineDecay,
    WarmupPiecewise,
    WarmupPolynomialDecay,
    epochs_from_steps,
    mlperf_lars_hyperparameters,
    normalize_steps_per_epoch,
    scaled_learning_rate,
    steps_before_epoch,
)


def _values(schedule, steps):
    return [float(schedule(tf.constant(s, tf.int64))) for s in steps]


# --- the epoch clock ---------------------------------------------------------


@pytest.mark.parametrize(
    "clock, step, epoch",
    [
        (10, 0, 0.0), (10, 5, 0.5), (10, 37, 3.7),
        # 10 steps/epoch for epochs 0-3, then 5 steps/epoch (batch doubled at epoch 4).
        ([[0, 10], [4, 5]], 40, 4.0), ([[0, 10], [4, 5]], 41, 4.2), ([[0, 10], [4, 5]], 50, 6.0),
        # three phases: 8 steps/epoch, from epoch 1 4, from epoch 3 2.
        ([[0, 8], [1, 4], [3, 2]], 12, 2.0), ([[0, 8], [1, 4], [3, 2]], 16, 3.0),
        ([[0, 8], [1, 4], [3, 2]], 19, 4.5),
    ],
)
def test_epoch_clock_table(clock, step, epoch):
    assert float(epochs_from_steps(step, clock)) == pytest.approx(epoch, rel=1e-6)


def test_epoch_clock_inverse_and_continuity():
    clock = [[0, 8], [1, 4], [3, 2]]
    for e in range(7):
        assert float(epochs_from_steps(steps_before_epoch(e, clock), clock)) == pytest.approx(e)
    assert [steps_before_epoch(e, clock) for e in range(6)] == [0, 8, 12, 16, 18, 20]
    epochs = np.array([float(epochs_from_steps(s, clock)) for s in range(25)])
    assert np.all(np.diff(epochs) > 0) and np.max(np.diff(epochs)) <= 0.5 + 1e-6


def test_epoch_clock_in_tf_function():
    f = tf.function(lambda s: epochs_from_steps(s, [[0, 10], [4, 5]]))
    assert float(f(tf.constant(45, tf.int64))) == pytest.approx(5.0)


# --- WarmupPolynomialDecay ---------------------------------------------------


def test_warmup_poly_table():
    # peak 2, warm-up 2 epochs, 10 epochs, end 0.1, power 2, 10 steps/epoch.
    s = WarmupPolynomialDecay(2.0, warmup_epochs=2, total_epochs=10, steps_per_epoch=10,
                              end_learning_rate=0.1, power=2.0)
    got = _values(s, [0, 5, 10, 20, 60, 80, 100, 150])
    # e = 0, .5, 1, 2, 6, 8, 10, 15: warm-up 2*e/2; then 1.9*(1-(e-2)/8)**2 + .1.
    want = [0.0, 0.5, 1.0, 2.0, 1.9 * 0.25 + 0.1, 1.9 * 0.0625 + 0.1, 0.1, 0.1]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_warmup_poly_mlperf_power_and_no_warmup():
    s = WarmupPolynomialDecay(13.0, warmup_epochs=0, total_epochs=4, steps_per_epoch=1,
                              end_learning_rate=0.0, power=2.2)
    np.testing.assert_allclose(_values(s, [0, 1, 2, 3]),
                               [13.0 * (1 - e / 4) ** 2.2 for e in range(4)], rtol=1e-5)


def test_warmup_poly_continuous_across_batch_phases():
    """Batch doubles at epoch 3 (steps/epoch 10 -> 5): lr as a function of epochs is unchanged."""
    plain = WarmupPolynomialDecay(4.0, 2, 8, steps_per_epoch=10, end_learning_rate=0.0)
    phased = WarmupPolynomialDecay(4.0, 2, 8, steps_per_epoch=[[0, 10], [3, 5]],
                                   end_learning_rate=0.0)
    # Same epochs: phased step 30 + 5k is epoch 3 + k, plain step 30 + 10k.
    np.testing.assert_allclose(_values(phased, [30 + 5 * k for k in range(6)]),
                               _values(plain, [30 + 10 * k for k in range(6)]), rtol=1e-5)
    lrs = np.array(_values(phased, range(20, 45)))
    # Max slope: peak/(total - warm-up) * 2 per epoch = 4/6*2 per epoch, at most 1/5 epoch a step.
    assert np.max(np.abs(np.diff(lrs))) <= 4.0 / 6.0 * 2 / 5 + 1e-5


def test_warmup_cosine_table():
    s = WarmupCosineDecay(1.0, warmup_epochs=1, total_epochs=5, steps_per_epoch=2,
                          end_learning_rate=0.2)
    got = _values(s, [0, 1, 2, 4, 6, 10, 12])
    # e = 0, .5, 1, 2, 3, 5, 6; after warm-up: .2 + .8 * (1 + cos(pi * (e - 1) / 4)) / 2.
    want = [0.0, 0.5, 1.0, 0.2 + 0.4 * (1 + np.cos(np.pi / 4)), 0.6, 0.2, 0.2]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)



def _old_warmup_cosine(peak, warmup, total, end, epoch):
    """tfscale's own warm-up + cosine formula before it was built on Keras's CosineDecay (numpy, float64)."""
    fraction = np.clip((epoch - warmup) / (total - warmup), 0.0, 1.0)
    decayed = end + (peak - end) * 0.5 * (1.0 + np.cos(np.pi * fraction))
    return np.where(epoch < warmup, peak * epoch / warmup if warmup > 0 else peak, decayed)


@pytest.mark.parametrize(
    "peak, warmup, total, end, clock",
    [
        (1.6, 1.0, 12, 0.0, 234),  # train.py's fashion_mnist default with --lr_schedule=warmup_cosine
        (3.2, 5.0, 90, 1e-4, [[0, 312], [10, 156], [30, 78]]),  # batch-size control: three phases
        (0.5, 0.0, 4, 0.05, 7),  # no warm-up
        (2.0, 2.5, 6, 0.2, [[0, 10], [3, 5]]),  # fractional warm-up, a phase change after it
    ],
)
def test_warmup_cosine_equals_the_former_formula(peak, warmup, total, end, clock):
    """Built on keras.optimizers.schedules.CosineDecay, the schedule keeps the values of tfscale's former formula
    at every step (including after the end of training and across batch-size phases)."""
    s = WarmupCosineDecay(peak, warmup_epochs=warmup, total_epochs=total, steps_per_epoch=clock,
                          end_learning_rate=end)
    last = steps_before_epoch(int(total) + 2, clock)
    steps = sorted(set(np.linspace(0, last, 400).astype(int).tolist()))
    epochs = np.array([float(epochs_from_steps(tf.constant(k, tf.int64), clock)) for k in steps])
    np.testing.assert_allclose(_values(s, steps), _old_warmup_cosine(peak, warmup, total, end, epochs),
                               rtol=2e-6, atol=2e-7 * peak)
    assert isinstance(s._in_epochs, keras.optimizers.schedules.CosineDecay)

# --- WarmupPiecewise / SlowStart ----------------------------------------------


def test_piecewise_goyal_table():
    s = WarmupPiecewise(1.0, boundaries=[3, 6], multipliers=[1.0, 0.1, 0.01], steps_per_epoch=4,
                        warmup_epochs=2, warmup_start_learning_rate=0.2)
    got = _values(s, [0, 2, 4, 8, 11, 12, 23, 24, 100])
    want = [0.2, 0.4, 0.6, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_slow_start_akiba_table():
    s = SlowStart(scaled_learning_rate(0.1, 32768), steps_per_epoch=2)  # base 12.8
    got = _values(s, [0, 79, 80, 139, 140, 169, 170, 400])
    want = [6.4, 6.4, 0.96, 0.96, 0.128, 0.128, 0.0128, 0.0128]
    np.testing.assert_allclose(got, want, rtol=1e-5)


# --- helpers ---------------------------------------------------------------------


def test_scaled_learning_rate():
    assert scaled_learning_rate(0.1, 8192) == pytest.approx(3.2)
    assert scaled_learning_rate(0.1, 512, reference_batch=128) == pytest.approx(0.4)


@pytest.mark.parametrize(
    "batch, peak, warmup",
    [(256, 10.0, 5), (16383, 10.0, 5), (16384, 25.0, 5), (32767, 25.0, 5), (32768, 31.2, 25),
     (65536, 31.2, 25)],
)
def test_mlperf_table(batch, peak, warmup):
    hp = mlperf_lars_hyperparameters(batch)
    assert (hp["peak_learning_rate"], hp["warmup_epochs"]) == (peak, warmup)
    assert (hp["power"], hp["end_learning_rate"]) == (2.0, 1e-4)


# --- serialisation ---------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule",
    [
        WarmupPolynomialDecay(2.0, 1.5, 9, steps_per_epoch=[[0, 10], [4, 5]], power=2.2),
        WarmupPiecewise(0.5, [2, 4], [1, 0.1, 0.01], steps_per_epoch=3, warmup_epochs=1),
        SlowStart(0.4, steps_per_epoch=[[0, 6], [1, 3]]),
        WarmupCosineDecay(1.0, 2, 10, steps_per_epoch=4, end_learning_rate=0.1),
    ],
    ids=["poly", "piecewise", "slow_start", "cosine"],
)
def test_schedule_serialisation(schedule, tmp_path):
    config = schedule.get_config()
    clone = type(schedule).from_config(config)
    assert clone.get_config() == config
    restored = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
    assert type(restored) is type(schedule)
    steps = [0, 3, 7, 20, 50]
    np.testing.assert_allclose(_values(restored, steps), _values(schedule, steps), rtol=1e-7)
    # .keras round trip through an optimizer.
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(schedule), loss="mse")
    path = str(tmp_path / "s.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.optimizer._learning_rate.get_config() == config


# --- errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: WarmupPolynomialDecay(0.0, 1, 5, 10), "Argument `peak_learning_rate` must be > 0.0. Received: peak_learning_rate=0.0"),
        (lambda: WarmupPolynomialDecay(-1.0, 1, 5, 10), "Received: peak_learning_rate=-1.0"),
        (lambda: WarmupPolynomialDecay(1.0, 6, 5, 10), "Argument `warmup_epochs` must be < total_epochs (total_epochs=5.0). Received: warmup_epochs=6"),
        (lambda: WarmupPolynomialDecay(1.0, 5, 5, 10), "Received: warmup_epochs=5"),
        (lambda: WarmupPolynomialDecay(1.0, 1, 5, 10, end_learning_rate=2.0), "Argument `end_learning_rate` must be <= 1.0"),
        (lambda: WarmupPolynomialDecay(1.0, 1, 5, 10, power=0.0), "Argument `power` must be > 0.0"),
        (lambda: WarmupPolynomialDecay(1.0, 1, 5, 0), "Argument `steps_per_epoch` must be an integer > 0. Received: steps_per_epoch=0"),
        (lambda: WarmupPolynomialDecay(1.0, 1, 5, [[2, 10]]), "Argument `steps_per_epoch` must start at epoch 0"),
        (lambda: WarmupPolynomialDecay(1.0, 1, 5, [[0, 10], [0, 5]]), "strictly increasing start epochs"),
        (lambda: WarmupCosineDecay(1.0, 3, 2, 10), "Received: warmup_epochs=3"),
        (lambda: WarmupPiecewise(0.0, [1], [1, 0.1], 10), "Argument `base_learning_rate` must be > 0.0"),
        (lambda: WarmupPiecewise(1.0, [1], [1], 10), "Argument `multipliers` must have len(boundaries) + 1 = 2"),
        (lambda: WarmupPiecewise(1.0, [2, 1], [1, 1, 1], 10), "Argument `boundaries` must be strictly increasing"),
        (lambda: WarmupPiecewise(1.0, [1], [1, 0.0], 10), "Argument `multipliers` must all be > 0"),
        (lambda: WarmupPiecewise(1.0, [2], [1, 0.1], 10, warmup_epochs=3), "Argument `warmup_epochs` must be <= the first boundary (2.0). Received: warmup_epochs=3"),
        (lambda: SlowStart(-0.1, 10), "Argument `base_learning_rate` must be > 0.0. Received: base_learning_rate=-0.1"),
        (lambda: scaled_learning_rate(0.1, 0), "Argument `global_batch_size` must be an integer > 0. Received: global_batch_size=0"),
        (lambda: mlperf_lars_hyperparameters(-5), "Received: global_batch_size=-5"),
        (lambda: normalize_steps_per_epoch("x"), "Argument `steps_per_epoch`"),
    ],
)
def test_errors_name_argument_and_value(make, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        make()
