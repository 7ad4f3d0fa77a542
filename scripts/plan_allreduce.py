r"""Calibrate the all-reduce cost model here, then predict and plan for a large cluster.

Two modes (both may be given in one call):

Calibrate (needs TensorFlow): times tfscale's real multi-process all-reduce
(`tfscale.distribute.collective.MultiWorkerAllReduce`: the ring and the 2D torus on every
grid with both sides >= 2, plus the 1 x N torus) across 2, 4 and 8 local worker processes
started with ``TF_CONFIG`` on free 127.0.0.1 ports (every group under a timeout, retried
once), and the one-process ops (`tfscale.distribute.create_strategy`, TorusAllReduce on N
logical devices), over a range of message sizes; times a local add for gamma; fits alpha,
beta and the per-call overhead delta per process count and over all of them by least
squares (`tfscale.planning.fit_cost_parameters`); writes every repetition, the fits, the
machine description and the prediction errors to `--calibration_file`. `--samples_from`
refits stored repetitions (e.g. with ``--statistic=min``) without timing again::

  python scripts/plan_allreduce.py --calibrate --calibration_file=calibration.json
  python scripts/plan_allreduce.py --calibrate --samples_from=calibration.json \
      --statistic=min --calibration_file=calibration_min.json

Plan (pure Python): costs every algorithm and grid for a described cluster and model,
prints the table and the recommendation, and with `--plot` draws the predicted all-reduce
time and scaling efficiency against the number of accelerators::

  python scripts/plan_allreduce.py --cluster=mikami --num_accelerators=1088 --plot=mikami.png
  python scripts/plan_allreduce.py --cluster=custom --num_accelerators=4096 \
      --accelerators_per_node=8 --intra_bandwidth_gbps=150 --intra_latency_us=5 \
      --inter_bandwidth_gbps=50 --inter_latency_us=10 --images_per_second=2375
  python scripts/plan_allreduce.py --cluster=calibration --calibration_file=calibration.json

`--cluster` is a preset (akiba, mikami, ying, yamazaki), ``custom`` (all link flags),
``calibration`` (the fitted single-machine link of `--calibration_file` at its largest
process count), or the path of a JSON file with `tfscale.planning.Cluster.to_dict` keys.
Any cluster or workload flag that is set overrides the preset or file.
"""

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

from tfscale import planning
from tfscale.planning import timing

FLAGS = flags.FLAGS

def _algorithms_to_plan():
    """Every algorithm of the registry (tfscale.distribute.algorithms; TensorFlow-free)."""
    from tfscale.distribute import algorithms  # pylint: disable=g-import-not-at-top

    return algorithms.algorithm_names()
_STATISTICS = {"median": statistics.median, "min": min}


def define_flags():
    """Defines the command-line flags."""
    # Calibration.
    flags.DEFINE_bool("calibrate", False,
                      "Time the real all-reduce here; fit alpha, beta, delta (gamma from a local add).")
    flags.DEFINE_string("calibration_file", "calibration.json",
                        "JSON written by --calibrate and read by --cluster=calibration / "
                        "--use_calibrated_gamma.")
    flags.DEFINE_list("num_processes", ["2", "4", "8"], "Local worker process counts to time.")
    flags.DEFINE_list("message_bytes", ["4096", "65536", "262144", "1048576", "8388608"],
                      "Float32 buffer sizes to all-reduce, in bytes per worker.")
    flags.DEFINE_integer("reps", 15, "Timed repetitions per (algorithm, size) and process count.")
    flags.DEFINE_enum("statistic", "median", sorted(_STATISTICS),
                      "How the repetitions become one time: median, or min (least disturbed by "
                      "other load on a shared machine). All repetitions are stored.")
    flags.DEFINE_integer("worker_timeout_s", 400, "Seconds before a calibration worker group is killed.")
    flags.DEFINE_string("samples_from", None,
                        "Refit the timings stored in this calibration JSON instead of timing again.")
    flags.DEFINE_integer("attempts", 2, "Tries per process count (a failed group is started again).")
    flags.DEFINE_float("collective_timeout_s", 120.0, "Timeout of each collective in the workers.")
    # Hidden: run as one calibration worker (set by --calibrate).
    flags.DEFINE_bool("time_logical_devices", True,
                      "Also time the one-process ops (TorusAllReduce on N logical devices).")
    flags.DEFINE_integer("worker_index", None, "Internal: run as a calibration worker (under tfscale.launch).")
    flags.DEFINE_integer("local_devices_worker", None,
                         "Internal: time the one-process ops on this many logical devices.")
    flags.DEFINE_string("worker_result", None, "Internal: JSON file a calibration worker writes ({rank} is "
                        "replaced by the worker's rank).")
    # Cluster.
    flags.DEFINE_string("cluster", None,
                        "Preset (akiba, mikami, ying, yamazaki), 'custom', 'calibration', or a JSON file.")
    flags.DEFINE_integer("num_accelerators", None, "N, accelerators in the cluster.")
    flags.DEFINE_integer("accelerators_per_node", None, "Accelerators per node.")
    flags.DEFINE_float("intra_latency_us", None, "Intra-node latency per step, microseconds.")
    flags.DEFINE_float("intra_bandwidth_gbps", None, "Intra-node bandwidth per flow, GB/s (1e9 bytes/s).")
    flags.DEFINE_float("inter_latency_us", None, "Inter-node latency per step, microseconds.")
    flags.DEFINE_float("inter_bandwidth_gbps", None, "Inter-node bandwidth per node (all NICs), GB/s.")
    flags.DEFINE_float("gamma_ns_per_byte", None, "Reduction cost, nanoseconds per byte added.")
    flags.DEFINE_bool("use_calibrated_gamma", False, "Take gamma from --calibration_file.")
    # Workload.
    flags.DEFINE_integer("num_parameters", None, "Gradient values per step (default ResNet-50, 25,557,032).")
    flags.DEFINE_enum("gradient_dtype", None, ["float32", "float16", "bfloat16"], "Gradient dtype.")
    flags.DEFINE_enum("compression", None, ["none", "float16", "bfloat16"], "Wire dtype.")
    flags.DEFINE_integer("per_accelerator_batch", None, "Images per accelerator per step.")
    flags.DEFINE_float("images_per_second", None, "One-accelerator training throughput, images/s.")
    flags.DEFINE_float("overlap", None, "Fraction of the all-reduce hidden behind backward, in [0, 1].")
    flags.DEFINE_integer("bytes_per_pack", None, "Fusion pack size in bytes (default: one pack).")
    flags.DEFINE_bool("fuse", True, "False: one all-reduce per gradient tensor.")
    flags.DEFINE_list("algorithms", list(_algorithms_to_plan()),
                      "Algorithms to consider (a preset may narrow the default, e.g. ying).")
    # Output.
    flags.DEFINE_string("plot", None, "PNG path: all-reduce time and efficiency against N.")
    flags.DEFINE_list("plot_counts", None, "Accelerator counts on the plot's x axis "
                      "(default: powers of two times the node size up to 4x N).")
    flags.DEFINE_string("output_json", None, "Write the plan (and calibration summary) here.")


# --- calibration: the worker side (imports TensorFlow) --------------------------------


def _torus_grids(num_workers):
    """Grids timed at `num_workers`: every one with both sides >= 2, plus 1 x N."""
    grids = [(1, num_workers)]
    grids += [g for g in planning.grid_shapes(num_workers) if g[0] > 1 and g[1] > 1]
    return grids


def _run_worker(flags_obj):
    """One calibration worker: times ring and torus all-reduces, writes its own timings."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from tfscale.distribute import collective  # pylint: disable=g-import-not-at-top

    strategy = collective.create_multi_worker_strategy(
        "ring", bytes_per_pack=0, timeout_seconds=flags_obj.collective_timeout_s
    )
    from tfscale.distribute import strategy_handle  # pylint: disable=g-import-not-at-top

    ring = strategy_handle(strategy).all_reduce
    num_workers, rank = ring.num_workers, ring.worker_rank
    device = ring.local_devices[0]
    reducers = [("ring", None, ring)]
    for i, grid in enumerate(_torus_grids(num_workers)):
        reducers.append(("torus", grid, collective.MultiWorkerAllReduce(
            "torus", ring.local_devices, rank, num_workers, grid_shape=grid, bytes_per_pack=0,
            timeout_seconds=flags_obj.collective_timeout_s, key_base=50_000_000 + 1_000_000 * i,
        )))

    with tf.device(device):
        token = tf.ones([1])

    @tf.function
    def barrier(x):
        return ring([x], 0)[0]

    results = []
    expected = num_workers * (num_workers + 1) / 2
    for size in [int(b) for b in flags_obj.message_bytes]:
        with tf.device(device):
            x = tf.fill([size // 4], float(rank + 1))
        fns, times = [], []
        for algorithm, grid, reducer in reducers:
            fn = tf.function(lambda v, r=reducer: r([v], 0)[0][:1])
            first = float(fn(x).numpy()[0])  # traces; checks the sum
            if abs(first - expected) > 1e-3 * expected:
                raise RuntimeError(f"{algorithm} {grid}: sum {first}, expected {expected}")
            fns.append(fn)
        # Interleaved rounds (the shared harness), every call lined up by a barrier first.
        timed = timing.time_interleaved({i: (lambda f=fn: f(x).numpy()) for i, fn in enumerate(fns)},
                                        flags_obj.reps, before=lambda: barrier(token).numpy())
        for i, (algorithm, grid, _) in enumerate(reducers):
            results.append({"algorithm": algorithm, "grid_shape": grid, "num_bytes": size,
                            "times": timed.wall_s[i]})
    barrier(token).numpy()
    with open(flags_obj.worker_result.format(rank=rank), "w", encoding="utf-8") as f:
        json.dump({"rank": rank, "num_workers": num_workers, "results": results}, f)
    return {}


def _run_local_devices_worker(flags_obj):
    """Times tfscale's one-process all-reduce (MirroredStrategy + TorusAllReduce) on N devices.

    ``"ring"`` is `create_strategy("ring")`, i.e. `TorusAllReduce` on a 1 x N grid; the
    torus is every grid with both sides >= 2. The logical devices share one memory, so
    alpha and beta here describe op dispatch and memory copies, not an interconnect.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from tfscale.distribute import strategy as strategy_lib  # pylint: disable=g-import-not-at-top

    n = flags_obj.local_devices_worker
    strategy_lib.configure_logical_devices(n)
    configs = [("ring", None)] + [("torus", g) for g in _torus_grids(n) if g[0] > 1]
    strategies = [(a, g, strategy_lib.create_strategy(a, num_replicas=n, grid_shape=g, bytes_per_pack=0))
                  for a, g in configs]
    results = []
    for size in [int(b) for b in flags_obj.message_bytes]:
        fns, times = [], []
        for algorithm, grid, strategy in strategies:
            with strategy.scope():
                v = tf.Variable(tf.ones([size // 4]))

            def replica_fn(v=v):
                ctx = tf.distribute.get_replica_context()
                return ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.identity(v))[:1]

            fn = tf.function(lambda s=strategy, f=replica_fn: s.run(f))
            first = [float(t.numpy()[0]) for t in strategy.experimental_local_results(fn())]
            if any(abs(x - n) > 1e-3 for x in first):
                raise RuntimeError(f"{algorithm} {grid}: sums {first}, expected {n}")
            fns.append((strategy, fn))
        timed = timing.time_interleaved(  # cheap and noisy: three times the reps
            {i: (lambda s=strategy, f=fn: [t.numpy() for t in s.experimental_local_results(f())])
             for i, (strategy, fn) in enumerate(fns)}, 3 * flags_obj.reps)
        for i, (algorithm, grid) in enumerate(configs):
            results.append({"algorithm": algorithm, "grid_shape": grid, "num_bytes": size,
                            "times": timed.wall_s[i]})
    with open(flags_obj.worker_result, "w", encoding="utf-8") as f:
        json.dump({"num_workers": n, "results": results}, f)
    return {}


# --- calibration: the parent side ------------------------------------------------------


def _time_processes(num_workers, flags_obj, workdir):
    """Starts `num_workers` workers with `python -m tfscale.launch`; returns TimingSamples (per rep: max over workers)."""
    result = os.path.join(workdir, f"n{num_workers}_w{{rank}}.json")
    log_path = os.path.join(workdir, f"n{num_workers}.log")
    cmd = [sys.executable, "-m", "tfscale.launch", "--num_workers", str(num_workers),
           "--timeout_seconds", str(flags_obj.worker_timeout_s), "--grace_seconds", "5", "--",
           sys.executable, os.path.abspath(__file__), "--worker_index=-1", f"--worker_result={result}",
           f"--message_bytes={','.join(flags_obj.message_bytes)}", f"--reps={flags_obj.reps}",
           f"--collective_timeout_s={flags_obj.collective_timeout_s}"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env.pop("TFSCALE_DEVICES_PER_WORKER", None)
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            code = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   timeout=flags_obj.worker_timeout_s + 60)
        except subprocess.TimeoutExpired:
            code = "timeout"
    if code != 0:
        with open(log_path, encoding="utf-8") as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"Calibration workers failed ({num_workers} processes, exit {code}); "
                           f"log {log_path}:\n{tail}")
    per_worker = []
    for i in range(num_workers):
        with open(result.format(rank=i), encoding="utf-8") as f:
            per_worker.append(json.load(f)["results"])
    samples = []
    for entries in zip(*per_worker):
        reps = [max(ts) for ts in zip(*(e["times"] for e in entries))]
        e = entries[0]
        samples.append((planning.TimingSample(
            algorithm=e["algorithm"], num_workers=num_workers, num_bytes=e["num_bytes"],
            seconds=_STATISTICS[flags_obj.statistic](reps),
            grid_shape=tuple(e["grid_shape"]) if e["grid_shape"] else None,
        ), reps))
    return samples


def _time_logical_devices(num_devices, flags_obj, workdir):
    """Runs `_run_local_devices_worker` in a subprocess; returns its TimingSamples."""
    path = os.path.join(workdir, f"local_{num_devices}.json")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    with open(os.path.join(workdir, f"local_{num_devices}.log"), "w", encoding="utf-8") as log:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), f"--local_devices_worker={num_devices}",
             f"--worker_result={path}", f"--message_bytes={','.join(flags_obj.message_bytes)}",
             f"--reps={flags_obj.reps}"],
            env=env, stdout=log, stderr=subprocess.STDOUT, timeout=flags_obj.worker_timeout_s,
            check=False,
        )
    if proc.returncode:
        tail = open(os.path.join(workdir, f"local_{num_devices}.log"), encoding="utf-8").read()[-3000:]
        raise RuntimeError(f"The logical-device timing ({num_devices} devices) failed:\n{tail}")
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)["results"]
    return [(planning.TimingSample(
        algorithm=e["algorithm"], num_workers=num_devices, num_bytes=e["num_bytes"],
        seconds=_STATISTICS[flags_obj.statistic](e["times"]),
        grid_shape=tuple(e["grid_shape"]) if e["grid_shape"] else None), e["times"])
        for e in entries]


def _time_local_add(sizes, reps):
    """Seconds of every repetition of ``x + y`` on float32 buffers of each size (bytes)."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    add = tf.function(lambda a, b: (a + b)[:1])
    buffers = [(tf.ones([size // 4]), tf.ones([size // 4])) for size in sizes]
    timed = timing.time_interleaved({i: (lambda a=a, b=b: add(a, b).numpy()) for i, (a, b) in enumerate(buffers)},
                                    max(reps, 5), warmup=1)
    return [timed.wall_s[i] for i in range(len(sizes))]


def _machine():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "load_average": list(os.getloadavg()),
        "transport": "TF collective ops over gRPC on 127.0.0.1 (one CPU device per process)",
    }


def _fit_reduction(sizes, reps, statistic):
    """Fits gamma to the local-add repetitions with `statistic` (median or min)."""
    seconds = [_STATISTICS[statistic](r) for r in reps]
    overhead, gamma = planning.fit_reduction_rate(sizes, seconds)
    return {"num_bytes": sizes, "seconds": seconds, "rep_seconds": reps, "statistic": statistic,
            "overhead_s": overhead, "gamma_s_per_byte": gamma}


def _measure(flags_obj):
    """Runs every timing; returns ``(reduction dict, samples, logical-device samples)``."""
    sizes = [int(b) for b in flags_obj.message_bytes]
    add_sizes = sorted(set(sizes + [max(sizes) * 2]))
    add_reps = _time_local_add(add_sizes, flags_obj.reps)
    reduction = _fit_reduction(add_sizes, add_reps, flags_obj.statistic)
    samples, local_samples, raw = [], [], {"processes": [], "logical_devices": []}
    with tempfile.TemporaryDirectory(prefix="tfscale_calib_") as workdir:
        for n in [int(v) for v in flags_obj.num_processes]:
            start = time.monotonic()
            for attempt in range(flags_obj.attempts):
                try:  # a port taken between probing and binding, or a starved heartbeat
                    got = _time_processes(n, flags_obj, workdir)
                    break
                except RuntimeError as e:
                    if attempt + 1 == flags_obj.attempts:
                        raise
                    print(f"attempt {attempt + 1} with {n} processes failed, retrying: {str(e)[-800:]}")
            print(f"timed {len(got)} all-reduces on {n} processes in {time.monotonic() - start:.0f} s")
            samples += [g[0] for g in got]
            raw["processes"] += [g[1] for g in got]
            if flags_obj.time_logical_devices:
                start = time.monotonic()
                got = _time_logical_devices(n, flags_obj, workdir)
                print(f"timed {len(got)} all-reduces on {n} logical devices in "
                      f"{time.monotonic() - start:.0f} s")
                local_samples += [g[0] for g in got]
                raw["logical_devices"] += [g[1] for g in got]
    reduction["raw_rep_seconds"] = raw  # every repetition, in sample order
    return reduction, samples, local_samples


def calibrate(flags_obj):
    """Times (or, with --samples_from, reloads the timings), fits, writes the JSON; returns it."""
    if flags_obj.samples_from:
        old = planning.load_calibration(flags_obj.samples_from)
        reduction = old["reduction"]
        samples = [planning.TimingSample(**d) for d in old["samples"]]
        local_samples = [planning.TimingSample(**d)
                         for d in old.get("logical_devices", {}).get("samples", [])]
        machine, command = old["machine"], old["command"]
        raw = reduction.get("raw_rep_seconds")
        if "rep_seconds" in reduction:
            reduction = dict(_fit_reduction(reduction["num_bytes"], reduction["rep_seconds"],
                                            flags_obj.statistic), raw_rep_seconds=raw)
        if raw:  # recompute each time from its repetitions with --statistic
            stat = _STATISTICS[flags_obj.statistic]
            samples = [dataclasses.replace(x, seconds=stat(r)) for x, r in zip(samples, raw["processes"])]
            local_samples = [dataclasses.replace(x, seconds=stat(r))
                             for x, r in zip(local_samples, raw["logical_devices"])]
    else:
        reduction, samples, local_samples = _measure(flags_obj)
        machine, command = _machine(), " ".join(sys.argv)
        planning.save_calibration(flags_obj.calibration_file, {  # raw timings first
            "machine": machine, "command": command, "reduction": reduction,
            "samples": [x.to_dict() for x in samples],
            "logical_devices": {"samples": [x.to_dict() for x in local_samples]}})
    gamma = reduction["gamma_s_per_byte"]
    counts = sorted({s.num_workers for s in samples})
    # Per process count: alpha, beta and the per-call overhead delta (gamma measured apart).
    per_n = {n: planning.fit_alpha_beta_delta([s for s in samples if s.num_workers == n], gamma) for n in counts}
    # Out of sample: alpha and beta from the ring alone (delta = 0), predicting the torus.
    ring_only = {n: planning.fit_cost_parameters(
        [s for s in samples if s.num_workers == n and s.algorithm == "ring"], gamma) for n in counts}
    overall = planning.fit_alpha_beta_delta(samples, gamma)
    validation = (
        planning.validation_rows(samples, per_n, "per_n")
        + planning.validation_rows(samples, ring_only, "ring_only")
        + planning.validation_rows(samples, overall, "all_n")
    )
    result = {
        "machine": machine,
        "command": command,
        "reduction": reduction,
        "samples": [s.to_dict() for s in samples],
        "fits": {
            "per_num_processes": {str(n): f.to_dict() for n, f in per_n.items()},
            "ring_only_per_num_processes": {str(n): f.to_dict() for n, f in ring_only.items()},
            "all": overall.to_dict(),
        },
        "validation": validation,
    }
    if local_samples:
        local_fit = {n: planning.fit_alpha_beta_delta([s for s in local_samples if s.num_workers == n], gamma)
                     for n in sorted({s.num_workers for s in local_samples})}
        result["logical_devices"] = {
            "transport": "one process, MirroredStrategy over N logical CPU devices (shared memory)",
            "samples": [s.to_dict() for s in local_samples],
            "fits": {str(n): f.to_dict() for n, f in local_fit.items()},
            "validation": planning.validation_rows(local_samples, local_fit, "per_n"),
        }
    planning.save_calibration(flags_obj.calibration_file, result)
    _print_calibration(result)
    return result


def _print_calibration(result):
    red = result["reduction"]
    print(f"\ngamma (local add): {red['gamma_s_per_byte'] * 1e9:.3f} ns/byte, "
          f"overhead {red['overhead_s'] * 1e6:.0f} us")
    print("\nfit per process count (gamma fixed):")
    print(f"{'N':>4} {'alpha_us':>10} {'GB/s':>8} {'delta_us':>9} {'rms_err':>8} {'max_err':>8}")
    fits = result["fits"]
    for n, f in [*fits["per_num_processes"].items(), ("all", fits["all"])]:
        bw = f["bandwidth_gb_per_s"]
        print(f"{n:>4} {f['latency_us']:10.1f} {bw if bw is not None else float('inf'):8.3f} "
              f"{f['launch_overhead_us']:9.1f} {f['rms_relative_error']:8.1%} "
              f"{f['max_relative_error']:8.1%}")
    print("\npredicted vs measured (fit per process count | fit on the ring only):")
    print(f"{'N':>3} {'algorithm':<12} {'bytes':>9} {'measured_ms':>12} {'pred_ms':>9} {'err':>7} "
          f"{'pred_ring_fit':>13} {'err':>7}")
    rows = result["validation"]
    per_n = [r for r in rows if r["fit"] == "per_n"]
    ring_fit = [r for r in rows if r["fit"] == "ring_only"]
    for a, b in zip(per_n, ring_fit):
        name = a["algorithm"] + (" {}x{}".format(*a["grid_shape"]) if a["grid_shape"] else "")
        print(f"{a['num_workers']:>3} {name:<12} {a['num_bytes']:>9} {a['measured_ms']:12.2f} "
              f"{a['predicted_ms']:9.2f} {a['error']:7.1%} {b['predicted_ms']:13.2f} {b['error']:7.1%}")
    local = result.get("logical_devices")
    if local:
        print("\none process, N logical devices: fit per N (gamma fixed), predicted vs measured:")
        for n, f in local["fits"].items():
            print(f"  N={n}: alpha {f['latency_us']:.1f} us, beta^-1 {f['bandwidth_gb_per_s'] or 0:.3f} "
                  f"GB/s, delta {f['launch_overhead_us']:.1f} us, rms {f['rms_relative_error']:.1%}")
        for a in local["validation"]:
            name = a["algorithm"] + (" {}x{}".format(*a["grid_shape"]) if a["grid_shape"] else "")
            print(f"{a['num_workers']:>3} {name:<12} {a['num_bytes']:>9} {a['measured_ms']:12.2f} "
                  f"{a['predicted_ms']:9.2f} {a['error']:7.1%}")


# --- planning ---------------------------------------------------------------------------


def _calibrated(flags_obj):
    return planning.load_calibration(flags_obj.calibration_file)


def build_cluster_and_workload(flags_obj):
    """Returns ``(cluster, workload, compression, preset or None)`` from the flags.

    Raises:
      ValueError: for an unknown preset or file, or missing link flags with 'custom'.
    """
    name = flags_obj.cluster
    preset = None
    workload = planning.Workload()
    compression = None
    if name in planning.PRESETS:
        preset = planning.get_preset(name)
        cluster, workload, compression = preset.cluster, preset.workload, preset.compression
    elif name == "custom":
        needed = ["num_accelerators", "accelerators_per_node", "intra_latency_us",
                  "intra_bandwidth_gbps", "inter_latency_us", "inter_bandwidth_gbps"]
        missing = [f for f in needed if getattr(flags_obj, f) is None]
        if missing:
            raise ValueError(f"--cluster=custom needs the flags {['--' + m for m in missing]}")
        cluster = planning.Cluster(
            flags_obj.num_accelerators, flags_obj.accelerators_per_node,
            planning.Link.from_us_gbps(flags_obj.intra_latency_us, flags_obj.intra_bandwidth_gbps),
            planning.Link.from_us_gbps(flags_obj.inter_latency_us, flags_obj.inter_bandwidth_gbps),
            name="custom",
        )
    elif name == "calibration":
        calib = _calibrated(flags_obj)
        fits = calib["fits"]["per_num_processes"]
        n = max(fits, key=int)
        f = fits[n]
        link = planning.CostFit(f["alpha_s"], f["beta_s_per_byte"], f["gamma_s_per_byte"]).link()
        cluster = planning.Cluster(int(n), int(n), link, link, f["gamma_s_per_byte"],
                                   name="calibration", description=calib["machine"]["hostname"],
                                   launch_overhead_s=f["launch_overhead_s"])
    elif name and os.path.exists(name):
        with open(name, encoding="utf-8") as f:
            cluster = planning.cluster_from_dict(json.load(f))
    else:
        raise ValueError(
            f"Unknown --cluster {name!r}; expected one of {sorted(planning.PRESETS)}, 'custom', "
            "'calibration' or the path of a JSON file"
        )
    changes = {}
    if flags_obj.num_accelerators is not None:
        changes["num_accelerators"] = flags_obj.num_accelerators
    if flags_obj.accelerators_per_node is not None:
        changes["accelerators_per_node"] = flags_obj.accelerators_per_node
    for side in ("intra", "inter"):
        link = getattr(cluster, f"{side}_node")
        lat, bw = getattr(flags_obj, f"{side}_latency_us"), getattr(flags_obj, f"{side}_bandwidth_gbps")
        if lat is not None or bw is not None:
            changes[f"{side}_node"] = planning.Link.from_us_gbps(
                link.latency_s * 1e6 if lat is None else lat,
                link.bandwidth_bytes_per_s / 1e9 if bw is None else bw,
            )
    if flags_obj.gamma_ns_per_byte is not None:
        changes["gamma_s_per_byte"] = flags_obj.gamma_ns_per_byte * 1e-9
    if flags_obj.use_calibrated_gamma:
        changes["gamma_s_per_byte"] = _calibrated(flags_obj)["reduction"]["gamma_s_per_byte"]
    cluster = planning.Cluster(**{**cluster.__dict__, **changes})
    wchanges = {k: v for k, v in {
        "num_parameters": flags_obj.num_parameters,
        "gradient_dtype": flags_obj.gradient_dtype,
        "per_accelerator_batch": flags_obj.per_accelerator_batch,
        "images_per_second_per_accelerator": flags_obj.images_per_second,
        "overlap": flags_obj.overlap,
    }.items() if v is not None}
    workload = planning.Workload(**{**workload.__dict__, **wchanges})
    if flags_obj.compression is not None:
        compression = None if flags_obj.compression == "none" else flags_obj.compression
    return cluster, workload, compression, preset


def _print_plan(cluster, workload, compression, rows, preset):
    print(f"\ncluster {cluster.name}: {cluster.num_accelerators} accelerators, "
          f"{cluster.accelerators_per_node} per node; intra {cluster.intra_node.to_dict()}, "
          f"inter {cluster.inter_node.to_dict()}, gamma {cluster.gamma_s_per_byte * 1e9:.3f} ns/B")
    print(f"workload: {workload.num_parameters:,} x {workload.gradient_dtype} gradients "
          f"({workload.gradient_bytes / 2**20:.1f} MiB), wire {compression or workload.gradient_dtype}, "
          f"batch {workload.per_accelerator_batch}/accelerator at "
          f"{workload.images_per_second_per_accelerator:g} img/s -> compute "
          f"{workload.compute_time_s * 1e3:.1f} ms/step, overlap {workload.overlap:g}")
    print(f"\n{'algorithm':<34} {'steps':>6} {'packs':>5} {'allreduce_ms':>12} {'step_ms':>8} "
          f"{'efficiency':>10} {'images/s':>11}")
    shown = rows[:12]
    for r in shown:
        print(f"{r.cost.label:<34} {r.cost.num_steps:>6} {r.cost.num_packs:>5} "
              f"{r.cost.total_s * 1e3:12.2f} {r.step_s * 1e3:8.2f} {r.scaling_efficiency:10.1%} "
              f"{r.images_per_second:11,.0f}")
    if len(rows) > len(shown):
        print(f"... {len(rows) - len(shown)} more (slower) candidates in --output_json")
    best = rows[0]
    print(f"\nrecommended: {best.cost.label}: all-reduce {best.cost.total_s * 1e3:.2f} ms, "
          f"scaling efficiency {best.scaling_efficiency:.1%}")
    if preset is not None and preset.reported:
        for n, eff in preset.reported.items():
            if n == cluster.num_accelerators:
                same = [r for r in rows if r.cost.algorithm == preset.algorithm]
                print(f"paper ({preset.source}) reports {eff:.1%} at N={n} with {preset.algorithm}; "
                      f"predicted for its algorithm {same[0].scaling_efficiency:.1%}" if same else "")


def _plot(path, cluster, workload, counts, kwargs, preset):
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    curves = planning.scaling_curve(cluster, workload, counts, **kwargs)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for algorithm, rows in sorted(curves.items()):
        xs = [r.cost.num_workers for r in rows]
        ax1.plot(xs, [r.cost.total_s * 1e3 for r in rows], marker="o", label=algorithm)
        ax2.plot(xs, [r.scaling_efficiency * 100 for r in rows], marker="o", label=algorithm)
    if preset is not None:
        for n, eff in preset.reported.items():
            ax2.scatter([n], [eff * 100], marker="*", s=160, color="k", zorder=5,
                        label=f"reported ({preset.source.split(',')[0]})")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("accelerators")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax1.set_yscale("log")
    ax1.set_ylabel("predicted all-reduce time per step (ms)")
    ax2.set_ylabel("predicted scaling efficiency (%)")
    fig.suptitle(f"{cluster.name}: {cluster.accelerators_per_node}/node, "
                 f"{workload.num_parameters / 1e6:.1f}M {workload.gradient_dtype} gradients, "
                 f"batch {workload.per_accelerator_batch}/accelerator")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {a: [(r.cost.num_workers, r.cost.total_s, r.scaling_efficiency) for r in rows]
            for a, rows in curves.items()}


def run(flags_obj):
    """Runs calibration and/or planning as the flags say; returns a dict of results."""
    if flags_obj.worker_index is not None:
        return _run_worker(flags_obj)
    if flags_obj.local_devices_worker is not None:
        return _run_local_devices_worker(flags_obj)
    results = {}
    if flags_obj.calibrate:
        results["calibration"] = calibrate(flags_obj)
    if flags_obj.cluster:
        cluster, workload, compression, preset = build_cluster_and_workload(flags_obj)
        algorithms = tuple(flags_obj.algorithms)
        if preset is not None and not flags_obj["algorithms"].present:
            algorithms = preset.algorithms  # e.g. no halving-doubling on a TPU torus
        kwargs = {"compression": compression, "bytes_per_pack": flags_obj.bytes_per_pack,
                  "fuse": flags_obj.fuse, "algorithms": algorithms}
        rows = planning.plan(cluster, workload, **kwargs)
        _print_plan(cluster, workload, compression, rows, preset)
        results["cluster"] = cluster.to_dict()
        results["workload"] = workload.to_dict()
        results["compression"] = compression
        results["plan"] = [r.to_dict() for r in rows]
        results["recommended"] = rows[0].to_dict()
        if flags_obj.plot:
            k = cluster.accelerators_per_node
            if flags_obj.plot_counts:
                counts = [int(c) for c in flags_obj.plot_counts]
            else:
                counts, c = [], k
                while c <= 4 * cluster.num_accelerators and c <= 16384:
                    counts.append(c)
                    c *= 2
            results["curves"] = _plot(flags_obj.plot, cluster, workload, counts, kwargs, preset)
            print(f"wrote {flags_obj.plot}")
    if not results:
        raise app.UsageError("Give --calibrate and/or --cluster=...")
    if flags_obj.output_json:
        with open(flags_obj.output_json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, default=str)
    return results


def main(_):
    run(FLAGS)


if __name__ == "__main__":
    define_flags()
    app.run(main)
