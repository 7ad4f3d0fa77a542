"""Atomic JSON files: written to a temporary file in the same directory, then renamed into place.

One mechanism for every JSON record tfscale writes (``results.json``, calibration files, the large-batch study's
cell records), so that a crash or a kill never leaves a partial file. Pure Python, no TensorFlow.
"""

import json
import os
import tempfile

__all__ = ["write_json_atomic"]


def write_json_atomic(path, obj, *, make_dirs=True, mode=None, trailing_newline=True, **dump_kwargs):
    """Writes `obj` as JSON to `path` through a temporary file and `os.replace`.

    Args:
      path: str, the destination file.
      obj: the JSON-serialisable object.
      make_dirs: bool, create the directory if missing (default True); False leaves a missing directory an error.
      mode: None (mkstemp's 0600) or int permission bits for the file, e.g. 0o644.
      trailing_newline: bool, end the file with a newline. Default True.
      **dump_kwargs: passed to `json.dump` (``indent``, ``sort_keys``, ``allow_nan``, ``default``).

    Returns:
      `path`.

    Raises:
      OSError: if the directory cannot be created or written.
      TypeError, ValueError: from `json.dump` (the temporary file is removed, `path` untouched).
    """
    directory = os.path.dirname(os.path.abspath(path))
    if make_dirs:
        os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        if mode is not None:
            os.chmod(tmp, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, **dump_kwargs)
            if trailing_newline:
                f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
