"""tfscale.training: the pieces `scripts/train.py` puts together around Keras `model.fit`.

Callbacks (images/s, BN population statistics), batch-size control (Mikami et al., arXiv:1811.05233) and the
run's `results.json`.
"""

from tfscale.training.backup import SafeBackupAndRestore
from tfscale.training.backup import TrainingPreempted
from tfscale.training.batch_size_control import BatchSizeSchedule
from tfscale.training.batch_size_control import fit_with_batch_schedule
from tfscale.training.bn_statistics import RecomputeBatchNormStatistics
from tfscale.training.preemption import PreemptionCallback
from tfscale.training.callbacks import ReleaseValidationIterator
from tfscale.training.callbacks import ThroughputCallback
from tfscale.training.evaluation import evaluate_top_k
from tfscale.training.results import write_results

__all__ = [
    "BatchSizeSchedule",
    "PreemptionCallback",
    "RecomputeBatchNormStatistics",
    "ReleaseValidationIterator",
    "SafeBackupAndRestore",
    "ThroughputCallback",
    "TrainingPreempted",
    "evaluate_top_k",
    "fit_with_batch_schedule",
    "write_results",
]
