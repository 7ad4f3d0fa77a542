"""Keras callbacks for training at scale: throughput (images/s) per epoch; prompt release of validation iterators."""

from __future__ import annotations

import time
from typing import Callable

import keras
import tensorflow as tf
from absl import logging

from tfscale import _tf_compat


class ThroughputCallback(keras.callbacks.Callback):
    """Measures training throughput in images/s for every epoch and adds it to the epoch logs.

    The figure is `steps_run × global_batch_size / seconds`, where seconds is the wall time from the first to the
    last training step of the epoch: the start-up of the first step (tracing, the first `tf.data` fill) and the
    validation pass are excluded, the way the seed papers report images/s. It is written to `logs` as
    `images_per_second` (so `History`, `TensorBoard` and the progress bar see it) together with `epoch_seconds`
    (the whole epoch, validation included) and `eval_seconds` (the validation pass alone).

    Args:
        global_batch_size: images per step over all replicas, an `int`, or a callable `epoch -> int` when the
            global batch changes during training (batch-size control, Mikami et al., arXiv:1811.05233).
        skip_first_step: if True (default), time from the end of the first step of each epoch, so graph tracing
            and pipeline warm-up do not count; the first step's images are then not counted either.

    Raises:
        ValueError: if `global_batch_size` is an int < 1.

    Example:
        >>> cb = ThroughputCallback(global_batch_size=256)
        >>> model.fit(ds, epochs=2, callbacks=[cb])  # doctest: +SKIP
        >>> cb.images_per_second  # one float per epoch  # doctest: +SKIP
    """

    def __init__(self, global_batch_size: int | Callable[[int], int], skip_first_step: bool = True):
        super().__init__()
        if isinstance(global_batch_size, int) and global_batch_size < 1:
            raise ValueError(
                "Argument `global_batch_size` must be >= 1. Received: global_batch_size="
                f"{global_batch_size}"
            )
        self._batch = global_batch_size
        self._skip_first = skip_first_step
        self.images_per_second: list[float] = []
        self.epoch_seconds: list[float] = []

    def _global_batch(self, epoch):
        return self._batch(epoch) if callable(self._batch) else self._batch

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()
        self._t0 = None if self._skip_first else self._epoch_start
        self._t_last = None
        self._steps = 0
        self._eval_seconds = 0.0

    def on_test_begin(self, logs=None):
        self._eval_start = time.perf_counter()

    def on_test_end(self, logs=None):
        self._eval_seconds += time.perf_counter() - self._eval_start

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        if self._t0 is None:
            self._t0 = now  # end of the first step: start timing here
            return
        self._steps += 1
        self._t_last = now

    def on_epoch_end(self, epoch, logs=None):
        if self._t_last is not None and self._t_last > self._t0:
            ips = self._steps * self._global_batch(epoch) / (self._t_last - self._t0)
        else:
            ips = float("nan")  # a one-step epoch has nothing to time once the first step is skipped
        seconds = time.perf_counter() - self._epoch_start
        self.images_per_second.append(ips)
        self.epoch_seconds.append(seconds)
        if logs is not None:
            logs["images_per_second"] = ips
            logs["epoch_seconds"] = seconds
            logs["eval_seconds"] = self._eval_seconds
        print(f"Epoch {epoch + 1}: {ips:,.0f} images/s (training), {seconds:.1f} s (epoch, of which "
              f"{self._eval_seconds:.1f} s evaluation)")


class ReleaseValidationIterator(keras.callbacks.Callback):
    """Releases the finished validation iterator at the end of each validation pass in `fit`.

    Keras's ``fit`` keeps the iterator of the last validation pass alive until the next one begins. With a
    distributed validation set (`tf.distribute.Strategy.distribute_datasets_from_function`), destroying that
    finished iterator after a training epoch has run blocked the next validation for 12-58 s here (4 logical CPU
    devices, TF 2.21; the default job lost 58 s at its second validation, docs/benchmarks.md), while releasing it
    at the end of its own pass takes no measurable time. Put it in ``fit``'s callbacks whenever `validation_data`
    is given; it changes no result. It uses Keras internals through tfscale's version-guarded compat module; on a
    TensorFlow or Keras version other than the tested ones it does nothing (it says so once, with `absl.logging`)
    rather than stop training.

    Attributes:
        released: int, the validation passes whose iterator this callback released.
        skipped: int, the validation passes it left alone because the installed TensorFlow/Keras is untested.
    """

    def __init__(self):
        super().__init__()
        self.released = 0
        self.skipped = 0

    def on_test_end(self, logs=None):
        released = _tf_compat.release_validation_iterator(self.model)
        if released is None:
            if not self.skipped:
                logging.warning(
                    "ReleaseValidationIterator: TensorFlow %s / Keras %s are not the tested versions; the finished "
                    "validation iterator is left to Keras (the next validation may wait to destroy it).",
                    tf.__version__, keras.__version__)
            self.skipped += 1
        elif released:
            self.released += 1
