"""diffusers attention: ``AttentionModuleMixin`` classes (Wan, Flux, LTX, Mochi, HiDream, ...) and ``Attention``.

* **Find**: a module whose classes include ``AttentionModuleMixin`` or diffusers' ``Attention``.
* **Classify**: cross when ``is_cross_attention``, ``cross_attention_dim != query_dim`` or the attribute name
  says so; joint when the module has added key/value projections for the text stream (``add_k_proj``), when
  its processor concatenates text and video itself (CogVideoX, CogView3), or when it sits in a single-stream
  block (Flux, HunyuanVideo: text and video concatenated before the layer); ``"not applicable"`` when its
  processor computes linear (non-softmax) attention (Sana, SanaVideo). Each call is classified again from
  its shapes (:func:`litepatch.adapters.base.call_kind`).
* **Text ranges**: where the text tokens sit in a joint sequence (:data:`TEXT_LAYOUT`, by processor class
  name; an unknown processor marks both ends as text, which is always safe).
* **Key masks**: the mask the processor passes to its attention call; boolean key-padding masks
  (HunyuanVideo, Qwen-Image) are sparse, other masks run the model's own attention.
* **Intercept**: the layer's processor is replaced by a per-layer proxy that calls a copy of the processor's
  ``__call__`` whose ``dispatch_attention_fn`` / ``F.scaled_dot_product_attention`` name the layer's
  interceptor (module-level helpers it calls are copied the same way). Every diffusers attention backend
  (``set_attention_backend("flash" | "sage" | "flex" | ...)``) goes through ``dispatch_attention_fn``, so
  calls litepatch takes run LiteAttention and the others (warm-up, fallbacks) run the chosen backend.
  Under diffusers' Ulysses context parallelism the dispatch runs as it is and its SDPA call (``native``
  backend) is intercepted beneath it; under ring context parallelism :mod:`litepatch.ring_diffusers` runs the
  call per (query shard, K/V chunk) in diffusers' ring template.

Importing this module never imports diffusers: classes are recognised by name and module.
"""

from __future__ import annotations

import functools
import re
import types

import torch

from ..diffusers_cp import ulysses_degree_of
from ..ring_diffusers import ring_call
from .base import (
    INTERLEAVED,
    SDPA_NAME,
    Adapter,
    AttentionCall,
    AttentionLayerInfo,
    SDPAMode,
    code_names,
    functional_with,
    heads_and_dim,
    mask_problem,
    rebind,
    release,
    sdpa_interceptor,
    TokenCounter,
)

# Processor class-name prefix -> where the text tokens sit in the joint sequence ("first" / "last").
TEXT_LAYOUT: dict[str, str] = {
    "CogVideoXAttnProcessor": "first",
    "FusedCogVideoXAttnProcessor": "first",
    "FluxAttnProcessor": "first",
    "FluxIPAdapterAttnProcessor": "first",
    "Flux2AttnProcessor": "first",
    "Flux2ParallelSelfAttnProcessor": "first",
    "ChromaAttnProcessor": "first",
    "JointAttnProcessor": "last",
    "FusedJointAttnProcessor": "last",
    "HunyuanVideoAttnProcessor": "last",
    "HunyuanVideoFramepackAttnProcessor": "last",
    "CogView3PlusAttnProcessor": "first",
    "CogView4AttnProcessor": "first",
    "MochiAttnProcessor": "last",
    "QwenDoubleStreamAttnProcessor": "first",
    "AuraFlowAttnProcessor": "first",
    "HiDreamAttnProcessor": "last",
    "Lumina2AttnProcessor": "first",
    # Qwen-Image 2.1 scatters the image latents into the slots of its vision-language sequence: text and image
    # tokens alternate, so the text is never a prefix or suffix (litepatch keeps these layers dense).
    "QwenImage21AttnProcessor": INTERLEAVED,
    "QwenImage21FlexAttnProcessor": INTERLEAVED,
}

# Processors that concatenate text and video themselves, with the module's own projections.
JOINT_PROCESSORS = ("CogVideoXAttnProcessor", "FusedCogVideoXAttnProcessor", "CogView3PlusAttnProcessor",
                    "CogView4AttnProcessor")
# Layers of one sequence that already holds text and image tokens (no encoder_hidden_states reaches the layer),
# by processor class name prefix -> pattern of the layer's name in the model.
SINGLE_STREAM_LAYERS = {
    "Lumina2AttnProcessor": r"^layers\.\d+\.attn$",
    # Z-Image: the refiners see image or caption tokens alone, the main layers their concatenation (image first,
    # caption last; caption first in omni mode); the caption length is not an argument of the top-level call
    # (a list of tensors), so these layers stay dense, saying so, rather than leave the caption unprotected.
    "ZSingleStreamAttnProcessor": r"^layers\.\d+\.attention$",
    # Qwen-Image 2.1: one vision-language sequence of text and image tokens
    "QwenImage21AttnProcessor": r"^transformer_blocks\.\d+\.attn$",
    "QwenImage21FlexAttnProcessor": r"^transformer_blocks\.\d+\.attn$",
}
# Attention whose processor computes no softmax over keys: LiteAttention does not apply.
LINEAR_PROCESSOR_WORDS = ("Linear", "Multiscale")
# The fix named when a processor computes attention where litepatch cannot route it.
PROCESSOR_FIX = ("give the layer an SDPA processor (e.g. module.set_processor(AttnProcessor2_0()) or "
                 "model.set_default_attn_processor())")
_CROSS_WORDS = ("attn2", "cross", "xattn")
# A diffusers pipeline's denoisers, patched together (Wan2.2's second expert gets the prefix "transformer_2.").
PIPELINE_DENOISERS = ("transformer", "transformer_2")


def pipeline_roots(pipeline) -> list[tuple[str, torch.nn.Module]]:
    """(name prefix, module) of a pipeline's denoisers; [] when ``pipeline`` has no ``.transformer``."""
    roots = []
    for i, attr in enumerate(PIPELINE_DENOISERS):
        module = getattr(pipeline, attr, None)
        if isinstance(module, torch.nn.Module):
            roots.append(("" if i == 0 else f"{attr}.", module))
        elif i == 0:
            return []
    return roots


def is_diffusers_attention(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a diffusers attention module: ``AttentionModuleMixin``, ``Attention``, or a diffusers
    module dispatching to a processor that calls attention (``MochiAttention``)."""
    for cls in type(module).__mro__:
        if cls.__name__ == "AttentionModuleMixin":
            return True
        if cls.__name__ == "Attention" and cls.__module__.startswith("diffusers."):
            return True
    if not type(module).__module__.startswith("diffusers."):
        return False
    processor = module.__dict__.get("processor", None)
    return processor is not None and reaches_attention(getattr(type(processor), "__call__", None))


def _is_dispatch(value) -> bool:
    return (isinstance(value, types.FunctionType) and value.__name__ == "dispatch_attention_fn"
            and value.__module__.startswith("diffusers."))


def _route(function, sdpa, dispatch, depth: int = 2):
    """A copy of ``function`` whose attention calls reach ``sdpa``/``dispatch``; None when it makes none that a
    global name shows (module-level helper functions are followed ``depth`` deep and copied too)."""
    if not isinstance(function, types.FunctionType):
        return None
    replacements = {}
    names = code_names(function)
    for name in names:
        value = function.__globals__.get(name, None)
        if value is torch.nn.functional and SDPA_NAME in names:
            replacements[name] = functional_with(sdpa)
        elif value is torch.nn.functional.scaled_dot_product_attention:
            replacements[name] = sdpa
        elif _is_dispatch(value):
            replacements[name] = dispatch
        elif depth > 0 and isinstance(value, types.FunctionType) and value.__module__.startswith("diffusers."):
            routed = _route(value, sdpa, dispatch, depth - 1)
            if routed is not None:
                replacements[name] = routed
    return rebind(function, replacements) if replacements else None


def reaches_attention(function, depth: int = 2) -> bool:
    """Whether ``function`` calls SDPA or ``dispatch_attention_fn`` (itself or through module-level helpers)."""
    if not isinstance(function, types.FunctionType):
        return False
    names = code_names(function)
    for name in names:
        value = function.__globals__.get(name, None)
        if value is torch.nn.functional.scaled_dot_product_attention:
            return True
        if value is torch.nn.functional and SDPA_NAME in names:
            return True
        if _is_dispatch(value):
            return True
        if depth > 0 and isinstance(value, types.FunctionType) and value.__module__.startswith("diffusers."):
            if reaches_attention(value, depth - 1):
                return True
    return False


def _processor(module: torch.nn.Module):
    processor = module.__dict__.get("processor", None)
    if processor is None:
        processor = getattr(module, "processor", None)
    return getattr(processor, "_litepatch_inner", processor)


def processor_name(module: torch.nn.Module) -> str:
    processor = _processor(module)
    return type(processor).__name__ if processor is not None else ""


def text_layout_of(module: torch.nn.Module) -> str:
    """Where a joint layer's text tokens sit: ``"first"``, ``"last"``, ``"interleaved"`` or ``"unknown"``."""
    name = processor_name(module)
    for prefix, layout in TEXT_LAYOUT.items():
        if name.startswith(prefix):
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
    if any(word in attr_name.lower() for word in _CROSS_WORDS):
        return f"attribute name {attr_name!r} marks cross-attention"
    if "cross" in type(module).__name__.lower():
        return f"class name {type(module).__name__} marks cross-attention"
    return None


def _has_added_kv(module: torch.nn.Module) -> bool:
    return getattr(module, "add_k_proj", None) is not None or getattr(module, "added_kv_proj_dim", None) is not None


def _kind(module: torch.nn.Module, name: str, parent) -> tuple[str, str, bool]:
    """(kind, why, single_stream) of a diffusers attention module."""
    attr_name = name.rsplit(".", 1)[-1]
    processor = processor_name(module)
    call = getattr(type(_processor(module)), "__call__", None)
    if processor and not reaches_attention(call) and any(w in processor for w in LINEAR_PROCESSOR_WORDS):
        why = f"{processor} computes linear attention (no softmax): LiteAttention does not apply"
        return "not applicable", why, False
    cross = _cross_reason(module, attr_name)
    if cross is not None:
        return "cross", cross, False
    if _has_added_kv(module):
        return "joint", "added key/value projections for the text stream (add_k_proj)", False
    if processor.startswith(JOINT_PROCESSORS):
        return "joint", f"{processor} attends over text and video tokens together", False
    if processor.startswith("HiDreamAttnProcessor") and getattr(module, "single", None) is False:
        return "joint", f"{processor} of a double-stream block concatenates image and text tokens", False
    for prefix, pattern in SINGLE_STREAM_LAYERS.items():
        if processor.startswith(prefix) and re.match(pattern, name):
            return "joint", f"{processor} in a unified text+image layer ({pattern})", True
    if parent is not None and "single" in type(parent).__name__.lower():
        return "joint", f"single-stream block {type(parent).__name__}: text and video already concatenated", True
    return "self", "queries and keys from the same tokens", False


def _out_of_reach(module: torch.nn.Module) -> str:
    processor = _processor(module)
    if processor is None:
        return f"{type(module).__name__} has no attention processor; {PROCESSOR_FIX}"
    if isinstance(processor, torch.nn.Module):
        return ""  # reached through the module's forward (TorchFunctionMode over it)
    if not reaches_attention(getattr(type(processor), "__call__", None)):
        return (f"processor {type(processor).__name__} computes attention without scaled_dot_product_attention or "
                f"dispatch_attention_fn, which litepatch routes; {PROCESSOR_FIX}")
    return ""


class DiffusersAdapter(Adapter):
    """diffusers attention modules and their processors (see the module docstring)."""

    name = "diffusers"

    def matches(self, module: torch.nn.Module, name: str) -> bool:
        return is_diffusers_attention(module)

    def describe(self, module: torch.nn.Module, name: str, parent) -> AttentionLayerInfo:
        heads, head_dim = heads_and_dim(module)
        kind, why, single = _kind(module, name, parent)
        layout = text_layout_of(module) if kind == "joint" else "unknown"
        reason = f"{self.name}: {why}"
        if kind == "joint":
            reason += f"; text tokens {layout if layout != 'unknown' else 'at both ends (layout unknown)'}"
        reach = _out_of_reach(module) if kind in ("self", "joint") else ""
        return AttentionLayerInfo(name, kind, heads, head_dim, type(module).__name__, reason,
                                  kind in ("self", "joint") and not reach and layout != INTERLEAVED, layout, single,
                                  self.name, reach)

    def install(self, module: torch.nn.Module, layer):
        processor = _processor(module)
        if processor is None or isinstance(processor, torch.nn.Module) or "processor" in module._modules:
            from .base import install_forward_interception

            return install_forward_interception(module, layer, methods=["forward"])
        return _install_processor_proxy(module, processor, layer)


def _install_processor_proxy(module: torch.nn.Module, processor, layer):
    cell = {"hidden_tokens": None, "encoder_tokens": None, "shards": 1}
    sdpa = sdpa_interceptor(layer, lambda: cell)
    from diffusers.models.attention_dispatch import dispatch_attention_fn as original_dispatch

    dispatch = _dispatch_interceptor(layer, cell, sdpa, original_dispatch)
    call = type(processor).__call__
    routed = _route(call, sdpa, dispatch)
    counter = TokenCounter(call, skip=2)
    if routed is None:
        layer.interception = f"torch-function-mode over {type(processor).__name__}"

        def routed(inner, *args, **kwargs):
            with SDPAMode(sdpa):
                return call(inner, *args, **kwargs)
    else:
        layer.interception = f"{type(processor).__name__}.__call__ with routed attention"

    def __call__(self, attn, *args, **kwargs):
        cell["hidden_tokens"], cell["encoder_tokens"] = counter(args, kwargs)
        layer.entered = True
        return routed(self._litepatch_inner, attn, *args, **kwargs)

    functools.update_wrapper(__call__, call)
    proxy_cls = type(f"LiteProxy{type(processor).__name__}", (ProcessorProxy,), {"__call__": __call__})
    proxy = proxy_cls(processor)
    previous = module.__dict__.get("processor", _MISSING)
    module.__dict__["processor"] = proxy

    def undo() -> None:
        release(routed)
        if module.__dict__.get("processor") is proxy:
            if previous is _MISSING:
                module.__dict__.pop("processor", None)
            else:
                module.__dict__["processor"] = previous

    layer.installed = lambda: module.__dict__.get("processor") is proxy
    return undo


_MISSING = object()


class ProcessorProxy:
    """Stands in for a layer's processor: calls its routed ``__call__``; every attribute is the processor's."""

    def __init__(self, inner):
        object.__setattr__(self, "_litepatch_inner", inner)

    def __getattr__(self, name):
        if name == "_litepatch_inner":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._litepatch_inner, name)

    def __setattr__(self, name, value):
        setattr(self._litepatch_inner, name, value)

    def __reduce_ex__(self, protocol):
        raise TypeError("a litepatch-patched attention processor cannot be pickled; call handle.remove() first")

    def __deepcopy__(self, memo):
        import copy

        return copy.deepcopy(self._litepatch_inner, memo)


def _dispatch_interceptor(layer, cell: dict, sdpa, original):
    """A ``dispatch_attention_fn`` replacement for one layer (``[B, S, H, D]`` inputs, any diffusers backend)."""

    def dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                              enable_gqa=False, attention_kwargs=None, *, backend=None, parallel_config=None):
        if (attn_mask is None and parallel_config is None and not torch.compiler.is_compiling()
                and _dispatch_problem(query, key, dropout_p, is_causal, enable_gqa, attention_kwargs) is None):
            out = layer.attend_again(query, key, value, scale, cell["hidden_tokens"], cell["encoder_tokens"])
            if out is not None:  # the layer's last sparse call again (LayerPatch.attend_again)
                return out
        ring = None
        if parallel_config is not None:
            args = (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, attention_kwargs)
            ring = ring_call(original, parallel_config, backend, args)  # ring CP: litepatch.ring_diffusers runs it
            if ring is None:  # Ulysses: intercept the SDPA call beneath the template
                cell["shards"] = ulysses_degree_of(parallel_config)
                with SDPAMode(sdpa):
                    return original(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                    attention_kwargs, backend=backend, parallel_config=parallel_config)
        key_mask, problem = mask_problem(attn_mask, query.shape[0], key.shape[1])
        if problem is None:
            problem = _dispatch_problem(query, key, dropout_p, is_causal, enable_gqa, attention_kwargs)
        call = AttentionCall(query, key, value, scale, key_mask, problem, cell["hidden_tokens"],
                             cell["encoder_tokens"], 1, ring)
        out = layer.attend(call)
        if out is None:
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, attention_kwargs,
                            backend=backend, parallel_config=parallel_config)
        return out

    return dispatch_attention_fn


def _dispatch_problem(query, key, dropout_p, is_causal, enable_gqa, attention_kwargs) -> str | None:
    if not (isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and query.dim() == key.dim() == 4):
        return "inputs are not [batch, seq, heads, head_dim] tensors"
    if is_causal:
        return "is_causal=True"
    if dropout_p and float(dropout_p) > 0.0:
        return f"dropout_p={dropout_p}"
    if enable_gqa or key.shape[2] != query.shape[2]:
        return f"grouped K/V heads ({query.shape[2]} query heads, {key.shape[2]} key heads)"
    if attention_kwargs:
        return f"backend-specific attention_kwargs {sorted(attention_kwargs)}"
    return None
