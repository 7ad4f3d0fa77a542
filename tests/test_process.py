"""tfscale._process: quiet TensorFlow logs by default, and a prompt exit that loses no output (issue 15)."""

import os
import subprocess
import sys
import textwrap

import pytest

PROGRAM = textwrap.dedent("""
    import os, sys
    from tfscale import _process
    _process.quiet_tensorflow_logs(verbose=sys.argv[1] == "verbose")
    import tensorflow as tf
    tf.config.list_physical_devices()
    partial = iter(tf.data.Dataset.range(10).cache())  # stops before the end of the cached pass: TF warns
    next(partial)
    del partial
    os.write(2, b"W0000 real_warning.cc:1] a real warning\\n")
    os.write(2, b"E0000 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\\n")
    print("progress bar on stdout", flush=True)
    print("last words on stderr", file=sys.stderr)
    _process.exit_promptly(3)
""")


def _run(mode):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, timeout=300,
                          env=env)


def test_harmless_lines_are_dropped_and_real_ones_kept():
    proc = _run("quiet")
    assert proc.returncode == 3  # exit_promptly's code
    assert "a real warning" in proc.stderr and "last words on stderr" in proc.stderr
    assert "progress bar on stdout" in proc.stdout
    for noise in ("cuInit", "oneDNN", "absl::InitializeLog", "did not fully read the dataset being cached"):
        assert noise not in proc.stderr, proc.stderr


def test_verbose_keeps_everything():
    proc = _run("verbose")
    assert proc.returncode == 3
    assert "cuInit" in proc.stderr and "a real warning" in proc.stderr
    assert "did not fully read the dataset being cached" in proc.stderr


@pytest.mark.parametrize("code, expected", [(None, 0), (0, 0), (2, 2), ("train.py: error: x", 1)])
def test_exit_promptly_codes(code, expected):
    program = f"from tfscale import _process; _process.run_and_exit_promptly(lambda: exit({code!r}))"
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert proc.returncode == expected
    if isinstance(code, str):
        assert code in proc.stderr
