"""Batch normalisation without moving averages (Akiba et al., arXiv:1711.04325).

Moving averages of batch statistics lag behind the weights: after a short run, or with a
high momentum such as Keras's default 0.99, they can be far from the statistics that the
trained network actually sees, and evaluation suffers (down to chance). Akiba et al.
instead recompute each batch normalisation layer's population statistics after training,
with the weights frozen, over a pass of training batches.

`recompute_batch_norm_statistics` does this in one forward pass per batch:

1. Every (trainable) BN layer's `call` is temporarily replaced by a statistic-gathering
   version that normalises with the statistics of the current batch, as in training
   (so every layer sees the inputs it sees in training), and records the count, mean and
   variance of its input. The rest of the model runs in inference mode
   (`training=False`: dropout and augmentation layers are off) and no variable changes.
   Under a `tf.distribute` strategy with more than one replica (the model's
   `distribute_strategy`, and a `tf.data.Dataset`), the batches are distributed like
   `fit`'s: each replica runs its share of the global batch and each BN layer normalises
   with the statistics it uses in training (local, group or all replicas); the
   per-replica moments are collected with
   `strategy.gather`, so every worker of a `MultiWorkerMirroredStrategy` gets the same
   statistics over the whole global batch.
2. The per-batch moments are combined exactly in float64 (Chan et al.'s pairwise update
   of count, mean and sum of squared deviations), so the result is the mean and variance
   of all the layer's input values over all the batches, not an exponential average.
3. Each layer's `moving_mean` and `moving_variance` are set to the population mean and
   the *biased* population variance (sum of squared deviations divided by the number of
   values), the same estimator that Keras uses to normalise a training batch. With the
   thousands of values per channel of a pass the unbiased (n - 1) variant differs by a
   relative 1/n.
"""

import threading
import warnings

import keras
import numpy as np
import tensorflow as tf

from tfscale import _tf_compat

from tfscale.layers.batch_norm import DistributedBatchNormalization
from tfscale.layers.batch_norm import _check_group_size
from tfscale.layers.batch_norm import _group_moments


def _batch_norm_layers(model):
    """All `keras.layers.BatchNormalization` instances of `model`, nested ones included.

    Args:
        model: a `keras.Model` or `keras.layers.Layer`.

    Returns:
        list of `keras.layers.BatchNormalization` (subclasses included, e.g.
        `tfscale.layers.DistributedBatchNormalization`), each once, in the order Keras
        tracks them.
    """
    # `_flatten_layers` is the recursive walk Keras itself uses for `model.weights`;
    # it also finds BN layers held as attributes of custom layers.
    seen = set()
    layers = []
    for layer in _tf_compat.flatten_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization) and id(layer) not in seen:
            seen.add(id(layer))
            layers.append(layer)
    return layers


def _features(element):
    """The model inputs of one dataset element: `x` of `(x, y)` or `(x, y, w)`, else all."""
    if isinstance(element, (tuple, list)):
        return element[0]
    return element


def _gathering_call(layer, state):
    """A replacement for `layer.call` that normalises with batch moments and records them.

    Args:
        layer: a built `keras.layers.BatchNormalization`.
        state: a `threading.local` whose `records` dict (set by the caller, one per replica
            thread) maps `id(layer)` to a list; each call appends a float
            `[3, channels]` tensor: the count of values per channel (repeated), the mean
            and the biased variance of the inputs.

    Returns:
        A function with the signature of `BatchNormalization.call`.
    """

    def call(inputs, training=None, mask=None):
        del training  # Always batch statistics: the training-time forward pass.
        if mask is not None:
            raise ValueError(
                "recompute_batch_norm_statistics does not support masked inputs. "
                f"Received: a mask for layer {layer.name!r}"
            )
        compute_dtype = keras.backend.result_type(inputs.dtype, "float32")
        x = tf.cast(inputs, compute_dtype)
        rank = x.shape.rank
        axis = layer.axis % rank
        reduction_axes = [i for i in range(rank) if i != axis]
        mean, variance = tf.nn.moments(x, axes=reduction_axes)
        count = tf.cast(tf.size(x) // tf.shape(x)[axis], compute_dtype)
        state.records[id(layer)].append(
            tf.stack([tf.fill(tf.shape(mean), count), mean, variance])
        )
        norm_mean, norm_variance = _training_moments(layer, x, reduction_axes, axis)
        if norm_mean is None:
            norm_mean, norm_variance = mean, variance
        gamma = tf.cast(layer.gamma, compute_dtype) if layer.scale else None
        beta = tf.cast(layer.beta, compute_dtype) if layer.center else None
        outputs = keras.ops.batch_normalization(
            x=x,
            mean=norm_mean,
            variance=norm_variance,
            axis=axis,
            offset=beta,
            scale=gamma,
            epsilon=layer.epsilon,
        )
        return tf.cast(outputs, layer.compute_dtype)

    return call


def _training_moments(layer, x, reduction_axes, axis):
    """The moments `layer` normalises with in training, when they span several replicas.

    In a replica context with more than one replica, a `DistributedBatchNormalization`
    with a group of more than one replica uses its group's moments, and a Keras
    `BatchNormalization(synchronized=True)` the moments over all replicas, exactly as in
    their training step (one cross-replica reduction). Otherwise returns `(None, None)`:
    the local batch moments are the training ones.

    Args:
        layer: a `keras.layers.BatchNormalization`.
        x: float tensor, the layer's per-replica inputs, in the compute dtype.
        reduction_axes: list of ints, every axis except `axis`.
        axis: int >= 0, the channel axis.

    Returns:
        `(mean, variance)`, each `[channels]`, or `(None, None)`.
    """
    replica_ctx = tf.distribute.get_replica_context()
    num_replicas = 1 if replica_ctx is None else replica_ctx.num_replicas_in_sync
    if num_replicas == 1:
        return None, None
    if isinstance(layer, DistributedBatchNormalization):
        group_size = _check_group_size(layer.group_size, num_replicas)
        if group_size == 1:
            return None, None
        shift = tf.stop_gradient(tf.cast(layer.moving_mean, x.dtype))
        mean, variance, _, _ = _group_moments(
            x, reduction_axes, axis, shift, replica_ctx, group_size
        )
        return mean, variance
    if getattr(layer, "synchronized", False):
        return keras.ops.moments(x, axes=reduction_axes, synchronized=True)
    return None, None


def _collect_fn(model, layers, state):
    """The per-replica (or single-device) statistic-gathering forward pass.

    Returns:
        A function `features -> (stats, examples)`: `stats` maps `str(id(layer))` to a
        float32 `[calls, 3, channels]` tensor (one row per call of the layer: count,
        mean, variance), `examples` is an int32 `[1]` tensor, the batch size.
    """

    def collect(element):
        features = _features(element)
        state.records = {id(layer): [] for layer in layers}
        model(features, training=False)
        stats = {}
        for layer in layers:
            rows = [tf.cast(r, tf.float32) for r in state.records[id(layer)]]
            channels = int(layer.moving_mean.shape[0])
            stats[str(id(layer))] = (
                tf.stack(rows) if rows else tf.zeros([0, 3, channels], tf.float32)
            )
        examples = tf.shape(tf.nest.flatten(features)[0])[:1]
        return stats, examples

    return collect


class _Moments:
    """Exact running count, mean and sum of squared deviations per channel, in float64."""

    def __init__(self):
        self.count = 0.0
        self.mean = None
        self.m2 = None

    def add(self, count, mean, variance):
        """Merges one batch (Chan, Golub, LeVeque's pairwise update).

        Args:
            count: float, values per channel in the batch.
            mean: float array `[channels]`, the batch mean.
            variance: float array `[channels]`, the biased batch variance.
        """
        mean = np.asarray(mean, np.float64)
        m2 = np.asarray(variance, np.float64) * count
        if self.mean is None:
            self.count, self.mean, self.m2 = float(count), mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + np.square(delta) * (self.count * count / total)
        self.count = total

    @property
    def variance(self):
        """The biased population variance, `[channels]` float64."""
        return self.m2 / self.count


def recompute_batch_norm_statistics(model, dataset, num_batches):
    """Sets every BN layer's moving statistics to the exact population statistics.

    "Batch normalization without moving averages" (Akiba, Suzuki, Fukuda, "Extremely Large
    Minibatch SGD: Training ResNet-50 on ImageNet in 15 Minutes", arXiv:1711.04325): with
    the weights frozen, runs `num_batches` batches of `dataset` through `model` in
    statistic-gathering mode (each BN layer normalises with the statistics of the current
    batch, as in training; everything else is in inference mode, so dropout is off), and
    sets each BN layer's `moving_mean` and `moving_variance` to the mean and the biased
    variance of all the values of its input over those batches (per channel; see the
    module docstring). Only the moving statistics change; trainable weights, optimizer
    state and the moving statistics of BN layers with `trainable=False` (which Keras runs
    in inference mode, frozen) are left alone.

    Works for `keras.layers.BatchNormalization` and its subclasses, including
    `tfscale.layers.DistributedBatchNormalization`, anywhere in the model (nested models
    and custom layers included).

    Where the pass runs: if the model was created under a `tf.distribute` strategy with
    more than one replica (`model.distribute_strategy`) and `dataset` is a
    `tf.data.Dataset` of global batches, each batch is split across the replicas exactly
    as in `fit` (`strategy.experimental_distribute_dataset`), every replica's BN layers
    normalise with the statistics of its share (as local BN, `group_size=1`, does), and
    the per-replica moments are combined over all replicas and workers with
    `strategy.gather`, so all workers of a `MultiWorkerMirroredStrategy` set the same
    values. Otherwise the pass runs on the default device and each BN layer normalises
    with the statistics of the whole batch: give such a `dataset` the batch size of one
    BN span in training (per-replica batch × group size) to reproduce training
    conditions, and under `MultiWorkerMirroredStrategy` always pass a `tf.data.Dataset`
    (a per-worker iterable would give each worker different statistics). The new values
    are written to every replica. Cost: `num_batches` forward passes, no backward pass.

    Args:
        model: a built `keras.Model` (or `keras.layers.Layer`) whose BN layers are updated.
        dataset: a `tf.data.Dataset` or any iterable of batches. Each element is the model
            input (a tensor or array `[batch, ...]`, or a dict or list of them) or a tuple
            `(x, y)` / `(x, y, sample_weight)` whose `x` is used. Training batches (with
            training augmentation) are the paper's choice.
        num_batches: int >= 1, the number of batches to use (steps). If `dataset` has
            fewer, all of them are used and a warning is issued.

    Returns:
        dict mapping each updated BN layer's `name` to the number of examples (rows of the
        batches, int) its statistics were computed from. Empty (after a warning) when the
        model has no trainable BN layer.

    Raises:
        ValueError: if `num_batches` is not an int >= 1, if `dataset` yields no batch, if a
            BN layer is not built or receives a mask, or if `model` is not a Keras 3
            layer or model.

    Example:

    ```python
    model.fit(train_ds, epochs=2)
    used = tfscale.layers.recompute_batch_norm_statistics(model, train_ds, num_batches=50)
    model.evaluate(test_ds)
    ```
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, (int, np.integer)):
        raise ValueError(
            f"Argument `num_batches` must be an int >= 1. Received: num_batches={num_batches!r}"
        )
    if num_batches < 1:
        raise ValueError(
            f"Argument `num_batches` must be >= 1. Received: num_batches={num_batches}"
        )
    if not _tf_compat.is_keras_layer(model):
        raise ValueError(
            "Argument `model` must be a Keras 3 model or layer. "
            f"Received: model of type {type(model).__name__}"
        )
    layers = [layer for layer in _batch_norm_layers(model) if layer.trainable]
    if not layers:
        warnings.warn(
            f"Model {getattr(model, 'name', model)!r} has no trainable BatchNormalization "
            "layer; recompute_batch_norm_statistics changed nothing.",
            UserWarning,
            stacklevel=2,
        )
        return {}
    for layer in layers:
        if not layer.built:
            raise ValueError(
                f"BatchNormalization layer {layer.name!r} is not built; call the model on "
                "data (or build it) before recomputing its statistics."
            )

    state = threading.local()
    collect = _collect_fn(model, layers, state)
    strategy = getattr(model, "distribute_strategy", None)
    distributed = (
        strategy is not None
        and strategy.num_replicas_in_sync > 1
        and isinstance(dataset, tf.data.Dataset)
    )
    if distributed:
        with strategy.scope():
            dataset = strategy.experimental_distribute_dataset(dataset)

        def forward(element):
            stats, examples = strategy.run(collect, args=(element,))
            # One gather per tensor: `strategy.gather` of a dict of PerReplica values
            # returned only replica 0's rows under MirroredStrategy (TF 2.21).
            gathered = {key: strategy.gather(value, axis=0) for key, value in stats.items()}
            return gathered, strategy.gather(examples, axis=0)

    else:
        forward = collect
    forward = tf.function(forward, reduce_retracing=True)

    moments = {id(layer): _Moments() for layer in layers}
    examples = 0
    batches = 0
    for layer in layers:
        _tf_compat.override_call(layer, _gathering_call(layer, state))
    try:
        iterator = iter(dataset)
        while batches < num_batches:
            try:
                element = next(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                break
            if distributed:
                with strategy.scope():
                    stats, batch_examples = forward(element)
            else:
                stats, batch_examples = forward(element)
            for layer in layers:
                for count, mean, variance in stats[str(id(layer))].numpy():
                    if count[0] > 0:  # A replica may get an empty share of a last batch.
                        moments[id(layer)].add(float(count[0]), mean, variance)
            examples += int(np.sum(batch_examples.numpy()))
            batches += 1
    finally:
        for layer in layers:
            _tf_compat.restore_call(layer)

    if batches == 0:
        raise ValueError(
            "Argument `dataset` yielded no batches; recompute_batch_norm_statistics needs "
            f"at least one. Received: an empty dataset, num_batches={num_batches}"
        )
    if batches < num_batches:
        warnings.warn(
            f"Argument `dataset` had only {batches} batches, fewer than "
            f"num_batches={num_batches}; used all of them.",
            UserWarning,
            stacklevel=2,
        )
    used = {}
    for layer in layers:
        stats = moments[id(layer)]
        if stats.mean is None:
            warnings.warn(
                f"BatchNormalization layer {layer.name!r} was not called by the model's "
                "forward pass; its moving statistics were left unchanged.",
                UserWarning,
                stacklevel=2,
            )
            continue
        layer.moving_mean.assign(stats.mean.astype(layer.moving_mean.dtype))
        layer.moving_variance.assign(stats.variance.astype(layer.moving_variance.dtype))
        used[layer.name] = examples
    return used
