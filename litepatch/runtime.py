"""What every patched layer of one handle shares (:class:`Runtime`) and what a layer does in its coming call
(:class:`CallPlan`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from litepatch.kernels import SkipState, commits

from .context import PendingTimestep, StepTracker
from .stats import CallLog

if TYPE_CHECKING:
    from .layer_patch import LayerPatch


@dataclass(eq=False)  # compared and hashed by identity (kept in a WeakSet while a timestep is pending)
class Runtime:
    """What every layer of one :class:`~litepatch.api.LiteHandle` shares: settings, tracker, log."""

    recipe: object  # litepatch.recipes.schema.Recipe (the effective one)
    backend: str = "auto"
    tracker: StepTracker = field(default_factory=StepTracker)
    log: CallLog = field(default_factory=CallLog)
    layers: dict[str, LayerPatch] = field(default_factory=dict)
    context_name: str | None = None  # set by ``with model.cache_context(name):``
    text_tokens: int | None = None  # text length of the current top-level call
    stream_text_tokens: int | None = None  # text tokens a double-stream joint layer of this call saw
    handle: object = None  # the LiteHandle
    pending: tuple | None = None  # (PendingTimestep, context name, inputs): a forward whose plans wait for it
    # torch.compile traced a ring attention call of this handle (it reads the plans): plans are made before forwards;
    # other traced calls plan when they run (litepatch.compiled_call)
    traced: bool = False
    timestep_copy: PendingTimestep | None = None  # reused by every forward (its pinned buffer and event)

    def start_forward(self, timestep: torch.Tensor | float | None, context_name, inputs) -> None:
        """Observes one top-level call (:class:`~litepatch.context.StepTracker`) and plans every layer's coming call.

        A timestep on a GPU is not read here, which would wait for the previous forward (:class:`PendingTimestep`):
        the plans are made by :meth:`settle` when the forward's first attention call needs them, compiled forwards
        included (:mod:`litepatch.compiled_call`). Not once torch.compile has traced a ring attention call (it reads
        the plans, it cannot wait for them).
        """
        self.settle()
        if isinstance(timestep, torch.Tensor):
            if _on_gpu(timestep) and not self.traced and _watch_compiles():
                if self.timestep_copy is None:
                    self.timestep_copy = PendingTimestep()
                self.pending = (self.timestep_copy.start(timestep), context_name, inputs)
                _PENDING.add(self)
                return
            timestep = float(timestep.item())
        self._plan_layers(timestep, context_name, inputs)

    def settle(self) -> None:
        """Makes the plans of a forward whose GPU timestep was not read yet (nothing to do otherwise)."""
        if self.pending is not None:
            (timestep, context_name, inputs), self.pending = self.pending, None
            self._plan_layers(timestep.value(), context_name, inputs)

    def _plan_layers(self, timestep: float | None, context_name, inputs) -> None:
        if self.tracker.observe(timestep, context_name, inputs):
            self.reset_states()
        for layer in self.layers.values():
            layer.plan = layer.make_plan()
            layer.call_index = 0

    def reset_states(self) -> None:
        for layer in self.layers.values():
            layer.states.clear()
            layer.forget_calls()
            layer.plan = None

    def flush(self) -> None:
        """Turns every layer's last call into a record; the sparse calls' kept counts are copied together (one
        stack instead of a copy per layer: each is a kernel launch on a GPU), after the commits that write them (a
        forward's deferred ones, :mod:`litepatch.kernels.commits`)."""
        commits.flush()
        live: list = []
        for layer in self.layers.values():
            layer.flush(live)
        self.log.add(live)


@dataclass(frozen=True)
class CallPlan:
    """What a layer does in the coming call: dense (``state is None``, with a reason) or sparse.

    Not a named tuple, although one is made faster (0.45 vs 1.3 us per layer per forward): torch.compile guards on
    every item of a tuple the traced attention stores, so the step number became a guard and a compiled model
    recompiled at every step (a hard failure after 8 under ``fullgraph=True``)."""

    step: int
    branch: object
    generation: int
    threshold: float | None
    dense_reason: str
    state: SkipState | None


# Runtimes with a pending timestep: settled when torch.compile starts compiling anything (its trace of an attention
# call must see the plans, and cannot wait for a GPU value).
_PENDING: weakref.WeakSet = weakref.WeakSet()
_HANDLER: list = []  # torch.compile's callback handler, once found (None: this torch has none)


GRAPH_CAPTURE_ERROR = (
    "litepatch: a patched forward is being captured into a CUDA graph (torch.compile(mode='reduce-overhead') or "
    "torch.cuda.graph): a replay would repeat the captured step's plan (warm-up or sparse, its threshold, its skip "
    "state) at every step and record nothing. Compile with mode='default' or 'max-autotune-no-cudagraphs', or "
    "call handle.remove() before capturing")


def refuse_graph_capture(tensor: torch.Tensor) -> None:
    """Raises :data:`GRAPH_CAPTURE_ERROR` while ``tensor``'s CUDA stream is capturing a graph (a patched call decides
    its plan in Python, which a graph replay skips)."""
    if tensor.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(GRAPH_CAPTURE_ERROR)


def _on_gpu(timestep: torch.Tensor) -> bool:
    return timestep.is_cuda


def _settle_pending(*_args) -> None:
    for runtime in list(_PENDING):
        runtime.settle()
    _PENDING.clear()


def _watch_compiles() -> bool:
    """Keeps :func:`_settle_pending` among torch.compile's compile-start callbacks (``torch._dynamo.reset()`` clears
    them); False where this torch has none (then GPU timesteps are read at the start of each forward, as before)."""
    if not _HANDLER:
        try:
            from torch._dynamo.callback import callback_handler

            callback_handler.start_callbacks  # noqa: B018  (the list checked below)
            _HANDLER.append(callback_handler)
        except (ImportError, AttributeError):
            _HANDLER.append(None)
    handler = _HANDLER[0]
    if handler is None:
        return False
    if _settle_pending not in handler.start_callbacks:
        handler.register_start_callback(_settle_pending)
    return True
