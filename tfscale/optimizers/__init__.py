"""tfscale.optimizers: large-batch optimizers and epoch-based learning-rate schedules.

LARS (You et al., arXiv:1708.03888), RMSprop warm-up (Akiba et al., arXiv:1711.04325),
warm-up + polynomial / piecewise schedules (MLPerf; Goyal et al., arXiv:1706.02677) and the
papers' hyperparameter recipes. Independent of the other tfscale subpackages.
"""

from tfscale.optimizers.factory import OPTIMIZER_NAMES
from tfscale.optimizers.factory import SCHEDULE_NAMES
from tfscale.optimizers.factory import build_learning_rate_schedule
from tfscale.optimizers.factory import build_optimizer
from tfscale.optimizers.lars import LARS
from tfscale.optimizers.recipes import RECIPE_NAMES
from tfscale.optimizers.recipes import recipe_hyperparameters
from tfscale.optimizers.rmsprop_warmup import RMSpropWarmup
from tfscale.optimizers.rmsprop_warmup import rmsprop_blend
from tfscale.optimizers.schedules import SlowStart
from tfscale.optimizers.schedules import WarmupCosineDecay
from tfscale.optimizers.schedules import WarmupPiecewise
from tfscale.optimizers.schedules import WarmupPolynomialDecay
from tfscale.optimizers.schedules import epochs_from_steps
from tfscale.optimizers.schedules import mlperf_lars_hyperparameters
from tfscale.optimizers.schedules import normalize_steps_per_epoch
from tfscale.optimizers.schedules import scaled_learning_rate
from tfscale.optimizers.schedules import steps_before_epoch

__all__ = [
    "LARS",
    "OPTIMIZER_NAMES",
    "RECIPE_NAMES",
    "SCHEDULE_NAMES",
    "RMSpropWarmup",
    "SlowStart",
    "WarmupCosineDecay",
    "WarmupPiecewise",
    "WarmupPolynomialDecay",
    "build_learning_rate_schedule",
    "build_optimizer",
    "epochs_from_steps",
    "mlperf_lars_hyperparameters",
    "normalize_steps_per_epoch",
    "recipe_hyperparameters",
    "rmsprop_blend",
    "scaled_learning_rate",
    "steps_before_epoch",
]
