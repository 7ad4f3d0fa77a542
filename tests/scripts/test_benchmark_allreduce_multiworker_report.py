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


def test_auto_with_a_held_out_calibration_picks_the_measured_best(bench):
    """Cells timed by a known two-tier model: the fit on the other topology recovers it, and auto's pick is best."""
    from tfscale import planning

    truth = planning.TwoTierFit(alpha_intra_s=1e-3, beta_intra_s_per_byte=1 / 150e6, alpha_inter_s=2e-3,
                                beta_inter_s_per_byte=1 / 25e6, gamma_s_per_byte=0.0, launch_overhead_s=3e-3)
    flags = _Flags
    results = []
    for nodes, per_node in ((2, 4), (4, 2)):
        n = nodes * per_node
        cases = {}
        for case, elements in (("small", 200_000), ("large", 25_557_032)):
            num_bytes = 4 * elements
            all_ms = {}
            for name in ("default", "flat", "torus", "hierarchical", "halving_doubling"):
                algorithm, params = bench._column_params(name, n, nodes, flags)
                packs = 1 if name == "default" else planning.num_packs(num_bytes, flags.bytes_per_pack)
                small = None if name == "default" else flags.small_pack_bytes
                sample = planning.TierSample(algorithm, n, per_node, num_bytes, 1.0, params=tuple(params.items()),
                                             num_packs=packs, small_pack_bytes=small)
                all_ms[name] = [1e3 * truth.predict(sample)] * 3
            cases[case] = {"median_ms": {k: v[0] for k, v in all_ms.items()}, "all_ms": all_ms,
                           "num_elements": elements}
        results.append({"num_workers": n, "nodes": nodes, "topology": f"{nodes}x{per_node}@200mbit", "cases": cases})
    tagged = bench._tier_samples(results, flags)
    rows = bench._auto_held_out(results, flags, tagged)
    assert len(rows) == 4
    for row in rows:
        assert row["measured_as"], row
        assert row["pick_over_best"] == pytest.approx(1.0, abs=0.02), row


def test_auto_today_maps_the_runtimes_all_reduce_to_the_default_column(bench):
    all_ms = {"default": [50.0, 52.0, 49.0], "flat": [56.0, 58.0, 55.0], "torus": [90.0, 91.0, 92.0],
              "hierarchical": [93.0, 95.0, 94.0], "auto": [57.0, 56.0, 55.0]}
    cell = {"median_ms": {k: sorted(v)[1] for k, v in all_ms.items()}, "all_ms": all_ms, "num_elements": 200_000,
            "auto_choice": {"label": "flat", "algorithm": "flat", "params": {}}}
    results = [{"num_workers": 8, "nodes": 2, "topology": "2x4@400mbit", "cases": {"small": cell}}]
    (row,) = bench._auto_held_out(results, _Flags)
    assert row["picked"].startswith("collective") and row["measured_as"] == ["default"]
    assert row["pick_over_best"] == pytest.approx(1.0)
