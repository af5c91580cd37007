"""Calibration jobs: one YAML file (OmegaConf) that names the model, the samples and the budget.

``litepatch calibrate JOB.yaml`` runs it. The study lives in Optuna storage (SQLite next to the
output by default), so a job killed at any point continues where it stopped when started again,
and several workers (``--worker``) on the same storage share the trials. Relative paths in the job
(``output``, a ``*.db`` storage, ``pipeline``) are resolved against the job file's folder.

Example job::

    entry: my_project.calib:make      # module:function -> (model, run, samples[, held_out]) or a dict
    entry_args: {steps: 20}           # keyword arguments of the entry function
    samples: [["a red fox", 0], ["a city at night", 1]]   # optional: replaces the entry's samples
    held_out: [["a cat", 7]]
    budget: psnr >= 30
    trials: 20
    objective: time                   # or sparsity
    output: calibration-out           # recipe.yaml, report.md, report.json, *.png, study.db
    search: {warmup: [0, 8], max_dense_layers: 2}

Instead of ``entry``, ``pipeline: /path/to/diffusers/pipeline`` loads a local diffusers pipeline;
samples are then ``[prompt, seed]`` pairs and ``pipeline_call`` holds the other call arguments::

    pipeline: wan-1.3b                 # a folder written by pipe.save_pretrained
    pipeline_dtype: bfloat16           # float32 for the CPU reference kernel
    pipeline_call: {height: 480, width: 832, num_frames: 81, num_inference_steps: 50, guidance_scale: 5.0}
    samples: [["a red fox", 0], ["a city at night", 1]]

``output_type`` defaults to ``latent`` (no VAE decode: the latents are compared); ``prompt`` and
``generator`` come from the samples. The recipe's ``context`` (resolution, frames, steps, scheduler)
is taken from the call unless the job sets ``context``.

Example:
    >>> job = load_job("job.yaml")
    >>> recipe, report = run_job(job)
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .space import SearchSpace


@dataclass(frozen=True)
class JobSearch(SearchSpace):
    """The job's ``search:`` section: the :class:`SearchSpace` fields, and ``bisect`` (:func:`calibrate`'s)."""

    bisect: bool = True


@dataclass
class JobConfig:
    """Schema of a calibration job file; unknown keys are refused."""

    entry: Optional[str] = None
    entry_args: dict[str, Any] = field(default_factory=dict)
    pipeline: Optional[str] = None
    pipeline_dtype: str = "bfloat16"
    pipeline_call: dict[str, Any] = field(default_factory=dict)
    samples: Optional[list[Any]] = None
    held_out: Optional[list[Any]] = None
    budget: str = "psnr >= 30"
    trials: int = 20
    objective: str = "time"
    storage: Optional[str] = None
    study_name: Optional[str] = None
    output: str = "calibration-out"
    name: str = "calibrated"
    seed: Optional[int] = 0
    sampler: str = "tpe"
    timeout: Optional[float] = None
    context: dict[str, Any] = field(default_factory=dict)
    search: JobSearch = field(default_factory=JobSearch)
    base_dir: str = "."  # folder of the job file (set by load_job)


def load_job(path: str | os.PathLike, overrides: list[str] | None = None) -> JobConfig:
    """Reads and validates a job file; ``overrides`` are OmegaConf dotlist items (``trials=30``).

    The job goes through the recipes' schema engine (:func:`litepatch.recipes.structure.check_structure`:
    strict types, unknown keys named with the closest allowed one) once OmegaConf has merged the overrides
    and resolved any ``${...}``; OmegaConf then builds the :class:`JobConfig`, whose search section checks
    its own ranges (:class:`SearchSpace`).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from litepatch.recipes import RecipeValidationError
    from litepatch.recipes.structure import check_structure

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"job file {path} does not exist")
    try:
        loaded = OmegaConf.load(path)
        if not OmegaConf.is_dict(loaded):
            raise ValueError(f"job file {path}: a job is a YAML mapping (key: value lines)")
        loaded = OmegaConf.merge(loaded, OmegaConf.from_dotlist(list(overrides or [])))
        data = OmegaConf.to_container(loaded, resolve=True)
        check_structure(data, JobConfig, show=repr)
        job: JobConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JobConfig), data))
    except RecipeValidationError as err:
        raise ValueError(f"job file {path}: {err}") from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        where = f"key '{key}': " if key else ""
        raise ValueError(f"job file {path}: {where}{str(err).splitlines()[0]}") from None
    except ValueError as err:  # SearchSpace's own checks
        message = str(err)
        raise ValueError(message if message.startswith("job file") else f"job file {path}: search: {message}") from None
    job.base_dir = str(path.resolve().parent)
    if (job.entry is None) == (job.pipeline is None):
        raise ValueError(f"job file {path}: give exactly one of 'entry' (module:function) or 'pipeline' (a folder)")
    if job.entry is not None and job.entry.count(":") != 1:
        raise ValueError(f"job file {path}: entry must be 'module:function', got {job.entry!r}")
    return job


def _resolve(job: JobConfig, value: str) -> str:
    return value if os.path.isabs(value) else str(Path(job.base_dir) / value)


def output_dir(job: JobConfig) -> Path:
    return Path(_resolve(job, job.output))


def storage_url(job: JobConfig) -> str:
    """The job's storage: ``sqlite:///<output>/study.db`` unless the job names one."""
    if job.storage is None:
        return f"sqlite:///{output_dir(job) / 'study.db'}"
    if "://" in job.storage:
        return job.storage
    return _resolve(job, job.storage)


def _load_entry(job: JobConfig) -> dict:
    module_name, func_name = job.entry.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"cannot import the job entry module {module_name!r}: {err}") from err
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ValueError(f"job entry {job.entry!r}: {module_name} has no function {func_name!r}")
    result = func(**dict(job.entry_args))
    if isinstance(result, dict):
        setup = dict(result)
    elif isinstance(result, (tuple, list)) and len(result) in (3, 4):
        setup = dict(zip(("model", "run", "samples", "held_out"), result))
    else:
        raise ValueError(
            f"job entry {job.entry!r} must return (model, run, samples), (model, run, samples, held_out) or a dict "
            f"with those keys, got {type(result).__name__}"
        )
    missing = [k for k in ("model", "run") if k not in setup]
    if missing:
        raise ValueError(f"job entry {job.entry!r} returned no {', '.join(missing)}")
    return setup


def _check_pipeline_samples(samples: list, which: str) -> None:
    """Pipeline samples are ``[prompt, seed]`` pairs; checked before the pipeline loads and any trial runs."""
    for sample in samples:
        ok = isinstance(sample, (list, tuple)) and len(sample) == 2
        if not (ok and isinstance(sample[0], str) and isinstance(sample[1], int) and not isinstance(sample[1], bool)):
            raise ValueError(f"pipeline {which} must be [prompt, seed] pairs (a string and an int), got {sample!r}")


def _load_pipeline(job: JobConfig) -> dict:
    import torch
    from diffusers import DiffusionPipeline

    folder = _resolve(job, job.pipeline)
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"pipeline folder {folder} does not exist (a diffusers pipeline saved on local disk)")
    dtype = getattr(torch, job.pipeline_dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"pipeline_dtype {job.pipeline_dtype!r} is not a torch dtype (e.g. bfloat16, float16)")
    call = dict(job.pipeline_call)
    reserved = sorted({"prompt", "generator"} & set(call))
    if reserved:
        raise ValueError(f"pipeline_call must not set {', '.join(reserved)}: the [prompt, seed] samples give them")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)  # one bar per generation would drown the calibration's own

    def run(model, sample) -> torch.Tensor:
        _check_pipeline_samples([sample], "samples")
        prompt, seed = sample
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        kwargs = dict(call)
        kwargs.setdefault("output_type", "latent")
        out = model(prompt=prompt, generator=generator, **kwargs)
        for attr in ("frames", "images"):
            value = getattr(out, attr, None)
            if isinstance(value, np.ndarray):  # output_type="np"
                value = torch.from_numpy(value)
            if isinstance(value, torch.Tensor):
                return value.float()
        raise ValueError(
            f"the pipeline output has no tensor .frames or .images (got {type(out).__name__}); "
            "use pipeline_call.output_type latent (the default), pt or np"
        )

    return {"model": pipe, "run": run, "samples": None, "held_out": None, "context": _pipeline_context(pipe, call)}


def _pipeline_context(pipe, call: dict) -> dict:
    """The recipe's context from the call arguments (or the pipeline's defaults); a job's ``context`` wins."""
    import inspect

    params = inspect.signature(type(pipe).__call__).parameters

    def arg(name):
        value = call.get(name, params[name].default if name in params else None)
        return None if value is inspect.Parameter.empty else value

    height, width = arg("height"), arg("width")
    context = {
        "resolution": f"{width}x{height}" if height and width else None,
        "frames": arg("num_frames"),
        "steps": arg("num_inference_steps"),
        "scheduler": type(pipe.scheduler).__name__ if getattr(pipe, "scheduler", None) is not None else None,
    }
    return {k: v for k, v in context.items() if v is not None}


def space_of(job: JobConfig) -> SearchSpace:
    """The job's search space (its ``search:`` section without ``bisect``)."""
    return SearchSpace(**{f.name: getattr(job.search, f.name) for f in dataclasses.fields(SearchSpace)})


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def run_job(job: JobConfig, *, worker: bool = False, progress: bool = True,
            log: Callable[[str], None] = print) -> tuple[Any, Any]:
    """Runs (or continues) the job's study; unless ``worker``, checks held-out samples and writes the outputs.

    Returns ``(recipe, report)`` (``(None, None)`` for a worker). Outputs in ``job.output``:
    ``recipe.yaml``, ``report.md``, ``report.json``, ``quality_vs_time.png``, ``layers.png``, ``steps.png``.
    """
    from litepatch.recipes import save

    from .report import NO_PLOTS, plots_available
    from .search import calibrate

    if job.pipeline is not None:
        if not job.samples:
            raise ValueError("a pipeline job needs 'samples': [prompt, seed] pairs")
        _check_pipeline_samples(_plain(job.samples), "samples")
        _check_pipeline_samples(_plain(job.held_out or []), "held_out samples")
    setup = _load_entry(job) if job.entry is not None else _load_pipeline(job)
    samples = _plain(job.samples) if job.samples is not None else setup.get("samples")
    held_out = _plain(job.held_out) if job.held_out is not None else (setup.get("held_out") or [])
    if not samples:
        raise ValueError("the job has no calibration samples: set 'samples' in the job file or return them from entry")
    out_dir = output_dir(job)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = worker or plots_available()  # checked before the first trial: a missing optional never fails the job
    if not plots:
        log(f"warning: {NO_PLOTS}")
    recipe, report = calibrate(
        setup["run"], samples, job.budget, model=setup["model"], trials=job.trials, storage=storage_url(job),
        study_name=job.study_name or f"litepatch-{job.name}", held_out=held_out, objective=job.objective,
        space=space_of(job), sampler=job.sampler, bisect=job.search.bisect, seed=job.seed,
        name=job.name, context=job.context or setup.get("context"), cache_dir=out_dir / "dense",
        progress=progress, timeout=job.timeout, finish=not worker,
    )
    if worker:
        log(f"worker finished: study {job.study_name or f'litepatch-{job.name}'} in {storage_url(job)}")
        return None, None
    recipe_path = save(recipe, out_dir / "recipe.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the missing plots were announced above
        paths = report.save(out_dir, plots=plots)
    log(f"recipe: {recipe_path}")
    log(f"report: {', '.join(str(p) for p in paths)}")
    log(
        f"chosen trial #{report.best_trial} of {len(report.trials)}; "
        f"{'held-out' if held_out else 'calibration'} psnr {report.held_out_worst('psnr'):.2f} dB, "
        f"{report.held_out_skipped():.1%} tiles skipped, {report.speedup:.2f}x, "
        f"{report.generations['total']} calibration generations"
    )
    return recipe, report
