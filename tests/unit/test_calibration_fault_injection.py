"""A short run of benchmarks/calibration_fault_injection.py: random SIGKILLs of a calibration job, then
the final study is checked against an uninterrupted run (the benchmark runs it with 20 kills). The jobs are
forked from a warm interpreter, so the kill times (drawn from the job's own start-up and run times) fall in
the job's phases rather than in the imports."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "calibration_fault_injection.py"


@pytest.mark.slow
def test_random_kills_leave_the_requested_trials_and_the_uninterrupted_recipe(tmp_path, warm_python, monkeypatch):
    spec = importlib.util.spec_from_file_location("calibration_fault_injection", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "subprocess", warm_python)
    # a kill between a trial's creation and its owner's record leaves it to the grace period (default 15 s)
    monkeypatch.setenv("LITEPATCH_GRACE_PERIOD", "5")
    lines: list[str] = []
    result = module.run_fault_injection(tmp_path, kills=3, trials=4, seed=1, delay=0.02, log=lines.append)
    assert result["kills"] == 3 and len(result["landed"]) == 3
    assert result["ok"], (result["checks"], lines)
    assert all(result["checks"].values()) and len(result["checks"]) == 6
