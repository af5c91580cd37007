"""Steps, CFG branches and generations, read from the top-level forward (DESIGN §3).

The patched root module gets a forward pre-hook that reads the timestep of each call:

* the same timestep as the previous call: another branch of the same step (sequential CFG gives
  branch 0, 1, ...; a name set by ``with transformer.cache_context("cond"):`` replaces the index);
* a lower timestep: the next step;
* anything else (a higher timestep, the schedule starting again): a new generation, whose state is
  reset and whose first ``warmup_steps`` steps run dense again.

Batched CFG needs nothing here: :class:`~litepatch.kernels.SkipState` keeps one row per batch element.
Calls without any timestep count as one step each.

Example:
    >>> tracker = StepTracker()
    >>> [tracker.observe(t) for t in (999.0, 999.0, 950.0, 950.0, 999.0)]
    [True, False, False, False, True]
    >>> tracker.step, tracker.branch, tracker.generation
    (0, 0, 1)
"""

from __future__ import annotations

import inspect as pyinspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas")
TEXT_NAMES = ("encoder_hidden_states", "context", "text_embeds", "prompt_embeds")

Branch = int | str


@dataclass
class StepTracker:
    """Where the running generation is: ``generation``, ``step`` (0-based) and ``branch``."""

    generation: int = -1
    step: int = 0
    branch: Branch = 0
    calls_in_step: int = 0
    last_timestep: float | None = None
    branches_in_step: list = field(default_factory=list)
    pending_new: bool = True

    def reset(self) -> None:
        """Forgets the schedule: the next call starts a new generation."""
        self.last_timestep = None
        self.pending_new = True

    def observe(self, timestep: float | None, branch_name: str | None = None) -> bool:
        """Records one top-level call; returns True when it starts a new generation."""
        new_generation = self.pending_new
        self.pending_new = False
        if timestep is None or math.isnan(timestep):
            same_step = False
        elif self.last_timestep is None:
            same_step, new_generation = False, True
        elif timestep == self.last_timestep:
            same_step = True
        elif timestep < self.last_timestep:
            same_step = False
        else:
            same_step, new_generation = False, True
        if new_generation:
            self.generation += 1
            self.step, self.calls_in_step, self.branches_in_step = 0, 0, []
        elif not same_step:
            self.step += 1
            self.calls_in_step, self.branches_in_step = 0, []
        self.branch = branch_name if branch_name is not None else self.calls_in_step
        self.calls_in_step += 1
        self.branches_in_step.append(self.branch)
        if timestep is not None:
            self.last_timestep = timestep
        return new_generation


def _scalar(value) -> float | None:
    """First element of a timestep (tensor, number or sequence) as a float, else None."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 0 or not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            return None
        return float(value.reshape(-1)[0].item())
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)) and value:
        return _scalar(value[0])
    return None


@dataclass
class CallReader:
    """Reads the timestep and the text length from a root module's forward arguments."""

    signature: pyinspect.Signature | None

    @classmethod
    def for_forward(cls, forward: Callable) -> CallReader:
        try:
            return cls(pyinspect.signature(forward))
        except (TypeError, ValueError):
            return cls(None)

    def _arguments(self, args: tuple, kwargs: dict) -> dict:
        if self.signature is None:
            return dict(kwargs)
        try:
            bound = self.signature.bind_partial(*args, **kwargs)
        except TypeError:
            return dict(kwargs)
        arguments = dict(bound.arguments)
        for name, param in self.signature.parameters.items():
            if param.kind is param.VAR_KEYWORD and isinstance(arguments.get(name), dict):
                arguments.update(arguments.pop(name))
        return arguments

    def read(self, args: tuple, kwargs: dict) -> tuple[float | None, int | None]:
        """(timestep, number of text tokens) of one call; None where the call has none."""
        arguments = self._arguments(args, kwargs)
        timestep = None
        for name in TIMESTEP_NAMES:
            if arguments.get(name) is not None:
                timestep = _scalar(arguments[name])
                if timestep is not None:
                    break
        if timestep is None:
            # Positional heuristic: the first 0-d/1-d floating tensor or number after the latents.
            for value in list(arguments.values())[1:] if arguments else args[1:]:
                if isinstance(value, torch.Tensor) and value.dim() <= 1 and value.numel() >= 1:
                    timestep = _scalar(value)
                    break
        text_tokens = None
        for name in TEXT_NAMES:
            value = arguments.get(name)
            if isinstance(value, torch.Tensor) and value.dim() >= 2:
                text_tokens = int(value.shape[1])
                break
        return timestep, text_tokens
