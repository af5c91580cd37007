"""lite_attention's repeated call (``Backend.repeat``): the next call of the same form on a state skips the checks,
sizing and dispatch, and anything that makes a call differ goes through the backend's forward again.

A CPU backend stands in for the CuTe one (``repeating_backend.py``: its forward is the reference, and its repeat makes
the reference call with the arguments it was given once, counting what ran). Every call's output and state must equal
the reference backend's, called the usual way, bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch

from litepatch.kernels import SkipState, lite_attention, registry

from repeating_backend import registered

NAME = "test-repeat"


@pytest.fixture
def backend():
    with registered(NAME) as repeating:
        yield repeating


def inputs(seq=512, seed=0, heads=2):
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(seq, dtype=torch.float32)[:, None] * torch.logspace(-2, -0.5, 8)
    feats = 3 * torch.cat([pos.cos(), pos.sin()], -1)[None, :, None]
    q, k = (feats + 0.3 * torch.randn(1, seq, heads, 16, generator=gen) for _ in range(2))
    return q, k, torch.randn(1, seq, heads, 16, generator=gen)


def reference_twin(state: SkipState) -> SkipState:
    """A state equal to ``state`` for the reference backend (same tiles, lists, anchor, count)."""
    twin = SkipState()
    twin.initialize(state.shape, state.tiles, state.device, state.must_compute_queries, state.must_compute_keys)
    twin.keep.copy_(state.keep), twin.anchor.copy_(state.anchor), twin.kept.copy_(state.kept)
    twin.calls = state.calls
    return twin


def call_both(state, twin, q, k, v, **kwargs):
    """One call on each; asserts equal outputs and states."""
    out = lite_attention(q, k, v, state, backend=NAME, **kwargs)
    expected = lite_attention(q, k, v, twin, backend="reference", **kwargs)
    assert torch.equal(out, expected)
    assert torch.equal(state.keep, twin.keep) and torch.equal(state.anchor, twin.anchor)
    assert int(state.kept) == int(twin.kept) and state.calls == twin.calls
    return out


def test_calls_of_one_form_after_the_first_are_repeated_and_equal_the_reference(backend):
    q, k, v = inputs()
    state = SkipState()
    lite_attention(q, k, v, state, threshold=-3.0, backend=NAME)
    twin = reference_twin(state)
    for seed in range(1, 5):  # new inputs of the same form: the repeat, on the state the calls keep rewriting
        call_both(state, twin, *inputs(seed=seed), threshold=-3.0)
    assert backend.ran == ["forward"] + ["repeat"] * 4
    assert state.kept_fraction() < 1.0  # tiles were skipped: the repeat read and wrote the lists


def test_a_repeat_is_told_whether_its_caller_keeps_the_lse(backend):
    q, k, v = inputs()
    state = SkipState()
    lite_attention(q, k, v, state, threshold=-3.0, backend=NAME)
    out = lite_attention(q, k, v, state, threshold=-3.0, backend=NAME)
    out_lse = lite_attention(q, k, v, state, threshold=-3.0, backend=NAME, return_lse=True)
    assert isinstance(out, torch.Tensor) and len(out_lse) == 2
    # the patcher's calls (out only) let the backend reuse an LSE buffer; a caller of the LSE gets its own
    assert backend.lse_wanted == [False, True]


CHANGES = {
    "threshold": dict(threshold=-2.0),
    "softmax scale": dict(softmax_scale=0.3),
    "read-only call": dict(vote=False),
    "must-compute ranges": dict(must_compute_queries=[(0, 8)], must_compute_keys=[(0, 8)]),
    "key mask": dict(key_mask=torch.ones(1, 512, dtype=torch.bool)),
    "key lengths": dict(key_lengths=[500]),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_call_that_differs_in_any_argument_goes_through_the_forward(backend, change):
    q, k, v = inputs()
    state = SkipState()
    for _ in range(2):
        lite_attention(q, k, v, state, threshold=-3.0, backend=NAME)
    twin = reference_twin(state)
    backend.ran.clear()
    call_both(state, twin, q, k, v, **{"threshold": -3.0, **CHANGES[change]})
    assert backend.ran == ["forward"]


@pytest.mark.parametrize("change", ["sequence length", "dtype", "heads"])
def test_inputs_of_another_form_go_through_the_forward(backend, change):
    q, k, v = inputs()
    state = SkipState()
    for _ in range(2):
        lite_attention(q, k, v, state, threshold=-3.0, backend=NAME)
    backend.ran.clear()
    other = {"sequence length": inputs(seq=400), "heads": inputs(heads=3),
             "dtype": tuple(t.double() for t in (q, k, v))}[change]
    if change == "dtype":  # no backend takes float64: the forward's check must still refuse it
        with pytest.raises(TypeError, match="float64"):
            lite_attention(*other, state, threshold=-3.0, backend=NAME)
        assert backend.ran == []
        return
    lite_attention(*other, state, threshold=-3.0, backend=NAME)
    assert backend.ran == ["forward"] and state.kept_fraction() == 1.0  # sized again: every tile


def test_a_state_reset_or_forced_or_a_new_registration_goes_through_the_forward(backend):
    q, k, v = inputs()
    state = SkipState()
    for _ in range(2):
        lite_attention(q, k, v, state, threshold=-3.0, backend=NAME)
    backend.ran.clear()
    state.reset()
    lite_attention(q, k, v, state, threshold=-3.0, backend=NAME)
    registry.register_backend(registry.get(NAME))  # registered again: what "auto" picks may have changed
    lite_attention(q, k, v, state, threshold=-3.0, backend=NAME)
    assert backend.ran == ["forward", "forward"]


def test_a_repeat_that_refuses_leaves_the_call_to_the_forward(backend):
    """The backend's repeat returns None when its own facts changed (the CuTe backend's: another writer wrote the
    state's lists): the call is made by the forward, with the same result."""
    q, k, v = inputs()
    state = SkipState()
    lite_attention(q, k, v, state, threshold=-3.0, backend=NAME)
    twin = reference_twin(state)
    backend.stale = True
    call_both(state, twin, q, k, v, threshold=-3.0)
    assert backend.ran == ["forward", "forward"]


def test_alternate_order_and_odd_arguments_are_never_repeated(backend):
    q, k, v = inputs()
    state = SkipState()
    for _ in range(2):
        lite_attention(q, k, v, state, threshold=-3.0, order="alternate", backend=NAME)
    tensor_threshold = SkipState()
    for _ in range(2):
        lite_attention(q, k, v, tensor_threshold, threshold=torch.tensor(-3.0).item(), backend=NAME)
    assert backend.ran == ["forward"] * 2 + ["forward", "repeat"]
    with pytest.raises(ValueError, match="threshold"):  # a NaN threshold is refused on a repeatable state too
        lite_attention(q, k, v, tensor_threshold, threshold=math.nan, backend=NAME)
    with pytest.raises(ValueError, match="threshold"):
        lite_attention(q, k, v, tensor_threshold, threshold=1.0, backend=NAME)


def test_backends_without_a_repeat_keep_no_repeat_on_the_state():
    q, k, v = inputs()
    state = SkipState()
    for _ in range(2):
        lite_attention(q, k, v, state, threshold=-3.0, backend="reference")
    assert state.repeat is None


def test_a_state_copied_out_of_inference_mode_goes_through_the_forward(backend):
    """The patcher copies a state made under ``torch.inference_mode`` before using it outside: the copy's lists are
    new tensors, which the repeat made for the old ones must not write."""
    q, k, v = inputs()
    state = SkipState()
    with torch.inference_mode():
        for _ in range(2):
            lite_attention(q, k, v, state, threshold=-3.0, backend=NAME)
    state.usable_outside_inference_mode()
    twin = reference_twin(state)
    backend.ran.clear()
    call_both(state, twin, q, k, v, threshold=-3.0)
    assert backend.ran == ["forward"]


def test_a_copied_or_pickled_state_does_not_take_the_original_s_repeat(backend):
    """A state's repeat writes that state's buffers: a deep copy (or an unpickled state) must make its next call
    through the forward, on its own buffers, and leave the original untouched."""
    import copy
    import io

    q, k, v = inputs()
    state = SkipState()
    for _ in range(2):
        lite_attention(q, k, v, state, threshold=-3.0, backend=NAME)
    original = (state.keep.clone(), state.anchor.clone(), int(state.kept))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(state), torch.load(buffer, weights_only=False)):
        assert twin.repeat is None and state.repeat is not None
        backend.ran.clear()
        lite_attention(*inputs(seed=7), twin, threshold=-3.0, backend=NAME)
        assert backend.ran == ["forward"]
    assert torch.equal(state.keep, original[0]) and torch.equal(state.anchor, original[1])
    assert int(state.kept) == original[2]
