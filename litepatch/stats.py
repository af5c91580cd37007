"""Sparsity statistics of a patched model: fraction of attention tiles computed per call.

During generation each sparse call appends a raw record whose computed-tile count stays a 0-dim
tensor on the device (no host synchronisation); :meth:`CallLog.freeze` turns them into numbers in
one transfer when :meth:`LiteHandle.stats` is called.

Example:
    >>> stats = handle.stats()
    >>> stats.kept_fraction()        # over every call of the sparse layers, dense calls count 1.0
    0.62
    >>> print(stats.table())
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

RECORD_KEYS = (
    "layer", "step", "branch", "generation", "kept_fraction", "dense", "reason", "kept_tiles", "total_tiles",
)
RAW_FIELDS = ("layer", "step", "branch", "generation", "dense", "reason", "kept", "total")  # CallLog.raw tuples
KEPT = RAW_FIELDS.index("kept")


@dataclass
class CallLog:
    """Raw per-call records, tuples in :data:`RAW_FIELDS` order (every layer adds one per forward); ``kept`` may be
    a device tensor until :meth:`freeze`."""

    raw: list[tuple] = field(default_factory=list)

    def add(self, records: list[tuple[list, torch.Tensor | None]]) -> None:
        """Adds ``(fields, count)`` records in order, ``fields`` in :data:`RAW_FIELDS` order. Where a record comes with
        a 0-dim ``count`` tensor (a skip state's, which the next call overwrites), the counts are copied here, in one
        stack per device, and each record keeps its view of the copy as ``kept``."""
        by_device: dict = {}
        for index, (_, count) in enumerate(records):
            if count is not None:
                by_device.setdefault(count.device, []).append(index)
        for indices in by_device.values():
            for index, copy in zip(indices, torch.stack([records[i][1] for i in indices]).unbind()):
                records[index][0][KEPT] = copy
        self.raw.extend(tuple(fields) for fields, _ in records)

    def clear(self) -> None:
        self.raw.clear()

    def freeze(self) -> list[dict]:
        tensors = [r[KEPT] for r in self.raw if isinstance(r[KEPT], torch.Tensor)]
        # One transfer for all calls: the counts stay on the device until here.
        values = iter(torch.stack([t.detach().to(torch.int64) for t in tensors]).tolist() if tensors else [])
        records = []
        for layer, step, branch, generation, dense, reason, kept, total in self.raw:
            kept = next(values) if isinstance(kept, torch.Tensor) else int(kept)
            total = int(total)
            records.append(
                {"layer": layer, "step": step, "branch": branch, "generation": generation,
                 "kept_fraction": kept / total if total else 1.0, "dense": dense, "reason": reason,
                 "kept_tiles": kept, "total_tiles": total}
            )
        return records


def _weighted(records: list[dict]) -> float:
    total = sum(r["total_tiles"] for r in records)
    if total == 0:
        return 1.0
    return sum(r["kept_tiles"] for r in records) / total


@dataclass
class LiteStats:
    """Per-call records of the patched (self and joint) layers, with summaries.

    Attributes:
        records: dicts with ``layer``, ``step``, ``branch``, ``generation``, ``kept_fraction``, ``dense``
            (warm-up, dense layer or fallback: computed every tile), ``reason``, ``kept_tiles``, ``total_tiles``.
        recipe_name: the effective recipe's name.
        hub_revision: ``recipe.provenance.hub_revision`` (None for local recipes).
    """

    records: list[dict]
    recipe_name: str = "custom"
    hub_revision: str | None = None

    def kept_fraction(self) -> float:
        """Tiles computed / tiles of dense attention over every call (dense calls count 1.0)."""
        return _weighted(self.records)

    def per_layer(self, *, kernel_calls_only: bool = False) -> dict[str, float]:
        """Layer name -> tile-weighted kept fraction over all its calls; with ``kernel_calls_only``, over the calls
        that ran the LiteAttention kernel (warm-up, dense-layer and fallback calls left out; a layer with none is
        absent).

        >>> stats.per_layer(kernel_calls_only=True)  # what skipping did where it ran
        """
        groups: dict[str, list[dict]] = defaultdict(list)
        for r in self.records:
            if not (kernel_calls_only and r["dense"]):
                groups[r["layer"]].append(r)
        return {name: _weighted(rs) for name, rs in groups.items()}

    def per_step(self) -> dict[int, float]:
        """Step -> tile-weighted kept fraction over all layers, branches and generations."""
        groups: dict[int, list[dict]] = defaultdict(list)
        for r in self.records:
            groups[r["step"]].append(r)
        return {step: _weighted(groups[step]) for step in sorted(groups)}

    def per_branch(self) -> dict:
        """Branch key (index or cache-context name) -> tile-weighted kept fraction."""
        groups: dict = defaultdict(list)
        for r in self.records:
            groups[r["branch"]].append(r)
        return {branch: _weighted(rs) for branch, rs in groups.items()}

    def table(self) -> str:
        """A plain-text table: per step (kept fraction, dense calls) then per layer."""
        if not self.records:
            return f"litepatch stats ({self.recipe_name}): no attention calls recorded"
        lines = [f"litepatch stats: recipe {self.recipe_name}"
                 + (f" @ {self.hub_revision}" if self.hub_revision else "")
                 + f", {len(self.records)} calls, kept {self.kept_fraction():.1%} of tiles"]
        lines.append(f"{'step':>5}  {'kept':>7}  {'calls':>5}  {'dense':>5}")
        by_step: dict[int, list[dict]] = defaultdict(list)
        for r in self.records:
            by_step[r["step"]].append(r)
        for step in sorted(by_step):
            rs = by_step[step]
            lines.append(f"{step:>5}  {_weighted(rs):>7.1%}  {len(rs):>5}  {sum(r['dense'] for r in rs):>5}")
        width = max(len(name) for name in self.per_layer())
        lines.append(f"{'layer':<{width}}  {'kept':>7}")
        for name, frac in self.per_layer().items():
            lines.append(f"{name:<{width}}  {frac:>7.1%}")
        reasons = sorted({r["reason"] for r in self.records if r["dense"]})
        if reasons:
            lines.append("dense calls: " + "; ".join(reasons))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
