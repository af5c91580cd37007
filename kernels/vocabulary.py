"""The kernel's own vocabulary (DESIGN §1): visiting orders, the threshold rule, the default threshold.

It lives beside the kernels, at the bottom of the house: recipes, the patcher and the calibrator
import it from here.

Example:
    >>> threshold_problem(-6.0) is None
    True
    >>> threshold_problem(0.5, "schedule[2]")[:47]
    'schedule[2] must be <= 0 in log2 units (-10 con'
"""

from __future__ import annotations

import math
import numbers

# Key-tile visiting orders: the previous call's best tile first then ascending, or alternating direction.
ORDERS = ("anchor", "alternate")
# Skip-test threshold in log2 units when nothing else is given: conservative.
DEFAULT_THRESHOLD = -10.0


def describe_value(value: object) -> str:
    """``repr`` (cut at 60 characters) and type name of a bad value, for error messages: ``'abc' (str)``."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def threshold_problem(value: object, path: str = "threshold") -> str | None:
    """The error message for ``value`` as the threshold at ``path``, or ``None`` when it is a valid one.

    The one home of the threshold rule, used by recipe validation (every threshold and schedule entry)
    and by :func:`litepatch.kernels.check_threshold`: a real number <= 0 in log2 units (-10 conservative,
    0 the most aggressive allowed, ``-inf`` skips nothing); NaN, positive values (``+inf`` too), booleans
    and non-numbers are refused.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"{path}: expected number, got {describe_value(value)}"
    if math.isnan(value):
        return f"{path} is NaN; use a number <= 0 in log2 units (e.g. -6.0), or -inf (YAML: -.inf) to skip nothing"
    if value > 0:
        return (
            f"{path} must be <= 0 in log2 units (-10 conservative, 0 aggressive, -inf skips nothing; "
            f"YAML: -.inf), got {value}"
        )
    return None
