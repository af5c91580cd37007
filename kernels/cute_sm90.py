"""LiteAttention's skip vote inside flash-attn-4's SM90 (Hopper) forward, written in CuTe DSL.

:class:`LiteAttentionForwardSm90` subclasses flash-attn-4's ``FlashAttentionForwardSm90`` and keeps all of
its machinery (producer warpgroup with TMA, consumer warpgroups taking turns on the tensor cores, register
reallocation, intra-warpgroup overlap of QK^T and PV, block-sparse iteration over "full block" lists). It
changes one thing: the online softmax of each visited key tile, taken over by :class:`_TileVote`, which

* computes the tile's row maxima as the softmax does anyway (thread-local max, then the quad shuffle), and
  only then folds in the running maximum, so the *tile's own* maxima come for free;
* votes (DESIGN §1): a valid query row needs the tile unless ``(tile_max - running_max) * scale * log2(e)
  <= threshold`` with both maxima finite and the tile's exponentials not NaN (a NaN or infinite score never
  votes to skip); rows past the query length do not vote. Per thread the votes collect as the bits of the
  current 32 visits; every 32 visits (and after the last) one warp reduction, and lane 0 ORs the word into a
  ``votes`` bitmask over *visit positions* in global memory (``red.global.or``). No cross-warp agreement is
  needed: a visit is skippable exactly when no warp set its bit.
* tracks the anchor (the visit holding the q-tile's largest score, ties to the earliest visit): each warp
  reduces its valid rows' maxima and lane 0 folds ``(score, 65535 - visit position)`` packed in one int64
  into a per-q-tile slot with ``red.global.max.s64``.

The consumer warpgroups count visits instead of using each visit's key-tile index (flash-attn-4's consumer reads
it, and the compiler drops the read as it does in flash-attn-4's own loop, since nothing uses it there without a
``score_mod``): the consumers' per-tile loop is flash-attn-4's plus the vote, with no global load and no address
arithmetic (``benchmarks/cute_sass.py`` counts it). Visit positions map back to tiles in
:mod:`litepatch.kernels.cute_fwd`'s commit kernel, which rebuilds each q-tile's visiting order.

The read list arrives as flash-attn-4's "full block" lists, one per (batch row, head, q-tile), which the
kernel walks from last entry to first: :mod:`litepatch.kernels.cute_fwd` writes them in reverse visiting
order, and the position of the key sequence's last (partial) tile in each, which this kernel masks by key
length wherever the visiting order puts it (:meth:`LiteAttentionForwardSm90._mask_tail`; flash-attn-4 masks
the first visit only), unless the keys fill their last tile (a length that is a multiple of 128, no key
lengths). Afterwards it drops from ``state.keep`` the visited tiles no row voted for, except the ones that may
never be dropped (the first visited, must-compute tiles), and decodes the anchor.

Extra inputs travel in flash-attn-4's ``AuxData`` (meant for ``score_mod`` tensors): ``tensors = (votes int32
[B, H, QT, n_words], slot int64 [B, H, QT], tail int32 [B, H, QT])``, ``scalars = (threshold,)``.

**Blackwell (sm100), on paper.** flash-attn-4's ``FlashAttentionForwardSm100`` has the same block-sparse
iteration (``softmax_block_sparse_sm100``) but a different structure: S lives in tensor memory, the softmax
warpgroups load it into registers and hold the row maxima there, and a separate correction warpgroup
rescales O. The twin would be one more file, ``cute_sm100.py``, subclassing ``FlashAttentionForwardSm100``
and overriding its per-tile softmax step the way :class:`_TileVote` replaces the SM90 one (same vote, same
ballot and ``red`` writes, same slot packing), registered as a ``cute-sm100`` backend with
``cuda_archs=(10,)``; :mod:`litepatch.kernels.cute_fwd`'s list and commit kernels are shared unchanged.
It cannot be tested on the lent H100/H200s.

Example (what :func:`litepatch.kernels.cute_fwd.cute_forward` does):
    >>> out, lse = run_sm90(q, k, v, lists, votes, slot, tail, softmax_scale=0.088, threshold=-6.0,
    ...                     seqused_k=None)
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from functools import partial
from pathlib import Path

# flash-attn-4 reads this when imported: compiled kernels are kept on disk between processes
os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")

import cutlass
import cutlass.cute as cute
import torch
from cutlass import Boolean, Float32, Int16, Int32, Int64, Uint32, Uint64, const_expr
from cutlass.base_dsl.typing import Vector
from cutlass.cutlass_dsl import dsl_user_op
from flash_attn.cute import utils as fa_utils
from flash_attn.cute.block_sparsity import BlockSparseTensors
from flash_attn.cute.cache_utils import get_jit_cache
from flash_attn.cute.cute_dsl_utils import to_cute_tensor
from flash_attn.cute.flash_fwd_sm90 import FlashAttentionForwardSm90
from flash_attn.cute.utils import AuxData
from quack import layout_utils

from .tma import tma_inputs

TILE_N = 128  # key rows per tile: flash-attn-4's SM90 block-sparse forward needs tile_n = the sparse block


def tile_m_for(head_dim: int) -> int:
    """Query rows per tile at ``head_dim``: 192 at 64 and below (three consumer warpgroups, flash-attn-4's own dense
    tile there; its 128-row block-sparse forward ran at 0.80x of its dense one on the H200 at D=64), else 128."""
    return 192 if head_dim <= 64 else 128


ABLATIONS = frozenset({"anchor"})  # parts LiteAttentionForwardSm90(ablate=...) can leave out, for timing
TAIL_MODES = ("branch", "select")  # LiteAttentionForwardSm90(tail_mode=...)
LAST_POSITION = 65535  # the anchor slot keeps LAST_POSITION - position: the earliest visit wins ties under max


@dsl_user_op
def _ordered_bits(x: Float32, *, loc=None, ip=None) -> Int32:
    """An int32 whose signed order is the float order of ``x`` (for a packed atomic max); -0.0 and +0.0 map to one
    value, so that they tie (and the earliest visit wins) as they do in the reference's comparison."""
    bits = Vector.from_elements((Float32(x),), Float32, loc=loc, ip=ip).bitcast(Int32, loc=loc, ip=ip)
    bits = bits.to_elements(loc=loc, ip=ip)[0]
    bits = bits & (Int32(bits == Int32(-2147483648)) - Int32(1))  # -0.0 (sign bit alone) -> +0.0
    return bits ^ ((bits >> 31) & Int32(0x7FFFFFFF))


ORDERS = ("anchor", "ascending", "descending")  # visiting orders (a compile-time choice of the kernel)
COMMIT_BARRIER = 7  # a named barrier flash-attn-4's SM90 forward leaves free (its NamedBarrierFwd takes 1-6)
SCRATCH_HEADER = 4  # int32 words before the slots: the kept-tile accumulator and the finished-CTA count (int64 each)


def scratch_words(rows: int, n_words: int) -> int:
    """int32 words per row of the ``[2, words]`` scratch that one call of ``rows`` q-tiles (batch rows x heads x
    q-tiles) with ``n_words`` keep words per q-tile needs. Row 0: the header, an int64 anchor slot per q-tile, then
    the vote words of each q-tile; the kernel leaves it zero, as it must find it. Row 1: each q-tile's visiting order,
    ``32 * n_words`` int16 tiles, which the producer warp writes at the start of the q-tile and reads as it loads."""
    return max(SCRATCH_HEADER + 2 * rows + rows * n_words, rows * n_words * 16)


@cute.jit
def _warp_inclusive_sum(x: Int32) -> Int32:
    """Per lane, the sum of ``x`` over lanes 0..lane."""
    lane = cute.arch.lane_idx()
    for i in cutlass.range_constexpr(5):
        y = cute.arch.shuffle_sync_up(x, 1 << i)
        x = x + cutlass.select_(lane >= (1 << i), y, Int32(0))
    return x


@cute.jit
def _warp_sum(x: Int32) -> Int32:
    return cute.arch.shuffle_sync(_warp_inclusive_sum(x), 31)


@cute.jit
def _nth_set_bit(word: Uint32, n: Int32) -> Int32:
    """The index of the ``n``-th (from 0) set bit of ``word``, which has more than ``n`` set bits."""
    index = Int32(0)
    for i in cutlass.range_constexpr(5):
        width = 16 >> i
        low = Int32(cute.arch.popc(word & Uint32((1 << width) - 1)))
        above = n >= low
        n = cutlass.select_(above, n - low, n)
        word = cutlass.select_(above, word >> Uint32(width), word)
        index = cutlass.select_(above, index + width, index)
    return index


@cute.jit
def _tile_bits(word_index: Int32, limit: Int32) -> Uint32:
    """The bits of keep word ``word_index`` whose tiles lie below tile ``limit``."""
    bits = cutlass.min(cutlass.max(limit - word_index * 32, Int32(0)), Int32(32))
    return cutlass.select_(bits == 32, Uint32(0xFFFFFFFF), (Uint32(1) << Uint32(bits & 31)) - Uint32(1))


@cute.jit
def _read_word(keep_row: cute.Tensor, word_index: Int32, n_words: Int32, limit: Int32) -> Uint32:
    """Keep word ``word_index`` (0 past the row) restricted to tiles below ``limit``."""
    word = Uint32(0)
    if word_index < n_words:
        word = Uint32(keep_row[word_index])
    return word & _tile_bits(word_index, limit)


@cute.jit
def _count_below(keep_row: cute.Tensor, n_words: Int32, n_valid: Int32, limit: Int32) -> Int32:
    """Read tiles (listed and holding a valid key) below tile ``limit``, one keep word per lane."""
    count = Int32(0)
    for chunk in cutlass.range(cute.ceil_div(n_words, 32), unroll=1):
        word = _read_word(keep_row, chunk * 32 + cute.arch.lane_idx(), n_words, cutlass.min(n_valid, limit))
        count = count + Int32(cute.arch.popc(word))
    return _warp_sum(count)


@cute.jit
def _is_read(keep_row: cute.Tensor, tile: Int32, n_valid: Int32) -> Boolean:
    read = Boolean(False)
    if (tile >= 0) & (tile < n_valid):
        read = ((Uint32(keep_row[tile // 32]) >> Uint32(tile % 32)) & Uint32(1)) != Uint32(0)
    return read


@cute.jit
def _tile_of_rank(keep_row: cute.Tensor, n_words: Int32, n_valid: Int32, rank: Int32) -> Int32:
    """The read tile with ``rank`` read tiles below it."""
    lane = cute.arch.lane_idx()
    tile = Int32(0)
    before = Int32(0)  # read tiles in the chunks already passed
    for chunk in cutlass.range(cute.ceil_div(n_words, 32), unroll=1):
        word = _read_word(keep_row, chunk * 32 + lane, n_words, n_valid)
        count = Int32(cute.arch.popc(word))
        inclusive = _warp_inclusive_sum(count)
        local = rank - before
        owners = Uint32(cute.arch.vote_ballot_sync((inclusive - count <= local) & (local < inclusive)))
        if owners != Uint32(0):  # the same on every lane
            owner = Int32(cute.arch.popc((owners & (Uint32(0) - owners)) - Uint32(1)))
            base = cute.arch.shuffle_sync(inclusive - count, owner)
            bits = cute.arch.shuffle_sync(word, owner)
            tile = (chunk * 32 + owner) * 32 + _nth_set_bit(bits, local - base)
        before = before + cute.arch.shuffle_sync(inclusive, 31)
    return tile


class _ReadList:
    """One q-tile's read list as the skip state holds it (``keep`` bits, ``anchor``), in the visiting order (DESIGN
    §1): the read tiles are the listed ones that hold a valid key (tile < ``n_valid``); ``"anchor"`` visits the anchor
    first (when it is read) and the others ascending, ``"ascending"`` and ``"descending"`` all in that order. A read
    tile's *rank* is the number of read tiles below it; its *position* is its place in the visiting order.

    Built and asked by whole warps (every method is warp-collective: all 32 lanes, the same arguments), from
    global memory, with no shared memory and no list in memory: the producer warp asks the tile of each position as it
    loads, the consumer warps the count, the first tile and the tail's position, the commit warp the rest.
    ``scratch`` holds the anchor slot and the vote words of every q-tile (:func:`scratch_words`)."""

    def __init__(self, keep: cute.Tensor, anchor: cute.Tensor, scratch: cute.Tensor, batch_idx, head_idx, m_block,
                 n_valid, order: str):
        batch, heads, q_tiles, n_words = keep.shape
        self.keep_row = keep[batch_idx, head_idx, m_block, None]
        self.anchor_ptr = fa_utils.elem_pointer(anchor, (batch_idx, head_idx, m_block))
        self.n_words, self.n_valid, self.order = n_words, n_valid, order
        row = (batch_idx * heads + head_idx) * q_tiles + m_block
        rows = batch * heads * q_tiles
        self.counters = cute.recast_ptr(scratch.iterator, dtype=Int64)  # [kept-tile accumulator, finished CTAs]
        self.slot_ptr = cute.recast_ptr(scratch.iterator + SCRATCH_HEADER + 2 * row, dtype=Int64)
        self.votes_ptr = scratch.iterator + SCRATCH_HEADER + 2 * rows + row * n_words
        self.order_ptr = cute.recast_ptr(fa_utils.elem_pointer(scratch, (1, 0)), dtype=Int16) + row * n_words * 32
        self.total = _count_below(self.keep_row, n_words, n_valid, n_valid)
        if order == "anchor":
            current = anchor[batch_idx, head_idx, m_block]
            self.anchor_rank = _count_below(self.keep_row, n_words, n_valid, current)
            self.has_anchor = _is_read(self.keep_row, current, n_valid)

    def rank_of_position(self, position: Int32) -> Int32:
        if const_expr(self.order == "descending"):
            return self.total - 1 - position
        if const_expr(self.order == "anchor"):
            shifted = cutlass.select_(position == 0, self.anchor_rank,
                                      cutlass.select_(position - 1 < self.anchor_rank, position - 1, position))
            return cutlass.select_(self.has_anchor, shifted, position)
        return position

    def position_of_rank(self, rank: Int32) -> Int32:
        return _position_of_rank(rank, self.total, self.anchor_rank if self.order == "anchor" else None,
                                 self.has_anchor if self.order == "anchor" else None, self.order)

    def tile_at(self, position: Int32) -> Int32:
        """The tile visited at ``position`` (< ``total``)."""
        return _tile_of_rank(self.keep_row, self.n_words, self.n_valid, self.rank_of_position(position))

    def write_order(self) -> None:
        """Writes the visiting order (the tile of each position) into the q-tile's row of the scratch, for the
        producer to read as it loads: one pass over the keep words, where asking each position's tile would cost
        a warp search per load, on the loads' critical path (5-8 % of a call at every tile read on the H100)."""
        _write_order(self.keep_row, self.n_words, self.n_valid, self.order_ptr, self.total,
                     self.anchor_rank if self.order == "anchor" else Int32(0),
                     self.has_anchor if self.order == "anchor" else Boolean(False), self.order)
        cute.arch.sync_warp()  # every lane's entries written before any lane reads them

    def tail_position(self) -> Int32:
        """The position of the key sequence's last tile (the kernel masks it by key length), -1 when it is not read."""
        last_read = _is_read(self.keep_row, self.n_valid - 1, self.n_valid)
        return cutlass.select_(last_read, self.position_of_rank(self.total - 1), Int32(-1))

    def commit(self, must_q: cute.Tensor, must_k: cute.Tensor, kept: cute.Tensor, m_block: Int32, vote: bool) -> None:
        """After every consumer warp has voted: drops from ``keep`` the read tiles no valid row voted for (except the
        first visited and must-compute ones), decodes the anchor slot into the next anchor, adds the visits to the
        call's kept-tile count (the last CTA to finish writes ``kept``), and leaves the q-tile's scratch zero."""
        slot = cute.arch.load(self.slot_ptr, Int64, sem="relaxed", scope="gpu")
        best = Int32(LAST_POSITION) - Int32(slot & Int64(0xFFFF))
        anchor = cutlass.select_(slot != Int64(0), self.tile_at(best), Int32(0))  # no visit: tile 0
        if vote:
            _drop_unneeded(self.keep_row, self.n_words, self.n_valid, self.votes_ptr, Int32(must_q[m_block]),
                           must_k, self.total, self.anchor_rank if self.order == "anchor" else Int32(0),
                           self.has_anchor if self.order == "anchor" else Boolean(False), self.order)
        cute.arch.sync_warp()  # every lane has read its vote words before any is cleared
        _finish_commit(self.votes_ptr, self.slot_ptr, self.anchor_ptr, anchor, self.counters, self.total, kept)


def _position_of_rank(rank, total, anchor_rank, has_anchor, order: str):
    """The visiting position of the read tile of ``rank`` (see :class:`_ReadList`)."""
    if order == "descending":
        return total - 1 - rank
    if order == "anchor":
        shifted = cutlass.select_(rank == anchor_rank, Int32(0), cutlass.select_(rank < anchor_rank, rank + 1, rank))
        return cutlass.select_(has_anchor, shifted, rank)
    return rank


@cute.jit
def _drop_unneeded(keep_row: cute.Tensor, n_words: Int32, n_valid: Int32, votes_ptr, must_row: Int32,
                   must_k: cute.Tensor, total: Int32, anchor_rank: Int32, has_anchor: Boolean,
                   order: cutlass.Constexpr[str]) -> None:
    """Clears in ``keep_row`` the read tiles whose visit no valid row voted for, except the first visited and the
    must-compute ones (``must_row``: the q-tile's, ``must_k``: per key tile). One keep word per lane.

    The commit runs at the end of the CTA, so its latency is the CTA's: with up to 1024 visits, the vote words are
    loaded once (one per lane, together) and each tile's bit is fetched with a shuffle; a load per tile, which waits
    for the L2 each time, cost 18 % of a Flux-size call on the H100. Longer lists load per tile."""
    lane = cute.arch.lane_idx()
    held = Int32(0)
    if lane < cute.ceil_div(total, 32):
        held = cute.arch.load(votes_ptr + lane, Int32, sem="relaxed", scope="gpu")
    few = total <= 1024
    before = Int32(0)
    for chunk in cutlass.range(cute.ceil_div(n_words, 32), unroll=1):
        index = chunk * 32 + lane
        listed = Uint32(0)
        if index < n_words:
            listed = Uint32(keep_row[index])
        read = listed & _tile_bits(index, n_valid)
        count = Int32(cute.arch.popc(read))
        inclusive = _warp_inclusive_sum(count)
        rank = before + inclusive - count
        needed = Uint32(0)  # per bit: voted for, the first visit, or must-compute
        for b in cutlass.range_constexpr(32):
            below = Int32(cute.arch.popc(read & Uint32((1 << b) - 1)))
            position = cutlass.max(_position_of_rank(rank + below, total, anchor_rank, has_anchor, order), Int32(0))
            word = Uint32(cute.arch.shuffle_sync(held, (position // 32) & 31))
            if not few:
                if read & Uint32(1 << b) != Uint32(0):
                    word = Uint32(cute.arch.load(votes_ptr + position // 32, Int32, sem="relaxed", scope="gpu"))
            hit = ((word >> Uint32(position % 32)) & Uint32(1)) | Uint32(position == 0)
            tile = cutlass.min(index * 32 + b, cutlass.max(n_valid - 1, Int32(0)))
            must = Uint32(Int32(must_k[tile]) != 0)
            needed = needed | ((hit | must) << Uint32(b))
        stays = ~read | needed | cutlass.select_(must_row != 0, Uint32(0xFFFFFFFF), Uint32(0))
        if index < n_words:
            if listed & ~stays != Uint32(0):
                keep_row[index] = Int32(listed & stays)
        before = before + cute.arch.shuffle_sync(inclusive, 31)


@cute.jit
def _write_order(keep_row: cute.Tensor, n_words: Int32, n_valid: Int32, order_ptr, total: Int32, anchor_rank: Int32,
                 has_anchor: Boolean, order: cutlass.Constexpr[str]) -> None:
    """``order_ptr[position]`` = the read tile visited at ``position``, for every read tile. One keep word per lane."""
    lane = cute.arch.lane_idx()
    before = Int32(0)
    for chunk in cutlass.range(cute.ceil_div(n_words, 32), unroll=1):
        index = chunk * 32 + lane
        read = _read_word(keep_row, index, n_words, n_valid)
        count = Int32(cute.arch.popc(read))
        inclusive = _warp_inclusive_sum(count)
        rank = before + inclusive - count
        for b in cutlass.range_constexpr(32):
            if read & Uint32(1 << b) != Uint32(0):
                below = Int32(cute.arch.popc(read & Uint32((1 << b) - 1)))
                position = _position_of_rank(rank + below, total, anchor_rank, has_anchor, order)
                cute.arch.store(order_ptr + position, Int16(index * 32 + b))
        before = before + cute.arch.shuffle_sync(inclusive, 31)


@cute.jit
def _finish_commit(votes_ptr, slot_ptr, anchor_ptr, anchor: Int32, counters, total: Int32, kept: cute.Tensor):
    """Clears the q-tile's vote words and slot, stores its next anchor, and counts its visits into ``kept``: the last
    CTA to finish writes the call's sum there and leaves the counters zero for the next call (no zeroing launch)."""
    lane = cute.arch.lane_idx()
    vote_words = cute.ceil_div(total, 32)
    for chunk in cutlass.range(cute.ceil_div(vote_words, 32), unroll=1):
        if chunk * 32 + lane < vote_words:
            cute.arch.store(votes_ptr + chunk * 32 + lane, Int32(0))
    if lane == 0:
        cute.arch.store(anchor_ptr, anchor)
        cute.arch.store(slot_ptr, Int64(0))
        cute.arch.atomic_add(counters, Int64(total), sem="relaxed", scope="gpu")
        cute.arch.fence_acq_rel_gpu()
        grid_x, grid_y, grid_z = cute.arch.grid_dim()
        finished = cute.arch.atomic_add(counters + 1, Int64(1), sem="acq_rel", scope="gpu")
        if finished == Int64(grid_x) * Int64(grid_y) * Int64(grid_z) - 1:
            cute.arch.fence_acq_rel_gpu()
            kept[0] = cute.arch.atomic_exch(counters, Int64(0), sem="acq_rel", scope="gpu")
            cute.arch.atomic_exch(counters + 1, Int64(0), sem="relaxed", scope="gpu")


class _StateLists:
    """What flash-attn-4's block-sparse loops read as ``BlockSparseTensors``, answered from the skip state.

    flash-attn-4's producer and consumers ask ``full_block_cnt[b, h, m]`` once per q-tile, then entries of
    ``full_block_idx[b, h, m, None]`` from the last to the first (its lists are stored last visit first); the
    masked-block lists are empty. Here the count builds the q-tile's :class:`_ReadList` and an entry is the tile that
    list visits at that position: the producer warp asks every one (the tile it loads), the consumers only the
    first (flash-attn-4 masks the first visit by key length with it; later visits are counted, not indexed), so
    theirs answers the first tile to every index.

    The kernel receives the state in the block-sparse fields (see :data:`CARRIER_FIELDS`)."""

    def __init__(self, kernel, carrier, seqlen_cls, *, producer: bool):
        self.kernel, self.seqlen_cls, self.producer = kernel, seqlen_cls, producer
        self.anchor, self.keep, _, _, _, _, self.scratch, _ = carrier
        self.mask_block_cnt = _NoBlocks(self.anchor.shape)

    def __iter__(self):
        return iter((self.mask_block_cnt, self.mask_block_cnt, _Count(self), _Entries(self), None, None, None, None))

    def read_list(self, batch_idx, head_idx, m_block) -> _ReadList:
        seqlen = self.seqlen_cls(batch_idx)
        n_valid = cute.ceil_div(seqlen.seqlen_k, self.kernel.tile_n)
        read = _ReadList(self.keep, self.anchor, self.scratch, batch_idx, head_idx, m_block, n_valid,
                         self.kernel.order)
        if self.producer:
            read.write_order()
        else:
            read.first_tile = read.tile_at(Int32(0))
            read.tail = read.tail_position()
            self.kernel._read = read  # the consumers' _TileVote takes its slot, vote words and tail from it
        return read


class _NoBlocks:
    """flash-attn-4's masked-block counts and lists: empty. The count is a Python 0, so that flash-attn-4's branches
    for masked blocks are decided while tracing (no code for them)."""

    def __init__(self, shape):
        self.shape = shape

    def __getitem__(self, coord):
        return self if isinstance(coord, tuple) and len(coord) == 4 else 0


class _Count:
    def __init__(self, lists: _StateLists):
        self.lists = lists

    def __getitem__(self, coord):
        batch_idx, head_idx, m_block = coord
        self.lists.current = self.lists.read_list(batch_idx, head_idx, m_block)
        return self.lists.current.total


class _Entries:
    def __init__(self, lists: _StateLists):
        self.lists = lists

    def __getitem__(self, coord):
        return _Visits(self.lists.current, self.lists.producer)


class _Visits:
    """One q-tile's "full block" list, entry ``i`` being the tile visited at position ``total - 1 - i``: for the
    producer, read from the visiting order it wrote (:meth:`_ReadList.write_order`)."""

    def __init__(self, read: _ReadList, producer: bool):
        self.read, self.producer = read, producer

    def __getitem__(self, entry):
        if self.producer:
            return Int32(cute.arch.load(self.read.order_ptr + (self.read.total - 1 - entry), Int16))
        return self.read.first_tile


# BlockSparseTensors' fields as this kernel fills them: the state and the scratch travel where flash-attn-4 takes its
# lists (they reach the producer warpgroup there, where aux tensors do not; :class:`_StateLists` answers the lists)
CARRIER_FIELDS = ("anchor", "keep", "must_q", "must_k", None, None, "scratch", "kept")


class _TileVote:
    """Stands in for flash-attn-4's ``Softmax`` during one visited tile: the same online softmax, plus the
    skip vote and the per-row anchor candidate. ``row_max``/``row_sum`` are the softmax's own register
    tensors; ``carry`` holds registers that live across the visits of one q-tile (see
    :meth:`LiteAttentionForwardSm90.mma_init`): per row the position of the visit that set its maximum and
    whether it lies inside the query sequence, and ``visit = (position, pending vote bits, tail position)``."""

    def __init__(self, softmax, carry, read: _ReadList, *, m_block, thr_mma, seqlen_q, aux_data, vote: bool,
                 tile_m: int, tile_n: int, track_anchor: bool = True):
        self.softmax, self.carry, self.read = softmax, carry, read
        self.row_max, self.row_sum = softmax.row_max, softmax.row_sum
        self.scale_log2 = softmax.scale_log2
        self.m_block = m_block
        self.thr_mma, self.seqlen_q = thr_mma, seqlen_q
        (self.threshold,) = aux_data.scalars
        self.vote, self.tile_m, self.tile_n = vote, tile_m, tile_n
        self.track_anchor = track_anchor

    def __getattr__(self, name):  # rescale_O, finalize, reset, ...: the softmax's own
        return getattr(self.softmax, name)

    @cute.jit
    def row_valid(self) -> cute.Tensor:
        """Per thread row: whether it lies inside the query sequence (padded rows neither vote nor anchor)."""
        coords = layout_utils.reshape_acc_to_mn(
            self.thr_mma.partition_C(cute.make_identity_tensor((self.tile_m, self.tile_n))))
        valid = cute.make_rmem_tensor(cute.size(self.row_max), Boolean)
        for r in cutlass.range(cute.size(self.row_max), unroll_full=True):
            valid[r] = self.m_block * self.tile_m + coords[r, 0][0] < self.seqlen_q
        return valid

    @cute.jit
    def start(self) -> None:
        """Before the q-tile's first visit: position 0, and the position of the key sequence's last tile."""
        visit = self.carry[1]
        visit[0] = Int32(0)
        visit[2] = self.read.tail

    @cute.jit
    def online_softmax(self, acc_S: cute.Tensor, is_first: cutlass.Constexpr[bool] = False,
                       check_inf: cutlass.Constexpr[bool] = True) -> cute.Tensor:
        acc_S_mn = layout_utils.reshape_acc_to_mn(acc_S)
        row_max, row_sum, scale_log2 = self.row_max, self.row_sum, self.scale_log2
        best_pos, visit, valid = self.carry
        position = visit[0]
        row_scale = cute.make_fragment_like(row_max, Float32)
        if const_expr(is_first):
            fresh = self.row_valid()
            for r in cutlass.range(cute.size(row_max), unroll_full=True):
                valid[r] = fresh[r]
        needed = Boolean(False)
        for r in cutlass.range(cute.size(row_max), unroll_full=True):
            scores = acc_S_mn[r, None].load()
            tile_max = fa_utils.fmax_reduce(scores, init_val=None, arch=self.softmax.arch)
            tile_max = cute.arch.warp_reduction_max(tile_max, threads_in_group=4)
            prev = row_max[r]
            cur = tile_max
            if const_expr(is_first):
                best_pos[r] = Int32(0)
            else:
                cur = cute.arch.fmax(prev, tile_max)
                if const_expr(self.track_anchor):
                    best_pos[r] = position if tile_max > prev else best_pos[r]  # ties: the earlier visit
            row_max[r] = cur
            if const_expr(check_inf):
                cur = 0.0 if cur == -Float32.inf else cur
            exps = cute.math.exp2(scores * scale_log2 - cur * scale_log2, fastmath=True)
            tile_sum = fa_utils.fadd_reduce(exps, init_val=None, arch=self.softmax.arch)
            if const_expr(is_first):
                row_scale[r] = 1.0
                row_sum[r] = tile_sum
            else:
                row_scale[r] = cute.math.exp2((prev - cur) * scale_log2, fastmath=True)
                row_sum[r] = row_sum[r] * row_scale[r] + tile_sum
            acc_S_mn[r, None].store(exps)
            if const_expr(self.vote and not is_first):
                # skippable: both maxima finite (their difference is), below the threshold, no NaN exponential
                gap = tile_max - prev
                skippable = (gap * scale_log2 <= self.threshold) & (gap > -Float32.inf) & (gap < Float32.inf)
                needed = needed | (valid[r] & ~(skippable & (tile_sum == tile_sum)))
        if const_expr(self.vote):
            if const_expr(is_first):
                visit[1] = Int32(0)
            else:
                visit[1] = visit[1] | (Int32(needed) << (position % 32))
                if position % 32 == 31:
                    self.flush_votes()
        return row_scale

    @cute.jit
    def flush_votes(self) -> None:
        """ORs the warp's pending vote bits (the word of the current visit) into ``votes`` and clears them."""
        visit = self.carry[1]
        bits = cute.arch.warp_redux_sync(visit[1], "or")
        if cute.arch.lane_idx() == 0:
            if bits != 0:
                cute.arch.red(self.read.votes_ptr + visit[0] // 32, bits, op="or", dtype="b32", sem="relaxed",
                              scope="gpu")
        visit[1] = Int32(0)

    @cute.jit
    def finish(self) -> None:
        """After the q-tile's last visit: the last votes, and the warp's anchor candidate (the largest row
        maximum, ties to the earliest visit) folded into the q-tile's slot as one packed int64."""
        if const_expr(self.vote):
            self.flush_votes()
        best_pos, _, valid = self.carry
        top = -Float32.inf
        for r in cutlass.range(cute.size(self.row_max), unroll_full=True):
            top = cute.arch.fmax(top, self.row_max[r] if valid[r] else -Float32.inf)
        top = cute.arch.warp_reduction_max(top, threads_in_group=32)
        low = cutlass.Uint32(0)  # LAST_POSITION - position of the earliest visit where a row holds the maximum
        for r in cutlass.range(cute.size(self.row_max), unroll_full=True):
            mine = cutlass.Uint32(LAST_POSITION - best_pos[r])
            if valid[r] & (self.row_max[r] == top):
                low = mine if mine > low else low
        low = cute.arch.warp_redux_sync(low, "umax")
        if cute.arch.lane_idx() == 0:
            if top > -Float32.inf:  # unsigned order of (score, LAST_POSITION - position); 0 stays "no visit"
                high = Uint32(_ordered_bits(top)) ^ Uint32(0x80000000)
                key = (Uint64(high) << Uint64(32)) | Uint64(low)
                cute.arch.red(self.read.slot_ptr, key, op="max", dtype="u64", sem="relaxed", scope="gpu")


class LiteAttentionForwardSm90(FlashAttentionForwardSm90):
    """flash-attn-4's SM90 forward with LiteAttention's vote in each tile's softmax (block sparsity only).

    ``vote=False`` keeps the anchor tracking and leaves the lists alone (``threshold=-inf`` calls).
    ``tail_mode``: how the tail tile's key-length mask runs after the first visit (:meth:`_mask_tail`):
    ``"branch"`` (the mask behind a branch inside the visit; the default with the vote) or ``"select"`` (the mask
    on every visit, no branch; the default without the vote). ``benchmarks/backends.py`` times both with the vote.
    (Peeling the tail visit, one uniform branch around two whole copies of the visit, ran 6-8 % slower than
    ``"branch"`` on the H200 at Wan 480p and 720p, although its other visits had 75 instructions fewer.)
    ``mask_tail=False``: no key-length mask after the first visit, for keys that fill their last tile (every
    column of every tile is a key; flash-attn-4 still masks the first visit, which then masks nothing).
    ``ablate`` (benchmarks only, results wrong): leave out ``"anchor"`` (the per-row position of the maximum), to
    time what it costs. ``order``: the visiting order (:data:`ORDERS`).

    The kernel reads the skip state itself and writes the next one (one launch per call): the producer warp walks the
    q-tile's read list (:class:`_ReadList`) as it loads, the consumers vote, and an idle producer warp commits the
    votes while the consumers store O (:meth:`load`, :meth:`epilogue`).
    """

    def __init__(self, *args, vote: bool = True, tail_mode: str | None = None, mask_tail: bool = True,
                 ablate: tuple[str, ...] = (), order: str = "anchor", **kwargs):
        super().__init__(*args, **kwargs)
        if order not in ORDERS:
            raise ValueError(f"order {order!r}: choose from {ORDERS}")
        self.order = order
        if not self.intra_wg_overlap:
            raise ValueError("LiteAttentionForwardSm90 needs intra_wg_overlap=True (flash-attn-4's SM90 default)")
        unknown = set(ablate) - ABLATIONS
        if unknown:
            raise ValueError(f"unknown ablation(s) {sorted(unknown)}: choose from {sorted(ABLATIONS)}")
        self.vote = vote
        if tail_mode not in (None, *TAIL_MODES):
            raise ValueError(f"tail_mode {tail_mode!r}: choose from {TAIL_MODES}")
        self.tail_mode = tail_mode or ("branch" if vote else "select")
        self.mask_tail = mask_tail
        self.ablate = frozenset(ablate)

    def mma_init(self):
        """Also allocates the registers that live across a q-tile's visits (before the consumers' tile loop,
        so that every visit sees them): per row the position of the visit that set its maximum and whether the
        row lies inside the query sequence; the visit's position, the pending vote bits and the tail's position."""
        FlashAttentionForwardSm90.mma_init(self)
        rows = 2 * self.tile_m // (64 * self.num_wg_mma)  # wgmma m64: a thread holds rows r and r + 8 of 16
        self._carry = (cute.make_rmem_tensor(rows, Int32), cute.make_rmem_tensor(3, Int32),
                       cute.make_rmem_tensor(rows, Boolean))

    def _vote_for(self, softmax, mask_fn, seqlen) -> _TileVote:
        bound = mask_fn.keywords  # flash-attn-4 binds the tile's coordinates to its mask function
        self._current = _TileVote(
            softmax, self._carry, self._read, m_block=bound["m_block"], thr_mma=bound["thr_mma"],
            seqlen_q=seqlen.seqlen_q,
            aux_data=bound["aux_data"], vote=self.vote, tile_m=self.tile_m, tile_n=self.tile_n,
            track_anchor="anchor" not in self.ablate,
        )
        return self._current

    @cute.jit
    def _mask_tail(self, mask_fn, acc_S: cute.Tensor, n_block: Int32, seqlen) -> None:
        """The key-length mask on the visit of the last key tile, wherever the list puts it. The visit's tile
        index (``n_block``) is not read: the consumers count visits, and the last tile's index is known.

        With the vote on, a branch skips the mask on other visits. Without the vote, that branch made ptxas wait for
        the previous tile's PV product before the row maxima (``benchmarks/cute_sass.py`` at D=128: 78 of 571
        instructions per tile under the PV wgmma); there every visit is masked as if it were tile 0 or the last
        one, which masks nothing on the others (a second visit means two tiles, so every column of tile 0 is below
        the key length): 270 of 592 instructions under PV, 322 exposed instead of 493."""
        visit = self._carry[1]
        last = cute.ceil_div(seqlen.seqlen_k, self.tile_n) - 1
        if const_expr(self.tail_mode == "branch"):
            if visit[0] == visit[2]:
                mask_fn(acc_S=acc_S, n_block=last, mask_seqlen=True)
        else:
            mask_fn(acc_S=acc_S, n_block=cutlass.select_(visit[0] == visit[2], last, Int32(0)), mask_seqlen=True)

    def first_half_block_overlap(self, *, n_block, softmax, seqlen, mask_fn, **kwargs):
        vote = self._vote_for(softmax, mask_fn, seqlen)
        vote.start()
        return FlashAttentionForwardSm90.first_half_block_overlap(
            self, n_block=n_block, softmax=vote, seqlen=seqlen, mask_fn=mask_fn, **kwargs)

    def mma_one_n_block_intrawg_overlap(self, smem_pipe_read, *, n_block, softmax, seqlen, mask_fn, **kwargs):
        self._carry[1][0] = self._carry[1][0] + 1  # this visit's position
        vote = self._vote_for(softmax, mask_fn, seqlen)
        tail = partial(self._mask_tail, mask_fn, seqlen=seqlen) if self.mask_tail else None
        return FlashAttentionForwardSm90.mma_one_n_block_intrawg_overlap(
            self, smem_pipe_read, n_block=n_block, softmax=vote, seqlen=seqlen, mask_fn=tail, **kwargs)

    def last_half_block_overlap(self, *, kv_consumer_state, softmax, **kwargs):
        """Runs once per q-tile with visits, after the last one: sends the votes and the anchor candidate."""
        self._current.finish()
        return FlashAttentionForwardSm90.last_half_block_overlap(
            self, kv_consumer_state=kv_consumer_state, softmax=softmax, **kwargs)

    def load(self, mQ, mK, mV, sQ, sK, sV, tma_atom_Q, tma_atom_K, tma_atom_V, pipeline_k, pipeline_v, pipeline_q,
             gmem_tiled_copy_Q, mPageTable, blocksparse_tensors, block_info, SeqlenInfoCls, TileSchedulerCls):
        """flash-attn-4's producer over the read lists of the state; then the commit, on the producer warpgroup's
        second warp (idle with TMA loads)."""
        lists = _StateLists(self, blocksparse_tensors, SeqlenInfoCls, producer=True)
        FlashAttentionForwardSm90.load(
            self, mQ, mK, mV, sQ, sK, sV, tma_atom_Q, tma_atom_K, tma_atom_V, pipeline_k, pipeline_v, pipeline_q,
            gmem_tiled_copy_Q, mPageTable, lists, block_info, SeqlenInfoCls, TileSchedulerCls)
        self._commit_tiles(blocksparse_tensors, SeqlenInfoCls, TileSchedulerCls)

    @cute.jit
    def _commit_tiles(self, carrier, SeqlenInfoCls: cutlass.Constexpr, TileSchedulerCls: cutlass.Constexpr):
        anchor, keep, must_q, must_k, _, _, scratch, kept = carrier
        if cute.arch.make_warp_uniform(cute.arch.warp_idx()) % 4 == 1:
            tile_scheduler = TileSchedulerCls()
            work_tile = tile_scheduler.initial_work_tile_info()
            while work_tile.is_valid_tile:
                m_block, head_idx, batch_idx, _ = work_tile.tile_idx
                n_valid = cute.ceil_div(SeqlenInfoCls(batch_idx).seqlen_k, self.tile_n)
                read = _ReadList(keep, anchor, scratch, batch_idx, head_idx, m_block, n_valid, self.order)
                # the consumers arrive after their last vote and anchor writes (epilogue)
                cute.arch.barrier(barrier_id=COMMIT_BARRIER, number_of_threads=self.num_mma_threads + 32)
                cute.arch.fence_acq_rel_gpu()
                read.commit(must_q, must_k, kept, m_block, self.vote)
                tile_scheduler.advance_to_next_work()
                work_tile = tile_scheduler.get_current_work()

    def mma(self, tiled_mma_qk, tiled_mma_pv, mO, mLSE, sQ, sK, sVt, sP, sO, learnable_sink, pipeline_k, pipeline_v,
            pipeline_q, gmem_tiled_copy_O, tma_atom_O, tidx, softmax_scale_log2, softmax_scale, block_info,
            SeqlenInfoCls, AttentionMaskCls, TileSchedulerCls, blocksparse_tensors, aux_data=None, fastdiv_mods=None):
        """flash-attn-4's consumers over the read lists of the state."""
        lists = _StateLists(self, blocksparse_tensors, SeqlenInfoCls, producer=False)
        return FlashAttentionForwardSm90.mma(
            self, tiled_mma_qk, tiled_mma_pv, mO, mLSE, sQ, sK, sVt, sP, sO, learnable_sink, pipeline_k, pipeline_v,
            pipeline_q, gmem_tiled_copy_O, tma_atom_O, tidx, softmax_scale_log2, softmax_scale, block_info,
            SeqlenInfoCls, AttentionMaskCls, TileSchedulerCls, lists, aux_data, fastdiv_mods)

    def epilogue(self, *args, **kwargs):
        """Lets the commit warp go (every q-tile, visited or not) before storing O, which the commit then overlaps."""
        cute.arch.fence_acq_rel_gpu()  # the votes and the anchor slot, written with red, before the commit reads them
        cute.arch.barrier_arrive(barrier_id=COMMIT_BARRIER, number_of_threads=self.num_mma_threads + 32)
        return FlashAttentionForwardSm90.epilogue(self, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------------

_TORCH_TO_CUTE = {torch.bfloat16: cutlass.BFloat16, torch.float16: cutlass.Float16}
# flash-attn-4's compile cache (on disk when enabled, namespaced by flash-attn-4's own sources); the key also
# carries this file's hash, so that a changed kernel is never loaded from an older entry
_COMPILED = get_jit_cache("litepatch-sm90")
_SOURCE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
COMPILE_SECONDS: dict[tuple, float] = {}  # first-call JIT time per configuration (reported by benchmarks)
# the compiled kernels this process has called, by configuration: one dict lookup per call, where the compile cache
# (on disk when enabled) takes three with a string key
_READY: dict[tuple, object] = {}


STAGES = 2  # K/V pipeline stages: flash-attn-4's SM90 choice (3 fit in shared memory at head dim 128, 224 KiB)


def _kernel(dtype: torch.dtype, head_dim: int, vote: bool, baseline: bool = False,
            tail_mode: str | None = None, mask_tail: bool = True,
            ablate: tuple[str, ...] = (), stages: int = STAGES, order: str = "anchor") -> FlashAttentionForwardSm90:
    tile_m = tile_m_for(head_dim)
    kind, extra = ((FlashAttentionForwardSm90, {}) if baseline else (LiteAttentionForwardSm90, dict(
        vote=vote, tail_mode=tail_mode, mask_tail=mask_tail, ablate=ablate, order=order)))
    return kind(
        _TORCH_TO_CUTE[dtype], head_dim, head_dim, 1, is_causal=False, is_local=False, pack_gqa=False,
        # one producer warpgroup, one consumer warpgroup per 64 query rows
        tile_m=tile_m, tile_n=TILE_N, num_stages=stages, num_threads=128 * (tile_m // 64 + 1),
        Q_in_regs=False, intra_wg_overlap=True, mma_pv_is_rs=head_dim != 96, **extra,
    )


def _dense_args(q, k, v, out, softmax_scale, seqused_k, stream):
    """The argument list of flash-attn-4's SM90 ``__call__`` for a plain dense call (no LSE, no lists), as its
    interface passes it."""
    seqused = None if seqused_k is None else to_cute_tensor(seqused_k, assumed_align=4, leading_dim=0)
    return [
        *(to_cute_tensor(t) for t in (q, k, v, out)), None, Float32(softmax_scale),
        None, None, None, seqused, None, None, None, None, None, AuxData(), None, None, stream,
    ]


def _cute_args(q, k, v, out, lse, softmax_scale, seqused_k, sparse, aux, stream):
    """The argument list of flash-attn-4's SM90 ``__call__``, as CuTe tensors (compile)."""
    seqused = None if seqused_k is None else to_cute_tensor(seqused_k, assumed_align=4, leading_dim=0)
    return [
        *(to_cute_tensor(t) for t in (q, k, v, out)), to_cute_tensor(lse, assumed_align=4), Float32(softmax_scale),
        None, None, None, seqused, None, None, None, None, sparse, aux, None, None, stream,
    ]


def compile_sm90(q, k, v, out, lse, softmax_scale, seqused_k, keep, anchor, kept, must_q, must_k, scratch, *,
                 vote: bool, order: str, stream, tail_mode: str | None = None, mask_tail: bool = True,
                 ablate: tuple[str, ...] = (), stages: int = STAGES):
    """Compiles the kernel for these inputs' configuration (dtype, head dim, vote, order, key lengths or not).

    ``tail_mode``, ``mask_tail`` and ``ablate``: see :class:`LiteAttentionForwardSm90`; ``stages``: K/V pipeline
    stages (:data:`STAGES`).
    """
    kernel = _kernel(q.dtype, q.shape[-1], vote, False, tail_mode, mask_tail, ablate, stages, order)
    carrier = (anchor, keep, must_q, must_k, None, None, scratch, kept.view(1))
    sparse = BlockSparseTensors(*(None if t is None else to_cute_tensor(t, assumed_align=4) for t in carrier))
    aux = AuxData(None, (Float32(0.0),))
    return cute.compile(kernel, *_cute_args(q, k, v, out, lse, softmax_scale, seqused_k, sparse, aux, stream),
                        options="--enable-tvm-ffi")


def compile_block_sparse_sm90(q, k, v, out, lse, softmax_scale, lists, *, stream, stages: int = STAGES):
    """Compiles flash-attn-4's own block-sparse SM90 forward at this kernel's tiles, with its ``lists`` (mask
    counts, mask lists, full counts, full lists): what ``benchmarks/cute_sass.py`` compares the subclass against."""
    kernel = _kernel(q.dtype, q.shape[-1], vote=False, baseline=True, stages=stages)
    sparse = BlockSparseTensors(*(to_cute_tensor(t, assumed_align=4) for t in lists))
    return cute.compile(kernel, *_cute_args(q, k, v, out, lse, softmax_scale, None, sparse, AuxData(), stream),
                        options="--enable-tvm-ffi")


def _ready_kernel(ready_key: tuple, key: tuple, compile_for_stream) -> object:
    """A configuration's compiled kernel the first time this process calls it (the callers look in :data:`_READY`
    first): from the compile cache, else compiled by ``compile_for_stream(stream=...)`` and timed into
    :data:`COMPILE_SECONDS`."""
    if key not in _COMPILED:
        start = time.perf_counter()
        _COMPILED[key] = compile_for_stream(stream=cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True))
        COMPILE_SECONDS[key] = time.perf_counter() - start
    kernel = _READY[ready_key] = _COMPILED[key]
    return kernel


def compile_dense_sm90(q, k, v, out, softmax_scale, seqused_k, *, stream, stages: int = STAGES):
    """Compiles flash-attn-4's dense SM90 forward, unchanged, for these inputs' configuration (dtype, head dim, key
    lengths or not): the kernel its interface builds for a dense sm90 call without LSE (one split; flash-attn-4 has
    no split-KV on sm90); ``stages`` other than its 2 for benchmarks."""
    kernel = _kernel(q.dtype, q.shape[-1], vote=False, baseline=True, stages=stages)
    return cute.compile(kernel, *_dense_args(q, k, v, out, softmax_scale, seqused_k, stream),
                        options="--enable-tvm-ffi")


def run_dense_sm90(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: float | None,
                   seqused_k: torch.Tensor | None, stages: int = STAGES) -> torch.Tensor:
    """flash-attn-4's own dense SM90 forward on ``[B, S, H, D]`` CUDA tensors (its kernel class unchanged, with the
    tiles and options its interface picks on sm90), launched directly: its interface's per-call Python
    (``_flash_attn_fwd``) took 62-77 us of host time on the H200's host, a direct launch about 20 us.
    Non-empty sequences, ``k`` and ``v`` of one shape; inputs TMA cannot read as they are are copied
    (:func:`litepatch.kernels.tma.tma_inputs`).

    >>> out = run_dense_sm90(q, k, v, softmax_scale=None, seqused_k=None)
    """
    q, k, v = tma_inputs(q, k, v)
    head_dim = q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ready_key = ("dense", q.dtype, head_dim, seqused_k is not None, stages)
    kernel = _READY.get(ready_key)
    if kernel is None:
        key = (_SOURCE, "dense", str(q.dtype), head_dim, seqused_k is not None, stages)
        kernel = _ready_kernel(ready_key, key,
                               partial(compile_dense_sm90, q, k, v, out, scale, seqused_k, stages=stages))
    kernel(q, k, v, out, None, scale, None, None, None, seqused_k, None, None, None, None, None, AuxData(), None, None)
    return out


def run_sm90(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    anchor: torch.Tensor,
    kept: torch.Tensor,
    must_q: torch.Tensor,
    must_k: torch.Tensor,
    scratch: torch.Tensor,
    *,
    softmax_scale: float,
    threshold: float,
    seqused_k: torch.Tensor | None,
    order: str,
    tail_mode: str | None = None,
    mask_tail: bool | None = None,
    ablate: tuple[str, ...] = (),
    stages: int = STAGES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LiteAttention call on ``[B, S, H, D]`` CUDA tensors, in one launch; returns ``(out, lse [B, H, Sq])``.

    Reads and updates the skip state (``keep``, ``anchor``, ``kept``; :mod:`litepatch.kernels.state`) with
    ``must_q``/``must_k`` (bool per q-tile / key tile) as the tiles that may never be dropped. ``scratch``: int32,
    at least :func:`scratch_words` long, all zero (the kernel leaves it so). ``order``: one of :data:`ORDERS`.
    ``threshold=-inf`` compiles the variant without the vote; keys that fill their last tile (no ``seqused_k``,
    length a multiple of the tile) the variant without the tail mask. ``tail_mode``, ``mask_tail`` (forced),
    ``ablate`` (benchmarks): see :class:`LiteAttentionForwardSm90`; ``stages``: K/V pipeline stages (:data:`STAGES`).
    """
    q, k, v = tma_inputs(q, k, v)
    vote = threshold > -float("inf")
    batch, seq_q, heads, head_dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=q.device)
    if mask_tail is None:
        mask_tail = seqused_k is not None or k.shape[1] % TILE_N != 0
    ready_key = (q.dtype, head_dim, vote, order, seqused_k is not None, tail_mode, mask_tail, tuple(ablate), stages)
    kernel = _READY.get(ready_key)
    if kernel is None:
        key = (_SOURCE, str(q.dtype), head_dim, vote, order, seqused_k is not None, tail_mode, mask_tail,
               tuple(sorted(ablate)), stages)
        kernel = _ready_kernel(ready_key, key, partial(
            compile_sm90, q, k, v, out, lse, softmax_scale, seqused_k, keep, anchor, kept, must_q, must_k, scratch,
            vote=vote, order=order, tail_mode=tail_mode, mask_tail=mask_tail, ablate=ablate, stages=stages))
    kernel(
        q, k, v, out, lse, softmax_scale, None, None, None, seqused_k, None, None, None, None,
        (anchor, keep, must_q, must_k, None, None, scratch, kept.view(1)),
        AuxData(None, (threshold if vote else 0.0,)), None, None,
    )
    return out, lse
