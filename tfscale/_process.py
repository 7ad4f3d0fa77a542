"""Process-level set-up shared by tfscale's command-line programs: quiet TensorFlow logs and a prompt exit.

Private: used by `scripts/train.py`, `tfscale.launch` and the console commands, not part of the public surface.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
import traceback

__all__ = ["HARMLESS_TF_MESSAGE", "exit_promptly", "quiet_tensorflow_logs", "run_and_exit_promptly"]

#: Lines TensorFlow's C++ runtime writes to stderr on every CPU-only run, or at the end of every pass over a
#: finite dataset, that say nothing is wrong: dropped unless the program is run with `--verbosity`. The
#: `CacheDataset` line comes from iterators dropped before the end of a cached pass (seen once before the first
#: epoch of train.py's `fit`, and at the end of a run shorter than one epoch): TF discards the partial cache and the
#: next iterator fills it from the start, so nothing is lost in tfscale's pipelines, which cache before any `take`.
HARMLESS_TF_MESSAGE = re.compile(
    rb"All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|failed call to cuInit|Could not find cuda drivers|cuda_(platform|executor|diagnostics)\.cc"
    rb"|oneDNN custom operations are on|This TensorFlow binary is optimized to use available CPU instructions"
    rb"|Unable to register cu(DNN|FFT|BLAS) factory|computation placer already registered"
    rb"|GeneratorDatasetOp|MultiDeviceIteratorGetNextFromShard|Local rendezvous is aborting with status"
    rb"|End of sequence|TF-TRT Warning|The calling iterator did not fully read the dataset being cached"
)

_filter = None  # the process's HarmlessMessageFilter, when quiet_tensorflow_logs installed one


class _HarmlessMessageFilter:
    """Redirects file descriptor 2 into a pipe; a thread forwards every line at once except `HARMLESS_TF_MESSAGE`
    lines (the same design as `tfscale.data.jpeg_messages.LibjpegMessageFilter`, which nests inside it)."""

    def __init__(self):
        self.count = 0
        sys.stderr.flush()
        self._saved_fd = os.dup(2)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._thread = threading.Thread(target=self._pump, args=(read_fd,), name="tf-log-filter", daemon=True)
        self._thread.start()

    def _pump(self, read_fd):
        pending = b""
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            while True:
                chunk = pipe.read(65536)
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                self._forward([line + b"\n" for line in lines])
        if pending:
            self._forward([pending])

    def _forward(self, lines):
        out = [line for line in lines if not HARMLESS_TF_MESSAGE.search(line)]
        self.count += len(lines) - len(out)
        if out:
            os.write(self._saved_fd, b"".join(out))

    def close(self, timeout=2.0):
        """Restores file descriptor 2 and waits up to `timeout` seconds for the lines still in the pipe."""
        try:
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
        os.dup2(self._saved_fd, 2)  # the pipe's last write end closes (unless a child holds it): end of file
        self._thread.join(timeout=timeout)


def quiet_tensorflow_logs(verbose=False) -> None:
    """Keeps TensorFlow's C++ INFO lines and its known-harmless warnings out of a program's output.

    Call it first in a program's `main`, before TensorFlow is imported (its C++ log level is read at import).
    Not verbose: `TF_CPP_MIN_LOG_LEVEL=1` (no INFO lines) unless the environment already sets it, and a filter on
    file descriptor 2 that drops `HARMLESS_TF_MESSAGE` lines (the `cuInit` failure of CPU-only machines, oneDNN
    banners, `GeneratorDatasetOp` warnings, cancelled iterator shards at the end of an evaluation pass). Every other
    warning and error, and the Keras progress bar (stdout), still show. Verbose: `TF_CPP_MIN_LOG_LEVEL=0` unless set,
    and no filter. Worker processes inherit the environment variable.

    Args:
        verbose: bool, show everything TensorFlow logs (e.g. when the user passed `--verbosity`).
    """
    global _filter
    if verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    if _filter is None:
        _filter = _HarmlessMessageFilter()
        atexit.register(_filter.close)  # a normal exit forwards the lines still in the pipe too


def exit_promptly(code=0) -> None:
    """Flushes stdout, stderr and Python's logging handlers, then ends the process at once with `os._exit`.

    Why: at interpreter exit, the destructors of tf.data iterators wait for their autotune and prefetch threads,
    which took up to 2.5 minutes after a run had written its results (issue 15). Everything the caller needs is
    written and closed before this is called (results.json, model.keras, backups, TensorBoard writers closed by
    Keras at the end of `fit`), so skipping the interpreter's clean-up loses nothing. `atexit` handlers do not
    run: call this only from a program's `main`, never from library code.

    Args:
        code: the exit status, an int (0 = success); a str is printed to stderr and gives status 1 (as
            `sys.exit(message)` does); None means 0.
    """
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    elif code is None:
        code = 0
    elif not isinstance(code, int):
        code = 1
    for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not keep the process alive
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    if _filter is not None:  # forward the last lines still in the stderr pipe
        _filter.close()
    os._exit(code)


def run_and_exit_promptly(fn, *args, **kwargs) -> None:
    """Calls `fn(*args, **kwargs)`, then `exit_promptly` with its outcome: 0 on return, `SystemExit`'s code, or 1
    after printing the traceback of any other exception (130 for Ctrl-C)."""
    try:
        fn(*args, **kwargs)
    except SystemExit as e:
        exit_promptly(e.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        exit_promptly(130)
    except BaseException:  # noqa: BLE001 - printed, then a non-zero status, as the interpreter would
        traceback.print_exc()
        exit_promptly(1)
    exit_promptly(0)
