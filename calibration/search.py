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
(``objective="sparsity"``, hardware independent). Seed trials come first, then a bisection step
on ``level`` around the best feasible trial every other trial, so the dominant dimension converges
geometrically while TPE explores the rest. Which trial evaluates what, across kills, restarts and
workers on one storage, is the business of :mod:`.workers`: a study ends with exactly ``trials``
complete trials, none evaluated twice, and with a seed the same recipe however often it was killed.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from litepatch.kernels import ORDERS

from .budget import Budget
from .metrics import available_metrics, get_metric

RunFn = Callable[[torch.nn.Module, Any], torch.Tensor]

PLAN_ATTR = "litepatch.plan"
DENSE_ATTR = "litepatch.dense_time"
OBJECTIVES = ("time", "sparsity")
REPORT_METRICS = ("psnr", "ssim", "rel_l2")
MIN_THRESHOLD = -24.0


class CalibrationError(ValueError):
    """The calibration cannot go on (bad input, or no trial met the budget); the study is kept."""


@dataclass(frozen=True)
class SearchSpace:
    """Bounds of the low-dimensional search; see the module docstring for the parameters.

    Args:
        level (`tuple[float, float]`, defaults to `(-14.0, -0.5)`): global threshold range (log2 units).
        spread (`tuple[float, float]`, defaults to `(0.0, 3.0)`): sensitivity offset scale range.
        warmup (`tuple[int, int] | None`): dense warm-up steps; ``None`` = ``(0, ~30 % of the steps)``.
        max_dense_layers (`int`, defaults to `0`): up to this many most-sensitive layers may stay dense.
        schedule (`bool`, defaults to `False`): search a per-step ramp ``late`` in ``late_range``.
        probe (`float`, *optional*): threshold of the sensitivity pass; defaults to 85 % of the way up the
            level range (aggressive enough that every layer skips something).
        sensitivity_runs (`int`, defaults to `12`): at most this many sensitivity generations; deeper
            models are probed in contiguous groups of layers.
        orders (`tuple[str, ...]`, defaults to `("anchor",)`): visiting orders to choose from; with more
            than one (``("anchor", "alternate")``) every trial picks one. With one, it is the order of
            every trial and of the sensitivity pass.
    """

    # Optional[...] rather than ``X | None``: calibration jobs read this class as their OmegaConf schema
    level: tuple[float, float] = (-14.0, -0.5)
    spread: tuple[float, float] = (0.0, 3.0)
    warmup: Optional[tuple[int, int]] = None
    max_dense_layers: int = 0
    schedule: bool = False
    late_range: tuple[float, float] = (-3.0, 3.0)
    probe: Optional[float] = None
    sensitivity_runs: int = 12
    orders: tuple[str, ...] = ("anchor",)

    def __post_init__(self):
        if self.probe is None:
            object.__setattr__(self, "probe", round(self.level[1] - 0.15 * (self.level[1] - self.level[0]), 3))
        lo, hi = self.level
        if not (MIN_THRESHOLD <= lo < hi <= 0):
            raise ValueError(f"level range must satisfy {MIN_THRESHOLD} <= low < high <= 0, got {self.level}")
        if not (0 <= self.spread[0] <= self.spread[1]):
            raise ValueError(f"spread range must satisfy 0 <= low <= high, got {self.spread}")
        if self.warmup is not None and not (0 <= self.warmup[0] <= self.warmup[1]):
            raise ValueError(f"warmup range must satisfy 0 <= low <= high, got {self.warmup}")
        if self.max_dense_layers < 0:
            raise ValueError(f"max_dense_layers must be >= 0, got {self.max_dense_layers}")
        if not (MIN_THRESHOLD <= self.probe <= 0):
            raise ValueError(f"probe threshold must be in [{MIN_THRESHOLD}, 0], got {self.probe}")
        if self.sensitivity_runs < 0:
            raise ValueError(f"sensitivity_runs must be >= 0, got {self.sensitivity_runs}")
        object.__setattr__(self, "orders", tuple(self.orders))
        bad = [o for o in self.orders if o not in ORDERS]
        if not self.orders or bad or len(set(self.orders)) != len(self.orders):
            raise ValueError(f"orders must be distinct names from {ORDERS}, got {list(self.orders)}")

    def to_dict(self) -> dict:
        return {
            "level": list(self.level), "spread": list(self.spread),
            "warmup": list(self.warmup) if self.warmup is not None else None,
            "max_dense_layers": self.max_dense_layers, "schedule": self.schedule,
            "late_range": list(self.late_range), "probe": self.probe, "sensitivity_runs": self.sensitivity_runs,
            # only when not the default, so that studies made before the field existed still resume
            **({"orders": list(self.orders)} if self.orders != ("anchor",) else {}),
        }


@dataclass
class Plan:
    """What the study is built on (stored in the study, shared by every worker and resumed run)."""

    layers: list[str]
    offsets: list[float]  # z per layer (positive: more sensitive than average)
    groups: list[list[str]]  # layers probed together
    group_error: list[float]  # rel-L2 of the output with only that group sparse at the probe threshold
    group_kept: list[float]  # kept fraction of that group at the probe threshold
    steps: int  # denoising steps seen per generation (from the patcher's step tracking)
    warmup: tuple[int, int]
    space: dict
    generations: int  # generations spent by the sensitivity pass

    def to_json(self) -> str:
        data = dict(self.__dict__)
        data["warmup"] = list(self.warmup)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        data["warmup"] = tuple(data["warmup"])
        return cls(**data)

    def dense_order(self) -> list[str]:
        """Layers from the most to the least sensitive."""
        return [name for _, name in sorted(zip(self.offsets, self.layers), key=lambda p: -p[0])]


# ----------------------------------------------------------------------------- patching (public API)


def _apply(model, recipe):
    from litepatch.api import apply

    return apply(model, recipe=recipe)


def _model_fingerprint(model):
    from litepatch.api import fingerprint

    return fingerprint(model)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed_run(run: RunFn, model, sample) -> tuple[torch.Tensor, float]:
    _sync()
    start = time.perf_counter()
    with torch.no_grad():
        out = run(model, sample)
    _sync()
    elapsed = time.perf_counter() - start
    if not isinstance(out, torch.Tensor):
        raise CalibrationError(f"run(model, sample) must return a torch.Tensor, got {type(out).__name__}")
    if not torch.isfinite(out).all():
        raise CalibrationError(f"run(model, {sample!r}) returned NaN or inf values")
    return out.detach(), elapsed


def _sample_label(sample) -> str:
    """The sample as the user wrote it, cut at 60 characters, for messages."""
    text = repr(sample)
    return text if len(text) <= 60 else text[:57] + "..."


def sample_key(sample) -> str:
    """Stable short key of a sample (for the dense cache and the report)."""
    text = json.dumps(sample, sort_keys=True, default=repr)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ---------------------------------------------------------------------------------------- the dense cache


class DenseCache:
    """Dense outputs (and their times) per sample: computed once, kept in memory and optionally on disk."""

    def __init__(self, run: RunFn, model, cache_dir: str | os.PathLike | None = None):
        self.run, self.model = run, model
        self.dir = Path(cache_dir) if cache_dir is not None else None
        self._mem: dict[str, tuple[torch.Tensor, float]] = {}
        self.generations = 0

    def get(self, sample) -> tuple[torch.Tensor, float]:
        key = sample_key(sample)
        if key in self._mem:
            return self._mem[key]
        path = self.dir / f"dense-{key}.safetensors" if self.dir is not None else None
        if path is not None and path.is_file():
            from safetensors.torch import load_file
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                elapsed = float((f.metadata() or {}).get("seconds", "nan"))
            out = load_file(str(path))["output"]
        else:
            out, elapsed = _timed_run(self.run, self.model, sample)
            self.generations += 1
            if path is not None:
                from safetensors.torch import save_file

                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                save_file({"output": out.cpu().contiguous()}, str(tmp),
                          metadata={"seconds": repr(elapsed), "sample": json.dumps(sample, default=repr)})
                os.replace(tmp, path)
        self._mem[key] = (out, elapsed)
        return self._mem[key]


# ------------------------------------------------------------------------------------------- recipes


def _clamp(t: float) -> float:
    return float(min(0.0, max(MIN_THRESHOLD, t)))


def recipe_from_params(params: dict, plan: Plan, *, name: str = "calibrated", order: str = "anchor"):
    """The :class:`~litepatch.recipes.schema.Recipe` of one trial's parameters."""
    from litepatch.recipes.schema import LayerSetting, Recipe

    level = float(params["level"])
    spread = float(params.get("spread", 0.0))
    warmup = int(params.get("warmup", 0))
    n_dense = int(params.get("dense", 0))
    late = float(params.get("late", 0.0))
    dense = set(plan.dense_order()[:n_dense])
    layers = {}
    for layer, z in zip(plan.layers, plan.offsets):
        pattern = glob.escape(layer)
        if layer in dense:
            layers[pattern] = LayerSetting(dense=True)
            continue
        base = level - spread * z
        if late and plan.steps > warmup + 1:
            span = plan.steps - 1 - warmup
            schedule = [_clamp(base + late * (2.0 * max(0, s - warmup) / span - 1.0)) for s in range(plan.steps)]
            layers[pattern] = LayerSetting(schedule=[round(v, 4) for v in schedule])
        else:
            layers[pattern] = LayerSetting(threshold=round(_clamp(base), 4))
    return Recipe(name=name, threshold=round(_clamp(level), 4), warmup_steps=warmup,
                  order=params.get("order", order), layers=layers)


def layer_thresholds(recipe, layers: Sequence[str], step: int | None = None) -> dict[str, float | None]:
    """Threshold of each layer (at ``step``, default the first sparse step); ``None`` = dense."""
    step = recipe.warmup_steps if step is None else step
    return {name: recipe.threshold_for(name, step) for name in layers}


# ------------------------------------------------------------------------------------ one evaluation


@dataclass
class SampleResult:
    key: str
    metrics: dict[str, float]
    seconds: float
    kept: float
    ok: bool


def _run_patched(handle, recipe, run: RunFn, model, sample) -> tuple[torch.Tensor, float, Any]:
    handle.configure(recipe=recipe)
    out, elapsed = _timed_run(run, model, sample)
    return out, elapsed, handle.stats()


def _measure(out: torch.Tensor, ref: torch.Tensor, names: Sequence[str]) -> dict[str, float]:
    ref = ref.to(out.device)
    return {name: get_metric(name)(out, ref) for name in names}


# -------------------------------------------------------------------------------------- sensitivity


def _sensitivity_pass(handle, run, model, sample, dense_out, layers: list[str], space: SearchSpace, order: str):
    """Per-layer (or per-group) output error and kept fraction at the probe threshold, other layers dense."""
    from litepatch.recipes.schema import LayerSetting, Recipe

    n_runs = min(space.sensitivity_runs, len(layers))
    if n_runs == 0:
        return [[name] for name in layers], [1.0] * len(layers), [0.5] * len(layers), 0, None
    size = math.ceil(len(layers) / n_runs)
    groups = [layers[i : i + size] for i in range(0, len(layers), size)]
    errors, kept, steps = [], [], 0
    for group in groups:
        members = set(group)
        recipe = Recipe(
            name="sensitivity", threshold=space.probe, warmup_steps=0, order=order,
            layers={glob.escape(n): LayerSetting(dense=n not in members) for n in layers if n not in members},
        )
        out, _, stats = _run_patched(handle, recipe, run, model, sample)
        _require_kernel_calls(stats, members)
        errors.append(get_metric("rel_l2")(out, dense_out.to(out.device)))
        per_layer = stats.per_layer()
        kept.append(sum(per_layer.get(n, 1.0) for n in group) / len(group))
        steps = max(steps, len(stats.per_step()))
    return groups, errors, kept, len(groups), steps


def _require_kernel_calls(stats, layers: set[str]) -> None:
    """Refuses a search over layers whose every call fell back to dense attention (nothing to tune)."""
    calls = [r for r in stats.records if r["layer"] in layers]
    if calls and all(r["dense"] for r in calls):
        reasons = "; ".join(sorted({r["reason"] for r in calls}))
        raise CalibrationError(
            f"no call of {sorted(layers)} ran the LiteAttention kernel (dense fallback: {reasons}); "
            "calibrating would only measure dense attention. Fix the cause first (for example, cast the "
            "model to bfloat16 or float16 on CUDA)"
        )


def _offsets(groups, errors, kept, layers) -> list[float]:
    """Standardised log(error per skipped tile) of each layer's group, clipped to [-2, 2]."""
    cost = []
    for err, k in zip(errors, kept):
        cost.append(math.log(max(err, 1e-7)) - math.log(max(1.0 - k, 1e-3)))
    mean = sum(cost) / len(cost)
    std = math.sqrt(sum((c - mean) ** 2 for c in cost) / len(cost))
    z_group = [0.0 if std < 1e-9 else max(-2.0, min(2.0, (c - mean) / std)) for c in cost]
    z = {}
    for group, value in zip(groups, z_group):
        for name in group:
            z[name] = round(value, 4)
    return [z[name] for name in layers]


# ---------------------------------------------------------------------------------------- storage


STORAGE_TIMEOUT_ENV = "LITEPATCH_STORAGE_TIMEOUT"
SQLITE_HEADER = b"SQLite format 3\x00"


def make_storage(storage):
    """``None`` (in memory), an Optuna storage, an RDB URL (``sqlite:///study.db``), a ``*.db`` path,
    or a journal file (``*.log`` / ``*.journal``, for many machines on a shared file system).

    RDB storages record heartbeats, so that trials of a killed worker on another machine are failed
    (and their parameters proposed again) after :data:`~litepatch.calibration.workers.GRACE_PERIOD`
    seconds; SQLite waits up to ``$LITEPATCH_STORAGE_TIMEOUT`` seconds (default 120) for a lock that
    another worker holds.

    Raises:
        CalibrationError: the file is not a database of that kind (corrupt or another file), or the
            storage cannot be opened; one line naming the file and what to do.
    """
    import optuna

    if storage is None or isinstance(storage, optuna.storages.BaseStorage):
        return storage
    if not isinstance(storage, (str, os.PathLike)):
        raise TypeError(f"storage must be a URL, a path or an optuna storage, got {type(storage).__name__}")
    text = os.fspath(storage)
    if text.endswith((".log", ".journal")) and "://" not in text:
        return _journal_storage(text)
    if "://" not in text:
        Path(text).parent.mkdir(parents=True, exist_ok=True)
        text = f"sqlite:///{Path(text).resolve()}"
    if text.startswith("sqlite:///"):
        _check_sqlite_file(text[len("sqlite:///"):])
    return _rdb_storage(text)


def _storage_timeout() -> float:
    value = os.environ.get(STORAGE_TIMEOUT_ENV, "120")
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise CalibrationError(f"{STORAGE_TIMEOUT_ENV} must be a positive number of seconds, got {value!r}")
    return seconds


def _check_sqlite_file(path: str) -> None:
    """Refuses an existing file that is not an SQLite database before SQLAlchemy retries on it."""
    file = Path(path)
    if not file.is_file() or file.stat().st_size == 0:
        return
    with open(file, "rb") as f:
        header = f.read(len(SQLITE_HEADER))
    if header != SQLITE_HEADER:
        raise CalibrationError(
            f"storage file {file} is not an SQLite database (corrupt, or another kind of file); "
            "move it away to start a new study, or name the right file with storage="
        )


def _rdb_storage(url: str):
    from optuna.storages import RDBStorage
    from sqlalchemy.exc import SQLAlchemyError

    from .workers import GRACE_PERIOD, HEARTBEAT_INTERVAL, quiet_optuna

    sqlite = url.startswith("sqlite")
    engine_kwargs = {"connect_args": {"timeout": _storage_timeout()}} if sqlite else {"pool_pre_ping": True}
    for attempt in range(5):
        try:
            with quiet_optuna():
                return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_INTERVAL,
                                  grace_period=GRACE_PERIOD)
        except SQLAlchemyError as err:
            detail = " ".join(str(getattr(err, "orig", None) or err).split())[:200]
            # two new workers may create the schema of one new database at the same moment
            races = ("already exists", "duplicate key", "UNIQUE constraint", *(("locked",) if sqlite else ()))
            if attempt < 4 and any(m in detail for m in races):
                time.sleep(0.2 * (attempt + 1))
                continue
            raise CalibrationError(
                f"storage {_redact(url)} cannot be opened ({type(err).__name__}: {detail}); check that it is an "
                "Optuna database that this user can reach, or move a corrupt file away to start a new study"
            ) from None
        except ImportError as err:  # the URL names a database driver that is not installed
            missing = err
            while missing is not None and not getattr(missing, "name", None):
                missing = missing.__cause__ or missing.__context__
            package = getattr(missing, "name", None) or "driver"
            hint = ' (pip install "litepatch[postgres]")' if url.startswith("postgresql") else ""
            raise CalibrationError(
                f"storage {_redact(url)} needs the Python package {package!r}, which is not installed{hint}"
            ) from None


def _redact(url: str) -> str:
    """The URL without its password (``postgresql://user:***@host/db``)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url


def _journal_storage(path: str):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        storage = JournalStorage(JournalFileBackend(path))
        storage.get_all_studies()  # replays the file: a corrupt journal fails here, not mid-job
    except Exception as err:  # noqa: BLE001 - one line naming the file
        raise CalibrationError(
            f"journal storage file {path} cannot be read ({type(err).__name__}: {str(err)[:200]}); it is corrupt "
            "or not an Optuna journal: move it away to start a new study"
        ) from None
    return storage


def _constraints_supported() -> bool:
    import optuna

    return hasattr(optuna.trial.Trial, "set_constraint")


def _constraints_func(frozen) -> list[float]:  # optuna 4 shim: the values the objective stored
    return list(frozen.user_attrs.get("constraints", [1.0]))


def make_sampler(kind: str, seed: int | None, n_startup: int):
    import optuna

    extra = {} if _constraints_supported() else {"constraints_func": _constraints_func}
    if kind == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, n_startup_trials=n_startup, constant_liar=True, **extra
        )
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup, **extra)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"sampler must be 'tpe', 'gp' or 'random', got {kind!r}")


# ------------------------------------------------------------------------------------------ helpers


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


def _seed_params(plan: Plan, space: SearchSpace) -> list[dict]:
    """A conservative trial that should always pass, then a ladder of levels with the sensitivity offsets."""
    lo, hi = space.level
    w_lo, w_hi = plan.warmup
    mid_w = (w_lo + w_hi) // 2
    spread = min(max(1.0, space.spread[0]), space.spread[1])
    seeds = []
    for frac, warm in ((0.2, w_hi), (0.5, mid_w), (0.75, mid_w)):
        p = {"level": round(lo + frac * (hi - lo), 3), "spread": spread, "warmup": warm}
        if space.max_dense_layers:
            p["dense"] = 0
        if space.schedule:
            p["late"] = 0.0
        if len(space.orders) > 1:  # seeds take the orders in turn, so that each order is tried early
            p["order"] = space.orders[len(seeds) % len(space.orders)]
        seeds.append(p)
    return seeds


def _same_value(a, b) -> bool:
    if isinstance(a, str) or isinstance(b, str):  # categorical (order)
        return a == b
    return abs(float(a) - float(b)) < 1e-6


def _bisect_next(evaluated: Sequence, space: SearchSpace) -> dict | None:
    """Midpoint in ``level`` between the best feasible evaluated trial and the nearest failing trial above
    it that shares its other parameters (or the top of the range when none failed)."""
    feasible = [t for t in evaluated if is_feasible(t)]
    if not feasible:
        return None
    best = min(feasible, key=lambda t: (t.value, t.number))
    others = {k: v for k, v in best.params.items() if k != "level"}
    level = best.params["level"]
    above = [space.level[1]]
    for t in evaluated:
        if "level" in t.params and t.params["level"] > level + 1e-9 and not is_feasible(t):
            if all(_same_value(t.params.get(k, v), v) for k, v in others.items()):
                above.append(t.params["level"])
    target = (level + min(above)) / 2
    if target - level < 0.05:
        return None
    return {"level": round(target, 4), **others}


def _distributions(space: SearchSpace, plan: Plan, n_layers: int) -> dict:
    """The Optuna distribution of every parameter a trial sets (see the module docstring)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {
        "level": FloatDistribution(*space.level),
        "spread": FloatDistribution(*space.spread),
        "warmup": IntDistribution(*plan.warmup),
    }
    if space.max_dense_layers:
        out["dense"] = IntDistribution(0, min(space.max_dense_layers, n_layers))
    if space.schedule:
        out["late"] = FloatDistribution(*space.late_range)
    if len(space.orders) > 1:
        out["order"] = CategoricalDistribution(list(space.orders))
    return out


def _suggest(trial, name: str, distribution) -> Any:
    from optuna.distributions import FloatDistribution, IntDistribution

    if isinstance(distribution, FloatDistribution):
        return trial.suggest_float(name, distribution.low, distribution.high)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high)
    return trial.suggest_categorical(name, list(distribution.choices))


def _constraints_after_trial(study, trial, state, values) -> None:  # optuna 4: what TPE's constraints_func did
    from optuna.samplers._base import _process_constraints_after_trial

    _process_constraints_after_trial(_constraints_func, study, trial, state)


def _storage_label(storage) -> str:
    """What the report and messages call the storage (an RDB URL without its password)."""
    if storage is None:
        return "in-memory"
    url = getattr(storage, "url", None)
    return _redact(str(url)) if url else type(storage).__name__


@contextlib.contextmanager
def _storage_failures(storage):
    """A database error in the middle of the trials (a lock held past the timeout, a lost connection)
    becomes one line naming the storage; the finished trials are in it, and a rerun continues."""
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (SQLAlchemyError, StorageInternalError) as err:
        cause = err.__cause__ if isinstance(err, StorageInternalError) and err.__cause__ is not None else err
        detail = " ".join(str(getattr(cause, "orig", None) or cause).split())[:200]
        raise CalibrationError(
            f"storage {_storage_label(storage)} failed during the trials ({type(err).__name__}: {detail}); the "
            f"finished trials are kept in it: run the job again to continue (locks wait {STORAGE_TIMEOUT_ENV} s)"
        ) from None


def _default_study_name(model, budget: Budget, samples: Sequence, objective: str) -> str:
    keys = ",".join(sample_key(s) for s in samples)
    digest = hashlib.sha1(f"{type(model).__name__}|{budget}|{keys}|{objective}".encode()).hexdigest()[:10]
    return f"litepatch-{type(model).__name__}-{digest}"


# ------------------------------------------------------------------------------------------ calibrate


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
        bisect (`bool`, defaults to `True`): every other trial, bisect ``level`` around the best feasible trial.
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

    from .report import CalibrationReport, trial_rows

    budget = Budget.parse(budget)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    samples = list(samples)
    held_out = list(held_out)
    if not samples:
        raise ValueError("calibrate needs at least one calibration sample")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be an int >= 1, got {trials!r}")
    overlap = {sample_key(s) for s in samples} & {sample_key(s) for s in held_out}
    if overlap:
        raise ValueError("held-out samples must differ from the calibration samples; shared: "
                         + ", ".join(repr(s) for s in held_out if sample_key(s) in overlap))
    space = space or SearchSpace()
    order = space.orders[0]  # of the sensitivity pass, and of every trial unless the space lists more
    metric_names = list(dict.fromkeys([*budget.metrics, *(m for m in REPORT_METRICS if m in available_metrics())]))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage_obj = make_storage(storage)
    study_name = study_name or _default_study_name(model, budget, samples, objective)
    direction = "minimize"

    dense = DenseCache(run, model, cache_dir)
    dense_outputs = [dense.get(s) for s in samples]  # before patching: exactly what the user sees

    from .workers import Owner, make_proposer, run_trials

    handle = _apply(model, None)
    owner = Owner.me()
    progress_bar = _Progress(trials, progress)
    try:
        layers = list(handle.layers)
        study = optuna.create_study(
            study_name=study_name, storage=storage_obj, direction=direction, load_if_exists=True,
            sampler=make_sampler(sampler, seed, n_startup=3),
        )
        plan = _load_or_make_plan(study, handle, run, model, samples[0], dense_outputs[0][0], layers, space, order)
        _check_resumable(study, plan, layers, samples)
        distributions = _distributions(space, plan, len(layers))
        seeds = _seed_params(plan, space) if sampler != "random" else []
        study.sampler = make_proposer(
            distributions, seeds, lambda s: make_sampler(sampler, s, n_startup=len(seeds)), seed=seed,
            bisect=(lambda done: _bisect_next(done, space)) if bisect and sampler != "random" else None,
            owner=owner, after_trial=None if _constraints_supported() else _constraints_after_trial,
        )
        evaluate = _TrialEvaluator(
            study=study, handle=handle, run=run, model=model, samples=samples, dense_outputs=dense_outputs,
            budget=budget, metric_names=metric_names, plan=plan, name=name, order=order, objective=objective,
            distributions=distributions, wanted=trials, worker=str(owner),
        )
        progress_bar.start(_finished(study))
        with _storage_failures(storage_obj):
            tally = run_trials(study, storage_obj, evaluate, trials, timeout=timeout, on_trial=progress_bar.update)
        progress_bar.close()
        _check_errors(tally, study_name, trials)
        if not finish:
            return None, None
        best = best_feasible(study)
        if best is None:
            reached = [t.user_attrs.get("quality") for t in study.get_trials(deepcopy=False) if "quality" in t.user_attrs]
            raise CalibrationError(
                f"no trial of study {study_name!r} met the budget '{budget}' on every sample in "
                f"{len(study.trials)} trials (quality reached: {reached[:3]}...); loosen the budget, widen "
                "SearchSpace.warmup or lower SearchSpace.level, and run again to continue the study"
            )
        recipe = recipe_from_params(best.params, plan, name=name, order=order)

        # held-out check (and the per-step / per-layer statistics of the chosen recipe)
        check = held_out or samples
        checked = []
        stats_last = None
        dense_times = []
        for s in check:
            ref, dense_seconds, fresh = _dense_of(dense, handle, s)
            dense_times.append(dense_seconds if fresh else _dense_time(handle, run, model, s))
            out, elapsed, stats_last = _run_patched(handle, recipe, run, model, s)
            checked.append({
                "sample": s, "key": sample_key(s), **_measure(out, ref, metric_names),
                "seconds": elapsed, "kept_fraction": stats_last.kept_fraction(),
            })
        per_step = stats_last.per_step() if stats_last is not None else {}
        per_layer_kept = stats_last.per_layer() if stats_last is not None else {}
    finally:
        progress_bar.close()
        handle.remove()

    report = CalibrationReport(
        budget=str(budget), objective=objective, study_name=study_name, storage=_storage_label(storage_obj),
        sampler=sampler, layers=layers, plan=plan.__dict__ | {"warmup": list(plan.warmup)},
        trials=trial_rows(study), best_trial=best.number, held_out=checked, held_out_is_calibration=not held_out,
        per_layer_threshold=layer_thresholds(recipe, layers), per_layer_kept=per_layer_kept,
        per_step_kept={int(k): float(v) for k, v in per_step.items()},
        dense_seconds=sum(dense_times) / len(dense_times),
        patched_seconds=sum(c["seconds"] for c in checked) / len(checked),
        generations=_cost(study, plan, len(samples)), held_out_generations=2 * len(check),
        hardware=hardware(),
    )
    _fill_recipe(recipe, report, budget, samples, held_out, model, context, study_name)
    report.recipe = recipe
    return recipe, report


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


@dataclass
class _TrialEvaluator:
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

        params = {name: _suggest(trial, name, dist) for name, dist in self.distributions.items()}
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
            out, elapsed, stats = _run_patched(self.handle, recipe, self.run, self.model, sample)
            values = _measure(out, self.dense_outputs[index][0], self.metric_names)
        except Exception as err:  # noqa: BLE001 - an OOM or a NaN in one generation fails this trial only
            detail = " ".join(str(err).split())[:300] or type(err).__name__
            message = f"sample {_sample_label(sample)}: {type(err).__name__}: {detail}"
            trial.set_user_attr(ERROR_ATTR, message)
            warnings.warn(f"calibration trial #{trial.number} failed ({message}); the calibration goes on",
                          RuntimeWarning, stacklevel=2)
            raise GenerationFailed(message) from err
        return SampleResult(sample_key(sample), values, elapsed, stats.kept_fraction(), self.budget.holds(values))

    def _record(self, trial, results: list[SampleResult]) -> float:
        per_sample = [r.metrics for r in results]
        violations = [max(v) for v in zip(*(self.budget.violations(m) for m in per_sample))]
        kept = sum(r.kept for r in results) / len(results)
        seconds = sum(r.seconds for r in results) / len(results)
        trial.set_user_attr("quality", self.budget.worst(per_sample))
        trial.set_user_attr("metrics", {m: _worst(m, [p[m] for p in per_sample]) for m in self.metric_names})
        trial.set_user_attr("kept_fraction", kept)
        trial.set_user_attr("seconds", seconds)
        trial.set_user_attr("samples_run", len(results))
        trial.set_user_attr("complete_eval", len(results) == len(self.samples))
        trial.set_user_attr("failed_on", [r.key for r in results if not r.ok])
        trial.set_user_attr("constraints", violations)
        if _constraints_supported():
            for clause, value in zip(self.budget.clauses, violations):
                trial.set_constraint(str(clause), value)
        return kept if self.objective == "sparsity" else seconds


def _worst(metric: str, values: list[float]) -> float:
    return min(values) if get_metric(metric).higher_is_better else max(values)


def _finished(study) -> int:
    import optuna

    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


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


def _load_or_make_plan(study, handle, run, model, sample, dense_out, layers, space: SearchSpace, order) -> Plan:
    stored = study.user_attrs.get(PLAN_ATTR)
    if stored:
        plan = Plan.from_json(stored)
        if plan.space != space.to_dict():
            raise CalibrationError(
                f"study {study.study_name!r} was created with search space {plan.space}, now {space.to_dict()}; "
                "use the same settings to resume it, or another study_name"
            )
        return plan
    groups, errors, kept, generations, steps = _sensitivity_pass(
        handle, run, model, sample, dense_out, layers, space, order
    )
    if steps is None:  # no sensitivity runs: learn the step count from one probe generation
        from litepatch.recipes.schema import Recipe

        _, _, stats = _run_patched(handle, Recipe(name="probe", threshold=space.probe), run, model, sample)
        _require_kernel_calls(stats, set(layers))
        steps, generations = len(stats.per_step()), 1
    steps = max(1, steps)
    warmup = tuple(space.warmup) if space.warmup is not None else (0, max(1, round(0.3 * steps)))
    plan = Plan(
        layers=layers, offsets=_offsets(groups, errors, kept, layers), groups=groups,
        group_error=errors, group_kept=kept, steps=steps, warmup=warmup, space=space.to_dict(),
        generations=generations,
    )
    if PLAN_ATTR not in study.user_attrs:  # another worker may have finished first: keep theirs
        study.set_user_attr(PLAN_ATTR, plan.to_json())
    return Plan.from_json(study.user_attrs[PLAN_ATTR])


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
    _, elapsed = _timed_run(run, model, sample)
    return elapsed


def _cost(study, plan: Plan, n_samples: int) -> dict[str, int]:
    trial_gens = sum(int(t.user_attrs.get("samples_run", 0)) for t in study.get_trials(deepcopy=False))
    return {"dense": n_samples, "sensitivity": plan.generations, "trials": trial_gens,
            "total": n_samples + plan.generations + trial_gens}


def _fill_recipe(recipe, report, budget: Budget, samples, held_out, model, context, study_name) -> None:
    from litepatch.recipes.schema import Context, Measured, Provenance
    from litepatch.version import __version__

    rows = report.held_out
    worst = {m: _worst(m, [r[m] for r in rows]) for m in REPORT_METRICS if rows and m in rows[0]}
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
               f"{report.objective}; {report.generations['total']} generations; best trial #{report.best_trial}"),
    )


def _finite(value):
    if value is None:
        return None
    return 999.0 if math.isinf(value) else value
