"""The multi-worker strategy factory: MWMS whose all-reduce is a tfscale schedule.

`create_multi_worker_strategy` builds a `tf.distribute.MultiWorkerMirroredStrategy` from
the cluster in the environment (``TF_CONFIG``, Open MPI or SLURM; `tfscale.distribute.cluster`),
installs a `tfscale.distribute.collective.MultiWorkerAllReduce` running any registered
algorithm, applies the Keras 3 multi-worker ``fit`` fixes and gives the strategy a
`CollectiveWatchdog`; `strategy_handle(strategy)` returns all of it.
"""

import os
import sys
import time

import tensorflow as tf

from tfscale import _tf_compat
from tfscale.distribute import algorithms
from tfscale.distribute import cluster as cluster_lib
from tfscale.distribute import failures as failures_lib
from tfscale.distribute import handle as handle_lib
from tfscale.distribute import packing
from tfscale.distribute import validation
from tfscale.distribute import watchdog as watchdog_lib
from tfscale.distribute.collective import DEFAULT_SMALL_PACK_BYTES
from tfscale.distribute.collective import DEFAULT_TIMEOUT_SECONDS
from tfscale.distribute.collective import MULTI_WORKER_BYTES_PER_PACK
from tfscale.distribute.collective import MultiWorkerAllReduce

__all__ = ["create_multi_worker_strategy", "in_multi_worker_environment", "leave_cluster", "use_all_reduce"]

_KEY_STRIDE = 1_000_000  # group keys per strategy; far above MWMS's own (1, 2, ...)
_STRATEGIES_CREATED = [0]


def in_multi_worker_environment(environ=None):
    """Whether ``TF_CONFIG``, Open MPI or SLURM variables describe more than one worker.

    Args:
      environ: mapping of environment variables; default `os.environ`.

    Returns:
      bool.

    Raises:
      ValueError: if the variables are malformed (e.g. a ``TF_CONFIG`` that is not JSON).
    """
    return cluster_lib.in_multi_worker_environment(environ)


def _devices_per_worker_from_env(devices_per_worker):
    if devices_per_worker is not None:
        value = devices_per_worker
    elif os.environ.get("TFSCALE_DEVICES_PER_WORKER", "").strip():
        value = os.environ["TFSCALE_DEVICES_PER_WORKER"].strip()
        try:
            value = int(value)
        except ValueError:
            raise ValueError(
                f"TFSCALE_DEVICES_PER_WORKER must be an int >= 1. Received: {value!r}"
            ) from None
    else:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"Argument `devices_per_worker` must be an int >= 1. Received: devices_per_worker={value!r}"
        )
    return value


def _ensure_cpu_devices(count):
    """Splits the CPU into `count` logical devices (before TF initialises) for CPU workers."""
    cpus = tf.config.list_physical_devices("CPU")
    existing = tf.config.get_logical_device_configuration(cpus[0])
    if existing is not None and len(existing) >= count:
        return
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have < count:
            raise ValueError(
                f"devices_per_worker={count} needs {count} logical CPU devices, but TensorFlow "
                f"is already initialised with {have}. Create the strategy before running any "
                "TensorFlow op, or split the CPU with tf.config.set_logical_device_configuration."
            ) from None


def _worker_rank(resolver):
    spec = resolver.cluster_spec().as_dict()
    if resolver.task_type == "chief":
        return 0
    return int(resolver.task_id) + (1 if "chief" in spec else 0)


def create_multi_worker_strategy(algorithm="torus", grid_shape=None, devices_per_node=None,
                                 bytes_per_pack=MULTI_WORKER_BYTES_PER_PACK, compression=None,
                                 timeout_seconds=DEFAULT_TIMEOUT_SECONDS, cluster_resolver=None,
                                 devices_per_worker=None, small_pack_bytes=DEFAULT_SMALL_PACK_BYTES,
                                 per_collective_timeout=False, gradient_bytes=None, calibration_file=None):
    """Creates an MWMS whose all-reduce is a registered tfscale schedule (torus by default).

    The cluster comes from `cluster_resolver` or else from the environment
    (`tfscale.distribute.cluster.cluster_from_environment`: ``TF_CONFIG``, Open MPI or
    SLURM). Also applies the Keras 3 multi-worker ``fit`` fixes
    (`_tf_compat.apply_keras_multi_worker_fixes`), so plain ``model.fit`` works. Must be
    called at program start, before any other TF op (MWMS starts a gRPC server).

    Args:
      algorithm: a name of `tfscale.distribute.algorithms.algorithm_names()` (``"torus"``,
        default; ``"hierarchical"``, ``"halving_doubling"``, ``"flat"``/``"ring"``, or one
        registered by the user), or ``"auto"``: the cost model (`tfscale.planning.choose_all_reduce`)
        picks the algorithm and its grid or node size for the cluster's topology (workers
        whose addresses share a host share a node; `TFSCALE_INTER_NODE_BANDWIDTH`, set by
        the emulated cluster of `tfscale.launch`, gives the network's bandwidth), every
        worker the same, and the chief prints the choice and the prediction for each
        alternative. Across nodes, without compression, it may pick ``"collective"``: MWMS's own
        flat all-reduce (then ``strategy_handle(strategy).all_reduce`` is None).
      grid_shape: torus grid over all replicas: None (most square), ``"RxC"`` or
        ``(rows, cols)``; ``rows * cols`` must equal ``num_workers * devices_per_worker``.
      devices_per_node: hierarchical only: replicas per node; default: the replicas of the workers that share
        a host in the cluster spec (or an emulated node of `tfscale.launch --nodes`), one node per worker where
        the hosts are uneven or not contiguous.
      bytes_per_pack: int >= 0, fusion threshold in bytes; default 32 MiB.
      compression: None, ``"fp16"`` or ``"bf16"`` (wire dtype of float32 gradients).
      timeout_seconds: float > 0, seconds a step may wait for its peers before its
        collectives fail with ``DeadlineExceeded``; default 300. Enforced by
        ``strategy_handle(strategy).watchdog`` (pass ``.callbacks()`` to ``fit`` / ``evaluate``) and,
        with `per_collective_timeout`, by every collective (tfscale's and MWMS's own).
      cluster_resolver: a `tf.distribute.cluster_resolver.ClusterResolver` or None.
      devices_per_worker: int >= 1 or None: replicas per worker. None reads
        ``TFSCALE_DEVICES_PER_WORKER`` (set by ``python -m tfscale.launch``) and
        otherwise uses MWMS's choice (all visible GPUs, or one CPU). On a CPU-only worker
        a value > 1 splits the CPU into that many logical devices.
      small_pack_bytes: int >= 0, torus / hierarchical packs smaller than this many bytes
        use two all-reduces instead of reduce-scatter / all-reduce / all-gather (see
        `MultiWorkerAllReduce`); default 1 MiB; 0 turns it off.
      per_collective_timeout: bool, default False. True puts `timeout_seconds` on every
        collective as well: tfscale's and MWMS's own (``CommunicationOptions``; MWMS's
        input pipeline makes an integer all-reduce per step). TF starts one thread per
        such collective that sleeps for the whole timeout, so at several collectives per
        step a long run exhausts the process's threads (the 4-worker default job did in
        its 2nd epoch; 240 steps of a small fit left 9,200 threads per worker); use it
        only for short custom loops that cannot take the watchdog callback. With False,
        a peer that dies outside ``fit`` / ``evaluate`` (e.g. while variables are
        created) is still reported by TF's coordination service (missed heartbeats),
        but a peer that hangs there is not.
      gradient_bytes: int > 0 or None, ``"auto"`` only: bytes of one replica's gradients
        (None: ResNet-50's, 102 MB in float32).
      calibration_file: str or None, ``"auto"`` only: a calibration JSON of
        ``scripts/plan_allreduce.py --calibrate`` (None: built-in links).

    Returns:
      A `tf.distribute.MultiWorkerMirroredStrategy` with ``num_replicas_in_sync ==
      num_workers * devices_per_worker``. ``strategy_handle(strategy)`` returns its
      `StrategyHandle`: ``.all_reduce`` is the installed `MultiWorkerAllReduce`,
      ``.watchdog`` this process's `CollectiveWatchdog` with `timeout_seconds`
      (``.callbacks()`` for ``fit``).

    Raises:
      ValueError: for a malformed ``TF_CONFIG`` (or MPI/SLURM variables), no multi-worker
        cluster, an unknown `algorithm`, a `grid_shape` that does not match the total
        replica count, a bad `compression`, `timeout_seconds` or `bytes_per_pack`.
      RuntimeError: on a TF/Keras version that `_tf_compat` was not tested with.

    Example:
      >>> # In each worker, e.g. under `python -m tfscale.launch --num_workers 4 -- ...`:
      >>> strategy = create_multi_worker_strategy("torus", grid_shape="2x2")
      >>> with strategy.scope():
      ...     model = build_model(); model.compile(...)
      >>> with explain_worker_failures(strategy):
      ...     model.fit(dataset, epochs=..., callbacks=strategy_handle(strategy).callbacks())
    """
    _tf_compat.check_versions()
    auto = algorithm == "auto"
    if auto and (grid_shape is not None or devices_per_node is not None):
        raise ValueError(
            "Arguments `grid_shape` and `devices_per_node` do not apply to algorithm='auto' (it picks them). "
            f"Received: grid_shape={grid_shape!r}, devices_per_node={devices_per_node!r}"
        )
    algorithm = algorithm if auto else algorithms.canonical_name(algorithm)
    compression = packing.validate_compression(compression)
    timeout_seconds = validation.check_timeout("timeout_seconds", timeout_seconds)
    validation.check_non_negative_int("bytes_per_pack", bytes_per_pack)
    devices_per_worker = _devices_per_worker_from_env(devices_per_worker)
    info = None
    if cluster_resolver is None:
        info = cluster_lib.cluster_from_environment()
        if info is None or info.num_workers < 2:
            raise ValueError(
                "create_multi_worker_strategy needs a cluster of >= 2 workers from TF_CONFIG, "
                "Open MPI (OMPI_COMM_WORLD_*) or SLURM (SLURM_*); none was found. Start the "
                "workers with `python -m tfscale.launch --num_workers N -- ...`, or use "
                "tfscale.distribute.create_strategy for one process."
            )
        if info.source != "TF_CONFIG":
            cluster_resolver = cluster_lib.make_cluster_resolver(info)
    num_gpus = len(tf.config.list_physical_devices("GPU"))
    per_worker = devices_per_worker or (num_gpus if num_gpus else 1)
    params, choice, runtime_all_reduce = {}, None, False
    if auto:
        addresses = info.workers if info is not None else _addresses(cluster_resolver)
        choice = _choose(addresses, per_worker, gradient_bytes, calibration_file, bytes_per_pack, compression,
                         small_pack_bytes)
        algorithm, params = choice.algorithm, dict(choice.params)
        if algorithm == "collective":  # MWMS's own flat all-reduce (installed below, after the strategy exists)
            algorithm, runtime_all_reduce = "flat", True
        grid_shape = params.pop("grid_shape", None)
        devices_per_node = params.pop("devices_per_node", None)
        if info is None or info.rank == 0:
            print(choice.describe(), flush=True)
    # Validate the grid before starting the gRPC server, so a mistake costs nothing.
    if info is not None:
        total = info.num_workers * per_worker
        if algorithm == "hierarchical" and devices_per_node is None:
            # A node is a host (or an emulated node): the workers that share one address, as `auto` finds them.
            # One node per worker instead would make every inter-node group the whole cluster: a flat all-reduce.
            devices_per_node = (cluster_lib.worker_nodes(info.workers) or 1) * per_worker
        algorithms.build_schedule(algorithm, total, grid_shape=grid_shape, devices_per_node=devices_per_node,
                                  **params)
    use_cpu_devices = devices_per_worker is not None and devices_per_worker > 1 and not num_gpus
    if use_cpu_devices:
        _ensure_cpu_devices(devices_per_worker)
    _tf_compat.apply_keras_multi_worker_fixes()
    # The timeout each collective carries itself (tfscale's and MWMS's own); None leaves it to the watchdog.
    collective_timeout = timeout_seconds if per_collective_timeout else None
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=collective_timeout)
    if use_cpu_devices:
        with _tf_compat.multi_worker_local_devices(devices_per_worker):
            strategy = tf.distribute.MultiWorkerMirroredStrategy(
                cluster_resolver=cluster_resolver, communication_options=options
            )
    else:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=cluster_resolver, communication_options=options
        )
    local_devices = tuple(strategy.extended.worker_devices)
    if devices_per_worker is not None and len(local_devices) != devices_per_worker:
        raise ValueError(
            f"devices_per_worker={devices_per_worker} but this worker has {len(local_devices)} "
            f"replica devices {list(local_devices)}; expose exactly {devices_per_worker} GPUs "
            "(CUDA_VISIBLE_DEVICES) per worker."
        )
    resolver = strategy.cluster_resolver
    workers = _tf_compat.num_workers(strategy)
    _STRATEGIES_CREATED[0] += 1
    reducer = MultiWorkerAllReduce(
        algorithm, local_devices, worker_rank=_worker_rank(resolver), num_workers=workers,
        grid_shape=grid_shape, devices_per_node=devices_per_node, bytes_per_pack=bytes_per_pack,
        compression=compression, timeout_seconds=collective_timeout,
        key_base=_KEY_STRIDE * _STRATEGIES_CREATED[0], small_pack_bytes=small_pack_bytes, **params,
    )
    _tf_compat.install_all_reduce(strategy, reducer)
    handle_lib.attach(strategy, handle_lib.StrategyHandle(
        algorithm=algorithm, num_replicas=strategy.num_replicas_in_sync,
        cross_device_ops=_tf_compat.cross_device_ops(strategy), all_reduce=reducer,
        watchdog=watchdog_lib.CollectiveWatchdog(timeout_seconds), auto_choice=choice,
        worker_rank=reducer.worker_rank, num_workers=workers))
    if runtime_all_reduce:
        use_all_reduce(strategy, None)
        handle_lib.strategy_handle(strategy).algorithm = "collective"
    return strategy


INTER_NODE_BANDWIDTH_ENV = "TFSCALE_INTER_NODE_BANDWIDTH"
"""Environment variable with the network bandwidth of a node (e.g. ``400mbit``), set by emulated clusters."""


def _addresses(cluster_resolver):
    spec = cluster_resolver.cluster_spec().as_dict()
    return tuple(spec.get("chief", [])) + tuple(spec.get("worker", []))


def _choose(addresses, per_worker, gradient_bytes, calibration_file, bytes_per_pack, compression, small_pack_bytes):
    """`all_reduce="auto"` across processes: the topology of the cluster, priced by the planner."""
    from tfscale import planning  # noqa: PLC0415 (pure Python)

    workers_per_node = cluster_lib.worker_nodes(addresses)
    source = "hosts of the cluster spec"
    if workers_per_node is None:
        workers_per_node, source = 1, "hosts not contiguous or uneven: a node per worker"
    bandwidth = os.environ.get(INTER_NODE_BANDWIDTH_ENV, "").strip()
    topology = planning.Topology(
        num_ranks=len(addresses) * per_worker, ranks_per_node=workers_per_node * per_worker, kind="processes",
        inter_node_bandwidth_bytes_per_s=cluster_lib.parse_bandwidth(bandwidth) if bandwidth else None,
        source=source)
    calibration = planning.load_calibration(calibration_file) if calibration_file else None
    return planning.choose_all_reduce(
        topology, gradient_bytes or planning.Workload().gradient_bytes, calibration,
        bytes_per_pack=bytes_per_pack, compression=compression, small_pack_bytes=small_pack_bytes)


def use_all_reduce(strategy, all_reduce):
    """Switches the all-reduce of an MWMS built by `create_multi_worker_strategy`.

    Takes effect for functions traced afterwards (a ``tf.function`` traced before keeps
    the all-reduce it was traced with). Used by the benchmark to time several algorithms
    and MWMS's own ``CollectiveAllReduce`` in one process.

    Args:
      strategy: a `tf.distribute.MultiWorkerMirroredStrategy` from
        `create_multi_worker_strategy`.
      all_reduce: a `MultiWorkerAllReduce` built for this strategy's devices (with its
        own `key_base`, the same on every worker), or None for MWMS's own all-reduce.

    Raises:
      TypeError: if `strategy` is not an MWMS or `all_reduce` is neither None nor a
        `MultiWorkerAllReduce`.
    """
    if all_reduce is not None and not isinstance(all_reduce, MultiWorkerAllReduce):
        raise TypeError(
            "Argument `all_reduce` must be a MultiWorkerAllReduce or None. "
            f"Received: all_reduce={all_reduce!r}"
        )
    _tf_compat.install_all_reduce(strategy, all_reduce)
    handle = handle_lib.strategy_handle(strategy)
    if handle is not None:
        handle.all_reduce = all_reduce


def leave_cluster(strategy, timeout_seconds=60.0, chief_grace_seconds=1.0):
    """Every worker waits for the others at the end of a job, and the chief leaves last.

    Without it, a chief that finishes first (it exits while a peer still evaluates, or right after writing its
    results) takes the cluster's coordination service with it, and every other worker prints TensorFlow's
    "Socket closed" / heartbeat error tracebacks from its background threads after a successful run. With it, all
    workers meet at a barrier of the coordination service; then the chief waits `chief_grace_seconds` so that the
    others, which have nothing left to do, exit before it. Stop every other user of the coordination service first
    (`tfscale.training.PreemptionCallback.close`).

    A no-op (returns True at once) for a one-process strategy. Call it once per process, at the end.

    Args:
      strategy: the job's `tf.distribute.Strategy` (an MWMS from `create_multi_worker_strategy`/`create_strategy`,
        or any one-process strategy).
      timeout_seconds: float > 0, seconds to wait at the barrier for the slowest worker; default 60.
      chief_grace_seconds: float >= 0, seconds the chief waits after the barrier; default 1.

    Returns:
      bool: True when every worker arrived; False when the barrier failed or timed out (a one-line warning on
      stderr names the error; the job's own results are not affected, so nothing is raised).

    Raises:
      ValueError: if `timeout_seconds` <= 0 or `chief_grace_seconds` < 0.
    """
    if not timeout_seconds or timeout_seconds <= 0:
        raise ValueError(f"Argument `timeout_seconds` must be > 0. Received: timeout_seconds={timeout_seconds!r}")
    if chief_grace_seconds is None or chief_grace_seconds < 0:
        raise ValueError("Argument `chief_grace_seconds` must be >= 0. "
                         f"Received: chief_grace_seconds={chief_grace_seconds!r}")
    if (not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            or _tf_compat.num_workers(strategy) <= 1):
        return True
    handle = handle_lib.strategy_handle(strategy)
    rank = getattr(handle, "worker_rank", None)
    if rank is None:
        rank = _worker_rank(strategy.cluster_resolver)
    try:
        _tf_compat.wait_at_barrier("tfscale_leave_cluster", timeout_seconds)
    except tf.errors.OpError as err:
        print(f"WARNING: worker {rank}: not every worker reached the end of the job within {timeout_seconds:g} s "
              f"({type(err).__name__}: {failures_lib._summarize_error(err)}); leaving anyway.", file=sys.stderr,
              flush=True)
        return False
    if rank == 0:
        time.sleep(chief_grace_seconds)
    return True
