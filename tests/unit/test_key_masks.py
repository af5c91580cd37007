"""What the GPU backends derive from a key mask is made once per mask, and never outlives a change to the mask."""

from __future__ import annotations

import torch

from litepatch.kernels.key_masks import mask_bytes, mask_facts, mask_tiles, tile_valid


def test_tile_validity_marks_tiles_with_a_valid_key():
    mask = torch.arange(300)[None] < torch.tensor([[200], [10]])
    assert tile_valid(mask, 128, 3).tolist() == [[1, 1, 0], [1, 0, 0]]
    assert torch.equal(mask_tiles(mask, 128, 3), tile_valid(mask, 128, 3))
    assert torch.equal(mask_bytes(mask), mask.to(torch.uint8))


def test_derived_tensors_are_kept_per_mask_until_it_is_written():
    mask = torch.arange(300)[None] < 200
    first = mask_tiles(mask, 128, 3)
    assert mask_tiles(mask.view(1, 300), 128, 3) is first, "a view of the same mask is the same mask"
    mask[0, 150:] = False  # an in-place write bumps the version counter
    again = mask_tiles(mask, 128, 3)
    assert again is not first and again.tolist() == [[1, 1, 0]]
    mask[0, 100:] = False
    assert mask_tiles(mask, 128, 3).tolist() == [[1, 0, 0]]


def test_inference_tensors_are_derived_again_on_every_call():
    """They carry no version counter, so an in-place write could not be seen: nothing derived is kept."""
    with torch.inference_mode():
        mask = torch.arange(300)[None] < 200
        assert mask_facts(mask) == {}
        assert mask_tiles(mask, 128, 3).tolist() == [[1, 1, 0]]
        mask[0, 100:] = False
        assert mask_tiles(mask, 128, 3).tolist() == [[1, 0, 0]]
        assert mask_facts(mask) == {}
