"""Calls that skip nothing go to the kernels' dense attention where it beats the model's own SDPA call (issue 12):
wherever flash-attn-4 runs; the rule itself is the kernels' (``litepatch.kernels.beats_sdpa``)."""

from __future__ import annotations

import torch

from litepatch import dense_routing
from litepatch.adapters.base import AttentionCall
from litepatch.kernels import dense


def _call(seq: int, heads: int = 12, dim: int = 128) -> AttentionCall:
    q = torch.empty(1, seq, heads, dim, device="meta")
    return AttentionCall(q=q, k=q, v=q, scale=None)


def _flash_attn_4_runs(monkeypatch, runs: bool = True) -> list:
    """Makes flash-attn-4 look present (or absent) to the kernels; returns the shapes it got."""
    seen = []
    monkeypatch.setattr(dense, "_flash_attn_4",
                        lambda q: (lambda q, k, v, **kw: seen.append(q.shape) or "fa4") if runs else None)
    return seen


def test_calls_of_every_length_take_flash_attn_4_where_it_runs(monkeypatch):
    seen = _flash_attn_4_runs(monkeypatch)
    assert dense_routing.fast_dense(_call(32760)) == "fa4"  # Wan 480p: 6.6e12 FLOP
    assert dense_routing.fast_dense(_call(512, heads=2, dim=64)) == "fa4"  # 1.3e8 FLOP: launched directly, it pays
    assert seen == [torch.Size([1, 32760, 12, 128]), torch.Size([1, 512, 2, 64])]


def test_nothing_changes_where_flash_attn_4_does_not_run(monkeypatch):
    seen = _flash_attn_4_runs(monkeypatch, runs=False)
    assert dense_routing.fast_dense(_call(32760)) is None
    assert seen == []


def test_compiled_calls_run_the_models_own_attention(monkeypatch):
    seen = _flash_attn_4_runs(monkeypatch)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert dense_routing.fast_dense(_call(32760)) is None
    assert seen == []


def test_on_the_cpu_sdpa_stays_however_long_the_call():
    assert dense.dense_kernel_name(torch.empty(1, 8, 2, 64)) == "sdpa"
    assert not dense.beats_sdpa(torch.empty(1, 4608, 24, 128))
