"""The Horovod backend: tfscale's all-reduce schedules over Horovod process sets, and a Keras 3 ``fit`` that averages.

The third backend of the schedule registry (`tfscale.distribute.algorithms`), beside one process
(`tfscale.distribute.local`) and TF's collective runtime (`tfscale.distribute.collective`). Each Horovod process
is one rank; `HorovodAllReduce` walks the phases of the same registered `Schedule` (``flat``/``ring``, ``torus``,
``hierarchical``, ``halving_doubling``, or one you register) with `rank_schedule.run_rank_schedule`, the walker the
TF-collective backend uses too, and makes each phase's collective over the Horovod process set of its group:

* ``reduce_scatter``: ``hvd.reducescatter`` (Sum) of the pack cut into ``k`` equal chunks (bf16 compression:
  ``hvd.alltoall`` of the chunks bit-cast to int16 and a local float32 sum; Horovod has no bfloat16);
* ``all_gather``: ``hvd.allgather`` (bf16 bit-cast to int16);
* ``all_reduce`` and ``reduce`` (the fold of a non-power-of-two halving-doubling, the leader form of hierarchical):
  ``hvd.allreduce`` (Sum) over the group's process set; ``broadcast``: ``hvd.broadcast`` from the root.

So the 2D torus (Mikami et al., arXiv:1811.05233) runs as a reduce-scatter over each row's process set, an
all-reduce over each column's and an all-gather over each row's; the hierarchical schedule (Jia et al.,
arXiv:1807.11205) over node process sets (``devices_per_node`` defaults to Horovod's local size, the ranks of one
host). Horovod's own ``HOROVOD_TORUS_ALLREDUCE`` / ``HOROVOD_HIERARCHICAL_ALLREDUCE`` act only in NCCL GPU builds;
these run on CPU (Gloo) and GPU alike. Gradients are fused into packs of about `bytes_per_pack` bytes
(`packing.pack`, default 32 MiB) and may travel as float16 / bfloat16 (`compression`; sums in float32): the error
bound is `rank_schedule`'s, ``|S_hat - S| <= 3 u sum_i |x_i|`` for the torus and hierarchical schedules (``u =
2**-11`` fp16, ``2**-8`` bf16).

Keras 3 integration (Horovod's own is broken there: under ``model.fit`` ``hvd.DistributedOptimizer`` never
averages, and ``BroadcastGlobalVariablesCallback`` crashes; docs/horovod.md):

* `distribute_optimizer` makes an optimizer average its gradients over all ranks with the schedule before every
  update, at ``optimizer.apply``, which Keras 3's ``fit`` calls (``apply_gradients`` -> ``apply``); it works for
  any Keras optimizer (SGD, tfscale's LARS, a ``LossScaleOptimizer``);
* `BroadcastVariablesCallback` copies rank 0's model and optimizer variables to every rank when training starts
  (`broadcast_variables`);
* `MetricAverageCallback` averages the epoch's logged metrics over the ranks;
* `init` also installs the ranks for `tfscale.layers.DistributedBatchNormalization` (`tfscale._cross_replica`):
  a group of ``G`` contiguous ranks sums its statistics over its own process set.

Use (under ``horovodrun -np 4 -H localhost:4 --gloo python train.py``)::

    from tfscale.distribute import horovod as thvd
    all_reduce = thvd.init("torus", grid_shape="2x2", bn_group_size=2)   # hvd.init with the process sets
    model.compile(optimizer=thvd.distribute_optimizer(keras.optimizers.SGD(0.1), all_reduce), loss=...)
    model.fit(dataset_sharded_by_rank, callbacks=thvd.callbacks(all_reduce), verbose=2 if thvd.rank() == 0 else 0)

Horovod 0.28.1, the newest release, builds only against TensorFlow 2.14-2.18 (Gloo, no MPI); tfscale's default
environment uses a newer TensorFlow, so Horovod lives in its own environment: ``bash tools/setup_horovod_env.sh``
builds ``.venv-horovod`` (tensorflow-cpu 2.18.1, Horovod 0.28.1 with Gloo). Importing this module does not import
Horovod; the first function that needs it raises `HorovodUnavailableError` (an ImportError) saying so.
"""

import os
import threading
import weakref
import zlib

import keras
import tensorflow as tf

from tfscale import _cross_replica
from tfscale.distribute import algorithms
from tfscale.distribute import packing
from tfscale.distribute import rank_schedule
from tfscale.distribute import topology
from tfscale.distribute import validation

__all__ = [
    "HOROVOD_BYTES_PER_PACK",
    "HOROVOD_SUPPORTED_TF_VERSIONS",
    "HOROVOD_VERSION",
    "BroadcastVariablesCallback",
    "HorovodAllReduce",
    "HorovodReplicaContext",
    "HorovodUnavailableError",
    "MetricAverageCallback",
    "broadcast_variables",
    "averaging_all_reduce",
    "callbacks",
    "distribute_optimizer",
    "import_horovod",
    "init",
    "init_process_sets",
    "rank",
    "required_groups",
    "size",
]

HOROVOD_VERSION = "0.28.1"
"""The Horovod release tfscale's Horovod environment builds (the newest; development has stopped)."""

HOROVOD_SUPPORTED_TF_VERSIONS = ("2.14", "2.15", "2.16", "2.17", "2.18")
"""TensorFlow ``major.minor`` versions Horovod 0.28.1 builds against (2.19+ fail in ``xla_mpi_ops.cc``)."""

HOROVOD_BYTES_PER_PACK = 32 * 1024 * 1024
"""Default fusion threshold across Horovod processes, bytes (32 MiB, as across TF workers)."""

DEFAULT_SMALL_PACK_BYTES = 1024 * 1024
"""Packs below 1 MiB run the schedule's small-message variant (`Schedule.for_small_messages`)."""

INSTALL_HINT = (
    f"tfscale's Horovod backend needs Horovod {HOROVOD_VERSION} built with Gloo against TensorFlow "
    f"{HOROVOD_SUPPORTED_TF_VERSIONS[0]}-{HOROVOD_SUPPORTED_TF_VERSIONS[-1]} (Horovod does not build against "
    "TensorFlow 2.19 or newer). Build that environment with `bash tools/setup_horovod_env.sh` (it creates "
    ".venv-horovod with tensorflow-cpu 2.18.1 and Horovod 0.28.1, about 5-10 minutes the first time), then run "
    "`.venv-horovod/bin/horovodrun -np 4 -H localhost:4 --gloo .venv-horovod/bin/python scripts/train.py "
    "--backend=horovod`. See docs/horovod.md."
)


class HorovodUnavailableError(ImportError):
    """Horovod is not installed, not built with TensorFlow and Gloo, or this TensorFlow is one it cannot build
    against; the message says how to build the environment (`INSTALL_HINT`)."""


_HVD = []


def import_horovod():
    """Imports and returns ``horovod.tensorflow`` (once).

    Returns:
      The ``horovod.tensorflow`` module.

    Raises:
      HorovodUnavailableError: (an ImportError) if TensorFlow is not a version Horovod 0.28.1 builds against, or
        Horovod is missing or was built without TensorFlow; the message gives the one command that builds the
        environment (`INSTALL_HINT`).
    """
    if _HVD:
        return _HVD[0]
    tf_minor = ".".join(tf.__version__.split(".")[:2])
    try:
        import horovod.tensorflow as hvd  # noqa: PLC0415 - imported only on demand
    except ImportError as err:
        raise HorovodUnavailableError(
            f"Horovod is not available in this environment ({err}; TensorFlow {tf.__version__}). {INSTALL_HINT}"
        ) from err
    except Exception as err:  # noqa: BLE001 - a Horovod built against another TF fails to load its library
        raise HorovodUnavailableError(
            f"Horovod could not be loaded ({type(err).__name__}: {err}); it must be built against the installed "
            f"TensorFlow {tf.__version__}. {INSTALL_HINT}"
        ) from err
    if tf_minor not in HOROVOD_SUPPORTED_TF_VERSIONS:
        raise HorovodUnavailableError(
            f"TensorFlow {tf.__version__} is not one Horovod {HOROVOD_VERSION} builds against. {INSTALL_HINT}"
        )
    _HVD.append(hvd)
    return hvd


def _env_int(names, default):
    for name in names:
        if os.environ.get(name, "").strip().isdigit():
            return int(os.environ[name])
    return default


def rank():
    """int: this process's Horovod rank (0 before `init` when not launched by horovodrun/mpirun)."""
    hvd = import_horovod()
    if hvd.is_initialized():
        return hvd.rank()
    return _env_int(("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"), 0)


def size():
    """int: the number of Horovod processes (from the launcher's environment before `init`)."""
    hvd = import_horovod()
    if hvd.is_initialized():
        return hvd.size()
    return _env_int(("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"), 1)


def _local_size():
    hvd = import_horovod()
    if hvd.is_initialized():
        return hvd.local_size()
    return _env_int(("HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"), size())


def _schedules(algorithm, num_ranks, grid_shape=None, devices_per_node=None, **params):
    name = algorithms.canonical_name(algorithm)
    if name == "hierarchical" and devices_per_node is None:
        devices_per_node = _local_size() if num_ranks % max(1, _local_size()) == 0 else None
    schedule = algorithms.build_schedule(name, num_ranks, grid_shape=grid_shape,
                                         devices_per_node=devices_per_node, **params)
    return schedule, schedule.for_small_messages()


def _bn_groups(num_ranks, bn_group_size):
    if not bn_group_size or bn_group_size in (1, num_ranks):
        return []
    bn_group_size = validation.check_positive_int("bn_group_size", bn_group_size)
    if num_ranks % bn_group_size:
        raise ValueError(
            f"Argument `bn_group_size` must divide the number of Horovod ranks ({num_ranks}). "
            f"Received: bn_group_size={bn_group_size}"
        )
    return [tuple(g) for g in topology.node_groups(num_ranks, bn_group_size)]


def required_groups(num_ranks, algorithm="flat", bn_group_size=None, grid_shape=None, devices_per_node=None,
                    **params):
    """The process sets (sorted rank tuples) that a schedule and group BN need, besides the global one.

    Args:
      num_ranks: int >= 1, the number of Horovod processes.
      algorithm: a registered all-reduce name or alias (`tfscale.distribute.algorithms.algorithm_names`).
      bn_group_size: None, or an int dividing `num_ranks`: the ranks per `DistributedBatchNormalization` group.
      grid_shape, devices_per_node, **params: the algorithm's topology parameters (see `HorovodAllReduce`).

    Returns:
      list of tuples of int ranks, sorted, without duplicates and without the group of all ranks.

    Raises:
      ValueError: for an unknown algorithm, a topology that does not fit `num_ranks`, or a `bn_group_size` that
        does not divide it.
    """
    num_ranks = validation.check_positive_int("num_ranks", num_ranks)
    groups = []
    for sched in _schedules(algorithm, num_ranks, grid_shape=grid_shape, devices_per_node=devices_per_node,
                            **params):
        for phase in sched.phases:
            groups += [tuple(sorted(g)) for g in phase.groups]
    groups += _bn_groups(num_ranks, bn_group_size)
    world = tuple(range(num_ranks))
    out = []
    for g in groups:
        if g != world and g not in out:
            out.append(g)
    return out


class _CallNamer:
    """Names for Horovod collectives that are the same on every rank and unique among those in flight at once.

    Horovod matches the collectives of the ranks by name. Inside a ``tf.function`` the n-th call made while
    tracing a graph is named by n, counted per graph, so a graph traced again (Keras retraces for a new input
    shape, maybe on some ranks only) reuses the names of the same call sites; eager calls are counted in program
    order. `signature` (e.g. the shapes and dtypes) is folded in with a stable checksum.
    """

    def __init__(self):
        self._graphs = weakref.WeakKeyDictionary()
        self._eager = 0
        self._lock = threading.Lock()

    def __call__(self, base, signature=""):
        with self._lock:
            if tf.inside_function():
                graph = tf.compat.v1.get_default_graph()
                n = self._graphs.get(graph, 0) + 1
                self._graphs[graph] = n
                where = f"g{n}"
            else:
                self._eager += 1
                where = f"e{self._eager}"
        return f"{base}_{where}_{zlib.crc32(str(signature).encode()):08x}_"


_PROCESS_SETS = {}  # sorted rank tuple -> hvd.ProcessSet, the ones tfscale registered (or the global one)
_PS_LOCK = threading.Lock()


def _process_set(hvd, ranks):
    """The registered process set of `ranks` (sorted tuple)."""
    if ranks == tuple(range(hvd.size())):
        return hvd.global_process_set
    with _PS_LOCK:
        ps = _PROCESS_SETS.get(ranks)
    if ps is None or ps.process_set_id is None:
        raise RuntimeError(
            f"Horovod has no process set for ranks {list(ranks)}. Initialise Horovod with tfscale's "
            "`tfscale.distribute.horovod.init(...)` (it passes the process sets a schedule needs to hvd.init), "
            "or run with HOROVOD_DYNAMIC_PROCESS_SETS=1 so that they can be added after hvd.init."
        )
    return ps


def init_process_sets(groups):
    """Initialises Horovod with `groups` as static process sets, or adds the missing ones to a running Horovod.

    `init` calls it with `required_groups`; call it yourself to register the groups of several schedules at once
    (e.g. to build several `HorovodAllReduce` objects). Every rank must call it with the same groups, in the
    same order.

    Args:
      groups: iterable of sequences of int ranks (each sorted into a tuple); duplicates and the group of all
        ranks (Horovod's global process set) are skipped.

    Raises:
      HorovodUnavailableError: without a usable Horovod.
      RuntimeError: if Horovod is already initialised without some of these sets and
        ``HOROVOD_DYNAMIC_PROCESS_SETS=1`` is not set (then they cannot be added).
    """
    hvd = import_horovod()
    world = tuple(range(size()))
    unique = []
    for g in groups:
        g = tuple(sorted(validation.as_int("rank", r) for r in g))
        if g != world and g not in unique:
            unique.append(g)
    _ensure_process_sets(hvd, unique)


def _ensure_process_sets(hvd, groups):
    """Initialises Horovod with `groups` as static process sets, or adds the missing ones dynamically."""
    with _PS_LOCK:
        if not hvd.is_initialized():
            sets = [hvd.ProcessSet(list(g)) for g in groups]
            hvd.init(process_sets=sets)
            for g, ps in zip(groups, sets):
                _PROCESS_SETS[g] = ps
            return
        missing = [g for g in groups if g not in _PROCESS_SETS and g != tuple(range(hvd.size()))]
        if not missing:
            return
        if os.environ.get("HOROVOD_DYNAMIC_PROCESS_SETS", "0") in ("", "0"):
            raise RuntimeError(
                f"Horovod is already initialised without the process sets {[list(g) for g in missing]} that this "
                "schedule needs. Call tfscale.distribute.horovod.init(...) instead of hvd.init() (it registers "
                "them), or run with HOROVOD_DYNAMIC_PROCESS_SETS=1."
            )
        for g in missing:  # Collective: every rank adds the same sets in the same order.
            _PROCESS_SETS[g] = hvd.add_process_set(list(g))


class HorovodReplicaContext(_cross_replica.ProcessReplicaContext):
    """The Horovod ranks as replicas for `tfscale.layers.DistributedBatchNormalization` (installed by `init`).

    ``all_reduce`` is ``hvd.allreduce`` (Sum) over all ranks, ``group_all_reduce`` over the process set of this
    rank's group of ``group_size`` contiguous ranks; both are differentiable (Horovod registers the gradient of
    an all-reduce as the all-reduce of the gradient over the same process set).

    Args:
      hvd: the initialised ``horovod.tensorflow`` module.
    """

    def __init__(self, hvd):
        self._hvd = hvd
        self.num_replicas_in_sync = hvd.size()
        self.replica_id_in_sync_group = hvd.rank()
        self._names = _CallNamer()

    def _name(self, what, value):
        return self._names(f"tfscale_bn_{what}", (value.shape, value.dtype.name))

    def all_reduce(self, reduce_op, value):
        if str(getattr(reduce_op, "value", reduce_op)).lower() != "sum":
            raise ValueError(f"Argument `reduce_op` must be SUM. Received: reduce_op={reduce_op!r}")
        return self._hvd.allreduce(value, op=self._hvd.Sum, name=self._name("all", value), ignore_name_scope=True)

    def group_all_reduce(self, value, group_size):
        n = self.num_replicas_in_sync
        if group_size == n:
            return self.all_reduce("sum", value)
        start = self.replica_id_in_sync_group // group_size * group_size
        ps = _process_set(self._hvd, tuple(range(start, start + group_size)))
        return self._hvd.allreduce(value, op=self._hvd.Sum, name=self._name(f"g{group_size}", value),
                                   ignore_name_scope=True, process_set=ps)


def init(algorithm="flat", grid_shape=None, devices_per_node=None, bn_group_size=None,
         bytes_per_pack=HOROVOD_BYTES_PER_PACK, compression=None, small_pack_bytes=DEFAULT_SMALL_PACK_BYTES,
         install_replicas=True, **params):
    """Initialises Horovod with the process sets of `algorithm` (and of BN groups); returns its `HorovodAllReduce`.

    Calls ``hvd.init(process_sets=[...])`` with one static process set per group of ranks that the schedule (and
    its small-message variant) or the BN groups use. If Horovod is already initialised, the missing sets are
    added with ``hvd.add_process_set`` (needs ``HOROVOD_DYNAMIC_PROCESS_SETS=1``). Every rank must call it with
    the same arguments. Also installs the ranks for `tfscale.layers.DistributedBatchNormalization`.

    Args:
      algorithm: a registered all-reduce name or alias: ``"flat"`` (alias ``"ring"``: one Horovod all-reduce),
        ``"torus"``, ``"hierarchical"``, ``"halving_doubling"``.
      grid_shape: torus: None (most square), ``"RxC"`` or ``(rows, cols)`` with ``rows * cols`` ranks.
      devices_per_node: hierarchical: ranks per node (contiguous ranks); default Horovod's local size.
      bn_group_size: None or an int dividing the number of ranks: `DistributedBatchNormalization` groups.
      bytes_per_pack: int >= 0, fusion threshold in bytes (default 32 MiB); 0 packs each dtype into one buffer.
      compression: None, ``"fp16"`` or ``"bf16"`` (aliases ``"float16"``, ``"bfloat16"``): wire dtype.
      small_pack_bytes: int >= 0 bytes: smaller packs run the small-message schedule (default 1 MiB).
      install_replicas: bool, install the ranks for the BN layers (`tfscale._cross_replica`). Default True.
      **params: further topology parameters (``intra_node``, ``inter_node`` for hierarchical).

    Returns:
      A `HorovodAllReduce`.

    Raises:
      HorovodUnavailableError: without a usable Horovod (the message says how to build it).
      ValueError: for an unknown algorithm, a topology or BN group size that does not fit the number of ranks.
      RuntimeError: if Horovod was initialised without these process sets and dynamic process sets are off.
    """
    hvd = import_horovod()
    groups = required_groups(size(), algorithm, bn_group_size=bn_group_size, grid_shape=grid_shape,
                             devices_per_node=devices_per_node, **params)
    init_process_sets(groups)
    if install_replicas:
        _cross_replica.install(HorovodReplicaContext(hvd))
    return HorovodAllReduce(algorithm, grid_shape=grid_shape, devices_per_node=devices_per_node,
                            bytes_per_pack=bytes_per_pack, compression=compression,
                            small_pack_bytes=small_pack_bytes, **params)


def _int16_bits(t):
    return tf.bitcast(t, tf.int16) if t.dtype == tf.bfloat16 else t


def _from_int16_bits(t, dtype):
    return tf.bitcast(t, tf.bfloat16) if dtype == tf.bfloat16 else t


class _HorovodCollectives(rank_schedule.RankCollectives):
    """Horovod's collectives over process sets, named ``<prefix><key>`` (the same on every rank)."""

    def __init__(self, hvd, prefix):
        self._hvd = hvd
        self._prefix = prefix

    def _set(self, group):
        ranks = tuple(sorted(group))
        return ranks, _process_set(self._hvd, ranks)

    @staticmethod
    def _order(group, ranks):
        """perm[s]: the member index of the rank at sorted position s (Horovod orders a set by rank)."""
        return [group.index(r) for r in ranks]

    def reduce_scatter(self, t, group, member, key, acc_dtype):
        k = len(group)
        chunk = int(t.shape[0]) // k
        ranks, ps = self._set(group)
        rows = tf.reshape(t, [k, chunk])
        perm = self._order(group, ranks)
        if perm != list(range(k)):  # the rank at sorted position s must receive shard perm[s]
            rows = tf.gather(rows, perm)
        name = f"{self._prefix}rs{key}"
        if t.dtype == tf.bfloat16:  # no bfloat16 in Horovod: move the bits, add locally in float32
            received = self._hvd.alltoall(_int16_bits(rows), name=name, ignore_name_scope=True, process_set=ps)
            received = _from_int16_bits(tf.reshape(received, [k, chunk]), tf.bfloat16)
            return tf.reduce_sum(tf.cast(received, acc_dtype), axis=0)
        out = self._hvd.reducescatter(tf.reshape(rows, [k * chunk]), op=self._hvd.Sum, name=name,
                                      ignore_name_scope=True, process_set=ps)
        return tf.reshape(out, [chunk])

    def all_gather(self, t, group, member, key):
        k = len(group)
        chunk = int(t.shape[0])
        ranks, ps = self._set(group)
        out = self._hvd.allgather(_int16_bits(t), name=f"{self._prefix}ag{key}", ignore_name_scope=True,
                                  process_set=ps)
        rows = tf.reshape(_from_int16_bits(out, t.dtype), [k, chunk])
        perm = self._order(group, ranks)
        if perm != list(range(k)):  # row s came from sorted position s, which holds shard perm[s]
            rows = tf.gather(rows, [perm.index(j) for j in range(k)])
        return tf.reshape(rows, [k * chunk])

    def all_reduce(self, t, group, member, key):
        _, ps = self._set(group)
        return self._hvd.allreduce(t, op=self._hvd.Sum, name=f"{self._prefix}ar{key}", ignore_name_scope=True,
                                   process_set=ps)

    def broadcast(self, t, group, member, root, key):
        # hvd.broadcast, not the default all-reduce of zeros: a Horovod op whose input is a constant would be run
        # by Grappler's constant folding on this rank alone while the graph is optimised, and never match.
        _, ps = self._set(group)
        out = self._hvd.broadcast(_int16_bits(t), group[root], name=f"{self._prefix}bc{key}",
                                  ignore_name_scope=True, process_set=ps)
        return _from_int16_bits(out, t.dtype)


class HorovodAllReduce:
    """Sums or averages dense float tensors over all Horovod ranks with a registered schedule.

    One instance per process, built after Horovod is initialised with the process sets the schedule needs (`init`
    does both). Calling it is a collective: every rank calls it with tensors of the same shapes and dtypes, in
    the same order (eagerly, or inside a ``tf.function`` traced the same way on every rank, as Keras's
    ``fit`` does). Each call fuses the tensors into packs (`packing.pack`), runs the schedule phase by phase on
    every pack (`rank_schedule.run_rank_schedule`) with Horovod collectives over process sets, and unpacks.

    Args:
      algorithm: a registered name or alias (``"flat"``/``"ring"``, ``"torus"``, ``"hierarchical"``,
        ``"halving_doubling"``); default ``"flat"``.
      grid_shape: torus only: None (most square, `topology.factor_grid`), ``"RxC"`` or ``(rows, cols)`` with
        ``rows * cols`` equal to the number of ranks.
      devices_per_node: hierarchical only: int dividing the number of ranks (contiguous ranks form a node);
        default Horovod's local size (the ranks on one host).
      bytes_per_pack: int >= 0, fusion threshold in bytes (default 32 MiB); 0 packs each dtype into one buffer.
      compression: None, ``"fp16"``/``"float16"`` or ``"bf16"``/``"bfloat16"``: the wire dtype of float32/float64
        values; sums in float32. Error bound in the module docstring.
      small_pack_bytes: int >= 0 bytes: packs below it run `Schedule.for_small_messages` (default 1 MiB; 0 off).
      name: str, prefix of the Horovod collective names (unique per instance if several are used at once).
      **params: further topology parameters (``intra_node``, ``inter_node``).

    Attributes:
      algorithm: str, the registered name.
      rank: int, this process's rank; num_ranks: int, the number of ranks.
      schedule, small_schedule: the `tfscale.distribute.algorithms.Schedule`s run on large and small packs.
      num_calls: int, how many all-reduces this object has built (each traced or eager call counts once).

    Raises:
      HorovodUnavailableError: without a usable Horovod.
      RuntimeError: if Horovod is not initialised, or lacks a process set the schedule needs.
      ValueError: for an unknown algorithm (listing the valid names), a parameter the algorithm does not take,
        a topology that does not fit the number of ranks, or an out-of-range number.
    """

    def __init__(self, algorithm="flat", grid_shape=None, devices_per_node=None,
                 bytes_per_pack=HOROVOD_BYTES_PER_PACK, compression=None,
                 small_pack_bytes=DEFAULT_SMALL_PACK_BYTES, name="tfscale", **params):
        hvd = import_horovod()
        if not hvd.is_initialized():
            raise RuntimeError("Horovod is not initialised: call tfscale.distribute.horovod.init(...) first.")
        self._hvd = hvd
        self.algorithm = algorithms.canonical_name(algorithm)
        self.rank = hvd.rank()
        self.num_ranks = hvd.size()
        self.bytes_per_pack = validation.check_non_negative_int("bytes_per_pack", bytes_per_pack)
        self.compression = packing.validate_compression(compression)
        self.small_pack_bytes = validation.check_non_negative_int("small_pack_bytes", small_pack_bytes)
        if not isinstance(name, str) or not name.replace("_", "").isalnum():
            raise ValueError(f"Argument `name` must be letters, digits and '_'. Received: name={name!r}")
        self.name = name
        self.schedule, self.small_schedule = _schedules(self.algorithm, self.num_ranks, grid_shape=grid_shape,
                                                        devices_per_node=devices_per_node, **params)
        for sched in (self.schedule, self.small_schedule):  # fail now, not inside a traced step
            for phase in sched.phases:
                for group in phase.groups:
                    if self.rank in group:
                        _process_set(hvd, tuple(sorted(group)))
        self.num_calls = 0
        self._lock = threading.Lock()
        self._names = _CallNamer()

    def __call__(self, values, average=False):
        """All-reduces this rank's `values` with every other rank's.

        Args:
          values: list of dense floating-point `tf.Tensor`s (static shapes), the same shapes and dtypes on
            every rank.
          average: bool; True divides the sums by the number of ranks (in the accumulation dtype).

        Returns:
          A list of tensors of the shapes and dtypes of `values`: the element-wise sums (or means) over ranks.

        Raises:
          ValueError: if a value is not floating point or has no static shape.
        """
        values = [tf.convert_to_tensor(v) for v in values]
        if not values:
            return []
        for i, v in enumerate(values):
            if not v.dtype.is_floating:
                raise ValueError(
                    f"HorovodAllReduce sums floating-point tensors only. Received: values[{i}] of dtype {v.dtype.name}"
                )
        with self._lock:
            self.num_calls += 1
        if self.num_ranks == 1:
            return list(values)
        packs, spec = packing.pack(values, self.bytes_per_pack)
        prefix = self._names(self.name, [(tuple(v.shape), v.dtype.name) for v in values])
        collectives = _HorovodCollectives(self._hvd, prefix)
        sums = rank_schedule.run_rank_schedules(
            packs, self.rank, self.schedule, self.small_schedule, collectives, compression=self.compression,
            small_pack_bytes=self.small_pack_bytes, key_prefixes=[f"p{p}_" for p in range(len(packs))])
        reduced = []
        for s in sums:
            if average:
                acc = packing.accumulation_dtype(s.dtype)
                s = packing.decompress(packing.decompress(s, acc) / tf.constant(self.num_ranks, acc), s.dtype)
            reduced.append(s)
        return packing.unpack(reduced, spec)


# ------------------------------------------------------------------------------------------- Keras integration
_WRAPPED = weakref.WeakKeyDictionary()


def distribute_optimizer(optimizer, all_reduce):
    """Makes `optimizer` average its gradients over all Horovod ranks before every update; returns it.

    Keras 3's ``fit`` updates through ``optimizer.apply_gradients`` -> ``optimizer.apply(grads, variables)``; this
    wraps `apply` on this optimizer object only, so that the gradients are averaged with `all_reduce` (the
    schedule, fusion and compression of a `HorovodAllReduce`) and then applied by the optimizer's own `apply`,
    unchanged. The object keeps its class, config and saved form (a model saved on rank 0 loads anywhere). Works
    for any Keras 3 optimizer, e.g. ``keras.optimizers.SGD``, `tfscale.optimizers.LARS`, and a
    ``keras.optimizers.LossScaleOptimizer`` (the scaled gradients are averaged; averaging is linear, and every
    rank then takes the same finite/non-finite decision). `IndexedSlices` gradients are densified.

    Args:
      optimizer: a `keras.optimizers.Optimizer`.
      all_reduce: a `HorovodAllReduce` (from `init`).

    Returns:
      `optimizer` itself.

    Raises:
      TypeError: if `optimizer` is not a Keras optimizer or `all_reduce` not a `HorovodAllReduce`.
    """
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(f"Argument `optimizer` must be a keras.optimizers.Optimizer. Received: {optimizer!r}")
    if not isinstance(all_reduce, HorovodAllReduce):
        raise TypeError(f"Argument `all_reduce` must be a HorovodAllReduce. Received: all_reduce={all_reduce!r}")
    if optimizer in _WRAPPED:
        _WRAPPED[optimizer] = all_reduce
        return optimizer
    _WRAPPED[optimizer] = all_reduce
    inner_apply = optimizer.apply  # the bound method of the optimizer's class

    def apply(grads, trainable_variables=None):
        reducer = _WRAPPED[optimizer]
        grads = list(grads)
        present = [i for i, g in enumerate(grads) if g is not None]
        dense = [tf.convert_to_tensor(grads[i]) for i in present]
        for i, g in zip(present, reducer(dense, average=True)):
            grads[i] = g
        return inner_apply(grads, trainable_variables)

    optimizer.apply = apply
    return optimizer


def averaging_all_reduce(optimizer):
    """Returns the `HorovodAllReduce` that `distribute_optimizer` installed on `optimizer`, or None."""
    return _WRAPPED.get(optimizer)


def broadcast_variables(variables, root_rank=0):
    """Sets every rank's `variables` to rank `root_rank`'s values (a collective; call eagerly, on every rank).

    Variables are fused by dtype into one buffer each (`packing.pack`), broadcast with ``hvd.broadcast`` and
    assigned; Horovod's own ``broadcast_variables`` / ``BroadcastGlobalVariablesCallback`` crash on Keras 3
    variables (``Variable.ref``).

    Args:
      variables: list of Keras or TF variables, the same shapes and dtypes in the same order on every rank.
      root_rank: int, the rank whose values are kept; default 0.

    Raises:
      ValueError: if `root_rank` is not a rank.
    """
    hvd = import_horovod()
    root_rank = validation.as_int("root_rank", root_rank)
    if not 0 <= root_rank < hvd.size():
        raise ValueError(f"Argument `root_rank` must be in [0, {hvd.size()}). Received: root_rank={root_rank}")
    variables = list(variables)
    if not variables or hvd.size() == 1:
        return
    values = [tf.convert_to_tensor(v.value if isinstance(v, keras.Variable) else v) for v in variables]
    packs, spec = packing.pack(values, 0)
    sent = []
    for p, x in enumerate(packs):
        bits = x
        if x.dtype == tf.bfloat16:
            bits = tf.bitcast(x, tf.int16)
        elif x.dtype == tf.bool:
            bits = tf.cast(x, tf.uint8)
        out = hvd.broadcast(bits, root_rank, name=f"{_BROADCAST_NAMES('tfscale_broadcast', spec.pack_sizes)}{p}",
                            ignore_name_scope=True)
        sent.append(tf.bitcast(out, tf.bfloat16) if x.dtype == tf.bfloat16 else tf.cast(out, x.dtype))
    for v, value in zip(variables, packing.unpack(sent, spec)):
        v.assign(value)


_BROADCAST_NAMES = _CallNamer()
_METRIC_NAMES = _CallNamer()


class BroadcastVariablesCallback(keras.callbacks.Callback):
    """Broadcasts the model's and the optimizer's variables from rank `root_rank` when training starts.

    At the first ``on_train_begin`` (later ``fit`` calls of the same run keep what the ranks computed in step)
    the optimizer is built if needed, then all model variables (trainable and not, e.g. BN moving statistics) and
    all optimizer variables (iterations, momenta) are set to rank `root_rank`'s (`broadcast_variables`). Place it
    after any callback that restores a backup in ``on_train_begin`` (so that the restored state is broadcast).

    Args:
      root_rank: int, default 0.
    """

    def __init__(self, root_rank=0):
        super().__init__()
        self.root_rank = validation.as_int("root_rank", root_rank)
        self.done = False

    def on_train_begin(self, logs=None):
        if self.done:
            return
        model = self.model
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        variables = list(model.variables)
        if model.optimizer is not None:
            variables += list(model.optimizer.variables)
        broadcast_variables(variables, self.root_rank)
        self.done = True


class MetricAverageCallback(keras.callbacks.Callback):
    """Averages the numeric entries of each epoch's logs over all ranks (in place), for logging and history.

    Place it before the callbacks that read the logs (TensorBoard, a CSV logger); Keras's ``History`` is always
    last. A collective at every epoch end: every rank must run it.
    """

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        hvd = import_horovod()
        keys = sorted(k for k, v in logs.items() if isinstance(v, (int, float)) or
                      (hasattr(v, "shape") and getattr(v, "shape", None) == ()))
        if not keys or hvd.size() == 1:
            return
        values = tf.constant([float(logs[k]) for k in keys], tf.float64)
        mean = hvd.allreduce(values, op=hvd.Average, name=_METRIC_NAMES("tfscale_metrics", keys),
                             ignore_name_scope=True).numpy()
        for k, m in zip(keys, mean):
            logs[k] = float(m)


def callbacks(all_reduce=None, root_rank=0):
    """The callbacks a Horovod ``fit`` needs: `BroadcastVariablesCallback`, then `MetricAverageCallback`.

    Args:
      all_reduce: unused (kept for symmetry with `StrategyHandle.callbacks`); may be None.
      root_rank: int, the rank whose initial state is broadcast; default 0.

    Returns:
      list of two `keras.callbacks.Callback`.
    """
    del all_reduce
    return [BroadcastVariablesCallback(root_rank), MetricAverageCallback()]
