"""LiteAttention's skip vote inside flash-attn-4's SM90 (Hopper) forward, written in CuTe DSL.

:class:`LiteAttentionForwardSm90` subclasses flash-attn-4's ``FlashAttentionForwardSm90`` and keeps all of
its machinery (producer warpgroup with TMA, two consumer warpgroups taking turns on the tensor cores, register
reallocation, intra-warpgroup overlap of QK^T and PV, block-sparse iteration over "full block" lists). It
changes one thing: the online softmax of each visited key tile, taken over by :class:`_TileVote`, which

* computes the tile's row maxima as the softmax does anyway (thread-local max, then the quad shuffle), and
  only then folds in the running maximum, so the *tile's own* maxima come for free;
* votes (DESIGN §1): a valid query row needs the tile unless ``(tile_max - running_max) * scale * log2(e)
  <= threshold`` with both maxima finite and the tile's exponentials not NaN (a NaN or infinite score never
  votes to skip); rows past the query length do not vote. One warp ballot per tile, and lane 0 of a warp
  whose rows need it ORs the tile's bit into a ``needed`` bitmask in global memory (``red.global.or``). No
  cross-warp agreement is needed: a tile is skippable exactly when no warp set its bit.
* tracks the anchor (the visited tile holding the q-tile's largest score, ties to the earliest visited):
  each warp reduces the tile's maximum over its valid rows and lane 0 folds ``(score, visit priority,
  tile)`` packed in one int64 into a per-q-tile slot with ``red.global.max.s64``.

The read list arrives as flash-attn-4's "full block" lists, one per (batch row, head, q-tile), which the
kernel walks from last entry to first: :mod:`litepatch.kernels.cute_fwd` writes them in reverse visiting
order, seeds ``needed`` with the tiles that may never be dropped (the first visited, must-compute tiles,
tiles this call does not read) and afterwards ANDs ``needed`` into ``state.keep`` and decodes the anchor.
Because the visiting order no longer puts the sequence's last (partial) key tile first, the key-length mask
is applied to whichever visit holds that tile (:meth:`LiteAttentionForwardSm90._mask_tail`).

Extra inputs travel in flash-attn-4's ``AuxData`` (meant for ``score_mod`` tensors): ``tensors =
(needed int32 [B, H, QT, n_words], slot int64 [B, H, QT])``, ``scalars = (threshold, descending)``.

**Blackwell (sm100), on paper.** flash-attn-4's ``FlashAttentionForwardSm100`` has the same block-sparse
iteration (``softmax_block_sparse_sm100``) but a different structure: S lives in tensor memory, the softmax
warpgroups load it into registers and hold the row maxima there, and a separate correction warpgroup
rescales O. The twin would be one more file, ``cute_sm100.py``, subclassing ``FlashAttentionForwardSm100``
and overriding its per-tile softmax step the way :class:`_TileVote` replaces the SM90 one (same vote, same
ballot and ``red`` writes, same slot packing), registered as a ``cute-sm100`` backend with
``cuda_archs=(10,)``; :mod:`litepatch.kernels.cute_fwd`'s list and commit kernels are shared unchanged.
It cannot be tested on the lent H100/H200s.

Example (what :func:`litepatch.kernels.cute_fwd.cute_forward` does):
    >>> out, lse = run_sm90(q, k, v, lists, needed, slot, softmax_scale=0.088, threshold=-6.0,
    ...                     descending=False, seqused_k=None)
"""

from __future__ import annotations

import hashlib
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

TILE_M = TILE_N = 128  # the block-sparse tile of flash-attn-4's SM90 forward at head dims 64-128
FIRST_PRIORITY = 65535  # visit priority of the first visited tile: above every other (<= 32767)


@dsl_user_op
def _ordered_bits(x: Float32, *, loc=None, ip=None) -> Int32:
    """An int32 whose signed order is the float order of ``x`` (for a packed atomic max)."""
    bits = Vector.from_elements((Float32(x),), Float32, loc=loc, ip=ip).bitcast(Int32, loc=loc, ip=ip)
    bits = bits.to_elements(loc=loc, ip=ip)[0]
    return bits ^ ((bits >> 31) & Int32(0x7FFFFFFF))


class _TileVote:
    """Stands in for flash-attn-4's ``Softmax`` during one visited tile: the same online softmax, plus the
    skip vote and the per-row anchor candidate. ``row_max``/``row_sum`` are the softmax's own register
    tensors; ``carry`` holds registers that live across the tiles of one q-tile (see
    :meth:`LiteAttentionForwardSm90.mma_init`)."""

    def __init__(self, softmax, carry, *, n_block, batch_idx, head_idx, m_block, thr_mma, seqlen_q, aux_data,
                 vote: bool, tile_m: int, tile_n: int):
        self.softmax, self.carry = softmax, carry
        self.row_max, self.row_sum = softmax.row_max, softmax.row_sum
        self.scale_log2 = softmax.scale_log2
        self.n_block, self.batch_idx, self.head_idx, self.m_block = n_block, batch_idx, head_idx, m_block
        self.thr_mma, self.seqlen_q = thr_mma, seqlen_q
        self.needed, self.slot = aux_data.tensors
        self.threshold, self.descending = aux_data.scalars
        self.vote, self.tile_m, self.tile_n = vote, tile_m, tile_n

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
    def online_softmax(self, acc_S: cute.Tensor, is_first: cutlass.Constexpr[bool] = False,
                       check_inf: cutlass.Constexpr[bool] = True) -> cute.Tensor:
        acc_S_mn = layout_utils.reshape_acc_to_mn(acc_S)
        row_max, row_sum, scale_log2 = self.row_max, self.row_sum, self.scale_log2
        best_tile, pending, valid = self.carry
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
                best_tile[r] = self.n_block
            else:
                cur = cute.arch.fmax(prev, tile_max)
                best_tile[r] = self.n_block if tile_max > prev else best_tile[r]  # ties: the earlier visit
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
                finite = (tile_max < Float32.inf) & (tile_max > -Float32.inf) & (prev < Float32.inf)
                finite = finite & (prev > -Float32.inf) & (tile_sum == tile_sum)
                below = (tile_max - prev) * scale_log2 <= self.threshold
                needed = needed | (valid[r] & ~(below & finite))
        if const_expr(self.vote):
            # Votes collect per thread as bits of the current 32-tile word and reach global memory when the
            # word changes (visits ascend after the first), so a q-tile sends about one OR per word.
            word = self.n_block // 32
            if const_expr(is_first):
                pending[0] = word
                pending[1] = Int32(0)
            else:
                if word != pending[0]:
                    self.flush_votes()
                    pending[0] = word
                    pending[1] = Int32(0)
                pending[1] = pending[1] | (Int32(needed) << (self.n_block % 32))
        return row_scale

    @cute.jit
    def flush_votes(self) -> None:
        """ORs the warp's pending vote bits into ``needed`` (one ``red.global.or`` from lane 0)."""
        pending = self.carry[1]
        bits = cute.arch.warp_redux_sync(pending[1], "or")
        if cute.arch.lane_idx() == 0:
            if bits != 0:
                word = fa_utils.elem_pointer(self.needed, (self.batch_idx, self.head_idx, self.m_block, pending[0]))
                cute.arch.red(word, bits, op="or", dtype="b32", sem="relaxed", scope="gpu")

    @cute.jit
    def finish(self, first_tile: Int32) -> None:
        """After the q-tile's last visit: the last votes, and the warp's anchor candidate (the largest row
        maximum, ties to the earliest visit) folded into the q-tile's slot as one packed int64."""
        if const_expr(self.vote):
            self.flush_votes()
        best_tile, _, valid = self.carry
        top = -Float32.inf
        for r in cutlass.range(cute.size(self.row_max), unroll_full=True):
            top = cute.arch.fmax(top, self.row_max[r] if valid[r] else -Float32.inf)
        top = cute.arch.warp_reduction_max(top, threads_in_group=32)
        low = cutlass.Uint32(0)  # (visit priority << 16) | tile of the rows that hold the maximum
        for r in cutlass.range(cute.size(self.row_max), unroll_full=True):
            tile = best_tile[r]
            priority = FIRST_PRIORITY if tile == first_tile else (tile if self.descending != 0 else 32767 - tile)
            mine = cutlass.Uint32(priority) * cutlass.Uint32(65536) + cutlass.Uint32(tile)
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
    """

    def __init__(self, *args, vote: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.intra_wg_overlap:
            raise ValueError("LiteAttentionForwardSm90 needs intra_wg_overlap=True (flash-attn-4's SM90 default)")
        self.vote = vote

    def mma_init(self):
        """Also allocates the registers that live across a q-tile's visits (before the consumers' tile loop,
        so that every visit sees them): per row the tile that set its maximum and whether the row lies inside
        the query sequence, the pending vote word and bits, and the first visited tile."""
        FlashAttentionForwardSm90.mma_init(self)
        rows = 2 * self.tile_m // (64 * self.num_wg_mma)  # wgmma m64: a thread holds rows r and r + 8 of 16
        self._carry = (cute.make_rmem_tensor(rows, Int32), cute.make_rmem_tensor(2, Int32),
                       cute.make_rmem_tensor(rows, Boolean))
        self._first_tile = cute.make_rmem_tensor(1, Int32)

    def _vote_for(self, softmax, n_block, mask_fn, seqlen) -> _TileVote:
        bound = mask_fn.keywords  # flash-attn-4 binds the tile's coordinates to its mask function
        self._current = _TileVote(
            softmax, self._carry, n_block=n_block, batch_idx=bound["batch_idx"], head_idx=bound["head_idx"],
            m_block=bound["m_block"], thr_mma=bound["thr_mma"], seqlen_q=seqlen.seqlen_q,
            aux_data=bound["aux_data"], vote=self.vote, tile_m=self.tile_m, tile_n=self.tile_n,
        )
        return self._current

    @cute.jit
    def _mask_tail(self, mask_fn, acc_S: cute.Tensor, n_block: Int32, seqlen) -> None:
        """The key-length mask on the visit of the last key tile, wherever the list puts it."""
        if n_block == cute.ceil_div(seqlen.seqlen_k, self.tile_n) - 1:
            mask_fn(acc_S=acc_S, n_block=n_block, mask_seqlen=True)

    def first_half_block_overlap(self, *, n_block, softmax, seqlen, mask_fn, **kwargs):
        vote = self._vote_for(softmax, n_block, mask_fn, seqlen)
        self._first_tile[0] = n_block
        return FlashAttentionForwardSm90.first_half_block_overlap(
            self, n_block=n_block, softmax=vote, seqlen=seqlen, mask_fn=mask_fn, **kwargs)

    def mma_one_n_block_intrawg_overlap(self, smem_pipe_read, *, n_block, softmax, seqlen, mask_fn, **kwargs):
        vote = self._vote_for(softmax, n_block, mask_fn, seqlen)
        tail = partial(self._mask_tail, mask_fn, seqlen=seqlen)
        return FlashAttentionForwardSm90.mma_one_n_block_intrawg_overlap(
            self, smem_pipe_read, n_block=n_block, softmax=vote, seqlen=seqlen, mask_fn=tail, **kwargs)

    def last_half_block_overlap(self, *, kv_consumer_state, softmax, **kwargs):
        """Runs once per q-tile with visits, after the last one: sends the votes and the anchor candidate."""
        self._current.finish(self._first_tile[0])
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


def _kernel(dtype: torch.dtype, head_dim: int, vote: bool) -> LiteAttentionForwardSm90:
    return LiteAttentionForwardSm90(
        _TORCH_TO_CUTE[dtype], head_dim, head_dim, 1, is_causal=False, is_local=False, pack_gqa=False,
        tile_m=TILE_M, tile_n=TILE_N, num_stages=2, num_threads=384, Q_in_regs=False, intra_wg_overlap=True,
        mma_pv_is_rs=head_dim != 96, has_aux_tensors=True, vote=vote,
    )


def _cute_args(q, k, v, out, lse, softmax_scale, seqused_k, lists, needed, slot, threshold, descending, stream):
    """The argument list of flash-attn-4's SM90 ``__call__``, as CuTe tensors (compile) ."""
    mask_cnt, mask_idx, full_cnt, full_idx = (to_cute_tensor(t, assumed_align=4) for t in lists)
    sparse = BlockSparseTensors(mask_cnt, mask_idx, full_cnt, full_idx)
    aux = AuxData([to_cute_tensor(needed, assumed_align=4), to_cute_tensor(slot, assumed_align=8)],
                  (Float32(threshold), Int32(descending)))
    seqused = None if seqused_k is None else to_cute_tensor(seqused_k, assumed_align=4, leading_dim=0)
    return [
        *(to_cute_tensor(t) for t in (q, k, v, out)), to_cute_tensor(lse, assumed_align=4), Float32(softmax_scale),
        None, None, None, seqused, None, None, None, None, sparse, aux, None, None, stream,
    ]


def compile_sm90(q, k, v, out, lse, softmax_scale, seqused_k, lists, needed, slot, *, vote: bool, stream):
    """Compiles the kernel for these inputs' configuration (dtype, head dim, vote, key lengths or not)."""
    kernel = _kernel(q.dtype, q.shape[-1], vote)
    args = _cute_args(q, k, v, out, lse, softmax_scale, seqused_k, lists, needed, slot, 0.0, 0, stream)
    return cute.compile(kernel, *args, options="--enable-tvm-ffi")


def run_sm90(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lists: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    needed: torch.Tensor,
    slot: torch.Tensor,
    *,
    softmax_scale: float,
    threshold: float,
    descending: bool,
    seqused_k: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LiteAttention call on ``[B, S, H, D]`` CUDA tensors; returns ``(out, lse [B, H, Sq])``.

    ``lists`` = (mask counts, mask lists, full counts, full lists) in flash-attn-4's block-sparse format
    (mask lists empty). ``threshold=-inf`` compiles the variant without the vote.
    """
    vote = threshold > -float("inf")
    batch, seq_q, heads, head_dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=q.device)
    key = (_SOURCE, str(q.dtype), head_dim, vote, seqused_k is not None)
    if key not in _COMPILED:
        start = time.perf_counter()
        stream = cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)
        _COMPILED[key] = compile_sm90(q, k, v, out, lse, softmax_scale, seqused_k, lists, needed, slot, vote=vote,
                                      stream=stream)
        COMPILE_SECONDS[key] = time.perf_counter() - start
    _COMPILED[key](
        q, k, v, out, lse, softmax_scale, None, None, None, seqused_k, None, None, None, None,
        (*lists, None, None, None, None), AuxData([needed, slot], (threshold if vote else 0.0, int(descending))),
        None, None,
    )
    return out, lse

