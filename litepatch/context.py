"""Steps, CFG branches and generations, read from the top-level forward (DESIGN §3).

The patched root module gets a forward pre-hook that reads the timestep of each call (a GPU timestep through
:class:`PendingTimestep`, taken when the forward's first attention call needs the plans:
:meth:`litepatch.runtime.Runtime.start_forward`):

* the same timestep as the previous call: the same step, and a branch of it:
  - a name set by ``with transformer.cache_context("cond"):`` is the branch;
  - otherwise the call's inputs decide: a call whose arguments (other than the timestep) are the very
    tensors and equal other values of an earlier call of this step **repeats that call's branch** (a user
    timing one step, a benchmark loop: one state, sparse from the second call on); other inputs
    (sequential CFG passes the conditional and the unconditional text embeddings) are the next branch,
    0, 1, 2, ...;
  - at most :data:`MAX_BRANCHES` unnamed branches per step (branch indices, hence states per layer, stay below
    it for the whole generation): calls past that wrap around onto the existing ones (with one warning), so the
    states per layer are bounded by the branches a generation shows;
* a lower timestep: the next step;
* anything else (a higher timestep, the schedule starting again): a new generation, whose state is
  reset and whose first ``warmup_steps`` steps run dense again.

Batched CFG needs nothing here: :class:`~litepatch.kernels.SkipState` keeps one row per batch element.
Calls without any timestep count as one step each.

Example:
    >>> tracker = StepTracker()
    >>> [tracker.observe(t, inputs=key) for t, key in ((999.0, "c"), (999.0, "u"), (950.0, "c"), (950.0, "u"))]
    [True, False, False, False]
    >>> tracker.step, tracker.branch, tracker.generation
    (1, 1, 0)
    >>> tracker.observe(950.0, inputs="u"), tracker.branch        # the same inputs again: the same branch
    (False, 1)
"""

from __future__ import annotations

import inspect as pyinspect
import math
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .adapters.base import ENCODER_NAMES

TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas")
TEXT_NAMES = ENCODER_NAMES + ("text_embeds",)  # where a root's forward takes the text tokens
MAX_BRANCHES = 8

Branch = int | str


@dataclass
class StepTracker:
    """Where the running generation is: ``generation``, ``step`` (0-based) and ``branch``."""

    generation: int = -1
    step: int = 0
    branch: Branch = 0
    last_timestep: float | None = None
    step_inputs: list = field(default_factory=list)  # inputs key of each unnamed branch of this step
    branches_seen: int = 0  # unnamed branches this generation has shown
    pending_new: bool = True
    warned_wrap: bool = False

    def reset(self) -> None:
        """Forgets the schedule: the next call starts a new generation."""
        self.last_timestep = None
        self.pending_new = True

    def observe(self, timestep: float | None, branch_name: str | None = None, inputs: object = None) -> bool:
        """Records one top-level call; returns True when it starts a new generation.

        ``inputs``: the call's arguments other than the timestep (see :meth:`CallReader.read`); the very same
        tensor objects and equal other values again at one timestep are the same branch (tensors are held by
        weak reference: a freed tensor never matches a new one). ``None`` makes every call a new branch.
        """
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
            self.step, self.step_inputs, self.branches_seen = 0, [], 0
        elif not same_step:
            self.step += 1
            self.step_inputs = []
        self.branch = branch_name if branch_name is not None else self._unnamed_branch(inputs)
        if timestep is not None:
            self.last_timestep = timestep
        return new_generation

    def _unnamed_branch(self, inputs: object) -> int:
        if inputs is not None:
            for seen, branch in self.step_inputs:
                if _same_inputs(seen, inputs):
                    return branch
        index = len(self.step_inputs)
        if index >= MAX_BRANCHES:
            if not self.warned_wrap:
                self.warned_wrap = True
                warnings.warn(
                    f"litepatch: more than {MAX_BRANCHES} calls with new inputs at one timestep; they share the "
                    f"skip states of the first {MAX_BRANCHES} branches (name branches with "
                    "model.cache_context(name), or call handle.reset() between generations)",
                    UserWarning, stacklevel=4,
                )
            index %= MAX_BRANCHES
        self.step_inputs.append((_remembered(inputs), index))
        self.branches_seen = max(self.branches_seen, index + 1)
        return index


def timestep_source(value) -> torch.Tensor | float | None:
    """Where a timestep's value is, without reading device memory: a one-element tensor (its first element), a
    float, or None when ``value`` is no timestep."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 0 or not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            return None
        return value.reshape(-1)[:1]
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)) and value:
        return timestep_source(value[0])
    return None


class PendingTimestep:
    """A GPU timestep being copied to the host behind the queued work (no sync when it is made).

    Reading a GPU timestep at the start of a forward (``.item()``) waits for everything queued before it, the
    previous forward included, so the GPU idles while the host prepares the next forward's first kernels; on an
    H100 this was 2-5 ms per forward of the video demo (``benchmarks/demo_profile.py``: 30 syncs per generation,
    the GPU busy 76 % of the wall time). The copy goes into pinned memory on the current stream with an event
    after it; :meth:`value` waits for that event only, when the first attention call of the forward needs the
    plan, by which time the host has queued the forward's first kernels.

    One per :class:`~litepatch.runtime.Runtime`, restarted every forward: its pinned buffer and event are made
    once (a pinned allocation and a new event each forward cost host time on every step). The buffer is free to
    reuse because a forward reads its value (:meth:`value`) before the next forward starts a copy.
    """

    __slots__ = ("_host", "_event", "_device")

    def __init__(self):
        self._host: torch.Tensor | None = None
        self._event = None
        self._device: torch.device | None = None

    def start(self, source: torch.Tensor) -> PendingTimestep:
        """Queues the copy of ``source`` (a one-element GPU tensor) behind the work already queued."""
        if self._host is None or self._host.dtype != source.dtype:
            self._host = torch.empty(1, dtype=source.dtype, pin_memory=True)
        if self._device != source.device:  # an event belongs to the device it first records on
            self._event, self._device = torch.cuda.Event(), source.device
        # detached, so that a timestep that requires grad records nothing (a no_grad block cost 2 us more per forward)
        self._host.copy_(source.detach(), non_blocking=True)
        self._event.record(torch.cuda.current_stream(source.device))  # the stream the copy was queued on
        return self

    def value(self) -> float:
        self._event.synchronize()
        return float(self._host[0])


@dataclass
class CallReader:
    """Reads the timestep and the text length from a root module's forward arguments."""

    signature: pyinspect.Signature | None
    # how calls of one form (number of positional arguments, keyword names) bind, made once per form: binding
    # through the signature took about 40 us of host time on every forward
    _layouts: dict = field(default_factory=dict, repr=False)

    @classmethod
    def for_forward(cls, forward: Callable) -> CallReader:
        try:
            return cls(pyinspect.signature(forward))
        except (TypeError, ValueError):
            return cls(None)

    def _arguments(self, args: tuple, kwargs: dict) -> dict:
        if self.signature is None:
            return dict(kwargs)
        form = (len(args), tuple(kwargs))
        layout = self._layouts.get(form)
        if layout is None:
            if len(self._layouts) >= 64:
                self._layouts.clear()
            layout = self._layouts[form] = self._layout(len(args), tuple(kwargs))
        if layout is None:  # the signature does not bind this form
            return dict(kwargs)
        return {name: args[source] if type(source) is int else kwargs[source] if type(source) is str
                else tuple(args[i] for i in source) for name, source in layout}

    def _layout(self, positional: int, names: tuple[str, ...]) -> tuple | None:
        """``((name, source), ...)`` in bound order, ``source`` a positional index, a keyword name or a tuple of
        indices (``*args``); keywords gathered by ``**kwargs`` are listed by their own names. ``None`` when the
        signature does not bind calls of this form."""
        try:
            bound = self.signature.bind_partial(*range(positional), **{name: name for name in names})
        except TypeError:
            return None
        layout = []
        for name, source in bound.arguments.items():
            kind = self.signature.parameters[name].kind
            if kind is pyinspect.Parameter.VAR_KEYWORD:
                layout += [(keyword, keyword) for keyword in source]
            else:
                layout.append((name, source))
        return tuple(layout)

    def read_source(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor | float | None, int | None, tuple]:
        """(timestep, number of text tokens, inputs key) of one call; None where the call has none. The timestep is
        as :func:`timestep_source` gives it: a tensor is not read (no device sync here).

        The inputs are the call's arguments other than the timestep: tensors are compared by identity (no
        data is read, so no device sync), other values (flags, lists of skipped layers) by value.
        """
        arguments = self._arguments(args, kwargs)
        timestep, timestep_value = None, None
        for name in TIMESTEP_NAMES:
            if arguments.get(name) is not None:
                timestep = timestep_source(arguments[name])
                if timestep is not None:
                    timestep_value = arguments[name]
                    break
        if timestep is None:
            # Positional heuristic: the first 0-d/1-d floating tensor or number after the latents.
            for value in list(arguments.values())[1:] if arguments else args[1:]:
                if isinstance(value, torch.Tensor) and value.dim() <= 1 and value.numel() >= 1:
                    timestep, timestep_value = timestep_source(value), value
                    break
        if arguments:
            inputs = tuple([(k, v) for k, v in arguments.items() if v is not timestep_value])
        else:
            inputs = tuple([v for v in args if v is not timestep_value])
        text_tokens = None
        for name in TEXT_NAMES:
            value = arguments.get(name)
            if isinstance(value, torch.Tensor) and value.dim() >= 2:
                text_tokens = int(value.shape[1])
                break
        return timestep, text_tokens, inputs


class _Same:
    """A tensor held by weak reference: equal only to the very same tensor (a freed one never matches)."""

    __slots__ = ("ref",)

    def __init__(self, tensor: torch.Tensor):
        self.ref = weakref.ref(tensor)

    def matches(self, value) -> bool:
        return self.ref() is value


def _remembered(inputs):
    """What :meth:`StepTracker.observe` keeps of a call's inputs: tensors by identity, other values as they are.
    (List comprehensions, recursing only into what holds more: this runs on every forward.)"""
    if isinstance(inputs, torch.Tensor):
        return _Same(inputs)
    if isinstance(inputs, (list, tuple)):
        return tuple([_remembered(v) if isinstance(v, _HOLDERS) else v for v in inputs])
    if isinstance(inputs, dict):
        return tuple([(k, _remembered(v) if isinstance(v, _HOLDERS) else v) for k, v in inputs.items()])
    return inputs


_HOLDERS = (torch.Tensor, list, tuple, dict)  # what _remembered changes; other values are kept as they are


def _same_inputs(seen, inputs) -> bool:
    if isinstance(seen, _Same):
        return seen.matches(inputs)
    if isinstance(inputs, (list, tuple, dict)):
        items = list(inputs.items()) if isinstance(inputs, dict) else list(inputs)
        return (isinstance(seen, tuple) and len(seen) == len(items)
                and all(_same_inputs(a, b) for a, b in zip(seen, items)))
    try:
        return bool(seen == inputs)
    except Exception:  # values whose == is not a plain bool
        return seen is inputs
