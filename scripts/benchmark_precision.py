"""Training speed of each ``--dtype`` with and without ``--jit_compile`` (XLA): ``scripts/train.py`` side by side.

Each cell of the table is one short run of ``scripts/train.py`` (default: the default job's model and data,
ResNet-8 on Fashion-MNIST, 1 epoch capped at ``--steps`` steps, no evaluation until its end) with one
``--dtype`` (float32, mixed_bfloat16, mixed_float16) and ``--jit_compile`` off or on. XLA compiles one device's
step, so every cell runs with ``--num_replicas`` devices (default 1; ``--num_replicas=4`` gives the default job's
4 replicas, where only the non-XLA cells can run). The cells run one after the other, ``--reps`` rounds of all of
them interleaved, so load changes hit all cells alike; the table gives the median images/s of each cell
(`tfscale.training.ThroughputCallback`: the epoch's first step, with its tracing or XLA compilation, excluded)
and its ratio to float32 without XLA, and the 1-minute load average before and after every run.

Mixed precision on a CPU: float16 and bfloat16 matrix multiplications and convolutions need hardware support
(AVX512-FP16 / AMX-BF16 / AVX512-BF16); without it TensorFlow converts to float32 and back, and the mixed
policies are expected to be slower than float32. The table reports what this machine does.

Example:
  python scripts/benchmark_precision.py --reps=3 --output=/tmp/benchmark_precision.json
"""

import os
import shlex
import statistics
import sys

from absl import app
from absl import flags

from tfscale import _atomic
from tfscale.planning import timing

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = ("float32", "mixed_bfloat16", "mixed_float16")


def define_flags():
    """Defines this script's absl flags (idempotent for tests)."""
    if "dtypes" in flags.FLAGS:
        return
    flags.DEFINE_list("dtypes", list(DTYPES), "The --dtype values of scripts/train.py to compare.")
    flags.DEFINE_list("jit_compile", ["false", "true"], "The --jit_compile values to compare (false, true).")
    flags.DEFINE_integer("num_replicas", 1, "--num_replicas of every run (XLA needs 1 device per process).")
    flags.DEFINE_integer("steps", 60, "Training steps per run (--steps_per_epoch; 1 epoch).")
    flags.DEFINE_integer("reps", 3, "Rounds over all cells; the table gives each cell's median.")
    flags.DEFINE_string("train_flags", "", "Extra flags of every run (e.g. '--global_batch_size=512').")
    flags.DEFINE_string("model_dir", "runs/benchmark_precision", "Each run writes into MODEL_DIR/<cell>.")
    flags.DEFINE_string("output", None, "JSON output path (default: MODEL_DIR/summary.json).")
    flags.DEFINE_integer("timeout_seconds", 1800, "Limit on each run, in seconds.")


def cells(dtypes, jit_values):
    """The `(dtype, jit_compile)` cells, float32 without XLA first (the reference).

    Raises:
      ValueError: for a dtype not in `DTYPES` or a jit value other than true/false.
    """
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"Flag --dtypes must name values of {list(DTYPES)}. Received: {d!r}")
    jits = []
    for j in jit_values:
        if str(j).lower() not in ("true", "false"):
            raise ValueError(f"Flag --jit_compile must hold true and/or false. Received: {j!r}")
        jits.append(str(j).lower() == "true")
    out = [(d, j) for j in sorted(set(jits)) for d in dtypes]
    return sorted(out, key=lambda c: (c != ("float32", False), out.index(c)))


def table(rows):
    """The side-by-side table (str): median images/s per cell and its ratio to the first row."""
    ref = rows[0]["images_per_second"]
    lines = ["| --dtype | --jit_compile | images/s (median) | step (ms) | vs " + rows[0]["cell"] + " | runs |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        ips = r["images_per_second"]
        lines.append(f"| {r['dtype']} | {'on' if r['jit_compile'] else 'off'} | {ips:,.0f} | {r['step_ms']:,.0f} | "
                     f"{ips / ref:.2f}x | {', '.join(f'{x:,.0f}' for x in r['all'])} |")
    return "\n".join(lines)


def run(flags_obj):
    """Runs every cell `--reps` times, interleaved; prints and returns the summary dict.

    Raises:
      ValueError: for bad flags.
      RuntimeError: if a run fails or records no images/s.
    """
    todo = cells(flags_obj.dtypes, flags_obj.jit_compile)
    if flags_obj.num_replicas > 1 and any(j for _, j in todo):
        raise ValueError(f"Flag --jit_compile=true needs --num_replicas=1 (XLA compiles one device's step). "
                         f"Received: --num_replicas={flags_obj.num_replicas}")
    if flags_obj.steps < 3 or flags_obj.reps < 1:
        raise ValueError(f"Flags --steps must be >= 3 and --reps >= 1. Received: --steps={flags_obj.steps}, "
                         f"--reps={flags_obj.reps}")
    samples = {c: [] for c in todo}
    loads = []
    for rep in range(flags_obj.reps):
        for dtype, jit in todo:
            name = f"{dtype}{'_xla' if jit else ''}"
            model_dir = os.path.abspath(os.path.join(flags_obj.model_dir, name))
            cmd = [sys.executable, os.path.join(_REPO, "scripts", "train.py"), f"--dtype={dtype}",
                   f"--jit_compile={str(jit).lower()}", f"--num_replicas={flags_obj.num_replicas}", "--epochs=1",
                   f"--steps_per_epoch={flags_obj.steps}", "--warmup_epochs=0", f"--model_dir={model_dir}",
                   "--overwrite", *shlex.split(flags_obj.train_flags)]
            print(f"== round {rep + 1}/{flags_obj.reps}, {name}: {' '.join(cmd)}", flush=True)
            results, before, after = timing.run_training_job(cmd, model_dir, name, flags_obj.timeout_seconds,
                                                             cwd=_REPO, capture_output=True)
            samples[(dtype, jit)].append(results["images_per_second"])
            batch = results["config"]["global_batch_size"]
            loads.append({"cell": name, "round": rep + 1, "load_before": before, "load_after": after,
                          "images_per_second": results["images_per_second"], "top1": results["top1"]})
            print(f"   {results['images_per_second']:,.0f} images/s", flush=True)
    rows = []
    for dtype, jit in todo:
        ips = statistics.median(samples[(dtype, jit)])
        rows.append({"cell": f"{dtype}{' + XLA' if jit else ''}", "dtype": dtype, "jit_compile": jit,
                     "images_per_second": ips, "step_ms": 1e3 * batch / ips, "all": samples[(dtype, jit)]})
    text = table(rows)
    print(text)
    print("1-minute load average before/after each run: "
          + ", ".join(f"{r['cell']}#{r['round']} {r['load_before'][0]:.1f}/{r['load_after'][0]:.1f}" for r in loads))
    summary = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "num_replicas":
               flags_obj.num_replicas, "steps": flags_obj.steps, "train_flags": flags_obj.train_flags, "rows": rows,
               "runs": loads, "table": text}
    output = flags_obj.output or os.path.join(flags_obj.model_dir, "summary.json")
    _atomic.write_json_atomic(output, summary, trailing_newline=False, indent=1)
    return summary


def main(_):
    run(flags.FLAGS)


if __name__ == "__main__":
    define_flags()
    app.run(main)
