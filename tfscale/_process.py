"""Process-level set-up shared by tfscale's command-line programs: quiet TensorFlow logs and a prompt exit.

Private: used by `scripts/train.py`, `tfscale.launch` and the console commands, not part of the public surface.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

__all__ = ["exit_promptly", "run_and_exit_promptly"]


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
