"""tfscale.layers: Keras layers and layer utilities for large-batch, many-replica training.

- `DistributedBatchNormalization`: batch normalisation over groups of replicas
  (Ying et al., arXiv:1811.06992).
- `recompute_batch_norm_statistics`: BN without moving averages, exact population
  statistics after training (Akiba et al., arXiv:1711.04325).
"""

from tfscale.layers.batch_norm import DistributedBatchNormalization
from tfscale.layers.bn_statistics import recompute_batch_norm_statistics

__all__ = [
    "DistributedBatchNormalization",
    "recompute_batch_norm_statistics",
]
