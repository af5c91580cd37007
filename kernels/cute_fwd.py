"""CuTe-DSL LiteAttention backend for Hopper (sm90), built on flash-attn-4 as a library.

Stage 1 of issue 12 (what this file does today):

* **Read-only calls** (``vote=False``, or ``threshold=-inf``) run flash-attn-4's SM90 block-sparse forward
  unchanged: the read list (``state.keep``) is turned into flash-attn-4's "full block" lists, per
  (batch row, head, q-tile) the ascending key tiles to compute, by one small Triton kernel into a
  scratch buffer shared by every layer (:func:`block_lists`). flash-attn-4 walks a list from its last
  entry to its first. Read-only calls leave ``keep`` and ``anchor`` as they are and set ``kept``.
* **List-writing calls** (a finite threshold) run the Triton kernel (:mod:`litepatch.kernels.triton_fwd`),
  which holds the skip vote; its 128x128 tiles are this backend's, so both share one state layout. The
  patcher runs them once every ``refresh`` steps of a recipe and read-only calls in between.
* **Dense calls** (:func:`flash_attn_4_dense`, reached through :func:`litepatch.kernels.dense_attention`):
  flash-attn-4's plain forward, with valid key lengths (``seqused_k``) for prefix key masks.

Key-padding masks: prefix masks (valid keys then padding, per batch row: the text mask of HunyuanVideo
and Qwen-Image) become ``seqused_k``; tiles past a row's length are dropped from its lists. Other masks
go to the Triton kernel.

The final stage moves the vote into the CuTe kernel: a subclass of flash-attn-4's
``FlashAttentionForwardSm90`` whose consumer warpgroups compare each visited tile's row maxima (which
the online softmax already holds) with the running maxima before the rescale, OR the per-row "needed"
votes across the warpgroup through shared memory, and clear the tile's bit in ``keep`` with one
``atomicAnd`` per (q-tile, tile) from one thread. **Blackwell (sm100)** would be the twin of that
subclass on flash-attn-4's ``FlashAttentionForwardSm100``: the softmax warpgroups hold the row maxima
in registers there too (TMEM-loaded S), the correction warpgroup is where the vote would be taken, and
its block-sparse iteration (``softmax_block_sparse_sm100``) visits lists in the same order; it would be
one more file registering a ``cute-sm100`` backend with ``cuda_archs=(10,)``. Neither can be tested on
the lent H200s.

Requires ``pip install "litepatch[cuda]"`` (flash-attn-4 4.0.0b36, nvidia-cutlass-dsl 4.8.1). The first
call per configuration JIT-compiles (about 2 s); set ``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1`` to keep
the compiled kernels on disk between processes.

Example:
    >>> out = lite_attention(q, k, v, state, threshold=-6.0, backend="cute")          # votes (Triton)
    >>> out = lite_attention(q, k, v, state, vote=False, backend="cute")              # reads (flash-attn-4)
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from flash_attn.cute import interface as _fa4
from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

from .registry import Backend, Constraints, register_backend
from .state import TileConfig
from .triton_fwd import MAX_K_TILES, tile_valid, triton_forward

os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")

TILES = TileConfig(128, 128)  # flash-attn-4's SM90 tile at head dims 64-128 when block sparsity is 128x128
HEAD_DIMS = (64, 128)
CONSTRAINTS = Constraints(
    device_types=("cuda",),
    dtypes=(torch.float16, torch.bfloat16),
    head_dims=HEAD_DIMS,
    cuda_archs=(9,),  # verified on sm90 (H100/H200) only
    max_k_tiles=MAX_K_TILES,
)


@triton.jit
def _block_list_kernel(keep_ptr, tile_valid_ptr, idx_ptr, cnt_ptr, kept_ptr, q_tiles, k_tiles, n_words, heads,
                       KT_POW2: tl.constexpr, HAS_KEY_MASK: tl.constexpr):
    row = tl.program_id(0)  # (batch row * heads + head) * q_tiles + q-tile
    j = tl.arange(0, KT_POW2)
    in_range = j < k_tiles
    words = tl.load(keep_ptr + row.to(tl.int64) * n_words + j // 32, mask=in_range, other=0)
    bit = (((words >> (j % 32)) & 1) != 0) & in_range
    if HAS_KEY_MASK:
        b = row // (q_tiles * heads)
        bit = bit & (tl.load(tile_valid_ptr + b * k_tiles + j, mask=in_range, other=0) != 0)
    bit_i = bit.to(tl.int32)
    total = tl.sum(bit_i, axis=0)
    pos = tl.cumsum(bit_i, axis=0) - 1
    tl.store(idx_ptr + row.to(tl.int64) * k_tiles + pos, j, mask=bit)
    tl.store(cnt_ptr + row, total)
    tl.atomic_add(kept_ptr, total.to(tl.int64))


_SCRATCH: dict[torch.device, torch.Tensor] = {}


def _scratch(device: torch.device, numel: int) -> torch.Tensor:
    """An int32 buffer of at least ``numel`` elements, one per device, shared by every layer and call."""
    buffer = _SCRATCH.get(device)
    if buffer is None or buffer.numel() < numel:
        buffer = _SCRATCH[device] = torch.empty(numel, dtype=torch.int32, device=device)
    return buffer


def scratch_bytes() -> int:
    """Bytes held by the shared block-list scratch buffers (not per layer)."""
    return sum(b.numel() * b.element_size() for b in _SCRATCH.values())


def block_lists(keep: torch.Tensor, kept: torch.Tensor, k_tiles: int, valid_tiles: torch.Tensor | None):
    """flash-attn-4 "full block" lists of the read list: ``(count [B, H, QT], index [B, H, QT, KT])``, int32.

    ``index`` is a view of the shared scratch buffer: valid until the next call on this device.
    Also writes the number of listed tiles into ``kept``.
    """
    batch, heads, q_tiles, n_words = keep.shape
    rows = batch * heads * q_tiles
    buffer = _scratch(keep.device, rows * (k_tiles + 1))
    count, index = buffer[:rows], buffer[rows : rows * (k_tiles + 1)]
    kept.zero_()
    _block_list_kernel[(rows,)](
        keep, valid_tiles if valid_tiles is not None else count, index, count, kept, q_tiles, k_tiles, n_words, heads,
        KT_POW2=max(16, triton.next_power_of_2(k_tiles)), HAS_KEY_MASK=valid_tiles is not None,
        num_warps=4 if k_tiles <= 1024 else 8,
    )
    return count.view(batch, heads, q_tiles), index.view(batch, heads, q_tiles, k_tiles)


def _prefix_lengths(key_valid: torch.Tensor | None) -> torch.Tensor | None | bool:
    """int32 valid key lengths when ``key_valid`` is a prefix mask, ``None`` without a mask, ``False`` otherwise."""
    if key_valid is None:
        return None
    lengths = key_valid.sum(-1, dtype=torch.int32)
    prefix = torch.arange(key_valid.shape[-1], device=key_valid.device)[None, :] < lengths[:, None]
    return lengths if torch.equal(prefix, key_valid) else False


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
    """Same contract as :func:`~litepatch.kernels.reference.reference_forward` for voting calls; a read-only
    call (``threshold=-inf``) computes the read list and leaves ``keep`` and ``anchor`` unchanged."""
    lengths = _prefix_lengths(key_valid)
    if threshold > -math.inf or lengths is False or (block_m, block_n) != (TILES.block_m, TILES.block_n):
        return triton_forward(
            q, k, v, keep, anchor, kept, must_q, must_k, key_valid, block_m=block_m, block_n=block_n,
            threshold=threshold, softmax_scale=softmax_scale, use_anchor=use_anchor, descending=descending,
        )
    k_tiles = math.ceil(k.shape[1] / block_n)
    valid_tiles = None if key_valid is None else tile_valid(key_valid, block_n, k_tiles)
    count, index = block_lists(keep, kept, k_tiles, valid_tiles)
    no_mask_cnt, no_mask_idx = _no_masked_blocks(q.device, count.shape[-1])
    sparse = BlockSparseTensorsTorch(
        mask_block_cnt=no_mask_cnt, mask_block_idx=no_mask_idx,
        full_block_cnt=count, full_block_idx=index, block_size=(block_m, block_n),
    )
    out, lse = _fa4._flash_attn_fwd(
        q, k, v, softmax_scale=softmax_scale, seqused_k=lengths, block_sparse_tensors=sparse, return_lse=True,
    )[:2]
    return out, lse


def flash_attn_4_dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """flash-attn-4's dense SM90 forward on ``[B, S, H, D]``; ``key_mask`` must be a prefix mask (or ``None``)."""
    lengths = None if key_mask is None else key_mask.sum(-1, dtype=torch.int32)
    return _fa4._flash_attn_fwd(q, k, v, softmax_scale=softmax_scale, seqused_k=lengths)[0]


_NO_MASKED: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _no_masked_blocks(device: torch.device, q_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """flash-attn-4's "masked block" lists, empty: int32 zeros ``[1, 1, QT]`` and ``[1, 1, QT, 1]``
    (batch and heads broadcast)."""
    if (device, q_tiles) not in _NO_MASKED:
        _NO_MASKED[device, q_tiles] = (torch.zeros(1, 1, q_tiles, dtype=torch.int32, device=device),
                                       torch.zeros(1, 1, q_tiles, 1, dtype=torch.int32, device=device))
    return _NO_MASKED[device, q_tiles]


cute_forward.dense = flash_attn_4_dense  # type: ignore[attr-defined]  (used by litepatch.kernels.dense)
register_backend(Backend("cute", cute_forward, lambda head_dim: TILES, CONSTRAINTS))
