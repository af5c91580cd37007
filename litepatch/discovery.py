"""Finding attention layers in any model (DESIGN §3): the adapters of :mod:`litepatch.adapters`, never model names.

Every module is offered to the registered adapters in order (diffusers, ``nn.MultiheadAttention``,
timm-style, modules that call SDPA themselves); the first that matches describes it. A module nested
inside one already found is not listed again (the outer layer's interception covers it). The family facts
(which processors are joint, where their text tokens sit, which attention is linear) live in the adapter
files, one per family. Importing this module never imports diffusers.

Example:
    >>> import litepatch
    >>> for info in litepatch.inspect(transformer):
    ...     print(info.name, info.kind, info.heads, info.head_dim, info.reason)
"""

from __future__ import annotations

import torch

from .adapters import KINDS, find_attention_layers as _find
from .adapters.base import AttentionLayerInfo


def find_attention_layers(model: torch.nn.Module, adapter=None) -> list[tuple[AttentionLayerInfo, torch.nn.Module]]:
    """Every attention layer of ``model`` with its module, in ``named_modules()`` order.

    Raises:
        TypeError: when ``model`` is not a ``torch.nn.Module``.
    """
    return [(info, module) for info, module, _ in _find(model, adapter)]


__all__ = ["KINDS", "AttentionLayerInfo", "find_attention_layers"]
