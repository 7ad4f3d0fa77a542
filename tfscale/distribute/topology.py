"""Device topology for grid and hierarchical all-reduce: pure Python, no TensorFlow.

The 2D-torus all-reduce of Mikami et al. ("Massively Distributed SGD: ImageNet/ResNet-50
Training in a Flash", arXiv:1811.05233) and Ying et al. ("Image Classification at
Supercomputer Scale", arXiv:1811.06992) arranges the ``N = rows * cols`` devices as a grid;
the hierarchical all-reduce of Jia et al. ("Highly Scalable Deep Learning Training System
with Mixed-Precision", arXiv:1807.11205) groups them by node. This module holds the
rank <-> (row, column) arithmetic and the groups that the
all-reduce schedules (`tfscale.distribute.algorithms`) are built from.

Ranks are 0-based integers. The grid is row-major: ``rank = row * cols + col``, so a row is
a set of contiguous ranks (devices that usually share a node or a fast link).
"""

import dataclasses
import math
import re

from tfscale.distribute import validation

__all__ = [
    "Grid",
    "factor_grid",
    "node_groups",
    "parse_grid_format",
    "parse_grid_shape",
]


_check_positive_int = validation.check_positive_int


def factor_grid(num_devices):
    """Returns the most square ``(rows, cols)`` factorisation of `num_devices`.

    The torus all-reduce makes ``2(rows - 1) + 2(cols - 1)`` sequential steps, which is
    smallest when the grid is as square as possible (Mikami et al., arXiv:1811.05233).

    Args:
      num_devices: int >= 1, the number of devices (replicas).

    Returns:
      A tuple ``(rows, cols)`` of ints with ``rows * cols == num_devices`` and
      ``rows <= cols``, `rows` the largest divisor of `num_devices` that is <= its square
      root. A prime gives ``(1, num_devices)``.

    Raises:
      TypeError: if `num_devices` is not an int.
      ValueError: if `num_devices` < 1.

    Example:
      >>> factor_grid(8)
      (2, 4)
      >>> factor_grid(7)
      (1, 7)
    """
    num_devices = _check_positive_int("num_devices", num_devices)
    rows = math.isqrt(num_devices)
    while num_devices % rows:
        rows -= 1
    return rows, num_devices // rows


def parse_grid_shape(grid_shape, num_devices):
    """Turns a user grid shape into ``(rows, cols)`` and checks it against `num_devices`.

    Args:
      grid_shape: None (pick `factor_grid(num_devices)`), a string ``"RxC"`` such as
        ``"2x4"`` (``"2X4"`` and ``"2,4"`` are accepted too), or a sequence of two ints
        ``(rows, cols)``.
      num_devices: int >= 1, the number of devices the grid must cover.

    Returns:
      A tuple ``(rows, cols)`` of ints >= 1 with ``rows * cols == num_devices``.

    Raises:
      ValueError: if `grid_shape` cannot be parsed, has a dimension < 1, or
        ``rows * cols != num_devices`` (the message names both).
      TypeError: if `num_devices` is not an int.
    """
    num_devices = _check_positive_int("num_devices", num_devices)
    if grid_shape is None:
        return factor_grid(num_devices)
    if isinstance(grid_shape, str):
        match = re.fullmatch(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*", grid_shape)
        if not match:
            raise ValueError(
                "Argument `grid_shape` must be 'ROWSxCOLS' (e.g. '2x4'), a (rows, cols) "
                f"pair or None. Received: grid_shape={grid_shape!r}"
            )
        rows, cols = int(match.group(1)), int(match.group(2))
    else:
        try:
            rows, cols = grid_shape
            if isinstance(rows, bool) or isinstance(cols, bool):
                raise TypeError
            if int(rows) != rows or int(cols) != cols:
                raise TypeError
            rows, cols = int(rows), int(cols)
        except (TypeError, ValueError):
            raise ValueError(
                "Argument `grid_shape` must be 'ROWSxCOLS' (e.g. '2x4'), a (rows, cols) "
                f"pair of ints or None. Received: grid_shape={grid_shape!r}"
            ) from None
    if rows < 1 or cols < 1:
        raise ValueError(
            "Argument `grid_shape` must have rows >= 1 and cols >= 1. "
            f"Received: grid_shape={grid_shape!r}"
        )
    if rows * cols != num_devices:
        raise ValueError(
            f"Argument `grid_shape`={grid_shape!r} has {rows}x{cols}={rows * cols} devices, "
            f"but there are num_devices={num_devices}. Expected rows * cols == num_devices."
        )
    return rows, cols


@dataclasses.dataclass(frozen=True)
class Grid:
    """A ``rows x cols`` row-major grid of device ranks (Mikami et al., arXiv:1811.05233).

    Rank ``r`` sits at row ``r // cols`` and column ``r % cols``. The torus all-reduce
    reduce-scatters along each row (`row_groups`), all-reduces each shard along each column
    (`column_groups`) and all-gathers along each row.

    Attributes:
      rows: int >= 1, the number of rows (the length of a column group).
      cols: int >= 1, the number of columns (the length of a row group).

    Raises:
      TypeError: if `rows` or `cols` is not an int.
      ValueError: if `rows` or `cols` < 1.

    Example:
      >>> g = Grid(2, 3)
      >>> g.row_groups()
      [[0, 1, 2], [3, 4, 5]]
      >>> g.column_groups()
      [[0, 3], [1, 4], [2, 5]]
    """

    rows: int
    cols: int

    def __post_init__(self):
        object.__setattr__(self, "rows", _check_positive_int("rows", self.rows))
        object.__setattr__(self, "cols", _check_positive_int("cols", self.cols))

    @classmethod
    def from_shape(cls, grid_shape, num_devices):
        """Builds a grid from anything `parse_grid_shape` accepts."""
        return cls(*parse_grid_shape(grid_shape, num_devices))

    @property
    def size(self):
        """int: the number of devices, ``rows * cols``."""
        return self.rows * self.cols

    def row_groups(self):
        """Returns the ranks of each row: `rows` lists of `cols` contiguous ranks."""
        return [list(range(r * self.cols, (r + 1) * self.cols)) for r in range(self.rows)]

    def column_groups(self):
        """Returns the ranks of each column: `cols` lists of `rows` ranks, stride `cols`."""
        return [list(range(c, self.size, self.cols)) for c in range(self.cols)]


def node_groups(num_devices, devices_per_node):
    """Splits ranks ``0..num_devices-1`` into contiguous nodes.

    Hierarchical all-reduce (Jia et al., arXiv:1807.11205) reduces inside each node first,
    then across nodes; rank ``r`` belongs to node ``r // devices_per_node``.

    Args:
      num_devices: int >= 1, the total number of devices.
      devices_per_node: int >= 1 that divides `num_devices`.

    Returns:
      ``num_devices // devices_per_node`` lists of `devices_per_node` contiguous ranks.

    Raises:
      TypeError: if an argument is not an int.
      ValueError: if an argument is < 1 or `devices_per_node` does not divide
        `num_devices`.
    """
    num_devices = _check_positive_int("num_devices", num_devices)
    devices_per_node = _check_positive_int("devices_per_node", devices_per_node)
    if num_devices % devices_per_node:
        raise ValueError(
            f"Argument `devices_per_node` must divide num_devices={num_devices}. "
            f"Received: devices_per_node={devices_per_node}"
        )
    return [
        list(range(start, start + devices_per_node))
        for start in range(0, num_devices, devices_per_node)
    ]


def parse_grid_format(grid_shape):
    """Parses `grid_shape` without knowing the device count (checked later).

    Args:
      grid_shape: None, ``"RxC"`` (``"RXC"``, ``"R,C"``) or a ``(rows, cols)`` pair.

    Returns:
      None or ``(rows, cols)``, ints >= 1.

    Raises:
      ValueError: if `grid_shape` is malformed or a dimension is < 1.
    """
    if grid_shape is None:
        return None
    rows = cols = None
    if isinstance(grid_shape, str):
        match = re.fullmatch(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*", grid_shape)
        if match:
            rows, cols = int(match.group(1)), int(match.group(2))
    else:
        try:
            rows, cols = grid_shape
            rows, cols = validation.as_int("rows", rows), validation.as_int("cols", cols)
        except (TypeError, ValueError):
            rows = cols = None
    if rows is None or cols is None or rows < 1 or cols < 1:
        raise ValueError(
            "Argument `grid_shape` must be 'ROWSxCOLS' (e.g. '2x4') or a (rows, cols) pair of ints >= 1, "
            f"or None. Received: grid_shape={grid_shape!r}"
        )
    return rows, cols
