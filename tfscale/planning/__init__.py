"""tfscale.planning: a calibrated alpha-beta-gamma cost model for all-reduce at scale.

Pure Python (no TensorFlow import): predicts all-reduce time, step time and scaling
efficiency of ring, 2D-torus, hierarchical and halving-doubling all-reduce on a described
cluster, fits the model's parameters to measured timings, and recommends an algorithm and
grid. See `docs/scaling.md` and `scripts/plan_allreduce.py`.
"""

from tfscale.planning.auto import AutoChoice
from tfscale.planning.auto import Topology
from tfscale.planning.auto import choose_all_reduce
from tfscale.planning.calibration import CostFit
from tfscale.planning.calibration import TierSample
from tfscale.planning.calibration import TimingSample
from tfscale.planning.calibration import TwoTierFit
from tfscale.planning.calibration import fit_alpha_beta_delta
from tfscale.planning.calibration import fit_cost_parameters
from tfscale.planning.calibration import fit_reduction_rate
from tfscale.planning.calibration import fit_two_tier
from tfscale.planning.calibration import load_calibration
from tfscale.planning.calibration import sample_coefficients
from tfscale.planning.calibration import save_calibration
from tfscale.planning.calibration import validation_rows
from tfscale.planning.cluster import PRESETS
from tfscale.planning.cluster import Cluster
from tfscale.planning.cluster import Link
from tfscale.planning.cluster import Preset
from tfscale.planning.cluster import Workload
from tfscale.planning.cluster import cluster_from_dict
from tfscale.planning.cluster import get_preset
from tfscale.planning.cluster import workload_from_dict
from tfscale.planning.cost_model import ALGORITHMS
from tfscale.planning.cost_model import AllReduceCost
from tfscale.planning.cost_model import allreduce_cost
from tfscale.planning.cost_model import grid_shapes
from tfscale.planning.cost_model import halving_doubling_allreduce_cost
from tfscale.planning.cost_model import hierarchical_allreduce_cost
from tfscale.planning.cost_model import num_packs
from tfscale.planning.cost_model import ring_allreduce_cost
from tfscale.planning.cost_model import schedule_coefficients
from tfscale.planning.cost_model import schedule_cost
from tfscale.planning.cost_model import torus_allreduce_cost
from tfscale.planning.cost_model import wire_bytes
from tfscale.planning.recommend import PlanRow
from tfscale.planning.recommend import plan
from tfscale.planning.recommend import recommend
from tfscale.planning.recommend import scaling_curve
from tfscale.planning.recommend import scaling_efficiency

__all__ = [
    "ALGORITHMS",
    "AllReduceCost",
    "AutoChoice",
    "Cluster",
    "CostFit",
    "Link",
    "PRESETS",
    "PlanRow",
    "Preset",
    "TierSample",
    "TimingSample",
    "Topology",
    "TwoTierFit",
    "Workload",
    "allreduce_cost",
    "choose_all_reduce",
    "cluster_from_dict",
    "fit_alpha_beta_delta",
    "fit_cost_parameters",
    "fit_reduction_rate",
    "fit_two_tier",
    "get_preset",
    "grid_shapes",
    "halving_doubling_allreduce_cost",
    "hierarchical_allreduce_cost",
    "num_packs",
    "plan",
    "recommend",
    "ring_allreduce_cost",
    "load_calibration",
    "sample_coefficients",
    "save_calibration",
    "schedule_coefficients",
    "schedule_cost",
    "validation_rows",
    "scaling_curve",
    "scaling_efficiency",
    "torus_allreduce_cost",
    "wire_bytes",
    "workload_from_dict",
]
