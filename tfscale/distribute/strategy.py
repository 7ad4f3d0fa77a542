"""`create_strategy`: an algorithm name to a ready `tf.distribute` strategy.

In the style of Model Garden's ``distribute_utils``, a name becomes a
`tf.distribute.MirroredStrategy` over the local devices (the GPUs when there are any,
else logical CPU devices that `configure_logical_devices` splits off the host CPU, so that
multi-replica training runs on a CPU-only machine), or, under a multi-worker cluster, a
`MultiWorkerMirroredStrategy` (`tfscale.distribute.multi_worker`).

Names (`algorithm_names()`): every algorithm of the registry
(`tfscale.distribute.algorithms`: ``torus``, ``hierarchical``, ``halving_doubling``,
``flat`` with its alias ``ring``, and any you register), run in one process by
`ScheduledAllReduce`; plus TF's built-ins ``reduction_to_one_device``,
``hierarchical_copy`` and ``collective`` (`tf.distribute.ReductionToOneDevice`,
`tf.distribute.HierarchicalCopyAllReduce` and MirroredStrategy's default
`CollectiveAllReduce`).
"""

import logging
import os

import tensorflow as tf

from tfscale import _tf_compat
from tfscale.distribute import algorithms
from tfscale.distribute import handle as handle_lib
from tfscale.distribute import local
from tfscale.distribute import packing
from tfscale.distribute import topology

__all__ = [
    "ALGORITHMS",
    "TF_BUILTINS",
    "TFSCALE_ALGORITHMS",
    "algorithm_names",
    "configure_logical_devices",
    "create_cross_device_ops",
    "create_strategy",
    "local_devices",
]

_LOG = logging.getLogger(__name__)

TF_BUILTINS = {
    "reduction_to_one_device": tf.distribute.ReductionToOneDevice,
    "hierarchical_copy": tf.distribute.HierarchicalCopyAllReduce,
    "collective": None,  # MirroredStrategy's (and MWMS's) own CollectiveAllReduce.
}
"""TF's own cross-device ops, by name: class, or None for the strategy's default."""


def algorithm_names(include_builtins=True):
    """Returns every valid `create_strategy(algorithm=...)` name, sorted.

    Args:
      include_builtins: bool; False leaves out TF's built-ins (`TF_BUILTINS`). Default True.

    Returns:
      tuple of str: the registry's algorithms (`tfscale.distribute.algorithms`), their
      aliases (``ring``), and (unless `include_builtins` is False) TF's built-ins and
      ``auto``.
    """
    names = set(algorithms.algorithm_names()) | set(algorithms.ALIASES)
    if include_builtins:
        names |= set(TF_BUILTINS) | {"auto"}
    return tuple(sorted(names))


def _check_algorithm(algorithm):
    if algorithm in TF_BUILTINS or algorithm == "auto":
        return algorithm
    try:
        return algorithms.canonical_name(algorithm)
    except ValueError:
        raise ValueError(
            f"Unknown all_reduce algorithm {algorithm!r}; expected one of {list(algorithm_names())}. "
            f"Received: algorithm={algorithm!r}"
        ) from None


def __getattr__(name):
    # Computed from the registry at each access, so a registered algorithm is listed.
    if name == "TFSCALE_ALGORITHMS":
        return algorithm_names(include_builtins=False)
    if name == "ALGORITHMS":
        return algorithm_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _device_type():
    return "GPU" if tf.config.list_physical_devices("GPU") else "CPU"


def configure_logical_devices(num_devices):
    """Makes `num_devices` local devices available and returns their names.

    With GPUs, the first `num_devices` GPUs are used as they are. Without, the host CPU is
    split into `num_devices` logical CPU devices (as Keras's ``distribute_test.py`` does);
    this must happen before TensorFlow initialises its devices (before the first op or
    ``tf.config.list_logical_devices`` call). If TensorFlow is already initialised with at
    least `num_devices` logical CPUs (e.g. a test ``conftest.py`` split it earlier), the
    first `num_devices` are returned; an existing split into at least `num_devices` is
    reused, never shrunk.

    When it splits the CPU into more logical devices than the host has cores, it also runs
    each op on one thread (``tf.config.threading.set_intra_op_parallelism_threads(1)``)
    unless the program or ``TF_NUM_INTRAOP_THREADS`` chose otherwise: the replicas' ops
    already run side by side on every core, and sharding each of them over all cores as
    well only adds contention (the default job, 4 replicas on 2 cores: 1,301-1,412 against
    1,104-1,292 images/s in three paired runs, docs/benchmarks.md).

    Args:
      num_devices: int >= 1, the number of replicas wanted.

    Returns:
      A list of `num_devices` device names, e.g. ``['/device:CPU:0', ...]``.

    Raises:
      ValueError: if `num_devices` is not an int >= 1, or exceeds the number of GPUs.
      RuntimeError: if TensorFlow's devices are already initialised with fewer than
        `num_devices` logical CPUs (call this first thing in the program).
    """
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
        raise ValueError(
            f"Argument `num_devices` must be an int >= 1. Received: num_devices={num_devices!r}"
        )
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        if num_devices > len(gpus):
            raise ValueError(
                f"Argument `num_devices` must be <= the {len(gpus)} GPUs present. "
                f"Received: num_devices={num_devices}"
            )
        return [d.name for d in tf.config.list_logical_devices("GPU")][:num_devices]
    cpus = tf.config.list_physical_devices("CPU")
    configured = tf.config.get_logical_device_configuration(cpus[0]) or []
    if len(configured) >= num_devices:  # Already split (e.g. by a test conftest): reuse.
        return [d.name for d in tf.config.list_logical_devices("CPU")][:num_devices]
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_devices
        )
        _one_thread_per_op_if_oversubscribed(num_devices)
    except RuntimeError:
        existing = tf.config.list_logical_devices("CPU")
        if len(existing) < num_devices:
            raise RuntimeError(
                f"Cannot split the CPU into num_devices={num_devices} logical devices: "
                f"TensorFlow is already initialised with {len(existing)}. Call "
                "`configure_logical_devices` (or `create_strategy`) before any other "
                "TensorFlow op."
            ) from None
        return [d.name for d in existing][:num_devices]
    return [d.name for d in tf.config.list_logical_devices("CPU")][:num_devices]


def _one_thread_per_op_if_oversubscribed(num_devices):
    """Intra-op threads = 1 when `num_devices` logical CPU devices outnumber the cores (see above)."""
    cores = os.cpu_count() or 1
    if num_devices <= cores or os.environ.get("TF_NUM_INTRAOP_THREADS"):
        return
    if tf.config.threading.get_intra_op_parallelism_threads() == 0:  # 0: TF's default (all cores)
        tf.config.threading.set_intra_op_parallelism_threads(1)
        _LOG.info("%d logical CPU devices on %d cores: intra-op parallelism set to 1 thread per op "
                  "(set TF_NUM_INTRAOP_THREADS to override)", num_devices, cores)


def local_devices(num_replicas=None):
    """Returns the device names for `num_replicas` replicas (see `create_strategy`).

    Args:
      num_replicas: int >= 1, or None for every GPU, or, without GPUs, every logical CPU
        already configured (1 if TensorFlow has not split the CPU).

    Returns:
      A list of device names.

    Raises:
      ValueError, RuntimeError: as `configure_logical_devices`.
    """
    if num_replicas is None:
        if _device_type() == "GPU":
            return [d.name for d in tf.config.list_logical_devices("GPU")]
        return [d.name for d in tf.config.list_logical_devices("CPU")]
    return configure_logical_devices(num_replicas)


def create_cross_device_ops(algorithm, num_replicas, grid_shape=None, devices_per_node=None,
                            bytes_per_pack=local.IN_PROCESS_BYTES_PER_PACK, compression=None,
                            intra_node="reduce_scatter"):
    """Returns the `tf.distribute.CrossDeviceOps` for `algorithm`, or None for "collective".

    Args:
      algorithm: one of `algorithm_names()`.
      num_replicas: int >= 1, the number of replicas (to check `grid_shape` and
        `devices_per_node`).
      grid_shape: torus only: None (most square), ``"RxC"`` or ``(rows, cols)``.
      devices_per_node: hierarchical only: int dividing `num_replicas`; None picks the
        column count of `topology.factor_grid(num_replicas)` (e.g. 4 of 8).
      bytes_per_pack: int >= 0, fusion threshold in bytes for tfscale's algorithms.
      compression: None, ``"fp16"``/``"float16"`` or ``"bf16"``/``"bfloat16"``, tfscale's
        algorithms only.
      intra_node: hierarchical only, ``"reduce_scatter"`` or ``"reduce"``.

    Returns:
      A `ScheduledAllReduce` (`TorusAllReduce`, `HierarchicalAllReduce`) for a registered
      algorithm, TF's op for a built-in, or None for ``"collective"`` (MirroredStrategy's
      own default).

    Raises:
      ValueError: for an unknown `algorithm` (the message lists the valid names), a
        `grid_shape` or `devices_per_node` that does not fit `num_replicas` or is given to
        an algorithm that does not use it, or `compression` with a built-in algorithm.
    """
    name = _check_algorithm(algorithm)
    compression = packing.validate_compression(compression)
    if name in TF_BUILTINS:
        for arg, value in (("grid_shape", grid_shape), ("devices_per_node", devices_per_node),
                           ("compression", compression)):
            if value is not None:
                raise ValueError(
                    f"Argument `{arg}` only applies to tfscale's algorithms {list(algorithm_names(False))}. "
                    f"Received: {arg}={value!r}, algorithm={algorithm!r}"
                )
        cls = TF_BUILTINS[name]
        return None if cls is None else cls()
    params = {"grid_shape": grid_shape, "devices_per_node": devices_per_node}
    if name == "hierarchical":
        if devices_per_node is None:
            params["devices_per_node"] = topology.factor_grid(num_replicas)[1]
        if intra_node != "reduce_scatter":
            params["intra_node"] = intra_node
    params = {k: v for k, v in params.items() if v is not None}
    # Builds (and so checks) the schedule now: a bad topology fails before any device is touched.
    algorithms.build_schedule(name, num_replicas, **params)
    if name == "torus":
        return local.TorusAllReduce(grid_shape, bytes_per_pack=bytes_per_pack, compression=compression)
    if name == "hierarchical":
        return local.HierarchicalAllReduce(params["devices_per_node"], bytes_per_pack=bytes_per_pack,
                                           compression=compression, intra_node=intra_node)
    return local.ScheduledAllReduce(name, bytes_per_pack=bytes_per_pack, compression=compression, **params)


_COLLECTIVE_KEY_STRIDE = 100_000
_collective_strategies = [0]


def _one_process_strategy(devices, cross_device_ops):
    """The single-process path: a `MirroredStrategy` over `devices`.

    With ``cross_device_ops=None`` (MirroredStrategy's own `CollectiveAllReduce`), every
    strategy of a process starts its collective group keys at 1, so a second strategy
    over a different number of devices fails and poisons every later collective; each
    such strategy therefore gets its own key range (`_tf_compat.keyed_mirrored_strategy`).
    """
    if cross_device_ops is not None:
        return tf.distribute.MirroredStrategy(devices=devices, cross_device_ops=cross_device_ops)
    _collective_strategies[0] += 1
    return _tf_compat.keyed_mirrored_strategy(devices, _COLLECTIVE_KEY_STRIDE * _collective_strategies[0])


def create_strategy(algorithm="torus", num_replicas=None, grid_shape=None,
                    devices_per_node=None, bytes_per_pack=local.IN_PROCESS_BYTES_PER_PACK,
                    compression=None, intra_node="reduce_scatter", gradient_bytes=None, calibration_file=None):
    """Returns a `tf.distribute.MirroredStrategy` whose gradient all-reduce is `algorithm`.

    In a multi-worker environment (`TF_CONFIG`, Open MPI or SLURM variables naming more than
    one worker; see `tfscale.launch`) it returns instead a `MultiWorkerMirroredStrategy`
    whose all-reduce is tfscale's `algorithm` over TF's collective runtime
    (`multi_worker.create_multi_worker_strategy`); `num_replicas` is then ignored (each
    worker's device count comes from the launcher) and `algorithm` must be a registered
    algorithm or "collective" (MWMS's own all-reduce).

    Otherwise it sets up the devices first (`configure_logical_devices`: GPUs if present, else
    `num_replicas` logical CPUs, which must happen before TensorFlow initialises), then
    builds the cross-device op (`create_cross_device_ops`). Keras ``model.fit`` under
    ``strategy.scope()`` then sums gradients with it.

    Args:
      algorithm: one of `algorithm_names()` (default ``"torus"``), or ``"auto"``: the cost
        model picks the algorithm and its topology parameters for these devices
        (`tfscale.planning.choose_all_reduce`; on logical CPU devices, which share one
        memory, TF's ``reduction_to_one_device``), prints its choice with the predicted
        time of every alternative, and `strategy_handle(strategy).auto_choice` keeps it.
      num_replicas: int >= 1, or None for every GPU (or every logical CPU already
        configured, 1 if none).
      grid_shape: torus only: None (most square), ``"RxC"`` or ``(rows, cols)`` with
        ``rows * cols == num_replicas``.
      devices_per_node: hierarchical only: int dividing the replica count; None picks
        the column count of `topology.factor_grid`.
      bytes_per_pack: int >= 0, fusion threshold in bytes; 0 fuses all gradients of a
        dtype into one buffer; None picks the path's default (256 KiB in one process,
        32 MiB across processes). Default 256 KiB.
      compression: None, ``"fp16"``/``"float16"`` or ``"bf16"``/``"bfloat16"`` (tfscale's
        algorithms only). fp16 overflows to inf above 65504.
      intra_node: hierarchical only: ``"reduce_scatter"`` (default) or ``"reduce"``.
      gradient_bytes: int > 0 or None, ``"auto"`` only: bytes of one replica's gradients,
        the message the choice is made for (None: ResNet-50's, 102 MB in float32).
      calibration_file: str or None, ``"auto"`` only: a calibration JSON written by
        ``scripts/plan_allreduce.py --calibrate`` (None: built-in links).

    Returns:
      A `tf.distribute.MirroredStrategy`; `strategy_handle(strategy)` describes it
      (algorithm, schedule, cross-device op) and `get_cross_device_ops(strategy)` returns
      the op.

    Raises:
      ValueError: for an unknown `algorithm` (the message lists the valid names), a
        `grid_shape` whose product differs from the replica count (naming both), a
        `devices_per_node` that does not divide it, an unknown `compression`.
      RuntimeError: if the CPU cannot be split any more (TensorFlow already initialised).

    Example:
      >>> strategy = create_strategy("torus", num_replicas=8, grid_shape="2x4")
      >>> with strategy.scope():
      ...     model = build_model(); model.compile(...)
      >>> model.fit(dataset)
    """
    _check_algorithm(algorithm)  # Fail before touching the devices.
    from tfscale.distribute import multi_worker  # noqa: PLC0415

    if multi_worker.in_multi_worker_environment():
        return _multi_worker_strategy(algorithm, grid_shape, devices_per_node, bytes_per_pack, compression,
                                      gradient_bytes, calibration_file)
    if bytes_per_pack is None:
        bytes_per_pack = local.IN_PROCESS_BYTES_PER_PACK
    devices = local_devices(num_replicas)
    choice = None
    if algorithm == "auto":
        if grid_shape is not None or devices_per_node is not None:
            raise ValueError(
                "Arguments `grid_shape` and `devices_per_node` do not apply to algorithm='auto' (it picks them). "
                f"Received: grid_shape={grid_shape!r}, devices_per_node={devices_per_node!r}")
        choice = _choose_in_process(devices, gradient_bytes, calibration_file, bytes_per_pack, compression)
        print(choice.describe(), flush=True)
        algorithm = choice.algorithm
        grid_shape = choice.params.get("grid_shape")
        devices_per_node = choice.params.get("devices_per_node")
        if algorithm in TF_BUILTINS:
            compression = None
    cross_device_ops = create_cross_device_ops(
        algorithm,
        len(devices),
        grid_shape=grid_shape,
        devices_per_node=devices_per_node,
        bytes_per_pack=bytes_per_pack,
        compression=compression,
        intra_node=intra_node,
    )
    _LOG.info("tfscale: %s all-reduce over %d devices", algorithm, len(devices))
    strategy = _one_process_strategy(devices, cross_device_ops)
    handle_lib.attach(strategy, handle_lib.StrategyHandle(
        algorithm=_check_algorithm(algorithm), num_replicas=len(devices), cross_device_ops=cross_device_ops,
        auto_choice=choice))
    return strategy


def _choose_in_process(devices, gradient_bytes, calibration_file, bytes_per_pack, compression):
    """`all_reduce="auto"` in one process: logical CPUs share one memory; GPUs and TPU cores have links."""
    from tfscale import planning  # noqa: PLC0415 (pure Python)

    kind = "shared_memory" if all(tf.DeviceSpec.from_string(d).device_type == "CPU" for d in devices) else "accelerators"
    topology = planning.Topology(len(devices), len(devices), kind, source="this process's devices")
    calibration = planning.load_calibration(calibration_file) if calibration_file else None
    return planning.choose_all_reduce(topology, gradient_bytes or planning.Workload().gradient_bytes, calibration,
                                      bytes_per_pack=bytes_per_pack, compression=compression)


def _multi_worker_strategy(algorithm, grid_shape, devices_per_node, bytes_per_pack, compression,
                           gradient_bytes=None, calibration_file=None):
    """The multi-process path of `create_strategy` (see there)."""
    from tfscale.distribute import multi_worker  # noqa: PLC0415

    name = _check_algorithm(algorithm)
    if name == "auto":
        kwargs = {} if bytes_per_pack is None else {"bytes_per_pack": bytes_per_pack}
        return multi_worker.create_multi_worker_strategy("auto", compression=compression, gradient_bytes=gradient_bytes,
                                                         calibration_file=calibration_file, **kwargs)
    if name in TF_BUILTINS and name != "collective":
        raise ValueError(
            f"Under a multi-worker cluster `algorithm` must be one of "
            f"{sorted(set(algorithm_names(False)) | {'collective'})}. Received: algorithm={algorithm!r}"
        )
    kwargs = {} if bytes_per_pack is None else {"bytes_per_pack": bytes_per_pack}
    strategy = multi_worker.create_multi_worker_strategy(
        "flat" if name == "collective" else name,
        grid_shape=grid_shape,
        devices_per_node=devices_per_node,
        compression=compression,
        **kwargs,
    )
    if name == "collective":
        multi_worker.use_all_reduce(strategy, None)  # MWMS's own CollectiveAllReduce
        handle_lib.strategy_handle(strategy).algorithm = "collective"
    _LOG.info("tfscale: %s all-reduce over %d workers", algorithm, strategy.num_replicas_in_sync)
    return strategy
