"""End-to-end training speed of each all-reduce on one cluster: ``scripts/train.py`` side by side, in one run.

For each ``--all_reduce`` value (default: ``collective`` = MWMS's own all-reduce, tfscale's
``hierarchical`` and ``auto``) this script runs the same short training job with
``python -m tfscale.launch`` on one cluster, one algorithm after the other, reads each run's
``results.json`` and prints one table: training images/s (the first step of the epoch, with
its tracing, excluded; `tfscale.training.ThroughputCallback`), the step time it implies, the
wall time of the whole job, what ``auto`` picked, and the speed-up over the first algorithm.

``--cluster`` is either ``N`` (N worker processes on loopback) or ``NODESxWORKERS@RATE``
(an emulated multi-node cluster, `tfscale.emulated`: each node a network namespace whose
network card is shaped to RATE, e.g. ``2x2@200mbit``; needs root or CAP_NET_ADMIN).

Use a model whose gradients make the network matter: the default job is ResNet-50
(23.5 M parameters, 94 MB of float32 gradients per step) on 32x32 Fashion-MNIST images, which
keeps the compute per step small on a 2-core machine, so that the all-reduce decides the step
time, as it does at scale (Goyal et al., arXiv:1706.02677; Mikami et al., arXiv:1811.05233).

Example (docs/benchmarks.md, "End to end on an emulated 2-node cluster"):
  python scripts/benchmark_training.py --cluster=2x2@200mbit

The machine must be otherwise idle: every run shares its cores. The 1-minute load average is
recorded before and after each run.
"""

import os
import re
import shlex
import sys

from absl import app
from absl import flags

from tfscale import _atomic
from tfscale.planning import timing

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULT_TRAIN_FLAGS = ("--model=resnet50 --image_size=32 --global_batch_size=64 --epochs=1 --steps_per_epoch=25 "
                       "--warmup_epochs=0 --eval_every_epochs=1")
"""The job each algorithm runs: 25 steps of ResNet-50 at 32x32, global batch 64."""


def define_flags():
    """Defines this script's absl flags (idempotent for tests)."""
    if "cluster" in flags.FLAGS:
        return
    flags.DEFINE_string("cluster", "2x2@200mbit",
                        "N (worker processes on loopback, N >= 2) or NODESxWORKERS@RATE (emulated nodes, "
                        "e.g. 2x2@200mbit).")
    flags.DEFINE_list("all_reduce", ["collective", "hierarchical", "auto"],
                      "The --all_reduce values of scripts/train.py to compare; the first is the reference.")
    flags.DEFINE_string("train_flags", DEFAULT_TRAIN_FLAGS, "Flags every run of scripts/train.py gets.")
    flags.DEFINE_string("model_dir", "runs/benchmark_training", "Each run writes into MODEL_DIR/<all_reduce>.")
    flags.DEFINE_string("output_json", None, "Where to write the table and the runs (default: MODEL_DIR/summary.json).")
    flags.DEFINE_integer("timeout_seconds", 1800, "Limit on each run, in seconds.")


def parse_cluster(text):
    """``"4"`` -> launcher flags for 4 loopback workers; ``"2x2@200mbit"`` -> an emulated 2-node cluster.

    Returns:
      list of str, the flags of `python -m tfscale.launch`.

    Raises:
      ValueError: if `text` is neither form.
    """
    text = str(text).strip()
    if re.fullmatch(r"\d+", text) and int(text) >= 2:
        return ["--num_workers", text]
    match = re.fullmatch(r"(\d+)x(\d+)@(\S+)", text)
    if not match or int(match.group(1)) < 2 or int(match.group(2)) < 1:
        raise ValueError("Flag --cluster must be N (>= 2 loopback workers) or NODESxWORKERS@RATE with >= 2 nodes, "
                         f"e.g. 2x2@200mbit. Received: {text!r}")
    nodes, per_node = int(match.group(1)), int(match.group(2))
    return ["--num_workers", str(nodes * per_node), "--nodes", str(nodes), "--workers_per_node", str(per_node),
            "--inter_node_bandwidth", match.group(3)]


def table(rows):
    """The side-by-side table (str) of `rows`, ratios against the first row."""
    ref = rows[0]["images_per_second"]
    lines = ["| all_reduce | ran | images/s | step (ms) | job wall (s) | speed-up vs " + rows[0]["all_reduce"] + " |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ips = r["images_per_second"]
        lines.append(f"| {r['all_reduce']} | {r['algorithm']} | {ips:,.1f} | {r['step_ms']:,.0f} | "
                     f"{r['wall_seconds']:,.0f} | {ips / ref:.2f}x |")
    return "\n".join(lines)


def run(flags_obj):
    """Runs every algorithm's job one after the other; prints and returns the summary dict.

    Raises:
      ValueError: for a bad --cluster or an empty --all_reduce.
      RuntimeError: if a run fails or writes no results.json.
    """
    launch_flags = parse_cluster(flags_obj.cluster)
    if not flags_obj.all_reduce:
        raise ValueError("Flag --all_reduce must name at least one algorithm. Received: ''")
    train_flags = shlex.split(flags_obj.train_flags)
    rows = []
    for name in flags_obj.all_reduce:
        model_dir = os.path.abspath(os.path.join(flags_obj.model_dir, name))
        cmd = [sys.executable, "-m", "tfscale.launch", *launch_flags, "--",
               sys.executable, os.path.join(_REPO, "scripts", "train.py"), f"--all_reduce={name}",
               f"--model_dir={model_dir}", "--overwrite", *train_flags]
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        results, load_before, load_after = timing.run_training_job(
            cmd, model_dir, f"--all_reduce={name}", flags_obj.timeout_seconds, cwd=_REPO)
        ips = results["images_per_second"]
        batch = results["config"]["global_batch_size"]
        rows.append({"all_reduce": name, "algorithm": results["all_reduce_algorithm"], "images_per_second": ips,
                     "step_ms": 1e3 * batch / ips, "wall_seconds": results["wall_seconds"],
                     "top1": results["top1"], "load_before": load_before, "load_after": load_after,
                     "results": os.path.join(model_dir, "results.json")})
    text = table(rows)
    print(text)
    print(f"load average (1, 5, 15 min) before/after each run: "
          f"{[(r['all_reduce'], r['load_before'], r['load_after']) for r in rows]}")
    summary = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "cluster": flags_obj.cluster,
               "train_flags": flags_obj.train_flags, "rows": rows, "table": text}
    output = flags_obj.output_json or os.path.join(flags_obj.model_dir, "summary.json")
    _atomic.write_json_atomic(output, summary, trailing_newline=False, indent=1)
    return summary


def main(_):
    run(flags.FLAGS)


if __name__ == "__main__":
    define_flags()
    app.run(main)
