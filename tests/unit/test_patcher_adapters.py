"""Adapters (issue 13): nn.MultiheadAttention, timm, user adapters, classes without source, bounded branches,
one tile definition per layer, recipes from a handle, loud warnings when attention is out of reach."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import tiny_models as tm

import litepatch
from litepatch import context
from litepatch.adapters import Adapter, registered_adapters
from litepatch.kernels import registry
from litepatch.kernels.reference import reference_forward
from litepatch.kernels.registry import Backend, Constraints
from litepatch.kernels.state import TileConfig


def _run(model, inputs, **changes):
    with torch.no_grad():
        out = model(**{**inputs, **changes})
    return out[0] if isinstance(out, tuple) else out


def _messages(caught) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("litepatch")]


# ------------------------------------------------------------------------------ nn.MultiheadAttention
def test_multihead_attention_self_and_cross_classified_and_self_routed():
    model, inputs = tm.mha_dit()
    infos = {i.name: i for i in litepatch.inspect(model)}
    assert {n: i.kind for n, i in infos.items()} == {
        "blocks.0.attn": "self", "blocks.0.cross_attn": "cross",
        "blocks.1.attn": "self", "blocks.1.cross_attn": "cross"}
    assert infos["blocks.0.attn"].adapter == "nn.MultiheadAttention" and infos["blocks.0.attn"].head_dim == 32
    reference = _run(model, inputs)
    handle = litepatch.apply(model, threshold=tm.NOTHING_DROPPED)
    torch.testing.assert_close(_run(model, inputs), reference, rtol=1e-5, atol=1e-5)
    records = handle.stats().records
    assert [r["layer"] for r in records] == ["blocks.0.attn", "blocks.1.attn"] and not any(r["dense"] for r in records)
    handle.configure(threshold=0.0)
    for t in (999.0, 900.0, 800.0):
        _run(model, inputs, t=torch.tensor([t]))
    assert handle.stats().per_step()[2] < 1.0  # the fused fast path is routed: tiles are skipped
    handle.remove()
    assert torch.equal(_run(model, inputs), reference)


def test_multihead_attention_key_padding_mask_is_sparse_and_need_weights_falls_back_once():
    model, inputs = tm.mha_dit()
    padding = torch.zeros(1, inputs["x"].shape[1], dtype=torch.bool)
    padding[:, -40:] = True  # PyTorch's convention: True = padding
    reference = _run(model, inputs, key_padding_mask=padding)
    handle = litepatch.apply(model, threshold=tm.NOTHING_DROPPED)
    torch.testing.assert_close(_run(model, inputs, key_padding_mask=padding), reference, rtol=1e-5, atol=1e-5)
    assert not any(r["dense"] for r in handle.stats().records)
    handle.remove()

    attn = nn.MultiheadAttention(32, 2, batch_first=True).eval()
    x = torch.randn(1, 200, 32)
    expected = attn(x, x, x)  # need_weights=True by default
    handle = litepatch.apply(attn, threshold=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            out, weights = attn(x, x, x)
    assert torch.equal(out, expected[0]) and weights is not None
    messages = _messages(caught)
    assert len(messages) == 1 and "need_weights=False" in messages[0]
    handle.remove()


# ------------------------------------------------------------------------------------ timm, no source
def test_timm_fused_attn_false_is_out_of_reach_with_the_fix():
    model = tm.TimmStyleViT()
    model.blocks[1]["attn"].fused_attn = False
    infos = litepatch.inspect(model)
    assert [i.sparse for i in infos] == [True, False]
    assert "fused_attn = True" in infos[1].out_of_reach
    with pytest.warns(UserWarning, match=r"blocks\.1\.attn stays dense: .*fused_attn = True"):
        handle = litepatch.apply(model)
    assert handle.layers == ["blocks.0.attn"]
    handle.remove()


def test_attention_defined_without_source_is_found_from_its_bytecode():
    namespace = {"nn": nn, "F": F}
    exec(  # no source file: inspect.getsource fails on these methods
        "class ExecAttention(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.num_heads, self.qkv_proj = 2, nn.Linear(64, 192)\n"
        "    def forward(self, x):\n"
        "        b, s, _ = x.shape\n"
        "        q, k, v = self.qkv_proj(x).view(b, s, 3, 2, 32).permute(2, 0, 3, 1, 4)\n"
        "        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, 64)\n",
        namespace,
    )
    model = nn.Sequential(namespace["ExecAttention"]()).eval()
    assert [(i.name, i.kind, i.adapter) for i in litepatch.inspect(model)] == [("0", "self", "sdpa-call")]
    x = torch.randn(1, 256, 64)
    reference = _run(model, {"input": x})
    handle = litepatch.apply(model, threshold=tm.NOTHING_DROPPED)
    torch.testing.assert_close(_run(model, {"input": x}), reference, rtol=1e-5, atol=1e-5)
    assert len(handle.stats().records) == 1
    handle.remove()


# ---------------------------------------------------------------------------------------- user adapter
class ManualAttention(nn.Module):
    """Softmax attention written out by hand: no built-in adapter can reach it."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, d // 2).unbind(2)
        return self.attention(q, k, v).reshape(b, s, d)

    def attention(self, q, k, v):  # [B, S, H, D]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


class ManualAttentionAdapter(Adapter):
    name = "manual-attention"

    def matches(self, module, name):
        return isinstance(module, ManualAttention)

    def install(self, module, layer):
        original = module.attention

        def attention(q, k, v):
            layer.entered = True
            out = layer.attend(litepatch.adapters.AttentionCall(q, k, v, hidden_tokens=q.shape[1]))
            return original(q, k, v) if out is None else out

        module.attention = attention
        return lambda: module.__dict__.pop("attention", None)


def test_a_user_adapter_finds_intercepts_and_is_removed():
    model = nn.Sequential(ManualAttention(), ManualAttention()).eval()
    assert litepatch.inspect(model) == []
    infos = litepatch.inspect(model, adapter=ManualAttentionAdapter())
    assert [(i.name, i.kind, i.adapter) for i in infos] == [("0", "self", "manual-attention"),
                                                            ("1", "self", "manual-attention")]
    x = torch.randn(1, 256, 64)
    reference = _run(model, {"input": x})
    handle = litepatch.apply(model, threshold=tm.NOTHING_DROPPED, adapter=ManualAttentionAdapter())
    torch.testing.assert_close(_run(model, {"input": x}), reference, rtol=1e-5, atol=1e-5)
    assert [r["layer"] for r in handle.stats().records] == ["0", "1"]
    handle.remove()
    assert "attention" not in vars(model[0]) and torch.equal(_run(model, {"input": x}), reference)
    assert "manual-attention" not in [a.name for a in registered_adapters()]  # apply(adapter=) registers nothing
    with pytest.raises(TypeError, match="litepatch.adapters.Adapter instance"):
        litepatch.apply(model, adapter=object())
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        litepatch.apply(model, adapter="nope")


# ---------------------------------------------------------------------------------------- branches
def test_repeated_calls_at_one_timestep_reuse_one_branch_and_get_sparse():
    """A user timing one step: 60 calls with the same inputs are one branch, sparse from the second call."""
    model, inputs = tm.wan_style()
    handle = litepatch.apply(model, threshold=0.0)
    for _ in range(60):
        _run(model, inputs)
    layer = model.blocks[1].self_attn._litepatch
    assert list(layer.states) == [0]
    records = [r for r in handle.stats().records if r["layer"] == layer.name]
    assert len(records) == 60 and {r["branch"] for r in records} == {0} and not any(r["dense"] for r in records)
    assert records[0]["kept_fraction"] == 1.0 and records[-1]["kept_fraction"] < 1.0
    handle.remove()


def test_sequential_cfg_at_one_timestep_keeps_two_branches_however_often_it_repeats():
    model, inputs = tm.wan_style()
    uncond = dict(inputs, context=torch.zeros_like(inputs["context"]))
    handle = litepatch.apply(model, threshold=0.0)
    for _ in range(30):
        _run(model, inputs)
        _run(model, uncond)
    assert sorted(model.blocks[0].self_attn._litepatch.states) == [0, 1]
    assert [r["branch"] for r in handle.stats().records][:4] == [0, 0, 1, 1]
    handle.remove()


def test_new_inputs_at_one_timestep_are_bounded_with_one_warning():
    model, inputs = tm.wan_style()
    handle = litepatch.apply(model, threshold=-6.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3 * context.MAX_BRANCHES):
            _run(model, inputs, context=torch.randn_like(inputs["context"]))
    assert len(model.blocks[0].self_attn._litepatch.states) == context.MAX_BRANCHES
    messages = _messages(caught)
    assert len(messages) == 1 and "share the skip states" in messages[0]
    handle.remove()


# ------------------------------------------------------------------------------------------- tiles
@pytest.fixture
def coarse_tiles_backend():
    """A CPU backend with 64x32 tiles (the reference's forward), so tiles differ from the reference's 128x64."""
    name = "test-64x32"
    registry.register_backend(Backend(
        name=name, forward=reference_forward, tiles=lambda head_dim: TileConfig(64, 32),
        constraints=Constraints(device_types=("cpu",), dtypes=(torch.float32,))))
    yield name
    registry._REGISTERED.pop(name, None)


def test_dense_and_sparse_records_of_a_layer_count_the_tiles_of_the_backend_that_runs(coarse_tiles_backend):
    model, inputs = tm.wan_style(seq=300)
    handle = litepatch.apply(model, threshold=-2.0, warmup_steps=1, backend=coarse_tiles_backend)
    for t in (999.0, 900.0, 800.0):
        _run(model, inputs, t=torch.tensor([t]))
    records = [r for r in handle.stats().records if r["layer"] == "blocks.0.self_attn"]
    assert [r["dense"] for r in records] == [True, False, False]
    expected = 1 * 2 * math.ceil(300 / 64) * math.ceil(300 / 32)  # B x H x q tiles x k tiles, 64x32
    assert [r["total_tiles"] for r in records] == [expected] * 3
    state = model.blocks[0].self_attn._litepatch.states[0]
    assert state.tiles == TileConfig(64, 32)
    handle.remove()


# ------------------------------------------------------------------------------------------ recipes
def test_to_recipe_round_trips_through_a_file_and_gives_the_same_behaviour(tmp_path):
    from litepatch import recipes

    model, inputs = tm.wan_style()
    handle = litepatch.apply(model, threshold=0.0, warmup_steps=1, order="alternate",
                             layers={"blocks.1.*": -3.0})
    outs = [_run(model, inputs, t=torch.tensor([t])) for t in (999.0, 900.0, 800.0)]
    records = handle.stats().records
    kept = [r["kept_tiles"] for r in records]
    recipe = handle.to_recipe("wan-style-manual")
    handle.remove()
    assert recipe.name == "wan-style-manual" and recipe.fingerprint == litepatch.fingerprint(model)
    assert (recipe.threshold, recipe.warmup_steps, recipe.order) == (0.0, 1, "alternate")
    assert recipe.layers["blocks.1.*"].threshold == -3.0
    assert recipe.measured.kept_fraction == pytest.approx(sum(kept) / sum(r["total_tiles"] for r in records))
    assert 0.0 < recipe.measured.kept_fraction < 1.0
    path = recipes.save(recipe, tmp_path / "manual.yaml")

    again = litepatch.apply(model, recipe=str(path))
    outs_again = [_run(model, inputs, t=torch.tensor([t])) for t in (999.0, 900.0, 800.0)]
    assert [r["kept_tiles"] for r in again.stats().records] == kept
    assert all(torch.equal(a, b) for a, b in zip(outs, outs_again))
    again.remove()
    other, _ = tm.wan_style(seed=1)
    other.blocks = other.blocks[:1]
    with pytest.raises(ValueError, match="blocks.1"):  # a recipe for another model is refused
        litepatch.apply(other, recipe=str(path))


def test_inspect_cli_saves_a_recipe(tmp_path, capsys):
    from litepatch import recipes
    from litepatch.cli import main

    path = tmp_path / "r.yaml"
    code = main(["inspect", "--model", "tiny_models:wan_style", "--save-recipe", str(path), "--threshold", "-4",
                 "--warmup-steps", "2", "--name", "hand-tuned"])
    assert code == 0 and f"recipe written to {path}" in capsys.readouterr().out
    recipe = recipes.load(path)
    assert (recipe.name, recipe.threshold, recipe.warmup_steps) == ("hand-tuned", -4.0, 2)
    assert recipe.fingerprint.layer_names == ["blocks.0.self_attn", "blocks.1.self_attn"]


# ------------------------------------------------------------------------------------ out of reach
def test_diffusers_attention_backends_are_reached_through_dispatch():
    pytest.importorskip("diffusers")
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    model, inputs = tm.wan_diffusers()
    active = _AttentionBackendRegistry._active_backend  # set_attention_backend also sets diffusers' global one
    try:
        model.set_attention_backend("flex")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = _run(model, inputs)
            handle = litepatch.apply(model, threshold=-6.0, warmup_steps=1)
            assert torch.equal(_run(model, inputs), reference)  # warm-up runs the chosen backend
            _run(model, inputs, timestep=torch.tensor([500]))
        records = handle.stats().records
        assert [r["dense"] for r in records] == [True, True, False, False]
        handle.remove()
    finally:
        model.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(active)


def test_a_processor_replaced_after_apply_warns_once_naming_the_layer():
    pytest.importorskip("diffusers")
    from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor

    model, inputs = tm.ltx_video()
    handle = litepatch.apply(model, threshold=-6.0)
    model.transformer_blocks[0].attn1.set_processor(LTXVideoAttnProcessor())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in (999, 900, 800):
            _run(model, inputs, timestep=torch.tensor([t]))
    messages = _messages(caught)
    assert len(messages) == 1 and "transformer_blocks.0.attn1" in messages[0] and "replaced" in messages[0]
    handle.remove()


class SometimesManual(nn.Module):
    """Calls SDPA, or (``manual=True``) computes the softmax itself, where no interception sees it."""

    def __init__(self):
        super().__init__()
        self.num_heads, self.qkv, self.manual = 2, nn.Linear(64, 192), False

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 32).permute(2, 0, 3, 1, 4)
        if self.manual:
            out = (q @ k.transpose(-1, -2) / math.sqrt(32)).softmax(-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(b, s, 64)


def test_a_layer_whose_attention_bypasses_the_interception_warns_at_run_time():
    model = nn.Sequential(SometimesManual(), SometimesManual()).eval()
    handle = litepatch.apply(model)
    model[1].manual = True
    x = torch.randn(1, 64, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            _run(model, {"input": x})
    messages = _messages(caught)
    assert len(messages) == 1 and messages[0].startswith("litepatch: 1 ran but none of its attention calls")
    handle.remove()


@pytest.mark.parametrize("layout, ranges", [(None, ((0, 12), (288, 300))), ("first", ((0, 12),))])
def test_hand_written_joint_attention_protects_the_text_tokens(layout, ranges):
    torch.manual_seed(0)
    model = tm.HandWrittenJointAttention(text_layout=layout).eval()
    x, context = torch.randn(1, 288, 64), torch.randn(1, 12, 64)
    reference = _run(model, {"x": x, "context": context})
    handle = litepatch.apply(model, threshold=0.0)
    for _ in range(2):
        _run(model, {"x": x, "context": context})
    state = handle.skip_states()[""][0]
    assert state.must_compute_keys == ranges and state.must_compute_queries == ranges
    handle.configure(threshold=tm.NOTHING_DROPPED)
    torch.testing.assert_close(_run(model, {"x": x, "context": context}), reference, rtol=1e-5, atol=1e-5)
    handle.remove()


def test_calls_that_differ_only_in_a_flag_are_separate_branches():
    """Skip-layer guidance passes the same tensors with another argument: a branch of its own."""

    class Flagged(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, _ = tm.wan_style()

        def forward(self, x, t, context, skip_layers=None):
            return self.inner(x, t, context)

    model = Flagged().eval()
    _, inputs = tm.wan_style()
    handle = litepatch.apply(model, threshold=-6.0)
    for _ in range(3):
        _run(model, inputs)
        _run(model, inputs, skip_layers=[1])
        _run(model, inputs, skip_layers=[1])  # equal value, new list: the same branch
    assert [r["branch"] for r in handle.stats().records if r["layer"] == "inner.blocks.0.self_attn"] == [0, 1, 1] * 3
    handle.remove()


def test_bad_adapters_are_refused_with_a_clear_error():
    from litepatch.adapters import register_adapter

    class Nameless(Adapter):
        name = ""

    class NoMatches(Adapter):
        name = "no-matches"

    with pytest.raises(ValueError, match="needs a non-empty name"):
        register_adapter(Nameless())
    with pytest.raises(NotImplementedError, match=r"NoMatches must define matches\(module, name\)"):
        litepatch.inspect(tm.TimmStyleViT(), adapter=NoMatches())
    assert [a.name for a in registered_adapters()] == ["diffusers", "nn.MultiheadAttention", "timm-style", "sdpa-call"]


@pytest.mark.parametrize("layout, root_text, ranges", [
    ("first", 8, [(0, 8)]), ("last", 8, [(56, 64)]), ("unknown", 8, [(0, 8), (56, 64)]),
    ("interleaved", 8, None), ("last", None, None),
])
def test_single_stream_joint_calls_protect_the_text_only_where_a_range_holds_it(layout, root_text, ranges):
    """Z-Image's unified layers (caption length unknown) and Qwen-Image 2.1's interleaved text run dense."""
    from litepatch.adapters.base import AttentionLayerInfo, call_kind

    info = AttentionLayerInfo("layers.0.attention", "joint", 2, 64, "Attention", "test", True, text_layout=layout,
                              single_stream=True)
    kind = call_kind(info, 64, 64, None, None, root_text)
    assert kind.kind == "joint"
    assert (kind.text_ranges or None) == ranges
    if ranges is None:
        assert "interleaved" in kind.why or "unknown" in kind.why
