"""Patcher facts that only a GPU shows: one tile definition per layer, the compiled patched model (issue 13)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

diffusers = pytest.importorskip("diffusers")
litepatch = pytest.importorskip("litepatch")

TINY_WAN = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16,
    text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=64,
)


def _wan():
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**TINY_WAN).to("cuda", torch.bfloat16).eval()
    latents = torch.randn(1, 16, 5, 48, 48, device="cuda", dtype=torch.bfloat16)  # 2880 tokens
    text = torch.randn(1, 16, 32, device="cuda", dtype=torch.bfloat16)
    return model, latents, text


def _forward(model, latents, text, t):
    timestep = torch.full((1,), float(t), device="cuda")
    return model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]


@torch.inference_mode()
def test_warmup_and_sparse_records_count_the_kernels_tiles():
    """Warm-up (dense) calls are counted in the tiles of the backend that runs the sparse calls (128x128 on the
    GPU kernels), so dense calls do not weigh twice in kept_fraction."""
    from litepatch.kernels import registry

    model, latents, text = _wan()
    handle = litepatch.apply(model, threshold=-4.0, warmup_steps=1)
    try:
        for t in (999, 900, 800):
            _forward(model, latents, text, t)
        records = [r for r in handle.stats().records if r["layer"] == "blocks.0.attn1"]
        assert [r["dense"] for r in records] == [True, False, False]
        assert len({r["total_tiles"] for r in records}) == 1, records
        q = torch.empty(1, 2880, 2, 64, device="cuda", dtype=torch.bfloat16)
        tiles = registry.tiles(q, 2880)
        assert records[0]["total_tiles"] == 2 * -(-2880 // tiles.block_m) * -(-2880 // tiles.block_n)
    finally:
        handle.remove()


def test_patched_wan_compiles_fullgraph_on_cuda():
    model, latents, text = _wan()
    handle = litepatch.apply(model, threshold=-4.0)
    try:
        with torch.no_grad():
            eager = [_forward(model, latents, text, t) for t in (999, 900)]
            handle.reset()
            torch._dynamo.reset()
            explanation = torch._dynamo.explain(model)(hidden_states=latents, timestep=torch.full(
                (1,), 999.0, device="cuda"), encoder_hidden_states=text, return_dict=False)
            assert explanation.graph_break_count == 0, [str(b.reason)[:300] for b in explanation.break_reasons]
            handle.reset()
            compiled = torch.compile(model, fullgraph=True)
            outs = [_forward(compiled, latents, text, t) for t in (999, 900)]
            # whole generations (9 steps: one past the recompile limit) compile no graph per step or generation
            from torch._dynamo.utils import counters

            graphs = []
            for _ in range(3):
                for t in range(999, 0, -111):
                    _forward(compiled, latents, text, t)
                graphs.append(counters["stats"]["unique_graphs"])
        for got, want in zip(outs, eager):
            rel = float((got.float() - want.float()).norm() / want.float().norm())
            assert rel < 2e-2, rel
        assert graphs[-1] == graphs[1], f"graphs compiled after each generation: {graphs}"
    finally:
        handle.remove()
        torch._dynamo.reset()


def test_a_patched_model_compiled_before_any_eager_call_has_no_graph_break_on_cuda(monkeypatch):
    """The first trace of a freshly patched model makes the backend choice with cold caches (the device's capability,
    the CuTe module's import in a fresh process): a constant of the trace, or fullgraph raises (and blocks compiled
    one by one hit a NameError; tests/unit/test_patcher_compile.py is the CPU twin)."""
    from litepatch.kernels import registry

    monkeypatch.setattr(registry, "_SELECTED", {})
    monkeypatch.setattr(registry, "_CAPABILITIES", {})
    model, latents, text = _wan()
    handle = litepatch.apply(model, threshold=-4.0)
    try:
        torch._dynamo.reset()
        with torch.no_grad():
            got = _forward(torch.compile(model, fullgraph=True), latents, text, 999)
            handle.reset()
            want = _forward(model, latents, text, 999)
        rel = float((got.float() - want.float()).norm() / want.float().norm())
        assert rel < 2e-2, rel
    finally:
        handle.remove()
        torch._dynamo.reset()


@torch.inference_mode()
def test_a_cuda_timestep_is_read_at_the_first_attention_call_with_the_same_result(monkeypatch):
    """The forward's GPU timestep is copied behind the queued work and read when the first attention call needs
    the plans (reading it at the start of the forward idled the GPU, 2-5 ms per forward of the video demo):
    outputs, skip lists and records equal those of reading it at once."""
    import litepatch.runtime as runtime_module

    def generations(model, latents, text):
        return [_forward(model, latents, text, t) for _ in range(2) for t in (999, 900, 800, 700)]

    model, latents, text = _wan()
    handle = litepatch.apply(model, threshold=0.0, warmup_steps=1)
    pending_at_first_layer = []
    hook = model.blocks[0].register_forward_pre_hook(
        lambda module, args: pending_at_first_layer.append(handle._runtime.pending is not None))
    try:
        deferred = generations(model, latents, text)
        deferred_records = _relative_generations(handle.stats().records)
        deferred_lists = {name: {b: st.keep.clone() for b, st in branches.items()}
                          for name, branches in handle.skip_states().items()}
        assert pending_at_first_layer and all(pending_at_first_layer)
        handle.configure(threshold=0.0, warmup_steps=1)
        monkeypatch.setattr(runtime_module, "_on_gpu", lambda timestep: False)
        pending_at_first_layer.clear()
        at_once = generations(model, latents, text)
        assert not any(pending_at_first_layer)
        assert _relative_generations(handle.stats().records) == deferred_records
        assert handle.stats().kept_fraction() < 1.0
        for name, branches in handle.skip_states().items():
            for branch, state in branches.items():
                assert torch.equal(state.keep, deferred_lists[name][branch]), (name, branch)
        for got, want in zip(deferred, at_once):
            assert torch.equal(got, want)
    finally:
        hook.remove()
        handle.remove()


def _relative_generations(records: list[dict]) -> list[dict]:
    """``records`` with generations counted from the first one (configure() starts a new one)."""
    first = records[0]["generation"]
    return [{**r, "generation": r["generation"] - first} for r in records]


def test_summing_the_oldest_records_of_device_counts_does_not_synchronise():
    """A bounded log sums its oldest records on the device (litepatch.stats.CallLog._sum_oldest): no host-device sync
    while a model runs, and the same numbers as an unbounded log."""
    import warnings

    from litepatch.stats import CallLog

    bounded, unbounded = CallLog(limit=16), CallLog(limit=10**9)
    counts = torch.arange(4, device="cuda")
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for forward in range(20):
                for log in (bounded, unbounded):
                    log.add([([f"l{i}", forward % 3, 0, 0, False, "", None, 8], counts[i] + forward)
                             for i in range(4)])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert not [w for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
    (held, summed), (every, _) = bounded.freeze(), unbounded.freeze()
    assert summed and held == every[-len(held):]
    assert sum(r["kept_tiles"] for r in summed) == sum(r["kept_tiles"] for r in every[: len(every) - len(held)])
