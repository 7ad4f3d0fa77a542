"""Private helpers shared by the optimizers and schedules of `tfscale.optimizers`."""

import math
import numbers
import re


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_number(name, value, *, minimum=None, strict=False, maximum=None, max_strict=False):
    """Returns `float(value)` after checking its range; the error names `name`."""
    if not _is_number(value) or not math.isfinite(float(value)):
        raise ValueError(f"Argument `{name}` must be a finite number. Received: {name}={value!r}")
    value = float(value)
    if minimum is not None:
        if strict and not value > minimum:
            raise ValueError(f"Argument `{name}` must be > {minimum}. Received: {name}={value!r}")
        if not strict and not value >= minimum:
            raise ValueError(f"Argument `{name}` must be >= {minimum}. Received: {name}={value!r}")
    if maximum is not None:
        if max_strict and not value < maximum:
            raise ValueError(f"Argument `{name}` must be < {maximum}. Received: {name}={value!r}")
        if not max_strict and not value <= maximum:
            raise ValueError(f"Argument `{name}` must be <= {maximum}. Received: {name}={value!r}")
    return value


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"Argument `{name}` must be an integer > 0. Received: {name}={value!r}")
    return int(value)




# Default exclusions (regular expressions searched in `variable.path`, e.g.
# "resnet/conv1_bn/gamma"): MLPerf's LARS skip list ['batch_normalization', 'bias'] plus the
# Keras 3 names of normalisation parameters (`gamma`, `beta`) so that BN layers with any
# name are skipped.
DEFAULT_EXCLUSIONS = (r"batch_normalization", r"bias", r"(^|/)gamma$", r"(^|/)beta$")


def _check_patterns(name, patterns):
    """Returns `patterns` as a tuple of strings (the default when `None`), each compiled once."""
    if patterns is None:
        return tuple(DEFAULT_EXCLUSIONS)
    if isinstance(patterns, str):
        raise ValueError(
            f"Argument `{name}` must be a list of regular expressions, not a string. "
            f"Received: {name}={patterns!r}"
        )
    try:
        patterns = tuple(patterns)
    except TypeError:
        raise ValueError(
            f"Argument `{name}` must be a list of regular expressions or None. "
            f"Received: {name}={patterns!r}"
        ) from None
    for p in patterns:
        if not isinstance(p, str):
            raise ValueError(
                f"Argument `{name}` must contain only strings. Received: {name}={patterns!r}"
            )
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(
                f"Argument `{name}` contains an invalid regular expression {p!r} ({e}). "
                f"Received: {name}={patterns!r}"
            ) from None
    return patterns


def _variable_path(variable):
    """The Keras 3 path of a variable (`dense/kernel`), falling back to its name."""
    path = getattr(variable, "path", None)
    if path is None:
        path = getattr(variable, "name", "")
        if path.endswith(":0"):
            path = path[:-2]
    return path


def _matches_any(patterns, path):
    return any(re.search(p, path) for p in patterns)
