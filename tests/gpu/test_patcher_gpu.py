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
