"""The fastest exact dense attention on the device, for calls that skip nothing (DESIGN §2).

Warm-up steps, layers a recipe keeps dense and ``threshold=-inf`` calls in a patched model run here, so
a patched model is never slower than the unpatched one when nothing is skipped. On Hopper with the
``cuda`` extra that is flash-attn-4's CuTe-DSL forward, which measured 1.07-1.30x SDPA's cuDNN backend
over the six DiT shapes of ``benchmarks/kernel.py``; everywhere else it is PyTorch's SDPA (cuDNN or
flash on CUDA, the math/flash CPU kernels on CPU), which is what the model itself would have run.

Example:
    >>> out = dense_attention(q, k, v)   # [B, S, H, D] in, [B, S, H, D] out
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import registry


def _flash_attn_4(q: torch.Tensor) -> object | None:
    """flash-attn-4's forward when it can run on ``q``'s device (the ``cute`` backend loads it), else ``None``."""
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        cute = registry.get("cute")
    except registry.BackendUnavailable:
        return None
    if cute.refusal(q, q.shape[1]) is not None:
        return None
    return cute.forward.dense  # type: ignore[attr-defined]


def dense_kernel_name(q: torch.Tensor) -> str:
    """Which kernel :func:`dense_attention` runs for inputs like ``q``: ``"flash-attn-4"`` or ``"sdpa"``.

    A caller that would otherwise run SDPA itself (the patcher, for calls that skip nothing) only gains by
    calling :func:`dense_attention` when this says ``"flash-attn-4"``.
    """
    return "flash-attn-4" if _flash_attn_4(q) is not None else "sdpa"


# flash-attn-4's Python launch path costs 68-81 us of host time per call against SDPA's 19 us
# (benchmarks/patch_overhead.py on an H200) and saves 7-20 % of the GPU time over cuDNN, so it only pays on calls of
# a millisecond or more (Wan 480p: 6.6e12 FLOP, 9 ms; Flux 1024^2: 2.6e11 FLOP, 0.4 ms stays on SDPA).
FLASH_ATTN_4_MIN_FLOP = 1e12


def beats_sdpa(q: torch.Tensor, seq_k: int) -> bool:
    """Whether :func:`dense_attention` on a call with ``q [B, S, H, D]`` and ``seq_k`` keys is faster than the SDPA
    call a caller would make itself: flash-attn-4 runs it and the call is long enough
    (:data:`FLASH_ATTN_4_MIN_FLOP`) to pay for its launch path.

    >>> beats_sdpa(torch.empty(1, 4608, 24, 128, device="meta"), 4608)   # Flux 1024^2: SDPA stays faster
    False
    """
    batch, seq_q, heads, head_dim = q.shape
    if 4.0 * batch * heads * seq_q * seq_k * head_dim < FLASH_ATTN_4_MIN_FLOP:
        return False
    return dense_kernel_name(q) == "flash-attn-4"


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact softmax attention on ``[B, S, H, D]`` inputs with the fastest kernel this device has.

    ``key_mask``: bool ``[B, seq_k]``, True where the key takes part. (Callers that need the LSE call
    :func:`litepatch.kernels.lite_attention` with ``threshold=-inf``.)
    """
    fa4 = _flash_attn_4(q)
    out = None if fa4 is None else fa4(q, k, v, softmax_scale=softmax_scale, key_mask=key_mask)
    if out is not None:  # None: a key mask flash-attn-4 cannot take (not valid keys then padding)
        return out
    return sdpa_attention(q, k, v, softmax_scale=softmax_scale, key_mask=key_mask)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch's SDPA on ``[B, S, H, D]`` inputs (``key_mask`` as in :func:`dense_attention`): what a model's own
    attention call runs, for callers that cannot reach that call.

    >>> sdpa_attention(torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)).shape
    torch.Size([1, 8, 2, 16])
    """
    mask = None if key_mask is None else key_mask[:, None, None, :]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=softmax_scale).transpose(1, 2)
