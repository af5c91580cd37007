"""litepatch: LiteAttention for diffusion transformers.

>>> import litepatch
>>> handle = litepatch.apply(pipe.transformer, threshold=-6.0, warmup_steps=8)
>>> video = pipe(prompt, num_inference_steps=50).frames
>>> print(handle.stats().table())
>>> handle.remove()
"""

__version__ = "0.1.0"

from .api import DEFAULT_THRESHOLD, LiteHandle, apply, fingerprint, inspect, remove  # noqa: E402
from .adapters import Adapter, AttentionLayerInfo, register_adapter  # noqa: E402
from .recipes.schema import LayerSetting, ModelFingerprint, Recipe  # noqa: E402
from .stats import LiteStats  # noqa: E402



def calibrate(*args, **kwargs):
    """Front door to :func:`litepatch.calibration.calibrate` (imports optuna only when called)."""
    from .calibration import calibrate as _calibrate

    return _calibrate(*args, **kwargs)


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
