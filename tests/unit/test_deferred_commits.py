"""litepatch.kernels.commits: the window in which backends may defer commits, and the patcher holding it open for the
length of a patched forward (closing it when the forward returns or raises). The CuTe backend's deferred batch is
checked under Triton's interpreter (cute_protocol_check.py) and on the GPU (tests/gpu/test_kernel.py)."""

from __future__ import annotations

import threading

import pytest
import torch

import litepatch
from litepatch.kernels import commits, lite_attention, registry
from litepatch.kernels.reference import reference_forward

import tiny_models as tm


@pytest.fixture
def flushes(monkeypatch):
    """Counts the registered flushes (a backend's deferred-commit launch)."""
    seen = []
    monkeypatch.setattr(commits, "_FLUSHES", [lambda: seen.append(commits.window_open())])
    yield seen
    commits.close_window()


def test_the_window_is_per_thread_and_closing_it_flushes(flushes):
    commits.open_window()
    other = []
    thread = threading.Thread(target=lambda: other.append(commits.window_open()))
    thread.start(), thread.join()
    assert commits.window_open() and other == [False]
    commits.flush()  # launches what waits, the window stays open
    assert commits.window_open() and flushes == [True]
    commits.close_window()
    assert not commits.window_open() and flushes == [True, False]


def test_a_patched_forward_holds_the_window_open_and_closes_it_when_it_returns_or_raises(flushes):
    seen = []

    def forward(*args, **kwargs):
        seen.append(commits.window_open())
        return reference_forward(*args, **kwargs)

    name = "test-window"
    registry.register_backend(registry.Backend(name, forward, registry.get("reference").tiles,
                                               registry.Constraints(device_types=("cpu",), dtypes=(torch.float32,))))
    try:
        model, inputs = tm.wan_style()
        handle = litepatch.apply(model, threshold=-2.0, warmup_steps=0, backend=name)
        with torch.inference_mode():
            model(**inputs)
            assert seen and all(seen) and not commits.window_open()  # open in every call, closed after
            assert flushes[-1] is False
            block = model.blocks[1]
            block.forward = lambda *args, **kwargs: 1 / 0
            with pytest.raises(ZeroDivisionError):
                model(**{**inputs, "t": torch.tensor([900.0])})
            assert not commits.window_open()  # closed although the forward raised
            del block.forward
            handle.remove()
            seen.clear()
            lite_attention(*(torch.randn(1, 300, 2, 32),) * 3, threshold=-2.0, backend=name)
        assert seen == [False]  # outside a patched forward: nothing may wait
    finally:
        registry._REGISTERED.pop(name)
