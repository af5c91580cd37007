"""The patcher on tiny random-weight models built from the real diffusers classes, and on hand-written
Wan-style / timm-style modules that call SDPA themselves (CPU, fp32)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import tiny_models as tm

import litepatch

pytest.importorskip("diffusers")

# model -> {layer name: kind} for every attention layer litepatch must find.
EXPECTED = {
    "wan_style": {f"blocks.{i}.{a}": k for i in range(2) for a, k in (("self_attn", "self"), ("cross_attn", "cross"))},
    "wan": {f"blocks.{i}.{a}": k for i in range(2) for a, k in (("attn1", "self"), ("attn2", "cross"))},
    "cogvideox": {"transformer_blocks.0.attn1": "joint"},
    "hunyuan_video": {
        "context_embedder.token_refiner.refiner_blocks.0.attn": "self",
        "transformer_blocks.0.attn": "joint",
        "single_transformer_blocks.0.attn": "joint",
    },
    "ltx_video": {"transformer_blocks.0.attn1": "self", "transformer_blocks.0.attn2": "cross"},
    "flux": {"transformer_blocks.0.attn": "joint", "single_transformer_blocks.0.attn": "joint"},
    "sd3": {"transformer_blocks.0.attn": "joint", "transformer_blocks.1.attn": "joint"},
    "mochi": {"time_embed.pooler": "cross", "transformer_blocks.0.attn1": "joint"},
    "qwen_image": {"transformer_blocks.0.attn": "joint"},
    "lumina2": {"noise_refiner.0.attn": "self", "context_refiner.0.attn": "self", "layers.0.attn": "joint"},
    "pixart": {"transformer_blocks.0.attn1": "self", "transformer_blocks.0.attn2": "cross"},
    "chroma": {"transformer_blocks.0.attn": "joint", "single_transformer_blocks.0.attn": "joint"},
    "flux2": {"transformer_blocks.0.attn": "joint", "single_transformer_blocks.0.attn": "joint"},
    "skyreels_v2": {"blocks.0.attn1": "self", "blocks.0.attn2": "cross"},
    "auraflow": {"joint_transformer_blocks.0.attn": "joint", "single_transformer_blocks.0.attn": "joint"},
    "cogview4": {"transformer_blocks.0.attn1": "joint"},
    "allegro": {"transformer_blocks.0.attn1": "self", "transformer_blocks.0.attn2": "cross"},
    "wan_vace": {f"{p}.{i}.{a}": k for p, n in (("blocks", 2), ("vace_blocks", 1)) for i in range(n)
                 for a, k in (("attn1", "self"), ("attn2", "cross"))},
    "latte": {"transformer_blocks.0.attn1": "self", "transformer_blocks.0.attn2": "cross",
              "temporal_transformer_blocks.0.attn1": "self"},
    "hidream": {"double_stream_blocks.0.block.attn1": "joint", "single_stream_blocks.0.block.attn1": "joint"},
}
# joint layer -> the text tokens it must protect (must-compute ranges of its skip state)
TEXT_RANGES = {
    "mochi": {"transformer_blocks.0.attn1": ((384, 393),)},  # 9 valid text tokens after 384 video tokens
    "qwen_image": {"transformer_blocks.0.attn": ((0, 10),)},  # text first, 10 tokens
    "lumina2": {"layers.0.attn": ((0, 10),)},  # caption first in the unified layers
    "flux": {"transformer_blocks.0.attn": ((0, 12),), "single_transformer_blocks.0.attn": ((0, 12),)},
    "hunyuan_video": {"transformer_blocks.0.attn": ((384, 394),), "single_transformer_blocks.0.attn": ((384, 394),)},
    "chroma": {"transformer_blocks.0.attn": ((0, 12),), "single_transformer_blocks.0.attn": ((0, 12),)},
    "flux2": {"transformer_blocks.0.attn": ((0, 12),), "single_transformer_blocks.0.attn": ((0, 12),)},
    # 8 register tokens + 12 text tokens, in the double- and in the single-stream layer
    "auraflow": {"joint_transformer_blocks.0.attn": ((0, 20),), "single_transformer_blocks.0.attn": ((0, 20),)},
    "cogview4": {"transformer_blocks.0.attn1": ((0, 12),)},
    # 1024 image tokens (patchified to max_resolution), then t5 (8) + llama (6) + this block's llama layer (6)
    "hidream": {"double_stream_blocks.0.block.attn1": ((1024, 1044),),
                "single_stream_blocks.0.block.attn1": ((1024, 1044),)},
}
FACTORIES = {"wan_style": tm.wan_style, **tm.DIFFUSERS_FACTORIES}
TIMESTEPS = (999, 900, 800, 700)


def _smooth(t: torch.Tensor) -> torch.Tensor:
    """Video-like latents: low-frequency noise upsampled to the input's shape (neighbours are similar)."""
    if t.dim() >= 4:
        small = torch.randn(*t.shape[:2], *([2] * (t.dim() - 2)))
        mode = "trilinear" if t.dim() == 5 else "bilinear"
        return 3 * F.interpolate(small, size=t.shape[2:], mode=mode, align_corners=True)
    small = torch.randn(t.shape[0], 3, t.shape[2])
    return 3 * F.interpolate(small.transpose(1, 2), size=t.shape[1], mode="linear", align_corners=True).transpose(1, 2)


def _inputs_at(name: str, inputs: dict, t: int) -> dict:
    inputs = dict(inputs)
    key = next(k for k in ("t", "timesteps", "timestep") if k in inputs)
    inputs[key] = torch.tensor([t / 1000 if name == "flux" else float(t)])
    return inputs


def _run(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out[0] if isinstance(out, tuple) else out


def _snapshot(model):
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        list(model.state_dict().keys()),
        {n: sorted(vars(m)) for n, m in model.named_modules()},  # every instance attribute
        {n: id(m.__dict__.get("processor")) for n, m in model.named_modules()},  # the very processor objects
        {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()},
    )


@pytest.fixture(params=list(FACTORIES), scope="module")
def built(request):
    name = request.param
    model, inputs = FACTORIES[name]()
    torch.manual_seed(1)
    key = "x" if "x" in inputs else "hidden_states"
    inputs[key] = _smooth(inputs[key])
    return name, model, inputs


def test_every_attention_layer_found_and_classified(built):
    name, model, _ = built
    infos = litepatch.inspect(model)
    assert {i.name: i.kind for i in infos} == EXPECTED[name]
    for info in infos:
        assert info.sparse == (info.kind != "cross")
        assert info.kind == "cross" or (info.heads == 2 and info.head_dim in (16, 32)), info
        assert info.reason
    fp = litepatch.fingerprint(model)
    assert fp.layer_names == [n for n, k in EXPECTED[name].items() if k != "cross"]
    assert fp.num_layers == len(fp.layer_names) and fp.model_class == type(model).__name__


def test_threshold_minus_inf_runs_the_models_own_attention(built):
    """Nothing to skip: every call runs the model's own attention (bit for bit) and is recorded dense, with all its
    tiles (DESIGN §2: never slower than stock when nothing is skipped)."""
    name, model, inputs = built
    reference = _run(model, inputs)
    handle = litepatch.apply(model, threshold=float("-inf"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            patched = _run(model, inputs)
        records = handle.stats().records
        states = handle.skip_states()
    finally:
        handle.remove()
    assert torch.equal(patched, reference)
    assert records and all(r["dense"] and r["kept_fraction"] == 1.0 and r["total_tiles"] > 0 for r in records)
    assert {r["reason"] for r in records if not r["layer"].startswith("context_embedder")} == {
        "threshold -inf skips nothing"}
    assert not any(state.initialized for branches in states.values() for state in branches.values())


def test_kernel_path_with_nothing_dropped_equals_unpatched_and_remove_restores(built):
    name, model, inputs = built
    before = _snapshot(model)
    reference = _run(model, inputs)
    handle = litepatch.apply(model, threshold=tm.NOTHING_DROPPED)
    assert sorted(handle.layers) == sorted(n for n, k in EXPECTED[name].items() if k != "cross")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patched = _run(model, inputs)
    torch.testing.assert_close(patched, reference, rtol=1e-5, atol=1e-5)
    records = handle.stats().records
    assert {r["layer"] for r in records} == set(handle.layers)
    for r in records:  # Hunyuan's text refiner passes a per-query mask: it alone falls back
        assert r["dense"] == r["layer"].startswith("context_embedder"), r
        assert r["kept_fraction"] == 1.0
    handle.remove()
    assert _snapshot(model) == before
    assert torch.equal(_run(model, inputs), reference)


def test_aggressive_threshold_skips_tiles_without_nan(built):
    name, model, inputs = built
    handle = litepatch.apply(model, threshold=0.0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outs = [_run(model, _inputs_at(name, inputs, t)) for t in TIMESTEPS]
        stats = handle.stats()
    finally:
        handle.remove()
    assert all(torch.isfinite(o).all() for o in outs)
    per_step = stats.per_step()
    assert sorted(per_step) == [0, 1, 2, 3]
    assert per_step[0] == 1.0  # the first call computes every tile
    assert stats.kept_fraction() < 1.0, stats.table()
    assert per_step[3] <= per_step[2] <= per_step[1] and per_step[3] < 1.0  # skip lists shrink monotonically


def test_hunyuan_text_key_padding_mask_is_sparse_and_per_query_masks_fall_back_once():
    """HunyuanVideo passes its text mask on every call: as a boolean key-padding mask it goes to the kernel
    (masked keys never computed); the token refiner's per-query mask falls back, with one warning."""
    model, inputs = tm.hunyuan_video(masked=True)
    reference = _run(model, inputs)
    handle = litepatch.apply(model, threshold=tm.NOTHING_DROPPED)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [_run(model, _inputs_at("hunyuan_video", inputs, t)) for t in (999, 999, 900)]
    records = handle.stats().records
    handle.remove()
    messages = [str(w.message) for w in caught if "litepatch" in str(w.message)]
    assert len(messages) == 1 and "context_embedder" in messages[0] and "not a key-padding mask" in messages[0]
    sparse = [r for r in records if not r["layer"].startswith("context_embedder")]
    assert sparse and not any(r["dense"] for r in sparse)
    torch.testing.assert_close(outs[0], reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1], reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(TEXT_RANGES))
def test_joint_layers_protect_their_text_tokens(name):
    model, inputs = FACTORIES[name]()
    handle = litepatch.apply(model, threshold=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _run(model, inputs)
    states = handle.skip_states()
    handle.remove()
    for layer, ranges in TEXT_RANGES[name].items():
        assert states[layer][0].must_compute_keys == ranges and states[layer][0].must_compute_queries == ranges


def test_joint_text_tokens_are_never_skipped():
    """CogVideoX puts 12 text tokens first: their key tile (tile 0) stays in every read list."""
    model, inputs = tm.cogvideox()
    inputs["hidden_states"] = _smooth(inputs["hidden_states"])
    handle = litepatch.apply(model, threshold=0.0)
    for t in TIMESTEPS:
        _run(model, _inputs_at("cogvideox", inputs, t))
    layer = model.transformer_blocks[0].attn1._litepatch
    state = layer.states[0]
    assert state.must_compute_queries == ((0, 12),) and state.must_compute_keys == ((0, 12),)
    read = state.read_list()
    assert read[..., 0].all()  # key tile 0 holds the text tokens
    assert read[:, :, 0, :].all()  # q-tile 0 holds the text queries
    assert not read.all()
    handle.remove()


def test_flux_single_stream_takes_text_length_from_top_level():
    model, inputs = tm.flux()
    handle = litepatch.apply(model, threshold=-6.0)
    _run(model, inputs)
    single = model.single_transformer_blocks[0].attn._litepatch
    assert single.states[0].must_compute_keys == ((0, 12),)  # 12 text tokens first, from encoder_hidden_states
    double = model.transformer_blocks[0].attn._litepatch
    assert double.states[0].must_compute_keys == ((0, 12),)
    handle.remove()


def test_timm_style_attention_found_and_exact():
    torch.manual_seed(0)
    model = tm.TimmStyleViT().eval()
    x = torch.randn(1, 200, 64)
    infos = litepatch.inspect(model)
    assert [(i.name, i.kind) for i in infos] == [("blocks.0.attn", "self"), ("blocks.1.attn", "self")]
    assert infos[0].reason.startswith("timm-style")
    reference = _run(model, {"x": x})
    handle = litepatch.apply(model, threshold=tm.NOTHING_DROPPED)
    torch.testing.assert_close(_run(model, {"x": x}), reference, rtol=1e-5, atol=1e-5)
    assert len(handle.stats().records) == 2
    handle.remove()
    assert torch.equal(_run(model, {"x": x}), reference)


def test_mochi_batch_rows_attend_one_by_one_each_with_its_own_state():
    """Mochi's processor loops over batch rows (each drops its own padded text): one state per row."""
    model, inputs = tm.mochi()
    inputs = dict(inputs)
    for key in ("hidden_states", "encoder_hidden_states"):
        inputs[key] = torch.cat([inputs[key], torch.randn_like(inputs[key])])
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 9:] = False
    mask[1, 5:] = False
    inputs["encoder_attention_mask"] = mask
    reference = _run(model, inputs)
    handle = litepatch.apply(model, threshold=tm.NOTHING_DROPPED)
    torch.testing.assert_close(_run(model, inputs), reference, rtol=1e-5, atol=1e-5)
    states = handle.skip_states()["transformer_blocks.0.attn1"]
    assert set(states) == {0, (0, 1)}
    assert states[0].must_compute_keys == ((384, 393),) and states[(0, 1)].must_compute_keys == ((384, 389),)
    handle.remove()
