"""LARS: layer-wise adaptive rate scaling for Keras 3 (You et al., arXiv:1708.03888)."""

import keras
import tensorflow as tf

from tfscale.optimizers._common import (
    DEFAULT_EXCLUSIONS,
    _check_number,
    _check_patterns,
    _matches_any,
    _variable_path,
)

__all__ = ["LARS"]

_TRUST_RATIO_FORMS = ("mlperf", "model_garden")


@keras.saving.register_keras_serializable(package="tfscale")
class LARS(keras.optimizers.Optimizer):
    """Momentum SGD with a per-layer trust ratio (LARS), in the MLPerf reference form.

    For each variable `w` with all-reduced gradient `g`, learning rate `lr`, weight
    decay `wd`, trust coefficient `eta` and momentum `m` (You, Gitman, Ginsburg,
    "Large Batch Training of Convolutional Networks", arXiv:1708.03888, Algorithm 1;
    MLPerf ResNet-50 reference):

        trust = eta * ||w|| / (||g|| + wd * ||w|| + epsilon)   # "mlperf" (default)
        trust = eta * ||w|| / (||g + wd * w|| + epsilon)       # "model_garden"
        trust = 1          if ||w|| == 0 or the denominator's gradient norm == 0
        v <- m * v + lr * trust * (g + wd * w)
        w <- w - v                                   (nesterov=False)
        w <- w - (m * v + lr * trust * (g + wd * w)) (nesterov=True)

    `||.||` is the L2 norm over the whole variable (one "layer" = one variable).
    Variables whose path matches `exclude_from_weight_decay` get `wd = 0`; those
    matching `exclude_from_layer_adaptation` get `trust = 1` (plain momentum SGD). By
    default both lists skip batch-normalisation parameters and biases, as MLPerf's
    `skip_list=['batch_normalization', 'bias']` did; the default regexes also match
    the Keras 3 names `gamma` and `beta`, so normalisation layers with any name are
    skipped.

    The trust ratio is computed in `update_step`, which under `tf.distribute`
    strategies receives the all-reduced (global) gradient, so a run on N replicas
    equals a one-device run at the same global batch. Keras's own `weight_decay`
    argument (decoupled, applied before the all-reduce) is not used: the weight decay
    here is LARS's L2 term inside the trust ratio and the update. The norms are
    computed in float32 whatever the variable dtype, so the optimizer works inside
    `keras.mixed_precision.LossScaleOptimizer` (which unscales the gradients first).

    Args:
        learning_rate: float > 0 or a `keras.optimizers.schedules.LearningRateSchedule`
            (e.g. `tfscale.optimizers.WarmupPolynomialDecay`). The global rate `lr`.
            Defaults to 0.1.
        momentum: float in [0, 1), the momentum `m`. Defaults to 0.9.
        weight_decay: float >= 0, the L2 coefficient `wd`. Defaults to 1e-4 (MLPerf
            v0.5 reference code; Fujitsu used 5e-5).
        eta: float > 0, the trust coefficient. Defaults to 0.001 (You et al.; Fujitsu
            used 0.0025).
        epsilon: float >= 0, added to the denominator of the trust ratio. Defaults to
            0.0 (the MLPerf reference; the norm checks make 0 safe).
        nesterov: bool, use Nesterov momentum. Defaults to False.
        exclude_from_weight_decay: list of regular expressions searched (`re.search`)
            in `variable.path` (e.g. `"model/dense/bias"`); matching variables get no
            weight decay. `None` (the default) means `DEFAULT_EXCLUSIONS`
            (`batch_normalization`, `bias`, `gamma`, `beta`); `[]` excludes nothing.
        exclude_from_layer_adaptation: the same for the trust ratio (matching
            variables use `trust = 1`). `None` means the defaults as above.
        trust_ratio_form: `"mlperf"` (default; `eta*||w||/(||g|| + wd*||w|| + eps)`)
            or `"model_garden"` (TF Model Garden's `eta*||w||/(||g + wd*w|| + eps)`).
        name: optional string; Keras makes a unique one (`"lars"`, `"lars_1"`, ...) when None.
        **kwargs: the other `keras.optimizers.Optimizer` arguments (`clipnorm`,
            `global_clipnorm`, `use_ema`, `loss_scale_factor`,
            `gradient_accumulation_steps`, ...). Note that clipping sees the local
            (pre-all-reduce) gradient under `tf.distribute`. `weight_decay` of the base
            class is this class's LARS weight decay.

    Raises:
        ValueError: on a learning rate <= 0, momentum outside [0, 1), negative weight
            decay or epsilon, eta <= 0, an unknown `trust_ratio_form` or a malformed
            exclusion list; the message names the argument and the value.

    Example:
        >>> schedule = tfscale.optimizers.WarmupPolynomialDecay(
        ...     peak_learning_rate=10.0, warmup_epochs=5, total_epochs=40,
        ...     steps_per_epoch=312)
        >>> model.compile(optimizer=tfscale.optimizers.LARS(schedule), loss=...)

    References:
        You, Gitman, Ginsburg, "Large Batch Training of Convolutional Networks",
        arXiv:1708.03888. Ying et al., "Image Classification at Supercomputer Scale",
        arXiv:1811.06992 (LARS at 32k-64k in MLPerf). Yamazaki et al., "Yet Another
        Accelerated SGD", arXiv:1903.12650.
    """

    def __init__(
        self,
        learning_rate=0.1,
        momentum=0.9,
        weight_decay=1e-4,
        eta=0.001,
        epsilon=0.0,
        nesterov=False,
        exclude_from_weight_decay=None,
        exclude_from_layer_adaptation=None,
        trust_ratio_form="mlperf",
        name=None,
        **kwargs,
    ):
        if isinstance(learning_rate, (int, float)) and not isinstance(learning_rate, bool):
            learning_rate = _check_number("learning_rate", learning_rate, minimum=0.0, strict=True)
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = _check_number("momentum", momentum, minimum=0.0, maximum=1.0, max_strict=True)
        # Stored under another name: the base class applies `self.weight_decay` as
        # decoupled decay on the local gradients, which LARS must not do.
        self.lars_weight_decay = _check_number("weight_decay", weight_decay, minimum=0.0)
        self.eta = _check_number("eta", eta, minimum=0.0, strict=True)
        self.epsilon = _check_number("epsilon", epsilon, minimum=0.0)
        if not isinstance(nesterov, bool):
            raise ValueError(f"Argument `nesterov` must be a bool. Received: nesterov={nesterov!r}")
        self.nesterov = nesterov
        if trust_ratio_form not in _TRUST_RATIO_FORMS:
            raise ValueError(
                f"Argument `trust_ratio_form` must be one of {list(_TRUST_RATIO_FORMS)}. "
                f"Received: trust_ratio_form={trust_ratio_form!r}"
            )
        self.trust_ratio_form = trust_ratio_form
        self.weight_decay_exclusions = _check_patterns(
            "exclude_from_weight_decay", exclude_from_weight_decay
        )
        self.layer_adaptation_exclusions = _check_patterns(
            "exclude_from_layer_adaptation", exclude_from_layer_adaptation
        )

    def build(self, variables):
        """Creates one momentum slot per variable and decides each variable's exclusions.

        Args:
            variables: list of model variables (`keras.Variable`), as passed by
                `apply`. Their `path` is matched against the exclusion regexes.
        """
        if self.built:
            return
        super().build(variables)
        self.momentums = self.add_optimizer_variables(variables, "momentum")
        # Python flags, indexed like `self._get_variable_index(variable)`.
        self._use_decay = []
        self._use_adaptation = []
        for variable in variables:
            path = _variable_path(variable)
            self._use_decay.append(not _matches_any(self.weight_decay_exclusions, path))
            self._use_adaptation.append(not _matches_any(self.layer_adaptation_exclusions, path))

    def _trust_ratio(self, variable, gradient, use_decay):
        """`eta * ||w|| / (...)` as a float32 scalar tensor, 1 where a norm is 0."""
        w = tf.cast(variable, tf.float32)
        g = tf.cast(gradient, tf.float32)
        w_norm = tf.norm(w)
        wd = self.lars_weight_decay if use_decay else 0.0
        if self.trust_ratio_form == "mlperf":
            g_norm = tf.norm(g)
            denominator = g_norm + wd * w_norm + self.epsilon
        else:
            g_norm = tf.norm(g + wd * w)
            denominator = g_norm + self.epsilon
        ratio = self.eta * w_norm / tf.where(denominator > 0, denominator, 1.0)
        return tf.where(tf.logical_and(w_norm > 0, g_norm > 0), ratio, 1.0)

    def update_step(self, gradient, variable, learning_rate):
        """Applies one LARS update to `variable`.

        Args:
            gradient: tensor (or `tf.IndexedSlices`, densified) with the shape of
                `variable`; the all-reduced gradient.
            variable: the model variable to update, float16/bfloat16/float32.
            learning_rate: scalar tensor, the current global learning rate.
        """
        index = self._get_variable_index(variable)
        use_decay = self._use_decay[index] and self.lars_weight_decay > 0
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.convert_to_tensor(gradient)
        dtype = variable.dtype
        gradient = tf.cast(gradient, dtype)
        learning_rate = tf.cast(learning_rate, dtype)
        if self._use_adaptation[index]:
            scaled_lr = learning_rate * tf.cast(self._trust_ratio(variable, gradient, use_decay), dtype)
        else:
            scaled_lr = learning_rate
        if use_decay:
            gradient = gradient + tf.cast(self.lars_weight_decay, dtype) * variable
        step = scaled_lr * gradient
        velocity = self.momentums[index]
        momentum = tf.cast(self.momentum, dtype)
        self.assign(velocity, momentum * velocity + step)
        if self.nesterov:
            self.assign_sub(variable, momentum * velocity + step)
        else:
            self.assign_sub(variable, velocity)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "weight_decay": self.lars_weight_decay,
                "eta": self.eta,
                "epsilon": self.epsilon,
                "nesterov": self.nesterov,
                "exclude_from_weight_decay": list(self.weight_decay_exclusions),
                "exclude_from_layer_adaptation": list(self.layer_adaptation_exclusions),
                "trust_ratio_form": self.trust_ratio_form,
            }
        )
        return config


LARS.DEFAULT_EXCLUSIONS = DEFAULT_EXCLUSIONS
