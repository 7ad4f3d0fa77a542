"""Hierarchical all-reduce (Jia et al., arXiv:1807.11205; ChainerMN; Horovod).

The ranks form nodes of `devices_per_node` contiguous ranks (`topology.node_groups`).

``intra_node="reduce_scatter"`` (default, Horovod's form):
  1. reduce-scatter inside each node: local rank ``l`` owns shard ``l`` of its node's sum;
  2. all-reduce shard ``l`` across the nodes among the ranks of local rank ``l``, all
     ``devices_per_node`` of them at once, so every node's network carries ``1/k`` of the
     buffer per flow (``inter_node="flat"``, or ``"halving_doubling"``);
  3. all-gather inside each node.
  With ``inter_node="flat"`` this is the torus on a ``num_nodes x devices_per_node`` grid;
  it differs in what the steps stand for on a real cluster.

``intra_node="reduce"`` (Jia et al.'s and ChainerMN's form):
  1. reduce inside each node onto its first rank (the leader);
  2. all-reduce the whole buffer among the leaders;
  3. broadcast inside each node from the leader.
"""

from tfscale.distribute import topology
from tfscale.distribute import validation
from tfscale.distribute.algorithms import algorithm
from tfscale.distribute.algorithms.halving_doubling import halving_doubling_phases
from tfscale.distribute.algorithms.schedule import ALL_GATHER
from tfscale.distribute.algorithms.schedule import ALL_REDUCE
from tfscale.distribute.algorithms.schedule import BROADCAST
from tfscale.distribute.algorithms.schedule import REDUCE
from tfscale.distribute.algorithms.schedule import REDUCE_SCATTER
from tfscale.distribute.algorithms.schedule import Phase
from tfscale.distribute.algorithms.schedule import Schedule

INTRA_NODE_MODES = ("reduce_scatter", "reduce")
"""Valid values of ``intra_node``."""
INTER_NODE_MODES = ("flat", "halving_doubling")
"""Valid values of ``inter_node``."""


def _across(groups, inter_node, tier):
    """Phases that all-reduce across the members of each group (one per local rank)."""
    if len(groups[0]) < 2:
        return []
    if inter_node == "flat":
        return [Phase(ALL_REDUCE, groups, tier=tier)]
    per_group = [halving_doubling_phases(g) for g in groups]
    # The same phase of every group runs at once: merge their groups.
    return [
        Phase(ps[0].kind, [g for p in ps for g in p.groups], root=ps[0].root, tier=tier)
        for ps in zip(*per_group)
    ]


@algorithm("hierarchical")
def hierarchical(num_ranks, devices_per_node=None, intra_node="reduce_scatter", inter_node="flat"):
    """Hierarchical: reduce-scatter inside nodes, all-reduce across nodes, all-gather inside (arXiv:1807.11205).

    Args:
      num_ranks: int >= 1.
      devices_per_node: int >= 1 dividing `num_ranks`; None picks the column count of
        `topology.factor_grid(num_ranks)` (e.g. 4 of 8). Backends pass their own node
        size (the devices of a worker, the workers of a host).
      intra_node: ``"reduce_scatter"`` (default) or ``"reduce"`` (to the node leader).
      inter_node: ``"flat"`` (default) or ``"halving_doubling"``: the all-reduce across
        nodes.

    Raises:
      ValueError: if `devices_per_node` does not divide `num_ranks`, or for an unknown mode.
      TypeError: if `devices_per_node` is not an int.
    """
    validation.check_choice("intra_node", intra_node, INTRA_NODE_MODES)
    validation.check_choice("inter_node", inter_node, INTER_NODE_MODES)
    if devices_per_node is None:
        devices_per_node = topology.factor_grid(num_ranks)[1]
    nodes = topology.node_groups(num_ranks, devices_per_node)
    k = len(nodes[0])
    phases = []
    if intra_node == "reduce_scatter":
        peers = [[node[j] for node in nodes] for j in range(k)]
        if k > 1:
            phases.append(Phase(REDUCE_SCATTER, nodes, tier="intra_node"))
        phases += _across(peers, inter_node, "inter_node")
        if k > 1:
            phases.append(Phase(ALL_GATHER, nodes, tier="intra_node"))
    else:
        if k > 1:
            phases.append(Phase(REDUCE, nodes, root=0, tier="intra_node"))
        phases += _across([[node[0] for node in nodes]], inter_node, "inter_node")
        if k > 1:
            phases.append(Phase(BROADCAST, nodes, root=0, tier="intra_node"))
    params = (("devices_per_node", k), ("inter_node", inter_node), ("intra_node", intra_node))
    return Schedule("hierarchical", num_ranks, phases, params)
