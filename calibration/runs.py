"""One generation of the user's model: timed runs, dense (cached per sample) or patched, and their metrics.

:func:`run_patched` is the one place a trial's recipe meets the model; callers reach it as
``runs.run_patched`` so that tests and tools can wrap it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import CalibrationError
from .metrics import get_metric


RunFn = Callable[[torch.nn.Module, Any], torch.Tensor]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_run(run: RunFn, model, sample) -> tuple[torch.Tensor, float]:
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


def sample_label(sample) -> str:
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
            out, elapsed = timed_run(self.run, self.model, sample)
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


def run_patched(handle, recipe, run: RunFn, model, sample) -> tuple[torch.Tensor, float, Any]:
    handle.configure(recipe=recipe)
    out, elapsed = timed_run(run, model, sample)
    return out, elapsed, handle.stats()


def measure(out: torch.Tensor, ref: torch.Tensor, names: Sequence[str]) -> dict[str, float]:
    ref = ref.to(out.device)
    return {name: get_metric(name)(out, ref) for name in names}


def worst_of(metric: str, values: list[float]) -> float:
    return min(values) if get_metric(metric).higher_is_better else max(values)
