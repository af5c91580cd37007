"""What every module-family adapter shares: the layer record, the call record, and the interception tools.

An :class:`Adapter` answers four questions for one family of attention modules (DESIGN §3):

1. **find**: :meth:`Adapter.matches` says whether a module is one of its layers;
2. **classify**: :meth:`Adapter.describe` gives the static kind (``self``/``cross``/``joint``, or
   ``"not applicable"`` for non-softmax attention) and why; the kind of each *call* is decided again
   from the call itself (:func:`call_kind`: are queries and keys the same tokens, which tokens are text);
3. **text ranges and key masks**: the adapter turns its call into an :class:`AttentionCall`, with a boolean
   key-padding mask where the call has one;
4. **intercept**: :meth:`Adapter.install` reaches the attention call site of the module and hands each
   call to the layer (:meth:`litepatch.layer_patch.LayerPatch.attend`), which returns LiteAttention's output or
   ``None`` (run the module's own attention).

Interception is narrow: :func:`rebind` gives a copy of one function (a processor's ``__call__``, a module's
``forward``) whose global names for the attention call (``F``, ``scaled_dot_product_attention``,
diffusers' ``dispatch_attention_fn``) point at the layer's interceptor, so no other op of the layer pays
anything. Only code that reaches SDPA in a way no global name shows (an import inside the function, a
module-level helper) gets :class:`SDPAMode`, a ``TorchFunctionMode`` over the layer's forward.

Example (a user adapter):
    >>> class MyAdapter(Adapter):
    ...     name = "my-family"
    ...     def matches(self, module, name):
    ...         return type(module).__name__ == "MyAttention"
    >>> handle = litepatch.apply(model, adapter=MyAdapter())
"""

from __future__ import annotations

import functools
import itertools
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from litepatch.kernels import key_padding_view

KINDS = ("self", "cross", "joint", "not applicable")
SPARSE_KINDS = ("self", "joint")
SDPA = F.scaled_dot_product_attention
SDPA_NAME = "scaled_dot_product_attention"
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
_HEAD_ATTRS = ("heads", "num_heads", "n_heads", "num_attention_heads")
_HEAD_DIM_ATTRS = ("head_dim", "dim_head", "attention_head_dim", "d_head")


@dataclass
class AttentionLayerInfo:
    """One attention layer found by an adapter (``litepatch.inspect`` lists these).

    Attributes:
        name: module path in the model (``"blocks.0.attn1"``).
        kind: ``"self"``, ``"cross"``, ``"joint"`` (text+video in one sequence) or ``"not applicable"``
            (linear or otherwise non-softmax attention, which LiteAttention cannot replace).
        heads, head_dim: 0 when they cannot be read from the module.
        module_class: the module's class name.
        reason: why it was found and classified so.
        sparse: whether litepatch makes it sparse (self and joint layers within reach).
        text_layout: for joint layers, ``"first"``, ``"last"``, ``"unknown"`` (both ends are text) or
            ``"interleaved"`` (text tokens between image tokens: no range holds them, so the layer stays dense).
        single_stream: joint layer that sees text+video already concatenated, without
            ``encoder_hidden_states``; the text length comes from the top-level forward.
        adapter: name of the adapter that found it.
        out_of_reach: why its attention runs where litepatch cannot intercept it, and the fix ("" when in reach).
    """

    name: str
    kind: str
    heads: int
    head_dim: int
    module_class: str
    reason: str
    sparse: bool
    text_layout: str = "unknown"
    single_stream: bool = False
    adapter: str = ""
    out_of_reach: str = ""


@dataclass
class AttentionCall:
    """One attention call as the kernel sees it: ``q, k, v`` ``[B, S, H, D]`` (views, any strides).

    ``problem`` names why the call cannot be taken as it is (a mask that is not a key-padding mask,
    dropout, ...); ``key_mask`` is bool ``[B, S_k]`` (True: the key takes part) or None. ``ring``: under
    diffusers' ring context parallelism, the object that runs the call per (query shard, K/V chunk).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float | None = None
    key_mask: torch.Tensor | None = None
    problem: str | None = None
    hidden_tokens: int | None = None
    encoder_tokens: int | None = None
    shards: int = 1
    # diffusers' ring context parallelism: runs the call chunk by chunk (litepatch.ring_diffusers.RingCall)
    ring: object = None


@dataclass
class CallKind:
    """What one call is: ``kind`` and, for joint calls, the text token ranges (must-compute)."""

    kind: str
    text_ranges: list[tuple[int, int]] = field(default_factory=list)
    why: str = ""


INTERLEAVED = "interleaved"  # a joint layout whose text tokens no (start, end) range holds


def text_ranges(layout: str, text: int, seq: int) -> list[tuple[int, int]]:
    """Token ranges of ``text`` text tokens in a joint sequence of ``seq`` tokens laid out as ``layout``."""
    if text <= 0:
        return []
    if text >= seq:
        return [(0, seq)]
    if layout == "first":
        return [(0, text)]
    if layout == "last":
        return [(seq - text, seq)]
    return [(0, text), (seq - text, seq)]


def call_kind(info: AttentionLayerInfo, seq_q: int, seq_k: int, hidden_tokens: int | None,
              encoder_tokens: int | None, root_text_tokens: int | None) -> CallKind:
    """Self, cross or joint, from the call itself (DESIGN §3): query/key lengths and which tokens are text.

    * ``seq_q != seq_k``: keys from other tokens: cross-attention (never sparse);
    * the layer got ``encoder_hidden_states`` and its sequence holds the hidden tokens plus (some of) them:
      joint, the text tokens at the layer's ``text_layout``;
    * a single-stream layer (text and video concatenated before it): joint, its text length the one the
      double-stream layers of the same forward saw, else the top-level call's text argument;
    * otherwise: self-attention.
    """
    if seq_q != seq_k:
        return CallKind("cross", why=f"query and key lengths differ ({seq_q} vs {seq_k})")
    if encoder_tokens and hidden_tokens and hidden_tokens < seq_q <= hidden_tokens + encoder_tokens:
        text = seq_q - hidden_tokens  # processors may drop padded text tokens (Mochi)
        return CallKind("joint", text_ranges(info.text_layout, text, seq_q), "text and hidden tokens together")
    if info.kind == "joint" and info.text_layout == INTERLEAVED:
        return CallKind("joint", why="text tokens interleaved with image tokens: no token range protects them")
    if info.kind == "joint":
        text = root_text_tokens if info.single_stream else None
        if text and text < seq_q:
            return CallKind("joint", text_ranges(info.text_layout, text, seq_q), "single-stream text+video")
        return CallKind("joint", why="joint attention whose text length is unknown")
    return CallKind("self")


def parse_sdpa(args: tuple, kwargs: dict) -> dict:
    """``torch.nn.functional.scaled_dot_product_attention`` arguments by name, defaults filled in."""
    call = dict(_SDPA_DEFAULTS)
    call.update(zip(_SDPA_PARAMS, args))
    call.update(kwargs)
    return call


def mask_problem(mask, batch: int, seq_k: int) -> tuple[torch.Tensor | None, str | None]:
    """(bool key mask ``[B, S_k]``, None) for a boolean key-padding mask; (None, why) for any other mask.

    Accepted: bool ``[B, S_k]``, ``[S_k]`` or anything that broadcasts from ``[B or 1, 1, 1, S_k]``. Additive
    float masks, causal and per-query masks run the model's own attention (their values would have to be read
    on the host to tell).
    """
    if mask is None:
        return None, None
    if not isinstance(mask, torch.Tensor):
        return None, f"an attention mask of type {type(mask).__name__}"
    if mask.dtype != torch.bool:
        dtype = str(mask.dtype).replace("torch.", "")
        return None, f"an additive {dtype} attention mask (only boolean key-padding masks are sparse)"
    view = key_padding_view(mask, batch, seq_k)
    if view is None:
        return None, f"an attention mask of shape {tuple(mask.shape)} that is not a key-padding mask ([B, 1, 1, S_k])"
    return view, None


def heads_and_dim(module: torch.nn.Module) -> tuple[int, int]:
    """Heads and head dim read from the usual attribute names (0 where unknown)."""
    heads = _first_int(module, _HEAD_ATTRS)
    head_dim = _first_int(module, _HEAD_DIM_ATTRS)
    if heads and not head_dim:
        inner = _first_int(module, ("inner_dim", "dim", "embed_dim", "hidden_size"))
        if not inner:
            for proj in ("to_q", "q", "q_proj", "qkv"):
                layer = getattr(module, proj, None)
                if isinstance(layer, torch.nn.Linear):
                    inner = layer.out_features // (3 if proj == "qkv" else 1)
                    break
        head_dim = inner // heads if inner and inner % heads == 0 else 0
    return heads, head_dim


def _first_int(module: torch.nn.Module, names: tuple[str, ...]) -> int:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


# --------------------------------------------------------------------------------- code reading
def code_names(function) -> set[str]:
    """Every global/attribute name the bytecode of ``function`` (and its nested functions) mentions.

    Bytecode, not source text: works for functions made by ``exec`` or loaded from ``.pyc`` only.
    """
    code = getattr(function, "__code__", None)
    if code is None:
        return set()
    names: set[str] = set()
    stack = [code]
    while stack:
        current = stack.pop()
        names.update(current.co_names)
        stack.extend(c for c in current.co_consts if isinstance(c, types.CodeType))
    return names


def plain_method(cls: type, name: str):
    """The plain function behind ``cls.<name>`` (first in the MRO), or None."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            attr = klass.__dict__[name]
            if isinstance(attr, (staticmethod, classmethod)):
                attr = attr.__func__
            return attr if isinstance(attr, types.FunctionType) else None
    return None


def methods_reaching(cls: type, target: Callable[[types.FunctionType], bool], depth: int = 3) -> list[str]:
    """Names of the methods of ``cls``, from ``forward`` down ``self.<name>`` calls (``depth`` deep), whose code
    satisfies ``target``; [] when none does. Each method is read once, so recursion ends."""
    seen: set[str] = set()
    frontier, found = ["forward"], []
    for _ in range(depth + 1):
        following: list[str] = []
        for name in frontier:
            if name in seen:
                continue
            seen.add(name)
            function = plain_method(cls, name)
            if function is None:
                continue
            if target(function):
                found.append(name)
            following.extend(n for n in code_names(function) if plain_method(cls, n) is not None)
        frontier = following
    return found


# ------------------------------------------------------------------------------- interception
def functional_with(sdpa: Callable) -> types.ModuleType:
    """A copy of ``torch.nn.functional`` whose ``scaled_dot_product_attention`` is ``sdpa``."""
    namespace = types.ModuleType(F.__name__)
    namespace.__dict__.update(F.__dict__)
    namespace.scaled_dot_product_attention = sdpa
    return namespace


def sdpa_globals(function) -> dict[str, str]:
    """``{global name: "functional" | "sdpa"}`` for the globals through which ``function`` calls SDPA."""
    names = code_names(function)
    if SDPA_NAME not in names:
        return {}
    found = {}
    for name in names:
        value = function.__globals__.get(name)
        if value is F:
            found[name] = "functional"
        elif value is SDPA:
            found[name] = "sdpa"
    return found


_ROUTED_COUNT = itertools.count()


def rebind(function: types.FunctionType, replacements: dict) -> types.FunctionType:
    """A copy of ``function`` whose globals ``replacements`` are swapped (its module is not touched).

    The copy's globals are the dict of a module of their own in ``sys.modules`` (``litepatch.routed.<n>``):
    torch.compile finds a function's globals by their module name, which must not lead back to the
    original module. :func:`release` drops it again.
    """
    name = f"litepatch.routed.{next(_ROUTED_COUNT)}"
    namespace = types.ModuleType(name)
    namespace.__dict__.update(function.__globals__)
    namespace.__dict__.update(replacements)
    namespace.__dict__["__name__"] = name
    sys.modules[name] = namespace
    copy = types.FunctionType(function.__code__, namespace.__dict__, function.__name__, function.__defaults__,
                              function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    copy = functools.update_wrapper(copy, function)
    copy.__litepatch_routed__ = [name] + [
        routed for value in replacements.values() for routed in getattr(value, "__litepatch_routed__", [])]
    return copy


def release(function) -> None:
    """Drops the ``sys.modules`` entries :func:`rebind` made for ``function`` (and the helpers it routed)."""
    for name in getattr(function, "__litepatch_routed__", []):
        sys.modules.pop(name, None)


def sdpa_replacements(function, sdpa: Callable) -> dict:
    """The replacements for :func:`rebind` that route ``function``'s SDPA calls to ``sdpa`` ({} when none)."""
    kinds = sdpa_globals(function)
    if not kinds:
        return {}
    functional = functional_with(sdpa)
    return {name: functional if kind == "functional" else sdpa for name, kind in kinds.items()}


class SDPAMode(TorchFunctionMode):
    """The generic fallback: routes every SDPA call made beneath a forward to ``sdpa`` (sees every op)."""

    def __init__(self, sdpa: Callable):
        super().__init__()
        self.sdpa = sdpa

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is SDPA:
            return self.sdpa(*args, **kwargs)
        return func(*args, **kwargs)


def sdpa_interceptor(layer, context: Callable[[], dict]) -> Callable:
    """An SDPA replacement for one layer: ``[B, H, S, D]`` calls become :class:`AttentionCall` s.

    ``context()`` gives the per-call token counts the layer's wrapper recorded (``hidden_tokens``,
    ``encoder_tokens``, ``shards``).
    """

    def scaled_dot_product_attention(*args, **kwargs):
        call = parse_sdpa(args, kwargs)
        attention = sdpa_call(call, **context())
        out = layer.attend(attention) if attention is not None else layer.attend_unsupported(call)
        if out is None:
            return SDPA(*args, **kwargs)
        return out.transpose(1, 2)

    return scaled_dot_product_attention


def sdpa_call(call: dict, hidden_tokens=None, encoder_tokens=None, shards: int = 1) -> AttentionCall | None:
    """The :class:`AttentionCall` of parsed SDPA arguments, or None when they are not 4-d tensors."""
    q, k, v = call["query"], call["key"], call["value"]
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return None
    key_mask, problem = mask_problem(call["attn_mask"], q.shape[0], k.shape[-2])
    if problem is None:
        problem = _flag_problem(call, q, k)
    return AttentionCall(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), call["scale"], key_mask, problem,
                         hidden_tokens, encoder_tokens, shards)


def _flag_problem(call: dict, q: torch.Tensor, k: torch.Tensor) -> str | None:
    if call["is_causal"]:
        return "is_causal=True"
    dropout = call["dropout_p"]
    if dropout and float(dropout) > 0.0:
        return f"dropout_p={dropout}"
    if call["enable_gqa"] or k.shape[1] != q.shape[1]:
        return f"grouped K/V heads ({q.shape[1]} query heads, {k.shape[1]} key heads)"
    return None


# Parameter names under which a layer receives the text tokens (a hand-written joint layer: forward(x, context)).
ENCODER_NAMES = ("encoder_hidden_states", "context", "text", "txt", "text_states", "prompt_embeds")


class TokenCounter:
    """Reads (hidden tokens, encoder tokens) from a layer's call: dim 1 of its first argument
    (``hidden_states``) and of its text argument (the first of :data:`ENCODER_NAMES` it takes)."""

    def __init__(self, function, skip: int = 1):
        code = getattr(function, "__code__", None)
        names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount] if code is not None else ()
        positional = list(code.co_varnames[skip: code.co_argcount]) if code is not None else []
        self.hidden_name = positional[0] if positional else "hidden_states"
        self.encoder_name = next((n for n in ENCODER_NAMES if n in names), "encoder_hidden_states")
        self.encoder_index = positional.index(self.encoder_name) if self.encoder_name in positional else None

    def __call__(self, args: tuple, kwargs: dict) -> tuple[int | None, int | None]:
        hidden = args[0] if args else kwargs.get(self.hidden_name)
        encoder = kwargs.get(self.encoder_name)
        if encoder is None and self.encoder_index is not None and len(args) > self.encoder_index:
            encoder = args[self.encoder_index]
        hidden_tokens = hidden.shape[1] if isinstance(hidden, torch.Tensor) and hidden.dim() >= 3 else None
        encoder_tokens = encoder.shape[1] if isinstance(encoder, torch.Tensor) and encoder.dim() >= 3 else None
        return hidden_tokens, encoder_tokens


class Adapter:
    """One module family: how to find, classify and intercept its attention (see the module docstring).

    Subclasses set ``name`` and override :meth:`matches`; :meth:`describe` and :meth:`install` have
    defaults for modules that call SDPA in their own ``forward`` (or its ``self.<helper>`` methods).
    """

    name: str = "adapter"

    def matches(self, module: torch.nn.Module, name: str) -> bool:
        """Whether ``module`` (at ``name`` in the model) is an attention layer of this family."""
        raise NotImplementedError(f"{type(self).__name__} must define matches(module, name)")

    def describe(self, module: torch.nn.Module, name: str, parent: torch.nn.Module | None) -> AttentionLayerInfo:
        """The layer's static record: kind and why, heads, head dim, whether it is in reach."""
        heads, head_dim = heads_and_dim(module)
        kind, why = static_kind(module, name)
        layout = getattr(module, "text_layout", "unknown")
        layout = layout if layout in ("first", "last") else "unknown"
        return AttentionLayerInfo(name, kind, heads, head_dim, type(module).__name__, f"{self.name}: {why}",
                                  kind in SPARSE_KINDS, text_layout=layout, adapter=self.name)

    def install(self, module: torch.nn.Module, layer) -> Callable[[], None]:
        """Intercepts ``module``'s attention calls for ``layer``; returns the function that undoes it."""
        return install_forward_interception(module, layer)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


_CROSS_WORDS = ("attn2", "cross", "xattn")


def static_kind(module: torch.nn.Module, name: str) -> tuple[str, str]:
    """A first guess of the kind from names and attributes (each call is classified again when it runs)."""
    attr = name.rsplit(".", 1)[-1].lower()
    if any(word in attr for word in _CROSS_WORDS):
        return "cross", f"attribute name {name.rsplit('.', 1)[-1]!r} marks cross-attention"
    if "cross" in type(module).__name__.lower():
        return "cross", f"class name {type(module).__name__} marks cross-attention"
    if "pool" in type(module).__name__.lower():
        return "cross", f"class name {type(module).__name__}: attention pooling (learned queries over the tokens)"
    return "self", "queries and keys from the same tokens"


def install_forward_interception(module: torch.nn.Module, layer, methods: list[str] | None = None):
    """Routes the SDPA calls of ``module.forward`` (and of the ``self.<helper>`` methods in ``methods``) to
    ``layer``: by :func:`rebind` where each reaches SDPA through a global name, else by :class:`SDPAMode`.

    The rebound functions are set as instance attributes; the returned function deletes them.
    """
    cls = type(module)
    methods = methods or methods_reaching(cls, lambda f: SDPA_NAME in code_names(f)) or ["forward"]
    counter = TokenCounter(plain_method(cls, "forward"))
    cell = {"hidden_tokens": None, "encoder_tokens": None, "shards": 1}
    sdpa = sdpa_interceptor(layer, lambda: cell)
    rebound = {}
    for name in methods:
        function = plain_method(cls, name)
        replacements = sdpa_replacements(function, sdpa) if function is not None else {}
        if not replacements:
            rebound = None
            break
        rebound[name] = rebind(function, replacements)
    previous = {name: module.__dict__[name] for name in ["forward", *methods] if name in module.__dict__}
    original_forward = module.forward
    if rebound is None:  # SDPA reached some other way: the generic TorchFunctionMode
        layer.interception = "torch-function-mode"

        def forward(*args, **kwargs):
            cell["hidden_tokens"], cell["encoder_tokens"] = counter(args, kwargs)
            layer.entered = True
            with SDPAMode(sdpa):
                return original_forward(*args, **kwargs)

        module.forward = functools.update_wrapper(forward, original_forward)
    else:
        layer.interception = "rebound " + ", ".join(sorted(rebound))
        bound = {name: function if _is_static(cls, name) else types.MethodType(function, module)
                 for name, function in rebound.items()}
        inner_forward = bound.get("forward", original_forward)

        def forward(*args, **kwargs):
            cell["hidden_tokens"], cell["encoder_tokens"] = counter(args, kwargs)
            layer.entered = True
            return inner_forward(*args, **kwargs)

        for name, method in bound.items():
            if name != "forward":
                module.__dict__[name] = method
        module.forward = functools.update_wrapper(forward, original_forward)

    def undo() -> None:
        for name in ["forward", *methods]:
            module.__dict__.pop(name, None)
        module.__dict__.update(previous)
        for function in (rebound or {}).values():
            release(function)

    return undo


def _is_static(cls: type, name: str) -> bool:
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return isinstance(klass.__dict__[name], staticmethod)
    return False


def iter_named(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, torch.nn.Module | None]]:
    """(name, module, parent) for every module of ``model``, in ``named_modules()`` order."""
    parents: dict[str, torch.nn.Module] = {}
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            parents[f"{name}.{child_name}" if name else child_name] = module
        yield name, module, parents.get(name)
