"""tfscale's console commands (`pip install .` puts them on the PATH).

| command | runs | the same as |
|---|---|---|
| `tfscale-train` | the main training job | `python scripts/train.py` |
| `tfscale-launch` | N worker processes of a command | `python -m tfscale.launch` |
| `tfscale-build-records` | ImageNet-format TFRecords from images, arrays or TFDS | `python scripts/build_tfrecords.py` |
| `tfscale-plan` | the all-reduce cost model and calibration | `python scripts/plan_allreduce.py` |
| `tfscale-benchmark allreduce\\|allreduce-multiworker\\|input` | the benchmarks | `python scripts/benchmark_*.py` |

The programs' code is the repository's `scripts/*.py`, installed as the package `tfscale.cli.scripts` (see
pyproject.toml), so `python scripts/train.py` in a clone and `tfscale-train` anywhere run the same file. Every flag
is the script's (`--helpfull` lists them); relative paths (`--data_dir`, `--model_dir`) are relative to the current
directory.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["benchmark", "build_records", "launch", "plan", "train"]

# tfscale-benchmark SUBCOMMAND -> the script that runs it.
BENCHMARKS = {
    "allreduce": "benchmark_allreduce",
    "allreduce-multiworker": "benchmark_allreduce_multiworker",
    "input": "benchmark_input",
}


def _run_script(module_name, prog):
    """Defines the flags of `tfscale.cli.scripts.<module_name>` and runs its `main` under absl, as its `__main__`
    block does (`define_flags(); app.run(main)`), with TensorFlow's known-harmless log lines hidden unless
    `--verbosity` is given, and an exit as soon as `main` returns (`tfscale._process`)."""
    from absl import app

    from tfscale import _process

    verbose = any(arg.split("=")[0] in ("--verbosity", "-v") for arg in sys.argv[1:])
    _process.quiet_tensorflow_logs(verbose=verbose)  # before the script imports TensorFlow
    module = importlib.import_module(f"tfscale.cli.scripts.{module_name}")
    module.define_flags()
    sys.argv[0] = prog
    app.run(lambda argv: _process.run_and_exit_promptly(module.main, argv))


def train():
    """`tfscale-train`: scripts/train.py (exits as soon as its results are written)."""
    _run_script("train", "tfscale-train")


def build_records():
    """`tfscale-build-records`: scripts/build_tfrecords.py."""
    _run_script("build_tfrecords", "tfscale-build-records")


def plan():
    """`tfscale-plan`: scripts/plan_allreduce.py."""
    _run_script("plan_allreduce", "tfscale-plan")


def launch():
    """`tfscale-launch`: `tfscale.launch.main`; returns its exit code."""
    from tfscale import launch as launch_lib

    return launch_lib.main()


def benchmark():
    """`tfscale-benchmark SUBCOMMAND [flags]`, SUBCOMMAND one of `BENCHMARKS`."""
    name = sys.argv[1] if len(sys.argv) > 1 else None
    if name not in BENCHMARKS:
        sys.exit(f"usage: tfscale-benchmark {{{'|'.join(BENCHMARKS)}}} [flags]  (--helpfull after the subcommand "
                 f"lists its flags). Received: {name!r}")
    del sys.argv[1]
    _run_script(BENCHMARKS[name], f"tfscale-benchmark {name}")
