"""What every patched layer of one handle shares (:class:`Runtime`) and what a layer does in its coming call
(:class:`CallPlan`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from litepatch.kernels import SkipState

from .context import StepTracker
from .stats import CallLog

if TYPE_CHECKING:
    from .layer_patch import LayerPatch


@dataclass
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

    def reset_states(self) -> None:
        for layer in self.layers.values():
            layer.states.clear()
            layer.plan = None

    def flush(self) -> None:
        """Turns every layer's last call into a record; the sparse calls' kept counts are copied together (one
        stack instead of a copy per layer: each is a kernel launch on a GPU)."""
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
