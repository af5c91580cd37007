"""Recipe schema (DESIGN §5): the calibrated LiteAttention settings of one model in one context.

A recipe is data: an OmegaConf structured config of the dataclasses below, stored as YAML.
Thresholds resolve per layer and step with :meth:`Recipe.threshold_for`: the recipe default (or its
per-step schedule), then every matching entry of ``layers`` in order (fnmatch patterns on the
attention module's name), a dense layer last.

Example:
    >>> recipe = Recipe(name="wan-720p", threshold=-6.0, warmup_steps=8,
    ...                 layers={"blocks.0.*": LayerSetting(dense=True)})
    >>> recipe.threshold_for("blocks.3.attn1", step=10)
    -6.0
    >>> recipe.threshold_for("blocks.0.attn1", step=10) is None   # dense
    True
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Optional

from litepatch.kernels.vocabulary import (  # noqa: F401  (re-exported for recipe validation)
    DEFAULT_ORDER,
    DEFAULT_THRESHOLD,
    ORDERS,
    describe_value,
    threshold_problem,
)

FORMAT_VERSION = 1
# The value sets of the recipe's enumerated fields (validation refuses anything else).
CFG_MODES = ("sequential", "batched", "none")  # Context.cfg_mode
SOURCES = ("calibration", "published-defaults", "manual")  # Provenance.source


@dataclass
class ModelFingerprint:
    """What identifies the model a recipe was made for (compared before the model is touched)."""

    model_class: str = ""
    num_layers: int = 0
    heads: int = 0
    head_dim: int = 0
    layer_names: list[str] = field(default_factory=list)


@dataclass
class Context:
    """The generation setting the recipe was calibrated in."""

    resolution: Optional[str] = None  # e.g. "1280x720"
    frames: Optional[int] = None
    steps: Optional[int] = None
    scheduler: Optional[str] = None
    cfg_mode: Optional[str] = None  # one of CFG_MODES


@dataclass
class LayerSetting:
    """Override for the layers whose name matches a pattern; unset fields keep the default."""

    threshold: Optional[float] = None
    schedule: list[float] = field(default_factory=list)  # per-step thresholds, last value repeats
    dense: bool = False


@dataclass
class Measured:
    """Quality and speed measured for this recipe (empty for uncalibrated recipes)."""

    psnr: Optional[float] = None
    ssim: Optional[float] = None
    rel_l2: Optional[float] = None
    kept_fraction: Optional[float] = None
    speedup: Optional[float] = None
    hardware: Optional[str] = None
    litepatch_version: Optional[str] = None


@dataclass
class Provenance:
    """Where the numbers come from."""

    source: str = "manual"  # one of SOURCES
    notes: str = ""
    budget: Optional[str] = None
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    study: Optional[str] = None
    hub_revision: Optional[str] = None


@dataclass
class Recipe:
    """Calibrated LiteAttention settings; see the module docstring."""

    format_version: int = FORMAT_VERSION
    name: str = "custom"
    description: str = ""
    fingerprint: Optional[ModelFingerprint] = None  # None: applies to any model
    context: Context = field(default_factory=Context)
    warmup_steps: int = 0
    threshold: float = DEFAULT_THRESHOLD
    schedule: list[float] = field(default_factory=list)  # default per-step thresholds, last value repeats
    order: str = DEFAULT_ORDER  # one of ORDERS (the kernel's visiting orders)
    layers: dict[str, LayerSetting] = field(default_factory=dict)
    measured: Measured = field(default_factory=Measured)
    provenance: Provenance = field(default_factory=Provenance)

    def threshold_for(self, layer_name: str, step: int) -> float | None:
        """Threshold of ``layer_name`` at denoising ``step`` (0-based), or ``None`` when it stays dense."""
        threshold = _scheduled(self.schedule, step, self.threshold)
        layers = self.layers
        if not layers:  # one threshold for every layer (apply(model, threshold=...)): asked per layer per forward
            return threshold
        for pattern in _matching(layer_name, tuple(layers)):
            setting = layers[pattern]
            if setting.dense:
                return None
            base = setting.threshold if setting.threshold is not None else threshold
            threshold = _scheduled(setting.schedule, step, base)
        return threshold

    def sparse_anywhere(self) -> bool:
        """False when every threshold is -inf (the recipe never skips)."""
        values = [self.threshold, *self.schedule]
        for setting in self.layers.values():
            values += [v for v in [setting.threshold, *setting.schedule] if v is not None]
        return any(v > -math.inf for v in values)


_MATCHES: dict[tuple[str, tuple[str, ...]], tuple[str, ...]] = {}


def _matching(layer_name: str, patterns: tuple[str, ...]) -> tuple[str, ...]:
    """The patterns of ``patterns`` that match ``layer_name``, in order; remembered, since a patched model asks for
    every layer on every forward (a calibrated recipe names each layer: L x L pattern tests per forward)."""
    key = (layer_name, patterns)
    found = _MATCHES.get(key)
    if found is None:
        if len(_MATCHES) >= 4096:
            _MATCHES.clear()
        found = _MATCHES[key] = tuple(p for p in patterns if fnmatch.fnmatchcase(layer_name, p))
    return found


def _scheduled(schedule: list[float], step: int, default: float) -> float:
    if not schedule:
        return default
    return float(schedule[min(step, len(schedule) - 1)])
