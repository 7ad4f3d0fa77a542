"""A toy all-reduce algorithm registered by tests only: reduce onto rank 0, then broadcast.

It lives in the tests, not in tfscale, to show that registering an algorithm is all it
takes for it to run in one process, across processes and in the planner.
"""

from tfscale.distribute import algorithms

NAME = "toy_reduce_broadcast"


def toy_reduce_broadcast(num_ranks, root=0):
    """Reduce onto one rank, then broadcast from it (2 phases over all ranks)."""
    everyone = [list(range(num_ranks))]
    if num_ranks == 1:
        return []
    return [algorithms.Phase(algorithms.REDUCE, everyone, root=root, tier="world"),
            algorithms.Phase(algorithms.BROADCAST, everyone, root=root, tier="world")]


def register():
    """Registers the toy algorithm (idempotent)."""
    if NAME not in algorithms.algorithm_names():
        algorithms.register_algorithm(NAME, toy_reduce_broadcast)
