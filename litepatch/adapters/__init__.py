"""Module-family adapters and their registry (DESIGN §3): one small file per family.

Built in, tried in this order for each module: :mod:`~litepatch.adapters.diffusers` (diffusers attention
classes and their processors), :mod:`~litepatch.adapters.mha` (``torch.nn.MultiheadAttention``),
:mod:`~litepatch.adapters.timm` (timm-style ``Attention``), :mod:`~litepatch.adapters.sdpa` (any module
that calls SDPA itself: the generic fallback). A module nested inside a found layer is not listed again.

A user adapter subclasses :class:`Adapter` and is passed to ``litepatch.apply(model, adapter=...)`` (tried
before the built-in ones) or registered for every model with :func:`register_adapter`.

Example:
    >>> from litepatch.adapters import Adapter, register_adapter
    >>> class MyAttentionAdapter(Adapter):
    ...     name = "my-attention"
    ...     def matches(self, module, name):
    ...         return type(module).__name__ == "MyAttention"
    >>> register_adapter(MyAttentionAdapter())
    >>> [info.adapter for info in litepatch.inspect(model)][:1]
    ['my-attention']
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import KINDS, Adapter, AttentionCall, AttentionLayerInfo, call_kind, iter_named
from .diffusers import DiffusersAdapter
from .mha import MultiheadAttentionAdapter
from .sdpa import SDPACallerAdapter
from .timm import TimmAdapter

_REGISTRY: list[Adapter] = [DiffusersAdapter(), MultiheadAttentionAdapter(), TimmAdapter(), SDPACallerAdapter()]


def register_adapter(adapter: Adapter, *, first: bool = True) -> None:
    """Adds ``adapter`` to the registry (before the built-in ones unless ``first=False``).

    An adapter of the same name is replaced."""
    _check(adapter)
    _REGISTRY[:] = [a for a in _REGISTRY if a.name != adapter.name]
    _REGISTRY.insert(0 if first else len(_REGISTRY), adapter)


def registered_adapters() -> list[Adapter]:
    """The adapters tried for every model, in order."""
    return list(_REGISTRY)


def get_adapter(name: str) -> Adapter:
    """The registered adapter called ``name``; ``ValueError`` lists the known names."""
    for adapter in _REGISTRY:
        if adapter.name == name:
            return adapter
    raise ValueError(f"unknown adapter {name!r}; registered: {', '.join(a.name for a in _REGISTRY)}")


def _check(adapter) -> Adapter:
    if not isinstance(adapter, Adapter):
        raise TypeError(f"an adapter must be a litepatch.adapters.Adapter instance, got {type(adapter).__name__}")
    if not isinstance(adapter.name, str) or not adapter.name:
        raise ValueError(f"adapter {adapter!r} needs a non-empty name")
    return adapter


def resolve_adapters(adapter: Adapter | str | Sequence | None) -> list[Adapter]:
    """The adapters to try: ``None``/``"auto"`` the registry; an adapter (or a list) first, then the registry."""
    if adapter is None or adapter == "auto":
        return registered_adapters()
    if isinstance(adapter, str):
        return [get_adapter(adapter)]
    chosen = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter]
    chosen = [_check(a) if not isinstance(a, str) else get_adapter(a) for a in chosen]
    return chosen + [a for a in registered_adapters() if a.name not in {c.name for c in chosen}]


def find_attention_layers(
    model: torch.nn.Module, adapter: Adapter | str | Sequence | None = None
) -> list[tuple[AttentionLayerInfo, torch.nn.Module, Adapter]]:
    """Every attention layer of ``model`` with its module and adapter, in ``named_modules()`` order.

    Raises:
        TypeError: when ``model`` is not a ``torch.nn.Module``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    adapters = resolve_adapters(adapter)
    found: list[tuple[AttentionLayerInfo, torch.nn.Module, Adapter]] = []
    taken: list[str] = []
    for name, module, parent in iter_named(model):
        if any(t == "" or name == t or name.startswith(t + ".") for t in taken):
            continue
        for candidate in adapters:
            if candidate.matches(module, name):
                info = candidate.describe(module, name, parent)
                if not info.adapter:
                    info.adapter = candidate.name
                found.append((info, module, candidate))
                taken.append(name)
                break
    return found


__all__ = [
    "KINDS", "Adapter", "AttentionCall", "AttentionLayerInfo", "DiffusersAdapter", "MultiheadAttentionAdapter",
    "SDPACallerAdapter", "TimmAdapter", "call_kind", "find_attention_layers", "get_adapter", "register_adapter",
    "registered_adapters", "resolve_adapters",
]
