"""A patched diffusers Wan and Flux compile with ``torch.compile(fullgraph=True)``: no graph break in attention."""

from __future__ import annotations

import warnings

import pytest
import torch
import tiny_models as tm

import litepatch

pytest.importorskip("diffusers")

TIMESTEPS = {"wan": (999, 900, 800), "flux": (1.0, 0.9, 0.8)}


def _smooth(inputs: dict) -> dict:
    hidden = inputs["hidden_states"]
    small = torch.randn(*hidden.shape[:-1 if hidden.dim() == 3 else 2], *([2] * (hidden.dim() - 2)))
    if hidden.dim() == 3:  # packed tokens [B, S, C]: smooth along S
        small = torch.randn(hidden.shape[0], hidden.shape[2], 4)
        smooth = torch.nn.functional.interpolate(small, size=hidden.shape[1], mode="linear", align_corners=True)
        return {**inputs, "hidden_states": 3 * smooth.transpose(1, 2).contiguous()}
    smooth = torch.nn.functional.interpolate(small, size=hidden.shape[2:], mode="trilinear", align_corners=True)
    return {**inputs, "hidden_states": 3 * smooth}


def _run(model, inputs, t):
    with torch.no_grad():
        return model(**{**inputs, "timestep": torch.tensor([t])})[0]


@pytest.mark.parametrize("name", ["wan", "flux"])
def test_patched_diffusers_model_compiles_fullgraph_and_matches_eager(name):
    torch.manual_seed(0)
    model, inputs = tm.DIFFUSERS_FACTORIES[name]()
    inputs = _smooth(inputs)
    handle = litepatch.apply(model, threshold=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = [_run(model, inputs, t) for t in TIMESTEPS[name]]
        eager_kept = [r["kept_tiles"] for r in handle.stats().records]
        handle.reset()
        handle.clear_stats()
        torch._dynamo.reset()
        with torch.no_grad():
            explanation = torch._dynamo.explain(model)(**inputs)
        assert explanation.graph_break_count == 0, [str(b.reason)[:300] for b in explanation.break_reasons]
        handle.reset()
        handle.clear_stats()
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        outs = [_run(compiled, inputs, t) for t in TIMESTEPS[name]]
    for out, ref in zip(outs, eager):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert [r["kept_tiles"] for r in handle.stats().records] == eager_kept
    assert min(eager_kept) < max(eager_kept)  # the compiled model skips what the eager one skipped
    handle.remove()
    torch._dynamo.reset()
