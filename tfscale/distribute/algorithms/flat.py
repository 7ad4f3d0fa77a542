"""The flat all-reduce: one all-reduce over all ranks (alias ``ring``).

Each backend runs an ``all_reduce`` phase with its own bandwidth-optimal all-reduce: in
one process a direct reduce-scatter + all-gather (every member sends each shard straight
to its owner), across processes TF's ring all-reduce, under Horovod its all-reduce. The
cost model prices it as a ring: ``2(N-1)`` steps of ``n/N`` bytes (Patarasuk and Yuan,
"Bandwidth optimal all-reduce algorithms for clusters of workstations", JPDC 69(2), 2009).
"""

from tfscale.distribute.algorithms import algorithm
from tfscale.distribute.algorithms.schedule import ALL_REDUCE
from tfscale.distribute.algorithms.schedule import Phase
from tfscale.distribute.algorithms.schedule import Schedule


@algorithm("flat")
def flat(num_ranks):
    """One all-reduce over all ranks (TF's and MPI's default; alias ``ring``)."""
    phases = [Phase(ALL_REDUCE, [list(range(num_ranks))], tier="world")] if num_ranks > 1 else []
    return Schedule("flat", num_ranks, phases)
