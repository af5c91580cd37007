"""The sensitivity pass: each layer (or group) alone at the probe threshold, its output error per skipped tile
standardised into the offsets ``z`` of the :class:`~.plan.Plan` (module docstring of :mod:`.search`).
"""

from __future__ import annotations

import glob
import math

from litepatch.recipes.schema import LayerSetting, Recipe

from . import runs
from .errors import CalibrationError
from .metrics import get_metric
from .plan import Plan
from .space import SearchSpace


PLAN_ATTR = "litepatch.plan"


def _sensitivity_pass(handle, run, model, sample, dense_out, layers: list[str], space: SearchSpace, order: str):
    """Per-layer (or per-group) output error and kept fraction at the probe threshold, other layers dense."""
    n_runs = min(space.sensitivity_runs, len(layers))
    if n_runs == 0:
        return [[name] for name in layers], [1.0] * len(layers), [0.5] * len(layers), 0, None
    size = math.ceil(len(layers) / n_runs)
    groups = [layers[i : i + size] for i in range(0, len(layers), size)]
    errors, kept, steps = [], [], 0
    for group in groups:
        members = set(group)
        recipe = Recipe(
            name="sensitivity", threshold=space.probe, warmup_steps=0, order=order,
            layers={glob.escape(n): LayerSetting(dense=n not in members) for n in layers if n not in members},
        )
        out, _, stats = runs.run_patched(handle, recipe, run, model, sample)
        _require_kernel_calls(stats, members)
        errors.append(get_metric("rel_l2")(out, dense_out.to(out.device)))
        per_layer = stats.per_layer()
        kept.append(sum(per_layer.get(n, 1.0) for n in group) / len(group))
        steps = max(steps, len(stats.per_step()))
    return groups, errors, kept, len(groups), steps


def _require_kernel_calls(stats, layers: set[str]) -> None:
    """Refuses a search over layers whose every call fell back to dense attention (nothing to tune)."""
    calls = [r for r in stats.records if r["layer"] in layers]
    if calls and all(r["dense"] for r in calls):
        reasons = "; ".join(sorted({r["reason"] for r in calls}))
        raise CalibrationError(
            f"no call of {sorted(layers)} ran the LiteAttention kernel (dense fallback: {reasons}); "
            "calibrating would only measure dense attention. Fix the cause first (for example, cast the "
            "model to bfloat16 or float16 on CUDA)"
        )


def _offsets(groups, errors, kept, layers) -> list[float]:
    """Standardised log(error per skipped tile) of each layer's group, clipped to [-2, 2]."""
    cost = []
    for err, k in zip(errors, kept):
        cost.append(math.log(max(err, 1e-7)) - math.log(max(1.0 - k, 1e-3)))
    mean = sum(cost) / len(cost)
    std = math.sqrt(sum((c - mean) ** 2 for c in cost) / len(cost))
    z_group = [0.0 if std < 1e-9 else max(-2.0, min(2.0, (c - mean) / std)) for c in cost]
    z = {}
    for group, value in zip(groups, z_group):
        for name in group:
            z[name] = round(value, 4)
    return [z[name] for name in layers]


def load_or_make_plan(study, handle, run, model, sample, dense_out, layers, space: SearchSpace, order) -> Plan:
    stored = study.user_attrs.get(PLAN_ATTR)
    if stored:
        plan = Plan.from_json(stored)
        if plan.space != space.to_dict():
            raise CalibrationError(
                f"study {study.study_name!r} was created with search space {plan.space}, now {space.to_dict()}; "
                "use the same settings to resume it, or another study_name"
            )
        return plan
    groups, errors, kept, generations, steps = _sensitivity_pass(
        handle, run, model, sample, dense_out, layers, space, order
    )
    if steps is None:  # no sensitivity runs: learn the step count from one probe generation
        _, _, stats = runs.run_patched(handle, Recipe(name="probe", threshold=space.probe), run, model, sample)
        _require_kernel_calls(stats, set(layers))
        steps, generations = len(stats.per_step()), 1
    steps = max(1, steps)
    warmup = tuple(space.warmup) if space.warmup is not None else (0, max(1, round(0.3 * steps)))
    plan = Plan(
        layers=layers, offsets=_offsets(groups, errors, kept, layers), groups=groups,
        group_error=errors, group_kept=kept, steps=steps, warmup=warmup, space=space.to_dict(),
        generations=generations,
    )
    if PLAN_ATTR not in study.user_attrs:  # another worker may have finished first: keep theirs
        study.set_user_attr(PLAN_ATTR, plan.to_json())
    return Plan.from_json(study.user_attrs[PLAN_ATTR])
