"""Every use of non-public TensorFlow / Keras API in tfscale, in one version-guarded module.

tfscale's multi-worker all-reduce (`tfscale.distribute.collective`) runs inside
`tf.distribute.MultiWorkerMirroredStrategy` (MWMS). Three things there have no public
API, so they live here, each guarded by the TF/Keras versions they were tested with
(`check_versions`):

1. **Collective ops on sub-groups** (`SubgroupLauncher`): ``collective_ops.all_reduce_v2``,
   ``all_gather_v2`` and ``all_to_all_v2`` with one group key per row / column / node,
   a per-device ordering token and a timeout, and instance keys assigned at call time
   (``FuncGraph.capture_call_time_value``), the way TF's own
   ``cross_device_utils.CollectiveReplicaLauncher`` does it.
2. **The hook that makes MWMS use tfscale's all-reduce** (`install_all_reduce`): MWMS has
   no ``cross_device_ops`` argument; its gradient all-reduce (Keras 3 ``fit`` →
   ``ReplicaContext.all_reduce`` → ``CollectiveAllReduceExtended._replica_ctx_all_reduce``
   → ``CollectiveAllReduce._all_reduce``) and ``strategy.reduce`` both end in
   ``CollectiveAllReduce._all_reduce``. `install_all_reduce` replaces
   ``strategy.extended._cross_device_ops`` by a subclass of ``CollectiveAllReduce`` whose
   ``_all_reduce`` sends dense floating-point values through tfscale's algorithm and
   everything else (integers, ``IndexedSlices``) through TF's own code.
3. **The two Keras 3 + MWMS ``fit`` bugs** (keras-team/keras#20585, tensorflow#72388), patched
   narrowly by `apply_keras_multi_worker_fixes`:

   * ``TensorFlowTrainer._maybe_symbolic_build`` calls ``strategy.reduce("MEAN", (x, y))``
     on a nested batch, which MWMS rejects ("Attempt to convert a value (PerReplica...)
     with an unsupported type"). Under MWMS the patched method builds from the first
     local replica's batch instead: only the shapes matter for a symbolic build, and no
     collective is spent on it.
   * ``reduce_per_replica(..., "mean")`` calls ``strategy.reduce("MEAN", v, axis=0)`` on
     scalar metrics ("Invalid reduction dimension 0"). Under MWMS the patched function
     reduces scalars with ``axis=None`` (the mean over replicas); anything else goes to
     the original.

   Both patches call the original code unchanged for every other strategy.

4. **Aborting every collective of the process** (`abort_collective_ops`), for
   `tfscale.distribute.watchdog.CollectiveWatchdog`: ``context.abort_collective_ops``, the
   call MWMS's own peer health check makes.

6. **One-process CrossDeviceOps plumbing** (`mirrored`, `destination_devices`,
   `cross_device_ops`, `keyed_mirrored_strategy`): building ``Mirrored`` values and reading
   the devices of a ``destinations`` argument, as every CrossDeviceOps in TF itself does;
   reading a strategy's installed op (``extended._cross_device_ops``); and giving a
   ``MirroredStrategy`` its own collective key range (``_collective_key_base``, as TF's
   ``strategy_combinations`` does).

5. **CPU replicas per worker** (`multi_worker_local_devices`): MWMS gives a CPU-only worker
   one replica. To run ``devices_per_worker > 1`` on logical CPU devices (tests, or CPU
   clusters), ``CollectiveAllReduceExtended._initialize_local_devices`` is wrapped while
   the strategy is built.

7. **Keras layer internals** for `tfscale.layers` (`set_batch_norm_reduction_axes`,
   `flatten_layers`, `override_call`) and **BackupAndRestore internals** for
   `tfscale.training` (`backup_file_paths`, `backup_restored_epoch`, `set_resume_epoch`).

8. **Keras's cached validation iterator** (`release_validation_iterator`): ``fit`` keeps the
   ``TFEpochIterator`` of ``validation_data`` in ``model._eval_epoch_iterator``, and its epoch
   generator (``_epoch_iterator``) keeps the finished distributed iterator of the last
   validation alive until the next validation starts. Destroyed then, after a training epoch
   has run, it blocked the next validation for 12-58 s on 4 logical CPU devices;
   destroyed at the end of its own validation pass it takes no measurable time.

9. **Leaving a cluster cleanly** (`stop_preemption_watchers`, `wait_at_barrier`): the stop
   that ``PreemptionCheckpointHandler.__del__`` performs on its watcher threads (never reached
   while they run: they hold the handler), and the coordination service's barrier
   (``context.wait_at_barrier``), so that no worker's background RPC outlives the chief.

This module sits at the top of the package so that `tfscale.data`, `layers`, `optimizers`,
`distribute` and `training` can all use it without importing each other.

Set ``TFSCALE_ALLOW_UNTESTED_TF=1`` to try another version at your own risk.
"""

import contextlib
import json
import functools
import os
import threading

import keras
import tensorflow as tf

try:  # Private modules: a missing one is reported by check_versions, not at import.
    from keras.src.backend.tensorflow import trainer as _keras_tf_trainer
    from tensorflow.python.distribute import collective_all_reduce_strategy as _mwms_lib
    from tensorflow.python.distribute import cross_device_ops as _cross_device_ops_lib
    from tensorflow.python.distribute import distribute_utils as _distribute_utils
    from tensorflow.python.distribute import values as _values_lib
    from tensorflow.python.distribute import reduce_util as _reduce_util
    from tensorflow.python.eager import context as _context
    from tensorflow.python.framework import indexed_slices as _indexed_slices
    from tensorflow.python.framework import ops as _ops
    from tensorflow.python.ops import collective_ops as _collective_ops
    from tensorflow.python.ops import resource_variable_ops as _resource_variable_ops
    from tensorflow.python.util import nest as _nest

    _IMPORT_ERROR = None
    _CollectiveAllReduceBase = _cross_device_ops_lib.CollectiveAllReduce
except (ImportError, AttributeError) as _err:  # pragma: no cover - only on other versions
    _IMPORT_ERROR = _err
    _CollectiveAllReduceBase = object

__all__ = [
    "TESTED_TF_VERSIONS",
    "TESTED_KERAS_VERSIONS",
    "check_versions",
    "versions_tested",
    "apply_keras_multi_worker_fixes",
    "keras_multi_worker_fixes_applied",
    "SubgroupLauncher",
    "InstanceKeys",
    "new_ordering_token",
    "install_all_reduce",
    "multi_worker_local_devices",
    "abort_collective_ops",
    "num_workers",
    "cross_device_ops",
    "destination_devices",
    "mirrored",
    "keyed_mirrored_strategy",
    "stop_preemption_watchers",
    "wait_at_barrier",
]

TESTED_TF_VERSIONS = ("2.21",)
"""TensorFlow ``major.minor`` versions whose private API this module was tested against."""

TESTED_KERAS_VERSIONS = ("3.15",)
"""Keras ``major.minor`` versions whose trainer internals the ``fit`` fixes were tested on."""

_ALLOW_ENV = "TFSCALE_ALLOW_UNTESTED_TF"


def _major_minor(version):
    return ".".join(version.split(".")[:2])


def check_versions(tf_version=None, keras_version=None):
    """Raises if TensorFlow or Keras is a version this module was not tested with.

    Args:
      tf_version: str, defaults to ``tf.__version__``.
      keras_version: str, defaults to ``keras.__version__``.

    Raises:
      RuntimeError: if a private module is missing, or naming the installed and the
        tested versions unless the environment variable ``TFSCALE_ALLOW_UNTESTED_TF=1``
        is set.
    """
    tf_version = tf.__version__ if tf_version is None else tf_version
    keras_version = keras.__version__ if keras_version is None else keras_version
    if _IMPORT_ERROR is not None:
        raise RuntimeError(
            f"tfscale's multi-worker all-reduce needs private TensorFlow/Keras modules that "
            f"tensorflow=={tf_version} / keras=={keras_version} do not have ({_IMPORT_ERROR}); "
            f"it was tested with TensorFlow {', '.join(TESTED_TF_VERSIONS)} and Keras "
            f"{', '.join(TESTED_KERAS_VERSIONS)}."
        )
    if os.environ.get(_ALLOW_ENV) == "1":
        return
    if _major_minor(tf_version) not in TESTED_TF_VERSIONS:
        raise RuntimeError(
            f"tfscale's multi-worker all-reduce uses private TensorFlow API tested only with "
            f"TensorFlow {', '.join(TESTED_TF_VERSIONS)}; found tensorflow=={tf_version}. "
            f"Install a tested version, or set {_ALLOW_ENV}=1 to try anyway."
        )
    if _major_minor(keras_version) not in TESTED_KERAS_VERSIONS:
        raise RuntimeError(
            f"tfscale's Keras multi-worker fit fixes were tested only with Keras "
            f"{', '.join(TESTED_KERAS_VERSIONS)}; found keras=={keras_version}. "
            f"Install a tested version, or set {_ALLOW_ENV}=1 to try anyway."
        )


def versions_tested(tf_version=None, keras_version=None):
    """Whether `check_versions` would pass: for optional speed-ups that skip themselves instead of raising.

    Args:
      tf_version: str, defaults to ``tf.__version__``.
      keras_version: str, defaults to ``keras.__version__``.

    Returns:
      bool: True for a tested TensorFlow and Keras (or ``TFSCALE_ALLOW_UNTESTED_TF=1``) with every private module
      present.
    """
    try:
        check_versions(tf_version, keras_version)
    except RuntimeError:
        return False
    return True


# --------------------------------------------------------------------------------------
# Keras 3 + MWMS fit fixes (keras-team/keras#20585, tensorflow#72388).
# --------------------------------------------------------------------------------------

_PATCH_LOCK = threading.Lock()
_ORIGINALS = {}


def _is_multi_worker(strategy):
    return _keras_tf_trainer._collective_all_reduce_multi_worker(strategy)


def _patched_maybe_symbolic_build(self, iterator=None, data_batch=None):
    strategy = self._distribute_strategy
    if strategy is None or iterator is None or not _is_multi_worker(strategy):
        return _ORIGINALS["maybe_symbolic_build"](self, iterator=iterator, data_batch=data_batch)
    for _, _, it in iterator:
        batch = next(it)
        # Shapes are all a symbolic build needs: take this worker's first replica.
        data_batch = tf.nest.map_structure(
            lambda x: strategy.experimental_local_results(x)[0]
            if isinstance(x, tf.distribute.DistributedValues) else x,
            batch,
        )
        break
    with strategy.scope():
        self._symbolic_build(data_batch=data_batch)


def _patched_reduce_per_replica(values, strategy, reduction):
    original = _ORIGINALS["reduce_per_replica"]
    if reduction not in ("auto", "mean") or not _is_multi_worker(strategy):
        return original(values, strategy, reduction)

    def reduce_one(v):
        if isinstance(v, tf.distribute.DistributedValues):
            local = strategy.experimental_local_results(v)[0]
            if local.shape.rank == 0:
                return strategy.reduce("MEAN", v, axis=None)
        elif isinstance(v, (tf.Tensor, tf.Variable)) and v.shape.rank == 0:
            return strategy.reduce("MEAN", v, axis=None)
        return original(v, strategy, reduction)

    return tf.nest.map_structure(reduce_one, values)


def apply_keras_multi_worker_fixes():
    """Patches Keras 3's TF trainer so that ``model.fit`` works under MWMS (idempotent).

    Replaces ``keras.src.backend.tensorflow.trainer.reduce_per_replica`` and
    ``TensorFlowTrainer._maybe_symbolic_build`` by versions that differ from the originals
    only when the model's strategy is a multi-worker `MultiWorkerMirroredStrategy` (see
    the module docstring). Safe to call many times and from several threads.

    Raises:
      RuntimeError: if TF/Keras are untested versions (see `check_versions`).
    """
    check_versions()
    with _PATCH_LOCK:
        if _ORIGINALS:
            return
        _ORIGINALS["maybe_symbolic_build"] = _keras_tf_trainer.TensorFlowTrainer._maybe_symbolic_build
        _ORIGINALS["reduce_per_replica"] = _keras_tf_trainer.reduce_per_replica
        _keras_tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _patched_maybe_symbolic_build
        _keras_tf_trainer.reduce_per_replica = _patched_reduce_per_replica


def keras_multi_worker_fixes_applied():
    """bool: whether `apply_keras_multi_worker_fixes` has patched Keras in this process."""
    return bool(_ORIGINALS)


# --------------------------------------------------------------------------------------
# Collective ops on sub-groups.
# --------------------------------------------------------------------------------------


class InstanceKeys:
    """Thread-safe instance-key counters, one per ``(group_key, device)``.

    Every process traces the same collectives in the same order, so the n-th collective of
    a group on a device gets the same instance key everywhere. Inside a ``tf.function``
    the key is captured at call time (a fresh key each call), exactly as TF's
    ``CollectiveReplicaLauncher`` does, so workers that retrace at different times still
    agree.

    Args:
      start: int, the first instance key of every counter; default 1.
    """

    def __init__(self, start=1):
        self._start = start
        self._next = {}
        self._lock = threading.Lock()

    def next_key(self, group_key, device):
        """Returns the next int instance key for `group_key` on `device`."""
        with self._lock:
            key = self._next.get((group_key, device), self._start)
            self._next[(group_key, device)] = key + 1
            return key

    def as_tensor(self, group_key, device):
        """Returns the next instance key as an int32 tensor, bound at call time in a graph."""
        next_key = functools.partial(self.next_key, group_key, device)

        def key_tensor():
            with tf.device("CPU:0"):
                return tf.constant(next_key(), tf.int32)

        if _ops.executing_eagerly_outside_functions():
            graph = _ops.get_default_graph()
            while getattr(graph, "is_control_flow_graph", False):
                graph = graph.outer_graph
            if not tf.executing_eagerly() and graph.building_function:
                with graph.as_default():
                    return graph.capture_call_time_value(key_tensor, tf.TensorSpec([], tf.int32))
            return key_tensor()
        return next_key()


def new_ordering_token(device):
    """Returns a resource variable on `device` whose handle orders collectives there.

    Collectives that share an ordering token run in program order on their device; with
    the same program on every worker this rules out the cross-group deadlocks of
    unordered collectives. Created outside any ``tf.function`` (``init_scope``).

    Args:
      device: str, a full device name, e.g. ``"/job:worker/replica:0/task:1/device:CPU:0"``.

    Returns:
      A ``ResourceVariable`` (float32 scalar, never read).
    """
    with _ops.init_scope(), tf.device(device):
        return _resource_variable_ops.ResourceVariable(0.0, trainable=False)


def abort_collective_ops(message):
    """Aborts every running and future collective of this process with ``DEADLINE_EXCEEDED``.

    The running collectives fail with ``tf.errors.DeadlineExceededError(message)``; every
    later one fails at once (the process must be restarted to use collectives again).

    Args:
      message: str, the error message the aborted collectives carry.
    """
    _context.context().abort_collective_ops(tf.errors.DEADLINE_EXCEEDED, message)


class SubgroupLauncher:
    """Launches collectives of one group (a row, a column, a node ...) on one device.

    Args:
      group_key: int, identifies the group; the same on every member, unique per group.
      group_size: int >= 1, the number of member devices (across all workers).
      device: str, the full name of this member's device.
      instance_keys: the process's `InstanceKeys`.
      ordering_token: the device's variable from `new_ordering_token` (shared by all the
        groups that use `device`).
      timeout_seconds: float or None; a collective that has not completed after this many
        seconds fails with ``DeadlineExceeded`` ("Collective ops timeout") instead of
        hanging when a peer is dead. Each collective with a timeout starts a watchdog
        thread that sleeps for the whole timeout, so pack before communicating.
      communication_hint: ``"auto"``, ``"ring"`` or ``"nccl"``; default ``"auto"``.

    Raises:
      ValueError: if `group_size` < 1 or `timeout_seconds` <= 0.
    """

    def __init__(self, group_key, group_size, device, instance_keys, ordering_token,
                 timeout_seconds=None, communication_hint="auto"):
        if group_size < 1:
            raise ValueError(f"Argument `group_size` must be >= 1. Received: group_size={group_size}")
        if timeout_seconds is not None and timeout_seconds <= 0:
            raise ValueError(
                f"Argument `timeout_seconds` must be > 0 or None. Received: timeout_seconds={timeout_seconds}"
            )
        self.group_key = int(group_key)
        self.group_size = int(group_size)
        self.device = device
        self._instance_keys = instance_keys
        self._ordering_token = ordering_token
        self._timeout = 0 if timeout_seconds is None else float(timeout_seconds)
        self._hint = communication_hint

    def _kwargs(self):
        return dict(
            group_size=self.group_size,
            group_key=self.group_key,
            instance_key=self._instance_keys.as_tensor(self.group_key, self.device),
            communication_hint=self._hint,
            timeout=self._timeout,
            ordering_token=self._ordering_token.handle,
        )

    def all_reduce(self, t):
        """Sum of `t` over the group; `t` has the same shape and dtype on every member."""
        with tf.device(self.device):
            return _collective_ops.all_reduce_v2(t, merge_op="Add", final_op="Id", **self._kwargs())

    def all_gather(self, t):
        """Concatenation of the members' `t` along axis 0, in group-rank order."""
        with tf.device(self.device):
            return _collective_ops.all_gather_v2(t, **self._kwargs())

    def all_to_all(self, t):
        """`t` has ``shape[0] == group_size``; row i goes to rank i, row j comes from rank j."""
        with tf.device(self.device):
            return _collective_ops.all_to_all_v2(t, **self._kwargs())


# --------------------------------------------------------------------------------------
# The MWMS hook.
# --------------------------------------------------------------------------------------


def _is_dense_float(v):
    return (
        isinstance(v, (tf.Tensor, tf.Variable))
        and not isinstance(v, _indexed_slices.IndexedSlices)
        and v.dtype.is_floating
    )


class _TfscaleCollectiveAllReduce(_CollectiveAllReduceBase):
    """MWMS's ``CollectiveAllReduce`` with dense float all-reduces sent to `reduce_fn`."""

    def __init__(self, base, reduce_fn):
        super().__init__(
            devices=base._devices,
            group_size=base._group_size,
            options=base._options,
            collective_keys=base._collective_keys,
            canonicalize_devices=base._canonicalize_devices,
        )
        self._reduce_fn = reduce_fn

    def _all_reduce(self, reduce_op, value, replica_id, options):
        if self._reduce_fn is None:
            return self._runtime_all_reduce(reduce_op, value, replica_id, options)
        flat = _nest.flatten(value)
        dense = [i for i, v in enumerate(flat) if _is_dense_float(v)]
        other = [i for i, v in enumerate(flat) if i not in set(dense)]
        results = [None] * len(flat)
        if dense:
            reduced = self._reduce_fn([flat[i] for i in dense], replica_id)
            device = self._devices[replica_id]
            for i, r in zip(dense, reduced):
                if reduce_op == _reduce_util.ReduceOp.MEAN:
                    with tf.device(device):
                        r = r / tf.cast(self._group_size, r.dtype)
                results[i] = r
        if other:
            reduced = super()._all_reduce(reduce_op, [flat[i] for i in other], replica_id, options)
            for i, r in zip(other, reduced):
                results[i] = r
        return _nest.pack_sequence_as(value, results)

    def _runtime_all_reduce(self, reduce_op, value, replica_id, options):
        """MWMS's own all-reduce, one call per dtype of the dense values (sorted by name, the same on every worker).

        TF's ``CollectiveAllReduce`` concatenates one call's dense tensors into one buffer, which fails when they
        have different dtypes (``ConcatV2 ... types that don't all match``); with one dtype this is its one call.
        """
        flat = _nest.flatten(value)
        groups = {}
        for i, v in enumerate(flat):
            # IndexedSlices are all-reduced one by one by TF anyway; dense values are grouped by dtype.
            key = "" if isinstance(v, _indexed_slices.IndexedSlices) else v.dtype.name
            groups.setdefault(key, []).append(i)
        if len(groups) <= 1:
            return super()._all_reduce(reduce_op, value, replica_id, options)
        results = [None] * len(flat)
        for key in sorted(groups):
            indices = groups[key]
            reduced = super()._all_reduce(reduce_op, [flat[i] for i in indices], replica_id, options)
            for i, r in zip(indices, reduced):
                results[i] = r
        return _nest.pack_sequence_as(value, results)


def install_all_reduce(strategy, reduce_fn):
    """Makes `strategy` (a multi-worker MWMS) all-reduce dense float values with `reduce_fn`.

    Args:
      strategy: a `tf.distribute.MultiWorkerMirroredStrategy`.
      reduce_fn: callable ``(values, replica_id) -> list of tensors``: `values` a list of
        dense floating-point tensors on local replica `replica_id` (an int in
        ``[0, len(strategy.extended.worker_devices))``), returning their sums over all
        replicas, same shapes and dtypes, on the same device. Called once per local
        replica, in replica order, for each all-reduce.

    Raises:
      TypeError: if `strategy` is not a `MultiWorkerMirroredStrategy`.
      RuntimeError: on an untested TF version.
    """
    check_versions()
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        raise TypeError(
            "Argument `strategy` must be a tf.distribute.MultiWorkerMirroredStrategy. "
            f"Received: strategy={strategy!r}"
        )
    extended = strategy.extended
    base = extended._cross_device_ops
    if isinstance(base, _TfscaleCollectiveAllReduce):
        base._reduce_fn = reduce_fn
        return
    extended._cross_device_ops = _TfscaleCollectiveAllReduce(base, reduce_fn)


def num_workers(strategy):
    """int: the number of worker tasks of an MWMS (1 when it runs locally)."""
    return int(strategy.extended._num_workers)


@contextlib.contextmanager
def multi_worker_local_devices(num_cpu_devices):
    """While active, MWMS built on a CPU-only worker uses `num_cpu_devices` CPU replicas.

    MWMS's ``_initialize_local_devices`` gives a worker without GPUs/TPUs a single CPU
    replica. Inside this context it returns ``/device:CPU:0 .. CPU:{n-1}`` of the worker
    instead (the logical CPU devices must exist, see
    ``tf.config.set_logical_device_configuration``). Workers with GPUs are unaffected.

    Args:
      num_cpu_devices: int >= 1.

    Raises:
      ValueError: if `num_cpu_devices` < 1.
    """
    if num_cpu_devices < 1:
        raise ValueError(f"Argument `num_cpu_devices` must be >= 1. Received: {num_cpu_devices}")
    cls = _mwms_lib.CollectiveAllReduceExtended
    original = cls._initialize_local_devices

    def patched(self, cluster_resolver, worker_device):
        devices, device_type = original(self, cluster_resolver, worker_device)
        if device_type == "CPU" and num_cpu_devices > 1:
            devices = tuple(f"{worker_device}/device:CPU:{i}" for i in range(num_cpu_devices))
        return devices, device_type

    cls._initialize_local_devices = patched
    try:
        yield
    finally:
        cls._initialize_local_devices = original



def mirrored(tensors):
    """Wraps one tensor per replica device (replica order) into a ``Mirrored`` value."""
    return _distribute_utils.regroup(tuple(tensors), wrap_class=_values_lib.Mirrored)


def destination_devices(destinations):
    """Returns the device names (tuple of str) of a CrossDeviceOps ``destinations`` argument."""
    return tuple(_cross_device_ops_lib.get_devices_from(destinations))


def cross_device_ops(strategy):
    """Returns the `tf.distribute.CrossDeviceOps` a strategy sums with (None if it has none)."""
    return getattr(strategy.extended, "_cross_device_ops", None)


def keyed_mirrored_strategy(devices, collective_key_base):
    """A `MirroredStrategy` over `devices` whose collective group keys start at `collective_key_base`.

    Every ``MirroredStrategy`` with its default ``CollectiveAllReduce`` starts its group keys
    at 1, so a second one over a different number of devices in the same process fails
    ("joining a group with size 8, but that group has size 4"). TF's own tests give each
    strategy a key range by setting the non-public ``_collective_key_base`` on a subclass.
    """

    class _KeyedMirroredStrategy(tf.distribute.MirroredStrategy):
        _collective_key_base = collective_key_base

    return _KeyedMirroredStrategy(devices=devices)


# ---------------------------------------------------------------------------------------------------------------
# Keras BackupAndRestore internals used by tfscale.training.backup.SafeBackupAndRestore (Keras 3.15).
# ---------------------------------------------------------------------------------------------------------------


def backup_file_paths(callback):
    """Returns ``(weights_path, metadata_path)`` of a `keras.callbacks.BackupAndRestore`.

    Keras keeps them in the non-public ``_weights_path`` and ``_training_metadata_path``; without them (another
    Keras version) the names Keras 3.15 uses are built from the public ``backup_dir``.
    """
    weights = getattr(callback, "_weights_path", None) or os.path.join(callback.backup_dir, "latest.weights.h5")
    metadata = getattr(callback, "_training_metadata_path", None) or os.path.join(
        callback.backup_dir, "training_metadata.json")
    return str(weights), str(metadata)


def set_resume_epoch(model, epoch):
    """Makes the next `model.fit` start at `epoch` (int >= 0), as `BackupAndRestore` does on restore.

    Keras 3.15's `fit` reads the non-public ``model._initial_epoch`` (set by `BackupAndRestore._load_model`) in
    place of its `initial_epoch` argument. 0 (or None) restores the argument's value.
    """
    model._initial_epoch = epoch or None


# ---------------------------------------------------------------------------------------------------------------
# Keras layer internals used by tfscale.layers (Keras 3.15).
# ---------------------------------------------------------------------------------------------------------------


def set_batch_norm_reduction_axes(layer, axes):
    """Sets the axes a `keras.layers.BatchNormalization` subclass reduces over.

    Keras's ``BatchNormalization.build`` stores them in the non-public ``_reduction_axes``, which its ``call``
    reads; a subclass that overrides ``build`` (tfscale's `DistributedBatchNormalization`) must set it too.
    """
    layer._reduction_axes = list(axes)


def is_keras_layer(obj):
    """Whether `obj` is a Keras 3 layer or model (has the recursive walk `flatten_layers` uses)."""
    return hasattr(obj, "_flatten_layers")


def flatten_layers(model):
    """Every layer inside `model`, itself included, recursively, in the order Keras tracks them.

    Keras's own recursive walk (non-public ``_flatten_layers``, what ``model.weights`` uses); it also finds layers
    held as attributes of custom layers, which ``model.layers`` does not.
    """
    return list(model._flatten_layers(include_self=True, recursive=True))


def override_call(layer, call):
    """Replaces ``layer.call`` on this instance only (the class is untouched); undo with `restore_call`.

    Keras 3.15 looks ``call`` up on the instance when a layer is called, so an entry in the instance's
    ``__dict__`` takes effect for this layer alone, which is how BN statistics are gathered without a new model.
    """
    layer.__dict__["call"] = call


def restore_call(layer):
    """Undoes `override_call` (no-op if the call was not overridden)."""
    layer.__dict__.pop("call", None)


def backup_restored_epoch(callback):
    """The epoch a `keras.callbacks.BackupAndRestore` will resume at (int, 0 when it has no backup).

    Reads the callback's metadata file (``training_metadata.json``, Keras 3.15: ``{"epoch": E, "batch": B}``,
    ``epoch`` the number of epochs done). tests/training/test_backup_format.py fails loudly if Keras changes it:
    a silent change would resume a batch-size schedule in the wrong phase.

    Raises:
      ValueError: if the file exists but has no integer ``epoch``.
    """
    _, path = backup_file_paths(callback)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        meta = json.load(f)
    epoch = meta.get("epoch") if isinstance(meta, dict) else None
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise ValueError(
            f"Keras's BackupAndRestore metadata {path} has no integer 'epoch' (Keras {keras.__version__} changed its "
            f"format?). Received: {meta!r}"
        )
    return epoch


def release_validation_iterator(model):
    """Drops the finished iterator of `model`'s last validation pass (Keras ``fit``'s cached one), now.

    A speed-up, not needed for correctness: with a TensorFlow or Keras other than the tested ones
    (`versions_tested` is False) it does nothing and returns None, instead of raising as `check_versions` does.
    Horovod's environment (TensorFlow 2.18) trains through ``fit`` with this callback in place.

    Returns:
      bool or None: True when there was one to release, False when there was none, None when skipped on an
      untested version.
    """
    if not versions_tested():
        return None
    epoch_iterator = getattr(model, "_eval_epoch_iterator", None)
    if epoch_iterator is None:
        return False
    generator = getattr(epoch_iterator, "_epoch_iterator", None)
    released = generator is not None or getattr(epoch_iterator, "_current_iterator", None) is not None
    epoch_iterator._epoch_iterator = None
    epoch_iterator._current_iterator = None
    if generator is not None:
        generator.close()  # frees the generator's frame, and with it the distributed iterator
    return released


def stop_preemption_watchers(handler):
    """Stops the background threads of a ``tf.distribute.experimental.PreemptionCheckpointHandler`` now.

    What the handler's own ``__del__`` does (it publishes "stop watching" in the coordination service and joins its
    watcher thread, then stops the SIGTERM poll thread); ``__del__`` never runs while those threads are alive,
    since they hold the handler. Idempotent: a second call finds no thread and does nothing.

    Args:
      handler: a ``PreemptionCheckpointHandler``.
    """
    for name in ("_stop_cluster_wise_termination_watcher_thread", "_stop_poll_termination_signal_thread"):
        stop = getattr(handler, name, None)
        if stop is not None:
            stop()


def wait_at_barrier(barrier_id, timeout_seconds):
    """Blocks until every task of the cluster's coordination service has called this with `barrier_id`.

    Args:
      barrier_id: str, the same on every worker, used once per cluster.
      timeout_seconds: float > 0; after it the barrier fails on every waiting worker.

    Raises:
      tf.errors.DeadlineExceededError: the barrier timed out (a worker did not arrive).
      tf.errors.OpError: the coordination service failed (for example, a worker died).
    """
    _context.context().wait_at_barrier(barrier_id, max(1, int(timeout_seconds * 1000)))
