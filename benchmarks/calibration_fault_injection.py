"""Fault injection for calibration jobs: SIGKILL ``litepatch calibrate`` at random moments, rerun until done.

1. runs the job once uninterrupted (the reference: its recipe and the parameters of its trials);
2. runs the same job in a fresh folder and SIGKILLs its process group after a random delay,
   ``--kills`` times, then once more without a kill. A delay is drawn uniformly from
   ``[start-up / 2, start-up + 2 * work / kills]`` (start-up: the time the finished reference job takes
   when run again, i.e. imports, final check and report; work: the rest of the reference's wall
   time), so every rerun gets a little further before its kill
   and the kills sweep the whole job: start-up, the dense and sensitivity passes, every part of the
   trials, the held-out check and the report. A run that ends before its kill is started again;
3. runs it to the end and checks: exactly ``--trials`` COMPLETE trials, none RUNNING or WAITING, no
   parameters evaluated twice, the same parameter sets as the reference, no COMPLETE trial lost
   between kills, and the same recipe settings as the reference.

The job is the toy job of the test suite (``tests/unit/calibration_faults.py``: a 4-layer attention
model, 256 tokens, a few hundredths of a second per generation on a CPU); ``--delay`` stretches each
generation so that more kills land inside trials rather than in the interpreter's start-up.

Example:
    $ python benchmarks/calibration_fault_injection.py --kills 20 --trials 8 --out bench-out/fault_injection
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests" / "unit"
JOB = """\
entry: calibration_faults:make_job
entry_args: {{delay: {delay}}}
budget: psnr >= 50
trials: {trials}
objective: sparsity
output: out
name: toy
seed: {seed}
search: {{warmup: [0, 2], sensitivity_runs: 2}}
"""


def _command(job: Path) -> list[str]:
    return [sys.executable, "-m", "calibration_faults", str(job), "--no-progress"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LITEPATCH_TEST_")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _write_job(folder: Path, trials: int, seed: int, delay: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    job = folder / "job.yaml"
    job.write_text(JOB.format(trials=trials, seed=seed, delay=delay))
    return job


def _study(folder: Path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = folder / "out" / "study.db"
    if not db.exists():
        return None
    try:
        return optuna.load_study(study_name="litepatch-toy", storage=f"sqlite:///{db}")
    except Exception:  # noqa: BLE001 - killed before the study existed
        return None


def _complete(folder: Path) -> dict[int, tuple]:
    study = _study(folder)
    if study is None:
        return {}
    return {t.number: (tuple(sorted(t.params.items())), t.value)
            for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"}


def _settings(folder: Path) -> dict:
    from litepatch.recipes import load

    recipe = load(folder / "out" / "recipe.yaml")
    return {"threshold": recipe.threshold, "warmup_steps": recipe.warmup_steps, "order": recipe.order,
            "schedule": list(recipe.schedule), "layers": {k: repr(v) for k, v in recipe.layers.items()}}


def _phase(folder: Path, trials: int) -> str:
    """Where the last kill landed, read from what it left behind."""
    study = _study(folder)
    if study is None:
        return "start-up / dense pass"
    if "litepatch.plan" not in study.user_attrs:
        return "dense / sensitivity pass"
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    done = states.count("COMPLETE")
    if done >= trials:
        return "held-out check / report"
    return f"trial ({done} complete{', one RUNNING' if 'RUNNING' in states else ', between trials'})"


def _run_to_end(job: Path, timeout: float = 600) -> float:
    start = time.monotonic()
    result = subprocess.run(_command(job), env=_env(), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"job {job} failed ({result.returncode}): {result.stdout[-2000:]}{result.stderr[-2000:]}")
    return time.monotonic() - start


def _killed_run(job: Path, delay: float) -> bool:
    """Starts the job and SIGKILLs it after ``delay`` seconds; False when it ended first."""
    proc = subprocess.Popen(_command(job), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def run_fault_injection(out: Path, *, kills: int = 20, trials: int = 8, seed: int = 0, delay: float = 0.05,
                        log=print) -> dict:
    """Runs the whole experiment in ``out``; returns its results (``ok`` says whether every check held)."""
    out = Path(out)
    for folder in (out / "reference", out / "faulty"):  # a fresh experiment, never a resumed one
        shutil.rmtree(folder, ignore_errors=True)
    reference_job = _write_job(out / "reference", trials, seed, delay)
    reference_seconds = _run_to_end(reference_job)
    reference = {"settings": _settings(reference_job.parent),
                 "params": sorted(p for p, _ in _complete(reference_job.parent).values())}
    log(f"reference: {reference_seconds:.1f} s, recipe {reference['settings']}")

    startup = _run_to_end(reference_job)  # a finished job run again: start-up, final check and report only
    low, high = startup / 2, startup + 2 * max(0.5, reference_seconds - startup) / kills
    log(f"start-up {startup:.1f} s; kills after {low:.1f}-{high:.1f} s")
    job = _write_job(out / "faulty", trials, seed, delay)
    rng = random.Random(seed)
    landed, lost, runs = [], [], 0
    while len(landed) < kills:
        before = _complete(job.parent)
        finished_before = (job.parent / "out" / "recipe.yaml").exists()
        wait = rng.uniform(low, high)
        runs += 1
        if not _killed_run(job, wait):
            continue
        after = _complete(job.parent)
        lost += [n for n in before if after.get(n) != before[n]]
        phase = "rerun of the finished job" if finished_before else _phase(job.parent, trials)
        landed.append({"kill": len(landed) + 1, "after_s": round(wait, 2), "phase": phase, "complete": len(after)})
        log(f"kill {len(landed):2d} after {wait:5.2f} s: {landed[-1]['phase']}")
    _run_to_end(job)
    final = _study(job.parent).get_trials(deepcopy=False)
    complete = [t for t in final if t.state.name == "COMPLETE"]
    params = sorted(tuple(sorted(t.params.items())) for t in complete)
    checks = {
        f"exactly {trials} complete trials": len(complete) == trials,
        "none RUNNING or WAITING": not [t for t in final if t.state.name in ("RUNNING", "WAITING")],
        "no parameters evaluated twice": len(set(params)) == len(params),
        "same parameter sets as the reference": params == reference["params"],
        "no complete trial lost between kills": not lost,
        "same recipe as the reference": _settings(job.parent) == reference["settings"],
    }
    result = {"kills": len(landed), "runs": runs + 1, "startup_seconds": round(startup, 2), "trials": trials, "seed": seed, "delay": delay,
              "reference_seconds": round(reference_seconds, 2), "failed_trials": sum(t.state.name == "FAIL" for t in final),
              "checks": checks, "ok": all(checks.values()), "landed": landed}
    for name, ok in checks.items():
        log(f"{'ok  ' if ok else 'FAIL'} {name}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs that must land while the job runs")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="the study's seed and the kill times' seed")
    parser.add_argument("--delay", type=float, default=0.05, help="seconds of sleep per generation")
    parser.add_argument("--out", default="bench-out/fault_injection")
    args = parser.parse_args(argv)
    out = Path(args.out)
    result = run_fault_injection(out, kills=args.kills, trials=args.trials, seed=args.seed, delay=args.delay,
                                 log=lambda line: print(line, flush=True))
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    print(f"{result['kills']} kills in {result['runs']} runs: {'all checks hold' if result['ok'] else 'CHECKS FAILED'}"
          f" ({out / 'summary.json'})")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
