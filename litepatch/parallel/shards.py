"""Sequence shards across ranks: the process group's rank and size, token ranges shifted into a shard, and
partial attention outputs merged by their log-sum-exp.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from litepatch.kernels.state import normalize_ranges


Ranges = Sequence[tuple[int, int]] | None
AttnFn = Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]


def _world(group) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) when torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError("a process group was given but torch.distributed is not initialised")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _global_rank(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def _check_shard(name: str, t: torch.Tensor) -> None:
    if t.dim() != 4:
        raise ValueError(f"{name} must be a sequence shard [batch, seqlen / P, heads, head_dim], got {tuple(t.shape)}")


# ----------------------------------------------------------------------------------------------------------------
# token ranges


def shard_ranges(ranges: Ranges, start: int, length: int, total: int | None = None) -> tuple[tuple[int, int], ...]:
    """Global ``[(start, end), ...]`` token ranges shifted into the local coordinates of ``[start, start + length)``.

    Ranges are clipped to the shard; ranges outside it disappear. ``total`` (the global length) validates them.

    >>> shard_ranges([(0, 10), (250, 300)], start=256, length=256)
    ((0, 44),)
    """
    if total is not None:
        ranges = normalize_ranges(ranges, total, "must-compute")
    out = []
    for lo, hi in ranges or ():
        lo, hi = max(int(lo), start), min(int(hi), start + length)
        if lo < hi:
            out.append((lo - start, hi - start))
    return tuple(out)


# ----------------------------------------------------------------------------------------------------------------
# LSE merge


def merge_partials(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merges attention outputs over disjoint key sets by their log-sum-exp.

    Args:
        outs: partial outputs ``[B, S, H, D]``, each normalised over its own keys.
        lses: their natural-log LSE ``[B, H, S]`` (``-inf`` for a row that saw no key; its output is ignored).

    Returns:
        ``(out, lse)``: the output over the union of the keys (dtype of ``outs[0]``) and its LSE (fp32).
        A row that no part saw gets output 0 and LSE ``-inf``.

    >>> out, lse = merge_partials([out_a, out_b], [lse_a, lse_b])
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"need one LSE per output and at least one of each, got {len(outs)} and {len(lses)}")
    for o, l in zip(outs, lses):
        if o.dim() != 4 or l.shape != (o.shape[0], o.shape[2], o.shape[1]):
            raise ValueError(f"out {tuple(o.shape)} [B, S, H, D] and lse {tuple(l.shape)} [B, H, S] do not match")
    out, lse = outs[0].float(), lses[0].float()
    for o, l in zip(outs[1:], lses[1:]):
        out, lse = _merge_two(out, lse, o.float(), l.float())
    return out.to(outs[0].dtype), lse


def _merge_two(out_a, lse_a, out_b, lse_b):
    lse = torch.logaddexp(lse_a, lse_b)
    seen = lse > -math.inf
    safe = torch.where(seen, lse, torch.zeros_like(lse))
    w_a = torch.where(seen, torch.exp(lse_a - safe), torch.zeros_like(lse)).transpose(1, 2).unsqueeze(-1)
    w_b = torch.where(seen, torch.exp(lse_b - safe), torch.zeros_like(lse)).transpose(1, 2).unsqueeze(-1)
    out = torch.where(w_a > 0, w_a * out_a, 0.0) + torch.where(w_b > 0, w_b * out_b, 0.0)
    return out, lse
