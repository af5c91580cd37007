"""litepatch: LiteAttention for diffusion transformers.

>>> import litepatch
>>> handle = litepatch.apply(pipe.transformer, threshold=-6.0, warmup_steps=8)
>>> video = pipe(prompt, num_inference_steps=50).frames
>>> print(handle.stats().table())
>>> handle.remove()

This package is the top floor of the house (DESIGN §2): its names are attributes resolved on first use
(PEP 562), so that importing a room below (``litepatch.kernels``, ``litepatch.recipes``) runs no code of
the rooms above it. ``litepatch.apply`` imports the patcher, ``litepatch.calibrate`` the calibrator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from litepatch.kernels.lazy_names import lazy_names as _lazy_names

from .version import __version__

# public name -> the module that owns it
_LAZY = {
    "DEFAULT_THRESHOLD": "litepatch.kernels.vocabulary",
    "LiteHandle": "litepatch.api",
    "apply": "litepatch.api",
    "fingerprint": "litepatch.api",
    "inspect": "litepatch.api",
    "remove": "litepatch.api",
    "Adapter": "litepatch.adapters",
    "AttentionLayerInfo": "litepatch.adapters",
    "register_adapter": "litepatch.adapters",
    "LayerSetting": "litepatch.recipes.schema",
    "ModelFingerprint": "litepatch.recipes.schema",
    "Recipe": "litepatch.recipes.schema",
    "LiteStats": "litepatch.stats",
}

if TYPE_CHECKING:
    from litepatch.adapters import Adapter, AttentionLayerInfo, register_adapter
    from litepatch.api import LiteHandle, apply, fingerprint, inspect, remove
    from litepatch.kernels.vocabulary import DEFAULT_THRESHOLD
    from litepatch.recipes.schema import LayerSetting, ModelFingerprint, Recipe
    from litepatch.stats import LiteStats


__getattr__, __dir__ = _lazy_names(globals(), _LAZY)


def calibrate(*args, **kwargs):
    """Front door to :func:`litepatch.calibration.calibrate` (imports optuna only when called)."""
    from litepatch import calibration

    return calibration.calibrate(*args, **kwargs)


__all__ = [
    "DEFAULT_THRESHOLD",
    "Adapter",
    "AttentionLayerInfo",
    "LayerSetting",
    "LiteHandle",
    "LiteStats",
    "ModelFingerprint",
    "Recipe",
    "__version__",
    "apply",
    "calibrate",
    "fingerprint",
    "inspect",
    "register_adapter",
    "remove",
]
