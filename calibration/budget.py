"""Quality budgets: ``"psnr >= 30"``, ``"rel_l2 <= 0.05 and ssim >= 0.95"``.

A budget is one or more clauses ``metric op bound`` (``op`` is ``>=``, ``>``, ``<=`` or ``<``),
joined by ``and`` or ``,`` (or given as a list). It must hold on every calibration sample. For the
search each clause becomes an Optuna constraint value that is ``<= 0`` when the clause holds.

Example:
    >>> budget = Budget.parse("psnr >= 30 and rel_l2 <= 0.05")
    >>> budget.holds({"psnr": 31.0, "rel_l2": 0.01})
    True
    >>> budget.violations({"psnr": 28.0, "rel_l2": 0.01})
    [2.0, -0.04]
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .metrics import get_metric

_OPS = (">=", "<=", ">", "<")
_CLAUSE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|>|<|==|=>|=<|=)\s*(\S+)\s*$")
_LARGE = 1e9  # stands in for an infinite margin (identical outputs: PSNR = inf)


@dataclass(frozen=True)
class Clause:
    """``metric op bound``; ``op`` agrees with the metric's direction."""

    metric: str
    op: str
    bound: float

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.bound:g}"

    def violation(self, value: float) -> float:
        """Constraint value: ``<= 0`` when ``value`` meets the bound, else by how much it misses."""
        margin = (self.bound - value) if self.op in (">=", ">") else (value - self.bound)
        if self.op in (">", "<") and margin == 0:
            margin = 1e-12
        return float(max(-_LARGE, min(_LARGE, margin))) if not math.isnan(margin) else _LARGE

    def holds(self, value: float) -> bool:
        return {">=": value >= self.bound, ">": value > self.bound,
                "<=": value <= self.bound, "<": value < self.bound}[self.op]


@dataclass(frozen=True)
class Budget:
    """The quality budget of a calibration: every clause must hold on every sample."""

    clauses: tuple[Clause, ...]

    @classmethod
    def parse(cls, spec: str | Sequence[str] | Budget) -> Budget:
        """Parses ``"psnr >= 30"``, ``"psnr >= 30 and ssim >= 0.9"``, ``"psnr>=30, rel_l2<=0.05"`` or a list.

        Raises ``ValueError`` naming the bad clause: unknown metric (with the known ones), unknown
        operator, a bound that is not a finite number, or a direction that the metric cannot mean
        (``psnr <= 30`` asks for *worse* quality).
        """
        if isinstance(spec, Budget):
            return spec
        if isinstance(spec, str):
            parts = [p for p in re.split(r"\s+and\s+|,|&&", spec.strip()) if p.strip()]
        elif isinstance(spec, Sequence) and all(isinstance(p, str) for p in spec):
            parts = [p for s in spec for p in re.split(r"\s+and\s+|,|&&", s.strip()) if p.strip()]
        else:
            raise TypeError(f"budget must be a string like 'psnr >= 30' or a list of them, got {spec!r}")
        if not parts:
            raise ValueError(f"empty budget {spec!r}; write e.g. 'psnr >= 30'")
        clauses = []
        for part in parts:
            match = _CLAUSE.match(part)
            if not match:
                raise ValueError(
                    f"cannot parse budget clause {part.strip()!r}; expected 'metric op bound' "
                    f"with op one of {', '.join(_OPS)}, e.g. 'psnr >= 30'"
                )
            name, op, raw = match.groups()
            if op not in _OPS:
                raise ValueError(f"budget clause {part.strip()!r}: operator {op!r} is not one of {', '.join(_OPS)}")
            try:
                metric = get_metric(name)
            except ValueError as err:
                raise ValueError(f"budget clause {part.strip()!r}: {err}") from None
            try:
                bound = float(raw)
            except ValueError:
                raise ValueError(f"budget clause {part.strip()!r}: bound {raw!r} is not a number") from None
            if not math.isfinite(bound):
                raise ValueError(f"budget clause {part.strip()!r}: bound must be finite, got {raw!r}")
            wants_high = op in (">=", ">")
            if wants_high != metric.higher_is_better:
                better = ">=" if metric.higher_is_better else "<="
                raise ValueError(
                    f"budget clause {part.strip()!r}: {name} is {'higher' if metric.higher_is_better else 'lower'}"
                    f"-is-better, so the budget must read '{name} {better} {raw}'"
                )
            clauses.append(Clause(name, op, bound))
        return cls(tuple(clauses))

    @property
    def metrics(self) -> list[str]:
        return list(dict.fromkeys(c.metric for c in self.clauses))

    def __str__(self) -> str:
        return " and ".join(str(c) for c in self.clauses)

    def violations(self, values: Mapping[str, float]) -> list[float]:
        """One constraint value per clause (``<= 0`` feasible) for one sample's metric values."""
        return [c.violation(values[c.metric]) for c in self.clauses]

    def holds(self, values: Mapping[str, float]) -> bool:
        return all(c.holds(values[c.metric]) for c in self.clauses)

    def worst(self, per_sample: Sequence[Mapping[str, float]]) -> dict[str, float]:
        """Worst value of each budget metric over samples (min for similarities, max for distances)."""
        out = {}
        for name in self.metrics:
            values = [s[name] for s in per_sample]
            out[name] = min(values) if get_metric(name).higher_is_better else max(values)
        return out
