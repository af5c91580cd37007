"""Exact PyTorch reference of the LiteAttention forward (DESIGN §1). Runs on any device.

It is the oracle of the GPU kernel and the CPU backend of the patcher. Semantics, per
(batch row, head, q-tile i), with S = Q Kᵀ unscaled in fp32 and c = softmax_scale · log2(e):

1. The call computes exactly the key tiles in the read list (``state.keep``).
2. Visiting order: ``order="anchor"``: the anchor tile (largest score of the previous call) first
   when it is in the read list, then the other read tiles ascending. ``order="alternate"``: all
   read tiles descending on even calls, ascending on odd ones.
3. For each visited tile j, row r *needs* it unless ``(max_c S[r, c] − m_prev[r]) · c <= threshold``
   with both maxima finite, ``m_prev`` being the running max over the tiles visited before j in
   this call: a NaN or infinite score makes its row need the tile, so one bad activation cannot
   shrink the lists of later calls. Rows beyond the query length do not vote, key columns beyond
   the key length or masked by ``key_valid`` are ``-inf``.
4. Tile j is written as skippable when no valid row needs it, it is not the first visited tile,
   and neither the q-tile nor the k-tile holds a must-compute token. The next read list is the read
   list minus the skippable tiles; the new anchor is the visited tile holding the largest score
   (ties: the earliest visited).
   Key-padding mask (``key_valid``, bool ``[B, seq_k]``): key tiles with no valid key are not
   visited, not counted and not voted on in this call, and stay in the stored list as they were
   (the next call's mask may differ).
5. The output is the softmax of ``S · scale`` restricted to the read list (skippable tiles were
   computed, so they count), times V. The LSE is natural-log, ``[B, H, seq_q]``, fp32.
"""

from __future__ import annotations

import math

import torch

from .registry import Backend, Constraints, register_backend
from .state import DEFAULT_TILES, keep_written, pack_bits, unpack_bits

LOG2E = 1.4426950408889634
_MAX_CHUNK_ELEMENTS = 1 << 26  # scores held at once (256 MiB of fp32)


def reference_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    anchor: torch.Tensor,
    kept: torch.Tensor,
    must_q: torch.Tensor,
    must_k: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    *,
    block_m: int,
    block_n: int,
    threshold: float,
    softmax_scale: float,
    use_anchor: bool,
    descending: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference forward on ``[B, S, H, D]`` inputs; updates ``keep``, ``anchor`` and ``kept`` in place.

    Every backend implements this signature (see :mod:`litepatch.kernels.state` for the tensors).
    Validation and state initialisation are done by :func:`litepatch.kernels.lite_attention`.
    Returns ``out [B, Sq, H, D]`` (dtype of q) and ``lse [B, H, Sq]`` (fp32, natural log).
    """
    batch, seq_q, heads, dim = q.shape
    seq_k = k.shape[1]
    k_tiles = math.ceil(seq_k / block_n)
    out = q.new_empty(q.shape)
    lse = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=q.device)
    stored = unpack_bits(keep, k_tiles)  # [B, H, QT, KT]
    read = stored if key_valid is None else stored & _valid_tiles(key_valid, block_n, k_tiles)[:, None, None]
    skip_test = threshold > -math.inf
    heads_per_chunk = max(1, _MAX_CHUNK_ELEMENTS // max(1, seq_q * seq_k))
    new_read, new_anchor = stored.clone(), anchor.clone()
    for b in range(batch):
        for h0 in range(0, heads, heads_per_chunk):
            hs = slice(h0, min(heads, h0 + heads_per_chunk))
            result = _attend_chunk(
                q[b, :, hs].transpose(0, 1),
                k[b, :, hs].transpose(0, 1),
                v[b, :, hs].transpose(0, 1),
                read[b, hs],
                anchor[b, hs],
                None if key_valid is None else key_valid[b],
                block_m=block_m,
                block_n=block_n,
                threshold=threshold,
                softmax_scale=softmax_scale,
                skip_test=skip_test,
                use_anchor=use_anchor,
                descending=descending,
                must_q=must_q,
                must_k=must_k,
            )
            out[b, :, hs] = result["out"].transpose(0, 1).to(q.dtype)
            lse[b, hs] = result["lse"]
            new_read[b, hs] = result["next_read"] | (stored[b, hs] & ~read[b, hs])
            new_anchor[b, hs] = result["anchor"]
    kept.copy_(read.sum())
    keep_written(keep)
    keep.copy_(pack_bits(new_read))
    anchor.copy_(new_anchor)
    return out, lse


def _valid_tiles(key_valid: torch.Tensor, block_n: int, k_tiles: int) -> torch.Tensor:
    """Bool ``[B, k_tiles]``: key tiles holding at least one valid key."""
    padded = key_valid.new_zeros(key_valid.shape[0], k_tiles * block_n)
    padded[:, : key_valid.shape[1]] = key_valid
    return padded.view(-1, k_tiles, block_n).any(-1)


def _attend_chunk(q, k, v, read, anchor, key_valid, *, block_m, block_n, threshold, softmax_scale, skip_test, use_anchor, descending,
                  must_q, must_k):
    """One batch row, a chunk of heads: q ``[h, Sq, D]``, read ``[h, QT, KT]``, anchor ``[h, QT]``."""
    seq_q, q_tiles = q.shape[1], read.shape[-2]
    scores = q.float() @ k.float().transpose(-1, -2)  # [h, Sq, Sk], unscaled
    if key_valid is not None:
        scores.masked_fill_(~key_valid, -math.inf)
    row_tile_max = _row_tile_max(scores, block_n)  # [h, Sq, KT]

    visit = _visiting_order(read, anchor, use_anchor, descending)  # [h, QT, KT] tile ids in visiting order
    visit_rows = _rows_of_tiles(visit, block_m, seq_q)  # [h, Sq, KT]
    read_rows = _rows_of_tiles(read, block_m, seq_q)
    in_order_read = read_rows.gather(-1, visit_rows)
    in_order_max = row_tile_max.gather(-1, visit_rows).masked_fill(~in_order_read, -math.inf)
    running = in_order_max.cummax(-1).values
    m_prev = torch.cat([torch.full_like(running[..., :1], -math.inf), running[..., :-1]], dim=-1)

    first_visited = torch.zeros_like(read).scatter_(-1, visit[..., :1], True)
    if skip_test:
        below = (in_order_max - m_prev) * (softmax_scale * LOG2E) <= threshold
        finite = torch.isfinite(in_order_max) & torch.isfinite(m_prev)
        needs_in_order = ~(below & finite) & in_order_read
        needs_rows = torch.zeros_like(needs_in_order).scatter_(-1, visit_rows, needs_in_order)
        needed = _any_row_per_tile(needs_rows, block_m, q_tiles)
        protected = first_visited | must_q[:, None] | must_k[None, :]
        next_read = read & (needed | protected)
    else:
        next_read = read.clone()

    read_max = row_tile_max.masked_fill(~read_rows, -math.inf)
    tile_max = _max_row_per_tile(read_max, block_m, q_tiles)
    best_pos = tile_max.gather(-1, visit).argmax(-1, keepdim=True)  # first maximum = earliest visited
    new_anchor = visit.gather(-1, best_pos).squeeze(-1).to(torch.int32)

    # softmax over the read tiles, in place in ``scores`` (one exp pass; the row max is known per tile already)
    if not bool(read.all()):
        _mask_tiles_(scores, ~read_rows, block_n)
    row_max = read_max.amax(-1, keepdim=True)
    shift = torch.where(torch.isfinite(row_max), row_max, 0.0)  # rows with no finite score: -inf LSE, NaN output
    probs = scores.sub_(shift).mul_(softmax_scale).exp_()
    total = probs.sum(-1, keepdim=True)
    out = (probs @ v.float()).div_(total)
    lse = (shift * softmax_scale + total.log()).squeeze(-1)
    return {"out": out, "lse": lse, "next_read": next_read, "anchor": new_anchor}


def _key_tile_views(scores: torch.Tensor, block_n: int) -> list[tuple[int, torch.Tensor]]:
    """``scores [h, Sq, Sk]`` as views ``[h, Sq, tiles, block_n]`` (no copy), each with its first tile id: the full
    tiles, then the short last tile of a key length that is not a multiple of ``block_n``."""
    seq_k = scores.shape[-1]
    full = seq_k // block_n
    views = [(0, scores[..., : full * block_n].unflatten(-1, (full, block_n)))] if full else []
    if seq_k % block_n:
        views.append((full, scores[..., full * block_n:].unsqueeze(-2)))
    return views


def _row_tile_max(scores: torch.Tensor, block_n: int) -> torch.Tensor:
    """``[h, Sq, KT]``: each row's max over each key tile."""
    return torch.cat([view.amax(-1) for _, view in _key_tile_views(scores, block_n)], dim=-1)


def _mask_tiles_(scores: torch.Tensor, masked_rows: torch.Tensor, block_n: int) -> None:
    """Sets to ``-inf``, in place, the scores of the key tiles ``masked_rows [h, Sq, KT]`` marks per row."""
    for first, view in _key_tile_views(scores, block_n):
        view.masked_fill_(masked_rows[..., first: first + view.shape[-2], None], -math.inf)


def _visiting_order(read, anchor, use_anchor, descending):
    """Long ``[h, QT, KT]``: key tile ids in the order a call visits them (unread tiles last)."""
    k_tiles = read.shape[-1]
    tile_ids = torch.arange(k_tiles, device=read.device).expand_as(read)
    rank = (k_tiles - tile_ids) if descending else (tile_ids + 1)
    if use_anchor:
        anchor_ids = anchor.long().unsqueeze(-1)
        is_anchor = (tile_ids == anchor_ids) & read.gather(-1, anchor_ids)
        rank = rank.masked_fill(is_anchor, 0)
    rank = rank.masked_fill(~read, 2 * k_tiles + 1)  # unread tiles last
    return rank.argsort(dim=-1, stable=True)


def _rows_of_tiles(per_tile: torch.Tensor, block_m: int, seq_q: int) -> torch.Tensor:
    """``[h, QT, X]`` -> ``[h, Sq, X]``: each q-tile's row repeated for its query rows."""
    return per_tile.repeat_interleave(block_m, dim=-2)[..., :seq_q, :]


def _any_row_per_tile(per_row: torch.Tensor, block_m: int, q_tiles: int) -> torch.Tensor:
    """Bool ``[h, Sq, KT]`` -> ``[h, QT, KT]``: any valid row of the q-tile (padded rows vote no)."""
    n_heads, seq_q, k_tiles = per_row.shape
    padded = per_row.new_zeros(n_heads, q_tiles * block_m, k_tiles)
    padded[:, :seq_q] = per_row
    return padded.view(n_heads, q_tiles, block_m, k_tiles).any(-2)


def _max_row_per_tile(per_row: torch.Tensor, block_m: int, q_tiles: int) -> torch.Tensor:
    """Float ``[h, Sq, KT]`` -> ``[h, QT, KT]``: max over the q-tile's valid rows."""
    n_heads, seq_q, k_tiles = per_row.shape
    padded = per_row.new_full((n_heads, q_tiles * block_m, k_tiles), -math.inf)
    padded[:, :seq_q] = per_row
    return padded.view(n_heads, q_tiles, block_m, k_tiles).amax(-2)


register_backend(Backend(
    name="reference",
    forward=reference_forward,
    tiles=lambda head_dim: DEFAULT_TILES,
    # Any device PyTorch runs on; ``auto`` picks it for CPU tensors only (DESIGN §2).
    constraints=Constraints(device_types=("cpu", "cuda"), dtypes=(torch.float16, torch.bfloat16, torch.float32)),
))
