"""Per-layer attachment: the wrapped forward and the SDPA interception (DESIGN §3).

For each self or joint attention module the patcher sets an *instance* attribute ``forward``
(``functools.update_wrapper`` keeps the signature); the class is never touched, and ``remove()``
deletes the attribute, so the module is bit-identical afterwards. While the wrapped forward runs, a
:class:`torch.overrides.TorchFunctionMode` sees every ``torch.nn.functional.scaled_dot_product_attention``
call made beneath it and routes it to :func:`litepatch.kernels.lite_attention`: SDPA's ``[B, H, S, D]``
inputs are passed as transposed *views* ``[B, S, H, D]`` (no copy) and the output is transposed back.

Calls the kernel cannot take run the original SDPA and warn once per layer and reason: attention
masks, dropout, ``is_causal``, grouped K/V heads, unsupported dtypes or head dims, query and key
lengths that differ, and autograd (the kernel has no backward). Never a wrong result.

State: one :class:`~litepatch.kernels.SkipState` per layer and CFG branch (batch rows inside it).

Under diffusers' own context parallelism (``model.enable_parallelism``) each rank's SDPA call holds its Ulysses heads
over the full sequence, so each rank keeps the states of its heads; ring context parallelism runs dense and warns
(:mod:`litepatch.diffusers_cp`).
"""

from __future__ import annotations

import functools
import inspect as pyinspect
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .context import CallReader, StepTracker
from .diffusers_cp import dense_reason, ulysses_degree
from .discovery import AttentionLayerInfo, text_layout_of
from .kernels import SkipState, lite_attention, registry
from .kernels.interface import SUPPORTED_DTYPES
from .stats import CallLog

_MISSING = object()
_SDPA = F.scaled_dot_product_attention
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


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

    def reset_states(self) -> None:
        for layer in self.layers.values():
            layer.states.clear()
            layer.plan = None

    def flush(self) -> None:
        for layer in self.layers.values():
            layer.flush()


def _dense_tiles(q: torch.Tensor, k: torch.Tensor, backend: str = "auto") -> int:
    """Tiles of dense attention for SDPA-layout ``q [B, H, Sq, D]`` and ``k``, in the tiles of the backend that
    would take the call (so dense and sparse records of one layer count the same tiles)."""
    batch, heads, seq_q = q.shape[0], q.shape[1], q.shape[-2]
    seq_k = k.shape[-2]
    try:
        tiles = registry.tiles(q.transpose(1, 2), seq_k, backend=backend)
    except registry.BackendUnavailable:
        tiles = registry.get("reference").tiles(q.shape[-1])
    q_tiles = -(-seq_q // tiles.block_m)
    k_tiles = -(-seq_k // tiles.block_n)
    return batch * heads * q_tiles * k_tiles


def _parse_sdpa(args: tuple, kwargs: dict) -> dict:
    call = dict(_SDPA_DEFAULTS)
    call.update(zip(_SDPA_PARAMS, args))
    call.update(kwargs)
    return call


def _param_index(signature: pyinspect.Signature | None, name: str) -> int | None:
    if signature is None:
        return None
    for i, param in enumerate(signature.parameters.values()):
        if param.name == name and param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            return i
    return None


def _text_ranges(layout: str, text: int, seq: int) -> list[tuple[int, int]]:
    if text <= 0:
        return []
    if text >= seq:
        return [(0, seq)]
    if layout == "first":
        return [(0, text)]
    if layout == "last":
        return [(seq - text, seq)]
    return [(0, text), (seq - text, seq)]


class _SDPAInterceptor(TorchFunctionMode):
    """Routes SDPA calls made inside one layer's forward to that layer's :meth:`LayerPatch.attend`."""

    def __init__(self, layer: LayerPatch, hidden_tokens: int | None, encoder_tokens: int | None, shards: int = 1):
        super().__init__()
        self.layer = layer
        self.hidden_tokens = hidden_tokens
        self.encoder_tokens = encoder_tokens
        self.shards = shards

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            return self.layer.attend(args, kwargs, self.hidden_tokens, self.encoder_tokens, self.shards)
        return func(*args, **kwargs)


class LayerPatch:
    """The attachment of one attention module (``module._litepatch``)."""

    def __init__(self, info: AttentionLayerInfo, module: torch.nn.Module, runtime: Runtime):
        self.info = info
        self.name = info.name
        self.runtime = runtime
        self.states: dict = {}
        self.warned: set[str] = set()
        self.plan: Plan | None = None
        self.last_call: tuple | None = None
        self.layout = info.text_layout if info.text_layout != "unknown" else text_layout_of(module)
        self.previous_forward = module.__dict__.get("forward", _MISSING)
        self.original = module.forward
        try:
            signature = pyinspect.signature(self.original)
        except (TypeError, ValueError):
            signature = None
        self.encoder_index = _param_index(signature, "encoder_hidden_states")
        self.hidden_index = 0 if signature is not None and signature.parameters else None

    # ------------------------------------------------------------------------------ attachment
    def install(self, module: torch.nn.Module) -> None:
        original = self.original

        def forward(*args, **kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            encoder = kwargs.get("encoder_hidden_states")
            if encoder is None and self.encoder_index is not None and len(args) > self.encoder_index:
                encoder = args[self.encoder_index]
            hidden_tokens = hidden.shape[1] if isinstance(hidden, torch.Tensor) and hidden.dim() >= 3 else None
            encoder_tokens = encoder.shape[1] if isinstance(encoder, torch.Tensor) and encoder.dim() >= 3 else None
            # under diffusers' Ulysses the SDPA call sees the P sequence shards end to end (these token counts are
            # one shard's)
            with _SDPAInterceptor(self, hidden_tokens, encoder_tokens, ulysses_degree(module)):
                return original(*args, **kwargs)

        functools.update_wrapper(forward, original)
        module.forward = forward
        module._litepatch = self

    def uninstall(self, module: torch.nn.Module) -> None:
        if self.previous_forward is _MISSING:
            module.__dict__.pop("forward", None)
        else:
            module.forward = self.previous_forward
        module.__dict__.pop("_litepatch", None)

    # ---------------------------------------------------------------------------------- calls
    def _warn(self, reason: str) -> None:
        if reason not in self.warned:
            self.warned.add(reason)
            warnings.warn(
                f"litepatch: {self.name} runs dense attention ({reason}); its output is unchanged",
                UserWarning,
                stacklevel=4,
            )

    def _unsupported(self, call: dict) -> str | None:
        q, k, v = call["query"], call["key"], call["value"]
        if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
            return "query/key/value are not tensors"
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            return f"inputs are {q.dim()}-d, not [batch, heads, seq, head_dim]"
        if call["attn_mask"] is not None:
            return "an attention mask is given"
        if call["is_causal"]:
            return "is_causal=True"
        if call["dropout_p"] and float(call["dropout_p"]) > 0.0:
            return f"dropout_p={call['dropout_p']}"
        if call["enable_gqa"] or k.shape[1] != q.shape[1] or v.shape[1] != q.shape[1]:
            return f"grouped K/V heads ({q.shape[1]} query heads, {k.shape[1]} key heads)"
        if q.shape[-2] != k.shape[-2]:
            return f"query and key lengths differ ({q.shape[-2]} vs {k.shape[-2]}): cross-attention stays dense"
        if k.shape != v.shape or q.shape[-1] != k.shape[-1]:
            return f"key/value shapes {tuple(k.shape)}/{tuple(v.shape)} do not match query {tuple(q.shape)}"
        if q.dtype not in SUPPORTED_DTYPES or not (q.dtype == k.dtype == v.dtype):
            return f"dtype {q.dtype}/{k.dtype}/{v.dtype} (supported: float16, bfloat16, float32)"
        if q.device.type not in ("cpu", "cuda") or not (q.device == k.device == v.device):
            return f"device {q.device}"
        refused = registry.refusal(q.transpose(1, 2), k.shape[-2], backend=self.runtime.backend)
        if refused:
            return refused
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return "autograd is recording (the LiteAttention kernel has no backward)"
        return None

    def make_plan(self) -> Plan:
        """Decides the coming call from the tracker (eager code, before the top-level forward runs)."""
        tracker, recipe = self.runtime.tracker, self.runtime.recipe
        step, branch = max(tracker.step, 0), tracker.branch
        if step < recipe.warmup_steps:
            return Plan(step, branch, tracker.generation, None, "warm-up", None)
        threshold = recipe.threshold_for(self.name, step)
        if threshold is None:
            return Plan(step, branch, tracker.generation, None, "dense layer", None)
        state = self.states.get(branch)
        if state is None:
            state = self.states[branch] = SkipState()
        if state.initialized and state.keep.is_inference() and not torch.is_inference_mode_enabled():
            # Made under torch.inference_mode, now used outside it: in-place updates need normal tensors.
            state.keep, state.anchor, state.kept = state.keep.clone(), state.anchor.clone(), state.kept.clone()
        # ``lite_attention`` increments ``state.calls``; torch.compile would specialise on its value and
        # recompile every call. Only "first call or not" and (for the alternating order) the parity matter.
        if state.calls > 1:
            state.calls = 1 if recipe.order == "anchor" else 2 + state.calls % 2
        return Plan(step, branch, tracker.generation, float(threshold), "", state)

    def flush(self) -> None:
        """Turns the last call into a stats record (its kept count stays a device tensor)."""
        last, self.last_call = self.last_call, None
        if last is None:
            return
        plan, reason, total = last
        dense = plan.state is None or bool(reason)
        if dense:
            kept = total
        else:
            kept, total = plan.state.kept.clone(), plan.state.total_tiles()
        self.runtime.log.add(
            layer=self.name, step=plan.step, branch=plan.branch, generation=plan.generation, dense=dense,
            reason=reason or plan.dense_reason, kept=kept, total=total,
        )

    def attend(
        self, args: tuple, kwargs: dict, hidden_tokens: int | None, encoder_tokens: int | None, shards: int = 1
    ):
        """Handles one intercepted SDPA call: LiteAttention, or the original SDPA when it cannot.

        ``shards`` > 1 (diffusers' Ulysses): the sequence is that many rank shards laid end to end, each with its own
        text tokens, and ``hidden_tokens``/``encoder_tokens`` count one shard's; the must-compute ranges repeat per
        shard.

        Reads only ``self.plan`` (decided in eager code by the root pre-hook), so under torch.compile
        the step counter never becomes a guard; the call is recorded by a store to ``self.last_call``.
        """
        plan = self.plan
        if plan is None or self.last_call is not None:  # called outside a patched root's forward
            self.flush()
            plan = self.make_plan()
        call = _parse_sdpa(args, kwargs)
        reason = self._unsupported(call)
        q, k, v = call["query"], call["key"], call["value"]
        must = []
        if reason is None:
            seq = q.shape[-2]
            local = seq // shards if seq % shards == 0 else 0
            if encoder_tokens and hidden_tokens and local == hidden_tokens + encoder_tokens:
                must = _sharded(_text_ranges(self.layout, encoder_tokens, local), local, shards)
            elif self.info.kind == "joint":
                # the root's text length; with shards it is this length or 1/shards of it per shard (depending on
                # whether the parallel plan splits the text): protecting the longer one is right in both cases
                text = self.runtime.text_tokens if self.info.single_stream else None
                if text and text < local:
                    must = _sharded(_text_ranges(self.layout, text, local), local, shards)
                else:
                    reason = "joint attention whose text length is unknown"
        if reason is not None:
            self._warn(reason)
            self.last_call = (plan, reason, _dense_tiles(q, k, self.runtime.backend) if _is_4d(q, k) else 0)
            return _SDPA(*args, **kwargs)
        if plan.state is None:
            self.last_call = (plan, plan.dense_reason, _dense_tiles(q, k, self.runtime.backend))
            return _SDPA(*args, **kwargs)
        out = lite_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            plan.state,
            threshold=plan.threshold,
            softmax_scale=call["scale"],
            order=self.runtime.recipe.order,
            must_compute_queries=must or None,
            must_compute_keys=must or None,
            backend=self.runtime.backend,
        )
        self.last_call = (plan, "", 0)
        return out.transpose(1, 2)


def _sharded(ranges: list[tuple[int, int]], local: int, shards: int) -> list[tuple[int, int]]:
    """``ranges`` of one shard of ``local`` tokens, repeated for ``shards`` shards laid end to end."""
    return [(start + r * local, end + r * local) for r in range(shards) for start, end in ranges]


def _is_4d(q, k) -> bool:
    return isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() == 4 and k.dim() == 4


@dataclass(frozen=True)
class Plan:
    """What a layer does in the coming call: dense (``state is None``, with a reason) or sparse."""

    step: int
    branch: object
    generation: int
    threshold: float | None
    dense_reason: str
    state: SkipState | None


class RootPatch:
    """The attachment of a patched root module: step tracking pre-hook and ``cache_context`` reader."""

    def __init__(self, module: torch.nn.Module, runtime: Runtime, handle: object):
        self.runtime = runtime
        self.handle = handle
        self.reader = CallReader.for_forward(module.forward)
        self.hook = None
        self.previous_cache_context = module.__dict__.get("cache_context", _MISSING)
        self.checked_parallel_config = None

    def check_parallelism(self, module: torch.nn.Module) -> None:
        """Warns once per diffusers parallel config under which every patched layer stays dense (ring CP, ...)."""
        config = getattr(module, "_parallel_config", None)
        if config is None or config is self.checked_parallel_config:
            return
        self.checked_parallel_config = config
        reason = dense_reason(module)
        if reason is not None:
            warnings.warn(f"litepatch: {reason}", UserWarning, stacklevel=3)

    def _pre_hook(self, module, args, kwargs):
        self.check_parallelism(module)
        timestep, text_tokens = self.reader.read(args, kwargs)
        runtime = self.runtime
        runtime.flush()
        if runtime.tracker.observe(timestep, runtime.context_name):
            runtime.reset_states()
        runtime.text_tokens = text_tokens
        for layer in runtime.layers.values():
            layer.plan = layer.make_plan()
        return None

    def install(self, module: torch.nn.Module) -> None:
        self.check_parallelism(module)
        self.hook = module.register_forward_pre_hook(torch._dynamo.disable(self._pre_hook), with_kwargs=True)
        original = getattr(module, "cache_context", None)
        if callable(original):
            runtime = self.runtime

            @contextmanager
            def cache_context(name, *args, **kwargs):
                runtime.context_name = name
                try:
                    with original(name, *args, **kwargs):
                        yield
                finally:
                    runtime.context_name = None

            functools.update_wrapper(cache_context, original)
            module.cache_context = cache_context
        module._litepatch = self

    def uninstall(self, module: torch.nn.Module) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        if self.previous_cache_context is _MISSING:
            module.__dict__.pop("cache_context", None)
        else:
            module.cache_context = self.previous_cache_context
        module.__dict__.pop("_litepatch", None)
