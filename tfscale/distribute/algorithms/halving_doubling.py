"""Halving-doubling all-reduce (Rabenseifner's algorithm).

Thakur, Rabenseifner and Gropp, "Optimization of Collective Communication Operations in
MPICH", IJHPCA 19(1), 2005, section 4.4: the algorithm MPI libraries pick for medium
messages. For ``N = 2^k`` ranks:

1. reduce-scatter by recursive halving: ``k`` phases; in phase ``i`` every rank pairs with
   the rank at distance ``2^i`` (nearest first) and they reduce-scatter the piece they
   hold, so each keeps half of it, summed;
2. all-gather by recursive doubling: the same pairs in reverse order.

``2 log2 N`` steps and ``2(N-1)/N * n`` bytes sent per rank. Node-major ranks make the
large early exchanges intra-node. For N not a power of two, the ``N - 2^k`` extra ranks
first reduce their buffer onto a partner among the first ``2^k``, idle, and receive the
result by broadcast at the end (two extra steps of the whole buffer).
"""

from tfscale.distribute.algorithms import algorithm
from tfscale.distribute.algorithms.schedule import ALL_GATHER
from tfscale.distribute.algorithms.schedule import BROADCAST
from tfscale.distribute.algorithms.schedule import REDUCE
from tfscale.distribute.algorithms.schedule import REDUCE_SCATTER
from tfscale.distribute.algorithms.schedule import Phase
from tfscale.distribute.algorithms.schedule import Schedule


def halving_doubling_phases(ranks):
    """The phases of halving-doubling over `ranks` (a list of ints, any length >= 1).

    Reused by the hierarchical algorithm for its inter-node step.

    Returns:
      list of `Phase`.
    """
    ranks = list(ranks)
    p = len(ranks)
    if p < 2:
        return []
    p2 = 1 << (p.bit_length() - 1)
    extra = [[ranks[i], ranks[p2 + i]] for i in range(p - p2)]
    phases = [Phase(REDUCE, extra, root=0, tier="fold")] if extra else []
    halving = []
    distance = 1
    while distance < p2:
        pairs = [[ranks[i], ranks[i + distance]] for i in range(p2) if not i & distance]
        halving.append(Phase(REDUCE_SCATTER, pairs, tier=f"pairs/{distance}"))
        distance *= 2
    phases += halving
    phases += [Phase(ALL_GATHER, h.groups, tier=h.tier) for h in reversed(halving)]
    if extra:
        phases.append(Phase(BROADCAST, extra, root=0, tier="fold"))
    return phases


@algorithm("halving_doubling")
def halving_doubling(num_ranks):
    """Rabenseifner's halving-doubling: log2 N pairwise reduce-scatters, then log2 N all-gathers."""
    return Schedule("halving_doubling", num_ranks, halving_doubling_phases(range(num_ranks)))
