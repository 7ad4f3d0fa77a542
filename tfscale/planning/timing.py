"""The one timing harness of tfscale's benchmarks and calibration: interleaved repetitions.

Pure Python. `time_interleaved` runs every candidate once per round, round after round, so
that a drift in machine load hits all candidates alike and their ratios stay comparable in
one run (what `scripts/benchmark_allreduce.py`, `scripts/benchmark_allreduce_multiworker.py`
and `scripts/plan_allreduce.py --calibrate` report). `load_average` records how quiet the
machine was, which every figure in `docs/` carries. `run_training_job` runs one training
job (`scripts/train.py`, possibly under the launcher) and reads back its `results.json`, for the
benchmarks that compare whole jobs side by side (`scripts/benchmark_training.py`,
`scripts/benchmark_precision.py`).
"""

import dataclasses
import json
import os
import statistics
import subprocess
import time

__all__ = ["Timings", "load_average", "run_training_job", "time_interleaved"]


@dataclasses.dataclass
class Timings:
    """Wall-clock (and CPU) seconds of every repetition of each candidate.

    Attributes:
      wall_s: dict name -> list of float, seconds per repetition (`time.perf_counter`).
      cpu_s: dict name -> list of float, this process's CPU seconds per repetition
        (`time.process_time`; all threads of the process).
      load_average: tuple of 3 floats, `os.getloadavg()` when the timing ended.
    """

    wall_s: dict
    cpu_s: dict
    load_average: tuple = ()

    def median_ms(self, cpu=False):
        """dict name -> median milliseconds of the repetitions (CPU time with `cpu`)."""
        table = self.cpu_s if cpu else self.wall_s
        return {name: 1e3 * statistics.median(times) for name, times in table.items()}


def load_average():
    """Returns `os.getloadavg()` (1, 5 and 15 minute averages), or () where it is unavailable."""
    try:
        return tuple(os.getloadavg())
    except OSError:  # pragma: no cover - not on Linux
        return ()


def time_interleaved(calls, reps, warmup=0, before=None):
    """Times each callable of `calls` `reps` times, interleaved: one round calls every one.

    Args:
      calls: dict name -> callable taking no argument; it must block until its work is
        done (e.g. fetch a result with ``.numpy()``).
      reps: int >= 1, timed rounds.
      warmup: int >= 0, untimed rounds first (tracing, caches). Default 0.
      before: optional callable run untimed before each timed call (e.g. a barrier that
        lines up the processes of a multi-process benchmark).

    Returns:
      `Timings`.

    Raises:
      ValueError: if `reps` < 1, `warmup` < 0 or `calls` is empty.
    """
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"Argument `reps` must be an int >= 1. Received: reps={reps!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"Argument `warmup` must be an int >= 0. Received: warmup={warmup!r}")
    if not calls:
        raise ValueError("Argument `calls` must name at least one callable. Received: {}")
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    wall = {name: [] for name in calls}
    cpu = {name: [] for name in calls}
    for _ in range(reps):
        for name, fn in calls.items():
            if before is not None:
                before()
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return Timings(wall, cpu, load_average())


def run_training_job(cmd, model_dir, name, timeout_seconds, cwd=None, capture_output=False):
    """Runs one training job to the end and returns its `results.json` with the load around it.

    Args:
      cmd: list of str, the command (e.g. ``[python, "scripts/train.py", "--model_dir=...", ...]``).
      model_dir: str, the job's `--model_dir`, where it writes `results.json`.
      name: str, how errors name the job (e.g. ``"--all_reduce=torus"``).
      timeout_seconds: float > 0, limit on the job's wall time, in seconds.
      cwd: optional str, working directory of the job.
      capture_output: bool, keep the job's output (shown only when it fails) instead of passing it through.
        Default False.

    Returns:
      `(results, load_before, load_after)`: the parsed `results.json` (dict) and `load_average()` before and
      after the job.

    Raises:
      RuntimeError: if the job exits non-zero, writes no `results.json` or records no images/s.
      subprocess.TimeoutExpired: if it runs longer than `timeout_seconds`.
    """
    load_before = load_average()
    proc = subprocess.run(cmd, cwd=cwd, timeout=timeout_seconds, capture_output=capture_output, text=True)
    path = os.path.join(model_dir, "results.json")
    if proc.returncode != 0 or not os.path.exists(path):
        output = f":\n{proc.stderr[-3000:]}" if capture_output else "; see its output above."
        raise RuntimeError(f"The {name} run failed with exit code {proc.returncode}{output}")
    with open(path) as f:
        results = json.load(f)
    if not results.get("images_per_second"):
        raise RuntimeError(f"The {name} run recorded no images/s (too few steps?): {path}")
    return results, load_before, load_average()
