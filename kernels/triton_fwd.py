"""Triton forward of LiteAttention (DESIGN §1) for NVIDIA GPUs; tuned on Hopper, runs on sm80+.

Two launches per call (through the custom op ``litepatch::lite_attention_fwd`` under ``torch.compile``):

1. ``_visit_list_kernel``, one program per (batch row, head, q-tile): unpacks the read list
   (``state.keep``) into the *visiting order* of the reference (anchor first, then ascending; or all
   descending / ascending), as int16 tile ids with the sign bit set on tiles that may never be
   skipped (must-compute q-tile or k-tile), and the number of tiles to visit. It also sums that
   number into ``kept``.
2. ``_lite_fwd_kernel``, one program per (q-tile, batch row x head): FlashAttention's online softmax
   in exp2 space over the visited tiles only (K/V loaded by TMA tensor descriptors at the listed
   tile), the skip test against the running row max of the tiles visited before (padded query rows
   do not vote), ``atomic_and`` clearing the bit of every skippable tile in ``keep`` (the program
   owns its row, so the update is in place), and the new anchor: the visited tile with the largest
   score over valid rows, ties to the earliest visited, found from a per-row argmax so the loop has
   no extra cross-row reduction.

Inputs are ``[B, S, H, D]`` with any strides whose last is 1: each is seen as one 2-D row-major
matrix (row = token of a batch row and head, columns = head_dim), which covers the diffusers layout
(``[B, S, H, D]`` contiguous or a view of a fused projection) and SDPA-layout callers
(``x.transpose(1, 2)`` of ``[B, H, S, D]``) without a copy. Other layouts are copied once.

Example:
    >>> from litepatch.kernels import SkipState, lite_attention
    >>> q = k = v = torch.randn(1, 4096, 12, 128, device="cuda", dtype=torch.bfloat16)
    >>> state = SkipState()
    >>> out = lite_attention(q, k, v, state, threshold=-6.0)  # picks this backend on CUDA
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .key_masks import mask_bytes, mask_tiles
from .registry import Backend, Constraints, register_backend
from .state import TileConfig, keep_written

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
SUPPORTED_HEAD_DIMS = (32, 64, 128)
MAX_K_TILES = 32767  # tile ids are int16 with the sign bit as the "never skippable" flag


def tiles_for_head_dim(head_dim: int) -> TileConfig:
    """Tile sizes of this kernel (they fix the state layout): 128 query rows by 128 key rows.

    Chosen by the ``benchmarks/kernel.py --sweep`` on an H100 (bf16, D=128): 128x128 with 8 warps and
    3 stages ran dense as fast as the best 128x64 variant (~520 TFLOP/s at the 720p shape) and is the
    only variant whose skip test (windowed votes, list writes) costs nothing measurable; 128x64 with
    4 warps lost 25-50 % with the test on. At Wan2.1-14B 720p (B1, H40, S=75,600) ``keep`` is
    1.71 MiB per layer per branch.

    >>> tiles_for_head_dim(128)
    TileConfig(block_m=128, block_n=128)
    """
    return TileConfig(128, 128)


def launch_config(head_dim: int, block_m: int, block_n: int) -> tuple[int, int]:
    """(num_warps, num_stages) of the attention kernel, from ``benchmarks/kernel.py --sweep`` on an H100.

    ``LITEPATCH_TRITON_CONFIG="warps,stages"`` overrides it (for sweeps); neither changes the state layout.
    """
    override = os.environ.get("LITEPATCH_TRITON_CONFIG")
    if override:
        warps, stages = (int(x) for x in override.split(","))
        return warps, stages
    if block_m * block_n >= 128 * 128 or block_m >= 256:
        return 8, 3
    return 8, 3 if block_n >= 64 else 2


@triton.jit
def _visit_list_kernel(
    keep_ptr, anchor_ptr, must_q_ptr, must_k_ptr, tile_valid_ptr, visit_ptr, count_ptr, kept_ptr,
    q_tiles, k_tiles, n_words, heads,
    USE_ANCHOR: tl.constexpr, DESCENDING: tl.constexpr, KT_POW2: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
):
    row = tl.program_id(0)  # (batch row * heads + head) * q_tiles + q-tile
    qt = row % q_tiles
    j = tl.arange(0, KT_POW2)
    in_range = j < k_tiles
    words = tl.load(keep_ptr + row.to(tl.int64) * n_words + j // 32, mask=in_range, other=0)
    bit = (((words >> (j % 32)) & 1) != 0) & in_range
    if HAS_KEY_MASK:  # key tiles with no valid key: not visited, and left in the stored list
        b = row // (q_tiles * heads)
        bit = bit & (tl.load(tile_valid_ptr + b * k_tiles + j, mask=in_range, other=0) != 0)
    bit_i = bit.to(tl.int32)
    total = tl.sum(bit_i, axis=0)
    if USE_ANCHOR:
        anchor = tl.load(anchor_ptr + row)
        is_anchor = bit & (j == anchor)
        has_anchor = tl.sum(is_anchor.to(tl.int32), axis=0)
        rest = (bit & (j != anchor)).to(tl.int32)
        pos = tl.cumsum(rest, axis=0) - 1 + has_anchor
        pos = tl.where(is_anchor, 0, pos)
    elif DESCENDING:
        pos = total - tl.cumsum(bit_i, axis=0)
    else:
        pos = tl.cumsum(bit_i, axis=0) - 1
    must_q = tl.load(must_q_ptr + qt).to(tl.int32)
    must_k = tl.load(must_k_ptr + j, mask=in_range, other=0).to(tl.int32)
    protected = (must_k + must_q) > 0
    entry = tl.where(protected, j - 32768, j)
    tl.store(visit_ptr + row.to(tl.int64) * k_tiles + pos, entry.to(tl.int16), mask=bit)
    tl.store(count_ptr + row, total)
    tl.store(kept_ptr, tl.zeros((), tl.int64), mask=row == 0)  # the attention kernel, launched after, counts into it


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _attend_tile(q, k_desc, v_desc, j, k_row0, v_row0, k_col, v_col, seq_k, qk_scale, m_i, l_i, acc, offs_n,
                 key_valid_row, BLOCK_N: tl.constexpr, HAS_TAIL: tl.constexpr, HAS_KEY_MASK: tl.constexpr):
    """One key tile of the online softmax; returns the tile's row max (log2 units) and the new m, l, acc."""
    k = k_desc.load([k_row0 + j * BLOCK_N, k_col])
    qk = tl.dot(q, k.T)
    if HAS_TAIL:
        limit = seq_k - j * BLOCK_N
        if limit < BLOCK_N:
            qk = tl.where(offs_n[None, :] < limit, qk, float("-inf"))
    if HAS_KEY_MASK:
        cols = j * BLOCK_N + offs_n
        valid = tl.load(key_valid_row + cols, mask=cols < seq_k, other=0) != 0
        qk = tl.where(valid[None, :], qk, float("-inf"))
    m_tile = tl.max(qk, 1) * qk_scale
    m_new = tl.maximum(m_i, m_tile)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = v_desc.load([v_row0 + j * BLOCK_N, v_col])
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return m_tile, m_new, l_i, acc


@triton.jit
def _finite(x):
    return tl.abs(x) < float("inf")


@triton.jit
def _lite_fwd_kernel(
    q_desc, k_desc, v_desc, out_ptr, lse_ptr, keep_ptr, anchor_ptr, visit_ptr, count_ptr, key_valid_ptr, kept_ptr,
    qk_scale, threshold,
    seq_q, seq_k, heads, q_tiles, k_tiles, n_words,
    q_rb, q_rh, q_ch, k_rb, k_rh, k_ch, v_rb, v_rh, v_ch,
    TILE_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    SKIP_TEST: tl.constexpr, HAS_TAIL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    row = pid_bh * q_tiles + pid_m
    n_visit = tl.load(count_ptr + row)
    tl.atomic_add(kept_ptr, n_visit.to(tl.int64))
    visit_row = visit_ptr + row.to(tl.int64) * k_tiles
    keep_row = keep_ptr + row.to(tl.int64) * n_words

    # a q-tile is TILE_M rows; BLOCK_M (the next power of two) rows are computed, those past the tile like padding
    offs_m = pid_m * TILE_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    row_valid = (offs_m < seq_q) & (tl.arange(0, BLOCK_M) < TILE_M)
    q = q_desc.load([b * q_rb + h * q_rh + pid_m * TILE_M, h * q_ch])
    k_row0 = b * k_rb + h * k_rh
    v_row0 = b * v_rb + h * v_rh
    key_valid_row = key_valid_ptr + b.to(tl.int64) * seq_k

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    best_val = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    best_pos = tl.zeros([BLOCK_M], dtype=tl.int32)
    if SKIP_TEST:
        # Windows of 64 visits: per-row votes collect as bits, then one cross-row OR and the list
        # writes per window, outside the pipelined inner loop.
        offs_w = tl.arange(0, 64)
        for w0 in range(0, n_visit, 64):
            votes = tl.zeros([BLOCK_M], dtype=tl.int64)
            for it in tl.range(w0, tl.minimum(w0 + 64, n_visit), num_stages=NUM_STAGES):
                j = tl.load(visit_row + it).to(tl.int32) & 0x7FFF
                m_prev = m_i
                m_tile, m_i, l_i, acc = _attend_tile(q, k_desc, v_desc, j, k_row0, v_row0, h * k_ch, h * v_ch, seq_k,
                                                     qk_scale, m_i, l_i, acc, offs_n, key_valid_row, BLOCK_N, HAS_TAIL,
                                                     HAS_KEY_MASK)
                # a row needs the tile unless both maxima are finite and the tile's is far enough below:
                # a NaN or infinite score never votes to skip (DESIGN §1)
                below = (m_tile - m_prev <= threshold) & _finite(m_tile) & _finite(m_prev)
                vote = row_valid & ~below
                votes = votes | (vote.to(tl.int64) << (it - w0))
                better = m_tile > best_val
                best_val = tl.where(better, m_tile, best_val)
                best_pos = tl.where(better, it, best_pos)
            needed = tl.reduce(votes, 0, _bit_or)
            pos = w0 + offs_w
            listed = tl.load(visit_row + pos, mask=pos < n_visit, other=-1).to(tl.int32)
            tile = listed & 0x7FFF
            skippable = (((needed >> offs_w) & 1) == 0) & (listed >= 0) & (pos > 0) & (pos < n_visit)
            tl.atomic_and(keep_row + tile // 32, ~(1 << (tile % 32)), mask=skippable, sem="relaxed")
    else:
        for it in tl.range(0, n_visit, num_stages=NUM_STAGES):
            j = tl.load(visit_row + it).to(tl.int32) & 0x7FFF
            m_tile, m_i, l_i, acc = _attend_tile(q, k_desc, v_desc, j, k_row0, v_row0, h * k_ch, h * v_ch, seq_k,
                                                 qk_scale, m_i, l_i, acc, offs_n, key_valid_row, BLOCK_N, HAS_TAIL,
                                                     HAS_KEY_MASK)
            better = m_tile > best_val
            best_val = tl.where(better, m_tile, best_val)
            best_pos = tl.where(better, it, best_pos)

    # Anchor: the earliest visited of the rows' best tiles that hold the q-tile's maximum.
    best_val = tl.where(row_valid, best_val, float("-inf"))
    top = tl.max(best_val, 0)
    first = tl.min(tl.where(row_valid & (best_val == top), best_pos, 2147483647), 0)
    first = tl.where(n_visit > 0, first, 0)
    anchor_tile = tl.load(visit_row + first, mask=n_visit > 0, other=0).to(tl.int32) & 0x7FFF
    tl.store(anchor_ptr + row, anchor_tile)

    out = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    offs_d = tl.arange(0, HEAD_DIM)
    out_rows = (b * seq_q + offs_m).to(tl.int64) * (heads * HEAD_DIM) + h * HEAD_DIM
    out_ptrs = out_ptr + out_rows[:, None] + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])
    tl.store(lse_ptr + pid_bh.to(tl.int64) * seq_q + offs_m, lse, mask=row_valid)


def _matrix_view(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int, int, int]]:
    """Sees ``[B, S, H, D]`` as a row-major matrix: ``(tensor, (row_stride, n_rows, n_cols, rb, rh, ch))``.

    Row of token s of (b, h) = ``b * rb + h * rh + s``, its first column = ``h * ch``. Rows past a
    sequence's end read the next batch row or head (finite data) or TMA's zero fill; the kernel masks
    them. Falls back to a contiguous copy when the strides allow no such view or break TMA's 16-byte
    alignment.
    """
    batch, seq, heads, dim = t.shape
    sb, ss, sh, sd = t.stride()
    size = t.element_size()
    ok = sd == 1 and ss > 0 and (ss * size) % 16 == 0 and t.data_ptr() % 16 == 0 and (batch == 1 or sb % ss == 0)
    if ok:
        rb = sb // ss if batch > 1 else 0
        if heads == 1:
            return t, (ss, (batch - 1) * rb + seq, dim, rb, 0, 0)
        if sh > 0 and sh % ss == 0:
            rh = sh // ss
            return t, (ss, (batch - 1) * rb + (heads - 1) * rh + seq, dim, rb, rh, 0)
        if sh > 0 and (heads - 1) * sh + dim <= ss:
            return t, (ss, (batch - 1) * rb + seq, (heads - 1) * sh + dim, rb, 0, sh)
    copy = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    copy.copy_(t)
    return _matrix_view(copy)


def _descriptor(t: torch.Tensor, view, block_rows: int) -> TensorDescriptor:
    row_stride, n_rows, n_cols = view[:3]
    return TensorDescriptor(t, [n_rows, n_cols], [row_stride, 1], [block_rows, t.shape[3]])


CONSTRAINTS = Constraints(
    device_types=("cuda",),
    dtypes=(torch.float16, torch.bfloat16),
    head_dims=SUPPORTED_HEAD_DIMS,
    cuda_archs=(8, 9, 10, 12),  # TMA descriptors are emulated before Hopper
    max_k_tiles=MAX_K_TILES,
)


def triton_forward(
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
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`litepatch.kernels.reference.reference_forward`, on the GPU.

    The registry only sends calls within :data:`CONSTRAINTS`. ``num_warps``/``num_stages`` override
    :func:`launch_config` (benchmarks).
    """
    batch, seq_q, heads, dim = q.shape
    seq_k = k.shape[1]
    if not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be > 0 for the Triton kernel, got {softmax_scale}")
    if not keep.is_contiguous() or not anchor.is_contiguous():
        raise ValueError("keep and anchor must be contiguous (as SkipState.initialize makes them)")
    q_tiles, k_tiles = math.ceil(seq_q / block_m), math.ceil(seq_k / block_n)
    n_words = keep.shape[-1]
    rows = batch * heads * q_tiles
    device = q.device
    keep_written(keep)
    visit = torch.empty(rows * k_tiles, dtype=torch.int16, device=device)
    count = torch.empty(rows, dtype=torch.int32, device=device)
    has_mask = key_valid is not None
    valid_tiles = mask_tiles(key_valid, block_n, k_tiles) if has_mask else count
    key_valid = mask_bytes(key_valid) if has_mask else count
    _visit_list_kernel[(rows,)](
        keep, anchor, must_q, must_k, valid_tiles, visit, count, kept, q_tiles, k_tiles, n_words, heads,
        USE_ANCHOR=use_anchor, DESCENDING=descending, KT_POW2=max(16, triton.next_power_of_2(k_tiles)),
        HAS_KEY_MASK=has_mask, num_warps=4 if k_tiles <= 1024 else 8,
    )
    out = torch.empty(batch, seq_q, heads, dim, dtype=q.dtype, device=device)
    lse = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=device)
    q_t, q_view = _matrix_view(q)
    k_t, k_view = _matrix_view(k)
    v_t, v_view = _matrix_view(v)
    padded_m = triton.next_power_of_2(block_m)  # 192-row tiles (the CuTe backend's at head dim 64) compute 256
    warps, stages = launch_config(dim, padded_m, block_n)
    warps, stages = num_warps or warps, num_stages or stages
    skip_test = threshold > -math.inf
    _lite_fwd_kernel[(q_tiles, batch * heads)](
        _descriptor(q_t, q_view, padded_m), _descriptor(k_t, k_view, block_n), _descriptor(v_t, v_view, block_n),
        out, lse, keep, anchor, visit, count, key_valid, kept,
        softmax_scale * LOG2E, threshold if skip_test else 0.0,
        seq_q, seq_k, heads, q_tiles, k_tiles, n_words,
        *q_view[3:], *k_view[3:], *v_view[3:],
        TILE_M=block_m, BLOCK_M=padded_m, BLOCK_N=block_n, HEAD_DIM=dim, SKIP_TEST=skip_test,
        HAS_TAIL=seq_k % block_n != 0, HAS_KEY_MASK=has_mask,
        NUM_STAGES=stages, num_warps=warps, num_stages=stages,
    )
    return out, lse


register_backend(Backend("triton", triton_forward, tiles_for_head_dim, CONSTRAINTS))
