"""Tests for tfscale.optimizers.LARS against a numpy reference written here."""

import copy
import re

import numpy as np
import pytest
import keras
import tensorflow as tf

from tfscale.optimizers import LARS, WarmupPolynomialDecay

# ---------------------------------------------------------------------------
# numpy reference (You et al., arXiv:1708.03888, MLPerf form / Model Garden form).
# ---------------------------------------------------------------------------


def _reference_lars(
    weights, grads_per_step, lrs, *, momentum, weight_decay, eta, epsilon, nesterov,
    decay, adapt, form="mlperf",
):
    """weights: dict name -> array; grads_per_step: list of dicts; decay/adapt: name -> bool."""
    w = {k: v.astype(np.float64).copy() for k, v in weights.items()}
    v = {k: np.zeros_like(x) for k, x in w.items()}
    for grads, lr in zip(grads_per_step, lrs):
        for name in w:
            g = grads[name].astype(np.float64)
            wd = weight_decay if decay[name] else 0.0
            trust = 1.0
            if adapt[name]:
                w_norm = np.linalg.norm(w[name])
                if form == "mlperf":
                    g_norm = np.linalg.norm(g)
                    denom = g_norm + wd * w_norm + epsilon
                else:
                    g_norm = np.linalg.norm(g + wd * w[name])
                    denom = g_norm + epsilon
                if w_norm > 0 and g_norm > 0:
                    trust = eta * w_norm / denom
            step = lr * trust * (g + wd * w[name])
            v[name] = momentum * v[name] + step
            if nesterov:
                w[name] = w[name] - (momentum * v[name] + step)
            else:
                w[name] = w[name] - v[name]
    return w


def _run_keras(optimizer, weights, grads_per_step):
    variables = {k: keras.Variable(x, name=k) for k, x in weights.items()}
    names = list(weights)
    for grads in grads_per_step:
        optimizer.apply([tf.constant(grads[k]) for k in names], [variables[k] for k in names])
    return {k: variables[k].numpy() for k in names}


def _data(seed=0, steps=4, zero_weight=False, zero_grad_at=None):
    rng = np.random.default_rng(seed)
    weights = {
        "kernel": rng.normal(size=(5, 3)).astype("float32"),
        "bias": rng.normal(size=(3,)).astype("float32"),
        "gamma": (1.0 + 0.1 * rng.normal(size=(3,))).astype("float32"),
    }
    if zero_weight:
        weights["kernel"] = np.zeros((5, 3), "float32")
    grads = []
    for s in range(steps):
        g = {k: rng.normal(size=x.shape).astype("float32") for k, x in weights.items()}
        if zero_grad_at is not None and s == zero_grad_at:
            g["kernel"] = np.zeros_like(g["kernel"])
        grads.append(g)
    return weights, grads


DEFAULT_DECAY = {"kernel": True, "bias": False, "gamma": False}


@pytest.mark.parametrize(
    "case",
    [
        dict(id="momentum_wd", nesterov=False),
        dict(id="nesterov", nesterov=True),
        dict(id="no_momentum", nesterov=False, momentum=0.0),
        dict(id="zero_weights", nesterov=False, zero_weight=True),
        dict(id="zero_grad", nesterov=False, zero_grad_at=1),
        dict(id="epsilon", nesterov=False, epsilon=0.5),
        dict(id="model_garden", nesterov=False, form="model_garden"),
        dict(
            id="custom_exclusions", nesterov=True,
            exclude_wd=["kernel"], exclude_adapt=[],
            decay={"kernel": False, "bias": True, "gamma": True},
            adapt={"kernel": True, "bias": True, "gamma": True},
        ),
    ],
    ids=lambda c: c["id"],
)
def test_lars_matches_numpy_reference(case):
    momentum = case.get("momentum", 0.9)
    weight_decay, eta, epsilon = 0.05, 0.02, case.get("epsilon", 0.0)
    lr = 0.7
    weights, grads = _data(
        steps=4, zero_weight=case.get("zero_weight", False), zero_grad_at=case.get("zero_grad_at")
    )
    kwargs = {}
    if "exclude_wd" in case:
        kwargs = dict(
            exclude_from_weight_decay=case["exclude_wd"],
            exclude_from_layer_adaptation=case["exclude_adapt"],
        )
    opt = LARS(
        lr, momentum=momentum, weight_decay=weight_decay, eta=eta, epsilon=epsilon,
        nesterov=case["nesterov"], trust_ratio_form=case.get("form", "mlperf"), **kwargs,
    )
    got = _run_keras(opt, weights, grads)
    want = _reference_lars(
        weights, grads, [lr] * len(grads), momentum=momentum, weight_decay=weight_decay, eta=eta,
        epsilon=epsilon, nesterov=case["nesterov"], decay=case.get("decay", DEFAULT_DECAY),
        adapt=case.get("adapt", DEFAULT_DECAY), form=case.get("form", "mlperf"),
    )
    for k in weights:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)
        assert not np.allclose(got[k], weights[k]), f"{k} did not move"


def test_zero_norm_trust_ratio_is_one():
    """A zero weight (or gradient) makes trust 1: the step is plain momentum SGD."""
    w = keras.Variable(np.zeros((4,), "float32"), name="kernel")
    g = np.array([1.0, -2.0, 0.5, 3.0], "float32")
    opt = LARS(0.1, momentum=0.0, weight_decay=0.0, eta=1e-3)
    opt.apply([tf.constant(g)], [w])
    np.testing.assert_allclose(w.numpy(), -0.1 * g, rtol=1e-6)
    # Zero gradient on a non-zero weight with weight decay: trust 1, the step is lr*wd*w.
    w2 = keras.Variable(np.full((4,), 2.0, "float32"), name="kernel")
    opt2 = LARS(0.1, momentum=0.0, weight_decay=0.5, eta=1e-3)
    opt2.apply([tf.zeros((4,))], [w2])
    np.testing.assert_allclose(w2.numpy(), 2.0 - 0.1 * 0.5 * 2.0, rtol=1e-6)


def test_learning_rate_schedule_is_used_per_step():
    schedule = WarmupPolynomialDecay(
        peak_learning_rate=1.0, warmup_epochs=2, total_epochs=4, steps_per_epoch=1,
        end_learning_rate=0.0,
    )
    lrs = [float(schedule(s)) for s in range(4)]  # 0, 0.5, 1, 0.25
    np.testing.assert_allclose(lrs, [0.0, 0.5, 1.0, 0.25], rtol=1e-6)
    weights, grads = _data(seed=3, steps=4)
    got = _run_keras(LARS(schedule, weight_decay=0.01, eta=0.1), weights, grads)
    want = _reference_lars(
        weights, grads, lrs, momentum=0.9, weight_decay=0.01, eta=0.1, epsilon=0.0,
        nesterov=False, decay=DEFAULT_DECAY, adapt=DEFAULT_DECAY,
    )
    for k in weights:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)


def test_default_exclusions_match_keras_paths():
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, name="fc"),
         keras.layers.BatchNormalization(name="bn1"), keras.layers.Dense(2, name="head")],
        name="net",
    )
    opt = LARS(0.1)
    opt.build(model.trainable_variables)
    assert model.trainable_variables[0].path == "net/fc/kernel"
    flags = {v.path.split("/", 1)[1]: (opt._use_decay[i], opt._use_adaptation[i])
             for i, v in enumerate(model.trainable_variables)}
    assert flags == {
        "fc/kernel": (True, True), "fc/bias": (False, False),
        "bn1/gamma": (False, False), "bn1/beta": (False, False),
        "head/kernel": (True, True), "head/bias": (False, False),
    }


# ---------------------------------------------------------------------------
# Keras integration: fit, MirroredStrategy, mixed precision, serialisation.
# ---------------------------------------------------------------------------


def _tiny_model(seed=1):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="tanh", name="d1"),
         keras.layers.Dense(3, name="d2")]
    )


def _tiny_data(n=64):
    rng = np.random.default_rng(7)
    return rng.normal(size=(n, 6)).astype("float32"), rng.normal(size=(n, 3)).astype("float32")


def _fit_weights(optimizer_fn, strategy=None, steps=3, batch=16):
    x, y = _tiny_data(steps * batch)
    scope = strategy.scope() if strategy is not None else tf.distribute.get_strategy().scope()
    with scope:
        model = _tiny_model()
        model.compile(optimizer=optimizer_fn(), loss="mse")
    model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    return [v.numpy() for v in model.trainable_variables]


def _lars():
    return LARS(0.5, momentum=0.9, weight_decay=1e-3, eta=0.05)


def test_mirrored_strategy_4_replicas_equals_one_device(cpu_devices):
    if len(cpu_devices) < 4:
        pytest.skip("needs 4 logical CPU devices")
    strategy = tf.distribute.MirroredStrategy(
        devices=cpu_devices[:4], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    assert strategy.num_replicas_in_sync == 4
    initial = [v.numpy() for v in _tiny_model().trainable_variables]
    one = _fit_weights(_lars)
    four = _fit_weights(_lars, strategy=strategy)
    for a, b, w0 in zip(one, four, initial):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert not np.allclose(a, w0)


def test_loss_scale_optimizer_float32_matches_plain():
    plain = _fit_weights(_lars)
    scaled = _fit_weights(lambda: keras.optimizers.LossScaleOptimizer(_lars()))
    for a, b in zip(plain, scaled):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_mixed_float16_with_loss_scale_close_to_float32():
    plain = _fit_weights(_lars)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        mixed = _fit_weights(lambda: keras.optimizers.LossScaleOptimizer(_lars()))
    finally:
        keras.config.set_dtype_policy(previous)
    for a, b in zip(plain, mixed):
        assert b.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-3)


def test_config_round_trip():
    schedule = WarmupPolynomialDecay(2.0, 1, 5, steps_per_epoch=[[0, 10], [2, 5]])
    opt = LARS(schedule, momentum=0.8, weight_decay=2e-4, eta=0.003, epsilon=1e-9,
               nesterov=True, exclude_from_weight_decay=["bias"],
               exclude_from_layer_adaptation=[], trust_ratio_form="model_garden")
    config = opt.get_config()
    clone = LARS.from_config(copy.deepcopy(config))  # from_config mutates its argument
    assert clone.get_config() == config
    assert config["weight_decay"] == 2e-4 and config["exclude_from_layer_adaptation"] == []
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(restored, LARS)
    assert restored.get_config() == config
    assert float(restored.learning_rate) == float(schedule(0))


def test_keras_file_round_trip_continues_identically(tmp_path):
    x, y = _tiny_data(32)
    schedule = WarmupPolynomialDecay(0.5, 1, 4, steps_per_epoch=2)
    model = _tiny_model()
    model.compile(optimizer=LARS(schedule, eta=0.05), loss="mse")
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.optimizer, LARS)
    assert isinstance(loaded.optimizer._learning_rate, WarmupPolynomialDecay)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    loaded.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.trainable_variables, loaded.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(learning_rate=0.0), "Argument `learning_rate` must be > 0.0. Received: learning_rate=0.0"),
        (dict(learning_rate=-1.0), "Received: learning_rate=-1.0"),
        (dict(momentum=1.0), "Argument `momentum` must be < 1.0. Received: momentum=1.0"),
        (dict(weight_decay=-1e-4), "Argument `weight_decay` must be >= 0.0. Received: weight_decay=-0.0001"),
        (dict(eta=0.0), "Argument `eta` must be > 0.0. Received: eta=0.0"),
        (dict(epsilon=-1.0), "Argument `epsilon` must be >= 0.0"),
        (dict(nesterov="yes"), "Argument `nesterov` must be a bool"),
        (dict(trust_ratio_form="lamb"), "Argument `trust_ratio_form` must be one of"),
        (dict(exclude_from_weight_decay="bias"), "Argument `exclude_from_weight_decay` must be a list"),
        (dict(exclude_from_layer_adaptation=["("]), "Argument `exclude_from_layer_adaptation` contains an invalid"),
    ],
)
def test_errors_name_argument_and_value(kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        LARS(**kwargs)
