"""Sparsity statistics of a patched model: fraction of attention tiles computed per call.

During generation each sparse call appends a raw record whose computed-tile count stays a 0-dim
tensor on the device (no host synchronisation); :meth:`CallLog.freeze` turns them into numbers in
one transfer when :meth:`LiteHandle.stats` is called.

The log is bounded: past :data:`MAX_CALL_RECORDS` records (a model served for days never calls
``clear_stats``; each record held about 470 bytes), the oldest half is summed into one row per
(layer, step, branch, dense, reason), on the device and without a sync. The summaries stay exact over every
call; ``LiteStats.records`` then holds the recent calls and ``LiteStats.summed`` the older ones.

Example:
    >>> stats = handle.stats()
    >>> stats.kept_fraction()        # over every call of the sparse layers, dense calls count 1.0
    0.62
    >>> print(stats.table())
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

RECORD_KEYS = (
    "layer", "step", "branch", "generation", "kept_fraction", "dense", "reason", "kept_tiles", "total_tiles",
)
RAW_FIELDS = ("layer", "step", "branch", "generation", "dense", "reason", "kept", "total")  # CallLog.raw tuples
KEPT = RAW_FIELDS.index("kept")
MAX_CALL_RECORDS = 100_000
"""Per-call records a handle holds before the oldest half is summed (a 40-layer model with CFG writes 4,000 in a
50-step generation: 25 generations in detail, about 47 MB)."""


@dataclass
class CallLog:
    """Raw per-call records, tuples in :data:`RAW_FIELDS` order (every layer adds one per forward); a sparse call's
    ``kept`` is a :class:`DeviceCount` until :meth:`freeze`."""

    raw: list[tuple] = field(default_factory=list)
    limit: int = MAX_CALL_RECORDS  # records held before the oldest half is summed (:meth:`_sum_oldest`)
    # the summed calls: a row per (layer, step, branch, dense, reason) -> [kept tiles of dense calls, total tiles,
    # calls]; the sparse calls' kept tiles are in ``_summed_kept`` (a device's int64 vector, a slot per row)
    _rows: dict[tuple, list[int]] = field(default_factory=dict, repr=False)
    _summed_kept: dict = field(default_factory=dict, repr=False)

    def add(self, records: list[tuple[list, torch.Tensor | None]]) -> None:
        """Adds ``(fields, count)`` records in order, ``fields`` in :data:`RAW_FIELDS` order. Where a record comes with
        a 0-dim ``count`` tensor (a skip state's, which the next call overwrites), the counts are copied here, in one
        stack per device, and each record's ``kept`` is its row of the copy (:class:`DeviceCount`: no view per
        record, which cost more host time than the stack)."""
        for indices in _by_device([count for _, count in records]).values():
            copy = torch.stack([records[i][1] for i in indices])
            for row, index in enumerate(indices):
                records[index][0][KEPT] = DeviceCount(copy, row)
        self.raw.extend([tuple(fields) for fields, _ in records])
        if len(self.raw) > self.limit:
            self._sum_oldest(len(self.raw) - self.limit // 2)

    def _sum_oldest(self, count: int) -> None:
        """Sums the ``count`` oldest records into their rows. Device counts are added on the device (one stack and
        one ``index_add_`` per device, the row indices copied from pinned memory): no host-device sync."""
        oldest, self.raw = self.raw[:count], self.raw[count:]
        on_device: dict = {}  # device -> (row indices, counts)
        for layer, step, branch, _, dense, reason, kept, total in oldest:
            key = (layer, step, branch, dense, reason)
            row = self._rows.get(key)
            if row is None:
                row = self._rows[key] = [len(self._rows), 0, 0, 0]  # slot, dense kept, total, calls
            row[2] += int(total)
            row[3] += 1
            if isinstance(kept, DeviceCount):
                slots, counts = on_device.setdefault(kept.stack.device, ([], []))
                slots.append(row[0])
                counts.append(kept.stack[kept.row])
            else:
                row[1] += int(kept)
        for device, (slots, counts) in on_device.items():
            summed = self._summed_kept.get(device)
            if summed is None or summed.numel() < len(self._rows):  # new rows: a longer vector, the sums copied over
                longer = torch.zeros(2 * len(self._rows), dtype=torch.int64, device=device)
                if summed is not None:
                    longer[: summed.numel()] = summed
                summed = self._summed_kept[device] = longer
            index = torch.tensor(slots, dtype=torch.int64, pin_memory=device.type == "cuda")
            summed.index_add_(0, index.to(device, non_blocking=True), torch.stack(counts).to(torch.int64))

    def clear(self) -> None:
        self.raw.clear()
        self._rows.clear()
        self._summed_kept.clear()

    def freeze(self) -> tuple[list[dict], list[dict]]:
        """``(records, summed)``: the held calls, one dict each, and the summed older calls, one dict per row (with
        ``calls``, and ``generation`` ``None``)."""
        counts = [r[KEPT] for r in self.raw if isinstance(r[KEPT], DeviceCount)]
        held = iter(_host_ints(counts))  # the counts stay on the device until here: one transfer per device
        device_sums = [sums.tolist() for sums in self._summed_kept.values()]
        records = []
        for layer, step, branch, generation, dense, reason, kept, total in self.raw:
            kept = next(held) if isinstance(kept, DeviceCount) else int(kept)
            records.append(_record(layer, step, branch, generation, dense, reason, kept, int(total)))
        summed = []
        for (layer, step, branch, dense, reason), (slot, kept, total, calls) in self._rows.items():
            kept += sum(sums[slot] for sums in device_sums if slot < len(sums))
            summed.append({**_record(layer, step, branch, None, dense, reason, kept, total), "calls": calls})
        return records, summed


def _by_device(tensors: list[torch.Tensor | None]) -> dict:
    """Device -> the indices of ``tensors`` on it (``None`` entries left out), in order."""
    indices: dict = {}
    for i, tensor in enumerate(tensors):
        if tensor is not None:
            indices.setdefault(tensor.device, []).append(i)
    return indices


class DeviceCount(NamedTuple):
    """A sparse call's kept-tile count on its device: row ``row`` of ``stack``, the copy :meth:`CallLog.add` made of a
    forward's counts."""

    stack: torch.Tensor
    row: int


def _host_ints(counts: list[DeviceCount]) -> list[int]:
    """``counts`` as ints, in order: their stacks joined and copied to the host once per device."""
    where: dict[int, tuple] = {}  # id of a stack -> (its device, where its rows start in the device's joined copy)
    joined: dict = {}  # device -> [its stacks in order of first use, their rows]
    for count in counts:
        if id(count.stack) not in where:
            device = count.stack.device
            stacks = joined.setdefault(device, [[], 0])
            where[id(count.stack)] = (device, stacks[1])
            stacks[0].append(count.stack)
            stacks[1] += count.stack.numel()
    values = {device: torch.cat([s.detach().reshape(-1).to(torch.int64) for s in stacks]).tolist()
              for device, (stacks, _) in joined.items()}
    out = []
    for count in counts:
        device, start = where[id(count.stack)]
        out.append(values[device][start + count.row])
    return out


def _record(layer, step, branch, generation, dense, reason, kept: int, total: int) -> dict:
    return {"layer": layer, "step": step, "branch": branch, "generation": generation,
            "kept_fraction": kept / total if total else 1.0, "dense": dense, "reason": reason,
            "kept_tiles": kept, "total_tiles": total}


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
        summed: calls older than the last :data:`MAX_CALL_RECORDS` or so, summed per (layer, step, branch, dense,
            reason): the same keys with ``generation`` ``None``, plus ``calls``. Empty until that many calls. The
            summaries below count them.
    """

    records: list[dict]
    recipe_name: str = "custom"
    hub_revision: str | None = None
    summed: list[dict] = field(default_factory=list)

    @property
    def _every_call(self) -> list[dict]:
        return self.summed + self.records  # the older calls first: layers and steps in the order they came

    def calls(self) -> int:
        """Attention calls recorded, the summed older ones included."""
        return len(self.records) + sum(r["calls"] for r in self.summed)

    def kept_fraction(self) -> float:
        """Tiles computed / tiles of dense attention over every call (dense calls count 1.0)."""
        return _weighted(self._every_call)

    def per_layer(self, *, kernel_calls_only: bool = False) -> dict[str, float]:
        """Layer name -> tile-weighted kept fraction over all its calls; with ``kernel_calls_only``, over the calls
        that ran the LiteAttention kernel (warm-up, dense-layer and fallback calls left out; a layer with none is
        absent).

        >>> stats.per_layer(kernel_calls_only=True)  # what skipping did where it ran
        """
        groups: dict[str, list[dict]] = defaultdict(list)
        for r in self._every_call:
            if not (kernel_calls_only and r["dense"]):
                groups[r["layer"]].append(r)
        return {name: _weighted(rs) for name, rs in groups.items()}

    def per_step(self) -> dict[int, float]:
        """Step -> tile-weighted kept fraction over all layers, branches and generations."""
        groups: dict[int, list[dict]] = defaultdict(list)
        for r in self._every_call:
            groups[r["step"]].append(r)
        return {step: _weighted(groups[step]) for step in sorted(groups)}

    def per_branch(self) -> dict:
        """Branch key (index or cache-context name) -> tile-weighted kept fraction."""
        groups: dict = defaultdict(list)
        for r in self._every_call:
            groups[r["branch"]].append(r)
        return {branch: _weighted(rs) for branch, rs in groups.items()}

    def table(self) -> str:
        """A plain-text table: per step (kept fraction, dense calls) then per layer."""
        every = self._every_call  # summed + recent: built once here, not per loop
        if not every:
            return f"litepatch stats ({self.recipe_name}): no attention calls recorded"
        lines = [f"litepatch stats: recipe {self.recipe_name}"
                 + (f" @ {self.hub_revision}" if self.hub_revision else "")
                 + f", {self.calls()} calls, kept {self.kept_fraction():.1%} of tiles"
                 + (f" ({self.calls() - len(self.records)} older calls summed)" if self.summed else "")]
        lines.append(f"{'step':>5}  {'kept':>7}  {'calls':>5}  {'dense':>5}")
        by_step: dict[int, list[dict]] = defaultdict(list)
        for r in every:
            by_step[r["step"]].append(r)
        for step in sorted(by_step):
            rs = by_step[step]
            calls = sum(r.get("calls", 1) for r in rs)
            dense = sum(r.get("calls", 1) for r in rs if r["dense"])
            lines.append(f"{step:>5}  {_weighted(rs):>7.1%}  {calls:>5}  {dense:>5}")
        per_layer = self.per_layer()
        width = max(len(name) for name in per_layer)
        lines.append(f"{'layer':<{width}}  {'kept':>7}")
        for name, frac in per_layer.items():
            lines.append(f"{name:<{width}}  {frac:>7.1%}")
        reasons = sorted({r["reason"] for r in every if r["dense"]})
        if reasons:
            lines.append("dense calls: " + "; ".join(reasons))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
