"""tfscale.distribute: 2D-torus and hierarchical all-reduce for `tf.distribute`.

Topology (`topology`) and fusion/compression (`packing`) are shared by the one-process
`tf.distribute.CrossDeviceOps` (`TorusAllReduce`, `HierarchicalAllReduce`, built on the
primitives of `local`) and the multi-process collectives. `create_strategy` turns an
algorithm name into a ready `MirroredStrategy`.
"""

from tfscale.distribute.cluster import ClusterInfo
from tfscale.distribute.cluster import cluster_from_environment
from tfscale.distribute.cluster import parse_tf_config
from tfscale.distribute.collective import MultiWorkerAllReduce
from tfscale.distribute.collective import WorkerFailureError
from tfscale.distribute.collective import create_multi_worker_strategy
from tfscale.distribute.collective import explain_worker_failures
from tfscale.distribute.collective import in_multi_worker_environment
from tfscale.distribute.collective import use_all_reduce
from tfscale.distribute.collective import worker_backup_dir
from tfscale.distribute.hierarchical import HierarchicalAllReduce
from tfscale.distribute.local import DEFAULT_BYTES_PER_PACK
from tfscale.distribute.local import LocalAllReduce
from tfscale.distribute.packing import COMPRESSIONS
from tfscale.distribute.packing import PackSpec
from tfscale.distribute.packing import accumulation_dtype
from tfscale.distribute.packing import compress
from tfscale.distribute.packing import decompress
from tfscale.distribute.packing import pack
from tfscale.distribute.packing import unpack
from tfscale.distribute.packing import validate_compression
from tfscale.distribute.strategy import ALGORITHMS
from tfscale.distribute.strategy import configure_logical_devices
from tfscale.distribute.strategy import create_cross_device_ops
from tfscale.distribute.strategy import create_strategy
from tfscale.distribute.topology import Grid
from tfscale.distribute.topology import factor_grid
from tfscale.distribute.topology import node_groups
from tfscale.distribute.topology import parse_grid_shape
from tfscale.distribute.topology import shard_bounds
from tfscale.distribute.torus import TorusAllReduce
from tfscale.distribute.watchdog import CollectiveWatchdog

__all__ = [
    "ALGORITHMS",
    "COMPRESSIONS",
    "ClusterInfo",
    "CollectiveWatchdog",
    "DEFAULT_BYTES_PER_PACK",
    "Grid",
    "HierarchicalAllReduce",
    "LocalAllReduce",
    "MultiWorkerAllReduce",
    "PackSpec",
    "TorusAllReduce",
    "WorkerFailureError",
    "accumulation_dtype",
    "cluster_from_environment",
    "compress",
    "configure_logical_devices",
    "create_cross_device_ops",
    "create_multi_worker_strategy",
    "create_strategy",
    "decompress",
    "explain_worker_failures",
    "factor_grid",
    "in_multi_worker_environment",
    "node_groups",
    "pack",
    "parse_grid_shape",
    "parse_tf_config",
    "shard_bounds",
    "unpack",
    "use_all_reduce",
    "validate_compression",
    "worker_backup_dir",
]
