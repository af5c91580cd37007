"""Applying litepatch to a (tiny, random) diffusers Wan transformer on CUDA runs the GPU kernels."""

from __future__ import annotations


import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

diffusers = pytest.importorskip("diffusers")
litepatch = pytest.importorskip("litepatch")
triton_fwd = pytest.importorskip("litepatch.kernels.triton_fwd")
from litepatch.kernels import registry  # noqa: E402

TINY_WAN = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16,
    text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=64,
)


def _model_and_inputs():
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**TINY_WAN).to("cuda", torch.bfloat16).eval()
    latents = torch.randn(1, 16, 5, 48, 48, device="cuda", dtype=torch.bfloat16)  # 5 x 24 x 24 = 2880 tokens
    text = torch.randn(1, 16, 32, device="cuda", dtype=torch.bfloat16)
    return model, latents, text


def _forward(model, latents, text, t):
    timestep = torch.full((1,), float(t), device="cuda")
    return model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]


@torch.inference_mode()
def test_apply_to_wan_on_cuda_runs_the_gpu_kernel_and_skips():
    """The GPU kernel with nothing dropped (threshold -1e30; -inf itself runs the model's SDPA) equals dense;
    threshold 0 then skips, and its tiles are the states' (the default backend's at head dim 64: CuTe's 192x128
    on sm90, Triton's 128x128 elsewhere)."""
    model, latents, text = _model_and_inputs()
    dense = [_forward(model, latents, text, t) for t in (999, 900, 800, 700)]
    handle = litepatch.apply(model, threshold=-1e30, warmup_steps=0)
    try:
        exact = [_forward(model, latents, text, t) for t in (999, 900)]
        for got, want in zip(exact, dense[:2]):
            rel = float((got.float() - want.float()).norm() / want.float().norm())
            assert rel < 2e-2, f"the kernel with nothing dropped differs from dense SDPA by {rel:.3e}"
        handle.configure(threshold=0.0)
        sparse = [_forward(model, latents, text, t) for t in (999, 900, 800, 700)]
        states = [st for branches in handle.skip_states().values() for st in branches.values()]
        assert states and all(st.keep.is_cuda for st in states)
        q = torch.empty(1, 1, 2, 64, device="cuda", dtype=torch.bfloat16)
        assert all(st.tiles == registry.tiles(q, latents.shape[2] * 24 * 24) for st in states)
        assert handle.stats().kept_fraction() < 1.0, "threshold 0 skipped nothing on the Wan model"
        for got in sparse:
            assert torch.isfinite(got).all()
        rel = float((sparse[-1].float() - dense[-1].float()).norm() / dense[-1].float().norm())
        assert rel < 0.5, f"sparse output is far from dense ({rel:.3e})"
    finally:
        handle.remove()
    torch.testing.assert_close(_forward(model, latents, text, 999), dense[0], atol=0, rtol=0)


@torch.inference_mode()
def test_compiled_wan_with_litepatch_matches_eager():
    model, latents, text = _model_and_inputs()
    handle = litepatch.apply(model, threshold=-3.0, warmup_steps=0)
    try:
        eager = _forward(model, latents, text, 999)
        handle.reset()
        compiled = torch.compile(model)
        got = _forward(compiled, latents, text, 999)
        torch.testing.assert_close(got, eager, atol=2e-2, rtol=2e-2)
    finally:
        handle.remove()


def _syncs_during(fn) -> int:
    """Number of host-device synchronisations torch reports while ``fn()`` runs."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("called a synchronizing CUDA operation" in str(w.message) for w in caught)


@torch.inference_mode()
def test_patched_forward_adds_at_most_the_timestep_read_as_host_sync():
    """Multi-hour runs must not stall per attention call: the kept counts stay on the device, each layer's state is
    built on the device, and the only sync a patched forward adds is the step tracker reading the timestep. The
    first sparse forward of a generation (states created) counts too."""
    model, latents, text = _model_and_inputs()
    for t in (999, 900):
        _forward(model, latents, text, t)
    dense_syncs = _syncs_during(lambda: _forward(model, latents, text, 800))
    handle = litepatch.apply(model, threshold=0.0, warmup_steps=0)
    try:
        _forward(model, latents, text, 999)  # compiles the kernels (their first loads are not what is counted)
        handle.reset()  # a new generation: every state is created again in the next forward
        syncs = [_syncs_during(lambda t=t: _forward(model, latents, text, t)) for t in (999, 900, 800, 700)]
        assert handle.stats().kept_fraction() < 1.0
    finally:
        handle.remove()
    assert max(syncs) <= dense_syncs + 1, f"patched (the first makes the states): {syncs}, dense {dense_syncs}"


@torch.inference_mode()
def test_compiled_patched_wan_plans_at_run_time_like_eager():
    """Under torch.compile (inductor) a patched call is one ``litepatch::layer_attention`` op that plans when it runs:
    the warm-up step is dense and the others sparse, as in eager (inductor's own kernels may move a borderline vote,
    so kept tiles are compared within 5 %), the GPU timestep stays deferred (the handle never falls back to reading
    it before each forward), and a compiled forward adds at most the eager forward's syncs."""
    model, latents, text = _model_and_inputs()
    dense_syncs = _syncs_during(lambda: _forward(model, latents, text, 800))
    handle = litepatch.apply(model, threshold=0.0, warmup_steps=1)
    steps = (999, 900, 800, 700)
    try:
        eager = [_forward(model, latents, text, t) for t in steps]
        eager_records = [(r["dense"], r["kept_tiles"]) for r in handle.stats().records]
        handle.reset()
        handle.clear_stats()
        compiled = torch.compile(model, fullgraph=True)
        got = [_forward(compiled, latents, text, t) for t in steps]
        records = [(r["dense"], r["kept_tiles"]) for r in handle.stats().records]
        assert [dense for dense, _ in records] == [dense for dense, _ in eager_records]
        assert any(dense for dense, _ in records) and not all(dense for dense, _ in records)
        for (_, kept), (_, eager_kept) in zip(records, eager_records):
            assert abs(kept - eager_kept) <= 0.05 * eager_kept, (records, eager_records)
        for out, ref in zip(got, eager):
            torch.testing.assert_close(out, ref, atol=5e-2, rtol=5e-2)
        handle.reset()
        syncs = [_syncs_during(lambda t=t: _forward(compiled, latents, text, t)) for t in steps]
        assert not handle._runtime.traced
    finally:
        handle.remove()
        torch._dynamo.reset()
    assert max(syncs) <= dense_syncs + 1, f"compiled patched forwards: {syncs}, dense {dense_syncs}"


@torch.inference_mode()
def test_capturing_a_patched_forward_into_a_cuda_graph_is_a_clear_error():
    """A CUDA graph replay skips the patcher's Python (plans, records): capturing a patched forward must fail at once
    with a message that says so, not record a graph that repeats one step's plan."""
    model, latents, text = _model_and_inputs()
    handle = litepatch.apply(model, threshold=-2.0, warmup_steps=0)
    try:
        _forward(model, latents, text, 999)
        timestep = torch.full((1,), 900.0, device="cuda")
        torch.cuda.synchronize()
        with pytest.raises(RuntimeError, match="captured into a CUDA graph"):
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)
    finally:
        handle.remove()
