"""all_reduce="auto": the cost model's choice on crafted topologies and calibrations (pure Python)."""

import pytest

from tfscale import planning

MB = 1e6


def _calibration(alpha_s, bandwidth, delta_s=0.0, inter=None, n=8):
    fit = {"alpha_s": alpha_s, "beta_s_per_byte": 1 / bandwidth, "gamma_s_per_byte": 0.0, "launch_overhead_s": delta_s}
    fits = {"per_num_processes": {str(n): fit}}
    if inter is not None:
        fits["inter_node"] = {"alpha_s": inter[0], "beta_s_per_byte": 1 / inter[1]}
    return {"samples": [], "fits": fits}


def test_slow_inter_node_link_picks_a_two_level_schedule():
    topology = planning.Topology(8, 4, "processes")
    calibration = _calibration(100e-6, 1000 * MB, inter=(100e-6, 50 * MB))
    choice = planning.choose_all_reduce(topology, 100 * MB, calibration)
    # A tier-aware schedule: hierarchical / a torus with nodes as rows, or halving-doubling, whose nearest-first
    # partners keep its large exchanges inside a node on node-major ranks (it sends as few bytes through a card).
    assert (choice.algorithm, choice.params) in [("hierarchical", {"devices_per_node": 4}),
                                                 ("torus", {"grid_shape": (2, 4)}), ("halving_doubling", {})]
    times = dict(choice.alternatives)
    assert times["torus grid_shape=(2, 4)"] < times["torus grid_shape=(4, 2)"]  # rows must be the nodes
    assert times["flat"] > 1.3 * choice.predicted_s  # the flat ring sends 1.75x the bytes through each node's card


def test_the_emulated_networks_bandwidth_overrides_the_default():
    fast = planning.choose_all_reduce(planning.Topology(8, 4, "processes"), 100 * MB)
    slow = planning.choose_all_reduce(planning.Topology(8, 4, "processes", inter_node_bandwidth_bytes_per_s=25 * MB),
                                      100 * MB)
    assert slow.predicted_s > 3 * fast.predicted_s
    assert slow.algorithm in ("hierarchical", "torus", "halving_doubling")


def test_uniform_links_and_small_messages_pick_flat():
    # One machine: one uniform link, and a collective call costs more than a step (loopback: delta >> alpha).
    topology = planning.Topology(8, 8, "processes")
    choice = planning.choose_all_reduce(topology, 4096, _calibration(100e-6, 200 * MB, delta_s=5e-3))
    assert choice.algorithm == "flat" and choice.params == {}
    assert len(choice.alternatives) >= 3 and choice.alternatives[0][0] == "flat"


def test_shared_memory_picks_one_level_reduction():
    choice = planning.choose_all_reduce(planning.Topology(4, 4, "shared_memory"), 100 * MB)
    assert choice.algorithm == "reduction_to_one_device" and "sharing one memory" in choice.reason


def test_one_rank_and_errors():
    assert planning.choose_all_reduce(planning.Topology(1, 1), 10).algorithm == "flat"
    with pytest.raises(ValueError, match="ranks_per_node`=3 must divide num_ranks=8"):
        planning.Topology(8, 3)
    with pytest.raises(ValueError, match="kind"):
        planning.Topology(4, 4, "gpus")
    with pytest.raises(ValueError, match="num_bytes"):
        planning.choose_all_reduce(planning.Topology(4, 4), 0)
    with pytest.raises(TypeError, match="Topology"):
        planning.choose_all_reduce((4, 4), 10)


def test_describe_lists_every_alternative():
    choice = planning.choose_all_reduce(planning.Topology(8, 4, "processes"), 100 * MB)
    text = choice.describe()
    assert text.startswith(f"all_reduce=auto chose {choice.algorithm}")
    for label, _ in choice.alternatives:
        assert label in text


def test_across_nodes_a_flat_choice_is_the_runtimes_own_all_reduce():
    """Across nodes (no compression) the runtime's own fused all-reduce is a candidate, priced as flat in one pack;
    it is never offered inside one host (where tfscale's packed flat measured faster) or with compression."""
    two_nodes = planning.Topology(8, 4, "processes", inter_node_bandwidth_bytes_per_s=50 * MB)
    small = planning.choose_all_reduce(two_nodes, 800_000)
    assert small.algorithm == "collective" and small.params == {}
    times = dict(small.alternatives)
    assert times["collective (MWMS's own flat all-reduce)"] <= times["flat"]
    large = planning.choose_all_reduce(two_nodes, 100 * MB)
    assert large.algorithm in ("hierarchical", "torus")  # the tiers still decide large messages
    one_host = planning.choose_all_reduce(planning.Topology(8, 8, "processes"), 800_000)
    assert one_host.algorithm == "flat"
    assert not any(label.startswith("collective") for label, _ in one_host.alternatives)
    compressed = planning.choose_all_reduce(two_nodes, 800_000, compression="fp16")
    assert compressed.algorithm != "collective"
