"""Trials that survive kills and share storage: who runs a trial, what it evaluates, when a worker stops.

The rules, for one process or many on one Optuna storage (SQLite, a journal file, PostgreSQL...):

* **Parameters are a function of the finished work.** The study's sampler (:func:`make_proposer`)
  proposes, for every new trial, the first seed trial not yet evaluated or running, then alternately
  a sampler trial and a bisection step. A sampler trial comes from a fresh TPE/GP/random sampler
  seeded with ``(seed, number of evaluated trials)``. A job killed at any point and started again
  therefore proposes what the uninterrupted job would have: a trial killed mid-way (its seed trial
  included) is evaluated again, and with the same seed the study ends in the same recipe.
* **Dead trials are failed, not waited for.** Every trial records its owner (host, boot, pid and
  the process's start time). A RUNNING trial whose owner is a dead process of this machine is
  failed at once; one of another machine is failed by Optuna's heartbeat after its grace period
  (``$LITEPATCH_GRACE_PERIOD`` seconds, default :data:`GRACE_PERIOD`; a heartbeat every third of it);
  one that died before recording its owner is failed when it is older than that grace period. On
  storages without heartbeats (journal files) each trial writes the time into ``litepatch.beat``
  every few seconds, and one silent for :data:`BEAT_GRACE_PERIOD` seconds is failed.
  Failed-by-kill trials are not "evaluated": their parameters are proposed again.
* **No parameters twice, no trial too many.** After its parameters are written, a trial looks at the
  study: when another evaluated or running trial has the same parameters, or when the finished and
  running trials already make the requested count, it steps back (FAIL, marked ``litepatch.yielded``,
  never evaluated). Two racing workers see at least one of each other's writes, so at least one steps
  back; both may, and then both propose again after a short random pause.
* **A generation that raises or returns NaN fails its trial only** (marked ``litepatch.error``); the
  job goes on. It stops early only when no trial has succeeded after :data:`MAX_EARLY_ERRORS` errors,
  or when as many trials failed as were requested.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

OWNER_ATTR = "litepatch.owner"
ERROR_ATTR = "litepatch.error"
YIELD_ATTR = "litepatch.yielded"
ORIGIN_ATTR = "origin"
HEARTBEAT_INTERVAL = 5
"""Seconds between the heartbeats of a trial on storages without heartbeats of their own (journal files)."""
GRACE_PERIOD = 15
GRACE_PERIOD_ENV = "LITEPATCH_GRACE_PERIOD"
BEAT_ATTR = "litepatch.beat"
BEAT_GRACE_PERIOD = 60
"""Seconds without a ``litepatch.beat`` after which a trial of another machine counts as dead, on
storages without heartbeats of their own (journal files; wall clocks of machines differ a little)."""
MAX_EARLY_ERRORS = 3
MAX_PROPOSALS = 20
MAX_STEP_BACKS = 50
POLL_SECONDS = 1.0

_IN_PROGRESS: set[int] = set()
"""Ids of the trials that this process is running now (any thread); its other RUNNING trials are stale."""


class TrialStepBack(Exception):
    """The trial was not evaluated: another trial holds its parameters, or enough trials exist."""


class GenerationFailed(Exception):
    """One generation raised or returned non-finite values; its trial fails, the job goes on."""


# ------------------------------------------------------------------------------------------ owners


def _process_start(pid: int) -> str | None:
    """Start time of process ``pid`` (clock ticks since boot, from /proc), ``""`` where /proc is missing,
    ``None`` when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return ""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class Owner:
    """The process that runs a trial; ``str()`` is the ``host:pid`` shown in reports."""

    host: str
    boot: str
    pid: int
    start: str

    @classmethod
    def me(cls) -> Owner:
        return cls(socket.gethostname(), _boot_id(), os.getpid(), _process_start(os.getpid()) or "")

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}"

    def to_attr(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_attr(cls, text: object) -> Owner | None:
        try:
            return cls(**json.loads(text))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None

    def is_dead(self) -> bool:
        """True only when this is a process of this machine (same host and boot) that no longer runs."""
        me = Owner.me()
        if (self.host, self.boot) != (me.host, me.boot):
            return False
        start = _process_start(self.pid)
        return start is None or (start != "" and self.start != "" and start != self.start)


# ------------------------------------------------------------------------------------- trial states


def _state(name: str):
    import optuna

    return getattr(optuna.trial.TrialState, name)


def is_evaluated(frozen) -> bool:
    """A trial whose parameters were evaluated: complete, or failed by its own generation's error."""
    return frozen.state == _state("COMPLETE") or (frozen.state == _state("FAIL") and ERROR_ATTR in frozen.user_attrs)


def evaluated_trials(study) -> list:
    """The evaluated trials in the order they were created."""
    return [t for t in study.get_trials(deepcopy=False) if is_evaluated(t)]


def same_params(a: dict, b: dict) -> bool:
    """Equal parameter sets (floats within 1e-9, categorical values exactly)."""
    if set(a) != set(b):
        return False
    for key, value in a.items():
        other = b[key]
        if isinstance(value, str) or isinstance(other, str):
            if value != other:
                return False
        elif abs(float(value) - float(other)) > 1e-9:
            return False
    return True


def _fail(storage, frozen, reason: str) -> None:
    from optuna.exceptions import UpdateFinishedTrialError

    try:
        storage.set_trial_user_attr(frozen._trial_id, "litepatch.interrupted", reason)
        storage.set_trial_state_values(frozen._trial_id, state=_state("FAIL"))
    except (UpdateFinishedTrialError, RuntimeError):
        pass  # finished or failed by someone else meanwhile


def grace_period() -> int:
    """Seconds of silence after which a RUNNING trial counts as dead: ``$LITEPATCH_GRACE_PERIOD``, default
    :data:`GRACE_PERIOD` (shorter fails a killed worker's trial sooner, longer tolerates a slower database)."""
    from .errors import CalibrationError

    value = os.environ.get(GRACE_PERIOD_ENV, str(GRACE_PERIOD))
    if not value.strip().isdigit() or int(value) < 1:
        raise CalibrationError(f"{GRACE_PERIOD_ENV} must be a whole number of seconds >= 1, got {value!r}")
    return int(value)


def heartbeat_interval() -> int:
    """Seconds between heartbeats on storages with heartbeats (RDB): a third of the grace period, at least 1."""
    return max(1, grace_period() // 3)


def fail_dead_trials(study, storage, *, grace: float | None = None) -> int:
    """Fails the RUNNING trials of dead workers (see the module docstring); returns how many it failed.
    ``grace``: seconds after which a trial without an owner counts as dead (default :func:`grace_period`)."""
    import optuna

    if storage is None:
        return 0
    grace = grace_period() if grace is None else grace
    native = _native_heartbeat(storage)
    if native:
        optuna.storages.fail_stale_trials(study)
    now = datetime.datetime.now()
    failed = 0
    for frozen in study.get_trials(deepcopy=False, states=(_state("RUNNING"),)):
        owner = Owner.from_attr(frozen.user_attrs.get(OWNER_ATTR))
        silent = 0.0 if native else _seconds_silent(frozen, now)
        if owner is not None and owner.is_dead():
            _fail(storage, frozen, f"worker {owner} died")
            failed += 1
        elif owner == Owner.me() and frozen._trial_id not in _IN_PROGRESS:
            _fail(storage, frozen, "its run in this process ended without a result (a storage error)")
            failed += 1
        elif owner is not None and silent > BEAT_GRACE_PERIOD:
            _fail(storage, frozen, f"worker {owner} sent no heartbeat for {silent:.0f} s")
            failed += 1
        elif owner is None and frozen.datetime_start and (now - frozen.datetime_start).total_seconds() > grace:
            _fail(storage, frozen, "its worker died before it started")
            failed += 1
    return failed


def _seconds_silent(frozen, now: datetime.datetime) -> float:
    """Seconds since the trial's last ``litepatch.beat`` (or its start, when it never beat)."""
    last = frozen.user_attrs.get(BEAT_ATTR)
    if isinstance(last, (int, float)):
        return time.time() - last
    return (now - frozen.datetime_start).total_seconds() if frozen.datetime_start else 0.0


def _native_heartbeat(storage) -> bool:
    return hasattr(storage, "record_heartbeat") and bool(storage.get_heartbeat_interval())


@contextmanager
def heartbeat(storage, trial_id: int, interval: float | None = None):
    """Records the trial's heartbeat now and every ``interval`` seconds while the block runs: the storage's
    own (RDB, by default at the interval it was made with), else the wall-clock time in the trial's
    ``litepatch.beat`` attribute (journal files, by default every :data:`HEARTBEAT_INTERVAL` seconds)."""
    if storage is None:
        yield
        return
    if _native_heartbeat(storage):
        interval = interval or storage.get_heartbeat_interval()

        def record() -> None:
            storage.record_heartbeat(trial_id)
    else:
        interval = interval or HEARTBEAT_INTERVAL

        def record() -> None:
            storage.set_trial_user_attr(trial_id, BEAT_ATTR, time.time())
    stop = threading.Event()
    record()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                record()
            except Exception:  # noqa: BLE001 - a missed beat only makes the trial look stale later
                pass

    thread = threading.Thread(target=beat, name="litepatch-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ----------------------------------------------------------------------------------------- proposer


def derived_seed(seed: int | None, n: int, attempt: int = 0) -> int | None:
    """The inner sampler's seed for the ``n``-th evaluated trial (and the ``attempt``-th try at it)."""
    return None if seed is None else (int(seed) * 1_000_003 + n * 7919 + attempt) % (2**31 - 1)


def make_proposer(
    distributions: dict,
    seeds: Sequence[dict],
    inner: Callable[[int | None], Any],
    *,
    seed: int | None,
    bisect: Callable[[list], dict | None] | None,
    owner: Owner,
    after_trial: Callable | None = None,
):
    """The study's sampler: seeds, bisection steps and an inner sampler, as a function of the study
    (an ``optuna.samplers.BaseSampler``, defined here so that importing this module does not import optuna).

    Args:
        distributions: the Optuna distribution of every parameter the objective suggests.
        seeds: parameter sets tried first, in order.
        inner: ``inner(seed)`` builds a fresh sampler (TPE, GP or random) for one proposal.
        seed: the study's seed (``None``: not reproducible).
        bisect: ``bisect(evaluated_trials)`` returns the next bisection step or ``None``; ``None`` to
            never bisect.
        owner: this process, recorded on every trial it starts.
        after_trial: called as the sampler's ``after_trial`` (the optuna 4 constraints shim).
    """
    import optuna

    class Proposer(optuna.samplers.BaseSampler):
        def __init__(self) -> None:
            self.origins: dict[int, str] = {}

        def before_trial(self, study, trial) -> None:
            _IN_PROGRESS.add(trial._trial_id)
            study._storage.set_trial_user_attr(trial._trial_id, OWNER_ATTR, owner.to_attr())

        def infer_relative_search_space(self, study, trial) -> dict:
            return dict(distributions)

        def sample_relative(self, study, trial, search_space) -> dict:
            if not search_space:
                return {}
            params, origin = self.propose(study, trial)
            self.origins[trial.number] = origin
            return params

        def sample_independent(self, study, trial, param_name, param_distribution):
            sampler = optuna.samplers.RandomSampler(seed=derived_seed(seed, trial.number))
            return sampler.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values) -> None:
            if after_trial is not None:
                after_trial(study, trial, state, values)

        def propose(self, study, trial) -> tuple[dict, str]:
            trials = study.get_trials(deepcopy=False)
            done = [t for t in trials if is_evaluated(t)]
            busy = [t for t in trials if t.state == _state("RUNNING") and t.number != trial.number and t.params]
            taken = [t.params for t in done + busy]

            def free(params: dict) -> bool:
                return not any(same_params(params, p) for p in taken)

            for candidate in seeds:
                if free(candidate):
                    return dict(candidate), "seed"
            if bisect is not None and (len(done) - len(seeds)) % 2 == 1:
                step = bisect(done)
                if step is not None and free(step):
                    return step, "bisect"
            params: dict = {}
            for attempt in range(MAX_PROPOSALS):  # a sampler may repeat itself on a small discrete space
                params = self._inner_params(study, trial, inner(derived_seed(seed, len(done), attempt)))
                if free(params):
                    break
            return params, "sampler"

        @staticmethod
        def _inner_params(study, trial, sampler) -> dict:
            sampler.before_trial(study, trial)
            space = sampler.infer_relative_search_space(study, trial)
            params = dict(sampler.sample_relative(study, trial, space)) if space else {}
            for name, distribution in distributions.items():
                if name not in params:
                    params[name] = sampler.sample_independent(study, trial, name, distribution)
            return {name: params[name] for name in distributions}

    return Proposer()


# ---------------------------------------------------------------------------------------- the claim


def step_back_reason(study, trial, wanted: int) -> str | None:
    """Why ``trial`` (its parameters already written) must not be evaluated, or ``None``."""
    complete, busy = 0, 0
    for other in study.get_trials(deepcopy=False):
        if other.number == trial.number:
            continue
        running = other.state == _state("RUNNING")
        if (running or is_evaluated(other)) and other.params and same_params(other.params, trial.params):
            return f"trial #{other.number} has the same parameters"
        complete += other.state == _state("COMPLETE")
        busy += running
    if complete + busy >= wanted:
        return f"{complete} finished and {busy} running trials make the {wanted} requested"
    return None


@dataclass
class Tally:
    """Where the study stands for one worker."""

    complete: int
    running: int
    errors: list[str]

    @classmethod
    def of(cls, study) -> Tally:
        trials = study.get_trials(deepcopy=False)
        return cls(
            complete=sum(t.state == _state("COMPLETE") for t in trials),
            running=sum(t.state == _state("RUNNING") for t in trials),
            errors=[t.user_attrs[ERROR_ATTR] for t in trials if ERROR_ATTR in t.user_attrs],
        )

    def stop_reason(self, wanted: int) -> str | None:
        if self.complete >= wanted:
            return "done"
        if self.complete == 0 and len(self.errors) >= MAX_EARLY_ERRORS:
            return "errors"
        if len(self.errors) >= wanted:
            return "errors"
        return None


def run_trials(
    study,
    storage,
    objective: Callable[[Any], float],
    wanted: int,
    *,
    timeout: float | None = None,
    on_trial: Callable[[Any], None] | None = None,
    poll: float = POLL_SECONDS,
) -> Tally:
    """Runs trials of ``study`` until ``wanted`` are complete (across workers and restarts), the time is
    up, or the errors of the module docstring stop it; returns the final tally."""
    with quiet_optuna():
        return _run_trials(study, storage, objective, wanted, timeout, on_trial, poll)


@contextmanager
def quiet_optuna():
    """Hides Optuna's warnings about the heartbeat being experimental and meant for ``Study.optimize``:
    this module records the heartbeats itself, so they say nothing to a user."""
    import warnings

    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ExperimentalWarning, message=".*(heartbeat|fail_stale_trials)")
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        yield


def _run_trials(study, storage, objective, wanted: int, timeout, on_trial, poll: float) -> Tally:
    deadline = None if timeout is None else time.monotonic() + timeout
    step_backs = 0
    while True:
        fail_dead_trials(study, storage)
        tally = Tally.of(study)
        if tally.stop_reason(wanted) or (deadline is not None and time.monotonic() > deadline):
            return tally
        if tally.complete + tally.running >= wanted:  # the rest is running elsewhere: wait for it
            time.sleep(poll)
            continue
        if run_one(study, storage, objective) != "stepped back":
            step_backs = 0
            if on_trial is not None:
                on_trial(study)
            continue
        step_backs += 1
        if step_backs >= MAX_STEP_BACKS:
            from .errors import CalibrationError

            raise CalibrationError(
                f"{step_backs} trials in a row found their parameters already taken: the search space has no "
                f"untried parameters left ({tally.complete} of {wanted} trials complete); widen it or ask for fewer trials"
            )
        time.sleep(random.uniform(0.05, 0.5))


def run_one(study, storage, objective: Callable[[Any], float]) -> str:
    """Asks for one trial, evaluates it under a heartbeat and tells the result; returns what happened."""
    trial = study.ask()
    try:
        return _evaluate(study, storage, objective, trial)
    finally:
        _IN_PROGRESS.discard(trial._trial_id)


def _evaluate(study, storage, objective: Callable[[Any], float], trial) -> str:
    outcome = "complete"
    with heartbeat(storage, trial._trial_id):
        try:
            value = objective(trial)
        except TrialStepBack as reason:
            trial.set_user_attr(YIELD_ATTR, str(reason))
            study.tell(trial, state=_state("FAIL"))
            return "stepped back"
        except GenerationFailed:
            study.tell(trial, state=_state("FAIL"))
            return "error"
        except BaseException:
            study.tell(trial, state=_state("FAIL"))  # interrupted here: its parameters are proposed again
            raise
    study.tell(trial, value)
    return outcome
