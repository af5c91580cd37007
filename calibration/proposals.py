"""What trials try: Optuna samplers, the distributions of the search parameters, seed trials and the
bisection of ``level`` (module docstring of :mod:`.search`), and the constraint shims for optuna 4.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .feasibility import is_feasible
from .plan import Plan
from .space import SearchSpace


def constraints_supported() -> bool:
    import optuna

    return hasattr(optuna.trial.Trial, "set_constraint")


def _constraints_func(frozen) -> list[float]:  # optuna 4 shim: the values the objective stored
    return list(frozen.user_attrs.get("constraints", [1.0]))


def make_sampler(kind: str, seed: int | None, n_startup: int):
    import optuna

    extra = {} if constraints_supported() else {"constraints_func": _constraints_func}
    if kind == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, n_startup_trials=n_startup, constant_liar=True, **extra
        )
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup, **extra)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"sampler must be 'tpe', 'gp' or 'random', got {kind!r}")


def seed_params(plan: Plan, space: SearchSpace) -> list[dict]:
    """A conservative trial that should always pass, then a ladder of levels with the sensitivity offsets, then
    the aggressive level with one threshold for every layer (the lowest spread) when the space allows it.

    The last seed puts the uniform family in the study, so that the bisection can refine it: on the H100 video demo
    a search that never tried it chose a recipe slower and 17 dB worse than uniform threshold -2 (sensitivity offsets
    measured at one probe threshold sent three layers to about -1, where quality falls off a cliff).
    """
    lo, hi = space.level
    w_lo, w_hi = plan.warmup
    mid_w = (w_lo + w_hi) // 2
    spread = min(max(1.0, space.spread[0]), space.spread[1])
    ladder = [(0.2, w_hi, spread), (0.5, mid_w, spread), (0.75, mid_w, spread)]
    if space.spread[0] < spread:
        ladder.append((0.75, mid_w, space.spread[0]))
    seeds = []
    for frac, warm, seed_spread in ladder:
        p = {"level": round(lo + frac * (hi - lo), 3), "spread": seed_spread, "warmup": warm}
        if space.max_dense_layers:
            p["dense"] = 0
        if space.schedule:
            p["late"] = 0.0
        if len(space.orders) > 1:  # seeds take the orders in turn, so that each order is tried early
            p["order"] = space.orders[len(seeds) % len(space.orders)]
        seeds.append(p)
    return seeds


def _same_value(a, b) -> bool:
    if isinstance(a, str) or isinstance(b, str):  # categorical (order)
        return a == b
    return abs(float(a) - float(b)) < 1e-6


def bisect_next(evaluated: Sequence, space: SearchSpace, warmup: tuple[int, int] | None = None) -> dict | None:
    """The next bisection step in ``level``, in one of two families (trials that share every parameter but
    ``level``): the best feasible trial's, and the uniform family's (one threshold for every layer: the lowest
    spread) when its best feasible trial is in another family. Of the two, the family with fewer trials so far.

    A step is the midpoint between the family's best feasible level and the nearest failing level above it in
    that family (or the top of the range). On the H200 video demo, bisecting only the best family left the uniform
    family at its seed level, and the chosen per-layer recipe was 2.6 % slower than uniform threshold -2, which the
    search never tried (``benchmarks/results/calibrate_demo_h200_2026-12-05g.json``).

    With ``warmup`` (the plan's warm-up range), a third family: the best trial with fewer warm-up steps at its level
    (:func:`_warmup_step`), chosen by the same rule (it has no trial yet when first offered, so it comes first). On
    the H100 video demo the search kept the seeds' 3 warm-up steps (1.42x) while settings with no warm-up held the
    same quality budget at 1.58x (``benchmarks/results/calibrate_demo_h100_2026-12-05h.json``, frontier); a step
    offered only once the level had converged never came within 11 trials
    (``benchmarks/results/calibrate_demo_h100_2026-12-05i.json``).
    """
    feasible = [t for t in evaluated if is_feasible(t)]
    if not feasible:
        return None
    best = min(feasible, key=lambda t: (t.value, t.number))
    tops = [best]
    uniform = [t for t in feasible if _same_value(t.params.get("spread", space.spread[0]), space.spread[0])]
    if uniform:
        best_uniform = min(uniform, key=lambda t: (t.value, t.number))
        if not _same_family(best_uniform.params, best.params):
            tops.append(best_uniform)
    candidates = [_bisect_family(top, evaluated, space) for top in tops]
    if warmup is not None:
        candidates.append(_warmup_step(best, evaluated, warmup[0]))
    steps = [(sum(_same_family(t.params, step) for t in evaluated), i, step)
             for i, step in enumerate(candidates) if step is not None]
    return min(steps)[2] if steps else None


def _warmup_step(best, evaluated: Sequence, lowest: int) -> dict | None:
    """``best``'s parameters with fewer warm-up steps: the midpoint between its warm-up and the highest warm-up
    below it that failed at its level or a gentler one, with every other parameter the same (or ``lowest - 1``).
    ``None`` when no warm-up lies between them, or when that trial was made already."""
    params = best.params
    if "warmup" not in params:
        return None
    level, warm = params["level"], int(params["warmup"])
    others = {k: v for k, v in params.items() if k not in ("level", "warmup")}
    floor = lowest - 1
    for t in evaluated:
        p = t.params
        if ("warmup" in p and "level" in p and int(p["warmup"]) < warm and p["level"] <= level + 1e-9
                and not is_feasible(t) and _same_family(others, {k: v for k, v in p.items() if k != "warmup"})):
            floor = max(floor, int(p["warmup"]))  # fewer steps, a gentler level, and it failed: so would this
    target = (floor + warm) // 2
    if target <= floor:
        return None
    step = {**params, "warmup": target}
    if any(set(t.params) == set(step) and all(_same_value(t.params[k], step[k]) for k in step) for t in evaluated):
        return None
    return step


def _same_family(a: dict, b: dict) -> bool:
    """Whether two trials' parameters agree on everything but ``level``."""
    shared = (set(a) & set(b)) - {"level"}  # a parameter only one of them sets does not tell them apart
    return all(_same_value(a[k], b[k]) for k in shared)


def _bisect_family(top, evaluated: Sequence, space: SearchSpace) -> dict | None:
    """Midpoint in ``level`` between ``top`` and the nearest failing trial of its family above it (or the top of
    the range); ``None`` when that gap is under 0.05."""
    level = top.params["level"]
    above = [space.level[1]]
    for t in evaluated:
        if "level" in t.params and t.params["level"] > level + 1e-9 and not is_feasible(t):
            if _same_family(t.params, top.params):
                above.append(t.params["level"])
    target = (level + min(above)) / 2
    if target - level < 0.05:
        return None
    return {"level": round(target, 4), **{k: v for k, v in top.params.items() if k != "level"}}


def search_distributions(space: SearchSpace, plan: Plan, n_layers: int) -> dict:
    """The Optuna distribution of every parameter a trial sets (see the module docstring)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {
        "level": FloatDistribution(*space.level),
        "spread": FloatDistribution(*space.spread),
        "warmup": IntDistribution(*plan.warmup),
    }
    if space.max_dense_layers:
        out["dense"] = IntDistribution(0, min(space.max_dense_layers, n_layers))
    if space.schedule:
        out["late"] = FloatDistribution(*space.late_range)
    if len(space.orders) > 1:
        out["order"] = CategoricalDistribution(list(space.orders))
    return out


def suggest(trial, name: str, distribution) -> Any:
    from optuna.distributions import FloatDistribution, IntDistribution

    if isinstance(distribution, FloatDistribution):
        return trial.suggest_float(name, distribution.low, distribution.high)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high)
    return trial.suggest_categorical(name, list(distribution.choices))


def constraints_after_trial(study, trial, state, values) -> None:  # optuna 4: what TPE's constraints_func did
    from optuna.samplers._base import _process_constraints_after_trial

    _process_constraints_after_trial(_constraints_func, study, trial, state)
