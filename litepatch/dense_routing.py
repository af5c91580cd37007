"""Calls that skip nothing (warm-up, dense layers, ``threshold=-inf``): flash-attn-4's dense forward where it runs,
else the model's own attention (DESIGN §2: a patched model is never slower than stock when nothing
is skipped).
"""

from __future__ import annotations

import torch

from litepatch.kernels import faster_dense_attention

from .adapters.base import AttentionCall


def fast_dense(call: AttentionCall) -> torch.Tensor | None:
    """A call that skips nothing on the kernels' fastest dense attention where it beats the model's own SDPA call
    (:func:`litepatch.kernels.beats_sdpa`: flash-attn-4 on Hopper with the ``cuda`` extra), so dense
    steps of a patched video model are never slower than stock; ``None`` elsewhere and while compiling (the
    model's own attention then runs)."""
    if torch.compiler.is_compiling():
        return None
    return faster_dense_attention(call.q, call.k, call.v, softmax_scale=call.scale, key_mask=call.key_mask)
