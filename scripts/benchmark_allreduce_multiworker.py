"""Benchmark tfscale's multi-worker all-reduce against MWMS's own, across processes.

For each worker count in ``--num_workers`` (e.g. ``2,4,8``) this script starts that many
worker processes on 127.0.0.1 with ``python -m tfscale.launch`` (running this same file
with ``--role=worker``). Every worker builds one `MultiWorkerMirroredStrategy` with
`tfscale.distribute.collective.create_multi_worker_strategy` and then times, in the same
process and on the same data, the all-reduce that Keras ``fit`` uses
(``ReplicaContext.all_reduce(SUM)`` inside ``strategy.run`` in a ``tf.function``) with:

* ``default``: MWMS's own ``CollectiveAllReduce`` (one fused ring all-reduce, TF's
  ``CommunicationOptions`` defaults: ``bytes_per_pack=0``, implementation AUTO = RING);
* ``ring``, ``torus`` (most square grid: 1x2, 2x2, 2x4) and ``hierarchical``
  (``--devices_per_node`` processes per node) from `tfscale.distribute.collective`, with
  packs under ``--small_pack_bytes`` (1 MiB) summed by two all-reduces;
* ``torus_rs``: the torus with reduce-scatter / all-reduce / all-gather for every pack
  (``small_pack_bytes=0``).

Two message sizes:

* ``small`` (latency-bound): ``--small_num_tensors`` tensors of ``--small_tensor_size``
  float32 (default 200 x 1,000 = 0.8 MB);
* ``large`` (bandwidth-bound): the 214 gradient tensors of Keras's ResNet-50
  (25,557,032 float32, 97.5 MiB; `tfscale.models.gradient_shapes`).

Each (case, algorithm) is warmed up ``--warmup`` times and timed ``--small_reps`` (small)
or ``--reps`` (large) times (wall clock of the call plus fetching one scalar); the chief
reports the median. Algorithms are
run in interleaved rounds so that the machine's load drifts affect all of them alike. The
driver prints a table of medians and ratios to ``default`` and writes everything to
``--output_json``.

Example:
  python scripts/benchmark_allreduce_multiworker.py --num_workers=2,4,8

On loopback every hop costs the same and all processes share the host's cores, so these
numbers measure per-collective latency and copy/add work rather than a network; see
docs/benchmarks_multiworker.md.
"""

import json
import os
import re
import statistics
import subprocess
import sys

from absl import app
from absl import flags

from tfscale.planning import timing

# "default" is MWMS's own all-reduce; the others come from tfscale's registry (TensorFlow-free import);
# "torus_rs" is the torus with small_pack_bytes=0.
from tfscale.distribute import algorithms as _algorithms  # noqa: E402

ALGORITHMS = ("default", *_algorithms.algorithm_names(), "torus_rs", "auto")
CASES = ("small", "large")


def define_flags():
    """Defines the command-line flags."""
    flags.DEFINE_list("num_workers", ["2", "4", "8"], "Worker process counts to benchmark on loopback (one node).")
    flags.DEFINE_list("topologies", [], "Emulated multi-node clusters to benchmark, each NODESxWORKERS@RATE, e.g. "
                      "2x4@400mbit (python -m tfscale.launch --nodes 2 --workers_per_node 4 "
                      "--inter_node_bandwidth 400mbit; needs root or CAP_NET_ADMIN).")
    flags.DEFINE_integer("nodes", 1, "Internal (worker): nodes of the emulated cluster.")
    flags.DEFINE_integer("workers_per_node", 0, "Internal (worker): workers per node of the emulated cluster.")
    flags.DEFINE_list("algorithms", list(ALGORITHMS),
                      f"Subset of {list(ALGORITHMS)}; torus_rs is the torus with small_pack_bytes=0 "
                      "(reduce-scatter / all-reduce / all-gather for every pack).")
    flags.DEFINE_integer("small_pack_bytes", 1024 * 1024,
                         "small_pack_bytes of torus and hierarchical (bytes): smaller packs use two all-reduces.")
    flags.DEFINE_list("cases", list(CASES), f"Subset of {list(CASES)}.")
    flags.DEFINE_integer("reps", 7, "Timed repetitions per algorithm of the large case.")
    flags.DEFINE_integer("small_reps", 30, "Timed repetitions per algorithm of the small case.")
    flags.DEFINE_integer("warmup", 2, "Untimed calls per (case, algorithm) first.")
    flags.DEFINE_integer("small_num_tensors", 200, "Tensors in the small case.")
    flags.DEFINE_integer("small_tensor_size", 1000, "float32 elements per small tensor.")
    flags.DEFINE_integer("bytes_per_pack", 32 * 1024 * 1024, "tfscale fusion threshold in bytes.")
    flags.DEFINE_integer("devices_per_node", 2, "Processes per node for `hierarchical` on loopback (an emulated "
                         "cluster uses its own node size, and the torus its nodes as rows).")
    flags.DEFINE_enum("compression", "none", ["none", "fp16", "bf16"], "Wire compression for tfscale.")
    flags.DEFINE_float("timeout_seconds", 120.0, "Collective timeout in seconds.")
    flags.DEFINE_float("launch_timeout_seconds", 580.0, "Limit for one worker count's run, seconds.")
    flags.DEFINE_string("output_json", "runs/benchmark_allreduce_multiworker.json", "Where to write results.")
    flags.DEFINE_bool("fit_tiers", False, "With --report_from: fit intra- and inter-node alpha, beta and delta to the "
                      "measured cells (tfscale.planning.fit_two_tier) and predict each topology from a fit on the "
                      "others (held out).")
    flags.DEFINE_string("plot", None, "PNG path: the cost model's predicted time against the measured one, per cell.")
    flags.DEFINE_string("report_from", None, "Print the tables (and the cost model's predictions) of an earlier "
                        "--output_json instead of running anything.")
    flags.DEFINE_enum("role", "driver", ["driver", "worker"], "Internal: driver starts the workers.")
    flags.DEFINE_string("worker_output", "", "Internal: the chief worker's JSON output path.")


def _case_shapes(flags_obj, case):
    if case == "small":
        return [(flags_obj.small_tensor_size,)] * flags_obj.small_num_tensors
    from tfscale import models

    return list(models.gradient_shapes("resnet50"))


def run_worker(flags_obj):
    """One worker: times every (case, algorithm); the chief writes the medians."""
    from tfscale.distribute import collective

    compression = None if flags_obj.compression == "none" else flags_obj.compression
    strategy = collective.create_multi_worker_strategy(
        "ring", bytes_per_pack=flags_obj.bytes_per_pack, compression=compression,
        timeout_seconds=flags_obj.timeout_seconds,
    )
    import numpy as np
    import tensorflow as tf

    from tfscale.distribute import strategy_handle

    base = strategy_handle(strategy).all_reduce
    num_workers = base.num_workers
    device = strategy.extended.worker_devices[0]
    reducers = {"default": None}
    for i, name in enumerate(a for a in flags_obj.algorithms if a not in ("default", "auto")):
        algorithm, params = _column_params(name, num_workers, flags_obj.nodes, flags_obj)
        reducers[name] = collective.MultiWorkerAllReduce(
            algorithm, base.local_devices, base.worker_rank, num_workers,
            bytes_per_pack=flags_obj.bytes_per_pack, compression=compression,
            timeout_seconds=flags_obj.timeout_seconds, key_base=(50 + i) * 1_000_000,
            small_pack_bytes=0 if name == "torus_rs" else flags_obj.small_pack_bytes, **params,
        )

    results = {}
    for case_index, case in enumerate(flags_obj.cases):
        shapes = _case_shapes(flags_obj, case)
        auto_label = None
        if "auto" in flags_obj.algorithms:  # The cost model picks for this topology and this message size.
            from tfscale.distribute import cluster as cluster_lib
            from tfscale.distribute import multi_worker

            info = cluster_lib.cluster_from_environment()
            choice = multi_worker._choose(  # pylint: disable=protected-access
                info.workers, 1, 4 * int(sum(np.prod(x) for x in shapes)), None, flags_obj.bytes_per_pack,
                compression, flags_obj.small_pack_bytes)
            auto_label = {"label": choice.alternatives[0][0], "algorithm": choice.algorithm,
                          "params": {k: list(v) if isinstance(v, tuple) else v for k, v in choice.params.items()}}
            if base.worker_rank == 0:
                print(f"[{case}] " + choice.describe(), flush=True)
            reducers["auto"] = None if choice.algorithm == "collective" else collective.MultiWorkerAllReduce(
                choice.algorithm, base.local_devices, base.worker_rank, num_workers,
                bytes_per_pack=flags_obj.bytes_per_pack, compression=compression,
                timeout_seconds=flags_obj.timeout_seconds, key_base=(90 + case_index) * 1_000_000,
                small_pack_bytes=flags_obj.small_pack_bytes, **choice.params)  # collective: MWMS's own
        rng = np.random.RandomState(base.worker_rank)
        with tf.device(device):
            grads = [tf.Variable(rng.standard_normal(s).astype("float32"), trainable=False) for s in shapes]
        functions = {}
        for name in reducers:
            collective.use_all_reduce(strategy, reducers[name])

            @tf.function
            def step():
                def replica_fn():
                    ctx = tf.distribute.get_replica_context()
                    reduced = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [tf.identity(g) for g in grads])
                    return tf.add_n([tf.reshape(r, [-1])[0] for r in reduced])

                return strategy.run(replica_fn)

            step.get_concrete_function()  # Trace now, with this all-reduce installed.
            functions[name] = step
        check = {name: float(fn()) for name, fn in functions.items()}
        reps = flags_obj.small_reps if case == "small" else flags_obj.reps
        times = timing.time_interleaved({name: (lambda f=fn: f().numpy()) for name, fn in functions.items()},
                                        reps, warmup=max(0, flags_obj.warmup - 1)).wall_s
        ref = check["default"] if "default" in check else next(iter(check.values()))
        results[case] = {
            "num_tensors": len(shapes),
            "num_elements": int(sum(np.prod(s) for s in shapes)),
            "reps": reps,
            "median_ms": {n: 1e3 * statistics.median(t) for n, t in times.items()},
            "all_ms": {n: [1e3 * x for x in t] for n, t in times.items()},
            "max_abs_diff_vs_first": {n: abs(v - ref) for n, v in check.items()},
            "auto_choice": auto_label,
        }
        del grads
    if base.worker_rank == 0 and flags_obj.worker_output:
        with open(flags_obj.worker_output, "w") as f:
            json.dump({"num_workers": num_workers, "nodes": flags_obj.nodes, "cases": results,
                       "topology": os.environ.get("TFSCALE_TOPOLOGY", str(num_workers))}, f, indent=1)
    return results


def _table(all_results, algorithms):
    others = [a for a in algorithms if a != "default"]
    head = ["workers (or nodes x workers @ card)", "case", *[f"{a} (ms)" for a in algorithms], *[f"{a}/default" for a in others]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in all_results:
        for case, r in res["cases"].items():
            med = r["median_ms"]
            cells = [str(res.get("topology", res["num_workers"])), case, *[f"{med[a]:.1f}" for a in algorithms]]
            if "default" in med:
                cells += [f"{med[a] / med['default']:.2f}" for a in others]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _column_params(name, n, nodes, flags_obj, auto_choice=None):
    """``(algorithm, params)`` that the measured column `name` ran with on `n` workers in `nodes` nodes.

    ``default`` (MWMS's own) is one fused flat all-reduce; ``auto`` is what the cost model picked for the cell
    (`auto_choice`: the worker's record, a dict, or the label string of older result files). Returns None for an
    ``auto`` without a record.
    """
    params = {}
    if name == "default":
        return "flat", params
    if name == "auto":
        if isinstance(auto_choice, dict):
            return auto_choice["algorithm"], {k: tuple(v) if isinstance(v, list) else v
                                              for k, v in auto_choice["params"].items()}
        label = auto_choice or ""
        if not label:
            return None
        if "grid_shape=" in label:
            params["grid_shape"] = tuple(int(v) for v in label.split("grid_shape=(")[1].split(")")[0].split(","))
        if "devices_per_node=" in label:
            params["devices_per_node"] = int(label.split("devices_per_node=")[1].split(",")[0])
        if "inter_node=halving_doubling" in label:
            params["inter_node"] = "halving_doubling"
        return label.split()[0], params
    if name in ("torus", "torus_rs"):
        if nodes > 1:
            params["grid_shape"] = (nodes, n // nodes)  # rows = nodes
        return "torus", params
    if name == "hierarchical":
        params["devices_per_node"] = n // nodes if nodes > 1 else min(flags_obj.devices_per_node, n)
    return name, params


def _predictions(all_results, flags_obj):
    """The cost model's prediction of every measured cell (tfscale.planning, built-in links).

    Intra-node: the loopback link `tfscale.planning.auto.DEFAULT_INTRA_NODE` (docs/scaling.md's fit at 4
    processes); between emulated nodes: the shaped card. The same cluster `all_reduce="auto"` prices.
    """
    from tfscale import planning
    from tfscale.distribute import cluster as cluster_lib

    rows = []
    for res in all_results:
        topology = str(res.get("topology", res["num_workers"]))
        n, nodes = res["num_workers"], res.get("nodes", 1)
        rate = topology.split("@", 1)[1] if "@" in topology else None
        topo = planning.Topology(n, n // nodes, "processes",
                                 cluster_lib.parse_bandwidth(rate) if rate else None)
        cluster = planning.auto.cluster_for(topo)
        for case, r in res["cases"].items():
            num_bytes = 4 * r["num_elements"]
            for name, measured in r["median_ms"].items():
                kwargs = {"num_packs": planning.num_packs(num_bytes, flags_obj.bytes_per_pack),
                          "small_pack_bytes": flags_obj.small_pack_bytes}
                picked = _column_params(name, n, nodes, flags_obj, r.get("auto_choice"))
                if picked is None:
                    continue
                algorithm, params = picked
                kwargs.update(params)
                if algorithm == "collective" or name == "default":  # MWMS's own: one fused ring all-reduce.
                    algorithm, kwargs = "flat", {"num_packs": 1}
                elif name == "torus_rs":
                    kwargs["small_pack_bytes"] = 0
                predicted = planning.allreduce_cost(algorithm, cluster, num_bytes, **kwargs).total_s * 1e3
                rows.append({"topology": topology, "case": case, "algorithm": name, "measured_ms": measured,
                             "predicted_ms": predicted, "error": (predicted - measured) / measured})
    return rows


def _phases(n, algorithm, params):
    """The (kind, groups) of a schedule and of its small-message variant: equal for identical schedules."""
    sched = _algorithms.build_schedule(algorithm, n, **params)
    return tuple((p.kind, p.groups) for p in sched.phases), tuple(
        (p.kind, p.groups) for p in sched.for_small_messages().phases)


def _paired_ratio(a_ms, b_ms):
    """Median over the interleaved rounds of a[i] / b[i]: the ratio with the machine's drift paired out."""
    return statistics.median(x / y for x, y in zip(a_ms, b_ms))


def _spread(ratio):
    """How far apart two timings of one schedule are: ``max(r, 1/r) - 1``."""
    return max(ratio, 1.0 / ratio) - 1.0


def _auto_rows(all_results, flags_obj):
    """Per cell: what ``auto`` picked, the best measured alternative, and how far auto is from it.

    ``auto/best`` compares the auto run's median to the best other column's; ``pick/best`` compares the column
    that runs the same schedule as auto's pick (when one was measured), both as a median of per-round paired
    ratios. Columns that run an identical schedule (e.g. the torus with rows = nodes and the hierarchical
    all-reduce) measure the same code twice: their paired ratio is the noise floor of the cell.
    """
    rows = []
    for res in all_results:
        n, nodes = res["num_workers"], res.get("nodes", 1)
        for case, r in res["cases"].items():
            med, all_ms = r["median_ms"], r["all_ms"]
            if "auto" not in med:
                continue
            others = [a for a in med if a != "auto"]
            best = min(others, key=lambda a: med[a])
            picked = _column_params("auto", n, nodes, flags_obj, r.get("auto_choice"))
            same, noise = [], []
            if picked is not None and picked[0] == "collective":  # MWMS's own: the default column's code
                same = ["default"]
                noise = [_spread(_paired_ratio(all_ms["auto"], all_ms["default"]))]
            elif picked is not None:
                auto_phases = _phases(n, *picked)
                phases = {}
                for a in others:
                    if a in ("default", "torus_rs"):
                        continue
                    phases[a] = _phases(n, *_column_params(a, n, nodes, flags_obj))
                same = [a for a, ph in phases.items() if ph == auto_phases]
                names = list(phases)
                for i, a in enumerate(names):
                    for b in names[i + 1:]:
                        if phases[a] == phases[b]:
                            noise.append(_spread(_paired_ratio(all_ms[a], all_ms[b])))
                noise += [_spread(_paired_ratio(all_ms["auto"], all_ms[a])) for a in same]
            label = r.get("auto_choice")
            label = label.get("label") if isinstance(label, dict) else label
            pick_ratio = min((_paired_ratio(all_ms[a], all_ms[best]) for a in same), default=None)
            rows.append({"topology": str(res.get("topology", n)), "case": case, "picked": label, "best": best,
                         "best_ms": med[best], "auto_ms": med["auto"],
                         "auto_over_best": _paired_ratio(all_ms["auto"], all_ms[best]),
                         "pick_over_best": pick_ratio, "same_schedule_as": same,
                         "noise": max(noise) if noise else None})
    return rows


def _auto_table(rows):
    lines = ["| topology | case | auto picked | best alternative (ms) | auto (ms) | auto/best | picked column/best | "
             "identical-schedule spread |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pick = "—" if r["pick_over_best"] is None else f"{r['pick_over_best']:.2f} ({', '.join(r['same_schedule_as'])})"
        noise = "—" if r["noise"] is None else f"±{r['noise']:.0%}"
        lines.append(f"| {r['topology']} | {r['case']} | {r['picked']} | {r['best']} {r['best_ms']:.1f} | "
                     f"{r['auto_ms']:.1f} | {r['auto_over_best']:.2f} | {pick} | {noise} |")
    return "\n".join(lines)


def _prediction_table(rows):
    lines = ["| topology | case | algorithm | measured ms | predicted ms | error |", "|---|---|---|---|---|---|"]
    for r in rows:
        flag = " ✗" if abs(r["error"]) > 0.25 else ""
        lines.append(f"| {r['topology']} | {r['case']} | {r['algorithm']} | {r['measured_ms']:.1f} | "
                     f"{r['predicted_ms']:.1f} | {r['error']:+.0%}{flag} |")
    return "\n".join(lines)


def _tier_samples(all_results, flags_obj):
    """The measured cells as `tfscale.planning.TierSample`s (MWMS's default as one flat pack; auto left out)."""
    from tfscale import planning

    samples = []
    for res in all_results:
        topology = str(res.get("topology", res["num_workers"]))
        n, nodes = res["num_workers"], res.get("nodes", 1)
        k = n // nodes
        for case, r in res["cases"].items():
            num_bytes = 4 * r["num_elements"]
            packs = planning.num_packs(num_bytes, flags_obj.bytes_per_pack)
            for name, measured in r["median_ms"].items():
                base = dict(num_workers=n, ranks_per_node=k, num_bytes=num_bytes, seconds=measured / 1e3,
                            num_packs=packs, small_pack_bytes=flags_obj.small_pack_bytes)
                if name == "default":
                    sample = planning.TierSample("flat", **dict(base, num_packs=1, small_pack_bytes=None))
                elif name in ("torus", "torus_rs") and nodes > 1:
                    sample = planning.TierSample("torus", params=(("grid_shape", (nodes, k)),), **base)
                elif name == "hierarchical" and nodes > 1:
                    sample = planning.TierSample("hierarchical", params=(("devices_per_node", k),), **base)
                elif name in ("flat", "halving_doubling"):
                    sample = planning.TierSample(name, **base)
                else:
                    continue
                samples.append((topology, case, name, sample))
    return samples


def _fit_tiers(all_results, flags_obj):
    """Prints the two-tier fit on every cell, and each topology predicted from a fit on the others."""
    from tfscale import planning

    tagged = _tier_samples(all_results, flags_obj)
    for speed in sorted({t[0].split("@")[-1] for t in tagged}):
        fit = planning.fit_two_tier([t[3] for t in tagged if t[0].split("@")[-1] == speed])
        _print_fit(f"{speed}, all {fit.num_samples} cells", fit)
    held_out = _held_out(tagged)
    _auto_held_out(all_results, flags_obj, tagged)
    return held_out


def _auto_held_out(all_results, flags_obj, tagged=None):
    """What ``auto`` would pick on each cell now, and how that pick measured.

    With `tagged` (the cells as `TierSample`s), emulated cells only: for each topology the two-tier fit of the
    *other* topologies at the same card speed is the calibration (held out, as in `_held_out`). Without it,
    every cell, with auto's built-in links and the card's bandwidth, as a run would pick today.
    `tfscale.planning.choose_all_reduce` picks, and the pick is looked up among the measured columns that run
    the identical schedule. Returns the rows.
    """
    from tfscale import planning
    from tfscale.distribute import cluster as cluster_lib

    rows = []
    for res in all_results:
        topology = str(res.get("topology", res["num_workers"]))
        n, nodes = res["num_workers"], res.get("nodes", 1)
        speed = topology.split("@")[-1]
        if tagged is not None:
            rest = [t[3] for t in tagged if t[0] != topology and t[0].split("@")[-1] == speed]
            if nodes < 2 or not rest:
                continue
            calibration, bandwidth = {"fits": planning.fit_two_tier(rest).to_fits(n // nodes)}, None
        else:
            calibration = None
            bandwidth = cluster_lib.parse_bandwidth(speed) if "@" in topology else None
        for case, r in res["cases"].items():
            choice = planning.choose_all_reduce(
                planning.Topology(n, n // nodes, "processes", bandwidth), 4 * r["num_elements"], calibration,
                bytes_per_pack=flags_obj.bytes_per_pack, small_pack_bytes=flags_obj.small_pack_bytes)
            if choice.algorithm == "collective":  # MWMS's own all-reduce: the default column
                same = ["default"]
            else:
                picked = _phases(n, choice.algorithm, choice.params)
                columns = [a for a in r["median_ms"] if a not in ("auto", "default", "torus_rs")]
                same = [a for a in columns if _phases(n, *_column_params(a, n, nodes, flags_obj)) == picked]
            best = min((a for a in r["median_ms"] if a != "auto"), key=lambda a: r["median_ms"][a])
            ratio = min((_paired_ratio(r["all_ms"][a], r["all_ms"][best]) for a in same), default=None)
            rows.append({"topology": topology, "case": case, "picked": choice.alternatives[0][0],
                         "measured_as": same, "best": best, "pick_over_best": ratio})
    lines = ["| topology | case | calibrated auto picks | measured as | best | pick/best |", "|---|---|---|---|---|---|"]
    for row in rows:
        ratio = "not measured" if row["pick_over_best"] is None else f"{row['pick_over_best']:.2f}"
        lines.append(f"| {row['topology']} | {row['case']} | {row['picked']} | {', '.join(row['measured_as']) or '—'} "
                     f"| {row['best']} | {ratio} |")
    print("\nall_reduce=auto " + ("with a held-out two-tier calibration (fit on the other topologies at the same "
                                   "card speed)" if tagged is not None else "as it picks today (built-in links)")
          + ": its pick, measured as the column with the identical schedule, against the best column (median of "
          "per-round paired ratios)")
    print("\n".join(lines))
    return rows


def _print_fit(label, fit):
    print(f"\ntwo-tier fit ({label}): intra alpha {fit.alpha_intra_s * 1e6:.0f} us, "
          f"{1 / fit.beta_intra_s_per_byte / 1e6 if fit.beta_intra_s_per_byte else float('inf'):.0f} MB/s; "
          f"inter alpha {fit.alpha_inter_s * 1e6:.0f} us, "
          f"{1 / fit.beta_inter_s_per_byte / 1e6 if fit.beta_inter_s_per_byte else float('inf'):.1f} MB/s "
          f"(x flows per card); delta {fit.launch_overhead_s * 1e3:.2f} ms; rms {fit.rms_relative_error:.1%}, "
          f"max {fit.max_relative_error:.1%}")


def _held_out(tagged):
    from tfscale import planning

    print("\nheld out: each topology predicted from a fit on the other topologies with the same card speed (the "
          "shaped inter-node link differs between speeds); ✗: error above 25%")
    lines = ["| topology | case | algorithm | measured ms | predicted ms | error |", "|---|---|---|---|---|---|"]
    within = total = 0
    for topology in sorted({t[0] for t in tagged}):
        speed = topology.split("@")[-1]
        rest = [t[3] for t in tagged if t[0] != topology and t[0].split("@")[-1] == speed]
        if not rest:
            continue
        held = planning.fit_two_tier(rest)
        for top, case, name, sample in tagged:
            if top != topology:
                continue
            predicted = held.predict(sample)
            error = (predicted - sample.seconds) / sample.seconds
            total += 1
            within += abs(error) <= 0.25
            flag = " ✗" if abs(error) > 0.25 else ""
            lines.append(f"| {top} | {case} | {name} | {sample.seconds * 1e3:.1f} | {predicted * 1e3:.1f} | "
                         f"{error:+.0%}{flag} |")
    print("\n".join(lines))
    print(f"{within} of {total} held-out cells within 25%")
    return within, total


def _plot(rows, path):
    """Predicted against measured time, log-log, one marker per topology (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for topology in sorted({r["topology"] for r in rows}):
        mine = [r for r in rows if r["topology"] == topology]
        ax.scatter([r["measured_ms"] for r in mine], [r["predicted_ms"] for r in mine], label=topology, s=18, zorder=3)
    lo = min(min(r["measured_ms"], r["predicted_ms"]) for r in rows) * 0.8
    hi = max(max(r["measured_ms"], r["predicted_ms"]) for r in rows) * 1.25
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="exact")
    ax.fill_between([lo, hi], [0.75 * lo, 0.75 * hi], [1.25 * lo, 1.25 * hi], color="0.85", label="within 25%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured all-reduce time (ms)")
    ax.set_ylabel("predicted by tfscale.planning (ms)")
    ax.set_title("All-reduce on emulated clusters: predicted vs measured")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(flags_obj):
    """Driver: runs the workers for each worker count; returns and writes the results."""
    if flags_obj.role == "worker":
        return run_worker(flags_obj)
    if flags_obj.report_from:
        with open(flags_obj.report_from) as f:
            summary = json.load(f)
        algorithms = [a for a in flags_obj.algorithms if a in summary["results"][0]["cases"][next(
            iter(summary["results"][0]["cases"]))]["median_ms"]]
        print(_table(summary["results"], algorithms))
        print("\npredicted (tfscale.planning, built-in links) vs measured; ✗: error above 25%")
        rows = _predictions(summary["results"], flags_obj)
        print(_prediction_table(rows))
        print("\nall_reduce=auto against the best alternative (ratios: medians of per-round paired ratios)")
        print(_auto_table(_auto_rows(summary["results"], flags_obj)))
        _auto_held_out(summary["results"], flags_obj)
        print(f"load average when measured: {summary.get('load_average')}")
        if flags_obj.plot:
            _plot(rows, flags_obj.plot)
        if flags_obj.fit_tiers:
            _fit_tiers(summary["results"], flags_obj)
        return summary
    unknown = sorted(set(flags_obj.algorithms) - set(ALGORITHMS)) + sorted(set(flags_obj.cases) - set(CASES))
    if unknown:
        raise ValueError(f"Unknown --algorithms/--cases {unknown}; expected {list(ALGORITHMS)} / {list(CASES)}")
    out_dir = os.path.dirname(os.path.abspath(flags_obj.output_json))
    os.makedirs(out_dir, exist_ok=True)
    all_results = []
    passthrough = [
        f"--algorithms={','.join(flags_obj.algorithms)}", f"--cases={','.join(flags_obj.cases)}",
        f"--reps={flags_obj.reps}", f"--small_reps={flags_obj.small_reps}", f"--warmup={flags_obj.warmup}",
        f"--small_num_tensors={flags_obj.small_num_tensors}",
        f"--small_tensor_size={flags_obj.small_tensor_size}",
        f"--bytes_per_pack={flags_obj.bytes_per_pack}", f"--devices_per_node={flags_obj.devices_per_node}",
        f"--compression={flags_obj.compression}", f"--timeout_seconds={flags_obj.timeout_seconds}",
        f"--small_pack_bytes={flags_obj.small_pack_bytes}",
    ]
    runs = [(str(n), int(n), 1, None) for n in flags_obj.num_workers]
    for topology in flags_obj.topologies:
        match = re.fullmatch(r"(\d+)x(\d+)@(\S+)", topology)
        if not match or int(match.group(1)) < 2 or int(match.group(2)) < 1:
            raise ValueError(f"Flag --topologies must list NODESxWORKERS@RATE with >= 2 nodes, e.g. 2x4@400mbit. "
                             f"Received: {topology!r}")
        nodes, per_node = int(match.group(1)), int(match.group(2))
        runs.append((topology, nodes * per_node, nodes, (per_node, match.group(3))))
    for label, n, nodes, emulation in runs:
        worker_output = os.path.join(out_dir, f"benchmark_allreduce_multiworker_{label.replace('@', '_')}.json")
        if os.path.exists(worker_output):
            os.remove(worker_output)
        launch_flags = ["--num_workers", str(n)]
        worker_flags = []
        if emulation is not None:
            launch_flags += ["--nodes", str(nodes), "--workers_per_node", str(emulation[0]),
                             "--inter_node_bandwidth", emulation[1]]
            worker_flags = [f"--nodes={nodes}", f"--workers_per_node={emulation[0]}"]
        cmd = [sys.executable, "-m", "tfscale.launch", *launch_flags,
               "--timeout_seconds", str(flags_obj.launch_timeout_seconds), "--",
               sys.executable, os.path.abspath(__file__), "--role=worker",
               f"--worker_output={worker_output}", *passthrough, *worker_flags]
        print(f"== {label}: {' '.join(cmd)}", flush=True)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TFSCALE_TOPOLOGY=label)
        code = subprocess.call(cmd, env=env, timeout=flags_obj.launch_timeout_seconds + 60)
        if code != 0 or not os.path.exists(worker_output):
            raise RuntimeError(f"The {label} run failed with exit code {code}; see its output above.")
        with open(worker_output) as f:
            all_results.append(json.load(f))
    table = _table(all_results, list(flags_obj.algorithms))
    print(table)
    predictions = _predictions(all_results, flags_obj)
    print("\npredicted (tfscale.planning, built-in links) vs measured; ✗: error above 25%")
    print(_prediction_table(predictions))
    auto_rows = []
    if "auto" in flags_obj.algorithms:
        auto_rows = _auto_rows(all_results, flags_obj)
        print("\nall_reduce=auto against the best alternative (ratios: medians of per-round paired ratios)")
        print(_auto_table(auto_rows))
    if flags_obj.plot:
        _plot(predictions, flags_obj.plot)
    load = timing.load_average()
    print(f"load average (1, 5, 15 min) at the end: {load}")
    summary = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "results": all_results,
               "table": table, "predictions": predictions, "auto": auto_rows, "load_average": load}
    with open(flags_obj.output_json, "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(_):
    run(flags.FLAGS)


if __name__ == "__main__":
    define_flags()
    app.run(main)
