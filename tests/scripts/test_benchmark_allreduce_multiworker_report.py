"""Tests of scripts/benchmark_allreduce_multiworker.py's report: the columns' schedules and the `auto` table."""

import importlib.util
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "scripts", "benchmark_allreduce_multiworker.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_allreduce_multiworker", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("benchmark_allreduce_multiworker", module)
    spec.loader.exec_module(module)
    return module


class _Flags:
    devices_per_node = 2
    bytes_per_pack = 32 * 1024 * 1024
    small_pack_bytes = 1024 * 1024


def test_column_params_follow_the_emulated_nodes(bench):
    assert bench._column_params("torus", 8, 2, _Flags) == ("torus", {"grid_shape": (2, 4)})
    assert bench._column_params("hierarchical", 8, 2, _Flags) == ("hierarchical", {"devices_per_node": 4})
    assert bench._column_params("hierarchical", 8, 1, _Flags) == ("hierarchical", {"devices_per_node": 2})
    assert bench._column_params("default", 8, 1, _Flags) == ("flat", {})
    record = {"label": "hierarchical devices_per_node=4", "algorithm": "hierarchical",
              "params": {"devices_per_node": 4}}
    assert bench._column_params("auto", 8, 2, _Flags, record) == ("hierarchical", {"devices_per_node": 4})
    # Older result files kept only the label.
    assert bench._column_params("auto", 8, 2, _Flags, "torus grid_shape=(2, 4)") == ("torus", {"grid_shape": (2, 4)})
    assert bench._column_params("auto", 8, 2, _Flags, None) is None


def test_auto_rows_pair_rounds_and_find_identical_schedules(bench):
    # 2 nodes x 2 workers: the torus with rows = nodes and the hierarchical all-reduce run one schedule.
    all_ms = {"default": [10.0, 20.0, 10.0], "flat": [12.0, 24.0, 12.0], "torus": [8.0, 16.0, 8.0],
              "hierarchical": [8.8, 17.6, 8.8], "auto": [8.4, 16.8, 8.4]}
    cell = {"median_ms": {k: sorted(v)[1] for k, v in all_ms.items()}, "all_ms": all_ms,
            "auto_choice": {"label": "torus grid_shape=(2, 2)", "algorithm": "torus", "params": {"grid_shape": [2, 2]}}}
    rows = bench._auto_rows([{"num_workers": 4, "nodes": 2, "topology": "2x2@200mbit", "cases": {"large": cell}}],
                            _Flags)
    (row,) = rows
    assert row["best"] == "torus"
    assert row["auto_over_best"] == pytest.approx(1.05)
    assert sorted(row["same_schedule_as"]) == ["hierarchical", "torus"]
    assert row["pick_over_best"] == pytest.approx(1.0)
    assert row["noise"] == pytest.approx(0.10)  # hierarchical vs torus: the same code measured twice
    text = bench._auto_table(rows)
    assert "| 2x2@200mbit | large | torus grid_shape=(2, 2) | torus 8.0 | 8.4 | 1.05 |" in text
