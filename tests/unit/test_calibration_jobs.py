"""Calibration jobs: ``litepatch calibrate JOB.yaml`` in subprocesses (resume after a kill, two workers), forked from a
warm interpreter (``warm_python``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

# the toy model at 256 tokens (calibration_faults, unarmed): the job's steps, not its generations, are under test
JOB = """\
entry: calibration_faults:make_job
entry_args: {{delay: {delay}}}
budget: psnr >= 50
trials: {trials}
objective: sparsity
output: out
name: toy
search: {{warmup: [0, 2], sensitivity_runs: 2}}
"""


def _write_job(tmp_path: Path, trials: int, delay: float) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(JOB.format(trials=trials, delay=delay))
    return path


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from litepatch.cli import main; sys.exit(main())", "calibrate", *args]


def _study(tmp_path: Path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name="litepatch-toy", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")


def _complete(tmp_path: Path) -> list:
    import optuna

    try:
        study = _study(tmp_path)
    except Exception:  # not created yet (or mid-creation)
        return []
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


@pytest.mark.slow
def test_resume_after_killed_job(tmp_path, warm_python):
    job = _write_job(tmp_path, trials=7, delay=0.1)
    proc = warm_python.Popen(_cli(str(job), "--no-progress"), env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    try:
        while len(_complete(tmp_path)) < 3:
            assert proc.poll() is None, proc.communicate()[0].decode()
            assert time.time() < deadline, "the job made no progress"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # killed mid-study, no chance to clean up
        proc.wait()
    before = {t.number: (t.params, t.value) for t in _complete(tmp_path)}
    assert 3 <= len(before) < 7
    assert not (tmp_path / "out" / "recipe.yaml").exists()
    plan = _study(tmp_path).user_attrs["litepatch.plan"]

    result = warm_python.run(_cli(str(job), "--no-progress"), env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    after = _complete(tmp_path)
    kept = {t.number: (t.params, t.value) for t in after if t.number in before}
    assert kept == before  # finished trials survived the kill
    assert len(after) == 7  # and the second run only ran the missing ones
    assert _study(tmp_path).user_attrs["litepatch.plan"] == plan  # no second sensitivity pass
    workers = {t.user_attrs["worker"] for t in after}
    assert len(workers) == 2
    from litepatch.recipes import load

    recipe = load(tmp_path / "out" / "recipe.yaml")
    assert recipe.provenance.study == "litepatch-toy" and recipe.measured.psnr is not None
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {
        "recipe.yaml", "report.md", "report.json", "quality_vs_time.png", "layers.png", "steps.png", "study.db", "dense",
    }
    assert "chosen trial" in result.stdout


@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path, warm_python):
    job = _write_job(tmp_path, trials=8, delay=0.1)
    worker = warm_python.Popen(_cli(str(job), "--no-progress", "--worker"), env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    main = warm_python.Popen(_cli(str(job), "--no-progress"), env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    out_main, _ = main.communicate(timeout=300)
    out_worker, _ = worker.communicate(timeout=300)
    assert main.returncode == 0, out_main
    assert worker.returncode == 0, out_worker
    trials = _complete(tmp_path)
    assert len(trials) == 8  # exactly the requested count: no worker starts a trial too many
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(params)) == len(params)  # and no parameters were evaluated twice
    by_worker: dict[str, int] = {}
    for t in trials:
        by_worker[t.user_attrs["worker"]] = by_worker.get(t.user_attrs["worker"], 0) + 1
    assert len(by_worker) == 2 and min(by_worker.values()) >= 1, by_worker
    assert len({t.number for t in trials}) == len(trials)
    assert (tmp_path / "out" / "recipe.yaml").is_file()
    assert "worker finished" in out_worker


def test_job_errors_are_one_line(tmp_path, warm_python):
    bad = tmp_path / "bad.yaml"
    bad.write_text("entry: test_calibration_toy:make_job\nbudget: psnr <= 30\n")
    result = warm_python.run(_cli(str(bad), "--no-progress"), env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "litepatch calibrate: error:" in result.stderr and "psnr >= 30" in result.stderr


@pytest.mark.parametrize(
    "text, message",
    [
        ("entry: a:b\ntrails: 3\n", "trails"),
        ("budget: psnr >= 30\n", "exactly one of 'entry'"),
        ("entry: nocolon\n", "module:function"),
        ("entry: a:b\ntrials: many\n", "trials"),
    ],
)
def test_load_job_validation(tmp_path, text, message):
    from litepatch.calibration.job import load_job

    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_job(path)


def test_load_job_paths_and_overrides(tmp_path):
    from litepatch.calibration.job import load_job, output_dir, space_of, storage_url

    path = tmp_path / "sub" / "job.yaml"
    path.parent.mkdir()
    path.write_text("entry: m:f\nsearch: {max_dense_layers: 2}\n")
    job = load_job(path, ["trials=5", "budget=ssim >= 0.9"])
    assert job.trials == 5 and job.budget == "ssim >= 0.9"
    assert output_dir(job) == tmp_path / "sub" / "calibration-out"
    assert storage_url(job) == f"sqlite:///{tmp_path / 'sub' / 'calibration-out' / 'study.db'}"
    assert space_of(job).max_dense_layers == 2
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_job(tmp_path / "missing.yaml")
