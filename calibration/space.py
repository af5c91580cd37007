"""The search space of a calibration (module docstring of :mod:`.search`: what a trial picks).

Calibration jobs read :class:`SearchSpace` as the schema of their ``search:`` section (:mod:`.job`).

Example:
    >>> SearchSpace(level=(-12.0, -1.0), orders=("anchor", "alternate")).probe
    -2.65
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from litepatch.kernels import DEFAULT_ORDER, ORDERS


MIN_THRESHOLD = -24.0


@dataclass(frozen=True)
class SearchSpace:
    """Bounds of the low-dimensional search; see the module docstring for the parameters.

    Args:
        level (`tuple[float, float]`, defaults to `(-14.0, -0.5)`): global threshold range (log2 units).
        spread (`tuple[float, float]`, defaults to `(0.0, 3.0)`): sensitivity offset scale range.
        warmup (`tuple[int, int] | None`): dense warm-up steps; ``None`` = ``(0, ~30 % of the steps)``.
        max_dense_layers (`int`, defaults to `0`): up to this many most-sensitive layers may stay dense.
        schedule (`bool`, defaults to `False`): search a per-step ramp ``late`` in ``late_range``.
        probe (`float`, *optional*): threshold of the sensitivity pass; defaults to 85 % of the way up the
            level range (aggressive enough that every layer skips something).
        sensitivity_runs (`int`, defaults to `12`): at most this many sensitivity generations; deeper
            models are probed in contiguous groups of layers.
        orders (`tuple[str, ...]`, defaults to `("anchor",)`): visiting orders to choose from; with more
            than one (``("anchor", "alternate")``) every trial picks one. With one, it is the order of
            every trial and of the sensitivity pass.
    """

    # Optional[...] rather than ``X | None``: calibration jobs read this class as their OmegaConf schema
    level: tuple[float, float] = (-14.0, -0.5)
    spread: tuple[float, float] = (0.0, 3.0)
    warmup: Optional[tuple[int, int]] = None
    max_dense_layers: int = 0
    schedule: bool = False
    late_range: tuple[float, float] = (-3.0, 3.0)
    probe: Optional[float] = None
    sensitivity_runs: int = 12
    orders: tuple[str, ...] = (DEFAULT_ORDER,)

    def __post_init__(self):
        if self.probe is None:
            object.__setattr__(self, "probe", round(self.level[1] - 0.15 * (self.level[1] - self.level[0]), 3))
        lo, hi = self.level
        if not (MIN_THRESHOLD <= lo < hi <= 0):
            raise ValueError(f"level range must satisfy {MIN_THRESHOLD} <= low < high <= 0, got {self.level}")
        if not (0 <= self.spread[0] <= self.spread[1]):
            raise ValueError(f"spread range must satisfy 0 <= low <= high, got {self.spread}")
        if self.warmup is not None and not (0 <= self.warmup[0] <= self.warmup[1]):
            raise ValueError(f"warmup range must satisfy 0 <= low <= high, got {self.warmup}")
        if self.max_dense_layers < 0:
            raise ValueError(f"max_dense_layers must be >= 0, got {self.max_dense_layers}")
        if not (MIN_THRESHOLD <= self.probe <= 0):
            raise ValueError(f"probe threshold must be in [{MIN_THRESHOLD}, 0], got {self.probe}")
        if self.sensitivity_runs < 0:
            raise ValueError(f"sensitivity_runs must be >= 0, got {self.sensitivity_runs}")
        object.__setattr__(self, "orders", tuple(self.orders))
        bad = [o for o in self.orders if o not in ORDERS]
        if not self.orders or bad or len(set(self.orders)) != len(self.orders):
            raise ValueError(f"orders must be distinct names from {ORDERS}, got {list(self.orders)}")

    def to_dict(self) -> dict:
        return {
            "level": list(self.level), "spread": list(self.spread),
            "warmup": list(self.warmup) if self.warmup is not None else None,
            "max_dense_layers": self.max_dense_layers, "schedule": self.schedule,
            "late_range": list(self.late_range), "probe": self.probe, "sensitivity_runs": self.sensitivity_runs,
            # only when not the default, so that studies made before the field existed still resume
            **({"orders": list(self.orders)} if self.orders != (DEFAULT_ORDER,) else {}),
        }
