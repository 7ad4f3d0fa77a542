"""2D-torus all-reduce as a `tf.distribute.CrossDeviceOps` (one process, many devices).

Mikami et al., "Massively Distributed SGD: ImageNet/ResNet-50 Training in a Flash",
arXiv:1811.05233, and Ying et al., "Image Classification at Supercomputer Scale",
arXiv:1811.06992. The ``N = rows * cols`` replicas form a row-major grid
(`topology.Grid`); each fused gradient buffer of ``M`` elements is all-reduced in three
steps:

1. reduce-scatter along each row: device ``(r, c)`` sums shard ``c`` (``M / cols``
   elements) of its row's buffers;
2. all-reduce of each shard along its column: reduce-scatter into ``rows`` sub-shards,
   then all-gather them down the column, so every device of column ``c`` holds the global
   sum of shard ``c``;
3. all-gather along each row: device ``(r, c)`` receives shards ``c' != c`` from its row
   neighbours ``(r, c')``.

Sequential steps ``2(cols - 1) + 2(rows - 1)`` against ``2(N - 1)`` for a ring; each device
sends about ``2 (N - 1) / N * M`` elements, like a ring; every element is added exactly
``N - 1`` times in total. Every slice runs on the device holding the data, every sum on the
shard's owner; the column all-gather hop is a ``tf.identity`` on the receiving device, and
the last (row) hop is made by the receiver's own unpacking ops (slice and reshape placed on
the receiver), which saves one op per fragment.

With ``compression="fp16"`` (or ``"bf16"``) a value is rounded to the wire dtype three
times: the input, the row partial sum and the final sum, so the all-reduced sum
``S = sum_i x_i`` satisfies ``|S_hat - S| <= 3 u sum_i |x_i|`` to first order, with
``u = 2**-11`` for fp16 and ``2**-8`` for bf16 (normal range; fp16 overflows at 65504).
Without compression float16/bfloat16 gradients are still summed in float32 and rounded to
their dtype twice (row partial sum and final sum).
"""

from tfscale.distribute import local
from tfscale.distribute import topology

__all__ = ["TorusAllReduce"]


class TorusAllReduce(local.LocalAllReduce):
    """2D-torus all-reduce for `tf.distribute.MirroredStrategy` (arXiv:1811.05233).

    Reduce-scatter along rows, all-reduce of each shard along columns, all-gather along
    rows; see the module docstring for the schedule and the compression error bound. The
    replicas are laid out row-major in the strategy's device order. Degenerate grids work:
    ``1 x N`` is a flat reduce-scatter + all-gather, ``N x 1`` a column all-reduce of the
    whole buffer, ``1 x 1`` an identity.

    Args:
      grid_shape: None (the most square grid, `topology.factor_grid`), ``"RxC"`` or
        ``(rows, cols)``; checked against the number of replicas at the first reduce
        (`create_strategy` checks it at creation).
      bytes_per_pack: int >= 0, fusion threshold in bytes (default 256 KiB); 0 fuses all
        gradients of a dtype into one buffer.
      compression: None, ``"fp16"`` or ``"bf16"``: the dtype gradients travel in; sums
        are accumulated in float32.

    Raises:
      ValueError: if `grid_shape` is malformed, `bytes_per_pack` < 0 or `compression`
        unknown; at the first reduce, if ``rows * cols`` differs from the number of
        replicas (the message names both).

    Example:
      >>> strategy = tf.distribute.MirroredStrategy(
      ...     devices, cross_device_ops=TorusAllReduce(grid_shape="2x4"))
    """

    def __init__(self, grid_shape=None, bytes_per_pack=local.DEFAULT_BYTES_PER_PACK,
                 compression=None):
        super().__init__(bytes_per_pack=bytes_per_pack, compression=compression)
        if grid_shape is not None:
            # Validate the format now; the product is checked against the replicas later.
            rows, cols = _parse_any_grid(grid_shape)
            grid_shape = (rows, cols)
        self.grid_shape = grid_shape

    def grid(self, num_devices):
        """Returns the `topology.Grid` used for `num_devices` replicas.

        Raises:
          ValueError: if the configured `grid_shape` does not multiply to `num_devices`.
        """
        return topology.Grid(*topology.parse_grid_shape(self.grid_shape, num_devices))

    def _check_num_devices(self, num_devices):
        self.grid(num_devices)

    def _all_reduce_fragments(self, fragments, devices, plan, finalize):
        # Reduce-scatter along each row ((r, c) owns row shard c), all-reduce each shard
        # along its column, all-gather along each row (`local.two_level_all_reduce`).
        grid = self.grid(len(devices))
        return local.two_level_all_reduce(fragments, devices, grid.row_groups(), plan, finalize=finalize,
                                          partial_finalize=self._to_wire(plan))


def _parse_any_grid(grid_shape):
    """Parses `grid_shape` without a device count (the product is checked later)."""
    if isinstance(grid_shape, str):
        parts = grid_shape.replace("X", "x").replace(",", "x").split("x")
        try:
            rows, cols = (int(p) for p in parts)
        except ValueError:
            rows = cols = None
    else:
        try:
            rows, cols = grid_shape
        except (TypeError, ValueError):
            rows = cols = None
    if rows is None or cols is None:
        raise ValueError(
            "Argument `grid_shape` must be 'ROWSxCOLS' (e.g. '2x4'), a (rows, cols) pair "
            f"or None. Received: grid_shape={grid_shape!r}"
        )
    # parse_grid_shape does the full type and range validation.
    return topology.parse_grid_shape(grid_shape, _product(rows, cols, grid_shape))


def _product(rows, cols, grid_shape):
    try:
        product = int(rows) * int(cols)
    except (TypeError, ValueError):
        product = 0
    if product < 1:
        raise ValueError(
            "Argument `grid_shape` must have rows >= 1 and cols >= 1. "
            f"Received: grid_shape={grid_shape!r}"
        )
    return product
