"""End-to-end tests of scripts/plan_allreduce.py (planning mode is pure Python and fast)."""

import json
import os
import subprocess
import sys

import pytest

from tfscale import planning

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "scripts", "plan_allreduce.py")


def run_script(*args, timeout=180):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def test_preset_plan_plot_and_json(tmp_path):
    out = run_script("--cluster=mikami", "--num_accelerators=1088",
                     f"--plot={tmp_path / 'plan.png'}", f"--output_json={tmp_path / 'plan.json'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "recommended:" in out.stdout and "reports 91.6% at N=1088" in out.stdout
    with open(tmp_path / "plan.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(tmp_path / "plan.png") > 10_000
    result = json.loads((tmp_path / "plan.json").read_text())
    preset = planning.get_preset("mikami")
    best = planning.recommend(preset.cluster.with_num_accelerators(1088), preset.workload)
    assert result["recommended"]["label"] == best.cost.label
    assert result["recommended"]["allreduce_ms"] == pytest.approx(best.cost.total_s * 1e3)
    assert set(result["curves"]) == {"flat", "torus", "hierarchical", "halving_doubling"}


def test_custom_cluster_from_flags_and_file(tmp_path):
    flags = ["--num_accelerators=64", "--accelerators_per_node=8", "--intra_latency_us=3",
             "--intra_bandwidth_gbps=100", "--inter_latency_us=12", "--inter_bandwidth_gbps=12.5",
             "--images_per_second=2375", "--compression=bfloat16"]
    out = run_script("--cluster=custom", *flags, f"--output_json={tmp_path / 'a.json'}")
    assert out.returncode == 0, out.stderr[-3000:]
    cluster = planning.Cluster(64, 8, planning.Link(3e-6, 100e9), planning.Link(12e-6, 12.5e9))
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(cluster.to_dict()))
    out2 = run_script(f"--cluster={path}", "--images_per_second=2375", "--compression=bfloat16",
                      f"--output_json={tmp_path / 'b.json'}")
    assert out2.returncode == 0, out2.stderr[-3000:]
    a = json.loads((tmp_path / "a.json").read_text())
    b = json.loads((tmp_path / "b.json").read_text())
    assert a["plan"] == b["plan"]
    workload = planning.Workload(images_per_second_per_accelerator=2375)
    best = planning.recommend(cluster, workload, compression="bfloat16")
    assert a["recommended"]["step_ms"] == pytest.approx(best.step_s * 1e3)


def test_bad_cluster_arguments_fail_clearly():
    out = run_script("--cluster=custom", "--num_accelerators=64")
    assert out.returncode != 0
    assert "--accelerators_per_node" in out.stderr and "--inter_bandwidth_gbps" in out.stderr
    out = run_script("--cluster=dgx")
    assert out.returncode != 0 and "Unknown --cluster 'dgx'" in out.stderr
    out = run_script("--cluster=akiba", "--inter_bandwidth_gbps=0")
    assert out.returncode != 0 and "must be > 0" in out.stderr


@pytest.mark.slow
def test_calibration_two_processes(tmp_path):
    path = tmp_path / "calibration.json"
    out = run_script("--calibrate", "--num_processes=2", "--message_bytes=4096,262144,1048576",
                     "--reps=3", f"--calibration_file={path}", "--worker_timeout_s=240", timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.loads(path.read_text())
    samples = [planning.TimingSample(**s) for s in result["samples"]]
    assert {(s.algorithm, s.grid_shape) for s in samples} == {("ring", None), ("torus", (1, 2))}
    assert all(s.num_workers == 2 and s.seconds > 0 for s in samples)
    fit = result["fits"]["per_num_processes"]["2"]
    assert fit["alpha_s"] >= 0 and fit["beta_s_per_byte"] > 0
    # The stored fit is the least-squares fit of the stored samples.
    again = planning.fit_cost_parameters(samples, result["reduction"]["gamma_s_per_byte"],
                                         launch_overhead_s=None)
    assert again.alpha_s == pytest.approx(fit["alpha_s"], rel=1e-9, abs=1e-12)
    assert again.launch_overhead_s == pytest.approx(fit["launch_overhead_s"], rel=1e-9, abs=1e-12)
    # Refitting the stored repetitions with another statistic needs no new timing.
    refit_path = tmp_path / "refit.json"
    refit = run_script("--calibrate", f"--samples_from={path}", "--statistic=min",
                       f"--calibration_file={refit_path}")
    assert refit.returncode == 0, refit.stderr[-3000:]
    refit_result = json.loads(refit_path.read_text())
    reps = result["reduction"]["raw_rep_seconds"]["processes"]
    assert [s["seconds"] for s in refit_result["samples"]] == [min(r) for r in reps]
    assert len(reps[0]) == 3
    # The calibrated link is usable as a cluster.
    plan = run_script("--cluster=calibration", f"--calibration_file={path}")
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert "recommended:" in plan.stdout
