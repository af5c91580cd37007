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
from collections.abc import Mapping

# Key-tile visiting orders: the previous call's best tile first then ascending, or alternating direction.
ORDERS = ("anchor", "alternate")
DEFAULT_ORDER = ORDERS[0]  # the better of the two on the demo model (README, "How it works")
# Skip-test threshold in log2 units when nothing else is given: conservative.
DEFAULT_THRESHOLD = -10.0


def describe_value(value: object) -> str:
    """The type and size of a bad value for error messages, never its content: ``a string of 5 characters``.

    Recipes come from files and the Hub; a path that points at a secret file by mistake must not put
    the secret into a log, so messages name types and lengths only (numbers are named by type).

    Example:
        >>> describe_value("hf_abc"), describe_value([1, 2]), describe_value(1.5), describe_value(None)
        ('a string of 6 characters', 'a list of 2 items', 'a float', 'null')
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, str):
        return f"a string of {len(value)} character{'s' if len(value) != 1 else ''}"
    if isinstance(value, Mapping):
        return f"a mapping of {len(value)} key{'s' if len(value) != 1 else ''}"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    name = type(value).__name__
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


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
