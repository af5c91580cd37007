"""What the Hopper kernels' TMA loads can read as it is, and aligned copies of what they cannot.

The CuTe-DSL kernels (:mod:`litepatch.kernels.cute_sm90`) are compiled for ``[B, S, H, D]`` tensors whose last
dimension is contiguous, with any other strides; TMA also needs the start address and every stride 16-byte
aligned. A view one element into a buffer, or a head-dim slice of a wider tensor with an odd stride, breaks that,
and launching on it would read the wrong bytes or fault.

>>> t = torch.zeros(1, 8, 2, 64, dtype=torch.bfloat16)
>>> tma_ready(t), tma_ready(torch.zeros(1, 8, 2, 65, dtype=torch.bfloat16)[..., :64])
(True, False)
"""

from __future__ import annotations

import torch


def tma_ready(t: torch.Tensor) -> bool:
    """Whether the compiled kernels take ``t`` as it is: the layout they were compiled for (last dimension
    contiguous, any other strides) with what TMA needs (start address and strides 16-byte aligned, no zero stride)."""
    return all_tma_ready(t)


def all_tma_ready(*tensors: torch.Tensor) -> bool:
    """:func:`tma_ready` of every one, in one Python frame (every CuTe call checks its q, k and v)."""
    for t in tensors:
        strides, size = t.stride(), t.element_size()
        if len(strides) == 4:  # [B, S, H, D]: one expression (1.8 against 2.9 us for q, k, v on a CPU)
            b, s, h, d = strides
            unit = 16 // size - 1  # a stride of 16 bytes is a multiple of this + 1 elements (sizes are powers of two)
            if not (d == 1 and b > 0 and s > 0 and h > 0 and not (b | s | h) & unit and not t.data_ptr() & 15):
                return False
        elif not (strides[-1] == 1 and t.data_ptr() % 16 == 0
                  and all(s > 0 and s * size % 16 == 0 for s in strides[:-1])):
            return False
    return True


def tma_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q, k, v`` as the compiled kernels take them: each one as it is where :func:`tma_ready`, else a new contiguous
    copy (``contiguous()`` would return a misaligned contiguous tensor unchanged)."""
    if all_tma_ready(q, k, v):
        return q, k, v
    return tuple(t if tma_ready(t) else t.clone(memory_format=torch.contiguous_format) for t in (q, k, v))
