"""RMSprop warm-up: momentum SGD that starts as RMSprop (Akiba et al., arXiv:1711.04325)."""

import keras
import tensorflow as tf

from tfscale.optimizers._common import (
    _check_number,
    _check_patterns,
    _matches_any,
    _variable_path,
)
from tfscale.optimizers.schedules import (
    _config_steps_per_epoch,
    epochs_from_steps,
    normalize_steps_per_epoch,
)

__all__ = ["RMSpropWarmup", "rmsprop_blend"]


def rmsprop_blend(epoch, blend_center_epochs=10.0, blend_period_epochs=5.0):
    """The SGD weight `alpha_sgd(e)` of Akiba's RMSprop warm-up (a TF computation).

        alpha_sgd(e) = 0.5 * exp(2 * (e - c) / p)   for e < c
        alpha_sgd(e) = 0.5 + (e - c) / p            for c <= e < c + p / 2
        alpha_sgd(e) = 1                            after

    with `c = blend_center_epochs` and `p = blend_period_epochs`. It is continuous and
    rises from about 0 (pure RMSprop) to 1 (pure momentum SGD). Akiba, Suzuki, Fukuda,
    arXiv:1711.04325 (*reference code*).

    Args:
        epoch: float scalar tensor (or Python float), the fractional epoch.
        blend_center_epochs: float >= 0, `c` (epochs). Defaults to 10.
        blend_period_epochs: float > 0, `p` (epochs). Defaults to 5.

    Returns:
        float32 scalar tensor in (0, 1].
    """
    e = tf.cast(epoch, tf.float32)
    c = float(blend_center_epochs)
    p = float(blend_period_epochs)
    # Clamp the exponent so that exp never overflows (it is only used where e < c).
    early = 0.5 * tf.exp(2.0 * tf.minimum(e - c, 0.0) / p)
    middle = 0.5 + (e - c) / p
    return tf.where(e < c, early, tf.where(e < c + p / 2.0, middle, 1.0))


@keras.saving.register_keras_serializable(package="tfscale")
class RMSpropWarmup(keras.optimizers.Optimizer):
    """Momentum SGD blended with RMSprop over the first epochs (Akiba et al.).

    For each variable `theta` with gradient `g` (plus `wd * theta` when weight decay
    applies), learning rate `eta` (the schedule's value) and fractional epoch `e`
    (from `steps_per_epoch` and the step count):

        m <- rho * m + (1 - rho) * g**2
        d <- momentum * d - (alpha_sgd(e) + alpha_rms(e) / (sqrt(m) + epsilon)) * g
        theta <- theta + eta * d
        alpha_rms(e) = (1 - alpha_sgd(e)) * rmsprop_learning_rate / eta  (0 when eta == 0)

    `alpha_sgd` is `rmsprop_blend(e, blend_center_epochs, blend_period_epochs)`: at the
    start the step is RMSprop with rate `rmsprop_learning_rate`, from
    `blend_center_epochs + blend_period_epochs / 2` on it is momentum SGD with rate
    `eta`. Akiba, Suzuki, Fukuda, "Extremely Large Minibatch SGD: Training ResNet-50
    on ImageNet in 15 Minutes", arXiv:1711.04325 (update and defaults from the
    *reference code*); use it with `tfscale.optimizers.SlowStart`.

    The epoch is computed from `optimizer.iterations`, so with a global batch that
    grows during training pass the same phased `steps_per_epoch` as the learning-rate
    schedule (`BatchSizeSchedule.steps_per_epoch_phases`).

    Args:
        learning_rate: float > 0 or a `LearningRateSchedule`, `eta`. Defaults to 0.1.
        steps_per_epoch: the epoch clock: an int > 0 (optimizer steps per epoch) or a
            list of `[start_epoch, steps_per_epoch]` pairs (see
            `tfscale.optimizers.schedules`). Required.
        momentum: float in [0, 1), `mu1`. Defaults to 0.9.
        rho: float in [0, 1), the decay `mu2` of the squared-gradient average.
            Defaults to 0.99.
        epsilon: float > 0. Defaults to 1e-8.
        rmsprop_learning_rate: float > 0, the RMSprop rate `eta_rms`. Defaults to 3e-4.
        blend_center_epochs: float >= 0, `beta_c` (epochs). Defaults to 10.
        blend_period_epochs: float > 0, `beta_p` (epochs). Defaults to 5.
        weight_decay: float >= 0, L2 coefficient added to the gradient before both
            moments. Defaults to 0.0 (Akiba's value is not confirmed; Chainer's ImageNet
            example uses 1e-4).
        exclude_from_weight_decay: regular expressions searched in `variable.path`;
            `None` (default) means `DEFAULT_EXCLUSIONS` (BN parameters and biases),
            `[]` excludes nothing.
        name: optional string.
        **kwargs: the other `keras.optimizers.Optimizer` arguments.

    Raises:
        ValueError: on a rate <= 0, momentum or rho outside [0, 1), epsilon <= 0,
            blend period <= 0, negative weight decay or a malformed `steps_per_epoch`;
            the message names the argument and value.
    """

    def __init__(
        self,
        learning_rate=0.1,
        steps_per_epoch=None,
        momentum=0.9,
        rho=0.99,
        epsilon=1e-8,
        rmsprop_learning_rate=3e-4,
        blend_center_epochs=10.0,
        blend_period_epochs=5.0,
        weight_decay=0.0,
        exclude_from_weight_decay=None,
        name=None,
        **kwargs,
    ):
        if isinstance(learning_rate, (int, float)) and not isinstance(learning_rate, bool):
            learning_rate = _check_number("learning_rate", learning_rate, minimum=0.0, strict=True)
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if steps_per_epoch is None:
            raise ValueError(
                "Argument `steps_per_epoch` is required (an int > 0 or a list of "
                "[start_epoch, steps_per_epoch] pairs). Received: steps_per_epoch=None"
            )
        self._phases = normalize_steps_per_epoch(steps_per_epoch)
        self.steps_per_epoch = _config_steps_per_epoch(self._phases)
        self.momentum = _check_number("momentum", momentum, minimum=0.0, maximum=1.0, max_strict=True)
        self.rho = _check_number("rho", rho, minimum=0.0, maximum=1.0, max_strict=True)
        self.epsilon = _check_number("epsilon", epsilon, minimum=0.0, strict=True)
        self.rmsprop_learning_rate = _check_number(
            "rmsprop_learning_rate", rmsprop_learning_rate, minimum=0.0, strict=True
        )
        self.blend_center_epochs = _check_number(
            "blend_center_epochs", blend_center_epochs, minimum=0.0
        )
        self.blend_period_epochs = _check_number(
            "blend_period_epochs", blend_period_epochs, minimum=0.0, strict=True
        )
        self.rmsprop_weight_decay = _check_number("weight_decay", weight_decay, minimum=0.0)
        self.weight_decay_exclusions = _check_patterns(
            "exclude_from_weight_decay", exclude_from_weight_decay
        )

    def build(self, variables):
        """Creates the `d` (velocity) and `m` (mean squared gradient) slots.

        Args:
            variables: list of model variables (`keras.Variable`).
        """
        if self.built:
            return
        super().build(variables)
        self.velocities = self.add_optimizer_variables(variables, "velocity")
        self.mean_squares = self.add_optimizer_variables(variables, "mean_square")
        self._use_decay = [
            not _matches_any(self.weight_decay_exclusions, _variable_path(v)) for v in variables
        ]

    def blend(self):
        """`(alpha_sgd, epoch)` at the current step, float32 scalar tensors."""
        epoch = epochs_from_steps(self.iterations, self._phases)
        return (
            rmsprop_blend(epoch, self.blend_center_epochs, self.blend_period_epochs),
            epoch,
        )

    def update_step(self, gradient, variable, learning_rate):
        """Applies one blended update to `variable`.

        Args:
            gradient: tensor with the shape of `variable` (all-reduced).
            variable: the model variable.
            learning_rate: scalar tensor, `eta` at this step.
        """
        index = self._get_variable_index(variable)
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.convert_to_tensor(gradient)
        dtype = variable.dtype
        gradient = tf.cast(gradient, dtype)
        if self._use_decay[index] and self.rmsprop_weight_decay > 0:
            gradient = gradient + tf.cast(self.rmsprop_weight_decay, dtype) * variable
        alpha_sgd, _ = self.blend()
        eta = tf.cast(learning_rate, tf.float32)
        alpha_rms = tf.math.divide_no_nan((1.0 - alpha_sgd) * self.rmsprop_learning_rate, eta)
        m = self.mean_squares[index]
        d = self.velocities[index]
        rho = tf.cast(self.rho, dtype)
        self.assign(m, rho * m + (1 - rho) * tf.square(gradient))
        scale = tf.cast(alpha_sgd, dtype) + tf.cast(alpha_rms, dtype) / (
            tf.sqrt(tf.convert_to_tensor(m)) + tf.cast(self.epsilon, dtype)
        )
        self.assign(d, tf.cast(self.momentum, dtype) * d - scale * gradient)
        self.assign_add(variable, tf.cast(eta, dtype) * d)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "steps_per_epoch": self.steps_per_epoch,
                "momentum": self.momentum,
                "rho": self.rho,
                "epsilon": self.epsilon,
                "rmsprop_learning_rate": self.rmsprop_learning_rate,
                "blend_center_epochs": self.blend_center_epochs,
                "blend_period_epochs": self.blend_period_epochs,
                "weight_decay": self.rmsprop_weight_decay,
                "exclude_from_weight_decay": list(self.weight_decay_exclusions),
            }
        )
        return config

