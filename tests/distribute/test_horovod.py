"""The Horovod backend (`tfscale.distribute.horovod`, issue 17).

Three layers of checks:

* Without Horovod (any environment, fast): the module imports without Horovod, and asking for the backend raises
  the error that says how to build the environment; train.py's flag checks.
* The Horovod adapter on a fake, in-process Horovod (threads as ranks, fast): every registered schedule, every
  compression, through the same code that calls Horovod, against numpy sums and the compression bound of the
  other backends.
* Real Horovod (in .venv-horovod, built by tools/setup_horovod_env.sh; .ci/run builds it): horovodrun with Gloo,
  4 (3, 2) processes. The all-reduce of every schedule and compression; 4-rank ``model.fit`` (flat and torus 2x2,
  SGD, LARS and group BN with G=2, hierarchical, halving-doubling) ending with identical weights on every rank,
  equal to a one-process run on the same global batch within 1e-5; and the drift control (the same run without
  averaging ends with different weights), so the drift bug cannot come back silently.
  Skipped, with the reason printed, only where .venv-horovod does not exist (TFSCALE_REQUIRE_HOROVOD=1 makes
  that a failure).
"""

import glob
import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import tensorflow as tf

from tfscale.distribute import algorithms
from tfscale.distribute import horovod as thvd

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(REPO, "tests", "distribute", "hvd_worker.py")
HVD_BIN = os.path.join(REPO, ".venv-horovod", "bin")
_UNIT = {None: 2.0**-24, "fp16": 2.0**-11, "bf16": 2.0**-8}

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hvd_worker  # noqa: E402


# ------------------------------------------------------------------------------------------ without Horovod
def test_importing_tfscale_does_not_import_horovod():
    code = ("import sys, tfscale, tfscale.distribute, tfscale.distribute.horovod, tfscale.layers; "
            "assert 'horovod' not in sys.modules, 'horovod imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_missing_horovod_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "horovod", None)  # `import horovod...` raises ImportError
    monkeypatch.setitem(sys.modules, "horovod.tensorflow", None)
    monkeypatch.setattr(thvd, "_HVD", [])
    with pytest.raises(thvd.HorovodUnavailableError) as info:
        thvd.init("torus")
    message = str(info.value)
    assert isinstance(info.value, ImportError)
    assert "bash tools/setup_horovod_env.sh" in message
    assert "2.14-2.18" in message and "0.28.1" in message
    with pytest.raises(thvd.HorovodUnavailableError):
        thvd.HorovodAllReduce("flat")


def test_train_script_names_the_missing_horovod(tmp_path):
    try:
        import horovod.tensorflow  # noqa: F401
        pytest.skip("Horovod is importable in this environment (the error cannot occur)")
    except ImportError:
        pass
    env = dict(os.environ, HOROVOD_RANK="0", HOROVOD_SIZE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "train.py"), "--backend=horovod",
                           f"--model_dir={tmp_path / 'run'}", "--epochs=1"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode != 0
    assert "tools/setup_horovod_env.sh" in proc.stderr, proc.stderr[-2000:]
    assert "2.14-2.18" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


_CHECK_FLAGS = """
import importlib.util, json, sys
from absl import flags
spec = importlib.util.spec_from_file_location("train", sys.argv[1])
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
train.define_flags()
out = []
for argv in json.loads(sys.argv[2]):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["train.py", *argv])
    try:
        config = train.resolve_config(flags.FLAGS)
        out.append("ok " + config["backend"])
    except ValueError as err:
        out.append(str(err))
print(json.dumps(out))
"""


def test_train_script_horovod_flag_checks(tmp_path):
    cases = [
        (["--all_reduce=collective"], "--all_reduce=collective is not available with --backend=horovod"),
        (["--all_reduce=auto"], "--all_reduce=auto is not available with --backend=horovod"),
        (["--calibration_file=x.json"], "Flag --calibration_file must be unset with --backend=horovod"),
        (["--jit_compile"], "Flag --jit_compile must be"),
        (["--all_reduce=torus", "--grid_shape=2x2", "--bn_group_size=2"], "ok horovod"),
        (["--all_reduce=halving_doubling", "--compression=bf16"], "ok horovod"),
    ]
    argvs = [["--backend=horovod", f"--model_dir={tmp_path / 'run'}", *flags] for flags, _ in cases]
    proc = subprocess.run([sys.executable, "-c", _CHECK_FLAGS, os.path.join(REPO, "scripts", "train.py"),
                           json.dumps(argvs)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for (flags, expected), got in zip(cases, results):
        assert expected in got, (flags, got)


# ------------------------------------------------------------------- the adapter on a fake, threaded Horovod
class _FakeProcessSet:
    def __init__(self, ranks):
        self.ranks = sorted(ranks)
        self.process_set_id = None


class _FakeHorovod:
    """Horovod's collectives among threads: each thread is a rank; a collective waits for its set's members
    (matched by name, as Horovod does) and computes the result with numpy."""

    Sum, Average = "sum", "average"

    def __init__(self, n):
        self.n = n
        self.local = threading.local()
        self.global_process_set = _FakeProcessSet(range(n))
        self.global_process_set.process_set_id = 0
        self._cond = threading.Condition()
        self._pending = {}
        self._ids = 0

    # basics
    def is_initialized(self):
        return True

    def rank(self):
        return self.local.rank

    def size(self):
        return self.n

    def local_size(self):
        return self.n

    def ProcessSet(self, ranks):  # noqa: N802 - Horovod's name
        ps = _FakeProcessSet(ranks)
        self._ids += 1
        ps.process_set_id = self._ids
        return ps

    def _exchange(self, name, process_set, value):
        ranks = process_set.ranks
        me = self.rank()
        assert me in ranks, (name, me, ranks)
        key = (name, tuple(ranks))
        with self._cond:
            slot = self._pending.setdefault(key, {"values": {}, "taken": 0})
            assert me not in slot["values"], f"duplicate collective name {name}"
            slot["values"][me] = value
            self._cond.notify_all()
            assert self._cond.wait_for(lambda: len(slot["values"]) == len(ranks), timeout=60), name
            values = [slot["values"][r] for r in ranks]
            slot["taken"] += 1
            if slot["taken"] == len(ranks):
                del self._pending[key]
        shapes = {v.shape for v in values}
        dtypes = {v.dtype for v in values}
        assert len(shapes) == 1 and len(dtypes) == 1, (name, shapes, dtypes)
        return values, ranks.index(me)

    def allreduce(self, t, op, name, ignore_name_scope, process_set=None):
        values, _ = self._exchange(name, process_set or self.global_process_set, t.numpy())
        total = sum(v.astype(np.float64) for v in values)
        if op == self.Average:
            total = total / len(values)
        return tf.constant(total.astype(values[0].dtype))

    def reducescatter(self, t, op, name, ignore_name_scope, process_set):
        assert t.dtype != tf.bfloat16
        values, pos = self._exchange(name, process_set, t.numpy())
        total = sum(v.astype(np.float64) for v in values).astype(values[0].dtype)
        return tf.constant(np.split(total, len(values))[pos])

    def allgather(self, t, name, ignore_name_scope, process_set):
        assert t.dtype != tf.bfloat16
        values, _ = self._exchange(name, process_set, t.numpy())
        return tf.constant(np.concatenate(values))

    def broadcast(self, t, root_rank, name, ignore_name_scope, process_set):
        values, _ = self._exchange(name, process_set, t.numpy())
        return tf.constant(values[process_set.ranks.index(root_rank)])

    def alltoall(self, t, name, ignore_name_scope, process_set):
        assert t.dtype != tf.bfloat16
        values, pos = self._exchange(name, process_set, t.numpy())
        return tf.constant(np.concatenate([np.split(v, len(values))[pos] for v in values]))


def _fake_run(n, algorithm, params, compression, small_pack_bytes, inputs, average=False):
    """Runs HorovodAllReduce on n threads sharing a fake Horovod; returns outputs[rank][i] (numpy)."""
    fake = _FakeHorovod(n)
    saved = (list(thvd._HVD), dict(thvd._PROCESS_SETS))
    thvd._HVD[:] = [fake]
    thvd._PROCESS_SETS.clear()
    for g in thvd.required_groups(n, algorithm, **params):
        thvd._PROCESS_SETS[g] = fake.ProcessSet(g)
    outputs, errors = [None] * n, []

    def worker(r):
        fake.local.rank = r
        try:
            op = thvd.HorovodAllReduce(algorithm, compression=compression, small_pack_bytes=small_pack_bytes,
                                       bytes_per_pack=1024, **params)
            outputs[r] = [t.numpy() for t in op([tf.constant(x) for x in inputs[r]], average=average)]
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    try:
        threads = [threading.Thread(target=worker, args=(r,)) for r in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        thvd._HVD[:] = saved[0]
        thvd._PROCESS_SETS.clear()
        thvd._PROCESS_SETS.update(saved[1])
    if errors:
        raise errors[0]
    return outputs


_FAKE_CASES = [(n, alg, params) for n, cases in hvd_worker.ALLREDUCE_CASES.items() for alg, params in cases]
_FAKE_CASES += [(5, "halving_doubling", {}), (6, "torus", {"grid_shape": "2x3"}),
                (8, "hierarchical", {"devices_per_node": 4, "inter_node": "halving_doubling"})]


@pytest.mark.parametrize("n,algorithm,params", _FAKE_CASES,
                         ids=[f"{n}-{hvd_worker.case_id(a, p)}" for n, a, p in _FAKE_CASES])
@pytest.mark.parametrize("compression", [None, "fp16", "bf16"])
def test_adapter_runs_every_schedule_within_the_compression_bound(n, algorithm, params, compression):
    rng = np.random.default_rng(n)
    inputs = [[rng.standard_normal(s).astype(np.float32) for s in hvd_worker.SHAPES] for _ in range(n)]
    exact = [sum(inputs[r][i].astype(np.float64) for r in range(n)) for i in range(len(hvd_worker.SHAPES))]
    scale = [sum(np.abs(inputs[r][i].astype(np.float64)) for r in range(n)) for i in range(len(exact))]
    for small in (0, 1 << 30):
        sched = algorithms.build_schedule(algorithm, n, **params)
        if small:
            sched = sched.for_small_messages()
        roundings = sum(p.kind in algorithms.schedule.REDUCING_KINDS for p in sched.phases) + 1
        got = _fake_run(n, algorithm, params, compression, small, inputs)
        for r in range(n):
            for i, ref in enumerate(exact):
                bound = roundings * _UNIT[compression] * scale[i] + n * 2.0**-24
                err = np.abs(got[r][i].astype(np.float64) - ref)
                assert np.all(err <= bound), (r, i, small, float(np.max(err - bound)))
                if compression is None:
                    assert np.array_equal(got[r][i], got[0][i])  # bit-identical on every rank


def test_adapter_mean_and_unsorted_groups():
    def shuffled(num_ranks):  # a custom schedule whose groups are not in rank order
        from tfscale.distribute.algorithms import ALL_GATHER, REDUCE_SCATTER, Phase, Schedule

        groups = [[3, 0, 2, 1]]
        return Schedule("shuffled_rs_ag", num_ranks, [Phase(REDUCE_SCATTER, groups), Phase(ALL_GATHER, groups)])

    algorithms.register_algorithm("shuffled_rs_ag", shuffled)
    try:
        rng = np.random.default_rng(0)
        inputs = [[rng.standard_normal((37,)).astype(np.float32)] for _ in range(4)]
        got = _fake_run(4, "shuffled_rs_ag", {}, None, 0, inputs, average=True)
        ref = sum(x[0].astype(np.float64) for x in inputs) / 4
        for r in range(4):
            np.testing.assert_allclose(got[r][0], ref, rtol=1e-6, atol=1e-6)
    finally:
        algorithms.unregister_algorithm("shuffled_rs_ag")


def test_required_groups():
    assert thvd.required_groups(4, "flat") == []
    assert thvd.required_groups(4, "torus", grid_shape="2x2") == [(0, 1), (2, 3), (0, 2), (1, 3)]
    assert thvd.required_groups(4, "flat", bn_group_size=2) == [(0, 1), (2, 3)]
    assert thvd.required_groups(3, "halving_doubling") == [(0, 2), (0, 1)]
    with pytest.raises(ValueError, match="bn_group_size"):
        thvd.required_groups(4, "flat", bn_group_size=3)
    with pytest.raises(ValueError, match="Unknown all_reduce algorithm"):
        thvd.required_groups(4, "nope")


# --------------------------------------------------------------------------------------------- real Horovod
def _require_env():
    horovodrun = os.path.join(HVD_BIN, "horovodrun")
    if not os.path.exists(horovodrun):
        reason = ("the Horovod environment .venv-horovod does not exist here (build it with "
                  "`bash tools/setup_horovod_env.sh`; .ci/run builds it, see its log for why it could not)")
        if os.environ.get("TFSCALE_REQUIRE_HOROVOD") == "1":
            pytest.fail(reason)
        print(f"SKIP: {reason}", file=sys.stderr)
        pytest.skip(reason)
    return horovodrun


def _horovodrun(np_, mode, out, timeout):
    horovodrun = _require_env()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO,
               PATH=f"{HVD_BIN}{os.pathsep}{os.environ['PATH']}")
    env.pop("TF_CONFIG", None)
    cmd = [horovodrun, "-np", str(np_), "-H", f"localhost:{np_}", "--gloo", os.path.join(HVD_BIN, "python"),
           WORKER, mode, str(out)]
    # A session of its own: on a timeout the launcher's whole group is stopped (horovodrun stops its ranks).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        pytest.fail(f"horovodrun {mode} did not finish in {timeout}s: {stdout[-2000:]} {stderr[-3000:]}")
    assert proc.returncode == 0, (stdout[-3000:], stderr[-5000:])
    assert stdout.count(f"hvd_worker {mode}: done") == np_, stdout[-3000:]


@pytest.mark.parametrize("n", [4, 3])
def test_horovod_all_reduce_every_schedule(tmp_path, n):
    """Smoke test on real Horovod (Gloo): every schedule (incl. the 3-rank halving-doubling fold), eager and
    traced, sum and mean, none/fp16/bf16. Gloo's fp16 all-reduce adds in float16 at each of its k - 1 steps, so
    the bound counts k - 1 roundings per reducing phase over k ranks (plus the input's), where the other
    backends (float32 sums) count one."""
    _horovodrun(n, "allreduce", tmp_path, timeout=600)
    ranks = [np.load(tmp_path / f"allreduce_n{n}_rank{r}.npz") for r in range(n)]
    with open(tmp_path / f"allreduce_n{n}_phases.json") as f:
        reducing = json.load(f)
    inputs = [[ranks[r][f"input_{i}"] for i in range(len(hvd_worker.SHAPES))] for r in range(n)]
    exact = [sum(inputs[r][i].astype(np.float64) for r in range(n)) for i in range(len(hvd_worker.SHAPES))]
    scale = [sum(np.abs(inputs[r][i].astype(np.float64)) for r in range(n)) for i in range(len(exact))]
    assert len(reducing) == len(hvd_worker.ALLREDUCE_CASES[n]) * 3 * 2
    for key, phases in reducing.items():
        compression = key.split("|")[1]
        compression = None if compression == "None" else compression
        for r in range(n):
            for i, ref in enumerate(exact):
                bound = (phases + 1) * _UNIT[compression] * scale[i] + n * 2.0**-24
                for what, expected, b in (("sum", ref, bound), ("mean", ref / n, bound / n + 2.0**-24 * scale[i])):
                    got = ranks[r][f"{key}|{what}_{i}"].astype(np.float64)
                    assert np.all(np.abs(got - expected) <= b), (key, r, i, what)
                if compression is None:
                    assert np.array_equal(ranks[r][f"{key}|sum_{i}"], ranks[0][f"{key}|sum_{i}"])


@pytest.fixture(scope="module")
def fit_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("hvd_fit")
    _horovodrun(4, "fit", out, timeout=900)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    proc = subprocess.run([os.path.join(HVD_BIN, "python"), WORKER, "reference", str(out)], capture_output=True,
                          text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-5000:]
    ranks = [dict(np.load(out / f"fit_rank{r}.npz")) for r in range(4)]
    return ranks, dict(np.load(out / "fit_reference.npz"))


def _weights(run, case):
    return [run[k] for k in sorted((k for k in run if k.startswith(f"{case}|w")), key=lambda k: int(k[len(case) + 2:]))]


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(hvd_worker.FIT_CASES))
def test_horovod_fit_matches_one_process(fit_runs, case):
    """4-rank fit (different data per rank, different initial weights on ranks 1-3): identical weights on every
    rank, equal to the one-process run on the same global batch within 1e-5; the averaged loss too."""
    ranks, reference = fit_runs
    ref = _weights(reference, case)
    assert ref
    for r in range(4):
        got = _weights(ranks[r], case)
        assert len(got) == len(ref)
        for a, b in zip(got, _weights(ranks[0], case)):
            np.testing.assert_array_equal(a, b)  # the same bits on every rank
        for i, (a, b) in enumerate(zip(got, ref)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=f"{case} rank {r} weight {i}")
        np.testing.assert_allclose(ranks[r][f"{case}|loss"], reference[f"{case}|loss"], rtol=1e-5, atol=1e-6)
        assert int(ranks[r][f"{case}|num_calls"]) >= 1  # the schedule was traced into the step


@pytest.mark.slow
def test_without_averaging_the_ranks_drift(fit_runs):
    """The control that makes the equality above meaningful: with a plain optimizer (no averaging, as
    Horovod's own DistributedOptimizer under Keras 3 fit) the ranks end with different weights."""
    ranks, reference = fit_runs
    drift = max(float(np.max(np.abs(a - b))) for r in range(1, 4)
                for a, b in zip(_weights(ranks[r], "unaveraged"), _weights(ranks[0], "unaveraged")))
    assert drift > 1e-3, drift
    off = max(float(np.max(np.abs(a - b))) for a, b in zip(_weights(ranks[0], "unaveraged"),
                                                          _weights(reference, "flat_sgd")))
    assert off > 1e-3, off


@pytest.mark.slow
def test_train_script_under_horovodrun(tmp_path):
    """scripts/train.py --backend=horovod under horovodrun -np 4 (torus 2x2, group BN G=2): trains, and only rank 0
    writes results.json, model.keras, the logs and the backup."""
    horovodrun = _require_env()
    from tfscale import data as tdata

    records = tmp_path / "records"
    images, labels = tdata.fashion_mnist.load_arrays(split="train")
    tdata.convert_arrays(images[:256], labels[:256], str(records), "train", 4, progress=False)
    tdata.convert_arrays(images[256:320], labels[256:320], str(records), "validation", 4, progress=False)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=REPO, PATH=f"{HVD_BIN}{os.pathsep}{os.environ['PATH']}")
    cmd = [horovodrun, "-np", "4", "-H", "localhost:4", "--gloo", os.path.join(HVD_BIN, "python"),
           os.path.join(REPO, "scripts", "train.py"), "--backend=horovod", "--dataset=imagenet",
           f"--data_dir={records}", "--model_dir=run", "--epochs=2", "--steps_per_epoch=2", "--model=resnet8",
           "--image_size=28", "--global_batch_size=32", "--num_classes=10", "--all_reduce=torus",
           "--grid_shape=2x2", "--bn_group_size=2", "--optimizer=lars", "--eval_every_epochs=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"train.py under horovodrun did not finish: {stdout[-2000:]} {stderr[-3000:]}")
    assert proc.returncode == 0, (stdout[-3000:], stderr[-5000:])
    with open(tmp_path / "run" / "results.json") as f:
        results = json.load(f)
    assert results["backend"] == "horovod" and results["num_replicas"] == 4
    assert results["all_reduce_algorithm"] == "torus" and results["epochs_run"] == [0, 1]
    assert results["num_evaluated"] == 64 and 0.0 <= results["top1"] <= 1.0
    assert len(results["history"]["loss"]) == 2 and all(np.isfinite(results["history"]["loss"]))
    assert "val_loss" in results["history"]
    assert os.path.exists(tmp_path / "run" / "model.keras")
    assert glob.glob(str(tmp_path / "run" / "logs" / "**" / "events.out.tfevents.*"), recursive=True)
    assert "Horovod rank 0 of 4" in stdout
