"""Writing a run's results (`results.json`) atomically."""

from __future__ import annotations

import math
from typing import Any, Mapping

from tfscale import _atomic


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
    return _atomic.write_json_atomic(path, _jsonable(results), indent=2, sort_keys=True)
