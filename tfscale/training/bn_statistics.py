"""A Keras callback that recomputes BN population statistics (Akiba et al., arXiv:1711.04325).

`RecomputeBatchNormStatistics` calls `tfscale.layers.recompute_batch_norm_statistics` at
the end of training and, optionally, before every evaluation (the validation pass of each
`fit` epoch, and `model.evaluate(..., callbacks=[...])`), so that evaluation uses the
exact population mean and variance of the BN inputs instead of moving averages.
"""

import keras
import numpy as np
from absl import logging

from tfscale.layers import recompute_batch_norm_statistics


class RecomputeBatchNormStatistics(keras.callbacks.Callback):
    """Replaces the BN moving averages by recomputed population statistics.

    "Batch normalization without moving averages" (Akiba, Suzuki, Fukuda, arXiv:1711.04325):
    with the weights frozen, `num_batches` batches of `dataset` are run through the model
    in statistic-gathering mode and every trainable BN layer's `moving_mean` and
    `moving_variance` are set to the exact mean and (biased) variance of its inputs over
    those batches. See `tfscale.layers.recompute_batch_norm_statistics`.

    The recomputation runs in `on_train_end` and, with `before_each_evaluation=True`, also
    in `on_test_begin` (the start of each validation pass inside `fit` and of
    `model.evaluate` when the callback is passed to it). Training itself is unchanged: the
    layers keep updating their moving averages from the recomputed values.

    Args:
        dataset: a `tf.data.Dataset` or an iterable of batches (elements `x`, `(x, y)` or
            `(x, y, sample_weight)`), normally the training data with training
            augmentation. Iterated afresh (from its start) at each recomputation; a
            repeated (infinite) dataset is fine.
        num_batches: int >= 1, batches (steps) used per recomputation.
        before_each_evaluation: bool, default False. Also recompute before every
            evaluation; costs `num_batches` forward passes per evaluation.
        verbose: int, default 0. 1 logs the layers and example counts of each
            recomputation (absl logging, INFO).

    Attributes:
        results: list of dicts, one per recomputation, each mapping BN layer name to the
            number of examples used (the return value of
            `recompute_batch_norm_statistics`).

    Raises:
        ValueError: if `num_batches` is not an int >= 1 (at construction), or, when a
            recomputation runs, if `dataset` yields no batch.

    Example:

    ```python
    callback = tfscale.training.RecomputeBatchNormStatistics(train_ds, num_batches=100)
    model.fit(train_ds, epochs=5, callbacks=[callback])
    model.evaluate(test_ds)  # Uses the recomputed statistics.
    ```
    """

    def __init__(self, dataset, num_batches, before_each_evaluation=False, verbose=0):
        super().__init__()
        if isinstance(num_batches, bool) or not isinstance(num_batches, (int, np.integer)):
            raise ValueError(
                "Argument `num_batches` must be an int >= 1. "
                f"Received: num_batches={num_batches!r}"
            )
        if num_batches < 1:
            raise ValueError(
                f"Argument `num_batches` must be >= 1. Received: num_batches={num_batches}"
            )
        self.dataset = dataset
        self.num_batches = int(num_batches)
        self.before_each_evaluation = bool(before_each_evaluation)
        self.verbose = int(verbose)
        self.results = []

    def _recompute(self, when):
        used = recompute_batch_norm_statistics(self.model, self.dataset, self.num_batches)
        self.results.append(used)
        if self.verbose:
            logging.info(
                "Recomputed BN statistics (%s) of %d layers from %s examples.",
                when,
                len(used),
                max(used.values()) if used else 0,
            )

    def on_test_begin(self, logs=None):
        if self.before_each_evaluation:
            self._recompute("before evaluation")

    def on_train_end(self, logs=None):
        self._recompute("end of training")
