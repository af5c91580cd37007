"""One trial: its parameters, the claim on them, its generations (pruned at the first sample that breaks the
budget) and the values Optuna records (objective, constraints, user attributes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import runs
from .budget import Budget
from .plan import Plan, recipe_from_params
from .proposals import constraints_supported, suggest
from .runs import RunFn, measure, sample_key, sample_label, worst_of


@dataclass
class SampleResult:
    key: str
    metrics: dict[str, float]
    seconds: float
    kept: float
    ok: bool
    layer_kept: dict[str, float]  # per layer, over its calls that ran the kernel


@dataclass
class TrialEvaluator:
    """The objective of one trial: its parameters, the claim on them, the generations and the constraints."""

    study: Any
    handle: Any
    run: RunFn
    model: Any
    samples: list
    dense_outputs: list
    budget: Budget
    metric_names: list[str]
    plan: Plan
    name: str
    order: str
    objective: str
    distributions: dict
    wanted: int
    worker: str

    def __call__(self, trial) -> float:
        from .workers import ORIGIN_ATTR, TrialStepBack, step_back_reason

        params = {name: suggest(trial, name, dist) for name, dist in self.distributions.items()}
        reason = step_back_reason(self.study, trial, self.wanted)
        if reason is not None:
            raise TrialStepBack(reason)
        trial.set_user_attr("worker", self.worker)
        trial.set_user_attr(ORIGIN_ATTR, getattr(self.study.sampler, "origins", {}).get(trial.number, "sampler"))
        recipe = recipe_from_params(params, self.plan, name=self.name, order=self.order)
        results: list[SampleResult] = []
        for index in _sample_order(self.study, len(self.samples)):
            results.append(self._sample(trial, recipe, index))
            if not results[-1].ok:
                break  # prune: one sample breaking the budget settles the trial
        return self._record(trial, results)

    def _sample(self, trial, recipe, index: int) -> SampleResult:
        """One generation; an exception or a non-finite output fails the trial (recorded), not the job."""
        import warnings

        from .workers import ERROR_ATTR, GenerationFailed

        sample = self.samples[index]
        try:
            out, elapsed, stats = runs.run_patched(self.handle, recipe, self.run, self.model, sample)
            values = measure(out, self.dense_outputs[index][0], self.metric_names)
        except Exception as err:  # noqa: BLE001 - an OOM or a NaN in one generation fails this trial only
            detail = " ".join(str(err).split())[:300] or type(err).__name__
            message = f"sample {sample_label(sample)}: {type(err).__name__}: {detail}"
            trial.set_user_attr(ERROR_ATTR, message)
            warnings.warn(f"calibration trial #{trial.number} failed ({message}); the calibration goes on",
                          RuntimeWarning, stacklevel=2)
            raise GenerationFailed(message) from err
        return SampleResult(sample_key(sample), values, elapsed, stats.kept_fraction(), self.budget.holds(values),
                            stats.per_layer(kernel_calls_only=True))

    def _record(self, trial, results: list[SampleResult]) -> float:
        per_sample = [r.metrics for r in results]
        violations = [max(v) for v in zip(*(self.budget.violations(m) for m in per_sample))]
        kept = sum(r.kept for r in results) / len(results)
        seconds = sum(r.seconds for r in results) / len(results)
        trial.set_user_attr("quality", self.budget.worst(per_sample))
        trial.set_user_attr("metrics", {m: worst_of(m, [p[m] for p in per_sample]) for m in self.metric_names})
        trial.set_user_attr("kept_fraction", kept)
        trial.set_user_attr("layer_kept", _least_kept_per_layer(results))
        trial.set_user_attr("seconds", seconds)
        trial.set_user_attr("samples_run", len(results))
        trial.set_user_attr("complete_eval", len(results) == len(self.samples))
        trial.set_user_attr("failed_on", [r.key for r in results if not r.ok])
        trial.set_user_attr("constraints", violations)
        if constraints_supported():
            for clause, value in zip(self.budget.clauses, violations):
                trial.set_constraint(str(clause), value)
        return kept if self.objective == "sparsity" else seconds


def _least_kept_per_layer(results: list[SampleResult]) -> dict[str, float]:
    """Per layer, the lowest kept fraction of its kernel calls over the samples run (what
    :func:`~.plan.dense_where_saturated` reads: a layer counts as saturated only if it was on every sample)."""
    least: dict[str, float] = {}
    for r in results:
        for layer, kept in r.layer_kept.items():
            least[layer] = min(kept, least.get(layer, kept))
    return least


def _sample_order(study, n: int) -> list[int]:
    """Samples that broke the budget most often first, so failing trials stop after one generation."""
    if n == 1:
        return [0]
    from .workers import evaluated_trials

    fails: dict[str, int] = {}
    for t in evaluated_trials(study):
        for key in t.user_attrs.get("failed_on", []):
            fails[key] = fails.get(key, 0) + 1
    keys = study.user_attrs.get("litepatch.sample_keys") or []
    if len(keys) != n:
        return list(range(n))
    return sorted(range(n), key=lambda i: -fails.get(keys[i], 0))
