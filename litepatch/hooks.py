"""Per-layer and per-root attachments: plans, skip states, fallbacks, statistics (DESIGN §3).

Each self or joint attention layer gets a :class:`LayerPatch`; its adapter (:mod:`litepatch.adapters`)
intercepts the layer's attention call site and hands each call over as an
:class:`~litepatch.adapters.AttentionCall`. :meth:`LayerPatch.attend` runs LiteAttention or returns
``None``, and the adapter runs the model's own attention (warm-up, a dense layer, a call the kernel cannot
take). The class of a module is never touched: everything the patch sets is an instance attribute,
recorded when installed, and ``remove()`` puts back exactly what was there.

Calls no backend can take run the original attention and warn once per layer and reason: masks other than
boolean key-padding masks, dropout, ``is_causal``, grouped K/V heads, cross-attention calls, what
:func:`litepatch.kernels.registry.refusal` refuses (dtype, head dim, device, ...), and autograd (the kernel
has no backward). Never a wrong result. Which tiles a call counts in is asked of the registry too
(:func:`litepatch.kernels.registry.tiles`): the tiles of the backend that runs, or would run, the call.

A patched module cannot be pickled (``remove()`` first) and ``copy.deepcopy`` of it gives an unpatched copy
with a warning: the copy never shares the original's states or tracker.

State: one :class:`~litepatch.kernels.SkipState` per layer and CFG branch (batch rows inside it).
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .adapters.base import AttentionCall, AttentionLayerInfo, call_kind
from .context import CallReader, StepTracker
from .diffusers_cp import dense_reason
from .kernels import SkipState, dense_attention, dense_kernel_name, lite_attention, registry
from .parallel import ChunkKey
from .stats import CallLog

_MISSING = object()
COPY_WARNING = ("litepatch: copy.deepcopy of a patched module gives an unpatched copy (the original stays "
                "patched, the copy shares none of its state); call litepatch.apply on the copy to patch it")
PICKLE_ERROR = ("{name} is patched by litepatch and cannot be pickled (its forward is a closure over live skip "
                "state); call handle.remove() (or litepatch.remove(model)) first, or save model.state_dict()")


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
        for layer in self.layers.values():
            layer.flush()


@dataclass(frozen=True)
class Plan:
    """What a layer does in the coming call: dense (``state is None``, with a reason) or sparse."""

    step: int
    branch: object
    generation: int
    threshold: float | None
    dense_reason: str
    state: SkipState | None


class Attachment:
    """Instance attributes set on one module, recorded so they can be taken off (remove, deepcopy) exactly."""

    def __init__(self, module: torch.nn.Module):
        self._before = dict(module.__dict__)
        self.changed: dict[str, tuple[object, object]] = {}
        self.name = type(module).__name__

    def record(self, module: torch.nn.Module) -> None:
        """Notes every instance attribute that differs from before (call after installing)."""
        name = self.name

        def refuse_pickle(protocol=2):
            raise TypeError(PICKLE_ERROR.format(name=name))

        module.__dict__["__reduce_ex__"] = refuse_pickle
        module.__dict__["__deepcopy__"] = lambda memo: unpatched_deepcopy(module, memo)
        for key, value in module.__dict__.items():
            if self._before.get(key, _MISSING) is not value:
                self.changed[key] = (self._before.get(key, _MISSING), value)
        del self._before

    def take_off(self, module: torch.nn.Module) -> None:
        for key, (before, now) in self.changed.items():
            if module.__dict__.get(key, _MISSING) is now:
                _put(module, key, before)

    def put_back(self, module: torch.nn.Module) -> None:
        for key, (_, now) in self.changed.items():
            _put(module, key, now)


def _put(module: torch.nn.Module, key: str, value) -> None:
    if value is _MISSING:
        module.__dict__.pop(key, None)
    else:
        module.__dict__[key] = value


def unpatched_deepcopy(module: torch.nn.Module, memo: dict) -> torch.nn.Module:
    """``copy.deepcopy`` of a patched module (or one holding patched layers), without litepatch, with a warning."""
    warnings.warn(COPY_WARNING, UserWarning, stacklevel=3)
    with detached(module):
        return copy.deepcopy(module, memo)


@contextmanager
def detached(module: torch.nn.Module):
    """Takes litepatch off ``module`` and its submodules for the duration (states and handles are kept)."""
    patched = []
    for m in module.modules():
        while "_litepatch" in m.__dict__:  # a root that is also a layer holds two patches
            patch = m.__dict__["_litepatch"]
            patch.take_off(m)
            patched.append((m, patch))
    try:
        yield
    finally:
        for m, patch in reversed(patched):
            patch.put_back(m)


class LayerPatch:
    """The attachment of one attention module (``module._litepatch``)."""

    def __init__(self, info: AttentionLayerInfo, module: torch.nn.Module, adapter, runtime: Runtime):
        self.info = info
        self.name = info.name
        self.adapter = adapter
        self.runtime = runtime
        self.states: dict = {}
        self.warned: set[str] = set()
        self.plan: Plan | None = None
        self.last_call: tuple | None = None
        self.interception = ""
        self.entered = False  # set by the adapter's wrapper when the layer runs
        self.reached = False  # set when an attention call of the layer reached litepatch
        self._undo = None
        self._attachment: Attachment | None = None
        self._tiles: dict = {}
        self.call_index = 0
        self.installed = None  # the adapter's check that its interception is still in place (None: nothing to check)

    # ------------------------------------------------------------------------------ attachment
    def install(self, module: torch.nn.Module) -> None:
        attachment = Attachment(module)
        self._undo = self.adapter.install(module, self)
        module.__dict__["_litepatch"] = self
        attachment.record(module)
        self._attachment = attachment

    def uninstall(self, module: torch.nn.Module) -> None:
        if self._undo is not None:
            self._undo()
        self._attachment.take_off(module)

    def take_off(self, module: torch.nn.Module) -> None:
        self._attachment.take_off(module)

    def put_back(self, module: torch.nn.Module) -> None:
        self._attachment.put_back(module)

    # ---------------------------------------------------------------------------------- calls
    def _warn(self, reason: str) -> None:
        if reason not in self.warned:
            self.warned.add(reason)
            warnings.warn(f"litepatch: {self.name} runs dense attention ({reason}); its output is unchanged",
                          UserWarning, stacklevel=5)

    def _tiles_of(self, q: torch.Tensor, seq_k: int, key_padding: bool):
        """Tile sizes the call runs (or would run) with: the registry's answer, this layer's last ones, or the
        CPU reference's when no backend takes it."""
        key = (q.shape[-1], q.dtype, q.device, seq_k, key_padding)
        tiles = self._tiles.get(key)
        if tiles is None:
            try:
                tiles = registry.tiles(q, seq_k, backend=self.runtime.backend, key_padding=key_padding)
            except registry.BackendUnavailable:
                tiles = self._tiles.get("last") or registry.get("reference").tiles(q.shape[-1])
            self._tiles[key] = tiles
        return tiles

    def _dense_total(self, call: AttentionCall) -> int:
        q, k = call.q, call.k
        tiles = self._tiles_of(q, k.shape[1], call.key_mask is not None)
        batch, seq_q, heads = q.shape[0], q.shape[1], q.shape[2]
        return batch * heads * -(-seq_q // tiles.block_m) * -(-k.shape[1] // tiles.block_n)

    def _refusal(self, call: AttentionCall) -> str | None:
        q, k, v = call.q, call.k, call.v
        if call.problem:
            return call.problem
        if k.shape != v.shape or q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0]:
            return f"key/value shapes {tuple(k.shape)}/{tuple(v.shape)} do not match query {tuple(q.shape)}"
        if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
            return f"query/key/value on {q.dtype}/{k.dtype}/{v.dtype}, {q.device}/{k.device}/{v.device}"
        key = ("refusal", tuple(q.shape), q.dtype, q.device, k.shape[1], call.key_mask is not None)
        if key not in self._tiles:
            refused = registry.refusal(q, k.shape[1], backend=self.runtime.backend,
                                       key_padding=call.key_mask is not None)
            # the call as it is, then the registry's sentence (backend facts live there)
            self._tiles[key] = refused and f"dtype {q.dtype}, head_dim {q.shape[-1]}, {q.device.type}: {refused}"
        if self._tiles[key]:
            return self._tiles[key]
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return "autograd is recording (the LiteAttention kernel has no backward)"
        return None

    def make_plan(self, call_index: int = 0, chunk: tuple[int, int] | None = None) -> Plan:
        """Decides the coming call from the tracker (eager code, before the top-level forward runs).

        ``call_index`` > 0: a further attention call of the layer in one forward (a processor that loops over
        batch rows, as Mochi's does): it gets a state of its own. ``chunk = (query shard, K/V chunk)``: one chunk
        call of ring attention (:mod:`litepatch.ring_diffusers`), state key :class:`~litepatch.parallel.ChunkKey`.
        """
        tracker, recipe = self.runtime.tracker, self.runtime.recipe
        step, branch = max(tracker.step, 0), tracker.branch
        if call_index:
            branch = (branch, call_index)
        if chunk is not None:
            branch = ChunkKey(branch, *chunk)
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

    def _current_plan(self) -> Plan:
        plan = self.plan
        if plan is None:  # called outside a patched root's forward
            self.flush()
            plan = self.make_plan()
        elif self.last_call is not None:  # a further call in one forward: its own state
            self.flush()
            self.call_index += 1
            plan = self.make_plan(self.call_index)
        self.reached = True
        return plan

    def attend_problem(self, reason: str) -> None:
        """Records and warns about a call the adapter cannot even describe; the adapter runs the original."""
        plan = self._current_plan()
        self._warn(reason)
        self.last_call = (plan, reason, 0)
        return None

    def attend_unsupported(self, sdpa_call: dict) -> None:
        return self.attend_problem("query/key/value are not [batch, heads, seq, head_dim] tensors")

    def attend(self, call: AttentionCall) -> torch.Tensor | None:
        """One attention call: LiteAttention's ``[B, S, H, D]`` output, or ``None`` (run the original attention).

        ``call.shards`` > 1 (diffusers' Ulysses): the sequence is that many rank shards laid end to end, each with
        its own text tokens, and the token counts are one shard's; the must-compute ranges repeat per shard.

        Reads only ``self.plan`` (decided in eager code by the root pre-hook), so under torch.compile the step
        counter never becomes a guard; the call is recorded by a store to ``self.last_call``.
        """
        plan = self._current_plan()
        q, k = call.q, call.k
        reason = self._refusal(call)
        must = []
        if reason is None:
            seq_q, seq_k, shards = q.shape[1], k.shape[1], call.shards
            local_q = seq_q // shards if seq_q % shards == 0 else seq_q
            local_k = seq_k // shards if seq_k % shards == 0 else seq_k
            runtime = self.runtime
            kind = call_kind(self.info, local_q, local_k, call.hidden_tokens, call.encoder_tokens,
                             runtime.stream_text_tokens or runtime.text_tokens)
            if kind.kind == "joint" and kind.text_ranges and call.encoder_tokens and call.hidden_tokens:
                # single-stream layers after it hold these text tokens (AuraFlow adds register tokens to them)
                runtime.stream_text_tokens = local_q - call.hidden_tokens
            if kind.kind == "cross":
                reason = f"{kind.why}: cross-attention stays dense"
            elif kind.kind == "joint" and not kind.text_ranges:
                reason = kind.why
            else:
                must = _sharded(kind.text_ranges, local_q, shards)
        if call.ring is not None:  # diffusers' ring context parallelism: one state per (query shard, K/V chunk)
            return call.ring(self, call, plan, reason, must)
        if reason is not None:
            self._warn(reason)
            self.last_call = (plan, reason, self._dense_total(call) if q.dim() == 4 and k.dim() == 4 else 0)
            return None
        if plan.state is None or plan.threshold == -math.inf:
            out = _fast_dense(call)
            if out is not None or plan.state is None:
                self.last_call = (plan, plan.dense_reason or "threshold -inf skips nothing", self._dense_total(call))
                return out
        out = lite_attention(
            q, k, call.v, plan.state,
            threshold=plan.threshold,
            softmax_scale=call.scale,
            order=self.runtime.recipe.order,
            must_compute_queries=must or None,
            must_compute_keys=must or None,
            key_mask=call.key_mask,
            backend=self.runtime.backend,
        )
        self._tiles["last"] = plan.state.tiles
        self.last_call = (plan, "", 0)
        return out


# flash-attn-4's Python launch path costs 68-81 us of host time per call against SDPA's 19 us
# (benchmarks/patch_overhead.py on an H200) and saves 7-20 % of the GPU time over cuDNN, so it only pays on calls of
# a millisecond or more (Wan 480p: 6.6e12 FLOP, 9 ms; Flux 1024^2: 2.6e11 FLOP, 0.4 ms stays as is).
FAST_DENSE_MIN_FLOP = 1e12


def _fast_dense(call: AttentionCall) -> torch.Tensor | None:
    """A call that skips nothing on flash-attn-4's dense forward where it runs and pays (Hopper with the ``cuda``
    extra, 1.07-1.35x SDPA's cuDNN backend in ``benchmarks/backends.py``; long calls only, see
    :data:`FAST_DENSE_MIN_FLOP`), so dense steps of a patched video model are never slower than stock; ``None``
    elsewhere and while compiling (the model's own attention then runs)."""
    batch, seq_q, heads, dim = call.q.shape
    if torch.compiler.is_compiling() or 4.0 * batch * heads * seq_q * call.k.shape[1] * dim < FAST_DENSE_MIN_FLOP:
        return None
    if dense_kernel_name(call.q) != "flash-attn-4":
        return None
    return dense_attention(call.q, call.k, call.v, softmax_scale=call.scale, key_mask=call.key_mask)


def _sharded(ranges: list[tuple[int, int]], local: int, shards: int) -> list[tuple[int, int]]:
    """``ranges`` of one shard of ``local`` tokens, repeated for ``shards`` shards laid end to end."""
    return [(start + r * local, end + r * local) for r in range(shards) for start, end in ranges]


class RootPatch:
    """The attachment of a patched root module: step tracking pre-hook and ``cache_context`` reader."""

    def __init__(self, module: torch.nn.Module, runtime: Runtime, handle: object):
        self.runtime = runtime
        self.handle = handle
        self.reader = CallReader.for_forward(module.forward)
        self.hook = None
        self.checked_parallel_config = None
        self._attachment: Attachment | None = None
        self._hook_entries: list = []

    def check_parallelism(self, module: torch.nn.Module) -> None:
        """Warns once per diffusers parallel config under which every patched layer stays dense (ring CP, ...)."""
        config = getattr(module, "_parallel_config", None)
        if config is None or config is self.checked_parallel_config:
            return
        self.checked_parallel_config = config
        reason = dense_reason(module)
        if reason is not None:
            warnings.warn(f"litepatch: {reason}", UserWarning, stacklevel=3)

    def check_reach(self) -> None:
        """Warns once per layer that ran while none of its attention calls reached litepatch."""
        for layer in self.runtime.layers.values():
            if layer.installed is not None and "replaced" not in layer.warned and not layer.installed():
                layer.warned.add("replaced")
                warnings.warn(
                    f"litepatch: {layer.name}'s attention processor was replaced after litepatch.apply "
                    "(set_processor / set_attn_processor); the layer runs dense. Set processors before apply, or "
                    "call handle.remove() and litepatch.apply(model) again",
                    UserWarning, stacklevel=4,
                )
            if layer.entered and not layer.reached and "unreached" not in layer.warned:
                layer.warned.add("unreached")
                warnings.warn(
                    f"litepatch: {layer.name} ran but none of its attention calls reached litepatch "
                    f"(interception: {layer.interception}); it runs dense. Its attention is computed outside the "
                    "call site litepatch routes (a changed processor, a fused path); see litepatch.inspect(model)",
                    UserWarning, stacklevel=4,
                )
            layer.entered = layer.reached = False

    def _pre_hook(self, module, args, kwargs):
        self.check_parallelism(module)
        timestep, text_tokens, inputs = self.reader.read(args, kwargs)
        runtime = self.runtime
        runtime.flush()
        self.check_reach()
        if runtime.tracker.observe(timestep, runtime.context_name, inputs):
            runtime.reset_states()
        runtime.text_tokens, runtime.stream_text_tokens = text_tokens, None
        for layer in runtime.layers.values():
            layer.plan = layer.make_plan()
            layer.call_index = 0
        return None

    def install(self, module: torch.nn.Module) -> None:
        self.check_parallelism(module)
        attachment = Attachment(module)
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
            module.__dict__["cache_context"] = cache_context
        module.__dict__["_litepatch"] = self
        attachment.record(module)
        self._attachment = attachment

    def uninstall(self, module: torch.nn.Module) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        self._attachment.take_off(module)

    def take_off(self, module: torch.nn.Module) -> None:
        self._attachment.take_off(module)
        hook_id = self.hook.id if self.hook is not None else None
        self._hook_entries = []
        for hooks in (module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs):
            if hook_id in hooks:
                self._hook_entries.append((hooks, dict(hooks)))
                del hooks[hook_id]

    def put_back(self, module: torch.nn.Module) -> None:
        self._attachment.put_back(module)
        for hooks, saved in self._hook_entries:
            hooks.clear()
            hooks.update(saved)
        self._hook_entries = []

