"""The kernel backends and what each can take (DESIGN §2).

A backend is one file that calls :func:`register_backend` with a :class:`Backend`: its forward (the
signature of :func:`litepatch.kernels.reference.reference_forward`), its tile sizes per head dim
(they fix the skip-state layout) and its :class:`Constraints`. The registry imports those files
lazily, by name, so ``backend="triton"`` works in a fresh process and a CPU install never imports
Triton or flash-attn-4; a file whose imports fail is remembered with the reason.

Dispatch asks :func:`select`: with ``backend="auto"`` the highest-priority backend whose constraints
accept the call (on CUDA: ``cute`` on sm90 when flash-attn-4 is installed, else ``triton``); the CPU
reference only ever serves CPU tensors unless asked for by name. :func:`refusal` says in one sentence
why no backend can take a call, so the patcher can run the model's own attention and say so.

Example:
    >>> from litepatch.kernels import registry
    >>> registry.refusal(torch.randn(1, 256, 2, 96), seq_k=256)  # on CPU: the reference takes it
    >>> registry.select(torch.randn(1, 256, 2, 64), seq_k=256).name
    'reference'
"""

from __future__ import annotations

import importlib
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .state import TileConfig

# Backend files, by name, in the order ``auto`` prefers them when several accept a call, with the device
# types each serves: a call on another device never imports the file (a CPU call never imports Triton).
_MODULES = {
    "cute": ("litepatch.kernels.cute_fwd", ("cuda",)),
    "triton": ("litepatch.kernels.triton_fwd", ("cuda",)),
    "reference": ("litepatch.kernels.reference", ("cpu", "cuda")),
}


class BackendUnavailable(ValueError):
    """No backend can take a call (or the one asked for cannot); the message says why."""


@dataclass(frozen=True)
class Constraints:
    """What a backend can take. ``None`` means "any"."""

    device_types: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    head_dims: tuple[int, ...] | None = None
    cuda_archs: tuple[int, ...] | None = None  # compute capability majors (9 = Hopper)
    max_k_tiles: int | None = None
    key_padding: bool = True

    def refusal(self, q: torch.Tensor, seq_k: int, tiles: TileConfig, key_padding: bool) -> str | None:
        """Why inputs like ``q [B, S, H, D]`` with ``seq_k`` keys cannot be taken, or ``None``."""
        if q.device.type not in self.device_types:
            return f"device {q.device} (takes {'/'.join(self.device_types)})"
        if q.dtype not in self.dtypes:
            return f"dtype {str(q.dtype).replace('torch.', '')} (takes {', '.join(str(d).replace('torch.', '') for d in self.dtypes)})"
        head_dim = q.shape[-1]
        if self.head_dims is not None and head_dim not in self.head_dims:
            return f"head_dim {head_dim} (takes {', '.join(map(str, self.head_dims))})"
        if self.cuda_archs is not None and q.device.type == "cuda":
            major = _capability(q.device)[0]
            if major not in self.cuda_archs:
                return f"compute capability sm{major}x (takes {', '.join(f'sm{a}x' for a in self.cuda_archs)})"
        if self.max_k_tiles is not None and math.ceil(seq_k / tiles.block_n) > self.max_k_tiles:
            return f"{math.ceil(seq_k / tiles.block_n)} key tiles (takes at most {self.max_k_tiles})"
        if key_padding and not self.key_padding:
            return "a key-padding mask"
        return None


@dataclass(frozen=True)
class Backend:
    """A LiteAttention forward and what it can take.

    ``repeat`` (optional): called after ``forward`` with the same arguments, a function of ``(q, k, v, lse_wanted)``
    that makes that call again on new inputs of the same shapes, dtypes and device with less host time (everything
    else found once), or ``None``. That function returns ``(out, lse)``, or ``None`` (launching nothing) when the call
    it repeats is not the one to make any more; :func:`~litepatch.kernels.lite_attention` then calls ``forward``.
    ``lse_wanted=False``: the caller drops the LSE, which may then live in a buffer the function reuses (one
    allocation less per call: the patcher never reads it).
    """

    name: str
    forward: Callable
    tiles: Callable[[int], TileConfig]
    constraints: Constraints
    repeat: Callable | None = None

    def refusal(self, q: torch.Tensor, seq_k: int, key_padding: bool = False) -> str | None:
        return self.constraints.refusal(q, seq_k, self.tiles(q.shape[-1]), key_padding)


_REGISTERED: dict[str, Backend] = {}
_NOT_LOADED: dict[str, str] = {}  # name -> why its file could not be imported


def register_backend(backend: Backend) -> None:
    """Adds (or replaces) a backend; a backend file calls this when it is imported."""
    global generation
    _REGISTERED[backend.name] = backend
    _NOT_LOADED.pop(backend.name, None)
    _SELECTED.clear()
    generation += 1


# counts registrations: what was decided under one generation (a state's repeated call) is decided again after
generation = 0


def _load(name: str) -> Backend | None:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _NOT_LOADED or name not in _MODULES:
        return None
    try:
        importlib.import_module(_MODULES[name][0])
    except ImportError as error:
        _NOT_LOADED[name] = f"{error.name or error} is not installed"
        return None
    return _REGISTERED.get(name)


def get(name: str) -> Backend:
    """The backend called ``name``; raises :class:`BackendUnavailable` naming what is missing."""
    backend = _load(name)
    if backend is None:
        if name in _NOT_LOADED:
            raise BackendUnavailable(f"backend {name!r} cannot load: {_NOT_LOADED[name]}{install_hint(name)}")
        raise BackendUnavailable(f"unknown backend {name!r}; known: {', '.join(known_backends())}")
    return backend


def known_backends() -> list[str]:
    """Every backend name, loadable here or not (the registered ones and the built-in files)."""
    return sorted(set(_MODULES) | set(_REGISTERED))


def available_backends() -> list[str]:
    """The backends that load in this environment."""
    return sorted(name for name in known_backends() if _load(name) is not None)


def not_loaded() -> dict[str, str]:
    """``{name: reason}`` for the built-in backends that do not load here (e.g. a missing GPU extra)."""
    for name in _MODULES:
        _load(name)
    return dict(_NOT_LOADED)


def _candidates(device_type: str) -> list[str]:
    built_in = [name for name, (_, devices) in _MODULES.items() if name != "reference" and device_type in devices]
    names = built_in + [name for name in _REGISTERED if name not in _MODULES]
    return names + ["reference"] if device_type == "cpu" else names


# select's answers (a backend, or the refusal's message) by everything a constraint reads: a model asks the same
# few questions on every call, and walking the candidates cost several microseconds of host time per call
_SELECTED: dict[tuple, Backend | str] = {}


def select(q: torch.Tensor, seq_k: int, *, backend: str = "auto", key_padding: bool = False) -> Backend:
    """The backend that runs a call with ``q [B, S, H, D]`` and ``seq_k`` keys.

    ``backend="auto"``: the first of cute, triton (and, for CPU tensors only, reference) that accepts
    it. A name: that backend, if it accepts it. Raises :class:`BackendUnavailable` with every refusal.
    """
    if torch.compiler.is_compiling():  # a constant of the trace, uncached: the cache's contents would be guarded on
        # operator.index: under dynamic shapes the sizes are symbolic, and the choice depends on them (key tiles,
        # head dims): the trace specializes on them, as the dict lookup did (int() stays symbolic in a trace)
        chosen, text = _decide(backend, q.device, q.dtype, operator.index(q.shape[-1]), operator.index(seq_k),
                               key_padding)
        answer = _REGISTERED[text] if chosen else text
    else:
        key = (backend, q.device, q.dtype, q.shape[-1], seq_k, key_padding)
        answer = _SELECTED.get(key)
        if answer is None or (type(answer) is Backend and _REGISTERED.get(answer.name) is not answer):  # new, dropped
            chosen, text = _decide(*key)
            answer = _REGISTERED[text] if chosen else text
            if len(_SELECTED) >= 256:  # many sequence lengths: start over rather than grow
                _SELECTED.clear()
            _SELECTED[key] = answer
    if type(answer) is str:
        raise BackendUnavailable(answer)
    return answer


class _CallForm(NamedTuple):
    """What a backend's constraints read of a call's ``q``."""

    device: torch.device
    dtype: torch.dtype
    shape: tuple[int, ...]


@torch.compiler.assume_constant_result
def _decide(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int, seq_k: int,
            key_padding: bool) -> tuple[bool, str]:
    """``(True, backend name)`` or ``(False, why none)`` for a form of call.

    A constant of a torch.compile trace, computed eagerly: choosing may import a backend's module or ask the driver
    for the device's capability, which a trace cannot follow. In the first trace of a freshly patched model that was
    a graph break inside the patched attention, and with blocks compiled one by one, a NameError, as the attention
    modules' patched forwards share one code object (``tests/unit/test_patcher_compile.py``).
    """
    try:
        return True, _select(_CallForm(device, dtype, (head_dim,)), seq_k, backend, key_padding).name
    except BackendUnavailable as error:
        return False, str(error)


def _select(q: _CallForm, seq_k: int, backend: str, key_padding: bool) -> Backend:
    if backend != "auto":
        chosen = get(backend)
        reason = chosen.refusal(q, seq_k, key_padding)
        if reason:
            raise BackendUnavailable(f"backend {backend!r} cannot take this call: {reason}")
        return chosen
    reasons = [] if q.device.type in ("cpu", "cuda") else [f"device {q.device}: no backend serves it"]
    for name in _candidates(q.device.type):
        candidate = _load(name)
        if candidate is None:
            reasons.append(f"{name}: {_NOT_LOADED.get(name, 'not registered')}")
            continue
        reason = candidate.refusal(q, seq_k, key_padding)
        if reason is None:
            return candidate
        reasons.append(f"{name}: {reason}")
    raise BackendUnavailable("no LiteAttention backend takes this call (" + "; ".join(reasons) + ")")


def refusal(q: torch.Tensor, seq_k: int, *, backend: str = "auto", key_padding: bool = False) -> str | None:
    """Why no backend (or the one named) can take the call, in one sentence; ``None`` when one can."""
    try:
        select(q, seq_k, backend=backend, key_padding=key_padding)
    except BackendUnavailable as error:
        return str(error)
    return None


def tiles(q: torch.Tensor, seq_k: int, *, backend: str = "auto", key_padding: bool = False) -> TileConfig:
    """The tile sizes the call would run with (they define its tiles in stats)."""
    return select(q, seq_k, backend=backend, key_padding=key_padding).tiles(q.shape[-1])


def install_hint(name: str) -> str:
    """What to install for a GPU backend, as a sentence suffix ("" for the others)."""
    if name == "cute":
        return ' (install the GPU extra: pip install "litepatch[cuda]")'
    if name == "triton":
        return ' (install Triton: pip install "litepatch[triton]")'
    return ""


_CAPABILITIES: dict[int, tuple[int, int]] = {}


def _capability(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITIES:
        _CAPABILITIES[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITIES[index]
