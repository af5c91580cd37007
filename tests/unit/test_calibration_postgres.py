"""Calibration workers on a real PostgreSQL server, as on several machines: three ``litepatch calibrate``
processes share one study; one is SIGKILLed mid-trial while it claims to run on another machine, so
only the storage's heartbeat can tell that it died. No trial may be lost or evaluated twice, and the
study must end with exactly the requested count.

The server is ``$LITEPATCH_TEST_POSTGRES_URL`` (``.ci/run`` starts one) or one started here from
Debian's ``postgresql`` programs (``tests/postgres_server.py``); the test is skipped, saying why, only
where neither works."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from postgres_server import URL_ENV, PostgresServer, PostgresUnavailable  # noqa: E402

TRIALS = 6
GRACE_PERIOD = 5
"""Seconds after its last heartbeat that the killed worker's trial is failed (a heartbeat a second; default 15)."""
JOB = """\
entry: calibration_faults:make_job
entry_args: {{delay: 0.4}}
budget: psnr >= 50
trials: {trials}
objective: sparsity
output: out
name: toy
storage: {storage}
study_name: {study}
search: {{warmup: [0, 2], sensitivity_runs: 2}}
"""


@pytest.fixture(scope="module")
def postgres_url():
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is missing: pip install -e '.[test]'")
    if os.environ.get(URL_ENV):
        yield os.environ[URL_ENV]
        return
    server = PostgresServer()
    try:
        server.start()
    except PostgresUnavailable as err:
        server.stop()
        pytest.skip(f"PostgreSQL cannot be started here: {err}")
    try:
        yield server.url
    finally:
        server.stop()


def _worker(python, job: Path, *args: str, host: str | None = None) -> subprocess.Popen:
    """A ``litepatch calibrate`` worker started by ``python`` (``warm_python``); ``host`` is the machine it claims."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "PYTHONWARNINGS": "ignore", "LITEPATCH_GRACE_PERIOD": str(GRACE_PERIOD)}
    env.pop("LITEPATCH_TEST_KILL", None)
    if host:
        env["LITEPATCH_TEST_HOST"] = host
    return python.Popen([sys.executable, "-m", "calibration_faults", str(job), "--no-progress", *args], env=env,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _trials(url: str, study: str) -> list:
    import optuna

    from litepatch.calibration.storage import make_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:  # opened as the workers open it: a plain RDBStorage raced them creating the new database's schema
        return optuna.load_study(study_name=study, storage=make_storage(url)).get_trials(deepcopy=False)
    except KeyError:  # not created yet
        return []


def _running_trial_of(url: str, study: str, pid: int):
    from litepatch.calibration.workers import OWNER_ATTR, Owner

    for t in _trials(url, study):
        owner = Owner.from_attr(t.user_attrs.get(OWNER_ATTR))
        if t.state.name == "RUNNING" and t.params and owner is not None and owner.pid == pid:
            return t
    return None


@pytest.mark.slow
def test_three_workers_on_postgresql_survive_a_killed_worker(tmp_path, postgres_url, warm_python):
    study = f"toy-{uuid.uuid4().hex[:8]}"
    job = tmp_path / "job.yaml"
    job.write_text(JOB.format(trials=TRIALS, storage=postgres_url, study=study))
    victim = _worker(warm_python, job, "--worker", host="another-machine")
    others = [_worker(warm_python, job, "--worker"), _worker(warm_python, job)]
    try:
        deadline = time.monotonic() + 240
        killed = None
        while killed is None:
            assert victim.poll() is None, victim.communicate()[0]
            assert time.monotonic() < deadline, "the victim never started a trial"
            killed = _running_trial_of(postgres_url, study, victim.pid)
            time.sleep(0.2)
        os.killpg(victim.pid, signal.SIGKILL)  # mid-trial: its parameters are written, its generations run
        victim.wait()
        outputs = [p.communicate(timeout=300)[0] for p in others]
    finally:
        for p in (victim, *others):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert victim.returncode == -signal.SIGKILL
    assert [p.returncode for p in others] == [0, 0], outputs
    trials = _trials(postgres_url, study)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == TRIALS  # exactly the requested count
    params = [tuple(sorted(t.params.items())) for t in complete]
    assert len(set(params)) == TRIALS  # nothing evaluated twice
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    dead = next(t for t in trials if t.number == killed.number)
    assert dead.state.name == "FAIL"  # failed by the heartbeat's grace period, not waited for forever
    if killed.user_attrs.get("origin") == "seed":  # a seed's parameters are evaluated after all
        assert tuple(sorted(killed.params.items())) in params
    assert len({t.user_attrs["worker"] for t in complete}) >= 2
    assert (tmp_path / "out" / "recipe.yaml").is_file() and "chosen trial" in outputs[1]
