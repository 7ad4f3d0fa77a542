"""Issue 18 through scripts/train.py: every flag validated before training, resume only what matches, stop on NaN,
damaged files named, a clear error for an unusable --model_dir and for unusable data."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tfscale import data as tdata

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "scripts", "train.py")
FAST = ["--model=resnet8", "--image_size=28", "--num_replicas=2", "--global_batch_size=16", "--num_classes=10",
        "--bn_stats_batches=2", "--all_reduce=reduction_to_one_device", "--warmup_epochs=0"]


def _train(args, timeout=600):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=env)


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("records"))
    images, labels = tdata.fashion_mnist.load_arrays(split="train")
    tdata.convert_arrays(images[:64], labels[:64], out, "train", 2, progress=False)
    tdata.convert_arrays(images[64:96], labels[64:96], out, "validation", 2, progress=False)
    return out


@pytest.mark.parametrize("arg, message", [
    ("--bn_stats_batches=0", "--bn_stats_batches"),
    ("--label_smoothing=2", "--label_smoothing"),
    ("--batch_schedule=0:16,5:32", "--batch_schedule"),
])
def test_bad_flags_fail_in_seconds_before_any_training_step(arg, message, tmp_path):
    """Item 6: these failed only after training (or never) before; now within 15 s and before any step."""
    start = time.monotonic()
    proc = _train([arg, "--epochs=3", f"--model_dir={tmp_path / 'run'}"], timeout=60)
    seconds = time.monotonic() - start
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert seconds < 15, seconds
    assert "Epoch 1/" not in proc.stdout and not os.path.exists(tmp_path / "run" / "backup")


def test_model_dir_that_is_a_file_or_not_writable_is_a_clear_error(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = _train([f"--model_dir={afile}"], timeout=60)
    assert proc.returncode != 0 and "--model_dir" in proc.stderr and "is a file" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    from tfscale.training import run_state

    with pytest.raises(run_state.RunStateError, match="not a writable directory"):
        run_state.check_model_dir("/proc/tfscale-cannot-write-here")


def test_resume_refuses_a_changed_config_and_a_finished_run(tmp_path):
    """Item 7, without training: the stored config decides."""
    from tfscale.training import run_state

    model_dir = str(tmp_path / "run")
    config = {"global_batch_size": 256, "model": "resnet8", "model_dir": model_dir, "eval_every_epochs": 4}
    assert run_state.check_resume(model_dir, config) == "new"
    run_state.check_model_dir(model_dir)
    run_state.write_run_config(model_dir, config)
    assert run_state.check_resume(model_dir, dict(config, eval_every_epochs=1)) == "resume"  # not relevant
    changed = dict(config, global_batch_size=128, model="resnet20")
    with pytest.raises(run_state.RunStateError) as info:
        run_state.check_resume(model_dir, changed)
    text = str(info.value)
    assert "--global_batch_size: 256 (stored) -> 128 (now)" in text and "--model: 'resnet8'" in text
    assert "--allow_config_change" in text and "new --model_dir" in text
    notes = []
    assert run_state.check_resume(model_dir, changed, allow_config_change=True, print_fn=notes.append) == "resume"
    assert "global_batch_size" in notes[0]
    with open(os.path.join(model_dir, "results.json"), "w") as f:
        json.dump({"top1": 0.5}, f)
    with pytest.raises(run_state.RunStateError, match="is finished.*--overwrite"):
        run_state.check_resume(model_dir, config)
    assert run_state.check_resume(model_dir, config, overwrite=True, print_fn=notes.append) == "overwritten"
    assert not os.path.exists(os.path.join(model_dir, "results.json"))


@pytest.mark.slow
def test_resume_with_another_batch_size_fails_listing_it(tiny_records, tmp_path):
    """Item 7 through the script: a finished run says so; a changed --global_batch_size is refused."""
    model_dir = str(tmp_path / "run")
    base = ["--dataset=imagenet", f"--data_dir={tiny_records}", f"--model_dir={model_dir}", "--epochs=1", *FAST]
    first = _train(base)
    assert first.returncode == 0, first.stderr[-3000:]
    again = _train(base)
    assert again.returncode != 0 and "is finished" in again.stderr and "--overwrite" in again.stderr
    os.remove(os.path.join(model_dir, "results.json"))  # as if it had been killed before the end
    changed = _train([*base, "--global_batch_size=32"])
    assert changed.returncode != 0
    assert "--global_batch_size: 16 (stored) -> 32 (now)" in changed.stderr, changed.stderr[-2000:]


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_error_and_keeps_the_backup(tiny_records, tmp_path):
    """Item 3: --base_lr=1e30 used to train every epoch to chance and exit 0."""
    model_dir = str(tmp_path / "run")
    proc = _train(["--dataset=imagenet", f"--data_dir={tiny_records}", f"--model_dir={model_dir}", "--epochs=3",
                   "--base_lr=1e30", "--lr_schedule=constant", *FAST])
    assert proc.returncode != 0
    assert "loss became NaN or infinite in epoch 1" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(os.path.join(model_dir, "results.json"))
    assert "Epoch 2/3" not in proc.stdout


@pytest.mark.slow
def test_all_png_data_fails_fast_with_one_clear_error(tmp_path):
    """Item 1 through the script: it used to hang writing megabytes of log."""
    data = tmp_path / "data"
    data.mkdir()
    png = tf.io.encode_png(np.zeros((28, 28, 3), np.uint8)).numpy()
    for split in ("train", "validation"):
        with tf.io.TFRecordWriter(str(data / f"{split}-00000-of-00001")) as w:
            for _ in range(64):
                w.write(tdata.make_example(png, 1, 28, 28, 3).SerializeToString())
    proc = _train(["--dataset=imagenet", f"--data_dir={data}", f"--model_dir={tmp_path / 'run'}", "--epochs=1",
                   "--fail_fast_records=32", *FAST], timeout=300)
    assert proc.returncode != 0
    assert "no usable example" in proc.stderr and "image bytes are not a JPEG" in proc.stderr, proc.stderr[-3000:]
    assert "image_key=image/encoded" in proc.stderr
    assert len(proc.stderr) < 200_000  # no flood


@pytest.mark.slow
def test_truncated_validation_shard_is_named_then_counted_with_a_shortfall_warning(tiny_records, tmp_path):
    """Item 5: the damaged file is named (stop by default); with --on_damaged_file=count the totals add up and
    results.json shows evaluated vs expected."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_records, data)
    shard = sorted(p for p in os.listdir(data) if p.startswith("validation-") and "metadata" not in p)[0]
    path = data / shard
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    base = ["--dataset=imagenet", f"--data_dir={data}", "--epochs=1", *FAST]
    stopped = _train([*base, f"--model_dir={tmp_path / 'a'}"], timeout=300)
    assert stopped.returncode != 0
    assert str(path) in stopped.stderr and "records readable before the damage" in stopped.stderr
    counted = _train([*base, f"--model_dir={tmp_path / 'b'}", "--on_damaged_file=count"])
    assert counted.returncode == 0, counted.stderr[-3000:]
    with open(tmp_path / "b" / "results.json") as f:
        results = json.load(f)
    assert results["num_eval_expected"] == 32
    assert results["num_evaluated"] + results["lost_records"] == 32 and results["lost_records"] > 0
    assert results["eval_shortfall"] == results["lost_records"]
    assert "WARNING: evaluated" in counted.stdout and str(path) in results["damaged_files"][0]


_SLEEPING_WORKER_1 = """
import json, os, sys, time
if json.loads(os.environ["TF_CONFIG"])["task"]["index"] == 1:
    time.sleep(600)  # a worker that never starts
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


@pytest.mark.slow
def test_a_worker_that_never_starts_ends_the_job_with_a_message_naming_it(tmp_path):
    """Item 4, the issue's reproduction: worker 1 is a wrapper that sleeps instead of starting; worker 0 (a real
    train.py, blocked in MultiWorkerMirroredStrategy()) names it and is ended within --startup_timeout, and the
    launcher stops the job."""
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(_SLEEPING_WORKER_1)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "tfscale.launch", "--num_workers", "2", "--grace_seconds", "2",
         "--startup_timeout", "600", "--", sys.executable, str(wrapper), TRAIN, "--startup_timeout=20",
         f"--model_dir={tmp_path / 'run'}", "--epochs=1", "--warmup_epochs=0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode == 128 + 9, out[-3000:]
    assert "[worker 0] start-up timeout" in out and "not reachable: worker 1 (127.0.0.1:" in out, out[-3000:]
    assert "worker 0 (pid" in out and "was killed by SIGKILL" in out
    assert seconds < 180, seconds
