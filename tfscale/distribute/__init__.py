"""tfscale.distribute: all-reduce algorithms as schedules, run by interchangeable backends.

The data flow of one gradient all-reduce:

* `algorithms`: the registry. An algorithm (``torus``, ``hierarchical``,
  ``halving_doubling``, ``flat``/``ring``, or yours, via `register_algorithm`) is a
  TensorFlow-free `Schedule`: phases of reduce-scatter / all-reduce / all-gather / reduce /
  broadcast over groups of ranks, built from the rank count and the topology (`topology`).
  The planner (`tfscale.planning`) prices the same schedules.
* `packing`: tensor fusion and fp16/bf16 wire compression.
* Backends run any schedule on the packs: in one process (`local.ScheduledAllReduce`, a
  `tf.distribute.CrossDeviceOps` built on `primitives`; `TorusAllReduce` and
  `HierarchicalAllReduce` are its named forms), and across processes on TF's collective
  runtime (`collective.MultiWorkerAllReduce`, installed by `create_multi_worker_strategy`), and
  one Horovod process per rank (`tfscale.distribute.horovod`, imported only on demand: it needs
  the environment of ``tools/setup_horovod_env.sh``). The two multi-process backends share one
  per-rank phase walker (`rank_schedule`).
* `create_strategy` turns a name into a ready strategy; `strategy_handle` returns what
  tfscale attached to it. `cluster` resolves the cluster, `watchdog` and `failures` handle
  dead or hung workers. Every private TF/Keras API is in `_tf_compat`.

Names are imported lazily: `tfscale.distribute.algorithms`, `topology` and `validation`
import without TensorFlow.
"""

import importlib

# Public name -> module of tfscale.distribute that defines it.
_EXPORTS = {
    "ALGORITHMS": "strategy",
    "COMPRESSIONS": "packing",
    "ClusterInfo": "cluster",
    "CollectiveWatchdog": "watchdog",
    "DEFAULT_BYTES_PER_PACK": "local",
    "Grid": "topology",
    "HierarchicalAllReduce": "local",
    "IN_PROCESS_BYTES_PER_PACK": "local",
    "LocalAllReduce": "local",
    "MULTI_WORKER_BYTES_PER_PACK": "collective",
    "MultiWorkerAllReduce": "collective",
    "PackSpec": "packing",
    "Phase": "algorithms",
    "Schedule": "algorithms",
    "ScheduledAllReduce": "local",
    "StrategyHandle": "handle",
    "TorusAllReduce": "local",
    "WorkerFailureError": "failures",
    "accumulation_dtype": "packing",
    "algorithm_names": "strategy",
    "build_schedule": "algorithms",
    "cluster_from_environment": "cluster",
    "compress": "packing",
    "configure_logical_devices": "strategy",
    "create_cross_device_ops": "strategy",
    "create_multi_worker_strategy": "multi_worker",
    "create_strategy": "strategy",
    "decompress": "packing",
    "explain_worker_failures": "failures",
    "factor_grid": "topology",
    "get_cross_device_ops": "handle",
    "in_multi_worker_environment": "multi_worker",
    "leave_cluster": "multi_worker",
    "node_groups": "topology",
    "pack": "packing",
    "parse_grid_shape": "topology",
    "parse_tf_config": "cluster",
    "register_algorithm": "algorithms",
    "strategy_handle": "handle",
    "unpack": "packing",
    "use_all_reduce": "multi_worker",
    "validate_compression": "packing",
    "worker_backup_dir": "failures",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"tfscale.distribute.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'tfscale.distribute' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
