"""Hierarchical all-reduce as a `tf.distribute.CrossDeviceOps` (one process, many devices).

Jia et al., "Highly Scalable Deep Learning Training System with Mixed-Precision: Training
ImageNet in Four Minutes", arXiv:1807.11205 (also ChainerMN and Horovod's
``HOROVOD_HIERARCHICAL_ALLREDUCE``). The replicas are split into nodes of
`devices_per_node` contiguous devices (`topology.node_groups`); each fused gradient buffer
is all-reduced in three steps, with one of two intra-node modes:

``intra_node="reduce_scatter"`` (default, Horovod's form):
  1. reduce-scatter inside each node: local rank ``l`` sums shard ``l`` of its node;
  2. all-reduce of shard ``l`` across nodes, among the devices of local rank ``l``
     (reduce-scatter + all-gather), so every node link carries ``1 / devices_per_node``
     of the buffer in parallel;
  3. all-gather inside each node.

``intra_node="reduce"`` (Jia et al.'s and ChainerMN's form):
  1. reduce inside each node onto its first device (the node's leader);
  2. all-reduce of the whole buffer among the leaders (reduce-scatter + all-gather);
  3. broadcast inside each node from the leader.

In one process the ``"reduce_scatter"`` mode moves the same data as `TorusAllReduce` on a
``(num_nodes x devices_per_node)`` grid; the difference is in what the steps stand for on
a real cluster (fast intra-node links, slow inter-node ones). Every slice runs on the
device holding the data, every sum on the shard's owner, every hop is a ``tf.identity`` on
the receiving device (the last intra-node hop is the receiver's own unpacking op).

With ``compression="fp16"`` (or ``"bf16"``) a value is rounded to the wire dtype three
times (input, intra-node partial sum, final sum), so ``|S_hat - S| <= 3 u sum_i |x_i|`` to
first order, ``u = 2**-11`` (fp16) or ``2**-8`` (bf16).
"""

from tfscale.distribute import local
from tfscale.distribute import topology

__all__ = ["HierarchicalAllReduce", "INTRA_NODE_MODES"]

INTRA_NODE_MODES = ("reduce_scatter", "reduce")
"""Valid values of `HierarchicalAllReduce(intra_node=...)`."""


class HierarchicalAllReduce(local.LocalAllReduce):
    """Hierarchical (intra-node, inter-node, intra-node) all-reduce (arXiv:1807.11205).

    See the module docstring for the two schedules and the compression error bound.
    Replicas are grouped into nodes in the strategy's device order.

    Args:
      devices_per_node: int >= 1 that divides the number of replicas (checked at the
        first reduce; `create_strategy` checks it at creation). 1 or the number of
        replicas gives a flat all-reduce.
      bytes_per_pack: int >= 0, fusion threshold in bytes (default 256 KiB); 0 fuses all
        gradients of a dtype into one buffer.
      compression: None, ``"fp16"`` or ``"bf16"``: the dtype gradients travel in; sums
        are accumulated in float32.
      intra_node: ``"reduce_scatter"`` (default) or ``"reduce"``, see the module
        docstring.

    Raises:
      TypeError: if `devices_per_node` is not an int.
      ValueError: if `devices_per_node` < 1, `bytes_per_pack` < 0, `compression` or
        `intra_node` unknown; at the first reduce, if `devices_per_node` does not divide
        the number of replicas.

    Example:
      >>> strategy = tf.distribute.MirroredStrategy(
      ...     devices, cross_device_ops=HierarchicalAllReduce(devices_per_node=4))
    """

    def __init__(self, devices_per_node, bytes_per_pack=local.DEFAULT_BYTES_PER_PACK,
                 compression=None, intra_node="reduce_scatter"):
        super().__init__(bytes_per_pack=bytes_per_pack, compression=compression)
        # Type and range now; divisibility is checked against the replicas later.
        if isinstance(devices_per_node, bool) or not isinstance(devices_per_node, int):
            raise TypeError(
                "Argument `devices_per_node` must be an int. "
                f"Received: devices_per_node={devices_per_node!r}"
            )
        if devices_per_node < 1:
            raise ValueError(
                "Argument `devices_per_node` must be >= 1. "
                f"Received: devices_per_node={devices_per_node}"
            )
        if intra_node not in INTRA_NODE_MODES:
            raise ValueError(
                f"Argument `intra_node` must be one of {list(INTRA_NODE_MODES)}. "
                f"Received: intra_node={intra_node!r}"
            )
        self.devices_per_node = int(devices_per_node)
        self.intra_node = intra_node

    def _check_num_devices(self, num_devices):
        topology.node_groups(num_devices, self.devices_per_node)

    def _all_reduce_fragments(self, fragments, devices, plan, finalize):
        nodes = topology.node_groups(len(devices), self.devices_per_node)
        if self.intra_node == "reduce":
            return self._reduce_mode(fragments, devices, nodes, plan, finalize)
        # Reduce-scatter inside each node (local rank l owns node shard l), all-reduce shard l
        # across nodes among the devices of local rank l, all-gather inside each node.
        return local.two_level_all_reduce(fragments, devices, nodes, plan, finalize=finalize,
                                          partial_finalize=self._to_wire(plan))

    def _reduce_mode(self, fragments, devices, nodes, plan, finalize):
        single_node = len(nodes) == 1
        # 1. Reduce inside each node onto its leader (the node's first device).
        if self.devices_per_node == 1:
            partial = [fragments[node[0]] for node in nodes]
        else:
            partial = [
                local.reduce(
                    [fragments[k] for k in node],
                    [devices[k] for k in node],
                    0,
                    plan,
                    finalize=finalize if single_node else self._to_wire(plan),
                )
                for node in nodes
            ]
        # 2. All-reduce among the leaders.
        if single_node:
            leader_frags = partial
        else:
            leader_frags = local.all_reduce(
                partial, [devices[node[0]] for node in nodes], plan, finalize=finalize
            )
        # 3. Broadcast inside each node from its leader.
        result = [None] * len(devices)
        for node, frags in zip(nodes, leader_frags):
            sent = local.broadcast(frags, 0, [devices[k] for k in node], copy=False)
            for k, f in zip(node, sent):
                result[k] = f
        return result
