"""Ulysses x ring: rank ``g`` is ring rank ``g // U`` and Ulysses rank ``g % U``; Ulysses over the heads inside
each ring group, ring over the sequence across them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from litepatch.kernels import DEFAULT_ORDER, DEFAULT_THRESHOLD
from litepatch.parallel.ring import ChunkedSkipState, ring_lite_attention
from litepatch.parallel.shards import Ranges, _world
from litepatch.parallel.ulysses import ulysses_attention


@dataclass(frozen=True)
class UlyssesRingGroups:
    """The process groups of a Ulysses x ring layout (:func:`ulysses_ring_groups`) and this rank's place in them.

    ``P = ulysses_degree * ring_degree`` ranks; global rank ``g = ring_rank * ulysses_degree + ulysses_rank``, so a
    Ulysses group is ``ulysses_degree`` consecutive ranks and holds ``ulysses_degree`` consecutive sequence shards:
    after its all-to-all each member holds ring shard ``ring_rank`` (``S / ring_degree`` tokens) for
    ``H / ulysses_degree`` heads.
    """

    ulysses: dist.ProcessGroup | None
    ring: dist.ProcessGroup | None
    ulysses_degree: int
    ring_degree: int
    ulysses_rank: int
    ring_rank: int


def ulysses_ring_groups(ulysses_degree: int, ring_degree: int) -> UlyssesRingGroups:
    """Creates the Ulysses and ring process groups of a ``ulysses_degree x ring_degree`` layout of the world.

    Collective: every rank of the world must call it with the same degrees (``dist.new_group`` for every group, in
    the same order). Without torch.distributed both degrees must be 1.

    >>> groups = ulysses_ring_groups(2, 4)            # 8 ranks: 4 Ulysses groups of 2, 2 rings of 4
    >>> out = ulysses_ring_lite_attention(q, k, v, states, groups=groups, threshold=-6.0)
    """
    if ulysses_degree < 1 or ring_degree < 1:
        raise ValueError(f"degrees must be >= 1, got ulysses_degree={ulysses_degree}, ring_degree={ring_degree}")
    rank, world = _world(None)
    if ulysses_degree * ring_degree != world:
        raise ValueError(
            f"ulysses_degree x ring_degree must equal the world size, got {ulysses_degree} x {ring_degree} on "
            f"{world} ranks"
        )
    if world == 1:
        return UlyssesRingGroups(None, None, 1, 1, 0, 0)
    ulysses = ring = None
    for r in range(ring_degree):
        group = dist.new_group([r * ulysses_degree + u for u in range(ulysses_degree)])
        if rank // ulysses_degree == r:
            ulysses = group
    for u in range(ulysses_degree):
        group = dist.new_group([r * ulysses_degree + u for r in range(ring_degree)])
        if rank % ulysses_degree == u:
            ring = group
    return UlyssesRingGroups(
        ulysses, ring, ulysses_degree, ring_degree, ulysses_rank=rank % ulysses_degree,
        ring_rank=rank // ulysses_degree,
    )


def ulysses_ring_lite_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    states: ChunkedSkipState,
    *,
    groups: UlyssesRingGroups,
    head_order: torch.Tensor | Sequence[int] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    order: str = DEFAULT_ORDER,
    must_compute_queries: Ranges = None,
    must_compute_keys: Ranges = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LiteAttention with Ulysses inside each ring shard and a ring across them (Ulysses x ring).

    ``q, k, v`` are this rank's sequence shard ``[B, S/P, H, D]`` (shard index = global rank). The Ulysses all-to-all
    gives each rank ring shard ``groups.ring_rank`` for ``H / ulysses_degree`` heads (``head_order``'s slice for its
    Ulysses rank, as in :func:`ulysses_lite_attention`), then :func:`ring_lite_attention` runs over the ring group with
    one state per (ring shard, K/V chunk). ``states[i, c]`` therefore equals the heads slice of
    :func:`chunked_lite_attention`'s ``states[i, c]`` with ``n_chunks = ring_degree`` on the gathered tensors; with
    ``ulysses_degree = 1`` this is the ring, with ``ring_degree = 1`` Ulysses. Must-compute ranges are in global
    token coordinates.

    Returns ``out [B, S/P, H, D]`` or ``(out, lse [B, H, S/P])``.

    Example:
        >>> groups = ulysses_ring_groups(2, 2)         # 4 ranks, once
        >>> states = ChunkedSkipState()                # one per layer and branch, on every rank
        >>> for step in range(50):
        ...     out = ulysses_ring_lite_attention(q, k, v, states, groups=groups, threshold=-6.0)
    """

    def attend(q_heads, k_heads, v_heads):
        return ring_lite_attention(
            q_heads, k_heads, v_heads, states, group=groups.ring, threshold=threshold, softmax_scale=softmax_scale,
            return_lse=return_lse, order=order, must_compute_queries=must_compute_queries,
            must_compute_keys=must_compute_keys, backend=backend,
        )

    return ulysses_attention(q, k, v, attend, group=groups.ulysses, head_order=head_order, return_lse=return_lse)
