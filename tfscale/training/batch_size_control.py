"""Batch-size control: a global batch that grows during one training run.

Mikami et al., "Massively Distributed SGD: ImageNet/ResNet-50 Training in a Flash",
arXiv:1811.05233, grew the global batch during training (34k images per step for the
first epochs, 68k after) to keep the early, unstable epochs at a smaller batch. Here a
`BatchSizeSchedule` (parsed from `--batch_schedule=0:4096,10:8192`) gives the global
batch of each epoch, and `fit_with_batch_schedule` trains one model through all phases
in one call: one command, one `model_dir`, one merged `History`.

Mechanism: *re-batching per phase*. Each phase gets its own input pipeline, batched at
that phase's global batch (`make_train_dataset(global_batch_size)`), and its own
`model.fit(..., initial_epoch=phase_start, epochs=phase_end, steps_per_epoch=N // B)`.
The model, its optimizer and its step counter carry over from phase to phase.

* **Learning rate.** An epoch has `N // B` optimizer steps, so it has fewer steps once
  the batch grows. Schedules in `tfscale.optimizers` are functions of the epoch computed
  from the step counter through an epoch clock; pass them
  `schedule.steps_per_epoch_phases(N)` as `steps_per_epoch` and the learning rate stays
  continuous in epochs across phase boundaries (`BatchSizeSchedule.step_to_epoch` is the
  same clock as a TF computation).
* **Batch normalisation.** Each replica normalises with the statistics of its own
  per-replica batch (`B / num_replicas` images, or the group's images with a
  distributed BN), so after a switch from B to 2B the batch statistics come from twice
  as many images (less noisy), and the effective regularisation of BN changes. The
  moving mean and variance are neither reset nor rescaled: they keep being updated once
  per step with the layer's momentum, i.e. half as many updates per epoch after the
  batch doubles, each over twice the images. Because the final moving averages mostly
  reflect the last phase's weights, this is benign; recomputing the population
  statistics after training (Akiba et al., arXiv:1711.04325) removes any doubt.
  Gradient accumulation (Keras's `gradient_accumulation_steps`) would instead keep the
  BN batch fixed; it is not what this module does.
* **Callbacks.** Every phase is a separate `fit`: callbacks see `on_train_begin` /
  `on_train_end` once per phase (e.g. `EarlyStopping` restarts its patience count at each
  phase, a `TensorBoard` writer is reopened), with `params["steps"]` equal to the
  phase's steps per epoch. Epoch indices are global (0 .. epochs - 1).
* **Fault tolerance.** `keras.callbacks.BackupAndRestore` works: a resumed run reads
  the backup's epoch, skips the finished phases and continues in the right one with the
  right batch. Its checkpoint is kept between phases and deleted (if it was asked to)
  only at the end of the last one.
"""

import numbers
import re
import warnings

import keras

from tfscale import _tf_compat
from tfscale.optimizers.schedules import epochs_from_steps, steps_before_epoch

__all__ = ["BatchSizeSchedule", "fit_with_batch_schedule"]

_PHASE_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class BatchSizeSchedule:
    """The global batch size as a function of the epoch, in phases.

    A phase `(start_epoch, global_batch_size)` holds from `start_epoch` until the next
    phase's start. Rules, checked on construction: the first phase starts at epoch 0;
    start epochs are integers, strictly increasing; global batches are integers,
    **strictly increasing** (batch-size *control* grows the batch; a repeated batch
    would be a no-op phase and a shrinking one is almost certainly a typo); every
    global batch is divisible by `num_replicas`, so each replica gets
    `B / num_replicas` images.

    Mikami et al., "Massively Distributed SGD", arXiv:1811.05233.

    Args:
        phases: sequence of `(start_epoch, global_batch_size)` pairs of ints
            (epochs, images per optimizer step over all replicas).
        num_replicas: int > 0, replicas in sync (`strategy.num_replicas_in_sync`).
            Defaults to 1.

    Raises:
        ValueError: if a rule above is broken; the message names `batch_schedule`,
            its value and what was expected.

    Example:
        >>> s = BatchSizeSchedule.parse("0:4096,10:8192", num_replicas=8)
        >>> s.global_batch_size(12), s.steps_per_epoch(12, 1_281_167)
        (8192, 156)
        >>> s.steps_per_epoch_phases(1_281_167)
        [[0, 312], [10, 156]]
    """

    def __init__(self, phases, num_replicas=1):
        if not _is_int(num_replicas) or num_replicas <= 0:
            raise ValueError(
                f"Argument `num_replicas` must be an integer > 0. Received: num_replicas={num_replicas!r}"
            )
        self.num_replicas = int(num_replicas)
        shown = self._show(phases)
        try:
            phases = [tuple(p) for p in phases]
        except TypeError:
            raise ValueError(
                "Argument `batch_schedule` must be a list of (start_epoch, global_batch_size) "
                f"pairs. Received: batch_schedule={shown}"
            ) from None
        if not phases:
            raise ValueError(
                f"Argument `batch_schedule` must have at least one phase. Received: batch_schedule={shown}"
            )
        for p in phases:
            if len(p) != 2 or not all(_is_int(v) for v in p):
                raise ValueError(
                    "Argument `batch_schedule` must contain integer (start_epoch, "
                    f"global_batch_size) pairs. Received: batch_schedule={shown}"
                )
            if p[0] < 0 or p[1] <= 0:
                raise ValueError(
                    "Argument `batch_schedule` must have start epochs >= 0 and global batch "
                    f"sizes > 0. Received: batch_schedule={shown}"
                )
        if phases[0][0] != 0:
            raise ValueError(
                "Argument `batch_schedule` must start at epoch 0. "
                f"Received: batch_schedule={shown}"
            )
        for (e0, b0), (e1, b1) in zip(phases, phases[1:]):
            if not e1 > e0:
                raise ValueError(
                    "Argument `batch_schedule` must have strictly increasing start epochs "
                    f"({e0} then {e1}). Received: batch_schedule={shown}"
                )
            if not b1 > b0:
                raise ValueError(
                    "Argument `batch_schedule` must have strictly increasing global batch sizes "
                    f"({b0} then {b1}). Received: batch_schedule={shown}"
                )
        for _, b in phases:
            if b % self.num_replicas:
                raise ValueError(
                    f"Argument `batch_schedule` must have every global batch size divisible by "
                    f"the number of replicas ({self.num_replicas}); {b} is not. "
                    f"Received: batch_schedule={shown}"
                )
        self.phases = tuple((int(e), int(b)) for e, b in phases)

    @staticmethod
    def _show(phases):
        if isinstance(phases, (list, tuple)):
            try:
                return ",".join(f"{e}:{b}" for e, b in phases) or "''"
            except (TypeError, ValueError):
                pass
        return repr(phases)

    @classmethod
    def parse(cls, spec, num_replicas=1):
        """Parses a flag value like `"0:4096,10:8192"` (epoch:global_batch, comma-separated).

        Args:
            spec: str, phases `start_epoch:global_batch_size` separated by commas;
                spaces are ignored.
            num_replicas: int > 0. Defaults to 1.

        Returns:
            A `BatchSizeSchedule`.

        Raises:
            ValueError: on a malformed string or a broken rule (see the class).
        """
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(
                "Argument `batch_schedule` must be a non-empty string like '0:4096,10:8192'. "
                f"Received: batch_schedule={spec!r}"
            )
        phases = []
        for part in spec.split(","):
            match = _PHASE_RE.match(part)
            if not match:
                raise ValueError(
                    f"Argument `batch_schedule` must be comma-separated 'epoch:global_batch' "
                    f"integer pairs like '0:4096,10:8192'; {part.strip()!r} is not. "
                    f"Received: batch_schedule={spec!r}"
                )
            phases.append((int(match.group(1)), int(match.group(2))))
        return cls(phases, num_replicas=num_replicas)

    @classmethod
    def constant(cls, global_batch_size, num_replicas=1):
        """A one-phase schedule: `global_batch_size` for the whole run.

        Args:
            global_batch_size: int > 0, divisible by `num_replicas`.
            num_replicas: int > 0. Defaults to 1.

        Returns:
            A `BatchSizeSchedule` with the single phase `(0, global_batch_size)`.

        Raises:
            ValueError: as the constructor.
        """
        return cls([(0, global_batch_size)], num_replicas=num_replicas)

    def __str__(self):
        return ",".join(f"{e}:{b}" for e, b in self.phases)

    def __repr__(self):
        return f"BatchSizeSchedule('{self}', num_replicas={self.num_replicas})"

    def __eq__(self, other):
        return (
            isinstance(other, BatchSizeSchedule)
            and self.phases == other.phases
            and self.num_replicas == other.num_replicas
        )

    def _phase_index(self, epoch):
        if not _is_int(epoch) or epoch < 0:
            raise ValueError(f"Argument `epoch` must be an integer >= 0. Received: epoch={epoch!r}")
        index = 0
        for i, (start, _) in enumerate(self.phases):
            if epoch >= start:
                index = i
        return index

    def global_batch_size(self, epoch):
        """Global batch size (images per step over all replicas) during integer `epoch`.

        Raises:
            ValueError: if `epoch` is not an integer >= 0.
        """
        return self.phases[self._phase_index(epoch)][1]

    def per_replica_batch_size(self, epoch):
        """`global_batch_size(epoch) // num_replicas` (images per replica per step)."""
        return self.global_batch_size(epoch) // self.num_replicas

    def steps_per_epoch(self, epoch, num_train_examples, max_steps_per_epoch=None):
        """Optimizer steps in integer `epoch`: `num_train_examples // global_batch_size(epoch)`.

        The remainder of the data set is dropped each epoch (batch with
        `drop_remainder=True`).

        Args:
            epoch: int >= 0.
            num_train_examples: int > 0, images in one epoch of training data.
            max_steps_per_epoch: optional int > 0, a cap on the steps of every epoch
                (short test runs: train.py's `--steps_per_epoch`). Defaults to None.

        Returns:
            int > 0.

        Raises:
            ValueError: if a global batch is larger than `num_train_examples`, or the
                cap is not a positive integer.
        """
        return self._steps(self.global_batch_size(epoch), num_train_examples, max_steps_per_epoch)

    @staticmethod
    def _steps(batch, num_train_examples, max_steps_per_epoch=None):
        if max_steps_per_epoch is not None and (
            not _is_int(max_steps_per_epoch) or max_steps_per_epoch <= 0
        ):
            raise ValueError(
                "Argument `max_steps_per_epoch` must be an integer > 0 or None. "
                f"Received: max_steps_per_epoch={max_steps_per_epoch!r}"
            )
        steps = BatchSizeSchedule._full_steps(batch, num_train_examples)
        return steps if max_steps_per_epoch is None else min(steps, int(max_steps_per_epoch))

    @staticmethod
    def _full_steps(batch, num_train_examples):
        if not _is_int(num_train_examples) or num_train_examples <= 0:
            raise ValueError(
                "Argument `num_train_examples` must be an integer > 0. "
                f"Received: num_train_examples={num_train_examples!r}"
            )
        if batch > num_train_examples:
            raise ValueError(
                f"Argument `num_train_examples` must be >= every global batch size ({batch}). "
                f"Received: num_train_examples={num_train_examples!r}"
            )
        return num_train_examples // batch

    def steps_per_epoch_phases(self, num_train_examples, max_steps_per_epoch=None):
        """The epoch clock for `tfscale.optimizers` schedules and `RMSpropWarmup`.

        Args:
            num_train_examples: int > 0, images per epoch.
            max_steps_per_epoch: optional int > 0, the cap of `steps_per_epoch`.

        Returns:
            list of `[start_epoch, steps_per_epoch]` pairs (JSON-serialisable), e.g.
            `[[0, 312], [10, 156]]`; pass it as `steps_per_epoch=` to a schedule.

        Raises:
            ValueError: as `steps_per_epoch`.
        """
        return [
            [e, self._steps(b, num_train_examples, max_steps_per_epoch)] for e, b in self.phases
        ]

    def steps_before_epoch(self, epoch, num_train_examples, max_steps_per_epoch=None):
        """Optimizer steps taken before integer `epoch` starts (int)."""
        return steps_before_epoch(
            epoch, self.steps_per_epoch_phases(num_train_examples, max_steps_per_epoch)
        )

    def step_to_epoch(self, step, num_train_examples, max_steps_per_epoch=None):
        """Fractional epoch after `step` optimizer steps, a TF computation.

        Args:
            step: integer scalar tensor, e.g. `optimizer.iterations`.
            num_train_examples: int > 0, images per epoch.
            max_steps_per_epoch: optional int > 0, the cap of `steps_per_epoch`.

        Returns:
            float32 scalar tensor; continuous in `step` across phase boundaries.
        """
        return epochs_from_steps(
            step, self.steps_per_epoch_phases(num_train_examples, max_steps_per_epoch)
        )

    def phase_ranges(self, epochs, initial_epoch=0):
        """The phases cut to the epochs `[initial_epoch, epochs)`.

        Args:
            epochs: int > 0, the epoch where training stops (exclusive).
            initial_epoch: int >= 0, the first epoch to run. Defaults to 0.

        Returns:
            list of `(first_epoch, end_epoch, global_batch_size)` with
            `first_epoch < end_epoch`, in order.
        """
        out = []
        for i, (start, batch) in enumerate(self.phases):
            end = self.phases[i + 1][0] if i + 1 < len(self.phases) else epochs
            first, last = max(start, initial_epoch), min(end, epochs)
            if first < last:
                out.append((first, last, batch))
        return out


def _backup_callbacks(callbacks):
    return [c for c in callbacks if isinstance(c, keras.callbacks.BackupAndRestore)]


def _restored_step(backup, epoch):
    """The steps of `epoch` already done in a backup stopped mid-epoch (`SafeBackupAndRestore.request_stop`): the
    metadata's ``batch``; 0 for a backup at an epoch boundary, another epoch, or no backup."""
    import json
    import os

    _, path = _tf_compat.backup_file_paths(backup)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        meta = json.load(f)
    if not isinstance(meta, dict) or meta.get("epoch") != epoch:
        return 0
    step = meta.get("batch") or 0
    return step if isinstance(step, int) and step > 0 else 0


def _restored_epoch(backup):
    """The epoch a `BackupAndRestore` callback will resume at (0 when it has no backup)."""
    return _tf_compat.backup_restored_epoch(backup)


def fit_with_batch_schedule(
    model,
    make_train_dataset,
    schedule,
    num_train_examples,
    epochs,
    callbacks=None,
    validation_data=None,
    initial_epoch=0,
    steps_per_epoch=None,
    **fit_kwargs,
):
    """Trains `model` through the phases of a growing global batch; one merged History.

    For each phase `(first, end, B)` of `schedule.phase_ranges(epochs, start)` it calls
    `model.fit(make_train_dataset(B), initial_epoch=first, epochs=end,
    steps_per_epoch=min(num_train_examples // B, cap), callbacks=callbacks,
    validation_data=validation_data, **fit_kwargs)`. See the module docstring for what
    this does to the learning rate, batch normalisation and callbacks. The learning-rate
    schedule must use `schedule.steps_per_epoch_phases(num_train_examples)` as its epoch
    clock; a warning is raised if the optimizer's step counter disagrees with the clock
    at a phase end (e.g. a data set that ran out of batches).

    Mikami et al., "Massively Distributed SGD", arXiv:1811.05233.

    Args:
        model: a compiled `keras.Model` (built, if `BackupAndRestore` is used).
        make_train_dataset: callable `global_batch_size (int) -> tf.data.Dataset` (or a
            `tf.distribute.DistributedDataset`) yielding `(images, labels)` batches of
            exactly `global_batch_size` examples (`drop_remainder=True`), repeated so
            that it never runs out (`.repeat()`).
        schedule: a `BatchSizeSchedule`, or a spec string like `"0:4096,10:8192"`.
        num_train_examples: int > 0, images in one epoch of training data.
        epochs: int > 0, train until this epoch (exclusive), as in `model.fit`.
        callbacks: list of `keras.callbacks.Callback`, passed to every phase.
        validation_data: passed to every phase's `fit`.
        initial_epoch: int >= 0, the first epoch to run. Defaults to 0. A
            `BackupAndRestore` backup with a later epoch takes precedence.
        steps_per_epoch: optional int > 0, a cap on every phase's steps per epoch
            (short runs). The learning-rate clock must then be
            `schedule.steps_per_epoch_phases(num_train_examples, steps_per_epoch)`.
            Defaults to None (whole epochs).
        **fit_kwargs: other `model.fit` arguments (`verbose`, `validation_freq`,
            `validation_steps`, ...). `x`, `y`, `batch_size`, `epochs` and
            `initial_epoch` are set per phase and are rejected here.

    Mid-epoch resume: when a backup was taken in the middle of epoch E after S steps
    (`SafeBackupAndRestore.request_stop`, e.g. on SIGTERM), epoch E is finished first by
    a `fit` of its remaining steps on `make_train_dataset(B, skip_steps=n)`, where
    n = S + (E - the phase's first epoch) * steps per epoch, the global steps the
    interrupted run's stream had used; `make_train_dataset` must accept `skip_steps`
    (global batches to drop from the start of the stream). The stream restarts for the
    epochs after E, so only a run interrupted in its phase's first epoch after its start
    sees exactly the data an uninterrupted run sees.

    Returns:
        a `keras.callbacks.History` whose `history` dict holds the per-epoch metrics of
        all phases concatenated, plus `global_batch_size` and `steps_per_epoch` per
        epoch; `epoch` lists the global epoch indices run; `params` are the last
        phase's.

    Raises:
        ValueError: on a malformed schedule, `epochs <= initial_epoch`, a global batch
            larger than the data set, or a forbidden `fit_kwargs` key.
    """
    if isinstance(schedule, str):
        schedule = BatchSizeSchedule.parse(
            schedule, num_replicas=model.distribute_strategy.num_replicas_in_sync
        )
    if not isinstance(schedule, BatchSizeSchedule):
        raise ValueError(
            "Argument `schedule` must be a BatchSizeSchedule or a string like '0:4096,10:8192'. "
            f"Received: schedule={schedule!r}"
        )
    replicas = model.distribute_strategy.num_replicas_in_sync
    if schedule.num_replicas != replicas:
        # Re-check divisibility for the model's replica count (raises on a mismatch).
        schedule = BatchSizeSchedule(schedule.phases, num_replicas=replicas)
    for name, value in (("epochs", epochs), ("initial_epoch", initial_epoch)):
        if not _is_int(value) or value < 0:
            raise ValueError(f"Argument `{name}` must be an integer >= 0. Received: {name}={value!r}")
    if not epochs > initial_epoch:
        raise ValueError(
            f"Argument `epochs` must be > initial_epoch ({initial_epoch}). Received: epochs={epochs!r}"
        )
    forbidden = sorted(
        set(fit_kwargs) & {"x", "y", "batch_size", "epochs", "initial_epoch"}
    )
    if forbidden:
        raise ValueError(
            f"Arguments {forbidden} are set per phase by fit_with_batch_schedule; do not pass them."
        )
    if not callable(make_train_dataset):
        raise ValueError(
            "Argument `make_train_dataset` must be a callable global_batch_size -> dataset. "
            f"Received: make_train_dataset={make_train_dataset!r}"
        )
    # Validates the sizes and the cap.
    clock = schedule.steps_per_epoch_phases(num_train_examples, steps_per_epoch)
    # Data sets are shuffled by their pipeline; Keras only warns about `shuffle=True` here.
    fit_kwargs.setdefault("shuffle", False)
    callbacks = list(callbacks or [])
    backups = _backup_callbacks(callbacks)
    start = max([initial_epoch] + [_restored_epoch(b) for b in backups])
    phases = schedule.phase_ranges(epochs, start)

    merged = keras.callbacks.History()
    merged.set_model(model)
    merged.history = {}
    merged.epoch = []
    merged.params = {}
    delete_flags = [b.delete_checkpoint for b in backups]
    try:
        for index, (first, end, batch) in enumerate(phases):
            last_phase = index == len(phases) - 1
            for b, flag in zip(backups, delete_flags):
                # Keep the backup between phases: a crash before the next phase's first
                # epoch end must still resume.
                b.delete_checkpoint = flag and last_phase
            # `BackupAndRestore` sets this private attribute on restore and Keras never
            # clears it; a stale value would make a later phase start at the wrong epoch.
            _tf_compat.set_resume_epoch(model, None)
            steps = schedule._steps(batch, num_train_examples, steps_per_epoch)
            resume_step = max([_restored_step(b, first) for b in backups] + [0]) if index == 0 else 0
            if 0 < resume_step < steps:  # finish the interrupted epoch first
                phase_start = max(e for e, _ in schedule.phases if e <= first)
                skip = resume_step + (first - phase_start) * steps
                for b in backups:
                    b.step_offset = resume_step
                history = model.fit(
                    make_train_dataset(batch, skip_steps=skip),
                    epochs=first + 1,
                    initial_epoch=first,
                    steps_per_epoch=steps - resume_step,
                    callbacks=callbacks,
                    validation_data=validation_data,
                    **fit_kwargs,
                )
                for b in backups:
                    b.step_offset = 0
                _tf_compat.set_resume_epoch(model, None)
                _merge_history(merged, history, batch, steps)
                if first + 1 >= end or getattr(model, "stop_training", False):
                    _check_step_counter(model, end, clock, list(history.epoch))
                    if getattr(model, "stop_training", False):
                        break
                    continue
                first += 1
            history = model.fit(
                make_train_dataset(batch),
                epochs=end,
                initial_epoch=first,
                steps_per_epoch=steps,
                callbacks=callbacks,
                validation_data=validation_data,
                **fit_kwargs,
            )
            ran = _merge_history(merged, history, batch, steps)
            _check_step_counter(model, end, clock, ran)
            if getattr(model, "stop_training", False):
                break
    finally:
        for b, flag in zip(backups, delete_flags):
            b.delete_checkpoint = flag
            b.step_offset = 0
        _tf_compat.set_resume_epoch(model, None)
    return merged


def _merge_history(merged, history, batch, steps):
    for key, values in history.history.items():
        merged.history.setdefault(key, []).extend(values)
    ran = list(history.epoch)
    merged.epoch.extend(ran)
    merged.history.setdefault("global_batch_size", []).extend([batch] * len(ran))
    merged.history.setdefault("steps_per_epoch", []).extend([steps] * len(ran))
    merged.params = dict(history.params or {})
    return ran


def _check_step_counter(model, end, clock, ran):
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not ran or ran[-1] != end - 1:
        return
    if getattr(optimizer, "gradient_accumulation_steps", None):
        return
    expected = steps_before_epoch(end, clock)
    actual = int(optimizer.iterations.numpy())
    if actual != expected:
        warnings.warn(
            f"After epoch {end} the optimizer has taken {actual} steps but the batch "
            f"schedule's epoch clock expects {expected}; learning-rate schedules driven by "
            "that clock are off. Did the data set run out of batches, or did training not "
            "start at epoch 0 with a fresh optimizer?",
            stacklevel=3,
        )

