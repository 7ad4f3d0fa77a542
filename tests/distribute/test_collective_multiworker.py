"""Multi-process tests of the torus / hierarchical / ring all-reduce across workers.

Each test starts real worker processes on 127.0.0.1 (through ``python -m tfscale.launch``
or directly), bounds them with timeouts and stops only the processes it started. The
worker program is ``mw_worker.py`` beside this file. References are independent: numpy
sums of the values every replica contributes, and a one-process Keras run.
"""

import glob
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "mw_worker.py")
sys.path.insert(0, HERE)

import mw_worker  # noqa: E402


def _communicate(proc, timeout):
    """Waits for `proc` (own session); on timeout stops its process group, then fails."""
    try:
        out, _ = proc.communicate(timeout=timeout)
        return out
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                out, _ = proc.communicate(timeout=15)
                break
            except subprocess.TimeoutExpired:
                out = ""
        pytest.fail(f"command did not finish within {timeout} s:\n{out[-4000:]}")


def _launch(worker_args, out_dir, num_workers=2, devices_per_worker=1, timeout=240, launch_args=()):
    """Runs mw_worker.py under the launcher; returns (exit code, output)."""
    cmd = [
        sys.executable, "-m", "tfscale.launch", "--num_workers", str(num_workers), *launch_args,
        "--devices_per_worker", str(devices_per_worker), "--timeout_seconds", str(timeout - 30),
        "--grace_seconds", "5", "--", sys.executable, WORKER, "--out_dir", str(out_dir), *worker_args,
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    out = _communicate(proc, timeout)
    return proc.returncode, out


def _reference_fit(out_dir, extra_args=(), timeout=180):
    """One process, no strategy: the reference weights for the fit tests."""
    proc = subprocess.Popen(
        [sys.executable, WORKER, "--mode", "fit", "--num_workers_expected", "0",
         "--out_dir", str(out_dir), *extra_args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    out = _communicate(proc, timeout)
    assert proc.returncode == 0, out[-4000:]
    return dict(np.load(os.path.join(out_dir, "fit_rank0.npz")))


_RTOL = {"float64": 1e-12, "float32": 1e-6, "float16": 1e-3}
_UNIT_ROUNDOFF = {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8}


def _check_allreduce(out_dir, num_workers, devices_per_worker, compression=None):
    """Compares every replica's all-reduced values with the numpy sum; returns max rel. error."""
    metas = sorted(glob.glob(os.path.join(out_dir, "allreduce_rank*.json")))
    assert len(metas) == num_workers
    worst = 0.0
    for path in metas:
        meta = json.load(open(path))
        n = meta["num_replicas"]
        assert n == num_workers * devices_per_worker
        assert len(meta["devices"]) == devices_per_worker
        data = np.load(path.replace(".json", ".npz"))
        for i, (shape, dtype) in enumerate(meta["cases"]):
            a, b = mw_worker.case_arrays(tuple(shape), dtype, seed=i)
            contributions = [(a + g * b).astype(dtype).astype("float64") for g in range(n)]
            expected = np.sum(contributions, axis=0)
            scale = np.sum(np.abs(contributions), axis=0)
            if compression and dtype in ("float32", "float64"):
                bound = 4 * _UNIT_ROUNDOFF[compression] * scale
            else:
                bound = _RTOL[dtype] * scale + 1e-30
            for d in range(devices_per_worker):
                got = data[f"case{i}_dev{d}"]
                assert got.shape == tuple(shape)
                err = np.abs(got - expected)
                assert np.all(err <= bound), (path, d, shape, dtype, float(np.max(err - bound)))
                worst = max(worst, float(np.max(err / np.maximum(scale, 1e-30))))
    return worst


ALLREDUCE_CASES = [
    # (num_workers, devices_per_worker, worker args, compression)
    # Packs of < 2 KiB take the two-all-reduce latency path, the 4 KiB one the torus path.
    pytest.param(2, 1, ["--algorithm", "torus", "--small_pack_bytes", "2048"], None, id="2w-torus-1x2-smallpacks"),
    pytest.param(2, 1, ["--algorithm", "ring"], None, id="2w-ring"),
    pytest.param(2, 2, ["--algorithm", "torus", "--grid_shape", "2x2", "--compression", "fp16",
                        "--dtypes", "float32,float64"], "fp16", id="2wx2d-torus-2x2-fp16"),
    pytest.param(2, 2, ["--algorithm", "hierarchical", "--compression", "bf16",
                        "--dtypes", "float32"], "bf16", id="2wx2d-hierarchical-bf16"),
    pytest.param(4, 1, ["--algorithm", "torus", "--grid_shape", "2x2"], None, id="4w-torus-2x2"),
    pytest.param(2, 2, ["--algorithm", "halving_doubling", "--small_pack_bytes", "0"], None,
                 id="2wx2d-halving_doubling"),
    pytest.param(2, 2, ["--algorithm", "halving_doubling", "--compression", "fp16", "--small_pack_bytes", "0",
                        "--dtypes", "float32"], "fp16", id="2wx2d-halving_doubling-fp16", marks=pytest.mark.slow),
    # 3 ranks: not a power of two, so the fold (reduce) and unfold (broadcast) phases run too.
    pytest.param(3, 1, ["--algorithm", "halving_doubling", "--small_pack_bytes", "0"], None,
                 id="3w-halving_doubling-fold", marks=pytest.mark.slow),
    # An algorithm registered by the test only (tests/distribute/_toy_algorithm.py).
    pytest.param(2, 1, ["--algorithm", "toy_reduce_broadcast", "--register_toy"], None, id="2w-toy-registered"),
    # MWMS's own all-reduce (auto's "collective" pick) on values of three dtypes: one runtime call per dtype.
    pytest.param(2, 2, ["--algorithm", "flat", "--runtime_all_reduce"], None, id="2wx2d-runtime-mixed-dtypes"),
    # The cost model picks the algorithm (one host: a uniform link).
    pytest.param(2, 2, ["--algorithm", "auto"], None, id="2wx2d-auto"),
    pytest.param(4, 1, ["--algorithm", "hierarchical", "--devices_per_node", "2"], None,
                 id="4w-hierarchical", marks=pytest.mark.slow),
    pytest.param(4, 1, ["--algorithm", "ring"], None, id="4w-ring", marks=pytest.mark.slow),
    pytest.param(4, 1, ["--algorithm", "torus", "--grid_shape", "2x2", "--small_pack_bytes", "2048"], None,
                 id="4w-torus-2x2-smallpacks", marks=pytest.mark.slow),
    pytest.param(4, 1, ["--algorithm", "torus", "--grid_shape", "1x4", "--bytes_per_pack", "0"], None,
                 id="4w-torus-1x4-onepack", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("num_workers, devices_per_worker, args, compression", ALLREDUCE_CASES)
def test_allreduce_matches_numpy_sum(tmp_path, num_workers, devices_per_worker, args, compression):
    code, out = _launch(["--mode", "allreduce", *args], tmp_path, num_workers, devices_per_worker)
    assert code == 0, out[-4000:]
    worst = _check_allreduce(tmp_path, num_workers, devices_per_worker, compression)
    if compression:
        # The wire really was 16-bit: float32 sums are off by more than float32 rounding.
        assert worst > 1e-5
    else:
        assert worst < 1e-6


def test_grid_not_matching_replicas_is_a_clear_error(tmp_path):
    code, out = _launch(["--mode", "allreduce", "--algorithm", "torus", "--grid_shape", "2x2"], tmp_path,
                        num_workers=2, timeout=120)
    assert code != 0
    assert "Argument `grid_shape`='2x2' has 2x2=4 devices, but there are num_devices=2" in out
    assert re.search(r"\[launch\] worker [01] \(pid \d+\) exited with code 1", out)


def _check_fit(out_dir, num_workers, reference, atol=1e-5):
    for rank in range(num_workers):
        weights = np.load(os.path.join(out_dir, f"fit_rank{rank}.npz"))
        assert sorted(weights.files) == sorted(reference)
        for key in reference:
            np.testing.assert_allclose(weights[key], reference[key], atol=atol, rtol=0,
                                       err_msg=f"rank {rank} {key}")


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param([], id="keras-syncbn-sgd"),
        pytest.param(["--tfscale_layers"], id="tfscale-dbn-lars", marks=pytest.mark.slow),
    ],
)
def test_fit_two_workers_matches_one_process(tmp_path, variant):
    """Keras fit over 2 workers (torus) == 1 process on the same global batch, to 1e-5.

    Variants: Keras SyncBN + momentum SGD; tfscale's DistributedBatchNormalization + LARS.
    The weights include the BN moving statistics.
    """
    code, out = _launch(["--mode", "fit", "--algorithm", "torus", "--small_pack_bytes", "-1", *variant],
                        tmp_path / "mw")
    assert code == 0, out[-4000:]
    reference = _reference_fit(tmp_path / "ref", variant)
    _check_fit(tmp_path / "mw", 2, reference)
    assert json.load(open(tmp_path / "mw" / "fit_rank0.json"))["replicas"] == 2
    # Training moved the weights, so the comparison is not trivially true.
    import keras

    initial = mw_worker.build_model(keras, tfscale_layers=bool(variant)).get_weights()
    assert max(np.max(np.abs(reference[f"w{i}"] - w)) for i, w in enumerate(initial)) > 1e-3


@pytest.mark.slow
def test_long_fit_keeps_one_watchdog_thread_not_one_per_collective(tmp_path):
    """Regression: the 4-worker default job died in epoch 2 with "Resource temporarily unavailable".

    TF starts a thread per collective that carries a timeout and keeps it for the whole timeout, so threads
    grow with collectives x timeout. 240 steps (SyncBN: several collectives per step) with per-collective
    timeouts leave well over a thousand threads; the default (one CollectiveWatchdog) stays near the
    thread pools' size.
    """
    args = ["--mode", "fit", "--algorithm", "torus", "--epochs", "60", "--timeout_seconds", "300"]
    counts = {}
    for mode, extra in (("watchdog", []), ("per_collective", ["--per_collective_timeout"])):
        code, out = _launch([*args, *extra], tmp_path / mode)
        assert code == 0, out[-4000:]
        counts[mode] = [int(n) for n in re.findall(r"fit done, losses .*, (\d+) threads", out)]
        assert len(counts[mode]) == 2, out[-3000:]
    assert max(counts["watchdog"]) < 300, counts  # measured: 110-115
    assert min(counts["per_collective"]) > max(counts["watchdog"]) + 1000, counts


@pytest.mark.slow
def test_fit_four_workers_torus_2x2_matches_one_process(tmp_path):
    code, out = _launch(["--mode", "fit", "--algorithm", "torus", "--grid_shape", "2x2"], tmp_path / "mw",
                        num_workers=4, timeout=400)
    assert code == 0, out[-4000:]
    _check_fit(tmp_path / "mw", 4, _reference_fit(tmp_path / "ref"))


@pytest.mark.slow
def test_killed_worker_makes_survivor_fail_within_timeout(tmp_path):
    """Without the launcher (which would stop it at once), the survivor must not hang."""
    from tfscale import launch

    timeout_s = 10.0
    envs = launch.worker_environments(launch.find_free_ports(2))
    cmd = [sys.executable, WORKER, "--mode", "resume", "--out_dir", str(tmp_path), "--epochs", "4",
           "--die_at_epoch", "1", "--die_rank", "1", "--timeout_seconds", str(timeout_s),
           "--step_sleep", "0.2"]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) for env in envs]
    try:
        outs = [_communicate(p, 240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert procs[1].returncode == -signal.SIGKILL, outs[1][-3000:]
    killed_at = float(re.search(r"killing myself at epoch 1 at ([0-9.]+)", outs[1]).group(1))
    match = re.search(r"rank 0: WorkerFailureError at ([0-9.]+): (.*)", outs[0])
    assert procs[0].returncode == 3 and match, outs[0][-3000:]
    failed_at, message = float(match.group(1)), match.group(2)
    assert "collective timeout (timeout_seconds=10.0)" in message
    # Within the timeout plus a margin for a loaded 2-core machine.
    assert failed_at - killed_at < timeout_s + 30, (failed_at - killed_at, message)


@pytest.mark.slow
def test_hung_worker_makes_the_watchdog_abort_the_others(tmp_path):
    """A peer that hangs (alive, so no connection error and no missed heartbeat) is caught by the watchdog."""
    from tfscale import launch

    timeout_s = 10.0
    envs = launch.worker_environments(launch.find_free_ports(2))
    cmd = [sys.executable, WORKER, "--mode", "resume", "--out_dir", str(tmp_path), "--epochs", "3",
           "--hang_at_epoch", "1", "--hang_seconds", "90", "--die_rank", "1", "--timeout_seconds", str(timeout_s)]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) for env in envs]
    try:
        out = _communicate(procs[0], 240)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    hung = procs[1].stdout.read()
    hung_at = float(re.search(r"hanging at epoch 1 at ([0-9.]+)", hung).group(1))
    match = re.search(r"rank 0: WorkerFailureError at ([0-9.]+): (.*)", out)
    assert procs[0].returncode == 3 and match, out[-3000:]
    failed_at, message = float(match.group(1)), match.group(2)
    assert "CollectiveWatchdog" in message and "timeout_seconds=10" in message, message
    assert timeout_s - 1 < failed_at - hung_at < timeout_s + 30, (failed_at - hung_at, message)


@pytest.mark.slow
def test_launcher_reports_death_and_rerun_resumes(tmp_path):
    args = ["--mode", "resume", "--epochs", "3", "--die_at_epoch", "1", "--die_rank", "1",
            "--timeout_seconds", "20"]
    code, out = _launch(args, tmp_path / "mw", timeout=300)
    assert code == 128 + signal.SIGKILL, out[-4000:]
    assert re.search(r"\[launch\] worker 1 \(pid \d+\) was killed by SIGKILL; stopping workers \[0\]", out), out[-3000:]
    # Same command again: resumes from the BackupAndRestore checkpoint of epoch 0.
    code, out = _launch(args, tmp_path / "mw", timeout=300)
    assert code == 0, out[-4000:]
    epochs = [int(e) for e in open(tmp_path / "mw" / "epochs_rank0.txt").read().split()]
    assert epochs == [0, 1, 1, 2], epochs  # Run 1: 0, 1 (died); run 2 restarts at 1: lost < 1 epoch.
    _check_fit(tmp_path / "mw", 2, _reference_fit(tmp_path / "ref", ["--epochs", "3"]))


_NETNS_OK, _NETNS_WHY = __import__("tfscale.netns", fromlist=["netns"]).namespace_support()


@pytest.mark.skipif(not _NETNS_OK, reason=f"network namespaces unavailable: {_NETNS_WHY}")
@pytest.mark.parametrize("args", [
    pytest.param(["--algorithm", "hierarchical", "--devices_per_node", "2"], id="hierarchical"),
    pytest.param(["--algorithm", "torus", "--grid_shape", "2x2"], id="torus", marks=pytest.mark.slow),
    pytest.param(["--algorithm", "flat"], id="flat", marks=pytest.mark.slow),
    pytest.param(["--algorithm", "halving_doubling", "--small_pack_bytes", "0"], id="halving_doubling",
                 marks=pytest.mark.slow),
    pytest.param(["--algorithm", "auto"], id="auto", marks=pytest.mark.slow),
])
def test_allreduce_on_an_emulated_two_node_cluster(tmp_path, args):
    """2 nodes x 2 workers in network namespaces joined by 1 Gbit/s shaped links: the sums still match numpy."""
    code, out = _launch(["--mode", "allreduce", *args], tmp_path, num_workers=4,
                        launch_args=["--nodes", "2", "--workers_per_node", "2", "--inter_node_bandwidth", "1gbit"])
    assert code == 0, out[-4000:]
    assert "emulated cluster of 2 nodes" in out
    assert _check_allreduce(tmp_path, 4, 1) < 1e-6
