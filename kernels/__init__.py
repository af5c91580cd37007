"""LiteAttention kernels: the skip-state layout, the PyTorch reference and the Triton forward.

>>> from litepatch.kernels import SkipState, lite_attention
>>> state = SkipState()
>>> out = lite_attention(q, k, v, state, threshold=-6.0)
"""

from .interface import available_backends, check_threshold, lite_attention, register_backend
from .reference import reference_forward
from .state import DEFAULT_TILES, ORDERS, SkipState, TileConfig, pack_bits, unpack_bits

__all__ = [
    "DEFAULT_TILES",
    "ORDERS",
    "SkipState",
    "TileConfig",
    "available_backends",
    "check_threshold",
    "lite_attention",
    "pack_bits",
    "reference_forward",
    "register_backend",
    "unpack_bits",
]
