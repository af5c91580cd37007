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
        tm.assert_compiles_like_eager(model, handle, inputs, _run, TIMESTEPS[name])
    handle.remove()
    torch._dynamo.reset()


def test_a_compiled_patched_model_does_not_recompile_per_step_or_generation():
    """A compiled patched model runs whole generations on one graph, not one per step or per generation (a per-step guard hit torch.compile's recompile limit after 8 steps, a hard
    failure under ``fullgraph=True``)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model, inputs = tm.DIFFUSERS_FACTORIES["wan"]()
    inputs = _smooth(inputs)
    handle = litepatch.apply(model, threshold=0.0, warmup_steps=2)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    graphs = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(3):  # three generations of 9 steps (one more than torch.compile's recompile limit)
                for t in range(999, 0, -111):
                    _run(compiled, inputs, t)
                graphs.append(counters["stats"]["unique_graphs"])
        assert handle.stats().kept_fraction() < 1.0
    finally:
        handle.remove()
        torch._dynamo.reset()
    # dense and sparse calls, a fresh and a used skip state, the backend choice's first call, the second
    # generation's fresh states: 5 graphs, and none after that
    # one: a traced call plans when it runs (litepatch::layer_attention), so dense and sparse calls, fresh and used
    # skip states, steps and generations are all the same graph
    assert graphs == [1, 1, 1], f"graphs compiled after each generation: {graphs}"


@pytest.fixture
def lazily_registered_backend(monkeypatch):
    """A built-in-like backend whose module is not imported yet, and a registry that has answered nothing yet."""
    import sys

    from litepatch.kernels import registry

    monkeypatch.setitem(registry._MODULES, "lazy-test", ("lazy_backend", ("cpu",)))
    monkeypatch.setattr(registry, "_REGISTERED", dict(registry._REGISTERED))
    monkeypatch.setattr(registry, "_NOT_LOADED", dict(registry._NOT_LOADED))
    monkeypatch.setattr(registry, "_SELECTED", {})
    sys.modules.pop("lazy_backend", None)
    yield
    sys.modules.pop("lazy_backend", None)


@pytest.mark.parametrize("compiled", ["blocks", "fullgraph blocks"])
def test_a_compiled_model_traced_before_any_backend_was_chosen_has_no_graph_break(lazily_registered_backend,
                                                                                  compiled):
    """The first trace of a freshly patched model chooses the backend. On a GPU that imports the CuTe module and asks
    the driver for the device's capability, which a trace cannot follow: a graph break inside the patched attention,
    and with blocks compiled one by one (``benchmarks/demo_profile.py --compile-blocks``) a NameError, as the
    attention modules' patched forwards share one code object. The choice is a constant of the trace now."""
    from litepatch.demo.model import DemoConfig, DemoDiT

    torch.manual_seed(0)
    config = DemoConfig(frames=2, height=16, width=16, dim=64, heads=1, ffn_dim=128, layers=2)
    eager_model, compiled_model = DemoDiT(config).eval(), DemoDiT(config).eval()
    compiled_model.load_state_dict(eager_model.state_dict())
    latents, cond = torch.randn(2, 3, 2, 16, 16), torch.tensor([[0, 1, 2], [-1, -1, -1]])
    handles = [litepatch.apply(m, threshold=0.0, warmup_steps=0) for m in (eager_model, compiled_model)]
    torch._dynamo.reset()
    for block in compiled_model.blocks:  # fullgraph: a graph break raises (the demo model's own prologue has some)
        block.compile(backend="eager", fullgraph=compiled == "fullgraph blocks")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for t in (900.0, 800.0, 700.0):
                timestep = torch.tensor([t, t])
                out = compiled_model(latents, timestep=timestep, cond=cond)  # first: nothing chose a backend yet
                torch.testing.assert_close(out, eager_model(latents, timestep=timestep, cond=cond))
        assert handles[1].stats().records and not all(r["dense"] for r in handles[1].stats().records)
    finally:
        for handle in handles:
            handle.remove()
        torch._dynamo.reset()


class _MaskedToyAttention(torch.nn.Module):
    """A toy attention with an additive float mask: a call the kernel refuses (the original attention runs)."""

    def __init__(self, inner: torch.nn.Module, seq: int):
        super().__init__()
        self.inner = inner
        self.register_buffer("bias", -0.1 * torch.rand(seq, seq, generator=torch.Generator().manual_seed(1)))

    def forward(self, x, pos):
        qk = (pos + 0.5 * self.inner.qk(x))[:, None]
        return torch.nn.functional.scaled_dot_product_attention(qk, qk, self.inner.v(x)[:, None], attn_mask=self.bias)[:, 0]


def _toy_generation(model) -> list[torch.Tensor]:
    from test_calibration_toy import TIMESTEPS

    x = torch.randn(1, *model.pos.shape, generator=torch.Generator().manual_seed(0))
    outs = []
    with torch.no_grad():
        for t in TIMESTEPS:
            x = x - 0.15 * model(x, timestep=torch.tensor([t]))
            outs.append(x)
    return outs


def _toy_records(handle) -> list[tuple]:
    return [(r["layer"], r["step"], r["branch"], r["generation"], r["dense"], r["reason"], r["kept_tiles"])
            for r in handle.stats().records]


def test_compiled_dense_steps_run_the_fast_dense_kernel_and_records_match_eager(monkeypatch):
    """Warm-up calls of a compiled patched model take the fastest dense kernel where it pays, as eager ones do (the
    trace used to run the model's own SDPA: on the H100 video demo a compiled patched model at threshold -inf was
    slower than the compiled stock one), and a refused call is recorded at its forward's step."""
    from test_calibration_toy import ToyModel

    import litepatch.dense_routing as routing

    fast_calls = []

    def fast_dense_kernel(q, k, v, *, softmax_scale=None, key_mask=None):
        fast_calls.append(q.shape)
        return litepatch.kernels.sdpa_attention(q, k, v, softmax_scale=softmax_scale, key_mask=key_mask)

    monkeypatch.setattr(routing, "faster_dense_attention", fast_dense_kernel)  # as flash-attn-4 on Hopper
    runs = {}
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        model = ToyModel().eval()
        model.blocks[1] = _MaskedToyAttention(model.blocks[1], model.pos.shape[0])
        handle = litepatch.apply(model, threshold=-2.0, warmup_steps=2)
        torch._dynamo.reset()
        fast_calls.clear()
        runner = torch.compile(model, fullgraph=True, backend="aot_eager") if mode == "compiled" else model
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                outs = _toy_generation(runner)
                handle.stats()  # records (and warns about) the last forward's calls
            warned = [str(w.message) for w in caught if "litepatch: blocks.1 runs dense" in str(w.message)]
            runs[mode] = (outs, _toy_records(handle), len(fast_calls), warned)
        finally:
            handle.remove()
            torch._dynamo.reset()
    (eager_outs, eager_records, eager_fast, eager_warned), (outs, records, fast, warned) = runs["eager"], runs["compiled"]
    layers = len(ToyModel().blocks)
    assert fast == eager_fast == 2 * (layers - 1)  # two warm-up steps, every layer but the refused one
    assert records == eager_records
    assert all("mask" in r[5] for r in records if r[0] == "blocks.1")
    assert len(warned) == len(eager_warned) == 1, (warned, eager_warned)  # once per layer and reason
    assert not all(r[4] for r in records)  # sparse calls took part
    for out, ref in zip(outs, eager_outs):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_diffusers_regional_compilation_of_a_patched_model_matches_eager():
    """``model.compile_repeated_blocks(fullgraph=True)`` (diffusers' regional compilation, each transformer block
    compiled on its own) on a patched Wan: the eager outputs and kept tiles, a dense warm-up step and sparse steps,
    and no new graph in a second generation."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model, inputs = tm.DIFFUSERS_FACTORIES["wan"]()
    inputs = _smooth(inputs)
    handle = litepatch.apply(model, threshold=0.0, warmup_steps=1)
    steps = (999, 900, 800, 700)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eager = [_run(model, inputs, t) for t in steps]
            eager_kept = [r["kept_tiles"] for r in handle.stats().records]
            handle.reset()
            handle.clear_stats()
            torch._dynamo.reset()
            counters.clear()
            model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
            compiled = [_run(model, inputs, t) for t in steps]
            kept = [r["kept_tiles"] for r in handle.stats().records]
            graphs = counters["stats"]["unique_graphs"]
            for t in steps:  # a second generation
                _run(model, inputs, t)
        assert counters["stats"]["unique_graphs"] == graphs
        assert kept == eager_kept and min(kept) < max(kept)
        for out, ref in zip(compiled, eager):
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    finally:
        handle.remove()
        torch._dynamo.reset()


def test_the_layer_op_is_kept_out_of_cuda_graphs():
    """``mode="reduce-overhead"`` must not capture ``litepatch::layer_attention``: a replay would skip its Python and
    repeat one step's plan at every step. The op is tagged so that Inductor runs it outside graphs, and a capture
    that reaches a patched forward anyway (older torch, torch.cuda.graph) raises a clear error (GPU test)."""
    import litepatch.compiled_call  # noqa: F401  (registers the op)

    assert torch.Tag.cudagraph_unsafe in torch.ops.litepatch.layer_attention.default.tags


def test_a_patched_model_compiles_with_dynamic_shapes():
    """``torch.compile(dynamic=True)``: the sizes are symbolic in the trace, and the backend choice depends on them (a
    constant of the trace). It failed with "assume_constant_result argument conversion failed"; the trace now
    specializes on the sizes, one graph per sequence length, with the eager outputs and kept tiles."""
    from test_calibration_toy import TIMESTEPS, ToyModel

    class VariableLength(ToyModel):
        def forward(self, x, timestep):
            h, pos = x, self.pos[: x.shape[1]]
            for gain, block in zip(self.gains, self.blocks):
                h = h + gain * block(h, pos)
            return h - x

    def generation(model, seq):
        x = torch.randn(1, seq, 16, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for t in TIMESTEPS:
                x = x - 0.15 * model(x, timestep=torch.tensor([t]))
        return x

    model = VariableLength().eval()
    handle = litepatch.apply(model, threshold=-2.0, warmup_steps=1)
    torch._dynamo.reset()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eager = {}
            for seq in (512, 768):
                handle.clear_stats()
                eager[seq] = (generation(model, seq), handle.stats().kept_fraction())
            compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
            for seq in (512, 768):
                handle.clear_stats()
                out = generation(compiled, seq)
                torch.testing.assert_close(out, eager[seq][0], rtol=1e-5, atol=1e-5)
                assert handle.stats().kept_fraction() == eager[seq][1] < 1.0
    finally:
        handle.remove()
        torch._dynamo.reset()
