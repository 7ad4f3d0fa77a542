"""The 2D-torus all-reduce (Mikami et al., arXiv:1811.05233; Ying et al., arXiv:1811.06992).

The ``N = rows * cols`` ranks form a row-major grid (`tfscale.distribute.topology.Grid`:
rank ``r`` at row ``r // cols``, column ``r % cols``; a row is contiguous ranks, usually
one node or one fast link):

1. reduce-scatter along each row: rank ``(r, c)`` owns the sum over its row of shard
   ``c`` (``n / cols``);
2. all-reduce that shard along each column;
3. all-gather the shards along each row.

``2(cols - 1) + 2(rows - 1)`` sequential ring steps instead of the flat ring's
``2(N - 1)``, with the same ``2(N-1)/N * n`` bytes sent per rank. A ``1 x N`` grid is a
reduce-scatter + all-gather over all ranks, ``N x 1`` one all-reduce.
"""

from tfscale.distribute import topology
from tfscale.distribute.algorithms import algorithm
from tfscale.distribute.algorithms.schedule import ALL_GATHER
from tfscale.distribute.algorithms.schedule import ALL_REDUCE
from tfscale.distribute.algorithms.schedule import REDUCE_SCATTER
from tfscale.distribute.algorithms.schedule import Phase
from tfscale.distribute.algorithms.schedule import Schedule


@algorithm("torus")
def torus(num_ranks, grid_shape=None):
    """2D torus: reduce-scatter in rows, all-reduce in columns, all-gather in rows (arXiv:1811.05233).

    Args:
      num_ranks: int >= 1.
      grid_shape: None (the most square grid, `topology.factor_grid`), ``"RxC"`` or
        ``(rows, cols)`` with ``rows * cols == num_ranks``.

    Raises:
      ValueError: if `grid_shape` is malformed or does not multiply to `num_ranks`.
    """
    grid = topology.Grid.from_shape(grid_shape, num_ranks)
    rows, cols = grid.row_groups(), grid.column_groups()
    phases = []
    if grid.cols > 1:
        phases.append(Phase(REDUCE_SCATTER, rows, tier="row"))
    if grid.rows > 1:
        phases.append(Phase(ALL_REDUCE, cols, tier="column"))
    if grid.cols > 1:
        phases.append(Phase(ALL_GATHER, rows, tier="row"))
    return Schedule("torus", num_ranks, phases, (("grid_shape", (grid.rows, grid.cols)),))
