"""The built-in demo DiT: shapes, committed weights, sampling, metrics and learned locality (CPU)."""

from __future__ import annotations

import math

import pytest
import torch

import litepatch
import litepatch.demo.model as demo_model

from litepatch.demo.data import COLOURS, DIRECTIONS, SHAPES, describe, make_videos, parse_condition
from litepatch.demo.model import (
    DemoConfig,
    DemoDiT,
    attention_locality,
    default_weights_path,
    load_demo_model,
    neighbourhood_mask,
    save_demo_model,
)
from litepatch.demo.sampling import flow_sigmas, psnr, sample, ssim, to_frames

TINY = DemoConfig(frames=2, height=8, width=8, dim=64, heads=1, ffn_dim=128, layers=2)


@pytest.fixture(scope="module")
def trained():
    return load_demo_model()


def test_tiny_model_shapes_and_null_condition():
    torch.manual_seed(0)
    model = DemoDiT(TINY).eval()
    x = torch.randn(2, 3, 2, 8, 8)
    out = model(x, timestep=torch.tensor([900.0, 100.0]), cond=torch.tensor([[0, 1, 2], [3, 5, -1]]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    uncond = model(x, timestep=500.0, cond=None)
    nulls = model(x, timestep=500.0, cond=torch.full((2, 3), -1))
    torch.testing.assert_close(uncond, nulls)
    assert TINY.seq_len == 2 * 4 * 4


def test_a_condition_is_checked_once_but_an_in_place_write_is_seen():
    """Reading the indices back syncs a GPU: a sampler's condition, passed every step, is checked on its first
    forward only; writing into it makes it a new condition."""
    model, latents = DemoDiT(TINY), torch.randn(1, 3, 2, 8, 8)
    cond = torch.tensor([[0, 1, 0]])
    for _ in range(3):
        model(latents, timestep=1.0, cond=cond)
    assert [t for t, _ in model._checked] == [cond]
    cond[0, 1] = 6
    with pytest.raises(ValueError, match=r"cond slot 1 must be in \[-1, 5\]"):
        model(latents, timestep=1.0, cond=cond)
    with torch.inference_mode():  # no version counter there: checked on every call
        cond = torch.tensor([[0, 1, 0]])
        model(latents, timestep=1.0, cond=cond)
        cond[0, 1] = 6
        with pytest.raises(ValueError, match=r"cond slot 1 must be in \[-1, 5\]"):
            model(latents, timestep=1.0, cond=cond)


def test_the_sampler_has_its_condition_checked_once_under_inference_mode():
    """A GPU generation runs under inference_mode, where a condition made there would be checked (three syncs) on
    every forward: the sampler's conditions are ordinary tensors, checked on the first forward only."""
    model = DemoDiT(TINY)
    with torch.inference_mode():
        for mode in ("batched", "sequential"):
            model._checked = []
            sample(model, torch.tensor([[0, 1, 0]]), steps=3, cfg_mode=mode)
            assert len(model._checked) == 1, mode


def test_bad_inputs_are_refused_with_the_value():
    model = DemoDiT(TINY)
    with pytest.raises(ValueError, match=r"cond slot 1 must be in \[-1, 5\]"):
        model(torch.randn(1, 3, 2, 8, 8), timestep=1.0, cond=torch.tensor([[0, 6, 0]]))
    with pytest.raises(ValueError, match=r"latents must be \[B, 3, F, H, W\]"):
        model(torch.randn(1, 4, 2, 8, 8), timestep=1.0)
    with pytest.raises(ValueError, match="not divisible by heads"):
        DemoConfig(dim=100, heads=3)
    with pytest.raises(ValueError, match="'purple circle left' names no colour"):
        parse_condition("purple circle left")


def test_committed_weights_load_and_match_the_default_config(trained):
    assert default_weights_path().is_file()
    assert trained.config == DemoConfig()
    assert trained.config.seq_len == 2048 and trained.config.head_dim == 64
    assert int(trained.training_metadata["steps"]) >= 1000
    # the weights were trained: an fp32 rebuild from a random init differs
    assert not torch.equal(trained.head.weight, DemoDiT().head.weight)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(1)
    model = DemoDiT(TINY).eval()
    path = tmp_path / "w.safetensors"
    save_demo_model(model, path, {"seed": 1})
    loaded = load_demo_model(path)
    assert loaded.config == TINY and loaded.training_metadata["seed"] == "1"
    x = torch.randn(1, 3, 2, 8, 8)
    torch.testing.assert_close(loaded(x, timestep=500.0), model(x, timestep=500.0), atol=2e-2, rtol=2e-2)
    with pytest.raises(FileNotFoundError, match="demo weights not found"):
        load_demo_model(tmp_path / "missing.safetensors")


def test_procedural_videos_are_seeded_and_follow_the_condition():
    v1, c1 = make_videos(8, seed=3)
    v2, c2 = make_videos(8, seed=3)
    assert torch.equal(v1, v2) and torch.equal(c1, c2)
    assert v1.shape == (8, 3, 8, 32, 32) and v1.min() >= -1 and v1.max() <= 1
    cond = torch.tensor([[0, 0, 1]] * 4)  # red circles moving right
    videos, _ = make_videos(4, seed=0, cond=cond)
    red_minus_blue = videos[:, 0] - videos[:, 2]  # [N, F, H, W]
    column = torch.arange(32, dtype=torch.float32)
    weight = red_minus_blue.clamp(min=0.5) - 0.5
    x_centre = (weight * column).sum((-1, -2)) / weight.sum((-1, -2))
    assert (x_centre[:, -1] > x_centre[:, 0] + 4).all()  # moved right
    assert describe([1, 2, 3]) == f"{COLOURS[2]} {SHAPES[1]} moving {DIRECTIONS[3]}"


def test_sampler_generates_a_video_of_the_condition(trained):
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cond = torch.tensor([parse_condition("red circle moving right")])
    latents = sample(trained, cond, steps=4, seed=0)
    frames = to_frames(latents)
    assert frames.shape == (1, 8, 32, 32, 3) and frames.dtype == torch.uint8
    red = frames[0, ..., 0].float() - frames[0, ..., 2].float()
    assert red.max() > 100  # a red object was drawn
    same = sample(trained, cond, steps=4, seed=0)
    assert torch.equal(latents, same)


def test_tiny_sampler_runs_the_two_cfg_branches():
    model = DemoDiT(TINY).eval()
    calls = []
    model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["cond"] is None), with_kwargs=True)
    out = sample(model, torch.tensor([0, 0, 0]), steps=3, guidance=3.0)
    assert out.shape == (1, 3, 2, 8, 8)
    assert calls == [False, True] * 3
    calls.clear()
    sample(model, torch.tensor([0, 0, 0]), steps=2, guidance=1.0)
    assert calls == [False, False]


def test_batched_cfg_is_one_forward_per_step_and_equals_sequential_cfg():
    torch.manual_seed(0)
    model = DemoDiT(TINY).eval()
    batches = []
    model.register_forward_pre_hook(lambda m, a, kw: batches.append(a[0].shape[0]), with_kwargs=True)
    cond = torch.tensor([[1, 2, 3]])
    sequential = sample(model, cond, steps=3, guidance=3.0, seed=5)
    assert batches == [1] * 6
    batches.clear()
    batched = sample(model, cond, steps=3, guidance=3.0, seed=5, cfg_mode="batched")
    assert batches == [2] * 3
    torch.testing.assert_close(batched, sequential, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="cfg_mode must be one of"):
        sample(model, cond, steps=1, cfg_mode="interleaved")


def test_patched_batched_cfg_keeps_one_state_with_a_row_per_branch(trained):
    import litepatch

    model = trained  # local attention: the trained model skips tiles, a random one does not
    handle = litepatch.apply(model, threshold=-2.0, warmup_steps=1)
    try:
        sample(model, torch.tensor([[1, 2, 3]]), steps=3, guidance=3.0, cfg_mode="batched")  # step 2 reads the lists step 1 wrote
        states = handle.skip_states()
        assert states and all(len(branches) == 1 for branches in states.values())
        assert all(state.keep.shape[0] == 2 for branches in states.values() for state in branches.values())
        assert any(not record["dense"] for record in handle.stats().records)
        assert handle.stats().kept_fraction() < 1.0
    finally:
        handle.remove()


def test_fused_pointwise_traces_without_graph_breaks_and_keeps_the_output():
    """fuse_pointwise() compiles the blocks' regions between attention calls (fullgraph: a graph break raises);
    "aot_eager" traces them as inductor would, without generating code, so the CPU suite checks the path the GPU demo
    takes. A patched fused model still sends every self-attention call to the sparse path."""
    torch.manual_seed(0)
    model = DemoDiT(TINY).eval()
    latents, cond = torch.randn(2, 3, 2, 8, 8), torch.tensor([[0, 1, 2], [-1, -1, -1]])
    with torch.no_grad():
        eager = model(latents, timestep=torch.tensor([500.0, 500.0]), cond=cond)
        model.fuse_pointwise(backend="aot_eager")
        assert all(block.ops is not demo_model.EAGER_OPS for block in model.blocks)
        fused = model(latents, timestep=torch.tensor([500.0, 500.0]), cond=cond)
        handle = litepatch.apply(model, threshold=0.0, warmup_steps=0)
        try:
            for t in (900.0, 800.0):
                model(latents, timestep=torch.tensor([t, t]), cond=cond)
            records = handle.stats().records
        finally:
            handle.remove()
        model.fuse_pointwise(False)
        assert all(block.self_attn.ops is demo_model.EAGER_OPS for block in model.blocks)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
    sparse = {r["layer"] for r in records if not r["dense"]}
    assert sparse == {f"blocks.{i}.self_attn" for i in range(TINY.layers)}  # cross-attention stays dense


def test_real_rope_equals_the_complex_rotation():
    x = torch.randn(1, 2, 12, 8)
    freqs = demo_model.rope_frequencies((1, 3, 4), 8, 10000.0, "cpu")
    pairs = torch.view_as_complex(x.reshape(1, 2, 12, 4, 2))
    torch.testing.assert_close(demo_model.apply_rope(x, freqs), torch.view_as_real(pairs * freqs).flatten(-2))


def test_flow_sigmas_and_metrics():
    s = flow_sigmas(4)
    assert s[0] == 1 and s[-1] == 0 and (s[1:] < s[:-1]).all()
    assert flow_sigmas(4, shift=3.0)[1] > s[1]
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        flow_sigmas(0)
    x = torch.rand(1, 3, 2, 16, 16) * 2 - 1
    assert psnr(x, x) == math.inf and ssim(x, x) == pytest.approx(1.0)
    noisy = x + 0.1 * torch.randn_like(x)
    assert 15 < psnr(noisy, x) < 30 and ssim(noisy, x) < 0.95


def test_neighbourhood_mask():
    mask = neighbourhood_mask((2, 3, 3), (0, 1, 1))
    assert mask.shape == (18, 18) and mask.diagonal().all()
    assert mask[4].sum() == 9 and mask[0].sum() == 4 and not mask[0, 9]


def test_trained_attention_is_local_and_random_attention_is_not(trained):
    videos, cond = make_videos(1, seed=99)
    noise = torch.randn(videos.shape, generator=torch.Generator().manual_seed(0))
    noisy = 0.5 * videos + 0.5 * noise
    torch.manual_seed(0)
    random_model = DemoDiT().eval()
    with torch.inference_mode():
        learned = attention_locality(trained, noisy, 500.0, cond)
        untrained = attention_locality(random_model, noisy, 500.0, cond)
    assert learned["uniform"] < 0.04
    assert untrained["mean"] < 2 * learned["uniform"]  # random weights: about uniform
    assert learned["mean"] > 5 * learned["uniform"]  # trained: most mass near the query token
    assert max(learned["per_layer"]) > 0.5
