"""``torch.nn.MultiheadAttention``: its fused fast path never calls SDPA, so the adapter runs the layer itself.

* **Find**: ``isinstance(module, nn.MultiheadAttention)``.
* **Classify**: from each call: ``query is key is value`` (the same tokens) is self-attention, anything else is
  cross-attention and runs the module's own forward. The static kind (``inspect``) comes from the attribute
  name (``cross_attn``, ``attn2``: cross) and is only a preview.
* **Key masks**: ``key_padding_mask`` (bool, True = padding, PyTorch's convention) becomes the kernel's key mask
  (True = takes part); float key-padding masks, ``attn_mask``, ``is_causal`` and ``need_weights=True`` run the
  module's own forward with one warning (pass ``need_weights=False`` to make a layer sparse).
* **Intercept**: an instance ``forward`` that projects with ``in_proj_weight``, calls the layer's LiteAttention and
  projects with ``out_proj``; the class is not touched.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .base import Adapter, AttentionCall, AttentionLayerInfo, static_kind


def _problem(module: torch.nn.MultiheadAttention, query, key, value, key_padding_mask, need_weights, attn_mask,
             is_causal) -> str | None:
    if need_weights:
        return "need_weights=True (LiteAttention returns no attention weights; call it with need_weights=False)"
    if attn_mask is not None or is_causal:
        return "an attn_mask or is_causal=True"
    if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
        return "separate q/k/v projections, bias_k/bias_v or add_zero_attn"
    if module.training and module.dropout > 0.0:
        return f"dropout={module.dropout} in training mode"
    if query.dim() != 3:
        return f"unbatched {query.dim()}-d input"
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        return "a float key_padding_mask (only boolean key-padding masks are sparse)"
    return None


class MultiheadAttentionAdapter(Adapter):
    """``torch.nn.MultiheadAttention`` (see the module docstring)."""

    name = "nn.MultiheadAttention"

    def matches(self, module: torch.nn.Module, name: str) -> bool:
        return isinstance(module, torch.nn.MultiheadAttention)

    def describe(self, module: torch.nn.Module, name: str, parent) -> AttentionLayerInfo:
        kind, why = static_kind(module, name)
        heads = module.num_heads
        return AttentionLayerInfo(
            name, kind, heads, module.embed_dim // heads, type(module).__name__,
            f"{self.name}: {why}; each call is self-attention when query, key and value are one tensor",
            kind == "self", adapter=self.name,
        )

    def install(self, module: torch.nn.Module, layer):
        original = module.forward

        def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                    average_attn_weights=True, is_causal=False):
            layer.entered = True
            if not (query is key and key is value):  # cross-attention: the module's own forward
                layer.reached = True
                return original(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
            out = _attend(module, layer, query, key_padding_mask,
                          _problem(module, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal))
            if out is None:
                return original(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
            return out, None

        module.forward = functools.update_wrapper(forward, original)
        layer.interception = "nn.MultiheadAttention forward (in_proj, LiteAttention, out_proj)"

        def undo() -> None:
            module.__dict__.pop("forward", None)

        return undo


def _attend(module: torch.nn.MultiheadAttention, layer, x: torch.Tensor, key_padding_mask, problem: str | None):
    tokens = x if module.batch_first or x.dim() != 3 else x.transpose(0, 1)
    if tokens.dim() != 3:
        return layer.attend_problem(problem or "unbatched input")
    batch, seq, embed = tokens.shape
    heads = module.num_heads
    qkv = F.linear(tokens, module.in_proj_weight, module.in_proj_bias).view(batch, seq, 3, heads, embed // heads)
    q, k, v = qkv.unbind(2)
    key_mask = None if key_padding_mask is None or problem else ~key_padding_mask
    out = layer.attend(AttentionCall(q, k, v, None, key_mask, problem, seq, None, 1))
    if out is None:
        return None
    out = F.linear(out.reshape(batch, seq, embed), module.out_proj.weight, module.out_proj.bias)
    return out if module.batch_first else out.transpose(0, 1)
