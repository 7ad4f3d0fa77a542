"""`DistributedBatchNormalization` and `recompute_batch_norm_statistics` under
`MultiWorkerMirroredStrategy`: 4 real worker processes on 127.0.0.1 (one replica each),
compared with numpy references.

Slow (4 TensorFlow processes per case): run with `-m slow`.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _ghost_bn_reference import ghost_bn_numpy  # noqa: E402
from _mwms_bn_worker import PER_REPLICA_BATCH, global_batch, recompute_data  # noqa: E402

NUM_WORKERS = 4
TIMEOUT_S = 240
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_mwms_bn_worker.py")


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _run_workers(group_size, tmp_path, *extra):
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(NUM_WORKERS)]}
    procs, outs = [], []
    try:
        for i in range(NUM_WORKERS):
            out = tmp_path / f"worker{i}.json"
            env = dict(
                os.environ,
                TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
                CUDA_VISIBLE_DEVICES="",
            )
            log = open(tmp_path / f"worker{i}.log", "w")
            procs.append(
                subprocess.Popen(
                    [sys.executable, WORKER, str(group_size), str(out), *extra],
                    env=env, stdout=log, stderr=subprocess.STDOUT,
                )
            )
            log.close()
            outs.append(out)
        for i, p in enumerate(procs):
            rc = p.wait(timeout=TIMEOUT_S)
            assert rc == 0, (tmp_path / f"worker{i}.log").read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [json.loads(o.read_text()) for o in outs]


@pytest.mark.slow
@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_multi_worker_matches_numpy_ghost_bn(group_size, tmp_path):
    results = _run_workers(group_size, tmp_path)
    replicas = {}
    for r in results:
        for k, rid in enumerate(r["replica_id"]):
            replicas[int(rid)] = {name: np.array(r[name][k]) for name in r}
    assert sorted(replicas) == list(range(NUM_WORKERS))
    x, w = global_batch(NUM_WORKERS)
    x = x.astype(np.float32).astype(np.float64)
    w = w.astype(np.float32).astype(np.float64)
    y, dx, dgamma, dbeta, mean_g, var_g = ghost_bn_numpy(
        x, w, np.ones(3), np.zeros(3), group_size * PER_REPLICA_BATCH
    )
    for rid, got in replicas.items():
        sl = slice(rid * PER_REPLICA_BATCH, (rid + 1) * PER_REPLICA_BATCH)
        np.testing.assert_allclose(got["y"], y[sl], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(got["dx"], dx[sl], atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(got["moving_mean"], replicas[0]["moving_mean"])
        np.testing.assert_array_equal(got["moving_variance"], replicas[0]["moving_variance"])
    np.testing.assert_allclose(sum(r["dgamma"] for r in replicas.values()), dgamma, atol=1e-5)
    np.testing.assert_allclose(sum(r["dbeta"] for r in replicas.values()), dbeta, atol=1e-5)
    np.testing.assert_allclose(replicas[0]["moving_mean"], 0.1 * mean_g, atol=1e-6)
    np.testing.assert_allclose(replicas[0]["moving_variance"], 0.9 + 0.1 * var_g, atol=1e-6)


@pytest.mark.slow
def test_multi_worker_recompute_gives_every_worker_the_population_statistics(tmp_path):
    results = _run_workers(2, tmp_path, "recompute")
    for r in results:
        assert r["used"] == {"bn1": 16, "bn2": 16}
        for name in ("bn1", "bn2"):
            np.testing.assert_array_equal(r[name], results[0][name])
    # bn1's inputs are the first 1x1 convolution of all 16 examples.
    x = recompute_data().astype(np.float64)
    k1, b1 = (np.array(a) for a in results[0]["conv1"])
    k2, b2 = (np.array(a) for a in results[0]["conv2"])
    h = x @ k1.reshape(2, 3) + b1  # [16, 4, 4, 3]
    np.testing.assert_allclose(results[0]["bn1"][0], h.reshape(-1, 3).mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results[0]["bn1"][1], h.reshape(-1, 3).var(0), rtol=1e-5, atol=1e-5)

    # bn2's inputs: bn1 normalised each group of 2 replicas x 2 examples (contiguous rows
    # of each global batch of 8) with the group's statistics, as in training.
    def bn2_inputs(rows_per_norm_batch):
        out = []
        for start in range(0, 16, rows_per_norm_batch):
            a = h[start : start + rows_per_norm_batch]
            mean, var = a.mean(axis=(0, 1, 2)), a.var(axis=(0, 1, 2))
            out.append((np.maximum((a - mean) / np.sqrt(var + 1e-5), 0) @ k2.reshape(3, 2) + b2))
        return np.concatenate(out).reshape(-1, 2)

    want = bn2_inputs(4)
    np.testing.assert_allclose(results[0]["bn2"][0], want.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results[0]["bn2"][1], want.var(0), rtol=1e-5, atol=1e-5)
    # Not what one device normalising whole global batches would give.
    assert np.abs(bn2_inputs(8).var(0) - want.var(0)).max() > 1e-4
