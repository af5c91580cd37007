"""Load balance: each rank's kept work and the imbalance (max / mean), head placement by kept work for Ulysses
(greedy longest-processing-time) and moving the skip lists when the placement changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from litepatch.kernels import SkipState
from litepatch.parallel.ring import ChunkedSkipState
from litepatch.parallel.shards import _world
from litepatch.parallel.ulysses import _check_head_order, contiguous_head_order


def _states(states: SkipState | ChunkedSkipState | Iterable[SkipState]) -> list[SkipState]:
    if isinstance(states, SkipState):
        return [states]
    if isinstance(states, ChunkedSkipState):
        return states.values()
    return list(states)


def kept_tiles(states: SkipState | ChunkedSkipState | Iterable[SkipState]) -> int:
    """Tiles computed by the last call of each state, summed (one rank's attention work). Syncs the device.

    >>> kept_tiles(ring_states)
    1234
    """
    return sum(state.kept_tiles() for state in _states(states))


def head_work(state: SkipState) -> torch.Tensor:
    """Int64 ``[H]``: tiles each head of ``state`` will compute in the next call (its read list), over batch rows
    and q-tiles. Before any call: every tile.

    >>> head_work(state)
    tensor([120,  64])
    """
    if not state.initialized:
        raise ValueError("the state has not been used yet: run one call first so its shape is known")
    return state.read_list().sum(dim=(0, 2, 3)).to(torch.int64).cpu()


def imbalance_ratio(per_rank: Sequence[float] | torch.Tensor) -> float:
    """``max / mean`` of per-rank work: 1.0 is perfect balance, ``P`` is all work on one rank.

    >>> imbalance_ratio([30, 10])
    1.5
    """
    work = torch.as_tensor(per_rank, dtype=torch.float64).flatten()
    if work.numel() == 0 or (work < 0).any():
        raise ValueError(f"per-rank work must be a non-empty list of non-negative numbers, got {work.tolist()}")
    mean = float(work.mean())
    return 1.0 if mean == 0 else float(work.max()) / mean


@dataclass(frozen=True)
class LoadReport:
    """Per-rank kept work (tiles) and its imbalance ``max / mean``."""

    per_rank: tuple[int, ...]
    imbalance: float

    def __str__(self) -> str:
        ranks = ", ".join(f"rank {r}: {w}" for r, w in enumerate(self.per_rank))
        return f"kept tiles {ranks}; imbalance (max/mean) {self.imbalance:.3f}"


def load_report(
    work: SkipState | ChunkedSkipState | Iterable[SkipState] | int, *, group: dist.ProcessGroup | None = None
) -> LoadReport:
    """Gathers every rank's kept work (its states' :func:`kept_tiles`, or a number) and the imbalance.

    Collective over ``group``: every rank must call it. Without torch.distributed, a one-rank report.

    >>> print(load_report(state, group=group))
    kept tiles rank 0: 812, rank 1: 406; imbalance (max/mean) 1.333
    """
    local = int(work) if isinstance(work, int) else kept_tiles(work)
    _, world = _world(group)
    if world == 1:
        per_rank = [local]
    else:
        gathered = [None] * world
        dist.all_gather_object(gathered, local, group=group)
        per_rank = [int(w) for w in gathered]
    return LoadReport(tuple(per_rank), imbalance_ratio(per_rank))


def place_heads(work: Sequence[float] | torch.Tensor, world_size: int) -> torch.Tensor:
    """Head placement for Ulysses by kept work: greedy longest-processing-time with ``H/P`` heads per rank.

    Heads are taken heaviest first and each goes to the least-loaded rank that still has room. When that is no
    better than the contiguous placement (largest rank load), the contiguous one is returned (no state moves).
    Returns a permutation ``head_order`` (long ``[H]``): rank ``r`` owns ``head_order[r * H/P : (r + 1) * H/P]``,
    each slice sorted ascending. Pass it to :func:`ulysses_lite_attention` (and move existing state with
    :func:`reshard_ulysses_state`).

    >>> place_heads([8, 7, 1, 1], world_size=2)   # loads 9 and 8 instead of 15 and 2
    tensor([0, 3, 1, 2])
    """
    work = torch.as_tensor(work, dtype=torch.float64).flatten()
    heads = work.numel()
    if world_size < 1 or heads == 0 or heads % world_size:
        raise ValueError(f"need a head count divisible by world_size >= 1, got {heads} heads and {world_size} ranks")
    capacity = heads // world_size
    by_work = sorted(range(heads), key=lambda h: (-float(work[h]), h))
    loads = [0.0] * world_size
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for h in by_work:
        rank = min((r for r in range(world_size) if len(owned[r]) < capacity), key=lambda r: (loads[r], r))
        owned[rank].append(h)
        loads[rank] += float(work[h])
    contiguous_max = float(work.view(world_size, capacity).sum(1).max())
    if contiguous_max <= max(loads):  # no better than what is there: keep it and move no state
        return contiguous_head_order(heads)
    return torch.tensor([h for rank_heads in owned for h in sorted(rank_heads)], dtype=torch.long)


def _gather(t: torch.Tensor, world: int, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def gather_head_work(
    state: SkipState, *, group: dist.ProcessGroup | None = None, head_order: torch.Tensor | Sequence[int] | None = None
) -> torch.Tensor:
    """Ulysses: every rank's :func:`head_work`, gathered into global head order (long ``[H]``). Collective.

    >>> order = place_heads(gather_head_work(state, group=group), world_size)
    """
    local = head_work(state)
    _, world = _world(group)
    per_position = torch.cat(_gather(local, world, group)) if world > 1 else local
    order = _check_head_order(head_order, per_position.numel())
    if order is None:
        return per_position
    out = torch.empty_like(per_position)
    out[order] = per_position
    return out


def reshard_ulysses_state(
    state: SkipState,
    old_order: torch.Tensor | Sequence[int] | None,
    new_order: torch.Tensor | Sequence[int] | None,
    *,
    group: dist.ProcessGroup | None = None,
) -> SkipState:
    """Moves skip lists between Ulysses ranks when the head placement changes (collective over ``group``).

    Returns a new state for this rank's heads under ``new_order`` with the skip lists (``keep``, ``anchor``) those
    heads had under ``old_order``, so skipping continues where it was. ``kept`` (the last call's count) is not
    recorded per head: it is set to the tiles the moved read lists hold (the next call's work).

    >>> state = reshard_ulysses_state(state, None, place_heads(gather_head_work(state), world_size))
    """
    if not state.initialized:
        raise ValueError("the state has not been used yet; nothing to reshard")
    rank, world = _world(group)
    local_heads = state.heads
    heads = local_heads * world
    old = _check_head_order(old_order, heads)
    new = _check_head_order(new_order, heads)
    old = torch.arange(heads) if old is None else old
    new = torch.arange(heads) if new is None else new

    def regroup(t: torch.Tensor) -> torch.Tensor:
        by_position = torch.cat(_gather(t, world, group), dim=1) if world > 1 else t
        by_head = torch.empty_like(by_position)
        by_head[:, old.to(t.device)] = by_position
        return by_head[:, new[rank * local_heads : (rank + 1) * local_heads].to(t.device)].contiguous()

    return state.with_heads(regroup)
