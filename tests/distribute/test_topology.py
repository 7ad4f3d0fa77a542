"""Tests for tfscale.distribute.topology (pure Python grid / node arithmetic)."""

import itertools

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
def test_grid_groups_and_coords(rows, cols):
    grid = topology.Grid(rows, cols)
    assert grid.size == rows * cols
    ranks = np.arange(rows * cols).reshape(rows, cols)  # Row-major reference.
    assert grid.row_groups() == ranks.tolist()
    assert grid.column_groups() == ranks.T.tolist()
    for r, c in itertools.product(range(rows), range(cols)):
        assert grid.rank(r, c) == ranks[r, c]
        assert grid.coords(int(ranks[r, c])) == (r, c)
    # Every rank is in exactly one row and one column.
    assert sorted(sum(grid.row_groups(), [])) == list(range(grid.size))
    assert sorted(sum(grid.column_groups(), [])) == list(range(grid.size))


def test_grid_validation():
    with pytest.raises(ValueError, match="rows=0"):
        topology.Grid(0, 2)
    with pytest.raises(TypeError, match="cols"):
        topology.Grid(2, "2")
    grid = topology.Grid(2, 3)
    with pytest.raises(ValueError, match="rank=6"):
        grid.coords(6)
    with pytest.raises(ValueError, match="col=3"):
        grid.rank(0, 3)
    with pytest.raises(ValueError, match="row=-1"):
        grid.rank(-1, 0)
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


@pytest.mark.parametrize("n, k", [(0, 1), (0, 3), (1, 4), (7, 4), (8, 4), (1001, 8), (10, 3),
                                  (3, 8)])
def test_shard_bounds(n, k):
    bounds = topology.shard_bounds(n, k)
    assert len(bounds) == k
    reference = np.array_split(np.arange(n), k)  # numpy's split is the reference.
    assert [(int(a[0]), int(a[-1]) + 1) if a.size else None for a in reference] == [
        b if b[1] > b[0] else None for b in bounds]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(k - 1))
    sizes = [e - s for s, e in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_shard_bounds_errors():
    with pytest.raises(ValueError, match="num_elements=-1"):
        topology.shard_bounds(-1, 2)
    with pytest.raises(ValueError, match="num_shards=0"):
        topology.shard_bounds(5, 0)


@pytest.mark.parametrize("n, k, align", [(1001, 4, 16), (7, 4, 16), (0, 2, 16), (4096, 8, 16),
                                         (100, 3, 1), (33, 2, 32)])
def test_aligned_shard_bounds(n, k, align):
    bounds = topology.aligned_shard_bounds(n, k, align)
    assert len(bounds) == k and bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(k - 1))
    for start, end in bounds:
        assert start % align == 0 or start == n
        assert end >= start
    sizes = [e - s for s, e in bounds]
    assert max(sizes) <= -(-n // k) + align
    if align == 1:
        assert bounds == topology.shard_bounds(n, k)
