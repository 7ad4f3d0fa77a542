"""Build an optimizer and a learning-rate schedule from names and flags.

The name -> class maps used by `scripts/train.py` (`--optimizer`, `--lr_schedule`);
unknown names raise an error that lists the valid ones.
"""

from tfscale.optimizers._common import _check_number
from tfscale.optimizers.lars import LARS
from tfscale.optimizers.rmsprop_warmup import RMSpropWarmup
from tfscale.optimizers.schedules import (
    SlowStart,
    WarmupCosineDecay,
    WarmupPiecewise,
    WarmupPolynomialDecay,
    normalize_steps_per_epoch,
)

__all__ = [
    "OPTIMIZER_NAMES",
    "SCHEDULE_NAMES",
    "build_learning_rate_schedule",
    "build_optimizer",
]

OPTIMIZER_NAMES = ("lars", "rmsprop_warmup", "sgd")
SCHEDULE_NAMES = ("constant", "slow_start", "warmup_cosine", "warmup_piecewise", "warmup_poly")


def build_learning_rate_schedule(
    name,
    learning_rate,
    steps_per_epoch,
    train_epochs,
    warmup_epochs=0.0,
    **params,
):
    """Returns the learning-rate schedule called `name`.

    Args:
        name: one of `SCHEDULE_NAMES`:
            `"warmup_poly"` -> `WarmupPolynomialDecay` (MLPerf LARS; `learning_rate` is
            the peak; params `end_learning_rate` (default 1e-4), `power` (default 2.0));
            `"warmup_cosine"` -> `WarmupCosineDecay` (`learning_rate` is the peak;
            param `end_learning_rate` (default 0.0));
            `"warmup_piecewise"` -> `WarmupPiecewise` (Goyal et al.; `learning_rate` is
            the base; params `boundaries` (default `(30, 60, 80)` epochs),
            `multipliers` (default `(1, 0.1, 0.01, 0.001)`),
            `warmup_start_learning_rate` (default 0.0));
            `"slow_start"` -> `SlowStart` (Akiba et al.; params `boundaries`,
            `multipliers`, `warmup_start_learning_rate`);
            `"constant"` -> the float `learning_rate` itself.
        learning_rate: float > 0, the peak (warmup_poly) or base rate.
        steps_per_epoch: the epoch clock: int > 0, or `[start_epoch, steps]` pairs
            (`BatchSizeSchedule.steps_per_epoch_phases(num_train_examples)`).
        train_epochs: float > 0, the length of training in epochs (the end of the
            polynomial decay).
        warmup_epochs: float >= 0, epochs of linear warm-up. Defaults to 0.
        **params: the schedule-specific parameters above; others raise.

    Returns:
        A `keras.optimizers.schedules.LearningRateSchedule`, or a float for
        `"constant"`.

    Raises:
        ValueError: on an unknown `name` (the message lists the valid names), an
            unknown parameter, or a value the schedule rejects.
    """
    learning_rate = _check_number("learning_rate", learning_rate, minimum=0.0, strict=True)
    normalize_steps_per_epoch(steps_per_epoch)
    allowed = {
        "warmup_poly": {"end_learning_rate", "power"},
        "warmup_cosine": {"end_learning_rate"},
        "warmup_piecewise": {"boundaries", "multipliers", "warmup_start_learning_rate"},
        "slow_start": {"boundaries", "multipliers", "warmup_start_learning_rate"},
        "constant": set(),
    }
    if name not in allowed:
        raise ValueError(f"Unknown lr_schedule {name!r}; expected one of {sorted(SCHEDULE_NAMES)}")
    unknown = sorted(set(params) - allowed[name])
    if unknown:
        raise ValueError(
            f"Unknown parameter(s) {unknown} for lr_schedule {name!r}; expected a subset of "
            f"{sorted(allowed[name])}"
        )
    if name == "warmup_poly":
        return WarmupPolynomialDecay(
            peak_learning_rate=learning_rate,
            warmup_epochs=warmup_epochs,
            total_epochs=train_epochs,
            steps_per_epoch=steps_per_epoch,
            **params,
        )
    if name == "warmup_cosine":
        return WarmupCosineDecay(
            peak_learning_rate=learning_rate,
            warmup_epochs=warmup_epochs,
            total_epochs=train_epochs,
            steps_per_epoch=steps_per_epoch,
            **params,
        )
    if name == "warmup_piecewise":
        params.setdefault("boundaries", (30, 60, 80))
        params.setdefault("multipliers", (1.0, 0.1, 0.01, 0.001))
        return WarmupPiecewise(
            base_learning_rate=learning_rate,
            steps_per_epoch=steps_per_epoch,
            warmup_epochs=warmup_epochs,
            **params,
        )
    if name == "slow_start":
        return SlowStart(
            base_learning_rate=learning_rate,
            steps_per_epoch=steps_per_epoch,
            warmup_epochs=warmup_epochs,
            **params,
        )
    if warmup_epochs:
        raise ValueError(
            "Argument `warmup_epochs` must be 0 for lr_schedule 'constant'. "
            f"Received: warmup_epochs={warmup_epochs!r}"
        )
    return learning_rate


def build_optimizer(
    name,
    learning_rate_schedule,
    *,
    momentum=0.9,
    weight_decay=1e-4,
    nesterov=False,
    lars_eta=0.001,
    lars_epsilon=0.0,
    steps_per_epoch=None,
    exclude_from_weight_decay=None,
    loss_scale=False,
    **params,
):
    """Returns the optimizer called `name`, driven by `learning_rate_schedule`.

    Args:
        name: one of `OPTIMIZER_NAMES`:
            `"lars"` -> `LARS` (You et al., arXiv:1708.03888);
            `"sgd"` -> momentum SGD with L2 weight decay inside the velocity,
            `v <- m*v + lr*(g + wd*w)`, `w <- w - v` (the rate inside the velocity,
            as in Goyal et al., arXiv:1706.02677, with momentum correction). It is a
            `LARS` with layer adaptation off for every variable
            (`exclude_from_layer_adaptation=[".*"]`), so that BN parameters and biases
            are excluded from weight decay by path, which Keras's
            `SGD(weight_decay=...)` (decoupled, matched on names) does not do;
            `"rmsprop_warmup"` -> `RMSpropWarmup` (Akiba et al., arXiv:1711.04325;
            needs `steps_per_epoch`).
        learning_rate_schedule: a float > 0 or a `LearningRateSchedule`
            (`build_learning_rate_schedule`).
        momentum: float in [0, 1). Defaults to 0.9.
        weight_decay: float >= 0, L2 coefficient. Defaults to 1e-4.
        nesterov: bool (lars and sgd only). Defaults to False.
        lars_eta: float > 0, LARS trust coefficient (lars only). Defaults to 0.001.
        lars_epsilon: float >= 0 (lars only). Defaults to 0.0.
        steps_per_epoch: the epoch clock (rmsprop_warmup only; required there).
        exclude_from_weight_decay: regexes on variable paths; `None` = BN and biases.
        loss_scale: bool, wrap the optimizer in Keras's dynamic
            `keras.optimizers.LossScaleOptimizer` (for the `mixed_float16` policy:
            the loss is scaled up before the gradients are taken and the gradients
            scaled back down, and skipped, before `update_step` sees them, so LARS's
            trust ratios and RMSpropWarmup's statistics use the unscaled gradients).
            Defaults to False.
        **params: other keyword arguments of the optimizer class (e.g.
            `rmsprop_learning_rate`, `blend_center_epochs`, `trust_ratio_form`,
            `global_clipnorm`).

    Returns:
        A `keras.optimizers.Optimizer`; a `keras.optimizers.LossScaleOptimizer`
        around it with `loss_scale=True`.

    Raises:
        ValueError: on an unknown `name` (the message lists the valid names) or a
            value the optimizer rejects.

    Example:
        >>> hp = recipe_hyperparameters("mlperf", 4096)
        >>> schedule = build_learning_rate_schedule(
        ...     hp["lr_schedule"], hp["learning_rate"], steps_per_epoch=14,
        ...     train_epochs=40, warmup_epochs=hp["warmup_epochs"], **hp["schedule_params"])
        >>> optimizer = build_optimizer(hp["optimizer"], schedule, momentum=hp["momentum"],
        ...     weight_decay=hp["weight_decay"], lars_eta=hp["lars_eta"])
    """
    optimizer = _build_optimizer(name, learning_rate_schedule, momentum=momentum, weight_decay=weight_decay,
                                 nesterov=nesterov, lars_eta=lars_eta, lars_epsilon=lars_epsilon,
                                 steps_per_epoch=steps_per_epoch,
                                 exclude_from_weight_decay=exclude_from_weight_decay, **params)
    if loss_scale:
        import keras

        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def _build_optimizer(name, learning_rate_schedule, *, momentum, weight_decay, nesterov, lars_eta, lars_epsilon,
                     steps_per_epoch, exclude_from_weight_decay, **params):
    if name == "lars":
        return LARS(
            learning_rate_schedule,
            momentum=momentum,
            weight_decay=weight_decay,
            eta=lars_eta,
            epsilon=lars_epsilon,
            nesterov=nesterov,
            exclude_from_weight_decay=exclude_from_weight_decay,
            **params,
        )
    if name == "sgd":
        return LARS(
            learning_rate_schedule,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            exclude_from_weight_decay=exclude_from_weight_decay,
            exclude_from_layer_adaptation=[".*"],
            name=params.pop("name", "sgd"),
            **params,
        )
    if name == "rmsprop_warmup":
        if nesterov:
            raise ValueError(
                "Argument `nesterov` is not supported by 'rmsprop_warmup'. Received: nesterov=True"
            )
        return RMSpropWarmup(
            learning_rate_schedule,
            steps_per_epoch=steps_per_epoch,
            momentum=momentum,
            weight_decay=weight_decay,
            exclude_from_weight_decay=exclude_from_weight_decay,
            **params,
        )
    raise ValueError(f"Unknown optimizer {name!r}; expected one of {sorted(OPTIMIZER_NAMES)}")
