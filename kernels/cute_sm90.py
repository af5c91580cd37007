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
from cutlass import Boolean, Float32, Int32, Int64, const_expr
from cutlass.base_dsl.typing import Vector
from cutlass.cutlass_dsl import dsl_user_op
from flash_attn.cute import utils as fa_utils
from flash_attn.cute.block_sparsity import BlockSparseTensors
from flash_attn.cute.cache_utils import get_jit_cache
from flash_attn.cute.cute_dsl_utils import to_cute_tensor
from flash_attn.cute.flash_fwd_sm90 import FlashAttentionForwardSm90
from flash_attn.cute.utils import AuxData
from quack import layout_utils

from .tma import all_tma_ready, tma_inputs

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


class _TileVote:
    """Stands in for flash-attn-4's ``Softmax`` during one visited tile: the same online softmax, plus the
    skip vote and the per-row anchor candidate. ``row_max``/``row_sum`` are the softmax's own register
    tensors; ``carry`` holds registers that live across the visits of one q-tile (see
    :meth:`LiteAttentionForwardSm90.mma_init`): per row the position of the visit that set its maximum and
    whether it lies inside the query sequence, and ``visit = (position, pending vote bits, tail position)``."""

    def __init__(self, softmax, carry, *, batch_idx, head_idx, m_block, thr_mma, seqlen_q, aux_data, vote: bool,
                 tile_m: int, tile_n: int, track_anchor: bool = True):
        self.softmax, self.carry = softmax, carry
        self.row_max, self.row_sum = softmax.row_max, softmax.row_sum
        self.scale_log2 = softmax.scale_log2
        self.batch_idx, self.head_idx, self.m_block = batch_idx, head_idx, m_block
        self.thr_mma, self.seqlen_q = thr_mma, seqlen_q
        self.votes, self.slot, self.tail = aux_data.tensors
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
        visit[2] = self.tail[self.batch_idx, self.head_idx, self.m_block]

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
                word = fa_utils.elem_pointer(self.votes, (self.batch_idx, self.head_idx, self.m_block, visit[0] // 32))
                cute.arch.red(word, bits, op="or", dtype="b32", sem="relaxed", scope="gpu")
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
            if top > -Float32.inf:
                key = Int64(_ordered_bits(top)) * Int64(4294967296) + Int64(low)
                slot = fa_utils.elem_pointer(self.slot, (self.batch_idx, self.head_idx, self.m_block))
                cute.arch.red(slot, key, op="max", dtype="s64", sem="relaxed", scope="gpu")


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
    time what it costs.
    """

    def __init__(self, *args, vote: bool = True, tail_mode: str | None = None, mask_tail: bool = True,
                 ablate: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
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
            softmax, self._carry, batch_idx=bound["batch_idx"], head_idx=bound["head_idx"],
            m_block=bound["m_block"], thr_mma=bound["thr_mma"], seqlen_q=seqlen.seqlen_q,
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
            ablate: tuple[str, ...] = (), stages: int = STAGES) -> FlashAttentionForwardSm90:
    tile_m = tile_m_for(head_dim)
    kind, extra = ((FlashAttentionForwardSm90, {}) if baseline else (LiteAttentionForwardSm90, dict(
        vote=vote, tail_mode=tail_mode, mask_tail=mask_tail, ablate=ablate)))
    return kind(
        _TORCH_TO_CUTE[dtype], head_dim, head_dim, 1, is_causal=False, is_local=False, pack_gqa=False,
        # one producer warpgroup, one consumer warpgroup per 64 query rows
        tile_m=tile_m, tile_n=TILE_N, num_stages=stages, num_threads=128 * (tile_m // 64 + 1),
        Q_in_regs=False, intra_wg_overlap=True, mma_pv_is_rs=head_dim != 96, has_aux_tensors=not baseline, **extra,
    )


def _dense_args(q, k, v, out, softmax_scale, seqused_k, stream):
    """The argument list of flash-attn-4's SM90 ``__call__`` for a plain dense call (no LSE, no lists), as its
    interface passes it."""
    seqused = None if seqused_k is None else to_cute_tensor(seqused_k, assumed_align=4, leading_dim=0)
    return [
        *(to_cute_tensor(t) for t in (q, k, v, out)), None, Float32(softmax_scale),
        None, None, None, seqused, None, None, None, None, None, AuxData(), None, None, stream,
    ]


def _cute_args(q, k, v, out, lse, softmax_scale, seqused_k, lists, votes, slot, tail, stream):
    """The argument list of flash-attn-4's SM90 ``__call__``, as CuTe tensors (compile)."""
    mask_cnt, mask_idx, full_cnt, full_idx = (to_cute_tensor(t, assumed_align=4) for t in lists)
    sparse = BlockSparseTensors(mask_cnt, mask_idx, full_cnt, full_idx)
    aux = AuxData([to_cute_tensor(votes, assumed_align=4), to_cute_tensor(slot, assumed_align=8),
                   to_cute_tensor(tail, assumed_align=4)], (Float32(0.0),))
    seqused = None if seqused_k is None else to_cute_tensor(seqused_k, assumed_align=4, leading_dim=0)
    return [
        *(to_cute_tensor(t) for t in (q, k, v, out)), to_cute_tensor(lse, assumed_align=4), Float32(softmax_scale),
        None, None, None, seqused, None, None, None, None, sparse, aux, None, None, stream,
    ]


def compile_sm90(q, k, v, out, lse, softmax_scale, seqused_k, lists, votes, slot, tail, *, vote: bool, stream,
                 baseline: bool = False, tail_mode: str | None = None, mask_tail: bool = True,
                 ablate: tuple[str, ...] = (), stages: int = STAGES):
    """Compiles the kernel for these inputs' configuration (dtype, head dim, vote, key lengths or not).

    ``baseline=True`` compiles flash-attn-4's own block-sparse forward with the same tiles and lists instead (no
    vote, no anchor): what ``benchmarks/cute_sass.py`` compares the subclass against. ``tail_mode``, ``mask_tail``
    and ``ablate``: see :class:`LiteAttentionForwardSm90`; ``stages``: K/V pipeline stages (:data:`STAGES`).
    """
    kernel = _kernel(q.dtype, q.shape[-1], vote, baseline, tail_mode, mask_tail, ablate, stages)
    args = _cute_args(q, k, v, out, lse, softmax_scale, seqused_k, lists, votes, slot, tail, stream)
    if baseline:
        args[-4] = AuxData()  # flash-attn-4's default: no aux tensors
    return cute.compile(kernel, *args, options="--enable-tvm-ffi")


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
    out = _output_like(q)
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
    lists: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    votes: torch.Tensor,
    slot: torch.Tensor,
    tail: torch.Tensor,
    *,
    softmax_scale: float,
    threshold: float,
    seqused_k: torch.Tensor | None,
    tail_mode: str | None = None,
    mask_tail: bool | None = None,
    ablate: tuple[str, ...] = (),
    stages: int = STAGES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LiteAttention call on ``[B, S, H, D]`` CUDA tensors; returns ``(out, lse [B, H, Sq])``.

    ``lists`` = (mask counts, mask lists, full counts, full lists) in flash-attn-4's block-sparse format
    (mask lists empty), each list in reverse visiting order. ``votes`` (zeroed) receives per visit position
    whether a valid row needed the tile, ``slot`` (set to the int64 minimum) the packed anchor candidate, and
    ``tail`` holds the position of the key sequence's last tile in each list (-1: not listed).
    ``threshold=-inf`` compiles the variant without the vote; keys that fill their last tile (no ``seqused_k``,
    length a multiple of the tile) the variant without the tail mask. ``tail_mode``, ``mask_tail`` (forced),
    ``ablate`` (benchmarks): see :class:`LiteAttentionForwardSm90`; ``stages``: K/V pipeline stages (:data:`STAGES`).
    """
    q, k, v = tma_inputs(q, k, v)
    vote = threshold > -float("inf")
    batch, seq_q, heads, head_dim = q.shape
    out = _output_like(q)
    lse = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=q.device)
    if mask_tail is None:
        mask_tail = _tail_masked(k, seqused_k)
    ready_key = _lite_ready_key(q.dtype, head_dim, vote, seqused_k is not None, tail_mode, mask_tail, ablate, stages)
    kernel = _READY.get(ready_key)
    if kernel is None:
        key = (_SOURCE, str(q.dtype), head_dim, vote, seqused_k is not None, tail_mode, mask_tail,
               tuple(sorted(ablate)), stages)
        kernel = _ready_kernel(ready_key, key, partial(
            compile_sm90, q, k, v, out, lse, softmax_scale, seqused_k, lists, votes, slot, tail, vote=vote,
            tail_mode=tail_mode, mask_tail=mask_tail, ablate=ablate, stages=stages))
    kernel(
        q, k, v, out, lse, softmax_scale, None, None, None, seqused_k, None, None, None, None,
        *_list_args(lists, votes, slot, tail, threshold), None, None,
    )
    return out, lse


def _output_like(q: torch.Tensor) -> torch.Tensor:
    """A new contiguous tensor of ``q``'s shape, dtype and device, as ``torch.empty(q.shape, dtype=q.dtype,
    device=q.device)`` makes it in about a third of the host time (H100 host, session 24: ``empty_like`` 1.6 us,
    that ``empty`` 4.3 us; its keyword arguments are what costs)."""
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _lite_ready_key(dtype, head_dim: int, vote: bool, lengths: bool, tail_mode, mask_tail: bool, ablate, stages: int):
    """A LiteAttention configuration's key in :data:`_READY`."""
    return (dtype, head_dim, vote, lengths, tail_mode, mask_tail, tuple(ablate), stages)


def _tail_masked(k: torch.Tensor, seqused_k: torch.Tensor | None) -> bool:
    """Whether the kernel must mask the last key tile (key lengths, or keys that do not fill it)."""
    return seqused_k is not None or k.shape[1] % TILE_N != 0


def _list_args(lists, votes, slot, tail, threshold: float) -> tuple:
    """The block-sparse and aux arguments of a LiteAttention launch."""
    vote_threshold = threshold if threshold > -math.inf else 0.0  # the variant without the vote does not read it
    return (*lists, None, None, None, None), AuxData([votes, slot, tail], (vote_threshold,))


# LSE buffers that calls dropping their LSE write into, by (device, shape): never read, so every bound call of one
# shape shares one (one per state would hold a video model's worth: 12 MB per layer and branch at Wan 720p)
_DROPPED_LSE: dict[tuple, torch.Tensor] = {}


def _dropped_lse(device: torch.device, shape: tuple[int, int, int]) -> torch.Tensor:
    """The float32 ``shape`` buffer on ``device`` that LSEs nobody reads are written into (kernels on any stream may
    write it at once: its contents are never read)."""
    key = (device, shape)
    buffer = _DROPPED_LSE.get(key)
    if buffer is None:
        if len(_DROPPED_LSE) >= 16:  # many resolutions (a service): start over rather than hold memory for each
            _DROPPED_LSE.clear()
        buffer = _DROPPED_LSE[key] = torch.empty(shape, dtype=torch.float32, device=device)
    return buffer


def bound_sm90(q: torch.Tensor, k: torch.Tensor, lists, votes: torch.Tensor, slot: torch.Tensor, tail: torch.Tensor,
               *, softmax_scale: float, threshold: float):
    """:func:`run_sm90` with these lists, scratch and settings fixed, for later calls on new ``q, k, v`` shaped as
    ``q, k`` (no key lengths): the compiled kernel and the fixed arguments found once. ``None`` before
    :func:`run_sm90` has compiled that kernel in this process. The returned function returns ``(out, lse)``, or
    ``None``, launching nothing, for inputs TMA cannot read as they are (:func:`run_sm90` copies them). Called with
    ``lse_wanted=False``, it writes the LSE into a buffer every such call of that shape reuses (:func:`_dropped_lse`:
    the kernel always writes one; a caller that drops it saves an allocation per call).

    >>> again = bound_sm90(q, k, lists, votes, slot, tail, softmax_scale=0.125, threshold=-4.0)
    >>> out, lse = again(q, k, v)
    """
    vote = threshold > -math.inf
    kernel = _READY.get(_lite_ready_key(q.dtype, q.shape[-1], vote, False, None, _tail_masked(k, None), (), STAGES))
    if kernel is None:
        return None
    sparse, aux = _list_args(lists, votes, slot, tail, threshold)
    batch, seq_q, heads, _ = q.shape
    lse_shape, device = (batch, heads, seq_q), q.device
    dropped_lse = _dropped_lse(device, lse_shape)

    def again(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              lse_wanted: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not all_tma_ready(q, k, v):
            return None
        out = _output_like(q)
        lse = torch.empty(lse_shape, dtype=torch.float32, device=device) if lse_wanted else dropped_lse
        kernel(q, k, v, out, lse, softmax_scale, None, None, None, None, None, None, None, None, sparse, aux, None,
               None)
        return out, lse

    return again

