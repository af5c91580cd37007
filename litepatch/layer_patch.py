"""The attachment of one self or joint attention layer (DESIGN §3): its plan per call, skip states, fallbacks and
statistics.

Its adapter (:mod:`litepatch.adapters`) intercepts the layer's attention call site and hands each call over
as an :class:`~litepatch.adapters.AttentionCall`. :meth:`LayerPatch.attend` runs LiteAttention or returns
``None``, and the adapter runs the model's own attention (warm-up, a dense layer, a call the kernel cannot
take).

Calls no backend can take run the original attention and warn once per layer and reason: masks other than
boolean key-padding masks, dropout, ``is_causal``, grouped K/V heads, cross-attention calls, what
:func:`litepatch.kernels.registry.refusal` refuses (dtype, head dim, device, ...), and autograd (the kernel
has no backward). Never a wrong result. Which tiles a call counts in is asked of the registry too
(:func:`litepatch.kernels.registry.tiles`): the tiles of the backend that runs, or would run, the call.

State: one :class:`~litepatch.kernels.SkipState` per layer and CFG branch (batch rows inside it).
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch

from litepatch.kernels import SkipState, lite_attention, registry, repeat_call, sdpa_attention

from . import compiled_call
from .adapters.base import AttentionCall, AttentionLayerInfo, call_kind
from .attachment import LAYER_ATTR, Attachment
from .dense_routing import fast_dense
from .parallel import ChunkKey
from .runtime import CallPlan, Runtime


_UNASKED = object()
# a traced refused call's plan: the forward's, taken when the call is recorded (a str, which torch.compile's replayed
# store keeps equal but not necessarily identical)
PLAN_AT_FLUSH = "plan-at-flush"


class LayerPatch:
    """The attachment of one attention module (``module._litepatch``, :data:`LAYER_ATTR`)."""

    def __init__(self, info: AttentionLayerInfo, module: torch.nn.Module, adapter, runtime: Runtime):
        self.info = info
        self.name = info.name
        self.adapter = adapter
        self.runtime = runtime
        self.states: dict = {}
        self.warned: set[str] = set()
        self.plan: CallPlan | None = None
        self.last_call: tuple | None = None
        self.interception = ""
        self.entered = False  # set by the adapter's wrapper when the layer runs
        self.reached = False  # set when an attention call of the layer reached litepatch
        self._undo = None
        self._attachment: Attachment | None = None
        self._tiles: dict = {}
        self._forms: dict = {}  # LayerPatch._form's answers
        self._again: dict = {}  # branch -> _Again: the sparse call attend_again makes again
        self._streams_text = False  # the last classified call told later single-stream layers the text tokens
        self.call_index = 0
        self.installed = None  # the adapter's check that its interception is still in place (None: nothing to check)
        self.op_id = compiled_call.register(self)  # what its traced calls pass to litepatch::layer_attention

    # ------------------------------------------------------------------------------ attachment
    def install(self, module: torch.nn.Module) -> None:
        attachment = Attachment(module)
        self._undo = self.adapter.install(module, self)
        module.__dict__[LAYER_ATTR] = self
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
            if len(self._tiles) >= 64:  # many sequence lengths (prompts of any length): start over, keep the last
                self._tiles = {"last": self._tiles["last"]} if "last" in self._tiles else {}
            self._tiles[key] = tiles
        return tiles

    def _dense_total(self, call: AttentionCall) -> int:
        q, k = call.q, call.k
        tiles = self._tiles_of(q, k.shape[1], call.key_mask is not None)
        batch, seq_q, heads = q.shape[0], q.shape[1], q.shape[2]
        return batch * heads * -(-seq_q // tiles.block_m) * -(-k.shape[1] // tiles.block_n)

    def _refusal_of(self, call: AttentionCall) -> str | None:
        q, k, v, key_padding = call.q, call.k, call.v, call.key_mask is not None
        if k.shape != v.shape or q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0]:
            return f"key/value shapes {tuple(k.shape)}/{tuple(v.shape)} do not match query {tuple(q.shape)}"
        if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
            return f"query/key/value on {q.dtype}/{k.dtype}/{v.dtype}, {q.device}/{k.device}/{v.device}"
        refused = registry.refusal(q, k.shape[1], backend=self.runtime.backend, key_padding=key_padding)
        # the call as it is, then the registry's sentence (backend facts live there)
        return refused and f"dtype {q.dtype}, head_dim {q.shape[-1]}, {q.device.type}: {refused}"

    def make_plan(self, call_index: int = 0, chunk: tuple[int, int] | None = None) -> CallPlan:
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
            return CallPlan(step, branch, tracker.generation, None, "warm-up", None)
        threshold = recipe.threshold_for(self.name, step)
        if threshold is None:
            return CallPlan(step, branch, tracker.generation, None, "dense layer", None)
        if threshold == -math.inf:  # nothing to skip: a dense call, on the fastest exact dense kernel (DESIGN §2)
            return CallPlan(step, branch, tracker.generation, None, "threshold -inf skips nothing", None)
        state = self.states.get(branch)
        if state is None:
            state = self.states[branch] = SkipState()
        state.usable_outside_inference_mode()
        state.fold_calls(recipe.order)  # eager code: compiled calls then never see a new count
        return CallPlan(step, branch, tracker.generation, float(threshold), "", state)

    def flush(self, live: list | None = None) -> None:
        """Turns the last call into a stats record; a sparse call's kept count stays a device tensor.

        ``live``: a list to put the record on, for the caller to add many together
        (:meth:`litepatch.runtime.Runtime.flush`: their counts copied in one stack); otherwise it is added now.
        """
        last, self.last_call = self.last_call, None
        if last is None:
            return
        plan, reason, total = last
        if isinstance(plan, str):  # PLAN_AT_FLUSH: a refused call of a compiled forward: its plan is this forward's
            self._warn(reason)  # not in the trace: warnings.warn breaks fullgraph
            self.runtime.settle()
            plan = self.plan if self.plan is not None else self.make_plan()
        dense = plan.state is None or bool(reason)
        if not dense:
            total = plan.state.total_tiles()
        # kept = total for a dense call; a sparse one's is the state's count, copied when the record is added
        record = ([self.name, plan.step, plan.branch, plan.generation, dense, reason or plan.dense_reason, total, total],
                  None if dense else plan.state.kept)
        if live is None:
            self.runtime.log.add([record])
        else:
            live.append(record)

    def _current_plan(self, compiling: bool = False) -> CallPlan:
        """The plan of the call being made (``compiling``: torch.compile is tracing it, which only a ring call's
        plan sees; the caller asks once per call)."""
        runtime = self.runtime
        if runtime.pending is not None:  # the forward's GPU timestep, read now (Runtime.start_forward)
            runtime.settle()
        if compiling:  # a ring call (the others plan at run time: litepatch.compiled_call)
            runtime.traced = True  # plans are made before each forward from now on (a store: no guard on it)
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
        if torch.compiler.is_compiling():
            self.reached = True
            plan = PLAN_AT_FLUSH
        else:
            plan = self._current_plan()
            self._warn(reason)
        self.last_call = (plan, reason, 0)
        return None

    def attend_unsupported(self, sdpa_call: dict) -> None:
        return self.attend_problem("query/key/value are not [batch, heads, seq, head_dim] tensors")

    def classify(self, call: AttentionCall, compiling: bool = False
                 ) -> tuple[str | None, list[tuple[int, int]], int | None]:
        """Why the layer does not take ``call`` (``None``: it does), the call's must-compute token ranges, and the
        tiles of a dense run of a call it takes (``None`` when refused).

        Depends only on the form of the call (shapes, dtypes, masks, text tokens), not on the step: a traced
        call (``compiling``) decides it in the trace (:mod:`litepatch.compiled_call`). Eager calls decide it once
        per form.
        """
        if call.problem:
            return call.problem, [], None
        reason, must, stream_text, total = self._form(call) if not compiling else self._form_of(call)
        self._streams_text = stream_text is not None
        if stream_text is not None:  # single-stream layers after it hold these text tokens
            self.runtime.stream_text_tokens = stream_text
        refused = reason or _autograd_refusal(call)
        return refused, must, None if refused else total

    def _form(self, call: AttentionCall) -> tuple[str | None, list[tuple[int, int]], int | None, int | None]:
        """:meth:`_form_of`, remembered per form of call (it cost several microseconds of host time a call)."""
        runtime = self.runtime
        key = _form_key(call.q, call.k, call.v, call.key_mask is not None, call.hidden_tokens, call.encoder_tokens,
                        call.shards, runtime.stream_text_tokens or runtime.text_tokens)
        form = self._forms.get(key)
        if form is None:
            if len(self._forms) >= 64:  # many forms (changing lengths): start over rather than grow
                self._forms.clear()
            form = self._forms[key] = self._form_of(call)
        return form

    def _form_of(self, call: AttentionCall) -> tuple[str | None, list[tuple[int, int]], int | None, int | None]:
        """(why no backend or kind takes the call, its must-compute ranges, the text tokens single-stream layers
        after it hold (a double-stream joint call; else ``None``), its tiles when it runs dense (a call it takes;
        else ``None``)) for a call without a problem."""
        q, k = call.q, call.k
        reason = self._refusal_of(call)
        if reason is not None:
            return reason, [], None, None
        seq_q, seq_k, shards = q.shape[1], k.shape[1], call.shards
        local_q = seq_q // shards if seq_q % shards == 0 else seq_q
        local_k = seq_k // shards if seq_k % shards == 0 else seq_k
        runtime = self.runtime
        kind = call_kind(self.info, local_q, local_k, call.hidden_tokens, call.encoder_tokens,
                         runtime.stream_text_tokens or runtime.text_tokens)
        stream_text = None
        if kind.kind == "joint" and kind.text_ranges and call.encoder_tokens and call.hidden_tokens:
            stream_text = local_q - call.hidden_tokens  # AuraFlow adds register tokens to them
        if kind.kind == "cross":
            return f"{kind.why}: cross-attention stays dense", [], stream_text, None
        if kind.kind == "joint" and not kind.text_ranges:
            return kind.why, [], stream_text, None
        # its tiles: not in a trace, which would guard on the layer's tile cache (LayerPatch._tiles_of)
        total = None if torch.compiler.is_compiling() else self._dense_total(call)
        return None, _sharded(kind.text_ranges, local_q, shards), stream_text, total

    def attend(self, call: AttentionCall) -> torch.Tensor | None:
        """One attention call: LiteAttention's ``[B, S, H, D]`` output, or ``None`` (run the original attention).

        ``call.shards`` > 1 (diffusers' Ulysses): the sequence is that many rank shards laid end to end, each with
        its own text tokens, and the token counts are one shard's; the must-compute ranges repeat per shard.

        While torch.compile traces it, a call the layer takes becomes one ``litepatch::layer_attention`` op that
        plans when it runs (:mod:`litepatch.compiled_call`), so the step, branch and skip state never reach the
        graph; a refused call is recorded by a store to ``self.last_call``, planned when it is flushed.
        """
        compiling = torch.compiler.is_compiling()  # asked once: a Python call each time, on every attention call
        if compiling and call.ring is None:
            return self._attend_traced(call)
        plan = self._current_plan(compiling)
        reason, must, dense_total = self.classify(call, compiling)
        if call.ring is not None:  # diffusers' ring context parallelism: one state per (query shard, K/V chunk)
            return call.ring(self, call, plan, reason, must)
        if reason is not None:
            self._refused(call, plan, reason)
            return None
        out = self._run(call, plan, must, dense_total)
        if plan.state is not None and not compiling:
            self._remember(call, plan)
        return out

    def attend_again(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                     hidden_tokens: int | None, encoder_tokens: int | None) -> torch.Tensor | None:
        """A call with no mask, dropout, causal flag, grouped heads or context parallelism (the adapter checked)
        made as :meth:`attend` made the last such call of its plan's state, which decided everything but ``q, k, v``
        for it (:meth:`_remember`): the state's repeated kernel call, without the classification, plan and
        :func:`~litepatch.kernels.lite_attention` checks in between, which cost most of a call's host time inside a
        forward. ``None``, having run nothing, where anything differs (another step's threshold, form, text length,
        autograd, a further call in the forward): the adapter then makes the call through :meth:`attend`. Not while
        torch.compile traces (the adapter asks)."""
        runtime = self.runtime
        if runtime.pending is not None:  # the forward's GPU timestep, read now (Runtime.start_forward)
            runtime.settle()
        plan = self.plan
        if plan is None or self.last_call is not None or plan.state is None:
            return None
        again = self._again.get(plan.branch)
        if (again is None or again.state is not plan.state
                or _autograd_records(q, k, v)
                or _again_key(runtime, q, k, v, scale, hidden_tokens, encoder_tokens, plan.threshold) != again.key):
            return None
        out = repeat_call(plan.state, again.repeat, q, k, v)
        if out is not None:
            self.reached = True
            self.last_call = (plan, "", 0)
        return out

    def forget_calls(self) -> None:
        """Drops the calls :meth:`attend_again` would make again (their states are being dropped)."""
        self._again.clear()

    def _remember(self, call: AttentionCall, plan: CallPlan) -> None:
        """Keeps a sparse call :meth:`attend_again` can make again: no key mask, problem or shards, a repeat left on
        the state, no text tokens handed to the layers after it (a double-stream joint call hands them on at each
        call)."""
        state = plan.state
        if (call.key_mask is None and call.problem is None and call.shards == 1 and state.repeat is not None
                and not self._streams_text):
            key = _again_key(self.runtime, call.q, call.k, call.v, call.scale, call.hidden_tokens, call.encoder_tokens,
                             plan.threshold)
            self._again[plan.branch] = _Again(key, state, state.repeat)
        else:
            self._again.pop(plan.branch, None)

    def attend_planned(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                       scale: float | None, must: list[tuple[int, int]]) -> torch.Tensor:
        """The body of a traced call (:func:`litepatch.compiled_call.layer_attention`), in eager code: plans it and
        runs it, on the dense kernel when the plan is dense (the original attention is not at hand here)."""
        call = AttentionCall(q, k, v, scale, key_mask)
        out = self._run(call, self._current_plan(), must)
        return out if out is not None else sdpa_attention(q, k, v, softmax_scale=scale, key_mask=key_mask)

    def _attend_traced(self, call: AttentionCall) -> torch.Tensor | None:
        reason, must, _ = self.classify(call, compiling=True)
        self.reached = True
        if reason is not None:
            self._refused(call, PLAN_AT_FLUSH, reason)
            return None
        flat = [bound for span in must for bound in span]
        return compiled_call.layer_attention(call.q, call.k, call.v, call.key_mask, self.op_id, call.scale, flat)

    def _refused(self, call: AttentionCall, plan, reason: str) -> None:
        if plan is not PLAN_AT_FLUSH:  # a traced call warns when it is recorded (flush)
            self._warn(reason)
        q, k = call.q, call.k
        self.last_call = (plan, reason, self._dense_total(call) if q.dim() == 4 and k.dim() == 4 else 0)

    def _run(self, call: AttentionCall, plan: CallPlan, must: list[tuple[int, int]],
             dense_total: int | None = None) -> torch.Tensor | None:
        """A call the layer takes, as ``plan`` says: LiteAttention on the plan's skip state, or (warm-up, a dense
        layer, threshold -inf) the fastest exact dense kernel where it beats the model's own (else ``None``)."""
        if plan.state is None:
            total = dense_total if dense_total is not None else self._dense_total(call)
            self.last_call = (plan, plan.dense_reason, total)
            return fast_dense(call)
        out = lite_attention(
            call.q, call.k, call.v, plan.state,
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


class _Again(NamedTuple):
    """A sparse call :meth:`LayerPatch.attend_again` makes again: what decided it (:func:`_again_key`), its state,
    and the repeat :func:`~litepatch.kernels.lite_attention` left on that state."""

    key: tuple
    state: SkipState
    repeat: object


def _form_key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked: bool, hidden_tokens, encoder_tokens,
              shards: int, text_tokens) -> tuple:
    """What decides how a call is classified, refused and split into must-compute ranges (:meth:`LayerPatch._form`)."""
    return (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, masked, hidden_tokens,
            encoder_tokens, shards, text_tokens)


def _again_key(runtime: Runtime, q, k, v, scale, hidden_tokens, encoder_tokens, threshold: float) -> tuple:
    """What decides an unmasked, unsharded sparse call beyond its plan's state: its form and the arguments
    :meth:`LayerPatch._run` gives :func:`~litepatch.kernels.lite_attention`, the registry's generation among them."""
    return (_form_key(q, k, v, False, hidden_tokens, encoder_tokens, 1,
                      runtime.stream_text_tokens or runtime.text_tokens),
            scale, threshold, runtime.recipe.order, runtime.backend, registry.generation)


def _autograd_refusal(call: AttentionCall) -> str | None:
    if _autograd_records(call.q, call.k, call.v):
        return "autograd is recording (the LiteAttention kernel has no backward)"
    return None


def _autograd_records(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether autograd records this call (the kernel has no backward: such calls run the model's own attention)."""
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _sharded(ranges: list[tuple[int, int]], local: int, shards: int) -> list[tuple[int, int]]:
    """``ranges`` of one shard of ``local`` tokens, repeated for ``shards`` shards laid end to end."""
    if shards == 1:
        return list(ranges)
    return [(start + r * local, end + r * local) for r in range(shards) for start, end in ranges]
