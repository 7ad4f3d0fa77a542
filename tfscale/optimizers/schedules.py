"""Learning-rate schedules defined in epochs, for large-batch training.

Every schedule here is a `keras.optimizers.schedules.LearningRateSchedule` whose
formula is written in (fractional) epochs, not steps. The optimizer calls it with
its step counter (`optimizer.iterations`, an integer number of optimizer updates);
the schedule turns the step into an epoch with an *epoch clock* given by the
argument `steps_per_epoch`, which is either

* a positive `int`: every epoch has that many steps, or
* a list of `[start_epoch, steps_per_epoch]` pairs, e.g. `[[0, 312], [10, 156]]`:
  from epoch 0 every epoch has 312 steps, from epoch 10 it has 156. This is how a
  global batch that grows during training (batch-size control, Mikami et al.,
  arXiv:1811.05233) keeps the schedule continuous in epochs: the step count per
  epoch changes at the phase boundary, the epoch reached does not jump.
  `tfscale.training.batch_size_control.BatchSizeSchedule.steps_per_epoch_phases`
  builds this list.

The clock is `epoch(step) = sum_k clip(step - S_k, 0, L_k) / s_k`, with `s_k` the
steps per epoch of phase `k`, `L_k = (e_{k+1} - e_k) * s_k` its length in steps
(unbounded for the last phase) and `S_k = L_0 + ... + L_{k-1}` its first step. It is
a pure TF computation (no Python branching on the step), so it runs inside
`tf.function`, under `tf.distribute` strategies and under XLA.

Also here: the linear-scaling rule (Goyal et al., arXiv:1706.02677) and the MLPerf
LARS table of peak learning rates and warm-up lengths (You et al.,
arXiv:1708.03888; MLPerf v0.5 ResNet-50 reference, *reference code*).
"""

import math
import numbers

import keras
import tensorflow as tf

from tfscale.optimizers._common import _check_number, _check_positive_int, _is_number

__all__ = [
    "SlowStart",
    "WarmupCosineDecay",
    "WarmupPiecewise",
    "WarmupPolynomialDecay",
    "epochs_from_steps",
    "mlperf_lars_hyperparameters",
    "normalize_steps_per_epoch",
    "scaled_learning_rate",
    "steps_before_epoch",
]


# ---------------------------------------------------------------------------
# The epoch clock.
# ---------------------------------------------------------------------------


def normalize_steps_per_epoch(steps_per_epoch, name="steps_per_epoch"):
    """Checks an epoch clock and returns it as a tuple of `(start_epoch, steps)` pairs.

    Args:
        steps_per_epoch: a positive `int` (every epoch has that many optimizer steps),
            or a non-empty sequence of `(start_epoch, steps_per_epoch)` pairs of
            integers: the first `start_epoch` must be 0, the start epochs strictly
            increasing, and every `steps_per_epoch` > 0. Units: epochs and steps.
        name: the argument name used in error messages. Defaults to `"steps_per_epoch"`.

    Returns:
        A tuple of `(int start_epoch, int steps_per_epoch)` pairs, e.g. `((0, 100),)`
        for `steps_per_epoch=100`.

    Raises:
        ValueError: if `steps_per_epoch` is not one of the forms above; the message
            names the argument and the value received.
    """
    if _is_number(steps_per_epoch):
        return ((0, _check_positive_int(name, steps_per_epoch)),)
    try:
        phases = [tuple(p) for p in steps_per_epoch]
    except TypeError:
        raise ValueError(
            f"Argument `{name}` must be an integer > 0 or a list of [start_epoch, steps_per_epoch] "
            f"pairs. Received: {name}={steps_per_epoch!r}"
        ) from None
    if not phases or any(len(p) != 2 for p in phases):
        raise ValueError(
            f"Argument `{name}` must be an integer > 0 or a non-empty list of "
            f"[start_epoch, steps_per_epoch] pairs. Received: {name}={steps_per_epoch!r}"
        )
    out = []
    for start, steps in phases:
        if isinstance(start, bool) or not isinstance(start, numbers.Integral) or start < 0:
            raise ValueError(
                f"Argument `{name}` must have integer start epochs >= 0. "
                f"Received: {name}={steps_per_epoch!r}"
            )
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps <= 0:
            raise ValueError(
                f"Argument `{name}` must have integer steps per epoch > 0. "
                f"Received: {name}={steps_per_epoch!r}"
            )
        out.append((int(start), int(steps)))
    if out[0][0] != 0:
        raise ValueError(
            f"Argument `{name}` must start at epoch 0. Received: {name}={steps_per_epoch!r}"
        )
    for (a, _), (b, _) in zip(out, out[1:]):
        if not b > a:
            raise ValueError(
                f"Argument `{name}` must have strictly increasing start epochs. "
                f"Received: {name}={steps_per_epoch!r}"
            )
    return tuple(out)


def _config_steps_per_epoch(phases):
    """The JSON form of a normalised clock: an int for one phase, else a list of lists."""
    if len(phases) == 1:
        return phases[0][1]
    return [list(p) for p in phases]


def steps_before_epoch(epoch, steps_per_epoch):
    """Number of optimizer steps taken before integer epoch `epoch` starts.

    Args:
        epoch: `int` >= 0, an epoch index.
        steps_per_epoch: the epoch clock, see `normalize_steps_per_epoch`.

    Returns:
        `int`, the number of steps in epochs `0 .. epoch - 1`.

    Raises:
        ValueError: if `epoch` is negative or `steps_per_epoch` is malformed.
    """
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
        raise ValueError(f"Argument `epoch` must be an integer >= 0. Received: epoch={epoch!r}")
    phases = normalize_steps_per_epoch(steps_per_epoch)
    total = 0
    for k, (start, steps) in enumerate(phases):
        end = phases[k + 1][0] if k + 1 < len(phases) else math.inf
        total += (min(epoch, end) - start) * steps if epoch > start else 0
    return int(total)


def epochs_from_steps(step, steps_per_epoch):
    """Fractional epoch reached after `step` optimizer steps (a TF computation).

    Implements `epoch(step) = sum_k clip(step - S_k, 0, L_k) / s_k` (see the module
    docstring). Continuous and piecewise linear in `step`; with a growing batch the
    slope `1 / s_k` increases at each phase boundary.

    Args:
        step: scalar integer or float tensor (any dtype castable to float32), the
            number of optimizer steps taken, e.g. `optimizer.iterations`.
        steps_per_epoch: the epoch clock, see `normalize_steps_per_epoch`.

    Returns:
        float32 scalar tensor, the epoch (e.g. 2.5 = half-way through the third epoch).

    Raises:
        ValueError: if `steps_per_epoch` is malformed.
    """
    phases = normalize_steps_per_epoch(steps_per_epoch)
    step = tf.cast(step, tf.float32)
    epoch = tf.zeros_like(step)
    first_step = 0
    for k, (start, steps) in enumerate(phases):
        into = tf.maximum(step - float(first_step), 0.0)
        if k + 1 < len(phases):
            length = (phases[k + 1][0] - start) * steps
            into = tf.minimum(into, float(length))
            first_step += length
        epoch += into / float(steps)
    return epoch


# ---------------------------------------------------------------------------
# Helpers for the hyperparameters.
# ---------------------------------------------------------------------------


def scaled_learning_rate(base_lr, global_batch_size, reference_batch=256):
    """The linear-scaling rule: `base_lr * global_batch_size / reference_batch`.

    Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour",
    arXiv:1706.02677 (0.1 per 256 images for ResNet-50 with momentum SGD).

    Args:
        base_lr: float > 0, the learning rate tuned for `reference_batch` images.
        global_batch_size: int > 0, images per optimizer step over all replicas.
        reference_batch: int > 0, the batch `base_lr` was tuned for. Defaults to 256.

    Returns:
        `float`, the scaled learning rate.

    Raises:
        ValueError: if an argument is not positive; the message names it.

    Example:
        >>> scaled_learning_rate(0.1, 8192)
        3.2
    """
    base_lr = _check_number("base_lr", base_lr, minimum=0.0, strict=True)
    global_batch_size = _check_positive_int("global_batch_size", global_batch_size)
    reference_batch = _check_positive_int("reference_batch", reference_batch)
    return base_lr * global_batch_size / reference_batch


# MLPerf v0.5 ResNet-50 LARS reference (reference code; RECIPES.md): the peak LR and the
# warm-up length depend on the global batch, with thresholds at 16k = 16384 and 32k = 32768.
_MLPERF_LARS_TABLE = (
    (16384, 10.0, 5),
    (32768, 25.0, 5),
    (math.inf, 31.2, 25),
)


def mlperf_lars_hyperparameters(global_batch_size):
    """The MLPerf ResNet-50 LARS hyperparameters for a global batch size.

    The table (MLPerf v0.5 reference code; You et al., arXiv:1708.03888; Ying et al.,
    arXiv:1811.06992):

    | global batch | peak LR | warm-up epochs |
    |---|---|---|
    | < 16384 | 10 | 5 |
    | < 32768 | 25 | 5 |
    | larger | 31.2 | 25 |

    followed by polynomial decay of power 2 to 1e-4 (`WarmupPolynomialDecay`).

    Args:
        global_batch_size: int > 0, images per optimizer step over all replicas.

    Returns:
        dict with keys `peak_learning_rate` (float), `warmup_epochs` (int, epochs),
        `power` (2.0), `end_learning_rate` (1e-4), `momentum` (0.9),
        `weight_decay` (1e-4), `eta` (0.001, the LARS trust coefficient) and
        `epsilon` (0.0).

    Raises:
        ValueError: if `global_batch_size` is not an integer > 0.
    """
    global_batch_size = _check_positive_int("global_batch_size", global_batch_size)
    for limit, peak, warmup in _MLPERF_LARS_TABLE:
        if global_batch_size < limit:
            break
    return {
        "peak_learning_rate": peak,
        "warmup_epochs": warmup,
        "power": 2.0,
        "end_learning_rate": 1e-4,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "eta": 0.001,
        "epsilon": 0.0,
    }


# ---------------------------------------------------------------------------
# Schedules.
# ---------------------------------------------------------------------------


class _WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to `peak` over `w` epochs, then `_decay` until `T` epochs."""

    def __init__(self, peak_learning_rate, warmup_epochs, total_epochs, steps_per_epoch,
                 end_learning_rate, name):
        super().__init__()
        self.peak_learning_rate = _check_number(
            "peak_learning_rate", peak_learning_rate, minimum=0.0, strict=True
        )
        self.total_epochs = _check_number("total_epochs", total_epochs, minimum=0.0, strict=True)
        self.warmup_epochs = _check_number("warmup_epochs", warmup_epochs, minimum=0.0)
        if not self.warmup_epochs < self.total_epochs:
            raise ValueError(
                "Argument `warmup_epochs` must be < total_epochs "
                f"(total_epochs={self.total_epochs!r}). Received: warmup_epochs={warmup_epochs!r}"
            )
        self.end_learning_rate = _check_number(
            "end_learning_rate", end_learning_rate, minimum=0.0, maximum=self.peak_learning_rate
        )
        self._phases = normalize_steps_per_epoch(steps_per_epoch)
        self.steps_per_epoch = _config_steps_per_epoch(self._phases)
        self.name = name

    def _decay(self, fraction, peak, end):
        raise NotImplementedError

    def __call__(self, step):
        with tf.name_scope(self.name or type(self).__name__):
            epoch = epochs_from_steps(step, self._phases)
            peak = tf.constant(self.peak_learning_rate, tf.float32)
            end = tf.constant(self.end_learning_rate, tf.float32)
            if self.warmup_epochs > 0:
                warm = peak * epoch / self.warmup_epochs
            else:
                warm = peak
            fraction = tf.clip_by_value(
                (epoch - self.warmup_epochs) / (self.total_epochs - self.warmup_epochs), 0.0, 1.0
            )
            return tf.where(epoch < self.warmup_epochs, warm, self._decay(fraction, peak, end))

    def get_config(self):
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "warmup_epochs": self.warmup_epochs,
            "total_epochs": self.total_epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "end_learning_rate": self.end_learning_rate,
            "name": self.name,
        }


@keras.saving.register_keras_serializable(package="tfscale")
class WarmupPolynomialDecay(_WarmupDecay):
    """Linear warm-up from 0 to a peak, then polynomial decay to an end rate (MLPerf LARS).

    With `e` the fractional epoch (from the epoch clock `steps_per_epoch`), `w` the
    warm-up length and `T` the total training length, both in epochs:

        lr(e) = peak * e / w                                        for e < w
        lr(e) = (peak - end) * (1 - (e - w) / (T - w)) ** power + end  for w <= e < T
        lr(e) = end                                                 for e >= T

    This is the MLPerf ResNet-50 LARS schedule (You et al., "Large Batch Training of
    Convolutional Networks", arXiv:1708.03888; MLPerf v0.5 reference, power 2, end
    1e-4); see `mlperf_lars_hyperparameters` for the table of peaks and warm-ups. The
    Fujitsu MLPerf v0.6 run (Yamazaki et al., arXiv:1903.12650) used power 2.2
    *(reference code)*.

    Args:
        peak_learning_rate: float > 0, the LR reached at the end of the warm-up.
        warmup_epochs: float >= 0, epochs of linear warm-up (may be fractional);
            must be < `total_epochs`.
        total_epochs: float > 0, epochs of training; the rate is `end_learning_rate`
            from then on.
        steps_per_epoch: the epoch clock: an int > 0, or a list of
            `[start_epoch, steps_per_epoch]` pairs for a growing batch (see the
            module docstring).
        end_learning_rate: float, 0 <= end <= peak. Defaults to 1e-4 (MLPerf).
        power: float > 0, the decay exponent. Defaults to 2.0 (MLPerf).
        name: optional string, a name for the schedule.

    Call arguments:
        step: integer scalar tensor, the optimizer step count.

    Returns (on call):
        float32 scalar tensor, the learning rate.

    Raises:
        ValueError: on a rate <= 0, a warm-up not shorter than training, or a
            malformed `steps_per_epoch`; the message names the argument and value.

    Example:
        >>> sched = WarmupPolynomialDecay(10.0, warmup_epochs=5, total_epochs=90,
        ...                               steps_per_epoch=312)
        >>> optimizer = tfscale.optimizers.LARS(sched)
    """

    def __init__(
        self,
        peak_learning_rate,
        warmup_epochs,
        total_epochs,
        steps_per_epoch,
        end_learning_rate=1e-4,
        power=2.0,
        name=None,
    ):
        super().__init__(peak_learning_rate, warmup_epochs, total_epochs, steps_per_epoch,
                         end_learning_rate, name)
        self.power = _check_number("power", power, minimum=0.0, strict=True)

    def _decay(self, fraction, peak, end):
        return (peak - end) * tf.pow(1.0 - fraction, self.power) + end

    def get_config(self):
        config = super().get_config()
        config["power"] = self.power
        return config


@keras.saving.register_keras_serializable(package="tfscale")
class WarmupCosineDecay(_WarmupDecay):
    """Linear warm-up from 0 to a peak, then half-cosine decay to an end rate.

        lr(e) = peak * e / w                                                for e < w
        lr(e) = end + (peak - end) * (1 + cos(pi * (e - w) / (T - w))) / 2  for w <= e < T
        lr(e) = end                                                         for e >= T

    Cosine annealing without restarts (Loshchilov & Hutter, "SGDR", arXiv:1608.03983)
    after Goyal et al.'s linear warm-up (arXiv:1706.02677), as in He et al., "Bag of
    Tricks for Image Classification", arXiv:1812.01187.

    The formula is Keras's `keras.optimizers.schedules.CosineDecay` with
    `initial_learning_rate=0`, `warmup_target=peak`, `alpha=end / peak`,
    `warmup_steps=w` and `decay_steps=T - w`, evaluated at the fractional epoch
    instead of the step: only the epoch clock (`steps_per_epoch`, which keeps the
    schedule continuous when batch-size control changes the steps per epoch) is
    tfscale's own.

    Args:
        peak_learning_rate: float > 0, the LR at the end of the warm-up.
        warmup_epochs: float >= 0, must be < `total_epochs`.
        total_epochs: float > 0, epochs of training.
        steps_per_epoch: the epoch clock (int > 0 or `[start_epoch, steps]` pairs).
        end_learning_rate: float, 0 <= end <= peak. Defaults to 0.0.
        name: optional string.

    Call arguments:
        step: integer scalar tensor, the optimizer step count.

    Returns (on call):
        float32 scalar tensor, the learning rate.

    Raises:
        ValueError: as `WarmupPolynomialDecay`.
    """

    def __init__(
        self,
        peak_learning_rate,
        warmup_epochs,
        total_epochs,
        steps_per_epoch,
        end_learning_rate=0.0,
        name=None,
    ):
        super().__init__(peak_learning_rate, warmup_epochs, total_epochs, steps_per_epoch,
                         end_learning_rate, name)
        # Keras's warm-up + cosine schedule, with epochs in the place of its steps.
        self._in_epochs = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0,
            decay_steps=self.total_epochs - self.warmup_epochs,
            alpha=self.end_learning_rate / self.peak_learning_rate,
            warmup_target=self.peak_learning_rate,
            warmup_steps=self.warmup_epochs,
            name=name or "WarmupCosineDecay",
        )

    def __call__(self, step):
        with tf.name_scope(self.name or type(self).__name__):
            return self._in_epochs(epochs_from_steps(step, self._phases))


@keras.saving.register_keras_serializable(package="tfscale")
class WarmupPiecewise(keras.optimizers.schedules.LearningRateSchedule):
    """Piecewise-constant multipliers by epoch, with an optional linear warm-up.

    With `e` the fractional epoch, `b_0 < b_1 < ...` the `boundaries` (epochs) and
    `m_0, m_1, ...` the `multipliers` (one more than boundaries):

        target(e) = base * m_k  where b_{k-1} <= e < b_k
        lr(e) = start + (target(e) - start) * e / w    for e < w (the warm-up)
        lr(e) = target(e)                             otherwise

    This is Goyal et al.'s step schedule with gradual warm-up ("Accurate, Large
    Minibatch SGD", arXiv:1706.02677: base 0.1*B/256, x0.1 at epochs 30, 60, 80, and a
    5-epoch warm-up starting at 0.1) and Akiba et al.'s slow start (see `SlowStart`).

    Args:
        base_learning_rate: float > 0, the rate the multipliers scale.
        boundaries: list of epochs (floats > 0, strictly increasing) where the
            multiplier changes.
        multipliers: list of floats > 0, `len(boundaries) + 1` of them.
        steps_per_epoch: the epoch clock: an int > 0, or a list of
            `[start_epoch, steps_per_epoch]` pairs (see the module docstring).
        warmup_epochs: float >= 0, epochs of linear warm-up; must be <= the first
            boundary. Defaults to 0 (no warm-up).
        warmup_start_learning_rate: float >= 0, the rate at epoch 0 when warming up.
            Defaults to 0.0.
        name: optional string.

    Call arguments:
        step: integer scalar tensor, the optimizer step count.

    Returns (on call):
        float32 scalar tensor, the learning rate.

    Raises:
        ValueError: on non-positive rates or multipliers, boundaries that are not
            strictly increasing, a length mismatch, or a warm-up longer than the first
            phase; the message names the argument and value.
    """

    def __init__(
        self,
        base_learning_rate,
        boundaries,
        multipliers,
        steps_per_epoch,
        warmup_epochs=0.0,
        warmup_start_learning_rate=0.0,
        name=None,
    ):
        super().__init__()
        self.base_learning_rate = _check_number(
            "base_learning_rate", base_learning_rate, minimum=0.0, strict=True
        )
        try:
            boundaries = [float(b) for b in boundaries]
            multipliers = [float(m) for m in multipliers]
        except (TypeError, ValueError):
            raise ValueError(
                "Arguments `boundaries` and `multipliers` must be lists of numbers. Received: "
                f"boundaries={boundaries!r}, multipliers={multipliers!r}"
            ) from None
        if len(multipliers) != len(boundaries) + 1:
            raise ValueError(
                "Argument `multipliers` must have len(boundaries) + 1 = "
                f"{len(boundaries) + 1} values. Received: multipliers={multipliers!r}"
            )
        for b in boundaries:
            _check_number("boundaries", b, minimum=0.0, strict=True)
        for a, b in zip(boundaries, boundaries[1:]):
            if not b > a:
                raise ValueError(
                    "Argument `boundaries` must be strictly increasing. "
                    f"Received: boundaries={boundaries!r}"
                )
        for m in multipliers:
            if not m > 0:
                raise ValueError(
                    f"Argument `multipliers` must all be > 0. Received: multipliers={multipliers!r}"
                )
        self.boundaries = boundaries
        self.multipliers = multipliers
        self.warmup_epochs = _check_number("warmup_epochs", warmup_epochs, minimum=0.0)
        if boundaries and self.warmup_epochs > boundaries[0]:
            raise ValueError(
                f"Argument `warmup_epochs` must be <= the first boundary ({boundaries[0]!r}). "
                f"Received: warmup_epochs={warmup_epochs!r}"
            )
        self.warmup_start_learning_rate = _check_number(
            "warmup_start_learning_rate", warmup_start_learning_rate, minimum=0.0
        )
        self._phases = normalize_steps_per_epoch(steps_per_epoch)
        self.steps_per_epoch = _config_steps_per_epoch(self._phases)
        self.name = name

    def __call__(self, step):
        with tf.name_scope(self.name or type(self).__name__):
            epoch = epochs_from_steps(step, self._phases)
            # target(e) = base * m_k with k = number of boundaries <= e.
            index = tf.zeros([], tf.int32)
            for boundary in self.boundaries:
                index += tf.cast(epoch >= boundary, tf.int32)
            multiplier = tf.gather(tf.constant(self.multipliers, tf.float32), index)
            target = self.base_learning_rate * multiplier
            if self.warmup_epochs > 0:
                start = tf.constant(self.warmup_start_learning_rate, tf.float32)
                warm = start + (target - start) * (epoch / self.warmup_epochs)
                return tf.where(epoch < self.warmup_epochs, warm, target)
            return target

    def get_config(self):
        return {
            "base_learning_rate": self.base_learning_rate,
            "boundaries": list(self.boundaries),
            "multipliers": list(self.multipliers),
            "steps_per_epoch": self.steps_per_epoch,
            "warmup_epochs": self.warmup_epochs,
            "warmup_start_learning_rate": self.warmup_start_learning_rate,
            "name": self.name,
        }


@keras.saving.register_keras_serializable(package="tfscale")
class SlowStart(WarmupPiecewise):
    """Akiba et al.'s slow-start schedule: a `WarmupPiecewise` with their multipliers.

    Akiba, Suzuki, Fukuda, "Extremely Large Minibatch SGD: Training ResNet-50 on
    ImageNet in 15 Minutes", arXiv:1711.04325 (*reference code*): with
    `base = 0.1 * B / 256` (`scaled_learning_rate(0.1, B)`), the rate is base x 0.5
    until epoch 40, x 0.075 until 70, x 0.01 until 85 and x 0.001 after. Use it with
    `RMSpropWarmup`, which supplies the early-training stabilisation.

    Args:
        base_learning_rate: float > 0, e.g. `scaled_learning_rate(0.1, B)`.
        steps_per_epoch: the epoch clock (int > 0 or `[start_epoch, steps]` pairs).
        boundaries: epochs where the multiplier changes. Defaults to `(40, 70, 85)`.
        multipliers: defaults to `(0.5, 0.075, 0.01, 0.001)`.
        warmup_epochs: float >= 0. Defaults to 0 (Akiba warms up through RMSprop).
        warmup_start_learning_rate: float >= 0. Defaults to 0.0.
        name: optional string.

    Raises:
        ValueError: as `WarmupPiecewise`.
    """

    def __init__(
        self,
        base_learning_rate,
        steps_per_epoch,
        boundaries=(40, 70, 85),
        multipliers=(0.5, 0.075, 0.01, 0.001),
        warmup_epochs=0.0,
        warmup_start_learning_rate=0.0,
        name=None,
    ):
        super().__init__(
            base_learning_rate=base_learning_rate,
            boundaries=boundaries,
            multipliers=multipliers,
            steps_per_epoch=steps_per_epoch,
            warmup_epochs=warmup_epochs,
            warmup_start_learning_rate=warmup_start_learning_rate,
            name=name,
        )
