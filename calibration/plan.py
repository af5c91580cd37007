"""What a study is built on (:class:`Plan`, stored in the study) and how a trial's parameters become a recipe.

Example:
    >>> recipe = recipe_from_params({"level": -6.0, "spread": 1.0, "warmup": 2}, plan)
    >>> layer_thresholds(recipe, plan.layers)
"""

from __future__ import annotations

import dataclasses
import glob
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from litepatch.kernels import DEFAULT_ORDER
from litepatch.recipes.schema import LayerSetting, Recipe

from .space import MIN_THRESHOLD

# A layer whose kernel calls computed at least this fraction of its tiles runs dense in the final recipe: the CuTe
# kernel's call with every tile listed takes 1.08-1.19x flash-attn-4's dense time on the H200 (README, kernel table),
# and on the H100 video demo uniform thresholds that kept 92 % of the tiles ran as fast as the dense path; above
# that, dense attention is faster and computes every tile (quality can only gain).
SATURATED_KEPT = 0.92


@dataclass
class Plan:
    """What the study is built on (stored in the study, shared by every worker and resumed run)."""

    layers: list[str]
    offsets: list[float]  # z per layer (positive: more sensitive than average)
    groups: list[list[str]]  # layers probed together
    group_error: list[float]  # rel-L2 of the output with only that group sparse at the probe threshold
    group_kept: list[float]  # kept fraction of that group at the probe threshold
    steps: int  # denoising steps seen per generation (from the patcher's step tracking)
    warmup: tuple[int, int]
    space: dict
    generations: int  # generations spent by the sensitivity pass

    def to_json(self) -> str:
        data = dict(self.__dict__)
        data["warmup"] = list(self.warmup)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        data["warmup"] = tuple(data["warmup"])
        return cls(**data)

    def dense_order(self) -> list[str]:
        """Layers from the most to the least sensitive."""
        return [name for _, name in sorted(zip(self.offsets, self.layers), key=lambda p: -p[0])]


def _clamp(t: float) -> float:
    return float(min(0.0, max(MIN_THRESHOLD, t)))


def recipe_from_params(params: dict, plan: Plan, *, name: str = "calibrated", order: str = DEFAULT_ORDER):
    """The :class:`~litepatch.recipes.schema.Recipe` of one trial's parameters."""
    level = float(params["level"])
    spread = float(params.get("spread", 0.0))
    warmup = int(params.get("warmup", 0))
    n_dense = int(params.get("dense", 0))
    late = float(params.get("late", 0.0))
    dense = set(plan.dense_order()[:n_dense])
    layers = {}
    for layer, z in zip(plan.layers, plan.offsets):
        pattern = glob.escape(layer)
        if layer in dense:
            layers[pattern] = LayerSetting(dense=True)
            continue
        base = level - spread * z
        if late and plan.steps > warmup + 1:
            span = plan.steps - 1 - warmup
            schedule = [_clamp(base + late * (2.0 * max(0, s - warmup) / span - 1.0)) for s in range(plan.steps)]
            layers[pattern] = LayerSetting(schedule=[round(v, 4) for v in schedule])
        else:
            layers[pattern] = LayerSetting(threshold=round(_clamp(base), 4))
    return Recipe(name=name, threshold=round(_clamp(level), 4), warmup_steps=warmup,
                  order=params.get("order", order), layers=layers)


def layer_thresholds(recipe, layers: Sequence[str], step: int | None = None) -> dict[str, float | None]:
    """Threshold of each layer (at ``step``, default the first sparse step); ``None`` = dense."""
    step = recipe.warmup_steps if step is None else step
    return {name: recipe.threshold_for(name, step) for name in layers}


def dense_where_saturated(recipe: Recipe, layer_kept: Mapping[str, float],
                          at: float = SATURATED_KEPT) -> tuple[Recipe, dict[str, float]]:
    """``recipe`` with the layers that skipped little made dense, and those layers with their kept fractions.

    ``layer_kept``: per layer, the kept fraction of its kernel calls (the chosen trial's, lowest over its samples);
    a layer at or above ``at`` runs faster on the dense kernel than on the sparse one (:data:`SATURATED_KEPT`).

    >>> recipe, made_dense = dense_where_saturated(recipe, {"blocks.4": 0.99, "blocks.0": 0.12})
    >>> made_dense
    {'blocks.4': 0.99}
    """
    saturated = {name: kept for name, kept in layer_kept.items()
                 if kept >= at and recipe.threshold_for(name, recipe.warmup_steps) is not None}
    if not saturated:
        return recipe, {}
    layers = dict(recipe.layers)
    for name in saturated:
        layers[glob.escape(name)] = LayerSetting(dense=True)
    return dataclasses.replace(recipe, layers=layers), saturated
