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

On Triton 3.6 (the version verified on the GPU) a reused launch goes one step further down: straight to the
compiled kernel's C launcher, with the arguments the key already fixes packed once and each tensor passed as its
address. That skips, per launch, Triton's Python wrappers (a launch-metadata dict and two calls of empty hook
chains) and, per tensor, a ``data_ptr()`` call and a driver query of the pointer. Whenever a launch hook is
installed (a profiler such as proton) or the kernel needs scratch memory, the launch goes through Triton's
launcher as above.

Example:
    >>> launch(_list_kernel, (rows,), keep, anchor, ..., USE_ANCHOR=True, num_warps=4)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MAX_KEYS = 4096  # distinct (layer, branch, shape) calls remembered; past it the cache starts over

# call key (what Triton specialises on: each tensor's address and dtype, any other argument's value) ->
# (the compiled kernel's launcher for the grid, the names of the parameters passed by keyword, in order,
#  the direct launch of that call or None)
_RUNNERS: dict[tuple, tuple[Callable, tuple[str, ...], Callable | None]] = {}


def _triton_version() -> tuple[int, int] | None:
    """Triton's (major, minor), or ``None`` without Triton."""
    try:
        import triton
    except ImportError:
        return None
    return tuple(int(part) for part in triton.__version__.split(".")[:2])


# Triton 3.3 and later: a compiled kernel's launcher takes every parameter, constexprs included, in signature order
# (before, only the others; this module then leaves every launch to Triton)
REUSABLE = (_triton_version() or (0, 0)) >= (3, 3)
DIRECT = _triton_version() == (3, 6)  # the C launcher's argument list this module packs is Triton 3.6's
_HAS_CUDA = torch.cuda.is_available()


def _no_device() -> int:
    return -1


# The device Triton launches on (-1 without CUDA: Triton's interpreter on the CPU). torch.cuda.current_device() minus
# its two Python frames: the C function initialises CUDA itself where it has not been.
current_device = torch._C._cuda_getDevice if _HAS_CUDA else _no_device


def _key(kernel, grid: tuple[int, ...], device: int, args: tuple, kwargs: dict) -> tuple:
    return (kernel, grid, device,
            *[(a.data_ptr(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args], *kwargs.items())


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, through the compiled kernel of an earlier identical call when there is one.

    ``kwargs`` hold the kernel's trailing (constexpr) parameters by name and Triton's launch options
    (``num_warps``, ...).
    """
    device = current_device()
    key = _key(kernel, grid, device, args, kwargs)
    entry = _RUNNERS.get(key)
    if entry is not None:
        runner, trailing, direct = entry
        if direct is None or not direct(device):
            runner(*args, *[kwargs[name] for name in trailing])
        return
    compiled = kernel[grid](*args, **kwargs)
    trailing = tuple(getattr(kernel, "arg_names", ())[len(args):])
    if not REUSABLE or getattr(compiled, "packed_metadata", None) is None or not set(trailing) <= kwargs.keys():
        return  # no compiled kernel (the interpreter), or a parameter left to its default: Triton binds it
    if len(_RUNNERS) >= MAX_KEYS:
        _RUNNERS.clear()
    sizes = (*grid, 1, 1)[:3]  # its launcher reads three grid sizes; Triton pads
    values = (*[a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args], *[kwargs[n] for n in trailing])
    _RUNNERS[key] = (compiled[sizes], trailing, _direct_launch(compiled, sizes, values))


def bound_launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> Callable[[], None]:
    """A function that makes :func:`launch`'s launch ``kernel[grid](*args, **kwargs)`` again on the current device,
    its key made once: for a caller that repeats one launch with the very same arguments on every call (a state's
    commit). Meant after one :func:`launch` of these arguments; before it, or where :func:`launch` cannot reuse a
    compiled kernel (the interpreter), the function is that :func:`launch`.

    >>> again = bound_launch(_commit_kernel, (rows,), keep, ..., VOTE=True)
    >>> again()
    """
    device = current_device()
    entry = _RUNNERS.get(_key(kernel, grid, device, args, kwargs))
    if entry is None:
        return lambda: launch(kernel, grid, *args, **kwargs)
    runner, trailing, direct = entry
    values = (*args, *[kwargs[name] for name in trailing])
    if direct is None:
        return lambda: runner(*values)

    def again() -> None:
        if not direct(device):
            runner(*values)

    return again


def _direct_launch(compiled, sizes: tuple[int, int, int], values: tuple) -> Callable | None:
    """``compiled``'s C launcher bound to one call's arguments (tensors as addresses). The returned function takes
    the device to launch on (its current stream is read per launch) and returns False, launching nothing, while a
    launch hook is installed. ``None`` where this module does not know the launcher's arguments (another Triton
    than 3.6, a kernel that needs scratch memory)."""
    launcher = getattr(compiled, "run", None)  # Triton's CudaLauncher, made by ``compiled[grid]``
    if not DIRECT or not all(hasattr(launcher, name) for name in _LAUNCHER_FIELDS):
        return None
    if launcher.global_scratch_size or launcher.profile_scratch_size or _current_stream is None:
        return None
    runtime, c_launch, current_stream = _triton_runtime(), launcher.launch, _current_stream
    # after the stream: function, cooperative grid, PDL, global and profile scratch, packed metadata, launch
    # metadata, enter and exit hooks (None: not called), then every parameter in signature order
    after_stream = (compiled.function, launcher.launch_cooperative_grid, launcher.launch_pdl, None, None,
                    compiled.packed_metadata, None, None, None, *values)

    def direct(device: int) -> bool:
        # both hook slots idle: Triton 3.6 keeps hooks in chains, empty unless a profiler adds one; anything else (a
        # function assigned as in older Tritons) counts as installed
        if getattr(runtime.launch_enter_hook, "calls", None) != [] or getattr(runtime.launch_exit_hook, "calls",
                                                                               None) != []:
            return False
        c_launch(*sizes, current_stream(device), *after_stream)
        return True

    return direct


_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # device index -> raw stream handle


def _triton_runtime():
    """Triton's runtime knobs, where its launch hooks are installed."""
    from triton import knobs

    return knobs.runtime


_LAUNCHER_FIELDS = ("launch", "global_scratch_size", "profile_scratch_size", "launch_cooperative_grid", "launch_pdl")


def cached_launches() -> int:
    """Number of calls :func:`launch` can make without Triton's binding (a diagnostic)."""
    return len(_RUNNERS)
