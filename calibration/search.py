"""The calibrator: a cheap per-layer sensitivity pass, then a small constrained Optuna study.

Why it converges in tens of trials for 30-40 layers: the search never sees one threshold per layer.
A sensitivity pass (one generation per layer, or per group of layers for deep models) measures,
for every layer alone at an aggressive probe threshold, the output error it causes per tile it
skips. Those log-costs, standardised, are fixed per-layer *offsets* ``z``. A trial then only picks

* ``level``: the global threshold (log2 units),
* ``spread``: how far the offsets move each layer (``threshold_i = level - spread * z_i``: layers
  that hurt more per skipped tile become more conservative),
* ``warmup``: dense steps at the start of each generation,
* optionally ``dense``: how many of the most sensitive layers stay dense, ``late``: a linear
  per-step ramp of every threshold from the first sparse step to the last, and ``order``: the
  key-tile visiting order (DESIGN §1), when the space lists more than one.

Quality is an Optuna constraint (``trial.set_constraint``, or ``constraints_func`` on optuna 4),
one value per budget clause, worst over samples; a trial stops at the first sample that breaks
the budget (its constraint then says by how much) so bad trials cost one generation. The objective
is the measured wall time of the patched generation, or the kept fraction of attention tiles
(``objective="sparsity"``, hardware independent). With the time objective, the chosen trial's layers whose kernel
calls computed at least :data:`~.plan.SATURATED_KEPT` of their tiles are made dense in the final recipe, which the
held-out check then measures: the dense kernel is faster there and skips nothing. Seed trials come first, then
a bisection step on ``level`` every other trial (in the best feasible trial's family, and in the uniform family of one
threshold for every layer when that is another, the less-tried first), so the dominant dimension
converges geometrically while TPE explores the rest. Which trial evaluates what, across kills, restarts and
workers on one storage, is the business of :mod:`.workers`: a study ends with exactly ``trials``
complete trials, none evaluated twice, and with a seed the same recipe however often it was killed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import runs
from .budget import Budget
from .errors import CalibrationError
from .feasibility import best_feasible, finished_trials
from .metrics import available_metrics
from .plan import SATURATED_KEPT, Plan, dense_where_saturated, layer_thresholds, recipe_from_params
from .proposals import (
    bisect_next,
    constraints_after_trial,
    constraints_supported,
    make_sampler,
    search_distributions,
    seed_params,
)
from .runs import DenseCache, RunFn, hardware, measure, sample_key, timed_run, worst_of
from .sensitivity import load_or_make_plan
from .space import SearchSpace
from .storage import make_storage, storage_failures, storage_label
from .trial import TrialEvaluator


OBJECTIVES = ("time", "sparsity")
REPORT_METRICS = ("psnr", "ssim", "rel_l2")


def _apply(model, recipe):
    from litepatch.api import apply

    return apply(model, recipe=recipe)


def _model_fingerprint(model):
    from litepatch.api import fingerprint

    return fingerprint(model)


def _default_study_name(model, budget: Budget, samples: Sequence, objective: str) -> str:
    keys = ",".join(sample_key(s) for s in samples)
    digest = hashlib.sha1(f"{type(model).__name__}|{budget}|{keys}|{objective}".encode()).hexdigest()[:10]
    return f"litepatch-{type(model).__name__}-{digest}"


@dataclass
class _Progress:
    total: int
    enabled: bool
    bar: Any = None

    def start(self, done: int) -> None:
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=min(done, self.total), desc="calibrating", unit="trial")

    def update(self, study) -> None:
        if self.bar is None:
            return
        import optuna

        done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
        self.bar.n = min(done, self.total)
        best = best_feasible(study)
        if best is not None:
            q = best.user_attrs.get("quality", {})
            self.bar.set_postfix(
                best=f"#{best.number}", kept=f"{best.user_attrs.get('kept_fraction', 1):.1%}",
                **{k: f"{v:.3g}" for k, v in q.items()},
            )
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def calibrate(
    run: RunFn,
    samples: Sequence,
    budget: str | Sequence[str] | Budget,
    *,
    model: torch.nn.Module,
    trials: int = 20,
    storage=None,
    study_name: str | None = None,
    held_out: Sequence = (),
    objective: str = "time",
    space: SearchSpace | None = None,
    sampler: str = "tpe",
    bisect: bool = True,
    seed: int | None = 0,
    name: str = "calibrated",
    context=None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    timeout: float | None = None,
    finish: bool = True,
):
    """Searches per-layer thresholds and warm-up steps of ``model`` under a quality budget.

    Args:
        run (`Callable`): ``run(model, sample) -> Tensor`` performs one generation (latents or frames).
        samples (`Sequence`): calibration samples, e.g. ``(prompt, seed)`` pairs; the budget must hold on each.
        budget (`str`): e.g. ``"psnr >= 30"`` against the dense output of the same sample (see :class:`Budget`).
        model (`torch.nn.Module`): the model ``run`` uses; patched through :func:`litepatch.apply` and
            restored before returning.
        trials (`int`, defaults to `20`): total finished trials wanted in the study (resumed ones count).
        storage: ``None`` (in memory), an RDB URL such as ``"sqlite:///calib.db"``, a ``.db`` path or a
            journal file. With storage, a killed calibration resumes and several workers cooperate.
        study_name (`str`, *optional*): defaults to a name derived from the model, budget and samples.
        held_out (`Sequence`): samples not used in the search; the best recipe is checked on them.
        objective (`str`, defaults to `"time"`): ``"time"`` (measured wall time of the patched generation)
            or ``"sparsity"`` (kept fraction of attention tiles, hardware independent).
        space (`SearchSpace`, *optional*): bounds of the search and the sensitivity pass, and the
            visiting order(s) to use (``SearchSpace(orders=("anchor", "alternate"))`` searches both).
        sampler (`str`, defaults to `"tpe"`): ``"tpe"``, ``"gp"`` or ``"random"`` (baseline).
        bisect (`bool`, defaults to `True`): every other trial, bisect ``level`` around the best feasible trial
            (or the best uniform one: :func:`~litepatch.calibration.proposals.bisect_next`).
        cache_dir: where dense outputs are kept between runs and workers (``None``: memory only).
        finish (`bool`, defaults to `True`): build the recipe and check held-out samples; ``False`` only
            runs trials (extra workers).

    Returns:
        ``(recipe, report)``: the best :class:`~litepatch.recipes.schema.Recipe` (with measured quality,
        sparsity, speed, hardware and provenance) and a :class:`CalibrationReport`. With ``finish=False``,
        ``(None, None)``.

    Raises:
        CalibrationError: no trial met the budget (the study keeps its trials; resume with more trials or
            a looser budget), or ``run`` returned something that is not a finite tensor.

    Example:
        >>> from litepatch.demo import load_demo_model, sample
        >>> model = load_demo_model()
        >>> run = lambda m, s: sample(m, torch.tensor([s[0]]), steps=20, seed=s[1])
        >>> recipe, report = calibrate(run, [([0, 0, 1], 0), ([2, 3, 0], 1)], "psnr >= 30", model=model,
        ...                            trials=12, objective="sparsity", held_out=[([1, 2, 3], 7)])
        >>> print(report.to_markdown())
    """
    import optuna

    budget = Budget.parse(budget)
    samples, held_out = list(samples), list(held_out)
    _check_arguments(objective, samples, held_out, trials)
    space = space or SearchSpace()
    order = space.orders[0]  # of the sensitivity pass, and of every trial unless the space lists more
    metric_names = list(dict.fromkeys([*budget.metrics, *(m for m in REPORT_METRICS if m in available_metrics())]))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage_obj = make_storage(storage)
    study_name = study_name or _default_study_name(model, budget, samples, objective)
    dense = DenseCache(run, model, cache_dir)
    dense_outputs = [dense.get(s) for s in samples]  # before patching: exactly what the user sees

    handle = _apply(model, None)
    progress_bar = _Progress(trials, progress)
    try:
        layers = list(handle.layers)
        with storage_failures(storage_obj, during="the opening of the study"):
            study = optuna.create_study(study_name=study_name, storage=storage_obj, direction="minimize",
                                        load_if_exists=True, sampler=make_sampler(sampler, seed, n_startup=3))
            plan = load_or_make_plan(study, handle, run, model, samples[0], dense_outputs[0][0], layers, space,
                                     order)
            _check_resumable(study, plan, layers, samples)
            distributions = search_distributions(space, plan, len(layers))
            owner = _propose_on(study, space, plan, distributions, sampler, seed, bisect)
        evaluate = TrialEvaluator(
            study=study, handle=handle, run=run, model=model, samples=samples, dense_outputs=dense_outputs,
            budget=budget, metric_names=metric_names, plan=plan, name=name, order=order, objective=objective,
            distributions=distributions, wanted=trials, worker=str(owner),
        )
        from .workers import run_trials

        progress_bar.start(finished_trials(study))
        with storage_failures(storage_obj):
            tally = run_trials(study, storage_obj, evaluate, trials, timeout=timeout, on_trial=progress_bar.update)
        progress_bar.close()
        _check_errors(tally, study_name, trials)
        if not finish:
            return None, None
        best = _best_or_fail(study, study_name, budget)
        recipe = recipe_from_params(best.params, plan, name=name, order=order)
        made_dense = {}
        if objective == "time":
            recipe, made_dense = dense_where_saturated(recipe, best.user_attrs.get("layer_kept") or {})
        check = _HeldOutCheck.run(held_out or samples, dense, handle, recipe, run, model, metric_names)
    finally:
        progress_bar.close()
        handle.remove()

    report = _report(study, storage_obj, plan, layers, best, recipe, check, budget=budget, objective=objective,
                     sampler=sampler, held_out=held_out, n_samples=len(samples), made_dense=made_dense)
    _fill_recipe(recipe, report, budget, samples, held_out, model, context, study_name)
    report.recipe = recipe
    return recipe, report


def _check_arguments(objective: str, samples: list, held_out: list, trials: int) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if not samples:
        raise ValueError("calibrate needs at least one calibration sample")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be an int >= 1, got {trials!r}")
    overlap = {sample_key(s) for s in samples} & {sample_key(s) for s in held_out}
    if overlap:
        raise ValueError("held-out samples must differ from the calibration samples; shared: "
                         + ", ".join(repr(s) for s in held_out if sample_key(s) in overlap))


def _propose_on(study, space: SearchSpace, plan: Plan, distributions: dict, sampler: str, seed, bisect: bool):
    """Puts this worker's proposer on the study (seed trials, bisection, then the sampler); returns the worker."""
    from .workers import Owner, make_proposer

    owner = Owner.me()
    seeds = seed_params(plan, space) if sampler != "random" else []
    study.sampler = make_proposer(
        distributions, seeds, lambda s: make_sampler(sampler, s, n_startup=len(seeds)), seed=seed,
        bisect=(lambda done: bisect_next(done, space, plan.warmup)) if bisect and sampler != "random" else None,
        owner=owner, after_trial=None if constraints_supported() else constraints_after_trial,
    )
    return owner


def _best_or_fail(study, study_name: str, budget: Budget):
    best = best_feasible(study)
    if best is None:
        reached = [t.user_attrs.get("quality") for t in study.get_trials(deepcopy=False) if "quality" in t.user_attrs]
        raise CalibrationError(
            f"no trial of study {study_name!r} met the budget '{budget}' on every sample in "
            f"{len(study.trials)} trials (quality reached: {reached[:3]}...); loosen the budget, widen "
            "SearchSpace.warmup or lower SearchSpace.level, and run again to continue the study"
        )
    return best


@dataclass
class _HeldOutCheck:
    """The chosen recipe on the held-out samples (or the calibration ones), with dense times and statistics."""

    samples: list
    rows: list[dict]
    dense_times: list[float]
    per_step: dict
    per_layer_kept: dict

    @classmethod
    def run(cls, samples: list, dense: DenseCache, handle, recipe, run: RunFn, model, metric_names) -> _HeldOutCheck:
        rows, dense_times, stats = [], [], None
        for s in samples:
            ref, dense_seconds, fresh = _dense_of(dense, handle, s)
            dense_times.append(dense_seconds if fresh else _dense_time(handle, run, model, s))
            out, elapsed, stats = runs.run_patched(handle, recipe, run, model, s)
            rows.append({
                "sample": s, "key": sample_key(s), **measure(out, ref, metric_names),
                "seconds": elapsed, "kept_fraction": stats.kept_fraction(),
            })
        return cls(samples, rows, dense_times, stats.per_step() if stats is not None else {},
                   stats.per_layer() if stats is not None else {})


def _report(study, storage, plan: Plan, layers: list[str], best, recipe, check: _HeldOutCheck, *, budget: Budget,
            objective: str, sampler: str, held_out: list, n_samples: int, made_dense: dict[str, float]):
    from .report import CalibrationReport, trial_rows

    return CalibrationReport(
        budget=str(budget), objective=objective, study_name=study.study_name, storage=storage_label(storage),
        sampler=sampler, layers=layers, plan=plan.__dict__ | {"warmup": list(plan.warmup)},
        trials=trial_rows(study), best_trial=best.number, held_out=check.rows, held_out_is_calibration=not held_out,
        per_layer_threshold=layer_thresholds(recipe, layers), per_layer_kept=check.per_layer_kept,
        per_step_kept={int(k): float(v) for k, v in check.per_step.items()},
        dense_seconds=sum(check.dense_times) / len(check.dense_times),
        patched_seconds=sum(r["seconds"] for r in check.rows) / len(check.rows),
        generations=_cost(study, plan, n_samples), held_out_generations=2 * len(check.samples),
        hardware=hardware(), made_dense=made_dense,
    )


def _check_resumable(study, plan: Plan, layers: list[str], samples: Sequence) -> None:
    """Refuses to continue a study made for other layers or samples; records the samples of a new one."""
    if plan.layers != layers:
        raise CalibrationError(
            f"study {study.study_name!r} was made for layers {plan.layers[:3]}... but the model has {layers[:3]}...; "
            "use another study_name"
        )
    keys = [sample_key(s) for s in samples]
    if study.user_attrs.get("litepatch.sample_keys") not in (None, keys):
        raise CalibrationError(
            f"study {study.study_name!r} was run on other calibration samples; use the same samples to resume it, "
            "or another study_name"
        )
    if "litepatch.sample_keys" not in study.user_attrs:
        study.set_user_attr("litepatch.sample_keys", keys)


def _check_errors(tally, study_name: str, trials: int) -> None:
    """Fails the job when generation errors left no complete trial; warns when they cut it short."""
    import warnings

    if not tally.errors or tally.complete >= trials:
        return
    summary = f"{len(tally.errors)} trial(s) failed (last: {tally.errors[-1]})"
    if tally.complete == 0:
        raise CalibrationError(
            f"no trial of study {study_name!r} finished: {summary}; fix the cause and run again to continue the study"
        )
    warnings.warn(f"calibration stopped with {tally.complete} of {trials} trials: {summary}", RuntimeWarning,
                  stacklevel=3)


def _dense_of(dense: DenseCache, handle, sample) -> tuple[torch.Tensor, float, bool]:
    """Dense output of a (held-out) sample and whether its time was measured just now (warm).

    Computed on the patched model with every layer dense (the patcher calls the original attention there).
    """
    key = sample_key(sample)
    if key in dense._mem or (dense.dir is not None and (dense.dir / f"dense-{key}.safetensors").is_file()):
        out, seconds = dense.get(sample)
        return out, seconds, False
    handle.configure(recipe=_all_dense())
    out, seconds = dense.get(sample)
    return out, seconds, True


def _all_dense():
    from litepatch.recipes.schema import LayerSetting, Recipe

    return Recipe(name="dense", threshold=-math.inf, layers={"*": LayerSetting(dense=True)})


def _dense_time(handle, run, model, sample) -> float:
    """Warm dense wall time of ``sample`` (every layer dense), measured after the trials."""
    handle.configure(recipe=_all_dense())
    _, elapsed = timed_run(run, model, sample)
    return elapsed


def _cost(study, plan: Plan, n_samples: int) -> dict[str, int]:
    trial_gens = sum(int(t.user_attrs.get("samples_run", 0)) for t in study.get_trials(deepcopy=False))
    return {"dense": n_samples, "sensitivity": plan.generations, "trials": trial_gens,
            "total": n_samples + plan.generations + trial_gens}


def _fill_recipe(recipe, report, budget: Budget, samples, held_out, model, context, study_name) -> None:
    from litepatch.recipes.schema import Context, Measured, Provenance
    from litepatch.version import __version__

    rows = report.held_out
    worst = {m: worst_of(m, [r[m] for r in rows]) for m in REPORT_METRICS if rows and m in rows[0]}
    recipe.fingerprint = _model_fingerprint(model)
    if context is not None:
        recipe.context = context if isinstance(context, Context) else Context(**dict(context))
    recipe.context.steps = recipe.context.steps or report.plan["steps"]
    recipe.measured = Measured(
        psnr=_finite(worst.get("psnr")), ssim=worst.get("ssim"), rel_l2=worst.get("rel_l2"),
        kept_fraction=sum(r["kept_fraction"] for r in rows) / len(rows),
        speedup=report.dense_seconds / report.patched_seconds if report.patched_seconds else None,
        hardware=report.hardware, litepatch_version=__version__,
    )
    prompts, seeds = [], []
    for s in samples:
        if isinstance(s, (list, tuple)) and len(s) == 2 and isinstance(s[1], int):
            prompts.append(s[0] if isinstance(s[0], str) else json.dumps(s[0]))
            seeds.append(int(s[1]))
    which = "held-out" if held_out else "calibration"
    recipe.provenance = Provenance(
        source="calibration", budget=str(budget), prompts=prompts, seeds=seeds, study=study_name,
        notes=(f"measured: worst case over {len(rows)} {which} samples on {report.hardware}; objective "
               f"{report.objective}; {report.generations['total']} generations; best trial #{report.best_trial}"
               + (f"; made dense (kernel calls kept >= {SATURATED_KEPT:.0%} of tiles): {', '.join(report.made_dense)}"
                  if report.made_dense else "")),
    )


def _finite(value):
    if value is None:
        return None
    return 999.0 if math.isinf(value) else value
