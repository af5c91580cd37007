"""LiteAttention kernels: the skip-state layout, the backend registry, the PyTorch reference, the Triton
and CuTe-DSL forwards.

>>> from litepatch.kernels import SkipState, lite_attention
>>> state = SkipState()
>>> out = lite_attention(q, k, v, state, threshold=-6.0)
"""

import importlib as _importlib
import sys as _sys

if __name__ != "litepatch.kernels":
    # Imported under another name: the repository root on sys.path makes this folder a top-level
    # `kernels`, which transformers probes by importing it. A second copy would re-register the custom
    # op against an empty backend registry, so hand out the one real package instead.
    _sys.modules[__name__] = _importlib.import_module("litepatch.kernels")
else:
    from .dense import dense_attention, dense_kernel_name
    from .interface import available_backends, check_threshold, key_mask_from, key_padding_view, lite_attention
    from .reference import reference_forward
    from .registry import Backend, BackendUnavailable, Constraints, register_backend
    from .state import DEFAULT_TILES, ORDERS, SkipState, TileConfig, pack_bits, unpack_bits
    from .vocabulary import DEFAULT_ORDER, DEFAULT_THRESHOLD

    __all__ = [
        "DEFAULT_ORDER",
        "DEFAULT_THRESHOLD",
        "DEFAULT_TILES",
        "Backend",
        "BackendUnavailable",
        "Constraints",
        "key_mask_from",
        "key_padding_view",
        "ORDERS",
        "SkipState",
        "TileConfig",
        "available_backends",
        "check_threshold",
        "dense_attention",
        "dense_kernel_name",
        "lite_attention",
        "pack_bits",
        "reference_forward",
        "register_backend",
        "unpack_bits",
    ]
