"""Which trials of a study count: finished, within the budget on every sample (study policy).

The report and the orchestration read it; a trial is feasible when it completed, every budget
constraint is <= 0 and it was evaluated on every calibration sample.
"""

from __future__ import annotations




def is_feasible(frozen) -> bool:
    import optuna

    if frozen.state != optuna.trial.TrialState.COMPLETE:
        return False
    constraints = frozen.user_attrs.get("constraints")
    return bool(constraints) and all(c <= 0 for c in constraints) and frozen.user_attrs.get("complete_eval", False)


def best_feasible(study):
    feasible = [t for t in study.get_trials(deepcopy=False) if is_feasible(t)]
    if not feasible:
        return None
    return min(feasible, key=lambda t: (t.value, t.number))


def finished_trials(study) -> int:
    import optuna

    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
