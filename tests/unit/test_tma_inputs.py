"""The CuTe kernels' TMA loads get inputs they can read: aligned ones as they are, others as aligned copies."""

from __future__ import annotations

import torch

from litepatch.kernels.tma import tma_inputs, tma_ready


def _at_offset(shape, elements: int) -> torch.Tensor:
    """A ``shape`` view starting ``elements`` into a fresh buffer (a 2-byte dtype: 1 element = 2 bytes)."""
    numel = torch.Size(shape).numel()
    buffer = torch.arange(numel + elements, dtype=torch.float32).to(torch.bfloat16)
    return buffer[elements: elements + numel].view(shape)


def test_aligned_inputs_and_strided_views_pass_as_they_are():
    fused = torch.zeros(2, 100, 3, 4, 64, dtype=torch.bfloat16)  # a fused q/k/v projection's slices
    q, k, v = fused.unbind(2)
    assert all(tma_ready(t) for t in (q, k, v))
    assert all(a is b for a, b in zip(tma_inputs(q, k, v), (q, k, v)))
    transposed = torch.zeros(1, 2, 100, 64, dtype=torch.float16).transpose(1, 2)  # an SDPA-layout caller's view
    assert tma_ready(transposed)


def test_what_tma_cannot_read_is_copied_with_the_same_values():
    shape = (1, 100, 2, 64)
    misaligned = _at_offset(shape, 1)  # starts 2 bytes past an aligned address
    odd_stride = torch.randn(1, 100, 2, 67).to(torch.bfloat16)[..., :64]  # rows of 134 bytes
    broadcast = torch.randn(1, 1, 2, 64).to(torch.bfloat16).expand(shape)  # a zero stride
    ok = torch.zeros(shape, dtype=torch.bfloat16)
    for bad in (misaligned, odd_stride, broadcast):
        assert not tma_ready(bad)
        q, k, v = tma_inputs(bad, ok, bad)
        assert k is ok
        for copy in (q, v):
            assert copy is not bad and tma_ready(copy) and torch.equal(copy, bad)
    assert not tma_ready(torch.zeros(1, 100, 2, 64, dtype=torch.bfloat16).transpose(-1, -2))  # last dim strided


def test_the_four_dim_check_agrees_with_the_general_rule():
    """tma_ready takes a shortcut for [B, S, H, D] tensors; it must answer as the rule does, stride by stride."""
    def rule(t):
        strides, size = t.stride(), t.element_size()
        return strides[-1] == 1 and t.data_ptr() % 16 == 0 and all(s > 0 and s * size % 16 == 0 for s in strides[:-1])

    base = torch.zeros(2, 40, 3, 72, dtype=torch.float32)
    views = [base, base[..., :64], base[..., 1:65], base[:, 1:], base.transpose(1, 2), base[..., ::2],
             base[:1].expand(2, 40, 3, 72), base.permute(0, 2, 1, 3)]
    for dtype in (torch.bfloat16, torch.float32, torch.float64, torch.uint8):
        for view in views:
            for t in (view.to(dtype), _at_offset(tuple(view.shape), 1).to(dtype).contiguous()[..., :]):
                assert tma_ready(t) == rule(t), (dtype, t.shape, t.stride())
            typed = torch.zeros(2, 40, 3, 80, dtype=dtype)[..., :72]
            for t in (typed, typed[:, :, :, 8:], typed[..., 1:]):
                assert tma_ready(t) == rule(t), (dtype, t.shape, t.stride())
