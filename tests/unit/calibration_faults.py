"""Fault injection for calibration jobs (used by tests and ``benchmarks/calibration_fault_injection.py``).

``make_job`` is a small job entry on the toy model of ``test_calibration_toy`` (256 tokens, so a
generation takes a fraction of a second on a CPU). ``main`` runs ``litepatch calibrate`` in this
process after arming one fault from the environment:

* ``LITEPATCH_TEST_KILL=<phase>[:<n>]`` SIGKILLs this process at the ``n``-th time (default 1) it
  reaches ``phase`` (one of :data:`PHASES`), once: ``LITEPATCH_TEST_KILL_MARKER`` names a file that
  is written just before the kill, and a process that finds it kills nothing.
* ``LITEPATCH_TEST_FAIL=<kind>:<n>[,<kind>:<n>...]`` makes the ``n``-th patched generation inside a
  trial raise an out-of-memory ``RuntimeError`` (``oom``) or return NaN (``nan``).
* ``LITEPATCH_TEST_HOST=<name>`` makes this process's trials claim to run on another machine.

Example:
    $ LITEPATCH_TEST_KILL=generation PYTHONPATH=tests/unit python -m calibration_faults job.yaml --no-progress
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from collections import Counter
from pathlib import Path

import torch

PHASES = ("dense", "sensitivity", "ask", "params", "generation", "record", "tell", "held_out", "report")
"""Where a kill can land, in the order a job passes them: the dense outputs, the sensitivity pass, a trial
created (``ask``), its parameters written (``params``), one of its generations, its results recorded but
not told (``record``), told COMPLETE (``tell``), the held-out check after the trials, the report files."""

_hits: Counter = Counter()
_phase = {"now": "start", "in_trial": False}


def _kill_at(phase: str) -> None:
    """SIGKILLs this process when the armed fault is ``phase`` and this is its ``n``-th hit."""
    _hits[phase] += 1
    armed = os.environ.get("LITEPATCH_TEST_KILL", "")
    if not armed:
        return
    name, _, count = armed.partition(":")
    marker = Path(os.environ["LITEPATCH_TEST_KILL_MARKER"])
    if name == phase and _hits[phase] == int(count or 1) and not marker.exists():
        marker.write_text(phase)
        os.kill(os.getpid(), signal.SIGKILL)


def _planned_failures() -> dict[int, str]:
    plan = {}
    for item in filter(None, os.environ.get("LITEPATCH_TEST_FAIL", "").split(",")):
        kind, _, n = item.partition(":")
        plan[int(n)] = kind
    return plan


def make_job(seq: int = 256, gains=(1.0, 0.05, 1.0, 0.05), delay: float = 0.0):
    """Job entry ``(model, run, samples, held_out)``: the toy model, two calibration samples, one held out;
    ``delay`` seconds of sleep per generation stretch the job (random kills then land in every phase)."""
    import time

    from test_calibration_toy import ToyModel, run

    model = ToyModel(gains, seq=seq).eval()
    failures = _planned_failures()
    trial_generations = Counter()

    def faulty_run(m, sample):
        if delay:
            time.sleep(delay)
        if _phase["in_trial"]:
            trial_generations["n"] += 1
            _kill_at("generation")
            kind = failures.get(trial_generations["n"])
            if kind == "oom":
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
            if kind == "nan":
                return torch.full((1, seq, 16), float("nan"))
        return run(m, sample)

    return model, faulty_run, [0, 1], [5]


def _wrap(owner, name: str, before: str | None = None, after: str | None = None, in_trial: bool | None = None) -> None:
    """Kills before or after ``owner.name``; ``in_trial`` is what the call sets the in-trial flag to."""
    original = getattr(owner, name, None)
    if original is None:  # an older litepatch without this step (to show that a test fails on it)
        return

    def wrapper(*args, **kwargs):
        if before:
            _kill_at(before)
        if in_trial is False:
            _phase["in_trial"] = False
        result = original(*args, **kwargs)
        if in_trial:
            _phase["in_trial"] = True
        if after:
            _kill_at(after)
        return result

    setattr(owner, name, wrapper)


def arm() -> None:
    """Installs the phase hooks (they only kill when ``LITEPATCH_TEST_KILL`` names their phase)."""
    import optuna

    import importlib

    from litepatch.calibration import report, search, sensitivity, trial

    try:
        workers = importlib.import_module("litepatch.calibration.workers")
    except ImportError:
        workers = None

    _wrap(search.DenseCache, "get", before="dense")
    _wrap(sensitivity, "_sensitivity_pass", before="sensitivity")
    _wrap(optuna.study.Study, "ask", after="ask", in_trial=True)
    _wrap(workers, "step_back_reason", after="params")
    _wrap(trial.TrialEvaluator, "__call__", after="record")
    _wrap(optuna.study.Study, "tell", after="tell", in_trial=False)
    _wrap(search, "_dense_of", before="held_out")
    _wrap(report.CalibrationReport, "save", before="report")


def _pretend_another_host(workers) -> None:
    """``LITEPATCH_TEST_HOST=name``: this process's trials say they run on machine ``name``, so that only
    the storage's heartbeat (not a look at this machine's processes) can tell that they died."""
    host = os.environ.get("LITEPATCH_TEST_HOST")
    if host and workers is not None:
        me = workers.Owner.me
        workers.Owner.me = classmethod(lambda cls: dataclasses.replace(me(), host=host))


def main(argv: list[str] | None = None) -> int:
    import importlib

    from litepatch.cli import main as cli_main

    arm()
    _pretend_another_host(importlib.import_module("litepatch.calibration.workers"))
    return cli_main(["calibrate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    import calibration_faults  # the job entry imports this module by name: arm that copy, not __main__

    sys.exit(calibration_faults.main())
