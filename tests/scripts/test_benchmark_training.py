"""Tests of scripts/benchmark_training.py: cluster parsing, the ratio table, and one real 2-worker run (slow)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "scripts", "benchmark_training.py")


def _module():
    spec = importlib.util.spec_from_file_location("benchmark_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parse_cluster_loopback_and_emulated():
    bt = _module()
    assert bt.parse_cluster("4") == ["--num_workers", "4"]
    assert bt.parse_cluster("2x2@200mbit") == ["--num_workers", "4", "--nodes", "2", "--workers_per_node", "2",
                                               "--inter_node_bandwidth", "200mbit"]


@pytest.mark.parametrize("bad", ["1", "1x4@1gbit", "2x2", "two", "2x0@1gbit", ""])
def test_parse_cluster_rejects_bad_input_naming_the_flag(bad):
    bt = _module()
    with pytest.raises(ValueError, match="--cluster") as info:
        bt.parse_cluster(bad)
    assert repr(bad) in str(info.value)


def test_table_ratios_are_against_the_first_row():
    bt = _module()
    rows = [dict(all_reduce="collective", algorithm="collective", images_per_second=10.0, step_ms=6400.0,
                 wall_seconds=300.0),
            dict(all_reduce="auto", algorithm="hierarchical", images_per_second=15.0, step_ms=4266.7,
                 wall_seconds=250.0)]
    text = bt.table(rows)
    lines = text.splitlines()
    assert "speed-up vs collective" in lines[0]
    assert lines[2].endswith("| 1.00x |") and lines[3].endswith("| 1.50x |")
    assert "| auto | hierarchical |" in lines[3]


@pytest.mark.slow
def test_two_loopback_workers_end_to_end(tmp_path):
    out = tmp_path / "summary.json"
    cmd = [sys.executable, SCRIPT, "--cluster=2", "--all_reduce=collective,flat",
           f"--model_dir={tmp_path / 'runs'}", f"--output_json={out}",
           "--train_flags=--epochs=1 --steps_per_epoch=4 --global_batch_size=32 --warmup_epochs=0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert [r["all_reduce"] for r in summary["rows"]] == ["collective", "flat"]
    assert [r["algorithm"] for r in summary["rows"]] == ["collective", "flat"]
    assert all(r["images_per_second"] > 0 for r in summary["rows"])
    assert "| flat | flat |" in proc.stdout
