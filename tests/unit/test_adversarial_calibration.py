"""Calibration jobs under attack: kills at every phase, generations that raise or return NaN, corrupt and
locked storage, a missing optional dependency, racing workers. Every case ends in exactly the requested
trials and the uninterrupted job's recipe, or one clear error naming the input and the problem; no
finished trial is ever lost. The kills are real SIGKILLs of ``litepatch calibrate`` subprocesses
(``calibration_faults`` arms them at named phases), forked from a warm interpreter (``warm_python``)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TRIALS = 4
JOB = """\
entry: calibration_faults:make_job
budget: psnr >= 50
trials: {trials}
objective: sparsity
output: out
name: toy
search: {{warmup: [0, 2], sensitivity_runs: 2}}
"""


def _write_job(folder: Path, trials: int = TRIALS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(JOB.format(trials=trials))
    return path


def _run(python, job: Path, *args: str, kill: str | None = None, fail: str | None = None, env: dict | None = None,
         timeout: float = 240) -> subprocess.CompletedProcess:
    """``litepatch calibrate job`` in a subprocess started by ``python`` (``warm_python``), with a fault armed (see
    ``calibration_faults``)."""
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
               "PYTHONWARNINGS": "ignore", "LITEPATCH_TEST_KILL_MARKER": str(job.parent / f"killed-{kill}")}
    environ.pop("LITEPATCH_TEST_KILL", None)
    environ.pop("LITEPATCH_TEST_FAIL", None)
    if kill:
        environ["LITEPATCH_TEST_KILL"] = kill
    if fail:
        environ["LITEPATCH_TEST_FAIL"] = fail
    environ.update(env or {})
    return python.run([sys.executable, "-m", "calibration_faults", str(job), "--no-progress", *args],
                          env=environ, capture_output=True, text=True, timeout=timeout)


def _trials(folder: Path) -> list:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="litepatch-toy", storage=f"sqlite:///{folder / 'out' / 'study.db'}")
    return study.get_trials(deepcopy=False)


def _complete(folder: Path) -> dict:
    try:
        trials = _trials(folder)
    except KeyError:  # killed after the storage was made, before the study was
        return {}
    return {t.number: (t.params, t.value) for t in trials if t.state.name == "COMPLETE"}


def _settings(folder: Path) -> dict:
    """What the recipe sets (measured numbers and provenance aside)."""
    from litepatch.recipes import load

    recipe = load(folder / "out" / "recipe.yaml")
    return {"threshold": recipe.threshold, "warmup": recipe.warmup_steps, "order": recipe.order,
            "schedule": list(recipe.schedule), "layers": {k: repr(v) for k, v in recipe.layers.items()}}


def _assert_study_is_whole(folder: Path, trials: int = TRIALS) -> None:
    """Exactly ``trials`` COMPLETE trials with distinct parameters and nothing left RUNNING."""
    all_trials = _trials(folder)
    complete = [t for t in all_trials if t.state.name == "COMPLETE"]
    assert len(complete) == trials, [(t.number, t.state.name, t.user_attrs) for t in all_trials]
    params = [tuple(sorted(t.params.items())) for t in complete]
    assert len(set(params)) == len(params), params
    assert not [t.number for t in all_trials if t.state.name in ("RUNNING", "WAITING")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, warm_python) -> dict:
    """The uninterrupted job: its recipe settings and its complete trials' parameters."""
    folder = tmp_path_factory.mktemp("reference")
    result = _run(warm_python, _write_job(folder))
    assert result.returncode == 0, result.stdout + result.stderr
    return {"settings": _settings(folder),
            "params": sorted(tuple(sorted(p.items())) for p, _ in _complete(folder).values())}


# --------------------------------------------------------------------------------------------- kills


def test_job_killed_inside_its_seed_trial_evaluates_it_when_rerun(tmp_path, reference, warm_python):
    job = _write_job(tmp_path)
    killed = _run(warm_python, job, kill="generation")
    assert killed.returncode == -9, killed.stdout + killed.stderr
    (running,) = [t for t in _trials(tmp_path) if t.state.name == "RUNNING"]  # the seed trial, mid-generation
    assert not _complete(tmp_path)
    started = time.monotonic()
    result = _run(warm_python, job)  # at once: no waiting for a heartbeat grace period
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.monotonic() - started < 120
    _assert_study_is_whole(tmp_path)
    after = {t.number: t for t in _trials(tmp_path)}
    assert after[running.number].state.name == "FAIL"
    assert "died" in after[running.number].user_attrs["litepatch.interrupted"]
    evaluated = [t.params for t in after.values() if t.state.name == "COMPLETE"]
    assert running.params in evaluated  # the seed's parameters were evaluated after all
    assert _settings(tmp_path) == reference["settings"]


@pytest.mark.slow
def test_sigkill_at_every_phase_loses_nothing_and_ends_in_the_same_recipe(tmp_path, reference, warm_python):
    from calibration_faults import PHASES

    job = _write_job(tmp_path)
    for phase in PHASES:
        before = _complete(tmp_path) if (tmp_path / "out" / "study.db").exists() else {}
        result = _run(warm_python, job, kill=phase)
        assert result.returncode == -9, f"{phase}: {result.stdout + result.stderr}"
        assert (tmp_path / f"killed-{phase}").read_text() == phase
        if (tmp_path / "out" / "study.db").exists():
            after = _complete(tmp_path)
            assert {n: after[n] for n in before} == before, phase  # finished trials survive every kill
    result = _run(warm_python, job)
    assert result.returncode == 0, result.stdout + result.stderr
    _assert_study_is_whole(tmp_path)
    assert sorted(tuple(sorted(p.items())) for p, _ in _complete(tmp_path).values()) == reference["params"]
    assert _settings(tmp_path) == reference["settings"]
    assert (tmp_path / "out" / "report.md").is_file()


# -------------------------------------------------------------------------------- failing generations


def _toy():
    from calibration_faults import make_job

    model, run, samples, held_out = make_job()
    return model, run, samples, held_out


def _calibrate(run, model, samples, **kwargs):
    from litepatch.calibration import calibrate
    from litepatch.calibration import SearchSpace

    kwargs.setdefault("trials", TRIALS)
    return calibrate(run, samples, "psnr >= 50", model=model, objective="sparsity", progress=False,
                     space=SearchSpace(warmup=(0, 2), sensitivity_runs=2), **kwargs)


def _failing_in_trials(run, failures: dict[int, str]):
    """``run`` whose n-th generation inside a trial raises (``oom``) or returns NaN (``nan``)."""
    import torch

    from litepatch.calibration.trial import TrialEvaluator

    count = {"n": 0}
    original = TrialEvaluator._sample

    def sample(self, trial, recipe, index):
        count["n"] += 1
        kind = failures.get(count["n"])
        if kind is None:
            return original(self, trial, recipe, index)
        bad = self.run

        def failing(m, s):
            if kind == "oom":
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return torch.full_like(bad(m, s), float("nan"))

        self.run = failing
        try:
            return original(self, trial, recipe, index)
        finally:
            self.run = bad

    return sample


def test_a_generation_that_raises_or_returns_nan_fails_its_trial_not_the_study(monkeypatch):
    from litepatch.calibration.trial import TrialEvaluator

    model, run, samples, _ = _toy()
    monkeypatch.setattr(TrialEvaluator, "_sample", _failing_in_trials(run, {1: "oom", 3: "nan"}))
    with pytest.warns(RuntimeWarning, match="calibration trial #0 failed .*CUDA out of memory"):
        recipe, report = _calibrate(run, model, samples)
    rows = {r["number"]: r for r in report.trials}
    assert sum(r["state"] == "COMPLETE" for r in rows.values()) == TRIALS
    failed = [r for r in rows.values() if r["state"] == "FAIL"]
    assert len(failed) == 2
    assert "RuntimeError: CUDA out of memory" in failed[0]["error"]
    assert "returned NaN or inf values" in failed[1]["error"]
    assert "| fail: sample 0: RuntimeError: CUDA out of memory" in report.to_markdown()
    assert recipe.threshold is not None


def test_a_generation_that_always_fails_stops_the_job_with_its_error(monkeypatch):
    from litepatch.calibration import CalibrationError
    from litepatch.calibration.trial import TrialEvaluator

    model, run, samples, _ = _toy()
    monkeypatch.setattr(TrialEvaluator, "_sample", _failing_in_trials(run, dict.fromkeys(range(1, 50), "oom")))
    started = time.monotonic()
    with pytest.warns(RuntimeWarning), pytest.raises(CalibrationError) as info:
        _calibrate(run, model, samples)
    message = str(info.value)
    assert "no trial of study" in message and "3 trial(s) failed" in message and "CUDA out of memory" in message
    assert "\n" not in message and time.monotonic() - started < 60


def test_failed_trials_in_a_job_exit_zero_with_the_recipe(tmp_path, warm_python):
    job = _write_job(tmp_path)
    result = _run(warm_python, job, fail="oom:2,nan:4")
    assert result.returncode == 0, result.stdout + result.stderr
    _assert_study_is_whole(tmp_path)
    errors = [t.user_attrs.get("litepatch.error") for t in _trials(tmp_path) if t.state.name == "FAIL"]
    assert len(errors) == 2 and "CUDA out of memory" in errors[0]
    assert (tmp_path / "out" / "recipe.yaml").is_file()


# ------------------------------------------------------------------------------------------- storage


@pytest.mark.parametrize(
    "content",
    [b"this is not a database\n" * 100, b"SQLite format 3\x00" + b"\x00\xff" * 2048, os.urandom(8192)],
    ids=["text", "sqlite-header-then-garbage", "random"],
)
def test_corrupt_storage_file_is_one_clear_error_naming_it_fast(tmp_path, content):
    from litepatch.calibration import CalibrationError

    db = tmp_path / "study.db"
    db.write_bytes(content)
    model, run, samples, _ = _toy()
    started = time.monotonic()
    with pytest.raises(CalibrationError) as info:
        _calibrate(run, model, samples, storage=str(db))
    message = str(info.value)
    assert str(db) in message and "\n" not in message and len(message) < 600
    assert "corrupt" in message or "not an SQLite database" in message
    assert time.monotonic() - started < 5  # no retry loop
    assert db.read_bytes() == content  # the file is left as it was, for the user to inspect


def test_corrupt_storage_in_a_job_is_one_line_on_stderr(tmp_path, warm_python):
    job = _write_job(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "study.db").write_bytes(b"\x00garbage" * 1000)
    started = time.monotonic()
    result = _run(warm_python, job)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "study.db" in result.stderr and "not an SQLite database" in result.stderr
    assert "Traceback" not in result.stderr and time.monotonic() - started < 60


def test_corrupt_journal_file_is_one_clear_error(tmp_path):
    from litepatch.calibration import CalibrationError

    journal = tmp_path / "study.log"
    journal.write_text('{"op_code": 0, "worker_id": "x"\n not json at all\n')
    model, run, samples, _ = _toy()
    with pytest.raises(CalibrationError, match=f"journal storage file {journal} cannot be read"):
        _calibrate(run, model, samples, storage=str(journal))


def test_storage_locked_for_longer_than_the_timeout_is_a_clear_error(tmp_path, monkeypatch):
    from litepatch.calibration import CalibrationError
    from litepatch.calibration.search import make_storage

    db = tmp_path / "study.db"
    make_storage(str(db))  # a valid, empty study database
    monkeypatch.setenv("LITEPATCH_STORAGE_TIMEOUT", "0.5")
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        model, run, samples, _ = _toy()
        started = time.monotonic()
        with pytest.raises(CalibrationError) as info:
            _calibrate(run, model, samples, storage=str(db))
        assert str(db) in str(info.value) and "locked" in str(info.value) and "\n" not in str(info.value)
        assert time.monotonic() - started < 30
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_storage_locked_for_a_moment_is_waited_for(tmp_path):
    from litepatch.calibration.search import make_storage

    db = tmp_path / "study.db"
    make_storage(str(db))
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(1.5, lambda: (holder.execute("ROLLBACK"), holder.close()))
    release.start()
    model, run, samples, _ = _toy()
    recipe, report = _calibrate(run, model, samples, storage=str(db), trials=2)
    release.join()
    assert sum(r["state"] == "COMPLETE" for r in report.trials) == 2


@pytest.mark.parametrize("value", ["0", "-3", "soon", "nan"])
def test_invalid_storage_timeout_is_named(value, tmp_path, monkeypatch):
    from litepatch.calibration import CalibrationError
    from litepatch.calibration.search import make_storage

    monkeypatch.setenv("LITEPATCH_STORAGE_TIMEOUT", value)
    with pytest.raises(CalibrationError, match="LITEPATCH_STORAGE_TIMEOUT must be a positive number of seconds"):
        make_storage(str(tmp_path / "study.db"))


@pytest.mark.parametrize("value", ["0", "-3", "soon", "2.5"])
def test_invalid_grace_period_is_named(value, tmp_path, monkeypatch):
    from litepatch.calibration import CalibrationError
    from litepatch.calibration.search import make_storage

    monkeypatch.setenv("LITEPATCH_GRACE_PERIOD", value)
    with pytest.raises(CalibrationError, match="LITEPATCH_GRACE_PERIOD must be a whole number of seconds >= 1"):
        make_storage(str(tmp_path / "study.db"))


def test_grace_period_sets_the_heartbeat_of_rdb_storages(tmp_path, monkeypatch):
    from litepatch.calibration.search import make_storage

    monkeypatch.setenv("LITEPATCH_GRACE_PERIOD", "6")
    storage = make_storage(str(tmp_path / "study.db"))
    assert (storage.grace_period, storage.get_heartbeat_interval()) == (6, 2)


def test_storage_url_with_a_password_is_redacted_in_errors():
    from litepatch.calibration import CalibrationError
    from litepatch.calibration.search import make_storage

    with pytest.raises(CalibrationError) as info:
        make_storage("postgresql+psycopg://me:hunter2@127.0.0.1:1/nothing")
    assert "hunter2" not in str(info.value) and "me:***@127.0.0.1" in str(info.value)


# ---------------------------------------------------------------------------------- optional plots


def test_missing_matplotlib_is_a_warning_before_the_first_trial_and_the_job_succeeds(tmp_path, monkeypatch):
    import optuna

    from litepatch.calibration.job import load_job, run_job

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.syspath_prepend(str(HERE))
    job = load_job(_write_job(tmp_path), ["trials=2"])
    lines: list[tuple[str, int]] = []

    def log(line: str) -> None:
        db = tmp_path / "out" / "study.db"
        started = 0
        if db.exists():
            study = optuna.load_study(study_name="litepatch-toy", storage=f"sqlite:///{db}")
            started = len(study.trials)
        lines.append((line, started))

    recipe, report = run_job(job, progress=False, log=log)
    warning = [(line, started) for line, started in lines if "matplotlib is not installed" in line]
    assert warning and warning[0][1] == 0  # said before any trial ran
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"recipe.yaml", "report.md", "report.json"} <= names and not any(n.endswith(".png") for n in names)
    assert recipe is not None


def test_report_save_without_matplotlib_warns_instead_of_failing(tmp_path, monkeypatch):
    model, run, samples, _ = _toy()
    _, report = _calibrate(run, model, samples, trials=2)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.warns(RuntimeWarning, match="matplotlib is not installed"):
        paths = report.save(tmp_path / "r")
    assert [p.name for p in paths] == ["report.md", "report.json"]


# ------------------------------------------------------------------------------------------ workers


def test_racing_workers_never_evaluate_the_same_parameters(tmp_path):
    """Two workers that propose the same parameters at the same moment: at least one steps back."""
    import optuna

    from litepatch.calibration.workers import step_back_reason

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{tmp_path / 's.db'}"
    a = optuna.create_study(study_name="s", storage=storage)
    b = optuna.load_study(study_name="s", storage=storage)
    ta, tb = a.ask(), b.ask()  # both asked before either wrote its parameters
    for trial in (ta, tb):
        trial.suggest_float("level", -14.0, -0.5)  # random sampler: different values ...
    a.enqueue_trial({"level": -7.0})
    b.enqueue_trial({"level": -7.0})
    ta2, tb2 = a.ask(), b.ask()  # ... and the same ones, both popped before either wrote them
    for trial in (ta2, tb2):
        trial.suggest_float("level", -14.0, -0.5)
    reasons = [step_back_reason(a, ta2, 10), step_back_reason(b, tb2, 10)]
    assert all(r is not None and "has the same parameters" in r for r in reasons)
    assert step_back_reason(a, ta, 10) is None and step_back_reason(b, tb, 10) is None
    assert "0 finished and 3 running trials make the 3 requested" in step_back_reason(a, ta, 3)


def test_threads_as_workers_on_one_storage_share_the_trials(tmp_path):
    """Three in-process workers on one SQLite study: exactly the requested count, no parameters twice."""
    from calibration_faults import make_job

    storage = str(tmp_path / "study.db")
    errors: list[BaseException] = []

    def worker() -> None:
        model, run, samples, _ = make_job()
        try:
            _calibrate(run, model, samples, storage=storage, study_name="shared", finish=False, trials=6)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors, errors
    import optuna

    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{storage}")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 6
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 6
    assert not [t for t in study.trials if t.state.name == "RUNNING"]


def test_journal_trial_of_a_silent_worker_on_another_machine_is_failed(tmp_path, monkeypatch):
    """Journal files have no heartbeat of their own: without litepatch's, a worker that died on another
    machine left its trial RUNNING forever and the others waited for it without end."""
    import dataclasses

    import optuna

    from litepatch.calibration import workers
    from litepatch.calibration.search import make_storage

    storage = make_storage(str(tmp_path / "study.log"))
    study = optuna.create_study(study_name="j", storage=storage)
    elsewhere = dataclasses.replace(workers.Owner.me(), host="another-machine").to_attr()
    silent, beating = study.ask(), study.ask()
    for trial in (silent, beating):
        trial.set_user_attr(workers.OWNER_ATTR, elsewhere)
    with workers.heartbeat(storage, beating._trial_id, interval=0.05):
        time.sleep(0.2)
        assert workers.fail_dead_trials(study, storage) == 0  # both are young
        monkeypatch.setattr(workers, "BEAT_GRACE_PERIOD", 0.15)
        time.sleep(0.2)  # the silent one never beat and is older than the grace period now
        assert workers.fail_dead_trials(study, storage) == 1
    states = {t.number: t.state.name for t in study.get_trials()}
    assert states == {silent.number: "FAIL", beating.number: "RUNNING"}
    assert "sent no heartbeat" in study.get_trials()[silent.number].user_attrs["litepatch.interrupted"]


def test_storage_locked_in_the_middle_of_the_trials_is_one_line_and_a_rerun_continues(tmp_path, monkeypatch):
    from litepatch.calibration import CalibrationError
    from litepatch.calibration.trial import TrialEvaluator

    db = tmp_path / "study.db"
    monkeypatch.setenv("LITEPATCH_STORAGE_TIMEOUT", "0.3")
    original = TrialEvaluator._sample
    holder = {}

    def sample_then_lock(self, trial, recipe, index):
        result = original(self, trial, recipe, index)
        if trial.number == 2 and "connection" not in holder:  # another process takes the database
            holder["connection"] = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
            holder["connection"].execute("BEGIN EXCLUSIVE")
        return result

    monkeypatch.setattr(TrialEvaluator, "_sample", sample_then_lock)
    model, run, samples, _ = _toy()
    with pytest.raises(CalibrationError) as info:
        _calibrate(run, model, samples, storage=str(db))
    message = str(info.value)
    assert str(db) in message and "locked" in message and "run the job again to continue" in message
    assert "\n" not in message
    holder["connection"].execute("ROLLBACK")
    holder["connection"].close()
    monkeypatch.setattr(TrialEvaluator, "_sample", original)
    _, report = _calibrate(run, model, samples, storage=str(db))
    states = [r["state"] for r in report.trials]
    assert states.count("COMPLETE") == TRIALS and [r["number"] for r in report.trials][:2] == [0, 1]


KILL_AFTER_THE_STUDIES_TABLE = """\
import os, signal, sys
from sqlalchemy import event
from sqlalchemy.engine import Engine
from litepatch.calibration.storage import make_storage

@event.listens_for(Engine, "after_cursor_execute")
def die(conn, cursor, statement, *args):
    if statement.lstrip().startswith("CREATE TABLE studies"):
        os.kill(os.getpid(), signal.SIGKILL)

make_storage(sys.argv[1])
"""


def test_a_worker_killed_while_it_creates_the_database_leaves_one_study_per_name(tmp_path, warm_python):
    """SQLite commits each CREATE of the schema on its own: a SIGKILL between the studies table and its unique index
    on the name left a database where every run added a study of that name, and the second run failed inside
    ``optuna.create_study`` (StorageInternalError around MultipleResultsFound)."""
    import optuna

    db = tmp_path / "study.db"
    killed = warm_python.run([sys.executable, "-c", KILL_AFTER_THE_STUDIES_TABLE, str(db)], capture_output=True,
                             text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    model, run, samples, _ = _toy()
    _calibrate(run, model, samples, storage=str(db), trials=1, finish=False)
    _calibrate(run, model, samples, storage=str(db), trials=2, finish=False)  # continues the same study
    (name,) = optuna.get_all_study_names(f"sqlite:///{db}")
    trials = optuna.load_study(study_name=name, storage=f"sqlite:///{db}").get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]


def test_a_storage_error_while_the_study_is_opened_is_one_line(tmp_path, monkeypatch):
    import optuna
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import OperationalError

    from litepatch.calibration import CalibrationError

    def locked_for_too_long(**kwargs):
        try:
            raise OperationalError("INSERT INTO studies", {}, sqlite3.OperationalError("database is locked"))
        except OperationalError as err:
            raise StorageInternalError("An exception is raised during the commit.") from err

    monkeypatch.setattr(optuna, "create_study", locked_for_too_long)
    db = tmp_path / "study.db"
    model, run, samples, _ = _toy()
    with pytest.raises(CalibrationError) as info:
        _calibrate(run, model, samples, storage=str(db))
    message = str(info.value)
    assert str(db) in message and "the opening of the study" in message and "database is locked" in message
    assert "\n" not in message


def test_the_report_never_shows_a_storage_password():
    from litepatch.calibration.storage import storage_label as _storage_label

    class Storage:
        url = "postgresql+psycopg://calib:hunter2@db.example/litepatch"

    assert _storage_label(Storage()) == "postgresql+psycopg://calib:***@db.example/litepatch"


def test_storage_url_whose_driver_is_missing_names_the_package(monkeypatch):
    import builtins

    from litepatch.calibration import CalibrationError
    from litepatch.calibration.search import make_storage

    real_import = builtins.__import__

    def no_psycopg(name, *args, **kwargs):
        if name.split(".")[0] == "psycopg":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_psycopg)
    with pytest.raises(CalibrationError, match=r"needs the Python package 'psycopg'.*litepatch\[postgres\]") as info:
        make_storage("postgresql+psycopg://me:hunter2@127.0.0.1:1/nothing")
    assert "hunter2" not in str(info.value)
