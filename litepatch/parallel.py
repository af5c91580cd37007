"""LiteAttention under context (sequence) parallelism: Ulysses, ring, load balance, and a CPU emulator.

Every rank holds one shard of the sequence, ``[B, S/P, H, D]`` (``P`` ranks in ``group``). Two ways to attend:

* **Ulysses** (:func:`ulysses_lite_attention`): one all-to-all turns the sequence shards into head shards
  ``[B, S, H/P, D]``, each rank runs :func:`~litepatch.kernels.lite_attention` over the *full* sequence for its
  ``H/P`` heads with a rank-local :class:`~litepatch.kernels.SkipState` (it holds only those heads), and a second
  all-to-all brings the output back to ``[B, S/P, H, D]``. Attention per head is exactly the single-process one,
  so read/write lists per head equal the single-process run's (the state's heads slice).
* **Ring** (:func:`ring_lite_attention`): each rank keeps its query shard ``i``; the K/V chunks rotate around the
  ring. Every (query shard ``i``, K/V chunk ``c``) pair has its own :class:`SkipState` (``c`` is the index of the K/V
  shard, not the rotation step), each call returns its LSE and the partial outputs are merged by LSE
  (:func:`merge_partials`).

Ring semantics differ from unchunked attention. The skip test compares a tile against the running row max
*within its own call*, so in a ring every chunk restarts the running max: a tile is tested only against the keys
of its own chunk visited before it, the first tile visited in each chunk is never skippable (so every q-tile keeps
at least one tile per chunk), and the tiles follow the chunk's own tiling (when ``S/P`` is not a multiple of the
key tile the chunk tiles do not line up with the global ones). The equality target of a ring is therefore the
single-process *chunked* run :func:`chunked_lite_attention`, which calls ``lite_attention`` once per (query shard,
K/V chunk) and merges by LSE: same lists, outputs within float tolerance. With ``threshold=-inf`` nothing is
skipped and both equal dense attention. Must-compute token ranges are given in global coordinates and shifted into
each call's local coordinates (:func:`shard_ranges`).

**Ulysses x ring** (:func:`ulysses_ring_lite_attention`, groups from :func:`ulysses_ring_groups`): Ulysses inside
each ring shard, a ring across them, for more ranks than heads allow for Ulysses alone (or to keep the all-to-alls
inside a node). Its lists equal the chunked run's with ``n_chunks = ring_degree``, heads sliced per Ulysses rank.

Load balance: :func:`kept_tiles` and :func:`load_report` give each rank's kept work and the imbalance (max/mean);
:func:`head_work` and :func:`place_heads` assign heads to Ulysses ranks by kept work (greedy longest-processing-time
with ``H/P`` heads per rank); :func:`reshard_ulysses_state` moves the skip lists when the placement changes. Whether
the balance pays in step time can only be measured on GPUs (``benchmarks/multigpu.py``).

:func:`spawn_gloo` runs a function on ``P`` CPU processes joined by torch.distributed's gloo backend (tests and
smoke runs without GPUs).

Example:
    >>> import torch.distributed as dist
    >>> from litepatch.kernels import SkipState
    >>> from litepatch.parallel import ulysses_lite_attention
    >>> state = SkipState()                      # this rank's heads only
    >>> out = ulysses_lite_attention(q_shard, k_shard, v_shard, state, threshold=-6.0)   # [B, S/P, H, D]
"""

from __future__ import annotations

import datetime
import math
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from litepatch.kernels import DEFAULT_ORDER, DEFAULT_THRESHOLD, SkipState, lite_attention
from litepatch.kernels.state import normalize_ranges

Ranges = Sequence[tuple[int, int]] | None
AttnFn = Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]

__all__ = [
    "ChunkKey",
    "ChunkedSkipState",
    "LoadReport",
    "UlyssesRingGroups",
    "chunked_lite_attention",
    "contiguous_head_order",
    "head_work",
    "imbalance_ratio",
    "kept_tiles",
    "load_report",
    "merge_partials",
    "place_heads",
    "reshard_ulysses_state",
    "ring_attention",
    "ring_lite_attention",
    "sdpa_with_lse",
    "shard_ranges",
    "spawn_gloo",
    "ulysses_attention",
    "ulysses_lite_attention",
    "ulysses_ring_groups",
    "ulysses_ring_lite_attention",
]


# ----------------------------------------------------------------------------------------------------------------
# process groups


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


# ----------------------------------------------------------------------------------------------------------------
# Ulysses


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


# ----------------------------------------------------------------------------------------------------------------
# ring


class ChunkedSkipState:
    """Skip states of one layer and branch keyed by ``(query shard, K/V chunk)`` (ring and chunked attention).

    States are created on first use. On a ring rank only the keys ``(rank, c)`` exist; the single-process
    :func:`chunked_lite_attention` fills all ``(i, c)``.

    >>> states = ChunkedSkipState()
    >>> out = ring_lite_attention(q, k, v, states, threshold=-6.0)
    >>> sorted(states.keys())
    [(0, 0), (0, 1)]
    """

    def __init__(self) -> None:
        self._states: dict[tuple[int, int], SkipState] = {}

    def __getitem__(self, key: tuple[int, int]) -> SkipState:
        key = (int(key[0]), int(key[1]))
        if key not in self._states:
            self._states[key] = SkipState()
        return self._states[key]

    def __contains__(self, key) -> bool:
        return tuple(key) in self._states

    def __len__(self) -> int:
        return len(self._states)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(sorted(self._states))

    def keys(self) -> list[tuple[int, int]]:
        return sorted(self._states)

    def items(self) -> list[tuple[tuple[int, int], SkipState]]:
        return [(key, self._states[key]) for key in sorted(self._states)]

    def values(self) -> list[SkipState]:
        return [self._states[key] for key in sorted(self._states)]

    def reset(self) -> None:
        """Resets every state: the next call computes all tiles of every chunk."""
        for state in self._states.values():
            state.reset()

    def __repr__(self) -> str:
        return f"ChunkedSkipState(keys={self.keys()})"


class ChunkKey(NamedTuple):
    """The state key of one (query shard, K/V chunk) call of ring attention inside a patched model.

    ``branch`` is the layer's CFG branch key, ``shard`` the query shard (ring rank) and ``chunk`` the origin ring
    rank of the K/V chunk (not the rotation step). ``handle.skip_states()`` and the stats records of a layer under
    diffusers' ring context parallelism are keyed by it.

    >>> ChunkKey("cond", 0, 1)
    ChunkKey(branch='cond', shard=0, chunk=1)
    """

    branch: object
    shard: int
    chunk: int


def sdpa_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact dense attention with its natural-log LSE, the per-chunk op of a dense ring.

    ``q [B, Sq, H, D]``, ``k, v [B, Sk, H, D]``. PyTorch's flash kernel on CUDA (fp16/bf16, head dim <= 256), its
    CPU flash kernel on CPU, an fp32 softmax elsewhere.

    Returns ``(out [B, Sq, H, D], lse [B, H, Sq])`` (LSE in fp32).

    >>> out, lse = sdpa_with_lse(q, k_chunk, v_chunk)
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_shard(name, t)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    flash_dtypes = (torch.float16, torch.bfloat16)
    if q.device.type == "cuda" and q.dtype in flash_dtypes and q.shape[-1] <= 256:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, scale=softmax_scale)[:2]
    elif q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, scale=softmax_scale)
    else:
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
        scores = torch.matmul(qt.float(), kt.float().transpose(-1, -2)) * scale
        lse = torch.logsumexp(scores, dim=-1)
        out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), vt.float()).to(q.dtype)
    return out.transpose(1, 2), lse.float()


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]],
    *,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring attention around any ``attn_fn(q, k_chunk, v_chunk, chunk_index) -> (out, lse)``.

    Rank ``r`` holds query shard ``r`` and starts with K/V chunk ``r``; at step ``t`` it attends to chunk
    ``(r - t) mod P`` while sending its current chunk to rank ``r + 1`` and receiving the next from ``r - 1``.
    Partial outputs are merged by LSE as they arrive (fp32). Every rank's shard must have the same shape.

    Returns ``(out [B, S/P, H, D], lse [B, H, S/P])``.

    >>> out, lse = ring_attention(q, k, v, lambda q, k, v, c: sdpa_with_lse(q, k, v), group=group)
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_shard(name, t)
    if k.shape != v.shape or k.dtype != v.dtype:
        raise ValueError(
            f"k and v must share shape and dtype, got {tuple(k.shape)} {k.dtype}, {tuple(v.shape)} {v.dtype}"
        )
    rank, world = _world(group)
    kv = torch.stack((k, v)).contiguous()
    spare = torch.empty_like(kv) if world > 1 else None
    send_to, recv_from = _global_rank(group, (rank + 1) % world), _global_rank(group, (rank - 1) % world)
    out = lse = None
    for step in range(world):
        requests = []
        if step < world - 1:  # one batch: NCCL would deadlock on separate send/recv pairs between two ranks
            requests = dist.batch_isend_irecv([
                dist.P2POp(dist.isend, kv, send_to, group=group),
                dist.P2POp(dist.irecv, spare, recv_from, group=group),
            ])
        part_out, part_lse = attn_fn(q, kv[0], kv[1], (rank - step) % world)
        if out is None:
            out, lse = part_out.float(), part_lse.float()
        else:
            out, lse = _merge_two(out, lse, part_out.float(), part_lse.float())
        for request in requests:
            request.wait()
        if requests:
            kv, spare = spare, kv
    return out.to(q.dtype), lse


def ring_lite_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    states: ChunkedSkipState,
    *,
    group: dist.ProcessGroup | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    order: str = DEFAULT_ORDER,
    must_compute_queries: Ranges = None,
    must_compute_keys: Ranges = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LiteAttention with ring sequence parallelism: one :class:`SkipState` per (query shard, K/V chunk).

    ``q, k, v`` are this rank's shard ``[B, S/P, H, D]`` (shard index = rank in ``group``). Must-compute ranges
    are in global token coordinates and are shifted into each call's local coordinates. Results equal
    :func:`chunked_lite_attention` with ``n_chunks = P`` on the gathered tensors (see the module docstring for
    how that differs from unchunked attention).

    Returns ``out [B, S/P, H, D]`` or ``(out, lse [B, H, S/P])``.

    Example:
        >>> states = ChunkedSkipState()        # one per layer and branch, on every rank
        >>> for step in range(50):
        ...     out = ring_lite_attention(q, k, v, states, threshold=-6.0)
    """
    rank, world = _world(group)
    q_len, k_len = q.shape[1], k.shape[1]
    must_q = shard_ranges(must_compute_queries, rank * q_len, q_len, total=world * q_len)
    must_k_global = normalize_ranges(must_compute_keys, world * k_len, "must_compute_keys")

    def attend(q_shard, k_chunk, v_chunk, chunk):
        return lite_attention(
            q_shard, k_chunk, v_chunk, states[rank, chunk], threshold=threshold, softmax_scale=softmax_scale,
            return_lse=True, order=order, must_compute_queries=must_q,
            must_compute_keys=shard_ranges(must_k_global, chunk * k_len, k_len), backend=backend,
        )

    out, lse = ring_attention(q, k, v, attend, group=group)
    return (out, lse) if return_lse else out


def chunked_lite_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    states: ChunkedSkipState,
    *,
    n_chunks: int,
    threshold: float = DEFAULT_THRESHOLD,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    order: str = DEFAULT_ORDER,
    must_compute_queries: Ranges = None,
    must_compute_keys: Ranges = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Single-process ring semantics: ``lite_attention`` per (query shard, K/V chunk), merged by LSE.

    ``q [B, S, H, D]`` and ``k, v [B, Sk, H, D]`` are cut into ``n_chunks`` equal shards (``S`` and ``Sk`` must be
    divisible). ``states[i, c]`` is the state of query shard ``i`` against K/V chunk ``c``. This is what
    :func:`ring_lite_attention` on ``n_chunks`` ranks computes, and the reference it is tested against.

    >>> states = ChunkedSkipState()
    >>> out = chunked_lite_attention(q, k, v, states, n_chunks=2, threshold=-6.0)
    """
    if n_chunks < 1:
        raise ValueError(f"n_chunks must be >= 1, got {n_chunks}")
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4 or t.shape[1] % n_chunks:
            raise ValueError(f"{name} {tuple(t.shape)} must be [B, S, H, D] with S divisible by n_chunks={n_chunks}")
    q_len, k_len = q.shape[1] // n_chunks, k.shape[1] // n_chunks
    must_q = normalize_ranges(must_compute_queries, q.shape[1], "must_compute_queries")
    must_k = normalize_ranges(must_compute_keys, k.shape[1], "must_compute_keys")
    outs, lses = [], []
    for i in range(n_chunks):
        q_shard = q[:, i * q_len : (i + 1) * q_len]
        parts = [
            lite_attention(
                q_shard, k[:, c * k_len : (c + 1) * k_len], v[:, c * k_len : (c + 1) * k_len], states[i, c],
                threshold=threshold, softmax_scale=softmax_scale, return_lse=True, order=order,
                must_compute_queries=shard_ranges(must_q, i * q_len, q_len),
                must_compute_keys=shard_ranges(must_k, c * k_len, k_len), backend=backend,
            )
            for c in range(n_chunks)
        ]
        out, lse = merge_partials([p[0] for p in parts], [p[1] for p in parts])
        outs.append(out)
        lses.append(lse)
    out, lse = torch.cat(outs, dim=1), torch.cat(lses, dim=2)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------------------------
# Ulysses x ring


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
    threshold: float = -10.0,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    order: str = "anchor",
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


# ----------------------------------------------------------------------------------------------------------------
# load balance


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


# ----------------------------------------------------------------------------------------------------------------
# CPU emulation


def _spawned(rank: int, world_size: int, init_file: str, result_dir: str, timeout_s: float, fn, args) -> None:
    path = os.path.join(result_dir, f"rank{rank}.pt")
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        torch.set_num_threads(1)
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # reported to the parent, which raises
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise


def spawn_gloo(world_size: int, fn: Callable, *args, timeout_s: float = 120.0) -> list:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` CPU processes joined by a gloo process group.

    ``fn`` must be importable (a module-level function) and its result picklable by ``torch.save``. Ranks are
    forked from a forkserver that has imported torch once (cheap repeated calls). Returns the results by rank; a
    failure on any rank raises ``RuntimeError`` with that rank's traceback; a rank stuck past ``timeout_s`` is
    killed.

    >>> spawn_gloo(2, my_check, 256)      # my_check(rank, world_size, 256) on two ranks
    [result_of_rank_0, result_of_rank_1]
    """
    import torch.multiprocessing as mp

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    # forkserver: one server imports torch once and forks fresh ranks from it (no re-import per rank or per call,
    # and no fork of a process whose OpenMP pool already ran)
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch.distributed", "litepatch.parallel"])
    with tempfile.TemporaryDirectory(prefix="litepatch-gloo-") as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [
            context.Process(target=_spawned, args=(r, world_size, init_file, tmp, timeout_s, fn, args), daemon=True)
            for r in range(world_size)
        ]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout_s + 30
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        results, errors = [], []
        for r, proc in enumerate(procs):
            path = os.path.join(tmp, f"rank{r}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {r}: exited with code {proc.exitcode} and no result")
                results.append(None)
                continue
            record = torch.load(path, weights_only=False)
            if record["ok"]:
                results.append(record["result"])
            else:
                errors.append(f"rank {r}:\n{record['error']}")
                results.append(None)
        if errors:
            raise RuntimeError("spawn_gloo failed\n" + "\n".join(errors))
    return results
