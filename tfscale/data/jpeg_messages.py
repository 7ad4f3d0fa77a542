"""Folds libjpeg's stderr messages about corrupt images into tfscale's counted-skip summary.

TensorFlow's JPEG ops let libjpeg print a line to the process's stderr for each corrupt or truncated image
("Corrupt JPEG data: premature end of data segment", "Improper call to JPEG library in state 201", ...). The input
pipeline already skips and counts those records (`SkippedRecordCounter`, `SkippedRecordsLogger`), so on a large
data set with a few thousand bad files the lines are only noise, and they come from C code that Python's logging
cannot reach.

`LibjpegMessageFilter` redirects file descriptor 2 into a pipe while it is active. A reader thread forwards every
line to the real stderr at once, except the lines that match libjpeg's message table (`LIBJPEG_MESSAGE`), which
it counts instead. `SkippedRecordsLogger` adds the count to its end-of-epoch line, and on exit the filter prints
one summary line when it suppressed any.

Example:
  >>> with LibjpegMessageFilter() as libjpeg:
  ...     model.fit(ds, callbacks=[SkippedRecordsLogger(counter)])
  >>> libjpeg.count  # lines suppressed
"""

import os
import re
import sys
import threading

__all__ = ["LIBJPEG_MESSAGE", "LibjpegMessageFilter", "suppressed_count"]

#: The beginnings of libjpeg(-turbo)'s error and warning messages (jerror.h) that concern bad image data.
LIBJPEG_MESSAGE = re.compile(
    rb"^(Corrupt JPEG data|Premature end of JPEG file|Invalid JPEG file structure|Improper call to JPEG library"
    rb"|Not a JPEG file|Unsupported marker type|Bogus (marker length|Huffman table|DQT index|DHT index|DAC|"
    rb"virtual array|input colorspace|JPEG colorspace|sampling factors|buffer|message code)"
    rb"|Huffman table 0x|Quantization table 0x|Unsupported JPEG process|JPEG datastream contains no image"
    rb"|Empty JPEG image|Inconsistent progression sequence|Invalid progressive parameters|Invalid SOS parameters"
    rb"|Invalid component ID|Unsupported JPEG data precision|Sampling factors too large|Warning: unknown JFIF"
    rb"|Maximum supported image dimension|Application transferred too (few|many) scanlines"
    rb"|Unsupported color conversion request|Image too big|Arithmetic table 0x|Corrupt JPEG)"
)

_lock = threading.Lock()
_active = []  # the filters currently installed (innermost last)


def suppressed_count():
    """Returns the number of libjpeg lines suppressed by the active `LibjpegMessageFilter`s (0 when none)."""
    with _lock:
        return sum(f.count for f in _active)


class LibjpegMessageFilter:
    """Context manager: while active, libjpeg's messages about bad images are counted instead of printed.

    Every other line written to file descriptor 2 (Python's `sys.stderr`, TensorFlow's C++ logs, ...) reaches the
    real stderr unchanged and at once. Nesting is allowed; only the outermost filter redirects.

    Args:
      summary: bool, print one line to stderr on exit when any message was suppressed. Default True.

    Attributes:
      count: int, lines suppressed so far.
      by_message: dict {message: count}, with digits replaced by "N" (e.g. "Improper call to JPEG library in
        state N").
    """

    def __init__(self, summary=True):
        self.summary = summary
        self.count = 0
        self.by_message = {}
        self._saved_fd = None
        self._thread = None
        self._write_fd = None

    def __enter__(self):
        with _lock:
            nested = bool(_active)
            _active.append(self)
        if nested:
            return self
        sys.stderr.flush()
        self._saved_fd = os.dup(2)
        read_fd, self._write_fd = os.pipe()
        try:  # a 1 MiB pipe (Linux F_SETPIPE_SZ): writers never wait on the reader during a long GIL hold
            import fcntl

            fcntl.fcntl(self._write_fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
        except (ImportError, OSError):
            pass
        os.dup2(self._write_fd, 2)
        os.close(self._write_fd)
        self._thread = threading.Thread(target=self._pump, args=(read_fd,), name="libjpeg-message-filter",
                                        daemon=True)
        self._thread.start()
        return self

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
        out = []
        for line in lines:
            if LIBJPEG_MESSAGE.match(line):
                key = re.sub(rb"\d+", b"N", line.strip()).decode("utf-8", "replace")
                with _lock:
                    self.count += 1
                    self.by_message[key] = self.by_message.get(key, 0) + 1
            else:
                out.append(line)
        if out and self._saved_fd is not None:
            os.write(self._saved_fd, b"".join(out))

    def __exit__(self, *exc):
        with _lock:
            _active.remove(self)
        if self._saved_fd is None:
            return False
        sys.stderr.flush()
        os.dup2(self._saved_fd, 2)  # closes the pipe's last write end: the reader sees end of file
        self._thread.join(timeout=10)
        if not self._thread.is_alive():  # else a child process still holds the pipe: the thread keeps forwarding
            os.close(self._saved_fd)
        self._saved_fd = None
        if self.summary and self.count:
            details = "; ".join(f"{n} x {m!r}" for m, n in sorted(self.by_message.items(), key=lambda kv: -kv[1]))
            print(f"tfscale: suppressed {self.count} libjpeg messages about corrupt images ({details}); those "
                  "records were skipped and are in the skipped-record count.", file=sys.stderr)
        return False
