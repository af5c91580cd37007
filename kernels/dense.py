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
    """flash-attn-4's forward when it can run on ``q``'s device (the ``cute`` backend loads it), else ``None``.
    The registry remembers its answer per form of call (every dense call of a patched model asks)."""
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        cute = registry.select(q, q.shape[1], backend="cute")
    except registry.BackendUnavailable:
        return None
    return cute.forward.dense  # type: ignore[attr-defined]


def dense_kernel_name(q: torch.Tensor) -> str:
    """Which kernel :func:`dense_attention` runs for inputs like ``q``: ``"flash-attn-4"`` or ``"sdpa"``.

    A caller that would otherwise run SDPA itself (the patcher, for calls that skip nothing) only gains by
    calling :func:`dense_attention` when this says ``"flash-attn-4"``.
    """
    return "flash-attn-4" if _flash_attn_4(q) is not None else "sdpa"


def beats_sdpa(q: torch.Tensor) -> bool:
    """Whether :func:`dense_attention` on inputs like ``q [B, S, H, D]`` is faster than the SDPA call a caller would
    make itself: wherever flash-attn-4 runs. Launched directly (``cute_sm90.run_dense_sm90``), it costs the host
    what SDPA does, and it beat SDPA's own choice at every size measured on the H200, host time included
    (``benchmarks/dense_crossover.py``: 1.02-1.26x from 512 tokens x 12 heads to Wan 480p). Its interface's
    Python (62-82 us a call against SDPA's 18-26) once made only calls above 1e12 FLOP worth it.

    >>> beats_sdpa(torch.empty(1, 4608, 24, 128))   # on the CPU: SDPA
    False
    """
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
    out = faster_dense_attention(q, k, v, softmax_scale=softmax_scale, key_mask=key_mask)
    return out if out is not None else sdpa_attention(q, k, v, softmax_scale=softmax_scale, key_mask=key_mask)


def faster_dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """flash-attn-4's dense forward where it runs, which beats the SDPA call the caller would make itself
    (:func:`beats_sdpa`), else ``None``: the caller runs its own attention (:func:`dense_attention` runs SDPA then).
    One kernel lookup, where asking :func:`beats_sdpa` and then calling :func:`dense_attention` made two (the patcher
    does this on every call that skips nothing).

    >>> faster_dense_attention(*[torch.randn(1, 8, 2, 16)] * 3) is None   # on the CPU: SDPA is the fastest
    True
    """
    fa4 = _flash_attn_4(q)
    # None also for a key mask flash-attn-4 cannot take (not valid keys, then padding)
    return None if fa4 is None else fa4(q, k, v, softmax_scale=softmax_scale, key_mask=key_mask)


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
