"""CuTe-DSL LiteAttention backend for Hopper (sm90), built on flash-attn-4 as a library.

Every call with the backend's tiles (:func:`tiles_for_head_dim`: 128 key rows; 192 query rows at head dim 64, 128
above) is one launch of :class:`~litepatch.kernels.cute_sm90.LiteAttentionForwardSm90`, flash-attn-4's SM90 forward
with the skip vote inside each tile's online softmax, which reads the skip state itself (each q-tile's read list in
the visiting order) and writes the next one (the commit, on an idle producer warp). Between the consumers and the
commit, votes and anchor candidates go through one zeroed int32 scratch buffer per device shared by every layer
(:func:`scratch_bytes`); the kernel leaves it zero again, so no launch prepares it.

Key-padding masks: prefix masks (valid keys then padding per batch row, the text mask of HunyuanVideo and
Qwen-Image) become flash-attn-4's ``seqused_k``; tiles past a row's length are not read. Other masks,
and other tile sizes, run the Triton kernel (:mod:`litepatch.kernels.triton_fwd`) at the state's tile sizes (it takes
192-row query tiles too), so the state layout stays the same. Dense calls (:func:`flash_attn_4_dense`, reached through
:func:`litepatch.kernels.dense_attention`) run flash-attn-4's plain forward.

Requires ``pip install "litepatch[cuda]"`` (flash-attn-4 4.0.0b36, nvidia-cutlass-dsl 4.8.1). The first call
per configuration (dtype, head dim, vote on/off, visiting order, key lengths or not) JIT-compiles in a few seconds
(:data:`~litepatch.kernels.cute_sm90.COMPILE_SECONDS`); ``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1`` (set
by default here) keeps compiled kernels on disk between processes.

Example:
    >>> out = lite_attention(q, k, v, state, threshold=-6.0, backend="cute")
"""

from __future__ import annotations

import torch
from flash_attn.cute import interface as _fa4

from .cute_sm90 import TILE_N, run_dense_sm90, run_sm90, scratch_words, tile_m_for
from .key_masks import mask_facts
from .registry import Backend, Constraints, register_backend
from .state import TileConfig
from .triton_fwd import MAX_K_TILES, triton_forward

HEAD_DIMS = (64, 128)  # verified on the H200; 96 compiles (mma_pv_is_rs off) but has not run there
CONSTRAINTS = Constraints(
    device_types=("cuda",),
    dtypes=(torch.float16, torch.bfloat16),
    head_dims=HEAD_DIMS,
    cuda_archs=(9,),  # verified on sm90 (H100/H200) only
    max_k_tiles=MAX_K_TILES,
)


_TILES = {tile_m: TileConfig(tile_m, TILE_N) for tile_m in {tile_m_for(64), tile_m_for(128)}}


def tiles_for_head_dim(head_dim: int) -> TileConfig:
    """The backend's tiles (they fix the skip-state layout): those of its kernel at ``head_dim``.

    Asked on every call, so it returns a prebuilt config rather than building one (no ``functools.cache``:
    torch 2.11's dynamo binds a cached function kept in a dataclass field as a method, a fullgraph break).

    >>> tiles_for_head_dim(128), tiles_for_head_dim(64)
    (TileConfig(block_m=128, block_n=128), TileConfig(block_m=192, block_n=128))
    """
    return _TILES[tile_m_for(head_dim)]


_SCRATCH: dict[torch.device, torch.Tensor] = {}


def _scratch(device: torch.device, words: int) -> torch.Tensor:
    """The int32 ``[2, >= words]`` buffer of ``device`` shared by every layer and call (:func:`scratch_words`: each
    call's kernel leaves row 0 zero)."""
    buffer = _SCRATCH.get(device)
    if buffer is None or buffer.shape[1] < words:
        buffer = _SCRATCH[device] = torch.zeros(2, words, dtype=torch.int32, device=device)
    return buffer


def scratch_bytes() -> int:
    """Bytes held by the shared scratch buffers (anchor slots, vote words and visiting orders of one call; not per
    layer)."""
    return sum(b.numel() * b.element_size() for b in _SCRATCH.values())


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


_ORDERS = {(True, False): "anchor", (True, True): "anchor", (False, False): "ascending", (False, True): "descending"}


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
    batch, heads, q_tiles, n_words = keep.shape
    scratch = _scratch(q.device, scratch_words(batch * heads * q_tiles, n_words))
    return run_sm90(q, k, v, keep, anchor, kept, must_q, must_k, scratch, softmax_scale=softmax_scale,
                    threshold=threshold, seqused_k=lengths, order=_ORDERS[use_anchor, descending])


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


cute_forward.dense = flash_attn_4_dense  # type: ignore[attr-defined]  (used by litepatch.kernels.dense)
register_backend(Backend("cute", cute_forward, tiles_for_head_dim, CONSTRAINTS))
