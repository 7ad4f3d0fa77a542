"""Writing a run's results (`results.json`) atomically."""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Mapping


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / TF scalars
        try:
            value = value.item()
        except (ValueError, TypeError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/Infinity
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_results(path: str, results: Mapping[str, Any]) -> str:
    """Writes `results` as indented JSON to `path`, atomically (temporary file, then rename).

    Numpy and TensorFlow scalars become Python numbers, NaN and infinities become `null`, and anything else that is
    not JSON becomes its `str`, so a run's results are never lost to a serialisation error.

    Args:
        path: destination file, e.g. `<model_dir>/results.json`; its directory is created if missing.
        results: a mapping of JSON-like values.

    Returns:
        `path`.

    Raises:
        OSError: if the directory cannot be created or written.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".results.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_jsonable(results), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
