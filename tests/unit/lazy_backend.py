"""A backend that registers itself when its module is imported, as the GPU backends do (``registry._MODULES``), and
takes no float32 call: choosing a backend then imports this module, inside the first trace of a compiled model when
nothing chose one before (``test_patcher_compile.py``)."""

from __future__ import annotations

import torch

from litepatch.kernels import registry
from litepatch.kernels.state import TileConfig

NAME = "lazy-test"


def _never_called(*args, **kwargs):
    raise AssertionError("the lazy test backend takes no call")


registry.register_backend(registry.Backend(
    NAME, _never_called, lambda head_dim: TileConfig(128, 64),
    registry.Constraints(device_types=("cpu",), dtypes=(torch.float64,))))
