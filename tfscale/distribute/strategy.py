"""One call from an all-reduce name to a ready `tf.distribute.Strategy`.

`create_strategy` maps a name (`ALGORITHMS`) to a `tf.distribute.CrossDeviceOps`, in the
style of Model Garden's ``distribute_utils``, and returns a `MirroredStrategy` over the
local devices: the GPUs when there are any, else logical CPU devices that
`configure_logical_devices` splits off the host CPU (so that multi-replica training runs on
a CPU-only machine, e.g. in tests).

Names:

* ``"torus"``: `TorusAllReduce` (Mikami et al., arXiv:1811.05233; Ying et al.,
  arXiv:1811.06992), tfscale's default;
* ``"hierarchical"``: `HierarchicalAllReduce` (Jia et al., arXiv:1807.11205);
* ``"ring"``: the flat bandwidth-optimal all-reduce, reduce-scatter + all-gather over all
  replicas, i.e. `TorusAllReduce` on a ``1 x N`` grid (each device sends
  ``2 (N - 1) / N`` of the buffer, like a ring);
* ``"reduction_to_one_device"``, ``"hierarchical_copy"``, ``"collective"``: TF's
  built-ins `tf.distribute.ReductionToOneDevice`, `tf.distribute.HierarchicalCopyAllReduce`
  and MirroredStrategy's default `CollectiveAllReduce`.

Only the one-process path (`MirroredStrategy`) is built here, in `_one_process_strategy`;
a multi-worker branch belongs next to it.
"""

import logging

import tensorflow as tf

from tfscale.distribute import local
from tfscale.distribute import packing
from tfscale.distribute import topology
from tfscale.distribute.hierarchical import HierarchicalAllReduce
from tfscale.distribute.torus import TorusAllReduce

__all__ = [
    "ALGORITHMS",
    "TFSCALE_ALGORITHMS",
    "configure_logical_devices",
    "create_cross_device_ops",
    "create_strategy",
    "local_devices",
]

_LOG = logging.getLogger(__name__)

TFSCALE_ALGORITHMS = ("torus", "hierarchical", "ring")
"""The algorithms implemented by tfscale (they accept `bytes_per_pack` and `compression`)."""

ALGORITHMS = TFSCALE_ALGORITHMS + ("reduction_to_one_device", "hierarchical_copy", "collective")
"""Valid `create_strategy(algorithm=...)` names; the last three are TF's built-ins."""


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
                            bytes_per_pack=local.DEFAULT_BYTES_PER_PACK, compression=None,
                            intra_node="reduce_scatter"):
    """Returns the `tf.distribute.CrossDeviceOps` for `algorithm`, or None for "collective".

    Args:
      algorithm: one of `ALGORITHMS`.
      num_replicas: int >= 1, the number of replicas (to check `grid_shape` and
        `devices_per_node`).
      grid_shape: torus only: None (most square), ``"RxC"`` or ``(rows, cols)``.
      devices_per_node: hierarchical only: int dividing `num_replicas`; None picks the
        column count of `topology.factor_grid(num_replicas)` (e.g. 4 of 8).
      bytes_per_pack: int >= 0, fusion threshold in bytes for tfscale's algorithms.
      compression: None, ``"fp16"`` or ``"bf16"``, tfscale's algorithms only.
      intra_node: hierarchical only, ``"reduce_scatter"`` or ``"reduce"``.

    Returns:
      A `tf.distribute.CrossDeviceOps`, or None for ``"collective"`` (MirroredStrategy's
      own default).

    Raises:
      ValueError: for an unknown `algorithm` (the message lists `ALGORITHMS`), a
        `grid_shape` or `devices_per_node` that does not fit `num_replicas` or is given to
        an algorithm that does not use it, or `compression` with a built-in algorithm.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(
            f"Unknown all_reduce_alg {algorithm!r}; expected one of {sorted(ALGORITHMS)}. "
            f"Received: algorithm={algorithm!r}"
        )
    if grid_shape is not None and algorithm != "torus":
        raise ValueError(
            "Argument `grid_shape` only applies to algorithm='torus'. "
            f"Received: grid_shape={grid_shape!r}, algorithm={algorithm!r}"
        )
    if devices_per_node is not None and algorithm != "hierarchical":
        raise ValueError(
            "Argument `devices_per_node` only applies to algorithm='hierarchical'. "
            f"Received: devices_per_node={devices_per_node!r}, algorithm={algorithm!r}"
        )
    compression = packing.validate_compression(compression)
    if compression is not None and algorithm not in TFSCALE_ALGORITHMS:
        raise ValueError(
            f"Argument `compression` is only supported by {list(TFSCALE_ALGORITHMS)}. "
            f"Received: compression={compression!r}, algorithm={algorithm!r}"
        )
    if algorithm == "torus":
        topology.parse_grid_shape(grid_shape, num_replicas)  # Error names both.
        return TorusAllReduce(grid_shape, bytes_per_pack=bytes_per_pack,
                              compression=compression)
    if algorithm == "ring":
        return TorusAllReduce((1, num_replicas), bytes_per_pack=bytes_per_pack,
                              compression=compression)
    if algorithm == "hierarchical":
        if devices_per_node is None:
            devices_per_node = topology.factor_grid(num_replicas)[1]
        topology.node_groups(num_replicas, devices_per_node)  # Error names both.
        return HierarchicalAllReduce(devices_per_node, bytes_per_pack=bytes_per_pack,
                                     compression=compression, intra_node=intra_node)
    if algorithm == "reduction_to_one_device":
        return tf.distribute.ReductionToOneDevice()
    if algorithm == "hierarchical_copy":
        return tf.distribute.HierarchicalCopyAllReduce()
    return None  # "collective": MirroredStrategy's default CollectiveAllReduce.


_COLLECTIVE_KEY_STRIDE = 100_000
_collective_strategies = [0]


def _one_process_strategy(devices, cross_device_ops):
    """The single-process path: a `MirroredStrategy` over `devices`.

    With ``cross_device_ops=None`` (MirroredStrategy's own `CollectiveAllReduce`), every
    strategy of a process starts its collective group keys at 1, so a second strategy
    over a different number of devices fails ("joining a group with size 8, but that group
    has size 4") and poisons every later collective. Each such strategy therefore gets its
    own key range, the way TF's own ``strategy_combinations`` does (a subclass setting the
    non-public ``_collective_key_base``).
    """
    if cross_device_ops is not None:
        return tf.distribute.MirroredStrategy(devices=devices,
                                              cross_device_ops=cross_device_ops)
    _collective_strategies[0] += 1

    class _KeyedMirroredStrategy(tf.distribute.MirroredStrategy):
        _collective_key_base = _COLLECTIVE_KEY_STRIDE * _collective_strategies[0]

    return _KeyedMirroredStrategy(devices=devices)


def create_strategy(algorithm="torus", num_replicas=None, grid_shape=None,
                    devices_per_node=None, bytes_per_pack=local.DEFAULT_BYTES_PER_PACK,
                    compression=None, intra_node="reduce_scatter"):
    """Returns a `tf.distribute.MirroredStrategy` whose gradient all-reduce is `algorithm`.

    In a multi-worker environment (`TF_CONFIG`, Open MPI or SLURM variables naming more than
    one worker; see `tfscale.launch`) it returns instead a `MultiWorkerMirroredStrategy`
    whose all-reduce is tfscale's `algorithm` over TF's collective runtime
    (`collective.create_multi_worker_strategy`); `num_replicas` is then ignored (each
    worker's device count comes from the launcher) and `algorithm` must be "torus",
    "hierarchical", "ring" or "collective" (MWMS's own all-reduce).

    Otherwise it sets up the devices first (`configure_logical_devices`: GPUs if present, else
    `num_replicas` logical CPUs, which must happen before TensorFlow initialises), then
    builds the cross-device op (`create_cross_device_ops`). Keras ``model.fit`` under
    ``strategy.scope()`` then sums gradients with it.

    Args:
      algorithm: one of `ALGORITHMS` (default ``"torus"``).
      num_replicas: int >= 1, or None for every GPU (or every logical CPU already
        configured, 1 if none).
      grid_shape: torus only: None (most square), ``"RxC"`` or ``(rows, cols)`` with
        ``rows * cols == num_replicas``.
      devices_per_node: hierarchical only: int dividing the replica count; None picks
        the column count of `topology.factor_grid`.
      bytes_per_pack: int >= 0, fusion threshold in bytes; 0 fuses all gradients of a
        dtype into one buffer; None picks the path's default (256 KiB in one process,
        32 MiB across processes). Default 256 KiB.
      compression: None, ``"fp16"`` or ``"bf16"`` (tfscale's algorithms only).
      intra_node: hierarchical only: ``"reduce_scatter"`` (default) or ``"reduce"``.

    Returns:
      A `tf.distribute.MirroredStrategy`; its ``extended._cross_device_ops`` is the op.

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
    if algorithm not in ALGORITHMS:  # Fail before touching the devices.
        raise ValueError(
            f"Unknown all_reduce_alg {algorithm!r}; expected one of {sorted(ALGORITHMS)}. "
            f"Received: algorithm={algorithm!r}"
        )
    from tfscale.distribute import collective  # noqa: PLC0415 (imports the version-guarded compat layer)

    if collective.in_multi_worker_environment():
        return _multi_worker_strategy(algorithm, grid_shape, devices_per_node, bytes_per_pack, compression)
    if bytes_per_pack is None:
        bytes_per_pack = local.DEFAULT_BYTES_PER_PACK
    devices = local_devices(num_replicas)
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
    return _one_process_strategy(devices, cross_device_ops)


def _multi_worker_strategy(algorithm, grid_shape, devices_per_node, bytes_per_pack, compression):
    """The multi-process path of `create_strategy` (see there)."""
    from tfscale.distribute import collective  # noqa: PLC0415

    valid = list(collective.ALGORITHMS) + ["collective"]
    if algorithm not in valid:
        raise ValueError(
            f"Under a multi-worker cluster `algorithm` must be one of {sorted(valid)}. "
            f"Received: algorithm={algorithm!r}"
        )
    kwargs = {} if bytes_per_pack is None else {"bytes_per_pack": bytes_per_pack}
    strategy = collective.create_multi_worker_strategy(
        "ring" if algorithm == "collective" else algorithm,
        grid_shape=grid_shape if algorithm == "torus" else None,
        devices_per_node=devices_per_node if algorithm == "hierarchical" else None,
        compression=compression,
        **kwargs,
    )
    if algorithm == "collective":
        collective.use_all_reduce(strategy, None)  # MWMS's own CollectiveAllReduce
    _LOG.info("tfscale: %s all-reduce over %d workers", algorithm, strategy.num_replicas_in_sync)
    return strategy
