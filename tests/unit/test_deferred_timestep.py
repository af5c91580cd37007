"""A GPU timestep is read when the forward's first attention call needs the plans, not when the forward starts
(:meth:`litepatch.runtime.Runtime.start_forward`): reading it at once waits for the previous forward and idles the
GPU. Steps, branches, generations, skip lists and outputs must be those of reading it at once, eager and compiled.

This machine has no GPU: the tests treat CPU timesteps as GPU ones (``_on_gpu``) and replace the pinned copy by
:class:`FakePending`, which logs when the value is taken.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_calibration_toy import TIMESTEPS, ToyModel

import litepatch
import litepatch.runtime as runtime_module


class FakePending:
    """Stands in for :class:`litepatch.context.PendingTimestep` (a pinned copy and a CUDA event)."""

    log: list[str] = []

    def start(self, source: torch.Tensor) -> FakePending:
        self._value = float(source.reshape(-1)[0])
        FakePending.log.append("copy started")
        return self

    def value(self) -> float:
        torch._dynamo.graph_break()  # as the real one (a CUDA event's wait): a traced read breaks fullgraph
        FakePending.log.append("value read")
        return self._value


@pytest.fixture
def deferred(monkeypatch):
    monkeypatch.setattr(runtime_module, "_on_gpu", lambda timestep: True)
    monkeypatch.setattr(runtime_module, "PendingTimestep", FakePending)
    FakePending.log.clear()
    return FakePending.log


def _generation(model, seed: int = 0) -> list[torch.Tensor]:
    """Sequential CFG: two forwards per timestep with different inputs (two branches), like a diffusers pipeline."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, *model.pos.shape, generator=g)
    uncond = torch.zeros_like(x)
    outs = []
    with torch.no_grad():
        for t in TIMESTEPS:
            timestep = torch.tensor([t])
            cond_out, uncond_out = model(x, timestep=timestep), model(x + uncond, timestep=timestep)
            x = x - 0.15 * (uncond_out + 2.0 * (cond_out - uncond_out))
            outs.append(x)
    return outs


def _records(handle) -> list[tuple]:
    return [(r["layer"], r["step"], r["branch"], r["generation"], r["kept_tiles"]) for r in handle.stats().records]


def _patched_run(generations: int = 2):
    model = ToyModel().eval()
    handle = litepatch.apply(model, threshold=-2.0, warmup_steps=1)
    outs = [_generation(model, seed) for seed in range(generations)]
    return model, handle, outs


def test_the_timestep_is_read_at_the_first_attention_call_and_changes_nothing(deferred):
    reference_model, reference, reference_outs = None, None, None
    with pytest.MonkeyPatch.context() as undo:  # the run that reads the timestep at the start of each forward
        undo.setattr(runtime_module, "_on_gpu", lambda timestep: False)
        reference_model, reference, reference_outs = _patched_run()
    at_first_attention = []
    model = ToyModel().eval()
    model.blocks[0].register_forward_pre_hook(lambda module, args: at_first_attention.append(list(deferred)))
    handle = litepatch.apply(model, threshold=-2.0, warmup_steps=1)
    outs = [_generation(model, seed) for seed in range(2)]

    forwards = 2 * 2 * len(TIMESTEPS)
    assert deferred == ["copy started", "value read"] * forwards
    # when the first attention layer starts, this forward's copy is under way and its value not taken yet
    assert all(log[-1] == "copy started" for log in at_first_attention) and len(at_first_attention) == forwards
    for out, ref in zip(sum(outs, []), sum(reference_outs, [])):
        assert torch.equal(out, ref)
    assert _records(handle) == _records(reference)
    assert {r[2] for r in _records(handle)} == {0, 1} and {r[3] for r in _records(handle)} == {0, 1}
    assert handle.stats().kept_fraction() < 0.9  # sparse calls took part


def test_a_forward_without_attention_calls_is_still_counted(deferred):
    model = ToyModel().eval()
    handle = litepatch.apply(model, threshold=-2.0)
    runtime = handle._runtime
    runtime.start_forward(torch.tensor([900.0]), None, ("x",))  # its layers never run
    runtime.start_forward(torch.tensor([750.0]), None, ("x",))
    assert deferred == ["copy started", "value read", "copy started"]
    assert (handle.generation, handle.step, handle.branch) == (0, 1, 0)  # asking settles the pending forward
    assert deferred[-1] == "value read" and runtime.pending is None


def test_compiled_after_eager_forwards_gives_the_eager_outputs_and_records(deferred):
    """Eager forwards first (deferred reads), then ``torch.compile(fullgraph=True)``: the compiled forwards defer their
    reads too, since a traced attention call plans when it runs (``litepatch::layer_attention``), not in the trace."""
    with pytest.MonkeyPatch.context() as undo:
        undo.setattr(runtime_module, "_on_gpu", lambda timestep: False)
        _, reference, reference_outs = _patched_run(generations=2)
    model = ToyModel().eval()
    handle = litepatch.apply(model, threshold=-2.0, warmup_steps=1)
    torch._dynamo.reset()
    try:
        eager = _generation(model, seed=0)
        assert "value read" in deferred and not handle._runtime.traced
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        deferred.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outs = _generation(compiled, seed=1)
        assert deferred == ["copy started", "value read"] * (2 * len(TIMESTEPS))  # one deferred read per forward
        assert not handle._runtime.traced
    finally:
        torch._dynamo.reset()
    for out, ref in zip(eager + outs, sum(reference_outs, [])):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert _records(handle) == _records(reference)


def test_remove_drops_a_pending_timestep(deferred):
    model = ToyModel().eval()
    handle = litepatch.apply(model, threshold=-2.0)
    runtime = handle._runtime
    runtime.start_forward(torch.tensor([900.0]), None, ("x",))
    handle.remove()
    runtime.settle()  # what a later compile start does: nothing is planned for the removed layers
    assert runtime.pending is None and deferred == ["copy started"] and runtime.tracker.generation == -1
