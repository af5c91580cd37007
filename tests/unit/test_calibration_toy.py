"""A toy attention model with a known per-layer sensitivity, for the calibration tests (CPU, fast).

Every block attends over 1024 tokens whose queries and keys are dominated by a positional code on
a half circle, so attention is local and tiles far from the diagonal are skippable; each block's
output enters the residual stream with a gain, and the blocks with a large gain (``SENSITIVE``) are
the ones whose skipping hurts the final output. ``run`` is a 6-step Euler-like loop that calls the
model with a decreasing ``timestep``, like a diffusion sampler. ``make_job`` is the job entry point.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

GAINS = (1.0, 0.05, 0.05, 1.0, 0.05, 0.05)
SENSITIVE = (0, 3)
TIMESTEPS = (900.0, 750.0, 600.0, 450.0, 300.0, 150.0)


class ToyAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.qk = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        qk = (pos + 0.5 * self.qk(x))[:, None]  # [B, 1, S, D]
        return F.scaled_dot_product_attention(qk, qk, self.v(x)[:, None])[:, 0]


class ToyModel(nn.Module):
    def __init__(self, gains=GAINS, seq: int = 1024, dim: int = 16, amp: float = 16.0):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.gains = list(gains)
        self.blocks = nn.ModuleList(ToyAttention(dim) for _ in self.gains)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p.shape[-1]))
        angle = torch.arange(seq, dtype=torch.float32) * (math.pi / seq)
        pos = torch.zeros(seq, dim)
        pos[:, 0], pos[:, 1] = amp * torch.cos(angle), amp * torch.sin(angle)
        self.register_buffer("pos", pos)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        h = x
        for gain, block in zip(self.gains, self.blocks):
            h = h + gain * block(h, self.pos)
        return h - x


@torch.no_grad()
def run(model: ToyModel, sample) -> torch.Tensor:
    seed = int(sample)
    x = torch.randn(1, *model.pos.shape, generator=torch.Generator().manual_seed(seed))
    for t in TIMESTEPS:
        x = x - 0.15 * model(x, timestep=torch.tensor([t]))
    return x


def make_job(gains=GAINS, delay: float = 0.0):
    """Job entry: ``(model, run, samples, held_out)``; ``delay`` slows each generation (kill tests)."""
    import time

    model = ToyModel(gains).eval()

    def slow_run(m, sample):
        if delay:
            time.sleep(delay)
        return run(m, sample)

    return model, slow_run, [0, 1], [5]


def test_toy_sensitivity_is_known():
    import litepatch
    from litepatch.calibration import psnr

    apply = getattr(litepatch, "apply", None) or __import__("litepatch.api", fromlist=["apply"]).apply
    model = ToyModel().eval()
    dense = run(model, 0)
    handle = apply(model, threshold=-20.0)
    try:
        quality = []
        for i in range(len(GAINS)):
            handle.configure(threshold=-20.0, layers={f"blocks.{i}": -2.0})
            quality.append(psnr(run(model, 0), dense))
    finally:
        handle.remove()
    worst = sorted(range(len(GAINS)), key=lambda i: quality[i])[: len(SENSITIVE)]
    assert sorted(worst) == list(SENSITIVE), quality
    assert torch.equal(run(model, 0), dense)  # removed: exactly dense again


if __name__ == "__main__":
    pytest.main([__file__])
