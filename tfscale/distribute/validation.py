"""Argument checks shared by tfscale.distribute: pure Python, no TensorFlow.

One place for the checks that every constructor and factory repeats, so that a bad value
always gets the same kind of error: `TypeError` for a value of the wrong type, `ValueError`
for a value of the right type that is out of range or unknown. Messages follow Keras:
"Argument `name` must be ... Received: name=value".
"""

import operator

__all__ = [
    "as_int",
    "check_choice",
    "check_non_negative_int",
    "check_positive_int",
    "check_timeout",
]


def as_int(name, value):
    """Returns `value` as a Python int (numpy ints accepted).

    Raises:
      TypeError: if `value` is a bool or not an integer (`operator.index` fails).
    """
    if isinstance(value, bool):
        raise TypeError(f"Argument `{name}` must be an int. Received: {name}={value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"Argument `{name}` must be an int. Received: {name}={value!r}") from None


def check_positive_int(name, value):
    """Returns `value` as an int >= 1.

    Raises:
      TypeError: if `value` is not an int.
      ValueError: if `value` < 1.
    """
    value = as_int(name, value)
    if value < 1:
        raise ValueError(f"Argument `{name}` must be >= 1. Received: {name}={value}")
    return value


def check_non_negative_int(name, value):
    """Returns `value` as an int >= 0.

    Raises:
      TypeError: if `value` is not an int.
      ValueError: if `value` < 0.
    """
    value = as_int(name, value)
    if value < 0:
        raise ValueError(f"Argument `{name}` must be >= 0. Received: {name}={value}")
    return value


def check_timeout(name, value):
    """Returns `value` as a float > 0 (seconds), or None.

    Raises:
      TypeError: if `value` is neither None nor a number.
      ValueError: if `value` <= 0.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Argument `{name}` must be a number of seconds > 0 or None. Received: {name}={value!r}")
    if not value > 0:
        raise ValueError(f"Argument `{name}` must be > 0 seconds or None. Received: {name}={value!r}")
    return float(value)


def check_choice(name, value, choices):
    """Returns `value` if it is one of `choices`.

    Raises:
      ValueError: otherwise; the message lists the valid choices.
    """
    if value not in choices:
        raise ValueError(f"Argument `{name}` must be one of {list(choices)}. Received: {name}={value!r}")
    return value
