"""timm-style ``Attention`` blocks (``qkv`` projection, ``num_heads``, ``fused_attn``), as in timm and DiT repos.

* **Find**: a class named ``Attention`` or ``*SelfAttention`` with a ``qkv`` module and an int ``num_heads``.
* **Classify**: self-attention (one ``qkv`` projection of the same tokens); calls are checked again by shape.
* **Out of reach**: ``fused_attn=False`` makes timm compute the softmax by hand, which no interception sees:
  reported with the fix (``module.fused_attn = True``).
* **Intercept**: a copy of ``forward`` whose ``F`` names the layer's SDPA interceptor.
"""

from __future__ import annotations

import torch

from .base import Adapter, AttentionLayerInfo, heads_and_dim, install_forward_interception


class TimmAdapter(Adapter):
    """timm-style attention (see the module docstring)."""

    name = "timm-style"

    def matches(self, module: torch.nn.Module, name: str) -> bool:
        cls = type(module).__name__
        return ((cls == "Attention" or cls.endswith("SelfAttention"))
                and isinstance(getattr(module, "qkv", None), torch.nn.Module)
                and isinstance(getattr(module, "num_heads", None), int))

    def describe(self, module: torch.nn.Module, name: str, parent) -> AttentionLayerInfo:
        heads, head_dim = heads_and_dim(module)
        reach = ""
        if getattr(module, "fused_attn", True) is False:
            reach = (f"{type(module).__name__}.fused_attn is False: the softmax is computed by hand, outside any "
                     "attention call; set module.fused_attn = True")
        return AttentionLayerInfo(name, "self", heads, head_dim, type(module).__name__,
                                  f"{self.name}: one qkv projection of the same tokens", not reach,
                                  adapter=self.name, out_of_reach=reach)

    def install(self, module: torch.nn.Module, layer):
        return install_forward_interception(module, layer)
