"""LiteAttention kernels: the skip-state layout, the backend registry, the PyTorch reference, the Triton
and CuTe-DSL forwards.

>>> from litepatch.kernels import SkipState, lite_attention
>>> state = SkipState()
>>> out = lite_attention(q, k, v, state, threshold=-6.0)
"""

import importlib as _importlib
import sys as _sys


def _installed_namesake(name: str):
    """Another installed top-level package of this name (Hugging Face's `kernels`, which transformers
    requires and diffusers imports), loaded from the sys.path entries other than this checkout's root;
    None when there is none."""
    import importlib.machinery
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [p for p in _sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    _sys.modules[name] = module  # before running it, as the import system does: its own imports see it
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del _sys.modules[name]
        raise
    return module


if __name__ != "litepatch.kernels":
    # Imported under another name: the repository root on sys.path (`python -m ...` run from a checkout)
    # makes this folder a top-level `kernels`. Where Hugging Face's `kernels` is installed, that is the
    # package the importer wants (diffusers imports `kernels.CUDAProperties` through transformers); where
    # it is not, transformers probes the name by importing it, and a second copy of this package would
    # re-register the custom op against an empty backend registry: hand out the one real package.
    _sys.modules[__name__] = _installed_namesake(__name__) or _importlib.import_module("litepatch.kernels")
else:
    # Names load on first use (PEP 562), so that a room above reading only the vocabulary (thresholds, orders: the
    # recipes) does not import torch and torch._dynamo through the backends (4 s of `litepatch recipes list`).
    from .lazy_names import lazy_names as _lazy_names

    _LAZY = {  # public name -> its submodule
        **dict.fromkeys(("beats_sdpa", "dense_attention", "dense_kernel_name", "faster_dense_attention",
                         "sdpa_attention"), "dense"),
        **dict.fromkeys(("available_backends", "check_threshold", "key_mask_from", "key_padding_view",
                         "lite_attention", "repeat_call"), "interface"),
        "reference_forward": "reference",
        **dict.fromkeys(("Backend", "BackendUnavailable", "Constraints", "register_backend"), "registry"),
        **dict.fromkeys(("DEFAULT_TILES", "ORDERS", "SkipState", "TileConfig", "pack_bits", "unpack_bits"), "state"),
        **dict.fromkeys(("DEFAULT_ORDER", "DEFAULT_THRESHOLD"), "vocabulary"),
    }
    __all__ = sorted(_LAZY)
    __getattr__, __dir__ = _lazy_names(globals(), {name: f"{__name__}.{module}" for name, module in _LAZY.items()})
