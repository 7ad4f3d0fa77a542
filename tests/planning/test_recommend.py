"""Tests of step-time prediction, scaling efficiency and the recommendation."""

import pytest

from tfscale import planning


def test_scaling_efficiency_closed_form():
    assert planning.scaling_efficiency(0.1, 0.0) == 1.0
    assert planning.scaling_efficiency(0.1, 0.1) == pytest.approx(0.5)
    assert planning.scaling_efficiency(0.1, 0.1, overlap=0.5) == pytest.approx(0.1 / 0.15)
    with pytest.raises(ValueError, match="compute_s` must be > 0.0"):
        planning.scaling_efficiency(0.0, 0.1)
    with pytest.raises(ValueError, match="overlap` must be <= 1"):
        planning.scaling_efficiency(0.1, 0.1, overlap=2.0)


def test_plan_rows_add_up():
    preset = planning.get_preset("mikami")
    cluster = preset.cluster.with_num_accelerators(1088)
    rows = planning.plan(cluster, preset.workload)
    assert rows == sorted(rows, key=lambda r: r.step_s)
    compute = 32 / 1000.0
    for r in rows:
        assert r.compute_s == pytest.approx(compute)
        assert r.step_s == pytest.approx(compute + r.cost.total_s)
        assert r.scaling_efficiency == pytest.approx(compute / r.step_s)
        assert r.images_per_second == pytest.approx(1088 * 32 / r.step_s)
    labels = {r.cost.label for r in rows}
    assert "flat (ring)" in labels and "torus 34x32" in labels and "halving_doubling" in labels
    # Every torus grid with both sides >= 2 (1088 = 2^6 * 17 has 14 divisors, 12 such grids).
    assert sum(r.cost.algorithm == "torus" for r in rows) == 12


def _two_level(alpha):
    # Intra-node links no faster than the network: the ring uses both at once and wins on
    # bandwidth; the torus's fewer steps win once latency dominates.
    return planning.Cluster(
        256, 4, planning.Link(alpha, 10e9), planning.Link(alpha, 10e9), gamma_s_per_byte=0.0
    )


def test_recommendation_switches_from_ring_to_torus_as_latency_grows():
    workload = planning.Workload(num_parameters=25_557_032, images_per_second_per_accelerator=1000.0)
    chosen = []
    for alpha in [0.0, 1e-6, 1e-5, 1e-4, 1e-3]:
        best = planning.recommend(_two_level(alpha), workload, algorithms=("ring", "torus"))
        chosen.append(best.cost.algorithm)
    assert chosen[0] == "flat"
    assert chosen[-1] == "torus"
    switch = chosen.index("torus")
    assert all(c == "torus" for c in chosen[switch:])  # once torus, stays torus


def test_torus_grid_minimises_steps_on_a_uniform_link():
    link = planning.Link(20e-6, 10e9)
    cluster = planning.Cluster(64, 1, link, link)
    best = planning.recommend(cluster, planning.Workload(), algorithms=("torus",))
    assert best.cost.grid_shape == (8, 8)
    assert best.cost.num_steps == 28


def test_ties_prefer_the_simplest():
    # alpha = 0 on a uniform link: ring, halving-doubling and every torus cost the same.
    link = planning.Link(0.0, 10e9)
    cluster = planning.Cluster(16, 16, link, link)
    assert planning.recommend(cluster, planning.Workload()).cost.algorithm == "flat"


def test_no_fusion_pays_latency_per_tensor():
    link = planning.Link(10e-6, 10e9)
    cluster = planning.Cluster(16, 16, link, link)
    workload = planning.Workload(num_tensors=161)
    fused = planning.plan(cluster, workload, algorithms=("ring",))[0]
    unfused = planning.plan(cluster, workload, algorithms=("ring",), fuse=False)[0]
    assert unfused.cost.num_packs == 161
    assert unfused.cost.latency_s == pytest.approx(161 * fused.cost.latency_s)


def test_scaling_curve_efficiency_falls_with_n():
    preset = planning.get_preset("akiba")
    curves = planning.scaling_curve(preset.cluster, preset.workload, [8, 64, 512, 4096],
                                    compression="float16")
    ring = [r.scaling_efficiency for r in curves["flat"]]
    assert len(ring) == 4 and all(a > b for a, b in zip(ring, ring[1:]))
    assert [r.cost.num_workers for r in curves["torus"]] == [8, 64, 512, 4096]


def test_presets_predict_a_valid_efficiency():
    for name, preset in planning.PRESETS.items():
        for n in [preset.cluster.num_accelerators, *preset.reported]:
            row = planning.recommend(preset.cluster.with_num_accelerators(n), preset.workload,
                                     compression=preset.compression)
            assert 0.5 < row.scaling_efficiency < 1.0, name


def test_plan_errors():
    cluster = planning.Cluster(7, 1, planning.Link(1e-6, 1e9), planning.Link(1e-6, 1e9))
    with pytest.raises(ValueError, match="No candidate all-reduce applies to num_accelerators=7"):
        planning.recommend(cluster, planning.Workload(), algorithms=("torus",))
    with pytest.raises(ValueError, match="Unknown all_reduce algorithm 'tree'"):
        planning.plan(cluster, planning.Workload(), algorithms=("tree",))
    with pytest.raises(TypeError, match="workload"):
        planning.plan(cluster, {"num_parameters": 1})
    with pytest.raises(ValueError, match="gradient_dtype"):
        planning.Workload(gradient_dtype="int8")
    with pytest.raises(ValueError, match="images_per_second_per_accelerator` must be > 0.0"):
        planning.Workload(images_per_second_per_accelerator=0)
