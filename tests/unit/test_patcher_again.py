"""LayerPatch.attend_again: a layer's sparse call made again through its state's repeated kernel call, without the
classification, plan and lite_attention checks in between, where nothing but ``q, k, v`` differs from the call that
made it; anything else (another form, autograd, a new generation, a state copied out of inference mode) goes the
whole way.

A CPU backend stands in for the CuTe one (``repeating_backend.py``: its forward is the reference; its repeat makes the
reference call again with the arguments it was given). Every output and every kept count must equal those of a twin
patched with the reference backend, which has no repeat and takes the whole path every time, bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch

import litepatch
from litepatch import layer_patch
import tiny_models as tm
from repeating_backend import registered

pytest.importorskip("diffusers")

NAME = "test-again"
STEPS = (999.0, 980.0, 960.0, 940.0)


@pytest.fixture
def repeats():
    """Registers the stand-in backend; yields what it ran (the whole path's forwards and its repeats)."""
    with registered(NAME) as repeating:
        yield repeating.ran


@pytest.fixture
def full_calls(monkeypatch):
    """Counts the patcher's calls through lite_attention (the whole path)."""
    calls, real = [], layer_patch.lite_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(layer_patch, "lite_attention", counted)
    return calls


def twins():
    """(model, twin, inputs, handles): a tiny diffusers Wan patched with the stand-in backend, and its copy patched
    with the reference backend."""
    model, inputs = tm.wan_diffusers()
    tm.sharpen_wan_self_attention(model, 10.0)  # peaked attention: tiles to skip
    twin = copy.deepcopy(model)
    handles = (litepatch.apply(model, threshold=-2.0, warmup_steps=0, backend=NAME),
               litepatch.apply(twin, threshold=-2.0, warmup_steps=0, backend="reference"))
    return model, twin, inputs, handles


def run(model, inputs, step: float, **changes):
    return model(**{**inputs, "timestep": torch.tensor([step]), **changes})[0]


def kept_counts(handle) -> list:
    return [(r["layer"], r["step"], r["kept_tiles"], r["total_tiles"]) for r in handle.stats().records]


def assert_same_records(handles) -> None:
    ours, reference = (kept_counts(handle) for handle in handles)
    assert ours == reference and ours


def test_later_steps_repeat_the_kernel_call_and_match_the_whole_path_bit_for_bit(repeats, full_calls):
    model, twin, inputs, handles = twins()
    with torch.inference_mode():
        for step in STEPS:
            before = len(full_calls)
            assert torch.equal(run(model, inputs, step), run(twin, inputs, step))
            if step != STEPS[0]:  # the twin's two layers went the whole way; this model's went again
                assert len(full_calls) - before == 2, step
    assert repeats == ["forward"] * 2 + ["repeat"] * 2 * (len(STEPS) - 1)  # each layer's first call, then repeats
    assert_same_records(handles)
    assert any(kept < total for _, _, kept, total in kept_counts(handles[0]))  # the calls skipped tiles


def test_a_new_form_or_a_new_generation_takes_the_whole_path(repeats, full_calls):
    model, twin, inputs, handles = twins()
    wider = {"hidden_states": torch.randn(1, 4, 5, 8, 8)}  # another token count: another form
    with torch.inference_mode():
        for step in STEPS[:2]:
            run(model, inputs, step), run(twin, inputs, step)
        full_calls.clear()
        assert torch.equal(run(model, inputs, STEPS[2], **wider), run(twin, inputs, STEPS[2], **wider))
        assert len(full_calls) == 2 * 2  # this model's two layers and the twin's
        full_calls.clear()
        assert torch.equal(run(model, inputs, STEPS[0]), run(twin, inputs, STEPS[0]))  # a new generation: new states
        assert len(full_calls) == 2 * 2
    assert_same_records(handles)


def test_autograd_is_refused_as_before(repeats):
    model, unpatched, inputs, handles = twins()
    handles[1].remove()
    with torch.no_grad():  # not inference mode: the states stay as they are when autograd records
        run(model, inputs, STEPS[0]), run(model, inputs, STEPS[1])
    with pytest.warns(UserWarning, match="autograd is recording"):
        out = run(model, inputs, STEPS[2])  # the weights require grad: q, k, v do
    assert out.requires_grad and repeats == ["forward"] * 2 + ["repeat"] * 2  # nothing under autograd
    assert torch.equal(out, run(unpatched, inputs, STEPS[2]))


def test_a_state_copied_out_of_inference_mode_is_not_repeated_on_its_old_lists(repeats, full_calls):
    model, twin, inputs, handles = twins()
    with torch.inference_mode():
        for step in STEPS[:2]:
            run(model, inputs, step), run(twin, inputs, step)
    full_calls.clear()
    with torch.no_grad():  # the states' tensors are copied (SkipState.usable_outside_inference_mode)
        assert torch.equal(run(model, inputs, STEPS[2]), run(twin, inputs, STEPS[2]))
        assert len(full_calls) == 2 * 2
        full_calls.clear()
        assert torch.equal(run(model, inputs, STEPS[3]), run(twin, inputs, STEPS[3]))
        assert len(full_calls) == 2  # the copies are repeated from then on
    assert_same_records(handles)
