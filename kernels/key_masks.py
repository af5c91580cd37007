"""What the GPU backends derive from a key-padding mask, made once per mask (no Triton import: CPU-testable).

A model passes the same boolean key mask (``[B, seq_k]``, True: the key takes part) to every layer of a forward,
and each backend turns it into smaller tensors: which key tiles hold a valid key (:func:`mask_tiles`), the mask as
bytes (:func:`mask_bytes`), whether it is a prefix mask and its lengths (``cute_fwd``). :func:`mask_facts` keeps
those per mask, for the last few masks.

Example:
    >>> mask_tiles(torch.arange(300)[None] < 200, block_n=128, k_tiles=3)
    tensor([[1, 1, 0]], dtype=torch.uint8)
"""

from __future__ import annotations

import torch

_MASK_FACTS: list[tuple[torch.Tensor, tuple, dict]] = []  # a few recent masks, held alive, with what was derived


def mask_facts(key_valid: torch.Tensor) -> dict:
    """What has been derived from the key mask ``key_valid`` so far (a dict to fill).

    The cache holds the mask tensors themselves (their memory cannot be reused while cached) and keys them by
    storage, view and version counter, so an in-place write invalidates. Inference tensors (made under
    ``torch.inference_mode``) have no version counter: an in-place write could not be seen, so nothing derived from
    them is kept, and each call derives it again (on the CuTe path that includes the prefix test's device sync).
    """
    if key_valid.is_inference():
        return {}
    key = (key_valid.untyped_storage().data_ptr(), key_valid.storage_offset(), tuple(key_valid.shape),
           key_valid.stride(), key_valid._version)
    for held, held_key, facts in _MASK_FACTS:
        if held_key == key:
            return facts
    facts = {}
    _MASK_FACTS.insert(0, (key_valid, key, facts))
    del _MASK_FACTS[4:]
    return facts


def tile_valid(key_valid: torch.Tensor, block_n: int, k_tiles: int) -> torch.Tensor:
    """uint8 ``[B, k_tiles]``: 1 where the key tile holds at least one valid key."""
    padded = key_valid.new_zeros(key_valid.shape[0], k_tiles * block_n)
    padded[:, : key_valid.shape[1]] = key_valid
    return padded.view(-1, k_tiles, block_n).any(-1).to(torch.uint8)


def mask_tiles(key_valid: torch.Tensor, block_n: int, k_tiles: int) -> torch.Tensor:
    """:func:`tile_valid`, made once per mask and tile size (four small kernels otherwise, per layer and call)."""
    facts = mask_facts(key_valid)
    if (block_n, k_tiles) not in facts:
        facts[block_n, k_tiles] = tile_valid(key_valid, block_n, k_tiles)
    return facts[block_n, k_tiles]


def mask_bytes(key_valid: torch.Tensor) -> torch.Tensor:
    """``key_valid`` as contiguous uint8 (what the Triton attention kernel reads), made once per mask."""
    facts = mask_facts(key_valid)
    if "bytes" not in facts:
        facts["bytes"] = key_valid.to(torch.uint8).contiguous()
    return facts["bytes"]
