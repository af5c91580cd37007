"""Calls that skip nothing (warm-up, dense layers, ``threshold=-inf``): flash-attn-4's dense forward where it runs
and pays, else the model's own attention (DESIGN §2: a patched model is never slower than stock when nothing
is skipped).
"""

from __future__ import annotations

import torch

from litepatch.kernels import dense_attention, dense_kernel_name

from .adapters.base import AttentionCall


# flash-attn-4's Python launch path costs 68-81 us of host time per call against SDPA's 19 us
# (benchmarks/patch_overhead.py on an H200) and saves 7-20 % of the GPU time over cuDNN, so it only pays on calls of
# a millisecond or more (Wan 480p: 6.6e12 FLOP, 9 ms; Flux 1024^2: 2.6e11 FLOP, 0.4 ms stays as is).
FAST_DENSE_MIN_FLOP = 1e12


def fast_dense(call: AttentionCall) -> torch.Tensor | None:
    """A call that skips nothing on flash-attn-4's dense forward where it runs and pays (Hopper with the ``cuda``
    extra, 1.07-1.35x SDPA's cuDNN backend in ``benchmarks/backends.py``; long calls only, see
    :data:`FAST_DENSE_MIN_FLOP`), so dense steps of a patched video model are never slower than stock; ``None``
    elsewhere and while compiling (the model's own attention then runs)."""
    batch, seq_q, heads, dim = call.q.shape
    if torch.compiler.is_compiling() or 4.0 * batch * heads * seq_q * call.k.shape[1] * dim < FAST_DENSE_MIN_FLOP:
        return None
    if dense_kernel_name(call.q) != "flash-attn-4":
        return None
    return dense_attention(call.q, call.k, call.v, softmax_scale=call.scale, key_mask=call.key_mask)
