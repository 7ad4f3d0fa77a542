"""Tests for tfscale.planning.timing.run_training_job (the benchmarks' one way to run a whole job)."""

import json
import os
import sys

import pytest

from tfscale.planning import timing


def _job(model_dir, results, code=0):
    """A stand-in for train.py: writes `results` (unless None) to model_dir/results.json, then exits `code`."""
    write = "" if results is None else (
        f"os.makedirs({str(model_dir)!r}, exist_ok=True); "
        f"open(os.path.join({str(model_dir)!r}, 'results.json'), 'w').write({json.dumps(results)!r}); ")
    return [sys.executable, "-c", f"import os, sys; {write}print('oops', file=sys.stderr); sys.exit({code})"]


def test_returns_the_results_and_the_load_around_the_job(tmp_path):
    model_dir = tmp_path / "run"
    results, before, after = timing.run_training_job(
        _job(model_dir, {"images_per_second": 12.5, "top1": 0.5}), str(model_dir), "fake", 60, capture_output=True)
    assert results == {"images_per_second": 12.5, "top1": 0.5}
    assert len(before) == len(after) == (3 if hasattr(os, "getloadavg") else 0)


@pytest.mark.parametrize("results, code, match", [
    ({"images_per_second": 12.5}, 3, "The fake run failed with exit code 3:\noops"),
    (None, 0, "The fake run failed with exit code 0"),  # exited 0 but wrote no results.json
    ({"images_per_second": None}, 0, "The fake run recorded no images/s"),
])
def test_a_failed_job_is_one_clear_error_naming_it(tmp_path, results, code, match):
    model_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match=match):
        timing.run_training_job(_job(model_dir, results, code), str(model_dir), "fake", 60, capture_output=True)
