"""Tests for tfscale.optimizers.RMSpropWarmup against a numpy reference written here."""

import copy
import math
import re

import numpy as np
import pytest
import keras
import tensorflow as tf

from tfscale.optimizers import RMSpropWarmup, WarmupPolynomialDecay, rmsprop_blend


def _alpha_sgd(e, c, p):
    """Akiba et al., arXiv:1711.04325 (reference code), written independently of tfscale."""
    if e < c:
        return 0.5 * math.exp(2.0 * (e - c) / p)
    if e < c + p / 2.0:
        return 0.5 + (e - c) / p
    return 1.0


def _reference(weights, grads_per_step, lrs, epochs, *, mu1, mu2, eps, eta_rms, c, p, wd, decay):
    w = {k: v.astype(np.float64).copy() for k, v in weights.items()}
    m = {k: np.zeros_like(x) for k, x in w.items()}
    d = {k: np.zeros_like(x) for k, x in w.items()}
    for grads, eta, e in zip(grads_per_step, lrs, epochs):
        a_sgd = _alpha_sgd(e, c, p)
        a_rms = (1.0 - a_sgd) * eta_rms / eta if eta != 0 else 0.0
        for k in w:
            g = grads[k].astype(np.float64) + (wd * w[k] if decay[k] else 0.0)
            m[k] = mu2 * m[k] + (1 - mu2) * g * g
            d[k] = mu1 * d[k] - (a_sgd + a_rms / (np.sqrt(m[k]) + eps)) * g
            w[k] = w[k] + eta * d[k]
    return w


def _data(steps, seed=0):
    rng = np.random.default_rng(seed)
    weights = {"kernel": rng.normal(size=(4, 3)).astype("float32"),
               "bias": rng.normal(size=(3,)).astype("float32")}
    grads = [{k: rng.normal(size=x.shape).astype("float32") for k, x in weights.items()}
             for _ in range(steps)]
    return weights, grads


def _run(opt, weights, grads):
    variables = {k: keras.Variable(x, name=k) for k, x in weights.items()}
    for g in grads:
        opt.apply([tf.constant(g[k]) for k in weights], [variables[k] for k in weights])
    return {k: v.numpy() for k, v in variables.items()}


@pytest.mark.parametrize("e, want", [(0.0, 0.5 * math.exp(-0.8)), (1.0, 0.5 * math.exp(-0.4)),
                                     (2.0, 0.5), (3.0, 0.7), (4.0, 0.9), (4.5, 1.0), (9.0, 1.0)])
def test_blend_table(e, want):
    # c = 2 epochs, p = 5 epochs: hand-computed values.
    assert float(rmsprop_blend(e, 2.0, 5.0)) == pytest.approx(want, rel=1e-6)


def test_blend_is_continuous():
    es = np.linspace(0.0, 20.0, 2001)
    values = np.array([float(rmsprop_blend(e, 10.0, 5.0)) for e in es[::10]])
    assert np.max(np.abs(np.diff(values))) < 0.05
    assert values[0] < 0.01 and values[-1] == 1.0


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_matches_numpy_reference_through_all_three_regimes(wd):
    # 2 steps per epoch, c=1, p=2: epochs 0, 0.5 (RMSprop-heavy), 1, 1.5 (linear), 2+ (SGD).
    steps, spe = 7, 2
    weights, grads = _data(steps)
    hp = dict(mu1=0.9, mu2=0.99, eps=1e-8, eta_rms=3e-3, c=1.0, p=2.0)
    opt = RMSpropWarmup(0.2, steps_per_epoch=spe, momentum=hp["mu1"], rho=hp["mu2"],
                        epsilon=hp["eps"], rmsprop_learning_rate=hp["eta_rms"],
                        blend_center_epochs=hp["c"], blend_period_epochs=hp["p"], weight_decay=wd)
    got = _run(opt, weights, grads)
    want = _reference(weights, grads, [0.2] * steps, [s / spe for s in range(steps)],
                      wd=wd, decay={"kernel": True, "bias": False}, **hp)
    for k in weights:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_zero_learning_rate_and_phased_clock():
    """A warm-up from LR 0 (alpha_rms = 0 at step 0) and a growing batch's phased clock."""
    phases = [[0, 4], [1, 2]]  # 4 steps in epoch 0, then 2 steps per epoch
    schedule = WarmupPolynomialDecay(0.5, warmup_epochs=1, total_epochs=4, steps_per_epoch=phases,
                                     end_learning_rate=0.0)
    steps = 7
    epochs = [0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0]
    lrs = [float(schedule(s)) for s in range(steps)]
    np.testing.assert_allclose(lrs[:5], [0.0, 0.125, 0.25, 0.375, 0.5], rtol=1e-6)
    weights, grads = _data(steps, seed=4)
    opt = RMSpropWarmup(schedule, steps_per_epoch=phases, blend_center_epochs=1.0,
                        blend_period_epochs=2.0)
    got = _run(opt, weights, grads)
    want = _reference(weights, grads, lrs, epochs, mu1=0.9, mu2=0.99, eps=1e-8, eta_rms=3e-4,
                      c=1.0, p=2.0, wd=0.0, decay={"kernel": False, "bias": False})
    for k in weights:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
        assert np.all(np.isfinite(got[k]))


def test_config_and_keras_file_round_trip(tmp_path):
    opt = RMSpropWarmup(0.3, steps_per_epoch=[[0, 3], [2, 1]], momentum=0.8, rho=0.9,
                        epsilon=1e-6, rmsprop_learning_rate=1e-3, blend_center_epochs=3.0,
                        blend_period_epochs=4.0, weight_decay=1e-4,
                        exclude_from_weight_decay=["bias"])
    config = opt.get_config()
    assert RMSpropWarmup.from_config(copy.deepcopy(config)).get_config() == config
    assert keras.optimizers.deserialize(keras.optimizers.serialize(opt)).get_config() == config

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 5)).astype("float32"), rng.normal(size=(16, 2)).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)])
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    path = str(tmp_path / "r.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.optimizer, RMSpropWarmup)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    loaded.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.trainable_variables, loaded.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps_per_epoch=None), "Argument `steps_per_epoch` is required"),
        (dict(steps_per_epoch=0), "Argument `steps_per_epoch` must be an integer > 0. Received: steps_per_epoch=0"),
        (dict(steps_per_epoch=[[1, 5]]), "Argument `steps_per_epoch` must start at epoch 0"),
        (dict(learning_rate=0.0), "Argument `learning_rate` must be > 0.0. Received: learning_rate=0.0"),
        (dict(rmsprop_learning_rate=-1e-3), "Argument `rmsprop_learning_rate` must be > 0.0"),
        (dict(momentum=1.5), "Argument `momentum` must be < 1.0. Received: momentum=1.5"),
        (dict(rho=1.0), "Argument `rho` must be < 1.0. Received: rho=1.0"),
        (dict(epsilon=0.0), "Argument `epsilon` must be > 0.0"),
        (dict(blend_period_epochs=0.0), "Argument `blend_period_epochs` must be > 0.0"),
        (dict(weight_decay=-1.0), "Argument `weight_decay` must be >= 0.0"),
    ],
)
def test_errors(kwargs, match):
    kwargs = {"steps_per_epoch": 10, **kwargs}
    with pytest.raises(ValueError, match=re.escape(match)):
        RMSpropWarmup(**kwargs)


def test_mirrored_strategy_4_replicas_equals_one_device(cpu_devices):
    if len(cpu_devices) < 4:
        pytest.skip("needs 4 logical CPU devices")
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(48, 5)).astype("float32"), rng.normal(size=(48, 2)).astype("float32")

    def fit(strategy):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"),
                                      keras.layers.Dense(2)])
            model.compile(optimizer=RMSpropWarmup(0.5, steps_per_epoch=1, blend_center_epochs=1.0,
                                                  blend_period_epochs=2.0, weight_decay=1e-3),
                          loss="mse")
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        return [v.numpy() for v in model.trainable_variables]

    one = fit(tf.distribute.get_strategy())
    four = fit(tf.distribute.MirroredStrategy(
        devices=cpu_devices[:4], cross_device_ops=tf.distribute.ReductionToOneDevice()))
    for a, b in zip(one, four):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
