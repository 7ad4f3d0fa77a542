"""Tests of the alpha-beta-gamma all-reduce cost model against closed forms."""

import dataclasses
import subprocess
import sys

import pytest

from tfscale import planning

ALPHA, BETA, GAMMA = 7e-6, 1 / 5e9, 2e-10


def uniform(n, alpha=ALPHA, bandwidth=5e9, gamma=GAMMA, per_node=None):
    link = planning.Link(alpha, bandwidth)
    return planning.Cluster(n, per_node or n, link, link, gamma_s_per_byte=gamma)


def ring_formula(n, size, alpha=ALPHA, beta=BETA, gamma=GAMMA):
    """Thakur et al. 2005: 2(N-1) alpha + 2(N-1)/N n beta + (N-1)/N n gamma."""
    return 2 * (n - 1) * alpha + 2 * (n - 1) / n * size * beta + (n - 1) / n * size * gamma


@pytest.mark.parametrize("algorithm,kwargs", [
    ("ring", {}), ("torus", {"grid_shape": (1, 1)}), ("halving_doubling", {}), ("hierarchical", {}),
])
def test_one_worker_costs_nothing(algorithm, kwargs):
    cost = planning.allreduce_cost(algorithm, uniform(1), 1e6, **kwargs)
    assert cost.num_steps == 0
    assert cost.total_s == 0.0


def test_two_workers_closed_form():
    # N=2: one reduce-scatter and one all-gather step of n/2 bytes each.
    size = 1e6
    cost = planning.ring_allreduce_cost(uniform(2), size)
    assert cost.num_steps == 2
    assert cost.total_s == pytest.approx(2 * ALPHA + size * BETA + size / 2 * GAMMA, rel=1e-12)
    hd = planning.halving_doubling_allreduce_cost(uniform(2), size)
    assert hd.total_s == pytest.approx(cost.total_s, rel=1e-12)


@pytest.mark.parametrize("n", [2, 3, 4, 7, 8, 12, 64])
@pytest.mark.parametrize("size", [1e3, 1e8])
def test_ring_matches_thakur_formula(n, size):
    cost = planning.ring_allreduce_cost(uniform(n), size)
    assert cost.num_steps == 2 * (n - 1)
    assert cost.total_s == pytest.approx(ring_formula(n, size), rel=1e-12)
    assert cost.bytes_sent_per_worker == pytest.approx(2 * (n - 1) / n * size, rel=1e-12)


@pytest.mark.parametrize("rows,cols", [(2, 2), (2, 4), (4, 2), (3, 5), (8, 16), (32, 34)])
def test_torus_matches_mikami_formula(rows, cols):
    n, size = rows * cols, 3e7
    cost = planning.torus_allreduce_cost(uniform(n), size, (rows, cols))
    steps = 2 * (cols - 1) + 2 * (rows - 1)
    assert cost.num_steps == steps
    expected = steps * ALPHA + 2 * (n - 1) / n * size * BETA + (n - 1) / n * size * GAMMA
    assert cost.total_s == pytest.approx(expected, rel=1e-12)
    # Same bytes as the ring, fewer steps.
    ring = planning.ring_allreduce_cost(uniform(n), size)
    assert cost.bytes_sent_per_worker == pytest.approx(ring.bytes_sent_per_worker, rel=1e-12)
    assert cost.latency_s < ring.latency_s


@pytest.mark.parametrize("n", [2, 6, 16])
def test_one_by_n_grid_is_the_ring(n):
    ring = planning.ring_allreduce_cost(uniform(n, per_node=2), 5e6)
    for grid in [(1, n), (n, 1)]:
        torus = planning.torus_allreduce_cost(uniform(n, per_node=2), 5e6, grid)
        assert torus.num_steps == ring.num_steps
        assert torus.latency_s == pytest.approx(ring.latency_s, rel=1e-12)
        assert torus.bandwidth_s == pytest.approx(ring.bandwidth_s, rel=1e-12)
        assert torus.reduction_s == pytest.approx(ring.reduction_s, rel=1e-12)


@pytest.mark.parametrize("n,steps", [(2, 2), (4, 4), (8, 6), (1024, 20), (6, 8), (12, 10)])
def test_halving_doubling_steps(n, steps):
    # 2 log2 N for powers of two; otherwise 2 floor(log2 N) + 4: the fold (reduce) and unfold (broadcast) of the
    # extra ranks are each a pairwise all-reduce (2 steps), which is how the multi-process backend runs them.
    cost = planning.halving_doubling_allreduce_cost(uniform(n), 1e6)
    assert cost.num_steps == steps
    if n & (n - 1) == 0:
        assert cost.total_s == pytest.approx(
            steps * ALPHA + 2 * (n - 1) / n * 1e6 * BETA + (n - 1) / n * 1e6 * GAMMA, rel=1e-12
        )


def test_hierarchical_with_ring_is_the_node_grid_torus():
    intra = planning.Link(2e-6, 100e9)
    inter = planning.Link(9e-6, 20e9)
    cluster = planning.Cluster(32, 4, intra, inter, gamma_s_per_byte=1e-10)
    h = planning.hierarchical_allreduce_cost(cluster, 1e8)
    t = planning.torus_allreduce_cost(cluster, 1e8, (8, 4))
    assert h.grid_shape == (8, 4)
    assert h.num_steps == t.num_steps == 2 * 3 + 2 * 7
    assert h.total_s == pytest.approx(t.total_s, rel=1e-12)


def test_node_links_and_shared_network():
    # 2 nodes x 4: a flat ring pays the inter-node alpha and beta on every step (one flow
    # leaves each node); the 2x4 torus's rows stay in a node and its 4 columns all cross,
    # so 4 flows share each node's network.
    intra = planning.Link(1e-6, 100e9)
    inter = planning.Link(10e-6, 10e9)
    cluster = planning.Cluster(8, 4, intra, inter)
    n = 8e6
    ring = planning.ring_allreduce_cost(cluster, n)
    assert ring.latency_s == pytest.approx(14 * 10e-6)
    assert ring.bandwidth_s == pytest.approx(14 * (n / 8) / 10e9)
    torus = planning.torus_allreduce_cost(cluster, n, (2, 4))
    row = 2 * 3 * (1e-6 + (n / 4) / 100e9)
    column = 2 * 1 * (10e-6 + (n / 8) * 4 / 10e9)
    assert torus.total_s == pytest.approx(row + column, rel=1e-12)


@pytest.mark.parametrize("algorithm,kwargs", [
    ("ring", {}), ("torus", {"grid_shape": (4, 4)}), ("halving_doubling", {}), ("hierarchical", {}),
])
def test_monotone_in_message_size(algorithm, kwargs):
    cluster = planning.Cluster(16, 4, planning.Link(2e-6, 50e9), planning.Link(8e-6, 12e9), 1e-10)
    times = [planning.allreduce_cost(algorithm, cluster, s, **kwargs).total_s
             for s in [0, 1e3, 1e5, 1e7, 1e9]]
    assert all(a < b for a, b in zip(times, times[1:]))


@pytest.mark.parametrize("algorithm", ["ring", "halving_doubling", "hierarchical", "torus"])
def test_monotone_in_workers(algorithm):
    base = planning.Cluster(4, 4, planning.Link(2e-6, 50e9), planning.Link(8e-6, 12e9), 1e-10)
    times = []
    for n in [4, 8, 16, 64, 256, 1024]:
        cluster = base.with_num_accelerators(n)
        if algorithm == "torus":  # the best grid: a fixed squareness is not monotone on nodes
            times.append(min(planning.torus_allreduce_cost(cluster, 1e8, g).total_s
                             for g in planning.grid_shapes(n)))
        else:
            times.append(planning.allreduce_cost(algorithm, cluster, 1e8).total_s)
    assert all(a < b for a, b in zip(times, times[1:]))


def test_compression_halves_the_bytes_not_the_steps():
    cluster = uniform(16)
    fp32 = planning.ring_allreduce_cost(cluster, 4e7)
    fp16 = planning.ring_allreduce_cost(cluster, 4e7, compression="float16")
    bf16 = planning.ring_allreduce_cost(cluster, 4e7, compression="bfloat16")
    assert fp16.latency_s == fp32.latency_s
    assert fp16.bandwidth_s == pytest.approx(fp32.bandwidth_s / 2, rel=1e-12)
    assert fp16.reduction_s == pytest.approx(fp32.reduction_s / 2, rel=1e-12)
    assert bf16.total_s == fp16.total_s
    # Gradients that are already 16-bit are not compressed again.
    already = planning.ring_allreduce_cost(cluster, 2e7, value_bytes=2, compression="float16")
    assert already.wire_bytes == 2e7
    assert planning.wire_bytes(100, 4, "bfloat16") == 50


def test_fusion_multiplies_only_the_latency():
    cluster = uniform(8)
    one = planning.ring_allreduce_cost(cluster, 1e8)
    four = planning.ring_allreduce_cost(cluster, 1e8, num_packs=4)
    assert four.latency_s == pytest.approx(4 * one.latency_s, rel=1e-12)
    assert four.bandwidth_s == one.bandwidth_s
    assert planning.num_packs(100 * 2**20, 32 * 2**20) == 4
    assert planning.num_packs(100 * 2**20, None) == 1
    assert planning.num_packs(0, 1024) == 1


def test_launch_overhead_per_collective_call():
    link = planning.Link(ALPHA, 5e9)
    cluster = planning.Cluster(16, 4, link, link, launch_overhead_s=1e-3)
    # One call per phase of the schedule the backends run: halving-doubling makes 2 log2 N.
    expected = {"ring": 1, "flat": 1, "halving_doubling": 8, "hierarchical": 3}
    for algorithm, calls in expected.items():
        cost = planning.allreduce_cost(algorithm, cluster, 1e6, num_packs=2)
        assert cost.num_launches == calls
        assert cost.launch_s == pytest.approx(2 * calls * 1e-3)
    for grid, calls in [((4, 4), 3), ((1, 16), 2), ((16, 1), 1)]:
        cost = planning.torus_allreduce_cost(cluster, 1e6, grid)
        assert cost.num_launches == calls
        plain = planning.torus_allreduce_cost(dataclasses.replace(cluster, launch_overhead_s=0.0), 1e6, grid)
        assert cost.total_s == pytest.approx(plain.total_s + calls * 1e-3, rel=1e-12)


def test_grid_shapes():
    assert planning.grid_shapes(12) == [(1, 12), (2, 6), (3, 4), (4, 3), (6, 2), (12, 1)]
    assert planning.grid_shapes(7) == [(1, 7), (7, 1)]


def test_errors_are_clear():
    with pytest.raises(ValueError, match=r"grid_shape.*3x4=12 devices.*num_devices=16"):
        planning.torus_allreduce_cost(uniform(16), 1e6, (3, 4))
    with pytest.raises(ValueError, match=r"bandwidth_bytes_per_s` must be > 0.0. Received: bandwidth_bytes_per_s=0"):
        planning.Link(1e-6, 0)
    with pytest.raises(ValueError, match="bandwidth_gb_per_s` must be > 0"):
        planning.Link.from_us_gbps(5, 0)
    with pytest.raises(ValueError, match="latency_s` must be >= 0"):
        planning.Link(-1e-6, 1e9)
    with pytest.raises(ValueError, match="multiple of `accelerators_per_node`.*num_accelerators=10, accelerators_per_node=4"):
        planning.Cluster(10, 4, planning.Link(0, 1e9), planning.Link(0, 1e9))
    with pytest.raises(ValueError, match="num_accelerators` must be >= 1"):
        planning.Cluster(0, 1, planning.Link(0, 1e9), planning.Link(0, 1e9))
    with pytest.raises(ValueError, match=r"Unknown all_reduce algorithm 'tree'; expected one of \['flat', 'halving_doubling', 'hierarchical', 'torus'"):
        planning.allreduce_cost("tree", uniform(4), 1e6)
    with pytest.raises(ValueError, match="grid_shape` is required"):
        planning.torus_allreduce_cost(uniform(4), 1e6, None)
    # allreduce_cost builds the schedule as the backends do: no grid means the most square one.
    assert planning.allreduce_cost("torus", uniform(4), 1e6).grid_shape == (2, 2)
    with pytest.raises(ValueError, match=r"`grid_shape` does not apply to all_reduce algorithm 'flat'"):
        planning.allreduce_cost("ring", uniform(4), 1e6, grid_shape=(2, 2))
    with pytest.raises(ValueError, match="compression"):
        planning.ring_allreduce_cost(uniform(4), 1e6, compression="int8")
    with pytest.raises(ValueError, match="num_bytes` must be >= 0"):
        planning.ring_allreduce_cost(uniform(4), -1)


def test_cluster_dict_round_trip_and_presets():
    for name, preset in planning.PRESETS.items():
        cluster = preset.cluster
        again = planning.cluster_from_dict(cluster.to_dict())
        assert again.num_accelerators == cluster.num_accelerators
        assert again.inter_node.bandwidth_bytes_per_s == pytest.approx(cluster.inter_node.bandwidth_bytes_per_s)
        assert again.intra_node.latency_s == pytest.approx(cluster.intra_node.latency_s)
        assert planning.get_preset(name) is preset
    with pytest.raises(ValueError, match=r"Unknown cluster preset 'dgx'; expected one of \['akiba', 'mikami', 'yamazaki', 'ying'\]"):
        planning.get_preset("dgx")
    with pytest.raises(ValueError, match="missing keys"):
        planning.cluster_from_dict({"num_accelerators": 4})


def test_planning_does_not_import_tensorflow():
    code = "import sys, tfscale.planning; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
