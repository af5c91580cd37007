"""Ring context parallelism: K/V chunks rotate around the ranks, one skip state per (query shard, K/V chunk)
(:class:`ChunkedSkipState`, :class:`ChunkKey`), partial outputs merged by LSE; :func:`chunked_lite_attention` is the
single-process equality target of a ring, :func:`sdpa_with_lse` its exact dense op.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.distributed as dist

from litepatch.kernels import DEFAULT_ORDER, DEFAULT_THRESHOLD, SkipState, lite_attention
from litepatch.kernels.state import normalize_ranges
from litepatch.parallel.shards import Ranges, _check_shard, _global_rank, _merge_two, _world, merge_partials, shard_ranges


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
