"""Deferred commits: while a caller holds a window open, a backend may leave the commit of a state's call (the small
kernel that turns the call's votes into the state's next lists and its kept count) to be launched later, together
with the other states' commits, in one launch.

The patcher opens a window when a patched model's forward starts and closes it when the forward returns: each layer
calls its attention once per forward, so the forward's commits, one launch per layer otherwise (about 25 us of host
time each inside a forward), go out as one. A state with a deferred commit is never used as it is: reading or
writing it (:class:`~litepatch.kernels.SkipState`'s reads, another backend's call, the state's next call) launches the
pending commits first (:func:`~litepatch.kernels.state.settle`), so a window left open (a forward that raised) costs
nothing but that wait.

One window per thread (only a thread inside a patched forward defers); what waits is launched by any thread that
reads or writes a waiting state, or flushes. Backends register what launches their deferred commits
(:func:`register_flush`).

Example:
    >>> open_window()          # a forward starts
    >>> out = lite_attention(q, k, v, state, threshold=-4.0)   # its commit may wait
    >>> close_window()         # every deferred commit is launched
"""

from __future__ import annotations

import threading
from collections.abc import Callable

_LOCAL = threading.local()
_FLUSHES: list[Callable[[], None]] = []


def register_flush(flush: Callable[[], None]) -> None:
    """Adds a backend's function that launches the commits it deferred (called by :func:`flush`)."""
    if flush not in _FLUSHES:
        _FLUSHES.append(flush)


def open_window() -> None:
    """Lets backends defer the commits of this thread's calls until :func:`close_window` (or :func:`flush`)."""
    _LOCAL.open = True


def window_open() -> bool:
    """Whether this thread's calls may defer their commits."""
    return getattr(_LOCAL, "open", False)


def flush() -> None:
    """Launches every deferred commit (this thread's window stays as it is)."""
    for launch in _FLUSHES:
        launch()


def close_window() -> None:
    """Launches every deferred commit; this thread's later calls commit at once."""
    _LOCAL.open = False
    flush()
