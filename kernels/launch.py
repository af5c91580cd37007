"""Triton launches with less host time: the compiled kernel reused for calls with the very same arguments.

``kernel[grid](*args, **constexprs)`` binds and specialises every argument on every call, about 17 us of host
time per launch on an H200's host (``benchmarks/patch_overhead.py``), where the launch itself costs a few. The
CuTe backend makes two such launches per attention call (its list and commit kernels), and from one denoising
step to the next a layer passes them the same tensors: its skip state and the shared scratch views.

:func:`launch` keys a call by the kernel, the grid, the current device, each tensor's address and dtype, every
other argument's value and the launch options. The first call of a key goes through Triton, which compiles or
finds the kernel and returns it; later calls launch that compiled kernel through its own launcher
(``compiled[grid]``, which keeps Triton's stream and profiler hooks). The same addresses, dtypes and values are
what Triton specialises on, so the reused kernel is the one Triton would pick. Where Triton returns no compiled
kernel (``TRITON_INTERPRET=1``), or is older than 3.3 (whose launchers take another argument list), every call
goes through Triton.

Example:
    >>> launch(_list_kernel, (rows,), keep, anchor, ..., USE_ANCHOR=True, num_warps=4)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MAX_KEYS = 4096  # distinct (layer, branch, shape) calls remembered; past it the cache starts over

# call key (what Triton specialises on: each tensor's address and dtype, any other argument's value) ->
# (the compiled kernel's launcher for the grid, the names of the parameters passed by keyword, in order)
_RUNNERS: dict[tuple, tuple[Callable, tuple[str, ...]]] = {}


def _triton_launches_with_every_parameter() -> bool:
    """Whether a compiled kernel's launcher takes every parameter, constexprs included, in signature order: Triton
    3.3 and later (before, only the others; this module then leaves every launch to Triton)."""
    try:
        import triton
    except ImportError:
        return False
    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 3)


REUSABLE = _triton_launches_with_every_parameter()
_HAS_CUDA = torch.cuda.is_available()


def _current_device() -> int:
    """The device Triton launches on (-1 without CUDA: Triton's interpreter on the CPU)."""
    return torch.cuda.current_device() if _HAS_CUDA else -1


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, through the compiled kernel of an earlier identical call when there is one.

    ``kwargs`` hold the kernel's trailing (constexpr) parameters by name and Triton's launch options
    (``num_warps``, ...).
    """
    key = (kernel, grid, _current_device(),
           *[(a.data_ptr(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args], *kwargs.items())
    entry = _RUNNERS.get(key)
    if entry is not None:
        runner, trailing = entry
        runner(*args, *[kwargs[name] for name in trailing])
        return
    compiled = kernel[grid](*args, **kwargs)
    trailing = tuple(getattr(kernel, "arg_names", ())[len(args):])
    if not REUSABLE or getattr(compiled, "packed_metadata", None) is None or not set(trailing) <= kwargs.keys():
        return  # no compiled kernel (the interpreter), or a parameter left to its default: Triton binds it
    if len(_RUNNERS) >= MAX_KEYS:
        _RUNNERS.clear()
    _RUNNERS[key] = (compiled[(*grid, 1, 1)[:3]], trailing)  # its launcher reads three grid sizes; Triton pads


def cached_launches() -> int:
    """Number of calls :func:`launch` can make without Triton's binding (a diagnostic)."""
    return len(_RUNNERS)
