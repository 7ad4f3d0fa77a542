"""Tests for tfscale.optimizers.recipes and tfscale.optimizers.factory."""

import re

import numpy as np
import pytest
import keras
import tensorflow as tf

import tfscale.optimizers as opt_pkg
from tfscale.optimizers import (
    LARS,
    RECIPE_NAMES,
    RMSpropWarmup,
    SlowStart,
    WarmupPiecewise,
    WarmupPolynomialDecay,
    build_learning_rate_schedule,
    build_optimizer,
    recipe_hyperparameters,
)

KEYS = {
    "optimizer", "lr_schedule", "learning_rate", "warmup_epochs", "schedule_params", "momentum",
    "weight_decay", "nesterov", "label_smoothing", "lars_eta", "optimizer_params",
    "batch_schedule", "reference", "base_lr",
}


def test_public_surface_is_explicit():
    assert sorted(opt_pkg.__all__) == sorted(set(opt_pkg.__all__))
    for name in opt_pkg.__all__:
        assert getattr(opt_pkg, name) is not None


@pytest.mark.parametrize(
    "name, batch, want",
    [
        ("mlperf", 4096, dict(optimizer="lars", lr_schedule="warmup_poly", learning_rate=10.0,
                              warmup_epochs=5.0, lars_eta=0.001, label_smoothing=0.1)),
        ("mlperf", 32768, dict(learning_rate=31.2, warmup_epochs=25.0)),
        ("goyal", 8192, dict(optimizer="sgd", lr_schedule="warmup_piecewise", learning_rate=3.2,
                             warmup_epochs=5.0, momentum=0.9, weight_decay=1e-4)),
        ("akiba", 32768, dict(optimizer="rmsprop_warmup", lr_schedule="slow_start",
                              learning_rate=12.8)),
        ("mikami", 34816, dict(batch_schedule="0:34816,30:69632", label_smoothing=0.1)),
    ],
)
def test_recipe_values(name, batch, want):
    hp = recipe_hyperparameters(name, batch)
    assert set(hp) == KEYS
    for key, value in want.items():
        assert hp[key] == pytest.approx(value), key
    assert hp["base_lr"] == pytest.approx(hp["learning_rate"] * 256 / batch)


def test_recipe_epochs_scale_with_train_epochs():
    hp = recipe_hyperparameters("goyal", 1024, train_epochs=9)
    assert hp["schedule_params"]["boundaries"] == pytest.approx([3.0, 6.0, 8.0])
    assert hp["warmup_epochs"] == pytest.approx(0.5)
    assert recipe_hyperparameters("mikami", 256, train_epochs=6)["batch_schedule"] == "0:256,2:512"


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_every_recipe_builds_an_optimizer_that_trains(name):
    hp = recipe_hyperparameters(name, 64, train_epochs=3)
    schedule = build_learning_rate_schedule(
        hp["lr_schedule"], hp["learning_rate"], steps_per_epoch=2, train_epochs=3,
        warmup_epochs=hp["warmup_epochs"], **hp["schedule_params"],
    )
    extra = dict(hp["optimizer_params"])
    if hp["optimizer"] == "rmsprop_warmup":
        extra["steps_per_epoch"] = 2
    if hp["lars_eta"] is not None:
        extra["lars_eta"] = hp["lars_eta"]
    optimizer = build_optimizer(hp["optimizer"], schedule, momentum=hp["momentum"],
                                weight_decay=hp["weight_decay"], nesterov=hp["nesterov"], **extra)
    w = keras.Variable(np.ones((3,), "float32"), name="kernel")
    optimizer.apply([tf.constant([1.0, 1.0, 1.0])], [w])
    optimizer.apply([tf.constant([1.0, 1.0, 1.0])], [w])
    assert np.all(w.numpy() < 1.0)


def test_sgd_is_momentum_sgd_with_coupled_weight_decay():
    optimizer = build_optimizer("sgd", 0.1, momentum=0.9, weight_decay=0.01)
    assert isinstance(optimizer, LARS) and optimizer.layer_adaptation_exclusions == (".*",)
    w = keras.Variable(np.array([2.0, -1.0], "float32"), name="kernel")
    b = keras.Variable(np.array([1.0], "float32"), name="bias")
    w_ref, b_ref = np.array([2.0, -1.0]), np.array([1.0])
    vw, vb = np.zeros(2), np.zeros(1)
    for g in ([0.5, 0.5], [-1.0, 2.0], [0.3, 0.0]):
        optimizer.apply([tf.constant(g, tf.float32), tf.constant([1.0])], [w, b])
        vw = 0.9 * vw + 0.1 * (np.array(g) + 0.01 * w_ref)
        vb = 0.9 * vb + 0.1 * np.array([1.0])  # biases get no weight decay
        w_ref, b_ref = w_ref - vw, b_ref - vb
    np.testing.assert_allclose(w.numpy(), w_ref, rtol=1e-6)
    np.testing.assert_allclose(b.numpy(), b_ref, rtol=1e-6)


def test_builders_return_the_right_classes():
    assert isinstance(build_learning_rate_schedule("warmup_poly", 1.0, 10, 5, 1), WarmupPolynomialDecay)
    assert isinstance(build_learning_rate_schedule("warmup_cosine", 1.0, 10, 5, 1),
                      opt_pkg.WarmupCosineDecay)
    assert isinstance(build_learning_rate_schedule("warmup_piecewise", 1.0, 10, 90, 5), WarmupPiecewise)
    assert isinstance(build_learning_rate_schedule("slow_start", 1.0, [[0, 10], [2, 5]], 90), SlowStart)
    assert build_learning_rate_schedule("constant", 0.5, 10, 5) == 0.5
    assert isinstance(build_optimizer("rmsprop_warmup", 0.1, steps_per_epoch=10), RMSpropWarmup)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: recipe_hyperparameters("lamb", 256), "Unknown recipe 'lamb'; expected one of ['akiba', 'goyal', 'mikami', 'mlperf']"),
        (lambda: recipe_hyperparameters("mlperf", 0), "Received: global_batch_size=0"),
        (lambda: build_optimizer("adam", 0.1), "Unknown optimizer 'adam'; expected one of ['lars', 'rmsprop_warmup', 'sgd']"),
        (lambda: build_learning_rate_schedule("cosine", 0.1, 10, 5), "Unknown lr_schedule 'cosine'; expected one of"),
        (lambda: build_learning_rate_schedule("warmup_poly", 0.1, 10, 5, 1, boundaries=[1]), "Unknown parameter(s) ['boundaries'] for lr_schedule 'warmup_poly'"),
        (lambda: build_learning_rate_schedule("warmup_poly", 0.1, 10, 5, 6), "Received: warmup_epochs=6"),
        (lambda: build_learning_rate_schedule("warmup_poly", -0.1, 10, 5), "Received: learning_rate=-0.1"),
        (lambda: build_optimizer("rmsprop_warmup", 0.1), "Argument `steps_per_epoch` is required"),
    ],
)
def test_errors(make, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        make()
