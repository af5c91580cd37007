"""Finding attention layers in any model by introspection (DESIGN §3), never by model name.

Three detectors, tried per module in this order:

1. diffusers attention: a module whose classes include ``AttentionModuleMixin`` (WanAttention,
   FluxAttention, LTXAttention, ...) or diffusers' ``Attention`` (CogVideoX, HunyuanVideo, SD3).
2. timm-style attention: a class named ``Attention``/``*SelfAttention`` with ``qkv`` and ``num_heads``.
3. hand-written attention: a module whose ``forward`` source calls ``scaled_dot_product_attention``
   (e.g. the original Wan repository's ``WanSelfAttention``), itself or through methods of its class
   that it calls as ``self.<name>(...)``, up to :data:`_HELPER_DEPTH` calls deep.

A module nested inside one already found is not listed again (the outer forward intercepts every
SDPA call beneath it). Importing this module never imports diffusers.

The *kind* of a layer decides what is made sparse: ``"self"`` fully, ``"joint"`` (text+video
attention) only in its video<->video part, ``"cross"`` never. Per-family facts that introspection
cannot see (where the text tokens sit in a joint sequence) live in :data:`TEXT_LAYOUT`, keyed by the
attention processor's class name; an unknown family marks both ends of the sequence as text, which
is always correct.

Example:
    >>> import litepatch
    >>> for info in litepatch.inspect(transformer):
    ...     print(info.name, info.kind, info.heads, info.head_dim, info.reason)
"""

from __future__ import annotations

import ast
import functools
import inspect as pyinspect
import re
import textwrap
from dataclasses import dataclass

import torch

KINDS = ("self", "cross", "joint")

# Processor class-name prefix -> where the text tokens sit in the joint sequence ("first" / "last").
TEXT_LAYOUT: dict[str, str] = {
    "CogVideoXAttnProcessor": "first",
    "FusedCogVideoXAttnProcessor": "first",
    "FluxAttnProcessor": "first",
    "FluxIPAdapterAttnProcessor": "first",
    "JointAttnProcessor": "last",
    "FusedJointAttnProcessor": "last",
    "HunyuanVideoAttnProcessor": "last",
    "HunyuanVideoFramepackAttnProcessor": "last",
    "CogView3PlusAttnProcessor": "first",
}

# Processors that concatenate text and video themselves, with the module's own projections.
_JOINT_PROCESSORS = ("CogVideoXAttnProcessor", "FusedCogVideoXAttnProcessor", "CogView3PlusAttnProcessor")

_CROSS_NAME = re.compile(r"attn2|cross|xattn", re.IGNORECASE)
_HEAD_ATTRS = ("heads", "num_heads", "n_heads", "num_attention_heads")
_HEAD_DIM_ATTRS = ("head_dim", "dim_head", "attention_head_dim", "d_head")
_SDPA_NAME = "scaled_dot_product_attention"
# How many ``self.<name>(...)`` calls deep, starting from ``forward``, the SDPA detector follows.
_HELPER_DEPTH = 3


@dataclass
class AttentionLayerInfo:
    """One attention layer found by :func:`find_attention_layers` (also ``litepatch.inspect``).

    Attributes:
        name: module path in the model (``"blocks.0.attn1"``).
        kind: ``"self"``, ``"cross"`` or ``"joint"`` (text+video in one sequence).
        heads, head_dim: 0 when they cannot be read from the module.
        module_class: the module's class name.
        reason: why it was found and classified so.
        sparse: whether litepatch makes it sparse (self and joint layers).
        text_layout: for joint layers, ``"first"``, ``"last"`` or ``"unknown"`` (both ends are text).
        single_stream: joint layer that sees text+video already concatenated, without
            ``encoder_hidden_states``; the text length comes from the top-level forward.
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


def _class_names(module: torch.nn.Module) -> list[str]:
    return [cls.__name__ for cls in type(module).__mro__]


def _is_diffusers_attention(module: torch.nn.Module) -> bool:
    for cls in type(module).__mro__:
        if cls.__name__ == "AttentionModuleMixin":
            return True
        if cls.__name__ == "Attention" and cls.__module__.startswith("diffusers."):
            return True
    return False


def _is_timm_style(module: torch.nn.Module) -> bool:
    name = type(module).__name__
    return (
        (name == "Attention" or name.endswith("SelfAttention"))
        and isinstance(getattr(module, "qkv", None), torch.nn.Module)
        and isinstance(getattr(module, "num_heads", None), int)
    )


def _method(cls: type, name: str):
    """The plain function behind ``cls.<name>`` (first in the MRO), or None for anything else."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            attr = klass.__dict__[name]
            if isinstance(attr, (staticmethod, classmethod)):
                attr = attr.__func__
            return attr if pyinspect.isfunction(attr) else None
    return None


def _self_calls(source: str) -> list[str]:
    """Names ``n`` of the ``self.n(...)`` calls in a method's source (``self``: its first parameter)."""
    try:
        tree = ast.parse(textwrap.dedent(source))
    except SyntaxError:
        return []
    function = next((n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    if function is None:
        return []
    params = function.args.posonlyargs + function.args.args
    if not params:
        return []
    self_name = params[0].arg
    return [
        node.func.attr
        for node in ast.walk(function)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == self_name
    ]


@functools.lru_cache(maxsize=512)
def _forward_calls_sdpa(cls: type) -> bool:
    """Whether ``cls.forward`` calls SDPA, itself or through ``self.<name>(...)`` methods of ``cls``.

    Methods are resolved through ``cls.__mro__`` (so a subclass's override is the one followed) and
    followed up to :data:`_HELPER_DEPTH` calls deep; each name is read once, so recursion ends.
    """
    seen: set[str] = set()
    names = ["forward"]
    for _ in range(_HELPER_DEPTH + 1):
        called: list[str] = []
        for name in names:
            if name in seen:
                continue
            seen.add(name)
            function = _method(cls, name)
            if function is None:
                continue
            try:
                source = pyinspect.getsource(function)
            except (OSError, TypeError):
                continue
            if _SDPA_NAME in source:
                return True
            called.extend(_self_calls(source))
        names = called
    return False


def _first_int(module: torch.nn.Module, names: tuple[str, ...]) -> int:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def _heads_and_dim(module: torch.nn.Module) -> tuple[int, int]:
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


def _processor_name(module: torch.nn.Module) -> str:
    processor = getattr(module, "processor", None)
    return type(processor).__name__ if processor is not None else ""


def text_layout_of(module: torch.nn.Module) -> str:
    """Where a joint layer's text tokens sit: ``"first"``, ``"last"`` or ``"unknown"``."""
    processor = _processor_name(module)
    for prefix, layout in TEXT_LAYOUT.items():
        if processor.startswith(prefix):
            return layout
    return "unknown"


def _cross_reason(module: torch.nn.Module, attr_name: str) -> str | None:
    explicit = getattr(module, "is_cross_attention", None)
    if isinstance(explicit, bool):
        return "is_cross_attention=True" if explicit else None
    query_dim = getattr(module, "query_dim", None)
    cross_dim = getattr(module, "cross_attention_dim", None)
    if isinstance(query_dim, int) and isinstance(cross_dim, int) and cross_dim != query_dim:
        return f"keys from another stream (cross_attention_dim={cross_dim} != query_dim={query_dim})"
    if _CROSS_NAME.search(attr_name):
        return f"attribute name {attr_name!r} marks cross-attention"
    if "cross" in type(module).__name__.lower():
        return f"class name {type(module).__name__} marks cross-attention"
    return None


def _has_added_kv(module: torch.nn.Module) -> bool:
    return getattr(module, "add_k_proj", None) is not None or getattr(module, "added_kv_proj_dim", None) is not None


def _classify(module: torch.nn.Module, name: str, parent: torch.nn.Module | None, detector: str) -> AttentionLayerInfo:
    heads, head_dim = _heads_and_dim(module)
    attr_name = name.rsplit(".", 1)[-1]
    cls = type(module).__name__
    cross = _cross_reason(module, attr_name)
    layout = "unknown"
    single = False
    if cross is not None:
        kind, why = "cross", cross
    elif _has_added_kv(module):
        kind, why = "joint", "added key/value projections for the text stream (add_k_proj)"
        layout = text_layout_of(module)
    elif _processor_name(module).startswith(_JOINT_PROCESSORS):
        kind, why = "joint", f"{_processor_name(module)} attends over text and video tokens together"
        layout = text_layout_of(module)
    elif parent is not None and "single" in type(parent).__name__.lower() and detector == "diffusers":
        kind, why = "joint", f"single-stream block {type(parent).__name__}: text and video already concatenated"
        layout, single = text_layout_of(module), True
    else:
        kind, why = "self", "queries and keys from the same tokens"
    reason = f"{detector}: {why}"
    if kind == "joint":
        reason += f"; text tokens {layout if layout != 'unknown' else 'at both ends (layout unknown)'}"
    return AttentionLayerInfo(
        name=name,
        kind=kind,
        heads=heads,
        head_dim=head_dim,
        module_class=cls,
        reason=reason,
        sparse=kind in ("self", "joint"),
        text_layout=layout,
        single_stream=single,
    )


def _detector(module: torch.nn.Module) -> str | None:
    if _is_diffusers_attention(module):
        return "diffusers"
    if _is_timm_style(module):
        return "timm-style"
    if _forward_calls_sdpa(type(module)):
        return "sdpa-call"
    return None


def find_attention_layers(model: torch.nn.Module) -> list[tuple[AttentionLayerInfo, torch.nn.Module]]:
    """Every attention layer of ``model`` with its module, in ``named_modules()`` order.

    Raises:
        TypeError: when ``model`` is not a ``torch.nn.Module``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    found: list[tuple[AttentionLayerInfo, torch.nn.Module]] = []
    parents: dict[str, torch.nn.Module] = {}
    taken: list[str] = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            parents[f"{name}.{child_name}" if name else child_name] = module
        if any(t == "" or name == t or name.startswith(t + ".") for t in taken):
            continue
        detector = _detector(module)
        if detector is None:
            continue
        taken.append(name)
        found.append((_classify(module, name, parents.get(name), detector), module))
    return found
