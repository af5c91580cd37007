"""Calls that skip nothing go to flash-attn-4's dense forward only where it runs and pays (issue 12)."""

from __future__ import annotations

import torch

from litepatch import dense_routing
from litepatch.adapters.base import AttentionCall


def _call(seq: int, heads: int = 12, dim: int = 128) -> AttentionCall:
    q = torch.empty(1, seq, heads, dim, device="meta")
    return AttentionCall(q=q, k=q, v=q, scale=None)


def test_long_calls_take_flash_attn_4_where_it_runs(monkeypatch):
    seen = []
    monkeypatch.setattr(dense_routing, "dense_kernel_name", lambda q: "flash-attn-4")
    monkeypatch.setattr(dense_routing, "dense_attention", lambda q, k, v, **kw: seen.append(q.shape) or "fa4")
    assert dense_routing.fast_dense(_call(32760)) == "fa4"  # Wan 480p: 6.6e12 FLOP
    assert dense_routing.fast_dense(_call(4608, heads=24)) is None  # Flux 1024^2: host time would exceed the gain
    assert seen == [torch.Size([1, 32760, 12, 128])]


def test_nothing_changes_where_flash_attn_4_does_not_run(monkeypatch):
    monkeypatch.setattr(dense_routing, "dense_kernel_name", lambda q: "sdpa")
    monkeypatch.setattr(dense_routing, "dense_attention", lambda *a, **kw: "called")
    assert dense_routing.fast_dense(_call(32760)) is None


def test_compiled_calls_run_the_models_own_attention(monkeypatch):
    monkeypatch.setattr(dense_routing, "dense_kernel_name", lambda q: "flash-attn-4")
    monkeypatch.setattr(dense_routing, "dense_attention", lambda *a, **kw: "called")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert dense_routing.fast_dense(_call(32760)) is None
