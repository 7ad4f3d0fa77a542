"""Distributed batch normalisation with a group size (Ying et al., arXiv:1811.06992).

During training each replica normalises its inputs with the mean and variance of the
examples of its *group*: the `group_size` replicas with contiguous replica ids
`g*G, ..., g*G + G - 1`. `group_size=1` is local (per-replica) batch normalisation,
`group_size=None` (or the number of replicas) is fully synchronised batch normalisation,
the same as `keras.layers.BatchNormalization(synchronized=True)`.

The algorithm, per layer and per training step:

1. Each replica computes, for every channel, the sum and the sum of squares of its
   inputs (shifted by the moving mean, for numerical stability) and the number of values.
2. The three rows are stacked into one `[3, channels]` tensor and placed at row `g` (the
   replica's group) of an otherwise zero `[num_groups, 3, channels]` tensor (a one-hot
   mask, because `ReplicaContext.all_reduce` has no sub-group argument).
3. One `all_reduce(SUM)` over all replicas sums these tensors: row `g` of the result holds
   the totals of group `g`. This is the only cross-replica reduction of the layer in the
   step; its gradient is again an `all_reduce(SUM)` (TensorFlow's `ReplicaContext.all_reduce`
   registers it), so gradients with respect to the inputs, gamma and beta are exact.
4. Each replica normalises with its own group's mean and (biased) variance.
5. The moving mean and variance are updated with the average over all groups of the group
   mean and group variance, computed on every replica from the same reduced tensor, so
   they stay identical on every replica (they are also created with
   `aggregation="only_first_replica"`, which broadcasts replica 0's value on assignment).

With `group_size=1` step 4 uses the local statistics directly (no gradient flows through
the reduction) and the reduction only carries the per-replica means and variances that
step 5 needs.
"""

import keras
import tensorflow as tf

from tfscale import _cross_replica
from tfscale import _tf_compat

_MOVING_AGGREGATION = "only_first_replica"


def _check_group_size(group_size, num_replicas):
    """Checks that `group_size` divides `num_replicas`; returns the group size used.

    Args:
        group_size: int >= 1 or None (all replicas).
        num_replicas: int, the number of replicas in sync.

    Returns:
        int, the group size (`num_replicas` when `group_size` is None).

    Raises:
        ValueError: if `group_size` does not divide `num_replicas`.
    """
    if group_size is None:
        return num_replicas
    if num_replicas % group_size:
        raise ValueError(
            "Argument `group_size` must divide the number of replicas in sync. "
            f"Received: group_size={group_size}, num_replicas={num_replicas}"
        )
    return group_size


@keras.saving.register_keras_serializable(package="tfscale")
class DistributedBatchNormalization(keras.layers.BatchNormalization):
    """Batch normalisation whose training statistics span a group of replicas.

    A drop-in replacement for `keras.layers.BatchNormalization` (same call signature,
    weights named and ordered `gamma`, `beta`, `moving_mean`, `moving_variance`), that
    during training normalises each replica's inputs with the mean and variance over its
    group of `group_size` contiguous replicas (Ying et al., "Image Classification at
    Supercomputer Scale", arXiv:1811.06992, section 3.2). The statistics of a group are
    obtained with one fused cross-replica reduction per layer per step: the sum, the sum of
    squares and the count, stacked together (see the module docstring for the steps).

    - `group_size=1`: each replica uses its own batch (local BN, Keras's default under a
      strategy, but with moving statistics kept identical on every replica).
    - `group_size=G`: the BN span is `G * per_replica_batch` examples. Google's MLPerf TPU
      run used G=8 with 16 images per core (a span of 128 images).
    - `group_size=None` or the number of replicas: fully synchronised BN, equal to
      `keras.layers.BatchNormalization(synchronized=True)`.

    Outside any `tf.distribute` strategy, in a cross-replica context, or with a single
    replica, the layer is plain batch normalisation whatever `group_size` is. It works
    under `tf.distribute.MirroredStrategy` with any `CrossDeviceOps` (including tfscale's
    all-reduce algorithms) and under `tf.distribute.MultiWorkerMirroredStrategy`: it uses
    only `ReplicaContext.all_reduce(SUM)`, `replica_id_in_sync_group` and
    `num_replicas_in_sync`. Where each replica is a process of its own (Horovod,
    `tfscale.distribute.horovod`), the backend installs its replicas for the layer
    (`tfscale._cross_replica`) and a group's statistics are summed over that group only
    (a Horovod process set per group).

    In inference (`training=False`, or a layer with `trainable=False`) the moving
    statistics are used, exactly as in Keras. They are updated in training as
    `moving = momentum * moving + (1 - momentum) * batch_stat`, where `batch_stat` is the
    average over all groups of the group mean (resp. the biased group variance); with
    equal per-replica batches the averaged mean is the global batch mean. Statistics are
    computed in float32 (or float64 for float64 inputs) under mixed precision.

    Args:
        group_size: int >= 1 or None, default None. The number of contiguous replicas whose
            examples form one normalisation batch. Must divide the number of replicas in
            sync when there is more than one replica (checked when the layer is built
            under a strategy scope and when it is called in a replica context). None means
            all replicas.
        momentum: float in [0, 1), default 0.9 (the seeds' value; Keras's 0.99 can leave
            the moving statistics far from the population after a short run). Decay of
            the moving averages, per training step.
        epsilon: float > 0, default 1e-5. Added to the variance before the square root.
        axis: int, default -1. The channel axis (kept), e.g. 1 for channels-first
            convolutions. All other axes are reduced.
        center: bool, default True. If True, add the learned offset `beta`.
        scale: bool, default True. If True, multiply by the learned scale `gamma`.
        beta_initializer: initializer for `beta`, default "zeros".
        gamma_initializer: initializer for `gamma`, default "ones". Pass "zeros" for the
            last BN of a residual block (Goyal et al., arXiv:1706.02677).
        moving_mean_initializer: initializer for the moving mean, default "zeros".
        moving_variance_initializer: initializer for the moving variance, default "ones".
        beta_regularizer: optional regularizer for `beta`.
        gamma_regularizer: optional regularizer for `gamma`.
        beta_constraint: optional constraint for `beta`.
        gamma_constraint: optional constraint for `gamma`.
        **kwargs: base layer keyword arguments (`name`, `dtype`, `trainable`, ...).
            `synchronized=False` and `renorm=False` are accepted and ignored (so configs of
            `keras.layers.BatchNormalization` load); `synchronized=True` and
            `renorm=True` raise.

    Call arguments:
        inputs: float tensor of any rank >= 2, e.g. `[batch, height, width, channels]`
            (float16, bfloat16, float32 or float64). The per-replica batch.
        training: Python bool or None. True normalises with the group's batch statistics
            and updates the moving statistics; False or None uses the moving statistics.
        mask: must be None in multi-replica training (masks are only supported where the
            layer behaves as plain Keras batch normalisation).

    Returns:
        A tensor of the same shape and dtype (the layer's compute dtype) as `inputs`.

    Raises:
        ValueError: if `group_size` is not None or an int >= 1, if `momentum` is not in
            [0, 1), if `epsilon` <= 0, if `synchronized=True` or `renorm=True` is passed,
            if `group_size` does not divide the number of replicas in sync, or if a mask
            is passed in multi-replica training.

    Example:

    ```python
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1", "/cpu:2", "/cpu:3"])
    with strategy.scope():
        inputs = keras.Input((32, 32, 3))
        x = keras.layers.Conv2D(16, 3, use_bias=False)(inputs)
        x = tfscale.layers.DistributedBatchNormalization(group_size=2)(x)
        ...
    ```

    References:
        Ying, Kumar, Chen, Wang, Cheng, "Image Classification at Supercomputer Scale",
        arXiv:1811.06992. Ioffe and Szegedy, "Batch Normalization", arXiv:1502.03167.
    """

    def __init__(
        self,
        group_size=None,
        momentum=0.9,
        epsilon=1e-5,
        axis=-1,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        **kwargs,
    ):
        if group_size is not None and (
            isinstance(group_size, bool)
            or not isinstance(group_size, int)
            or group_size < 1
        ):
            raise ValueError(
                "Argument `group_size` must be None or an int >= 1. "
                f"Received: group_size={group_size!r}"
            )
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(
                f"Argument `momentum` must be in [0, 1). Received: momentum={momentum}"
            )
        if not float(epsilon) > 0.0:
            raise ValueError(
                f"Argument `epsilon` must be > 0. Received: epsilon={epsilon}"
            )
        if kwargs.pop("synchronized", False):
            raise ValueError(
                "Argument `synchronized=True` is not supported by "
                "DistributedBatchNormalization; pass group_size=None to synchronise "
                "over all replicas. Received: synchronized=True"
            )
        if kwargs.pop("renorm", False):
            raise ValueError(
                "Argument `renorm=True` (batch renormalisation) is not supported by "
                "DistributedBatchNormalization. Received: renorm=True"
            )
        kwargs.pop("renorm_clipping", None)
        kwargs.pop("renorm_momentum", None)
        super().__init__(
            axis=axis,
            momentum=momentum,
            epsilon=epsilon,
            center=center,
            scale=scale,
            beta_initializer=beta_initializer,
            gamma_initializer=gamma_initializer,
            moving_mean_initializer=moving_mean_initializer,
            moving_variance_initializer=moving_variance_initializer,
            beta_regularizer=beta_regularizer,
            gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint,
            gamma_constraint=gamma_constraint,
            **kwargs,
        )
        self.group_size = group_size

    def build(self, input_shape):
        """Creates `gamma`, `beta` (trainable) and the moving statistics.

        The moving mean and variance are created with
        `aggregation="only_first_replica"` so that an assignment in a replica context
        writes the same value to every replica.

        Args:
            input_shape: tuple of ints (None allowed except on `axis`), the input shape.

        Raises:
            ValueError: if the channel dimension is unknown, or if built under a strategy
                scope whose number of replicas `group_size` does not divide.
        """
        ndim = len(input_shape)
        if not -ndim <= self.axis < ndim:
            raise ValueError(
                f"Argument `axis` must be in [-{ndim}, {ndim}) for inputs of rank {ndim}. "
                f"Received: axis={self.axis}, input_shape={tuple(input_shape)}"
            )
        channels = input_shape[self.axis]
        if channels is None:
            raise ValueError(
                "The channel dimension of the inputs must be known. "
                f"Received: input_shape={tuple(input_shape)}, axis={self.axis}"
            )
        if tf.distribute.has_strategy():
            _check_group_size(
                self.group_size, tf.distribute.get_strategy().num_replicas_in_sync
            )
        elif _cross_replica.current() is not None:
            _check_group_size(self.group_size, _cross_replica.current().num_replicas_in_sync)
        shape = (channels,)
        if self.scale:
            self.gamma = self.add_weight(
                shape=shape,
                name="gamma",
                initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
                trainable=True,
                autocast=False,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=shape,
                name="beta",
                initializer=self.beta_initializer,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
                trainable=True,
                autocast=False,
            )
        self.moving_mean = self.add_weight(
            shape=shape,
            name="moving_mean",
            initializer=self.moving_mean_initializer,
            trainable=False,
            autocast=False,
            aggregation=_MOVING_AGGREGATION,
        )
        self.moving_variance = self.add_weight(
            shape=shape,
            name="moving_variance",
            initializer=self.moving_variance_initializer,
            trainable=False,
            autocast=False,
            aggregation=_MOVING_AGGREGATION,
        )
        self.input_spec = keras.layers.InputSpec(ndim=ndim, axes={self.axis: channels})
        reduction_axes = list(range(ndim))
        del reduction_axes[self.axis]
        _tf_compat.set_batch_norm_reduction_axes(self, reduction_axes)

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable):
            return super().call(inputs, training=training, mask=mask)
        replica_ctx = _replica_context()
        num_replicas = 1 if replica_ctx is None else replica_ctx.num_replicas_in_sync
        if num_replicas == 1:
            # Plain BN; the base class also handles masks here.
            return super().call(inputs, training=training, mask=mask)
        if mask is not None:
            raise ValueError(
                "DistributedBatchNormalization does not support masks in training with "
                f"more than one replica. Received: mask with shape {mask.shape}, "
                f"num_replicas={num_replicas}"
            )
        group_size = _check_group_size(self.group_size, num_replicas)

        compute_dtype = keras.backend.result_type(inputs.dtype, "float32")
        x = tf.cast(inputs, compute_dtype)
        shift = tf.stop_gradient(tf.cast(self.moving_mean, compute_dtype))
        mean, variance, moving_mean_update, moving_variance_update = _group_moments(
            x, self._reduction_axes, self.axis, shift, replica_ctx, group_size
        )
        momentum = tf.cast(self.momentum, compute_dtype)
        self.moving_mean.assign(
            tf.cast(self.moving_mean, compute_dtype) * momentum
            + moving_mean_update * (1.0 - momentum)
        )
        self.moving_variance.assign(
            tf.cast(self.moving_variance, compute_dtype) * momentum
            + moving_variance_update * (1.0 - momentum)
        )
        gamma = tf.cast(self.gamma, compute_dtype) if self.scale else None
        beta = tf.cast(self.beta, compute_dtype) if self.center else None
        outputs = keras.ops.batch_normalization(
            x=x,
            mean=mean,
            variance=variance,
            axis=self.axis,
            offset=beta,
            scale=gamma,
            epsilon=self.epsilon,
        )
        return tf.cast(outputs, self.compute_dtype)

    def get_config(self):
        """Returns the layer's config: Keras BN's, plus `group_size`, less renorm/sync."""
        config = super().get_config()
        for key in ("synchronized", "renorm", "renorm_clipping", "renorm_momentum"):
            config.pop(key, None)
        config["group_size"] = self.group_size
        return config


def _replica_context():
    """The replicas the layer synchronises over: the `tf.distribute` replica context when it has several
    replicas, else the process replicas a backend installed (`tfscale._cross_replica`), else the (one-replica)
    `tf.distribute` context or None."""
    replica_ctx = tf.distribute.get_replica_context()
    if replica_ctx is not None and replica_ctx.num_replicas_in_sync > 1:
        return replica_ctx
    external = _cross_replica.current()
    if external is not None and external.num_replicas_in_sync > 1:
        return external
    return replica_ctx


def _group_moments(x, reduction_axes, axis, shift, replica_ctx, group_size):
    """Group and all-group moments with one fused cross-replica reduction.

    Args:
        x: float tensor, the per-replica inputs (float32 or float64).
        reduction_axes: list of ints, every axis of `x` except the channel axis.
        axis: int, the channel axis.
        shift: float tensor `[channels]`, identical on every replica (the moving mean),
            subtracted before summing squares to avoid cancellation; not differentiated.
        replica_ctx: the `tf.distribute.ReplicaContext` (more than one replica).
        group_size: int dividing `replica_ctx.num_replicas_in_sync`.

    Returns:
        `(mean, variance, mean_over_groups, variance_over_groups)`, each `[channels]`
        of the dtype of `x`: the group's mean and biased variance (differentiable), and
        the averages over all groups of the group means and variances (not
        differentiable, identical on every replica).
    """
    num_replicas = replica_ctx.num_replicas_in_sync
    num_groups = num_replicas // group_size
    if group_size == 1:
        # Local BN: normalise with the local moments (two-pass, exact); reduce only their
        # average over replicas (for the moving statistics), with no gradient through it.
        mean, variance = tf.nn.moments(x, axes=reduction_axes)
        stacked = tf.stop_gradient(tf.stack([mean, variance]))
        averaged = replica_ctx.all_reduce(tf.distribute.ReduceOp.SUM, stacked) / num_replicas
        return mean, variance, averaged[0], averaged[1]

    dtype = x.dtype
    channels = tf.shape(x)[axis]
    count = tf.cast(tf.size(x) // channels, dtype)
    shifted = x - tf.reshape(shift, _broadcast_shape(x, axis))
    local_sum = tf.reduce_sum(shifted, axis=reduction_axes)
    local_sum_sq = tf.reduce_sum(tf.square(shifted), axis=reduction_axes)
    counts = tf.fill(tf.shape(local_sum), count)
    stacked = tf.stack([local_sum, local_sum_sq, counts])  # [3, channels]
    if num_groups == 1:
        totals = replica_ctx.all_reduce(tf.distribute.ReduceOp.SUM, stacked)[None]
        own = totals[0]
    elif isinstance(replica_ctx, _cross_replica.ProcessReplicaContext):
        # Process replicas: sum over the group only (one process set per group), then average the groups'
        # statistics over all replicas for the moving averages (each group counted group_size times).
        own = replica_ctx.group_all_reduce(stacked, group_size)
        mean_shifted = own[0] / own[2]
        variance = tf.nn.relu(own[1] / own[2] - tf.square(mean_shifted))
        group_stats = tf.stop_gradient(tf.stack([mean_shifted, variance]))
        averaged = replica_ctx.all_reduce(tf.distribute.ReduceOp.SUM, group_stats) / num_replicas
        return mean_shifted + shift, variance, averaged[0] + shift, averaged[1]
    else:
        group_id = replica_ctx.replica_id_in_sync_group // group_size
        one_hot = tf.one_hot(group_id, num_groups, dtype=dtype)  # [num_groups]
        masked = one_hot[:, None, None] * stacked[None]  # [num_groups, 3, channels]
        totals = replica_ctx.all_reduce(tf.distribute.ReduceOp.SUM, masked)
        own = tf.tensordot(one_hot, totals, axes=1)  # [3, channels]

    mean_shifted = own[0] / own[2]
    variance = tf.nn.relu(own[1] / own[2] - tf.square(mean_shifted))
    mean = mean_shifted + shift

    all_totals = tf.stop_gradient(totals)  # [num_groups, 3, channels]
    all_mean_shifted = all_totals[:, 0] / all_totals[:, 2]
    all_variance = tf.nn.relu(all_totals[:, 1] / all_totals[:, 2] - tf.square(all_mean_shifted))
    mean_over_groups = tf.reduce_mean(all_mean_shifted, axis=0) + shift
    variance_over_groups = tf.reduce_mean(all_variance, axis=0)
    return mean, variance, mean_over_groups, variance_over_groups


def _broadcast_shape(x, axis):
    """The shape `[1, ..., channels, ..., 1]` that broadcasts a `[channels]` vector."""
    ndim = x.shape.rank
    shape = [1] * ndim
    shape[axis] = -1
    return shape
