"""One watchdog thread per process that aborts stuck collectives: the multi-worker timeout.

Why not a timeout on every collective? TF's collective executor gives each collective
that carries a timeout its own detached thread, which sleeps for the *whole* timeout even
when the collective finishes in a millisecond (``base_collective_executor.cc``: "TODO:
Share the timeout watchdog thread among collectives"). Live threads are therefore about
``collectives per second x timeout``. Keras ``fit`` under MWMS makes several collectives
per step (the gradient packs, then one per metric read), so the 4-worker default job on
one host (about 4 steps/s per worker, 300 s) ran out of threads in its second epoch
(``std::system_error: Resource temporarily unavailable``; Linux's default ``pid_max`` is
32,768 for the whole machine). A fast GPU job would do the same.

`CollectiveWatchdog` keeps one thread per process instead, as MWMS's own peer health check
does: it is a Keras callback that notes the time of every batch, epoch and evaluation
event while ``fit``, ``evaluate`` or ``predict`` runs, and when no event has come for
`timeout_seconds` it aborts every collective of the process
(``context.abort_collective_ops``, through `tfscale._tf_compat`). The stuck
step then fails with ``DeadlineExceededError`` carrying the watchdog's message, which
`tfscale.distribute.explain_worker_failures` turns into a `WorkerFailureError`. Like any
failed collective, the abort poisons the process: restart the workers (with
``BackupAndRestore`` they resume at the last finished epoch).
"""

import sys
import threading
import time

import keras

from tfscale import _tf_compat
from tfscale.distribute import validation

__all__ = ["CollectiveWatchdog"]


class CollectiveWatchdog(keras.callbacks.Callback):
    """Aborts the process's collectives when a ``fit`` / ``evaluate`` step stalls.

    Pass it in ``callbacks=[...]`` of every ``model.fit``, ``model.evaluate`` and
    ``model.predict`` of a multi-worker job (`create_multi_worker_strategy` makes one:
    ``strategy_handle(strategy).watchdog``). It is armed from ``on_train_begin`` /
    ``on_test_begin`` / ``on_predict_begin`` to the matching ``*_end`` (nesting, as the
    validation inside ``fit``, is counted), and every batch, epoch and evaluation event
    resets its clock. Outside those calls it does nothing, so time spent between calls
    (saving the model, recomputing BN statistics) is never mistaken for a stall.

    The first step of a call includes tracing the step function, so `timeout_seconds`
    must cover that as well as the slowest legitimate step (the default, 300 s, does on
    the machines tested).

    Args:
      timeout_seconds: float > 0, seconds without a batch / epoch event, while armed,
        after which every collective of this process is aborted. Default 300.
      poll_seconds: float > 0 or None, how often the thread looks; default
        ``min(1, timeout_seconds / 10)`` seconds.
      abort_fn: callable ``(message: str) -> None`` that aborts the collectives; default
        `tfscale._tf_compat.abort_collective_ops` with
        ``DEADLINE_EXCEEDED``. Tests pass their own.

    Attributes:
      fired: bool, whether the watchdog has aborted the collectives.
      message: str or None, the abort message once fired.

    Raises:
      ValueError: if `timeout_seconds` or `poll_seconds` is not a number > 0.

    Example:
      >>> strategy = tfscale.distribute.create_multi_worker_strategy("torus")
      >>> watchdog = strategy_handle(strategy).watchdog
      >>> with tfscale.distribute.explain_worker_failures(strategy):
      ...     model.fit(train_ds, epochs=90, callbacks=[watchdog, backup])
      ...     model.evaluate(eval_ds, callbacks=[watchdog])
    """

    def __init__(self, timeout_seconds=300.0, poll_seconds=None, abort_fn=None):
        super().__init__()
        self.timeout_seconds = _positive("timeout_seconds", timeout_seconds)
        self.poll_seconds = (min(1.0, self.timeout_seconds / 10) if poll_seconds is None
                             else _positive("poll_seconds", poll_seconds))
        self._abort_fn = abort_fn or _tf_compat.abort_collective_ops
        self._lock = threading.Lock()
        self._armed = 0  # nesting depth of fit / evaluate / predict
        self._last_event = time.monotonic()
        self._thread = None
        self.fired = False
        self.message = None

    # Arming and progress ------------------------------------------------------------

    def _arm(self):
        with self._lock:
            self._armed += 1
            self._last_event = time.monotonic()
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="tfscale-collective-watchdog",
                                                daemon=True)
                self._thread.start()

    def _disarm(self):
        with self._lock:
            self._armed = max(0, self._armed - 1)
            self._last_event = time.monotonic()

    def _progress(self, *args, **kwargs):
        self._last_event = time.monotonic()

    on_train_begin = on_test_begin = on_predict_begin = lambda self, logs=None: self._arm()
    on_train_end = on_test_end = on_predict_end = lambda self, logs=None: self._disarm()
    on_epoch_begin = on_epoch_end = _progress
    on_train_batch_begin = on_train_batch_end = _progress
    on_test_batch_begin = on_test_batch_end = _progress
    on_predict_batch_begin = on_predict_batch_end = _progress

    @property
    def armed(self):
        """bool: whether a ``fit`` / ``evaluate`` / ``predict`` call is being watched."""
        return self._armed > 0

    # The thread ---------------------------------------------------------------------

    def _watch(self):
        while not self.fired:
            time.sleep(self.poll_seconds)
            with self._lock:
                stalled = time.monotonic() - self._last_event
                if not self._armed or stalled < self.timeout_seconds:
                    continue
                self.fired = True
                self.message = (
                    f"tfscale CollectiveWatchdog: no step finished for {stalled:.0f} s, more than the collective "
                    f"timeout (timeout_seconds={self.timeout_seconds:g}); a peer worker died or hung. Aborting "
                    "this process's collectives."
                )
            print(self.message, file=sys.stderr, flush=True)
            self._abort_fn(self.message)


def _positive(name, value):
    if value is None:
        raise ValueError(f"Argument `{name}` must be a number of seconds > 0. Received: {name}=None")
    return validation.check_timeout(name, value)
