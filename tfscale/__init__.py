"""tfscale: train image classifiers with very large batches on many devices, from Keras `model.fit`.

Subpackages (the data flow):

* `tfscale.data`: ImageNet-format TFRecords and the TPU-reference input pipeline (Ying et al., arXiv:1811.06992).
* `tfscale.models`: ResNet v1.5 and small-image ResNets with a pluggable normalisation layer.
* `tfscale.layers`: group-synchronised batch normalisation and BN statistics recomputation.
* `tfscale.distribute`: 2D-torus and hierarchical all-reduce (Mikami et al., arXiv:1811.05233; Ying et al.).
* `tfscale.optimizers`: LARS, RMSprop warm-up and the learning-rate schedules of the large-batch papers.
* `tfscale.training`: callbacks, batch-size control and results for `scripts/train.py`.
* `tfscale.planning`: an alpha-beta cost model of all-reduce at scale (pure Python).

Names are imported lazily, so `import tfscale.planning` does not import TensorFlow.
"""

import importlib

__version__ = "0.1.0"

_SUBPACKAGES = ("data", "distribute", "layers", "models", "optimizers", "planning", "training")
# The most used names, re-exported at the top level: name -> subpackage.
_EXPORTS = {
    "create_strategy": "distribute",
    "TorusAllReduce": "distribute",
    "HierarchicalAllReduce": "distribute",
    "DistributedBatchNormalization": "layers",
    "recompute_batch_norm_statistics": "layers",
    "LARS": "optimizers",
    "RMSpropWarmup": "optimizers",
    "imagenet_dataset": "data",
}

__all__ = [
    "DistributedBatchNormalization",
    "HierarchicalAllReduce",
    "LARS",
    "RMSpropWarmup",
    "TorusAllReduce",
    "__version__",
    "create_strategy",
    "data",
    "distribute",
    "imagenet_dataset",
    "layers",
    "models",
    "optimizers",
    "planning",
    "recompute_batch_norm_statistics",
    "training",
]


def __getattr__(name):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"tfscale.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"tfscale.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'tfscale' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
