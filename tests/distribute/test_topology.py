"""Tests for tfscale.distribute.topology (pure Python grid / node arithmetic)."""


import numpy as np
import pytest

from tfscale.distribute import topology


@pytest.mark.parametrize(
    "num_devices, expected",
    [(1, (1, 1)), (2, (1, 2)), (4, (2, 2)), (6, (2, 3)), (7, (1, 7)), (8, (2, 4)),
     (12, (3, 4)), (16, (4, 4)), (36, (6, 6)), (1024, (32, 32)), (2176, (34, 64))],
)
def test_factor_grid(num_devices, expected):
    assert topology.factor_grid(num_devices) == expected


def test_factor_grid_is_most_square_by_brute_force():
    for n in range(1, 200):
        rows, cols = topology.factor_grid(n)
        best = max(r for r in range(1, n + 1) if n % r == 0 and r * r <= n)
        assert (rows, cols) == (best, n // best)


@pytest.mark.parametrize("bad", [0, -3])
def test_factor_grid_rejects_non_positive(bad):
    with pytest.raises(ValueError, match=f"num_devices={bad}"):
        topology.factor_grid(bad)


def test_factor_grid_rejects_non_int():
    with pytest.raises(TypeError, match="num_devices"):
        topology.factor_grid(2.0)
    assert topology.factor_grid(np.int64(6)) == (2, 3)


@pytest.mark.parametrize(
    "grid_shape, n, expected",
    [(None, 8, (2, 4)), ("2x4", 8, (2, 4)), ("4X2", 8, (4, 2)), ("1x4", 4, (1, 4)),
     ("3,2", 6, (3, 2)), ((4, 1), 4, (4, 1)), ([2, 3], 6, (2, 3)), ("1x1", 1, (1, 1)),
     ((np.int32(2), np.int64(2)), 4, (2, 2))],
)
def test_parse_grid_shape(grid_shape, n, expected):
    assert topology.parse_grid_shape(grid_shape, n) == expected


def test_parse_grid_shape_mismatch_names_both():
    with pytest.raises(ValueError) as err:
        topology.parse_grid_shape("2x3", 8)
    message = str(err.value)
    assert "grid_shape" in message and "'2x3'" in message and "num_devices=8" in message


@pytest.mark.parametrize("bad", ["2by4", "x4", "2x", (2,), (2, 2, 2), ("a", 1), (2.5, 2),
                                 "0x8", (0, 4), (-2, -2), 8])
def test_parse_grid_shape_rejects_garbage(bad):
    with pytest.raises(ValueError, match="grid_shape"):
        topology.parse_grid_shape(bad, 4)


@pytest.mark.parametrize("rows, cols", [(1, 1), (1, 4), (4, 1), (2, 2), (2, 3), (3, 2), (2, 4)])
def test_grid_groups(rows, cols):
    grid = topology.Grid(rows, cols)
    assert grid.size == rows * cols
    ranks = np.arange(rows * cols).reshape(rows, cols)  # Row-major reference.
    assert grid.row_groups() == ranks.tolist()
    assert grid.column_groups() == ranks.T.tolist()
    # Every rank is in exactly one row and one column.
    assert sorted(sum(grid.row_groups(), [])) == list(range(grid.size))
    assert sorted(sum(grid.column_groups(), [])) == list(range(grid.size))


def test_grid_validation():
    with pytest.raises(ValueError, match="rows=0"):
        topology.Grid(0, 2)
    with pytest.raises(TypeError, match="cols"):
        topology.Grid(2, "2")
    grid = topology.Grid(2, 3)
    with pytest.raises(dataclass_error()):
        grid.rows = 5
    assert topology.Grid.from_shape("3x2", 6) == topology.Grid(3, 2)


def dataclass_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


@pytest.mark.parametrize("n, per_node, expected", [
    (8, 4, [[0, 1, 2, 3], [4, 5, 6, 7]]), (6, 2, [[0, 1], [2, 3], [4, 5]]),
    (4, 4, [[0, 1, 2, 3]]), (4, 1, [[0], [1], [2], [3]]), (1, 1, [[0]]),
])
def test_node_groups(n, per_node, expected):
    assert topology.node_groups(n, per_node) == expected


def test_node_groups_not_dividing():
    with pytest.raises(ValueError, match="devices_per_node=3") as err:
        topology.node_groups(8, 3)
    assert "num_devices=8" in str(err.value)
    with pytest.raises(ValueError, match="devices_per_node=0"):
        topology.node_groups(8, 0)


@pytest.mark.parametrize("shape, expected", [(None, None), ("2x4", (2, 4)), ("3X1", (3, 1)), ("2,2", (2, 2)),
                                             ((4, 2), (4, 2))])
def test_parse_grid_format(shape, expected):
    assert topology.parse_grid_format(shape) == expected


@pytest.mark.parametrize("bad", ["2x", "0x4", "axb", (2,), (2, 0), ("2", "x")])
def test_parse_grid_format_errors(bad):
    with pytest.raises(ValueError, match="grid_shape"):
        topology.parse_grid_format(bad)
