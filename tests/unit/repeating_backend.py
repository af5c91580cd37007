"""A CPU stand-in for the CuTe backend's repeated calls (``Backend.repeat``): its forward is the reference, and its
repeat makes the reference call again with the arguments it was given once, counting what ran. Shared by the tests of
``lite_attention``'s repeat (``test_kernel_repeat.py``) and of the patcher's (``test_patcher_again.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from litepatch.kernels import registry
from litepatch.kernels.reference import reference_forward
from litepatch.kernels.registry import Backend, Constraints


class Repeating:
    """The stand-in backend's forward and repeat, counting what ran; ``stale``: its repeats refuse to run."""

    def __init__(self):
        self.ran: list[str] = []
        self.lse_wanted: list[bool] = []
        self.stale = False

    def forward(self, *args, **kwargs):
        self.ran.append("forward")
        return reference_forward(*args, **kwargs)

    def repeat(self, q, k, v, keep, anchor, kept, must_q, must_k, key_valid, **options):
        if not options["use_anchor"]:  # the visiting direction of "alternate" changes every call
            return None

        def again(q, k, v, lse_wanted=True):
            if self.stale:
                return None
            self.ran.append("repeat")
            self.lse_wanted.append(lse_wanted)
            return reference_forward(q, k, v, keep, anchor, kept, must_q, must_k, key_valid, **options)

        return again


@contextmanager
def registered(name: str) -> Iterator[Repeating]:
    """A :class:`Repeating` backend registered as ``name`` (CPU, float32, the reference's tiles: states of one layout
    as the reference backend's) for the length of the block."""
    repeating = Repeating()
    registry.register_backend(Backend(
        name, repeating.forward, registry.get("reference").tiles,
        Constraints(device_types=("cpu",), dtypes=(torch.float32,)), repeat=repeating.repeat))
    try:
        yield repeating
    finally:
        registry._REGISTERED.pop(name)
