"""Ulysses context parallelism: all-to-all from sequence shards to head shards and back, around any attention
(:func:`ulysses_attention`) or LiteAttention with a rank-local skip state (:func:`ulysses_lite_attention`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from litepatch.kernels import DEFAULT_ORDER, DEFAULT_THRESHOLD, SkipState, lite_attention
from litepatch.parallel.shards import AttnFn, Ranges, _check_shard, _world


def contiguous_head_order(heads: int) -> torch.Tensor:
    """The default placement: rank ``r`` owns heads ``r * H/P ... (r + 1) * H/P - 1``."""
    return torch.arange(heads)


def _check_head_order(head_order: torch.Tensor | Sequence[int] | None, heads: int) -> torch.Tensor | None:
    if head_order is None:
        return None
    order = torch.as_tensor(head_order, dtype=torch.long).flatten().cpu()
    if order.numel() != heads or not torch.equal(order.sort().values, torch.arange(heads)):
        raise ValueError(f"head_order must be a permutation of range({heads}), got {order.tolist()}")
    return None if torch.equal(order, torch.arange(heads)) else order


def _all_to_all(send: torch.Tensor, group) -> torch.Tensor:
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv


def _seq_to_heads(xs: Sequence[torch.Tensor], world: int, group) -> list[torch.Tensor]:
    """Sequence shards ``[B, s, H, D]`` -> head shards ``[B, P*s, H/P, D]``, one all-to-all for all tensors."""
    batch, seq, heads, dim = xs[0].shape
    send = torch.stack(list(xs)).reshape(len(xs), batch, seq, world, heads // world, dim)
    recv = _all_to_all(send.permute(3, 0, 1, 2, 4, 5).contiguous(), group)  # [P(src seq shard), n, B, s, Hl, D]
    recv = recv.permute(1, 2, 0, 3, 4, 5).reshape(len(xs), batch, world * seq, heads // world, dim)
    return list(recv.unbind(0))


def _heads_to_seq(x: torch.Tensor, world: int, group) -> torch.Tensor:
    """Head shard ``[B, S, Hl, D]`` -> sequence shard ``[B, S/P, P*Hl, D]``."""
    batch, seq, heads, dim = x.shape
    send = x.reshape(batch, world, seq // world, heads, dim).permute(1, 0, 2, 3, 4).contiguous()
    recv = _all_to_all(send, group)  # [P(src head group), B, s, Hl, D]
    return recv.permute(1, 2, 0, 3, 4).reshape(batch, seq // world, world * heads, dim)


def _lse_heads_to_seq(lse: torch.Tensor, world: int, group) -> torch.Tensor:
    """LSE ``[B, Hl, S]`` -> ``[B, P*Hl, S/P]``."""
    batch, heads, seq = lse.shape
    send = lse.reshape(batch, heads, world, seq // world).permute(2, 0, 1, 3).contiguous()
    recv = _all_to_all(send, group)  # [P(src head group), B, Hl, s]
    return recv.permute(1, 0, 2, 3).reshape(batch, world * heads, seq // world)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_fn: AttnFn,
    *,
    group: dist.ProcessGroup | None = None,
    head_order: torch.Tensor | Sequence[int] | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Ulysses sequence parallelism around any attention ``attn_fn(q, k, v)`` on ``[B, S, Hl, D]`` head shards.

    Args:
        q, k, v (`torch.Tensor`): this rank's sequence shard ``[B, S/P, H, D]`` (every rank the same length;
            ``H`` divisible by ``P``).
        attn_fn: called once with the head shards ``[B, S, H/P, D]``; returns ``out`` or, with ``return_lse``,
            ``(out, lse [B, H/P, S])``.
        group: the Ulysses process group (default: the world; a single process without torch.distributed).
        head_order (*optional*): a permutation of the heads; rank ``r`` attends for heads
            ``head_order[r * H/P : (r + 1) * H/P]`` (see :func:`place_heads`). Default: contiguous.
        return_lse (`bool`): also return the LSE of the local sequence shard ``[B, H, S/P]``.

    Returns:
        ``out [B, S/P, H, D]`` in the original head order, or ``(out, lse)``.

    >>> out = ulysses_attention(q, k, v, lambda q, k, v: sdpa_bshd(q, k, v), group=group)
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_shard(name, t)
    _, world = _world(group)
    heads = q.shape[2]
    if heads % world:
        raise ValueError(
            f"Ulysses needs the head count divisible by the group size, got {heads} heads on {world} ranks"
        )
    order = _check_head_order(head_order, heads)
    if order is not None:
        index = order.to(q.device)
        q, k, v = (t.index_select(2, index) for t in (q, k, v))
    if world > 1:
        if q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype:
            q, k, v = _seq_to_heads((q, k, v), world, group)
        else:
            q, k, v = (_seq_to_heads((t,), world, group)[0] for t in (q, k, v))
    result = attn_fn(q, k, v)
    out, lse = result if return_lse else (result, None)
    if world > 1:
        out = _heads_to_seq(out, world, group)
        lse = _lse_heads_to_seq(lse, world, group) if lse is not None else None
    if order is not None:
        inverse = torch.argsort(order).to(out.device)
        out = out.index_select(2, inverse)
        lse = lse.index_select(1, inverse) if lse is not None else None
    return (out, lse) if return_lse else out


def ulysses_lite_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: SkipState | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    head_order: torch.Tensor | Sequence[int] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    order: str = DEFAULT_ORDER,
    must_compute_queries: Ranges = None,
    must_compute_keys: Ranges = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LiteAttention with Ulysses sequence parallelism.

    ``q, k, v`` are this rank's sequence shard ``[B, S/P, H, D]``. After the all-to-all the rank attends over the
    whole sequence for its ``H/P`` heads, so ``state`` holds the skip lists of those heads only
    (``[B, H/P, q_tiles, k_words]``, heads in ``head_order``'s slice for this rank) and they equal the heads slice
    of a single-process state. Must-compute ranges are in global token coordinates (each rank sees the whole
    sequence). The other arguments are :func:`~litepatch.kernels.lite_attention`'s.

    Returns ``out [B, S/P, H, D]`` or ``(out, lse [B, H, S/P])``.

    Example:
        >>> state = SkipState()                # one per layer and branch, on every rank
        >>> for step in range(50):
        ...     out = ulysses_lite_attention(q, k, v, state, threshold=-6.0)
    """

    def attend(q_heads, k_heads, v_heads):
        return lite_attention(
            q_heads, k_heads, v_heads, state, threshold=threshold, softmax_scale=softmax_scale,
            return_lse=return_lse, order=order, must_compute_queries=must_compute_queries,
            must_compute_keys=must_compute_keys, backend=backend,
        )

    return ulysses_attention(q, k, v, attend, group=group, head_order=head_order, return_lse=return_lse)
