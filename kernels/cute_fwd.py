"""CuTe-DSL LiteAttention backend for Hopper (sm90), built on flash-attn-4 as a library.

Every call with the backend's tiles (:func:`tiles_for_head_dim`: 128 key rows; 192 query rows at head dim 64, 128
above) runs :class:`~litepatch.kernels.cute_sm90.LiteAttentionForwardSm90`, flash-attn-4's SM90 forward with the
skip vote inside each tile's online softmax. Around it, two small
Triton kernels of this file, one program per (batch row, head, q-tile), which share :func:`_visit_order` (the
q-tile's read list, minus key tiles with no valid key, and each read tile's visit position: anchor first then
ascending, or all descending / ascending for ``order="alternate"``):

1. :func:`_list_kernel` writes flash-attn-4's "full block" list in *reverse* visiting order (the kernel walks
   lists from last entry to first) and the visit position of the key sequence's last tile (the kernel masks it
   by key length), zeroes the ``votes`` bitmask and ``kept``, and sets the anchor slot to its minimum.
2. :func:`_commit_kernel` rebuilds the same visiting order (``state.keep`` and ``state.anchor`` are unchanged
   until then), sums the visited tiles into ``kept`` and drops from ``keep`` the visited tiles no valid row voted
   for, except the first visited and must-compute ones; it decodes the anchor slot's visit position into a tile.
   ``threshold=-inf`` calls drop nothing. (Zeroing ``kept`` in one kernel and counting in the next, which the
   stream orders after it, saves the launch of a separate zeroing kernel.)

Both launch through :func:`litepatch.kernels.launch.launch`: a layer passes the same tensors at every step, so
Triton's per-call binding runs once per (layer, branch, shape).

The lists, ``votes``, tail positions and slots live in one int32 scratch buffer per device and CUDA stream, shared by
every layer (:func:`scratch_bytes`), not in the per-layer state, which keeps :mod:`litepatch.kernels.state`'s layout.

Small states (lists of at most :data:`OWN_LISTS_MAX_BYTES`, no key mask) keep their own lists instead, on their
``keep`` tensor (:class:`_OwnLists`), and :func:`_commit_relist_kernel` replaces the commit: it commits, then writes
the list of the call it expects next from the state it has just written. Their calls launch two kernels, not three:
the list kernel runs only at a state's first call, or after another writer (the reference or Triton backend,
:meth:`~litepatch.kernels.SkipState.set_read_words`) wrote the state. Their repeated calls (``cute_repeat``) defer
the commit while a commit window is open (:mod:`litepatch.kernels.commits`: a patched forward), and the window's
commits go out as one :func:`_commit_relist_batch_kernel` launch. Those are the calls whose host time shows: the
GPU finishes them before the host has launched the next; a large state's lists would cost memory per layer and
branch (55 MiB for Wan2.1-14B at 720p) where the host time hides behind the GPU's.

Key-padding masks: prefix masks (valid keys then padding per batch row, the text mask of HunyuanVideo and
Qwen-Image) become flash-attn-4's ``seqused_k``; tiles past a row's length leave the lists. Other masks,
and other tile sizes, run the Triton kernel (:mod:`litepatch.kernels.triton_fwd`) at the state's tile sizes (it takes
192-row query tiles too), so the state layout stays the same. Dense calls (:func:`flash_attn_4_dense`, reached through
:func:`litepatch.kernels.dense_attention`) run flash-attn-4's plain forward.

Requires ``pip install "litepatch[cuda]"`` (flash-attn-4 4.0.0b36, nvidia-cutlass-dsl 4.8.1). The first call
per configuration (dtype, head dim, vote on/off, key lengths or not) JIT-compiles in a few seconds
(:data:`~litepatch.kernels.cute_sm90.COMPILE_SECONDS`); ``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1`` (set
by default here) keeps compiled kernels on disk between processes.

Example:
    >>> out = lite_attention(q, k, v, state, threshold=-6.0, backend="cute")
"""

from __future__ import annotations

import math
import threading

import torch
import triton
import triton.language as tl
from flash_attn.cute import interface as _fa4

from .commits import register_flush, window_open
from .cute_sm90 import TILE_N, bound_sm90, run_dense_sm90, run_sm90, tile_m_for
from .key_masks import mask_facts, mask_tiles
from .launch import bound_launch, current_device, launch
from .registry import Backend, Constraints, register_backend
from .state import TileConfig, derived_from, keep_written, remember_derived
from .triton_fwd import MAX_K_TILES, _bit_or, triton_forward

HEAD_DIMS = (64, 128)  # verified on the H200; 96 compiles (mma_pv_is_rs off) but has not run there
CONSTRAINTS = Constraints(
    device_types=("cuda",),
    dtypes=(torch.float16, torch.bfloat16),
    head_dims=HEAD_DIMS,
    cuda_archs=(9,),  # verified on sm90 (H100/H200) only
    max_k_tiles=MAX_K_TILES,
)


@triton.jit
def _stored_bits(keep_ptr, row, k_tiles, n_words, KT_POW2: tl.constexpr):
    """The key tiles ``j`` of one q-tile (``row`` = (batch row * heads + head) * q_tiles + q-tile) and whether its
    stored list holds each."""
    j = tl.arange(0, KT_POW2)
    in_range = j < k_tiles
    word = tl.load(keep_ptr + row.to(tl.int64) * n_words + j // 32, mask=in_range, other=0)
    return j, (((word >> (j % 32)) & 1) != 0) & in_range


@triton.jit
def _order_of(j, stored, valid, anchor, USE_ANCHOR: tl.constexpr, DESCENDING: tl.constexpr):
    """Whether this call reads each tile (``read``: stored and holding a valid key), its visit position (``pos``,
    where read), the number read, and the last key tile holding a valid key."""
    read = stored & valid
    read_i = read.to(tl.int32)
    total = tl.sum(read_i, axis=0)
    if USE_ANCHOR:
        is_anchor = read & (j == anchor)
        has_anchor = tl.sum(is_anchor.to(tl.int32), axis=0)
        pos = tl.cumsum((read & ~is_anchor).to(tl.int32), axis=0) - 1 + has_anchor
        pos = tl.where(is_anchor, 0, pos)
    elif DESCENDING:
        pos = total - tl.cumsum(read_i, axis=0)
    else:
        pos = tl.cumsum(read_i, axis=0) - 1
    last = tl.max(tl.where(valid, j, -1), axis=0)
    return read, pos, total, last


@triton.jit
def _visit_order(keep_ptr, anchor_ptr, tile_valid_ptr, row, q_tiles, k_tiles, n_words, heads,
                 USE_ANCHOR: tl.constexpr, DESCENDING: tl.constexpr, KT_POW2: tl.constexpr,
                 HAS_KEY_MASK: tl.constexpr):
    """The q-tile's key tiles, stored bits (:func:`_stored_bits`) and tiles holding a valid key, and
    :func:`_order_of` the list as the state holds it."""
    j, stored = _stored_bits(keep_ptr, row, k_tiles, n_words, KT_POW2)
    valid = j < k_tiles
    if HAS_KEY_MASK:  # key tiles with no valid key: not visited, and left in the stored list
        b = row // (q_tiles * heads)
        valid = valid & (tl.load(tile_valid_ptr + b * k_tiles + j, mask=j < k_tiles, other=0) != 0)
    read, pos, total, last = _order_of(j, stored, valid, tl.load(anchor_ptr + row), USE_ANCHOR, DESCENDING)
    return j, stored, valid, read, pos, total, last


@triton.jit
def _write_list(idx_ptr, cnt_ptr, tail_ptr, row, k_tiles, j, read, pos, total, last):
    """The q-tile's "full block" list in reverse visiting order, its count, and the tail tile's position."""
    tl.store(idx_ptr + row.to(tl.int64) * k_tiles + (total - 1 - pos), j, mask=read)
    tl.store(cnt_ptr + row, total)
    tl.store(tail_ptr + row, tl.sum(tl.where(read & (j == last), pos + 1, 0), axis=0) - 1)  # -1: not read


@triton.jit
def _clear_votes(votes_ptr, slot_ptr, row, n_words, KT_POW2: tl.constexpr):
    w = tl.arange(0, KT_POW2 // 32)
    tl.store(votes_ptr + row.to(tl.int64) * n_words + w, tl.zeros_like(w), mask=w < n_words)
    tl.store(slot_ptr + row, -9223372036854775807 - 1)


@triton.jit
def _list_kernel(keep_ptr, anchor_ptr, tile_valid_ptr, idx_ptr, cnt_ptr, tail_ptr, votes_ptr, slot_ptr, kept_ptr,
                 q_tiles, k_tiles, n_words, heads,
                 USE_ANCHOR: tl.constexpr, DESCENDING: tl.constexpr, KT_POW2: tl.constexpr,
                 HAS_KEY_MASK: tl.constexpr):
    row = tl.program_id(0)
    j, _, _, read, pos, total, last = _visit_order(keep_ptr, anchor_ptr, tile_valid_ptr, row, q_tiles, k_tiles,
                                                   n_words, heads, USE_ANCHOR, DESCENDING, KT_POW2, HAS_KEY_MASK)
    _write_list(idx_ptr, cnt_ptr, tail_ptr, row, k_tiles, j, read, pos, total, last)
    tl.store(kept_ptr, tl.zeros((), tl.int64), mask=row == 0)  # the commit kernel, launched after, counts into it
    _clear_votes(votes_ptr, slot_ptr, row, n_words, KT_POW2)


@triton.jit
def _committed(j, read, pos, stored, row, must_q_ptr, must_k_ptr, votes_ptr, slot_ptr, q_tiles, k_tiles, n_words,
               VOTE: tl.constexpr):
    """The q-tile's stored bits and anchor after a call that read ``read`` in the order ``pos``: the visited tiles
    no valid row voted for leave the list (except the first visited and must-compute ones; none at ``VOTE=False``),
    and the anchor slot's visit position becomes a tile (tile 0 when nothing was visited)."""
    slot = tl.load(slot_ptr + row)
    visited = slot != -9223372036854775807 - 1
    best = 65535 - (slot & 0xFFFF).to(tl.int32)  # the anchor's visit position (cute_sm90.LAST_POSITION)
    anchor = tl.sum(tl.where(read & (pos == best) & visited, j, 0), axis=0)
    if VOTE:
        word = tl.load(votes_ptr + row.to(tl.int64) * n_words + pos // 32, mask=read, other=0)
        voted = ((word >> (pos % 32)) & 1) != 0
        must_k = tl.load(must_k_ptr + j, mask=j < k_tiles, other=0).to(tl.int32)
        must = (tl.load(must_q_ptr + row % q_tiles).to(tl.int32) + must_k) > 0
        stored = stored & (~read | (pos == 0) | must | voted)
    return stored, anchor


@triton.jit
def _store_keep(keep_ptr, row, j, stored, n_words, KT_POW2: tl.constexpr):
    words = tl.reduce(tl.reshape(stored.to(tl.int32) << (j % 32), (KT_POW2 // 32, 32)), 1, _bit_or)
    w = tl.arange(0, KT_POW2 // 32)
    tl.store(keep_ptr + row.to(tl.int64) * n_words + w, words, mask=w < n_words)


@triton.jit
def _commit_kernel(keep_ptr, anchor_ptr, tile_valid_ptr, must_q_ptr, must_k_ptr, votes_ptr, slot_ptr, kept_ptr,
                   q_tiles, k_tiles, n_words, heads,
                   USE_ANCHOR: tl.constexpr, DESCENDING: tl.constexpr, KT_POW2: tl.constexpr,
                   HAS_KEY_MASK: tl.constexpr, VOTE: tl.constexpr):
    row = tl.program_id(0)
    j, stored, _, read, pos, total, _ = _visit_order(keep_ptr, anchor_ptr, tile_valid_ptr, row, q_tiles, k_tiles,
                                                     n_words, heads, USE_ANCHOR, DESCENDING, KT_POW2, HAS_KEY_MASK)
    tl.atomic_add(kept_ptr, total.to(tl.int64))
    stored, anchor = _committed(j, read, pos, stored, row, must_q_ptr, must_k_ptr, votes_ptr, slot_ptr, q_tiles,
                                k_tiles, n_words, VOTE)
    if VOTE:
        _store_keep(keep_ptr, row, j, stored, n_words, KT_POW2)
    tl.store(anchor_ptr + row, anchor)


@triton.jit
def _commit_relist_kernel(keep_ptr, anchor_ptr, must_q_ptr, must_k_ptr, votes_ptr, slot_ptr, kept_ptr,
                          idx_ptr, cnt_ptr, tail_ptr, sum_ptr, q_tiles, k_tiles, n_words, rows,
                          USE_ANCHOR: tl.constexpr, DESCENDING: tl.constexpr, NEXT_DESCENDING: tl.constexpr,
                          KT_POW2: tl.constexpr, VOTE: tl.constexpr):
    """:func:`_commit_kernel` for a state with its own lists (no key mask), which then writes the next call's list
    from the state it committed, still in registers, and clears the votes; the last program to finish writes
    ``kept`` (``sum_ptr``: int64 [running sum, finished programs], left zero)."""
    _commit_relist_row(tl.program_id(0), keep_ptr, anchor_ptr, must_q_ptr, must_k_ptr, votes_ptr, slot_ptr, kept_ptr,
                       idx_ptr, cnt_ptr, tail_ptr, sum_ptr, q_tiles, k_tiles, n_words, rows, USE_ANCHOR, DESCENDING,
                       NEXT_DESCENDING, KT_POW2, VOTE)


# The columns of a row of _commit_relist_batch_kernel's table: the addresses of _commit_relist_kernel's tensors,
# then its four sizes
BATCH_COLUMNS = 15


@triton.jit
def _commit_relist_batch_kernel(table_ptr, COLUMNS: tl.constexpr, USE_ANCHOR: tl.constexpr, DESCENDING: tl.constexpr,
                                NEXT_DESCENDING: tl.constexpr, KT_POW2: tl.constexpr, VOTE: tl.constexpr):
    """:func:`_commit_relist_kernel` of several states in one launch (deferred commits): program ``(row, entry)``
    commits that row of the state of the table's row ``entry`` (int64, :data:`BATCH_COLUMNS` columns: the addresses
    of ``keep, anchor, must_q, must_k, votes, slot, kept, idx, cnt, tail, sums``, then ``q_tiles, k_tiles, n_words,
    rows``)."""
    row = tl.program_id(0)
    base = table_ptr + tl.program_id(1) * COLUMNS
    rows = tl.load(base + 14).to(tl.int32)
    if row < rows:
        _commit_relist_row(
            row, tl.load(base).to(tl.pointer_type(tl.int32)), tl.load(base + 1).to(tl.pointer_type(tl.int32)),
            tl.load(base + 2).to(tl.pointer_type(tl.int1)), tl.load(base + 3).to(tl.pointer_type(tl.int1)),
            tl.load(base + 4).to(tl.pointer_type(tl.int32)), tl.load(base + 5).to(tl.pointer_type(tl.int64)),
            tl.load(base + 6).to(tl.pointer_type(tl.int64)), tl.load(base + 7).to(tl.pointer_type(tl.int32)),
            tl.load(base + 8).to(tl.pointer_type(tl.int32)), tl.load(base + 9).to(tl.pointer_type(tl.int32)),
            tl.load(base + 10).to(tl.pointer_type(tl.int64)), tl.load(base + 11).to(tl.int32),
            tl.load(base + 12).to(tl.int32), tl.load(base + 13).to(tl.int32), rows, USE_ANCHOR, DESCENDING,
            NEXT_DESCENDING, KT_POW2, VOTE)


@triton.jit
def _commit_relist_row(row, keep_ptr, anchor_ptr, must_q_ptr, must_k_ptr, votes_ptr, slot_ptr, kept_ptr, idx_ptr,
                       cnt_ptr, tail_ptr, sum_ptr, q_tiles, k_tiles, n_words, rows, USE_ANCHOR: tl.constexpr,
                       DESCENDING: tl.constexpr, NEXT_DESCENDING: tl.constexpr, KT_POW2: tl.constexpr,
                       VOTE: tl.constexpr):
    """One program of :func:`_commit_relist_kernel`: row ``row`` of ``rows``."""
    j, stored, valid, read, pos, total, _ = _visit_order(keep_ptr, anchor_ptr, keep_ptr, row, q_tiles, k_tiles,
                                                         n_words, 1, USE_ANCHOR, DESCENDING, KT_POW2, False)
    stored, anchor = _committed(j, read, pos, stored, row, must_q_ptr, must_k_ptr, votes_ptr, slot_ptr, q_tiles,
                                k_tiles, n_words, VOTE)
    tl.debug_barrier()  # every lane has read the vote words and the slot before any is cleared
    if VOTE:
        _store_keep(keep_ptr, row, j, stored, n_words, KT_POW2)
    tl.store(anchor_ptr + row, anchor)
    read, pos, upcoming, last = _order_of(j, stored, valid, anchor, USE_ANCHOR, NEXT_DESCENDING)
    _write_list(idx_ptr, cnt_ptr, tail_ptr, row, k_tiles, j, read, pos, upcoming, last)
    _clear_votes(votes_ptr, slot_ptr, row, n_words, KT_POW2)
    tl.atomic_add(sum_ptr, total.to(tl.int64))
    if tl.atomic_add(sum_ptr + 1, 1) == rows - 1:  # acq_rel: the last program sees every program's sum
        tl.store(kept_ptr, tl.atomic_xchg(sum_ptr, 0))
        tl.atomic_xchg(sum_ptr + 1, 0)


_TILES = {tile_m: TileConfig(tile_m, TILE_N) for tile_m in {tile_m_for(64), tile_m_for(128)}}


def tiles_for_head_dim(head_dim: int) -> TileConfig:
    """The backend's tiles (they fix the skip-state layout): those of its kernel at ``head_dim``.

    Asked on every call, so it returns a prebuilt config rather than building one (no ``functools.cache``:
    torch 2.11's dynamo binds a cached function kept in a dataclass field as a method, a fullgraph break).

    >>> tiles_for_head_dim(128), tiles_for_head_dim(64)
    (TileConfig(block_m=128, block_n=128), TileConfig(block_m=192, block_n=128))
    """
    return _TILES[tile_m_for(head_dim)]


_SCRATCH: dict[tuple[torch.device, int], torch.Tensor] = {}
MAX_SCRATCH_STREAMS = 8  # (device, stream) buffers kept; past it they start over
_current_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # device index -> raw stream handle


def _stream_of(device: torch.device) -> int:
    """The raw handle of ``device``'s current stream (0 for CPU tensors: the interpreted protocol check)."""
    return _current_raw_stream(device.index) if device.type == "cuda" and _current_raw_stream is not None else 0


def _scratch(device: torch.device, numel: int) -> torch.Tensor:
    """An int32 buffer of at least ``numel`` elements shared by every layer and call on one CUDA stream of
    ``device``: a call's list, kernel and commit pass their data through it in stream order, and calls on two
    streams of a device (a server's requests, each on its own stream) may run at the same time."""
    key = (device, _stream_of(device))
    buffer = _SCRATCH.get(key)
    if buffer is None or buffer.numel() < numel:
        _VIEWS.clear()  # they hold the smaller buffer
        if buffer is None and len(_SCRATCH) >= MAX_SCRATCH_STREAMS:
            _SCRATCH.clear()  # each buffer is used on its own stream only: freeing it is stream-ordered
        buffer = _SCRATCH[key] = torch.empty(numel, dtype=torch.int32, device=device)
    return buffer


# scratch_views per (buffer, state shape, key tiles): making the five views costs more host time than the
# list and commit launches together, and a model asks for the same few shapes on every call
_VIEWS: dict[tuple, tuple[torch.Tensor, ...]] = {}


def scratch_bytes() -> int:
    """Bytes held by the shared scratch buffers (lists, votes, tail positions, anchor slots; not per layer)."""
    return sum(b.numel() * b.element_size() for b in _SCRATCH.values())


def scratch_views(keep: torch.Tensor, k_tiles: int):
    """(slot int64 [B,H,QT], count [B,H,QT], tail [B,H,QT], index [B,H,QT,KT], votes [B,H,QT,W]) in the shared
    buffer: what one call's list, kernel and commit steps pass between them."""
    batch, heads, q_tiles, n_words = keep.shape
    buffer = _scratch(keep.device, _scratch_words(keep.shape, k_tiles))
    key = (buffer.data_ptr(), batch, heads, q_tiles, n_words, k_tiles)
    if key not in _VIEWS:
        if len(_VIEWS) >= 64:  # many shapes (varying lengths): start over rather than grow
            _VIEWS.clear()
        _VIEWS[key] = _split(buffer, keep.shape, k_tiles)
    return _VIEWS[key]


def _sizes(keep_shape, k_tiles: int) -> tuple[int, ...]:
    batch, heads, q_tiles, n_words = keep_shape
    rows = batch * heads * q_tiles
    return (2 * rows, rows, rows, rows * k_tiles, rows * n_words)  # the int64 slots first: 8-byte aligned


def _scratch_words(keep_shape, k_tiles: int) -> int:
    return sum(_sizes(keep_shape, k_tiles))


def _split(buffer: torch.Tensor, keep_shape, k_tiles: int) -> tuple[torch.Tensor, ...]:
    batch, heads, q_tiles, n_words = keep_shape
    sizes = _sizes(keep_shape, k_tiles)
    slot, count, tail, index, votes = torch.split(buffer[: sum(sizes)], sizes)
    per_q_tile = (batch, heads, q_tiles)
    return (slot.view(torch.int64).view(per_q_tile), count.view(per_q_tile), tail.view(per_q_tile),
            index.view(*per_q_tile, k_tiles), votes.view(*per_q_tile, n_words))


# A state whose lists take at most this many bytes keeps its own (:class:`_OwnLists`): the commit after each call
# writes the next call's list, one launch fewer per call. Small calls are the ones whose host time shows (the GPU
# finishes them before the host has launched the next); larger ones share the per-stream scratch.
OWN_LISTS_MAX_BYTES = 1 << 20


class _OwnLists:
    """A small state's lists between its calls, stored on its ``keep`` tensor
    (:func:`~litepatch.kernels.state.remember_derived`; not ready once another writer writes the state).

    ``views``: as :func:`scratch_views`; ``sums``: int64 [running kept sum, finished programs] of the commit, which
    leaves them zero; ``ready``: the call the lists were written for (anchor tensor, order, visiting direction),
    ``None`` when they are not ready (new, or :meth:`invalidate`)."""

    __slots__ = ("views", "sums", "k_tiles", "ready", "pending")

    def __init__(self, keep: torch.Tensor, k_tiles: int):
        buffer = torch.empty(_scratch_words(keep.shape, k_tiles), dtype=torch.int32, device=keep.device)
        self.views = _split(buffer, keep.shape, k_tiles)
        self.sums = torch.zeros(2, dtype=torch.int64, device=keep.device)
        self.k_tiles = k_tiles
        self.ready = None
        self.pending = False  # the last call's commit is deferred (litepatch.kernels.commits)

    def settle(self) -> None:
        """Launches the deferred commits, this state's among them (:func:`~litepatch.kernels.state.settle`)."""
        _flush_deferred()

    def invalidate(self) -> None:
        """Another writer wrote the state: the next call lists it again (the buffers are kept)."""
        if self.pending:
            self.settle()
        self.ready = None

    def nbytes(self) -> int:
        """Device bytes held (counted in :meth:`~litepatch.kernels.SkipState.nbytes`)."""
        return self.views[0].untyped_storage().nbytes() + self.sums.numel() * self.sums.element_size()


def _own_lists(keep: torch.Tensor, k_tiles: int) -> _OwnLists | None:
    """The state's own lists (made at its first call), or ``None`` when they would take more than
    :data:`OWN_LISTS_MAX_BYTES`."""
    own = derived_from(keep)
    if own is not None and own.k_tiles == k_tiles:
        return own
    if 4 * _scratch_words(keep.shape, k_tiles) > OWN_LISTS_MAX_BYTES:
        return None
    own = _OwnLists(keep, k_tiles)
    remember_derived(keep, own)
    return own


def _prefix_lengths(key_valid: torch.Tensor | None) -> torch.Tensor | None | bool:
    """int32 valid key lengths when ``key_valid`` is a prefix mask, ``None`` without a mask, ``False`` otherwise.

    Telling a prefix mask needs one device sync, once per mask (:func:`~litepatch.kernels.key_masks.mask_facts`).
    """
    if key_valid is None:
        return None
    facts = mask_facts(key_valid)
    if "lengths" not in facts:
        lengths = key_valid.sum(-1, dtype=torch.int32)
        prefix = torch.arange(key_valid.shape[-1], device=key_valid.device)[None, :] < lengths[:, None]
        facts["lengths"] = lengths if torch.equal(prefix, key_valid) else False
    return facts["lengths"]


_LAUNCH_OPTIONS: dict[tuple, dict] = {}


def launch_options(k_tiles: int, *, use_anchor: bool, descending: bool, key_mask: bool) -> dict:
    """The compile-time options of one call's list and commit kernels (the visiting order they rebuild); made once
    per form (3 us of host time per call otherwise). The dict is shared: pass it on, do not change it."""
    key = (k_tiles, use_anchor, descending, key_mask)
    options = _LAUNCH_OPTIONS.get(key)
    if options is None:
        if len(_LAUNCH_OPTIONS) >= 256:  # many key lengths: start over rather than grow
            _LAUNCH_OPTIONS.clear()
        options = _LAUNCH_OPTIONS[key] = dict(
            USE_ANCHOR=use_anchor, DESCENDING=descending, KT_POW2=max(32, triton.next_power_of_2(k_tiles)),
            HAS_KEY_MASK=key_mask, num_warps=4 if k_tiles <= 1024 else 8)
    return options


def cute_forward(
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
    """Same contract as :func:`~litepatch.kernels.reference.reference_forward` (see the module docstring)."""
    lengths = _prefix_lengths(key_valid)
    tiles = tiles_for_head_dim(q.shape[-1])  # cached: no TileConfig is built per call
    if lengths is False or (block_m, block_n) != (tiles.block_m, tiles.block_n):
        return triton_forward(
            q, k, v, keep, anchor, kept, must_q, must_k, key_valid, block_m=block_m, block_n=block_n,
            threshold=threshold, softmax_scale=softmax_scale, use_anchor=use_anchor, descending=descending,
        )
    k_tiles = math.ceil(k.shape[1] / block_n)
    own = _own_lists(keep, k_tiles) if key_valid is None else None
    if own is not None:
        return _forward_own_lists(q, k, v, keep, anchor, kept, must_q, must_k, own, threshold=threshold,
                                  softmax_scale=softmax_scale, use_anchor=use_anchor, descending=descending)
    keep_written(keep)
    batch, heads, q_tiles, n_words = keep.shape
    rows = batch * heads * q_tiles
    slot, count, tail, index, votes = scratch_views(keep, k_tiles)
    valid_tiles = None if key_valid is None else mask_tiles(key_valid, block_n, k_tiles)
    order = launch_options(k_tiles, use_anchor=use_anchor, descending=descending, key_mask=valid_tiles is not None)
    valid_tiles = valid_tiles if valid_tiles is not None else count  # a placeholder pointer without a key mask
    launch(_list_kernel, (rows,), keep, anchor, valid_tiles, index, count, tail, votes, slot, kept, q_tiles, k_tiles,
           n_words, heads, **order)
    no_mask_cnt, no_mask_idx = no_masked_blocks(q.device, batch, heads, q_tiles)
    out, lse = run_sm90(
        q, k, v, (no_mask_cnt, no_mask_idx, count, index), votes, slot, tail, softmax_scale=softmax_scale,
        threshold=threshold, seqused_k=lengths,
    )
    launch(_commit_kernel, (rows,), keep, anchor, valid_tiles, must_q, must_k, votes, slot, kept, q_tiles, k_tiles,
           n_words, heads, VOTE=threshold > -math.inf, **order)
    return out, lse


def _forward_own_lists(q, k, v, keep, anchor, kept, must_q, must_k, own: _OwnLists, *, threshold: float,
                       softmax_scale: float, use_anchor: bool, descending: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cute_forward` of a state with its own lists: the list kernel only when the lists are not ready (the
    state's first call, or another writer wrote it since), then the CuTe kernel, then the commit, which writes the
    list of the call it expects next (same order; ``"alternate"`` flips the direction)."""
    if own.pending:
        own.settle()
    batch, heads, q_tiles, n_words = keep.shape
    rows, k_tiles = batch * heads * q_tiles, own.k_tiles
    slot, count, tail, index, votes = own.views
    order = launch_options(k_tiles, use_anchor=use_anchor, descending=descending, key_mask=False)
    if own.ready != (anchor.data_ptr(), use_anchor, descending):
        launch(_list_kernel, (rows,), keep, anchor, count, index, count, tail, votes, slot, kept, q_tiles, k_tiles,
               n_words, heads, **order)
    out, lse = run_sm90(q, k, v, _own_sparse_lists(q, keep, own), votes, slot, tail,
                        softmax_scale=softmax_scale, threshold=threshold, seqused_k=None)
    grid, args, kwargs = _commit_relist_args(keep, anchor, kept, must_q, must_k, own, order, threshold=threshold,
                                             use_anchor=use_anchor, descending=descending)
    launch(_commit_relist_kernel, grid, *args, **kwargs)
    own.ready = (anchor.data_ptr(), use_anchor, kwargs["NEXT_DESCENDING"])
    return out, lse


def _own_sparse_lists(q: torch.Tensor, keep: torch.Tensor, own: _OwnLists) -> tuple[torch.Tensor, ...]:
    """flash-attn-4's four block-sparse lists of a state with its own lists (the "masked" ones empty)."""
    batch, heads, q_tiles, _ = keep.shape
    _, count, _, index, _ = own.views
    return (*no_masked_blocks(q.device, batch, heads, q_tiles), count, index)


def _commit_relist_args(keep, anchor, kept, must_q, must_k, own: _OwnLists, order: dict, *, threshold: float,
                        use_anchor: bool, descending: bool) -> tuple[tuple[int], tuple, dict]:
    """``(grid, args, kwargs)`` of a call's :func:`_commit_relist_kernel`; its ``NEXT_DESCENDING`` is the direction
    of the call it writes the list for (the same order; ``"alternate"`` flips it)."""
    batch, heads, q_tiles, n_words = keep.shape
    rows = batch * heads * q_tiles
    slot, count, tail, index, votes = own.views
    args = (keep, anchor, must_q, must_k, votes, slot, kept, index, count, tail, own.sums, q_tiles, own.k_tiles,
            n_words, rows)
    kwargs = dict(USE_ANCHOR=use_anchor, DESCENDING=descending, NEXT_DESCENDING=descending if use_anchor else not
                  descending, KT_POW2=order["KT_POW2"], VOTE=threshold > -math.inf, num_warps=order["num_warps"])
    return (rows,), args, kwargs


def cute_repeat(q, k, v, keep, anchor, kept, must_q, must_k, key_valid=None, *, block_m: int, block_n: int,
                threshold: float, softmax_scale: float, use_anchor: bool, descending: bool):
    """After a :func:`cute_forward` call with these arguments: a function of ``(q, k, v, lse_wanted)`` that makes the
    same call on new inputs of the same shapes, dtypes and device, with every other argument found once (the registry's
    ``Backend.repeat``, which :func:`~litepatch.kernels.lite_attention` keeps on the state). ``None`` where this
    does not apply: a key mask, ``order="alternate"`` (its direction changes every call), a state without its own
    lists (:data:`OWN_LISTS_MAX_BYTES`), or other tiles.

    The function returns ``(out, lse)``, or ``None``, launching nothing, when the call is not the one it repeats any
    more: another writer wrote the state since (its lists are not ready), another current device, or inputs TMA
    cannot read as they are. The caller then makes the call through :func:`cute_forward`. While a commit window is
    open (:mod:`litepatch.kernels.commits`: a patched forward), it defers its commit, which is then launched with the
    others in one :func:`_commit_relist_batch_kernel`.
    """
    own = derived_from(keep)
    if key_valid is not None or not use_anchor or own is None or (block_m, block_n) != _tile_sizes(q):
        return None
    ready = own.ready
    if ready != (anchor.data_ptr(), use_anchor, descending):  # the call just made did not leave them ready
        return None
    slot, _, tail, _, votes = own.views
    attend = bound_sm90(q, k, _own_sparse_lists(q, keep, own), votes, slot, tail, softmax_scale=softmax_scale,
                        threshold=threshold)
    if attend is None:
        return None
    order = launch_options(own.k_tiles, use_anchor=use_anchor, descending=descending, key_mask=False)
    grid, args, kwargs = _commit_relist_args(keep, anchor, kept, must_q, must_k, own, order, threshold=threshold,
                                             use_anchor=use_anchor, descending=descending)
    commit, device = bound_launch(_commit_relist_kernel, grid, *args, **kwargs), current_device()
    deferred = _batch_entry(keep.device, args, kwargs)

    def again(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              lse_wanted: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
        if own.ready != ready or current_device() != device:
            return None
        if own.pending:  # the last call's commit writes this call's lists
            own.settle()
        result = attend(q, k, v, lse_wanted)
        if result is not None:
            if window_open():
                own.pending = True
                with _DEFERRED_LOCK:
                    _DEFERRED.append((own, deferred, _stream_of(q.device)))
            else:
                commit()
        return result

    return again


# ------------------------------------------------------------------------------------------------ deferred commits
# (own lists, batch entry, stream) of each deferred commit, of every thread: a state read in another thread than the
# one whose window deferred its commit (a forward in a worker, its stats read in the main thread) launches it too
_DEFERRED: list[tuple] = []
_DEFERRED_LOCK = threading.Lock()
# the batch kernel's tables by (device, their rows): a model defers the same states' commits at every step
_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _batch_entry(device: torch.device, args: tuple, kwargs: dict) -> tuple:
    """A deferred :func:`_commit_relist_kernel` launch of ``args, kwargs`` as the batch kernel takes it: (device, its
    options, its table row, the tensors, which must outlive the launch)."""
    tensors, sizes = args[:BATCH_COLUMNS - 4], args[BATCH_COLUMNS - 4:]
    row = (*[t.data_ptr() for t in tensors], *sizes)
    options = tuple(sorted((name, value) for name, value in kwargs.items()))
    return device, options, row, tensors


def _flush_deferred() -> None:
    """Launches the deferred commits: one batch kernel per device, stream and options, each on the stream of the calls
    it commits (the registered flush of :mod:`litepatch.kernels.commits`)."""
    if not _DEFERRED:
        return
    with _DEFERRED_LOCK:
        deferred = list(_DEFERRED)
        _DEFERRED.clear()
    groups: dict[tuple, list[tuple]] = {}
    for own, (device, options, row, tensors), stream in deferred:
        own.pending = False
        groups.setdefault((device, stream, options), []).append((row, tensors))
    for (device, stream, options), members in groups.items():
        rows = tuple(row for row, _ in members)
        if stream == _stream_of(device):
            _launch_batch(device, stream, rows, options)
        else:  # deferred on another stream than the one current now: launched there, after the calls
            with torch.cuda.stream(torch.cuda.ExternalStream(stream, device=device)):
                _launch_batch(device, stream, rows, options)


def _launch_batch(device: torch.device, stream: int, rows: tuple[tuple[int, ...], ...], options: tuple) -> None:
    """One :func:`_commit_relist_batch_kernel` launch over ``rows`` on the current stream (``stream``)."""
    grid = (max(row[-1] for row in rows), len(rows))
    launch(_commit_relist_batch_kernel, grid, _batch_table(device, stream, rows), COLUMNS=BATCH_COLUMNS,
           **dict(options))


def _batch_table(device: torch.device, stream: int, rows: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """The batch kernel's int64 table of ``rows`` on ``device``, copied there once on ``stream`` (the current one; from
    pinned memory, without a sync) and reused there while the same states defer their commits together."""
    key = (device, stream, rows)
    entry = _TABLES.get(key)
    if entry is None:
        if len(_TABLES) >= 16:  # states made again (new shapes, generations): start over rather than grow
            _TABLES.clear()
        host = torch.tensor(rows, dtype=torch.int64)
        if device.type == "cuda":
            host = host.pin_memory()
        entry = _TABLES[key] = (host.to(device, non_blocking=True), host)
    return entry[0]


register_flush(_flush_deferred)


def _tile_sizes(q: torch.Tensor) -> tuple[int, int]:
    tiles = tiles_for_head_dim(q.shape[-1])
    return tiles.block_m, tiles.block_n


def flash_attn_4_dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """flash-attn-4's dense SM90 forward on ``[B, S, H, D]``; ``None`` when ``key_mask`` is not a prefix mask.

    Launched directly (:func:`~litepatch.kernels.cute_sm90.run_dense_sm90`), through flash-attn-4's interface where
    that does not apply (an empty sequence, ``v`` shaped unlike ``k``)."""
    lengths = _prefix_lengths(key_mask)
    if lengths is False:
        return None
    if q.shape[1] and k.shape[1] and k.shape == v.shape:
        return run_dense_sm90(q, k, v, softmax_scale=softmax_scale, seqused_k=lengths)
    return _fa4._flash_attn_fwd(q, k, v, softmax_scale=softmax_scale, seqused_k=lengths)[0]


_NO_MASKED: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def no_masked_blocks(device: torch.device, batch: int, heads: int, q_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """flash-attn-4's "masked block" lists, empty: int32 zeros ``[B, H, QT]`` and ``[B, H, QT, 1]``."""
    key = (device, batch, heads, q_tiles)
    if key not in _NO_MASKED:
        if len(_NO_MASKED) >= 64:  # many resolutions (a service): start over rather than hold device memory for each
            _NO_MASKED.clear()
        _NO_MASKED[key] = (torch.zeros(batch, heads, q_tiles, dtype=torch.int32, device=device),
                           torch.zeros(batch, heads, q_tiles, 1, dtype=torch.int32, device=device))
    return _NO_MASKED[key]


cute_forward.dense = flash_attn_4_dense  # type: ignore[attr-defined]  (used by litepatch.kernels.dense)
register_backend(Backend("cute", cute_forward, tiles_for_head_dim, CONSTRAINTS, repeat=cute_repeat))
