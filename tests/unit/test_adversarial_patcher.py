"""The patcher against what users do to patched models: deepcopy, pickle, nested or repeated apply, dtype moves."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import tiny_models as tm

import litepatch


_run = tm.run_at


def _litepatch_attrs(model) -> dict:
    names = ("forward", "_litepatch", "_litepatch_root", "__deepcopy__", "__reduce_ex__", "cache_context")
    return {n: sorted(k for k in vars(m) if k in names) for n, m in model.named_modules() if any(
        k in vars(m) for k in names)}


def test_deepcopy_of_a_patched_model_is_an_independent_unpatched_copy():
    model, inputs = tm.wan_style()
    reference = _run(model, inputs)
    handle = litepatch.apply(model, threshold=0.0)
    for t in (999, 900):
        _run(model, inputs, t)
    with pytest.warns(UserWarning, match="unpatched copy"):
        twin = copy.deepcopy(model)
    assert _litepatch_attrs(twin) == {} and not twin._forward_pre_hooks and not twin._forward_hooks
    records = len(handle.stats().records)
    torch.testing.assert_close(_run(twin, inputs), reference, rtol=0, atol=0)  # dense, exactly the original model
    assert len(handle.stats().records) == records  # the copy records nothing into the original's handle
    _run(model, inputs, 800)  # the original stays patched and keeps its schedule
    assert handle.step == 2 and len(handle.stats().records) == records + 2
    twin_handle = litepatch.apply(twin, threshold=0.0)  # the copy can be patched on its own
    _run(twin, inputs, 999)
    assert twin_handle.step == 0 and handle.step == 2
    handle.remove()
    assert "_litepatch" not in vars(model.blocks[0].self_attn)
    assert "_litepatch" in vars(twin.blocks[0].self_attn)  # the copy's own patch survives the original's removal
    twin_handle.remove()
    assert _litepatch_attrs(twin) == {}


def test_deepcopy_of_a_patched_diffusers_model_and_of_a_block_inside_it():
    pytest.importorskip("diffusers")
    model, inputs = tm.wan_diffusers()
    with torch.no_grad():
        reference = model(**inputs)[0]
    handle = litepatch.apply(model, threshold=-6.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = copy.deepcopy(model)
        block = copy.deepcopy(model.blocks[0])
    assert _litepatch_attrs(twin) == {} and _litepatch_attrs(block) == {}
    assert type(twin.blocks[0].attn1.processor).__name__ == "WanAttnProcessor"
    with torch.no_grad():
        assert torch.equal(twin(**inputs)[0], reference)
    handle.remove()


def test_pickling_a_patched_model_raises_a_clear_error():
    model, _ = tm.wan_style()
    handle = litepatch.apply(model)
    with pytest.raises(TypeError, match=r"patched by litepatch and cannot be pickled.*handle\.remove\(\)"):
        pickle.dumps(model)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(model.blocks[0])  # a part holding a patched layer
    handle.remove()
    assert pickle.loads(pickle.dumps(model)) is not None


def test_nested_or_repeated_apply_on_parts_is_refused_or_fully_undone():
    model, inputs = tm.wan_style()
    reference = _run(model, inputs)
    before = _litepatch_attrs(model)
    handle = litepatch.apply(model, threshold=-6.0)
    with pytest.raises(ValueError, match=r"module 'self_attn' is already patched"):
        litepatch.apply(model.blocks[0])  # a part of a patched model
    inner = model.blocks[1]
    handle.remove()
    part = litepatch.apply(inner, threshold=-6.0)
    with pytest.raises(ValueError, match="already patched"):
        litepatch.apply(model)  # the whole model, while a part of it is patched
    forced = litepatch.apply(model, threshold=-6.0, force=True)  # removes the part's patch first
    assert not part.active and forced.layers == ["blocks.0.self_attn", "blocks.1.self_attn"]
    _run(model, inputs)
    forced.remove()
    assert _litepatch_attrs(model) == before
    assert torch.equal(_run(model, inputs), reference)


def test_dtype_moves_after_apply_keep_working():
    torch.manual_seed(0)
    model = tm.TimmStyleViT().eval()
    x = torch.randn(1, 300, 64)
    expected = _run(model.to(torch.bfloat16), {"x": x.to(torch.bfloat16)})
    model.float()
    handle = litepatch.apply(model, threshold=tm.NOTHING_DROPPED)
    _run(model, {"x": x})
    model.to(torch.bfloat16)  # moved while patched
    out = _run(model, {"x": x.to(torch.bfloat16)})
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    model.float()  # and back
    torch.testing.assert_close(_run(model, {"x": x}), _run(model, {"x": x}))
    records = handle.stats().records
    assert len(records) == 8 and not any(r["dense"] for r in records)  # the kernel took the bf16 calls too
    handle.remove()
    assert _litepatch_attrs(model) == {}
