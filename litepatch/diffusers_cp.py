"""What litepatch reads of diffusers' context parallelism (``model.enable_parallelism``); its private names live here.

litepatch does not bring its own sequence parallelism into a diffusers model: it runs inside diffusers'. The patcher
intercepts ``torch.nn.functional.scaled_dot_product_attention`` beneath each patched attention module, so it sees
attention only where diffusers calls SDPA:

* **Ulysses** (``ContextParallelConfig(ulysses_degree=P)``) with the ``native`` attention backend works:
  ``TemplatedUlyssesAttention`` all-to-alls the sequence shards ``[B, S/P, H, D]`` into head shards
  ``[B, S, H/P, D]`` and calls the native forward op, which calls SDPA. Each rank runs LiteAttention over the full
  sequence for its ``H/P`` heads, with its own state per layer and branch: read lists per head equal the
  single-process run's (tests/unit/test_parallel_diffusers.py). Joint text+video sequences arrive as ``P`` shards
  laid end to end, each with its own text tokens: the must-compute ranges repeat per shard (:func:`ulysses_degree`).
* **Ring** (``ring_degree > 1``, alone or with Ulysses) runs dense: diffusers' ring template asks the backend's
  forward op for the log-sum-exp of every K/V chunk (``return_lse=True``). The ``native`` backend refuses that
  (``ValueError`` from diffusers, with or without litepatch); the backends that return it (cuDNN, flash) call their
  kernels below SDPA, where litepatch sees nothing, so every layer silently stays dense.
  :func:`dense_reason` names this, and :func:`litepatch.apply` and the first call warn.
* Any backend other than ``native`` under context parallelism runs dense for the same reason.

Importing this module never imports diffusers; the backend registry is read only when a model has a parallel config
(diffusers is imported then).
"""

from __future__ import annotations

import torch

# Backends whose context-parallel forward op calls torch.nn.functional.scaled_dot_product_attention.
SDPA_BACKENDS = ("native",)

SUPPORTED_PATH = (
    "use Ulysses (ContextParallelConfig(ulysses_degree=...)) with the 'native' attention backend, or call "
    "litepatch.parallel.ring_lite_attention in your own attention processor"
)


def context_parallel_config(module: torch.nn.Module):
    """The ``ContextParallelConfig`` diffusers recorded on ``module`` (a model or an attention module), or None."""
    config = getattr(module, "_parallel_config", None)
    if config is None:
        processor = getattr(module, "processor", None)
        config = getattr(processor, "_parallel_config", None)
    return getattr(config, "context_parallel_config", None)


def ulysses_degree(module: torch.nn.Module) -> int:
    """How many sequence shards one SDPA call of ``module`` sees laid end to end (1 without Ulysses)."""
    return _ulysses(context_parallel_config(module))


def ulysses_degree_of(parallel_config) -> int:
    """:func:`ulysses_degree` from the ``parallel_config`` diffusers passes to ``dispatch_attention_fn``."""
    return _ulysses(getattr(parallel_config, "context_parallel_config", None))


def _ulysses(cp) -> int:
    if cp is None or (getattr(cp, "ring_degree", 1) or 1) > 1:
        return 1
    return int(getattr(cp, "ulysses_degree", 1) or 1)


def _backend_name(module: torch.nn.Module) -> str | None:
    for sub in module.modules():
        processor = getattr(sub, "processor", None)
        if processor is None or not hasattr(processor, "_attention_backend"):
            continue
        backend = processor._attention_backend
        if backend is None:
            from diffusers.models.attention_dispatch import _AttentionBackendRegistry

            backend, _ = _AttentionBackendRegistry.get_active_backend()
        return str(getattr(backend, "value", backend))
    return None


def dense_reason(model: torch.nn.Module) -> str | None:
    """Why diffusers' context parallelism on ``model`` keeps every patched layer dense, or None when it does not."""
    cp = context_parallel_config(model)
    if cp is None:
        return None
    ring = getattr(cp, "ring_degree", 1) or 1
    if ring > 1:
        return (
            f"diffusers ring context parallelism (ring_degree={ring}) runs dense attention: its ring template asks "
            "the attention backend for each K/V chunk's log-sum-exp (return_lse=True), which the 'native' SDPA "
            "backend refuses and the cuDNN/flash backends compute in kernels litepatch does not intercept; "
            + SUPPORTED_PATH
        )
    backend = _backend_name(model)
    if backend is not None and backend not in SDPA_BACKENDS:
        return (
            f"diffusers context parallelism with the {backend!r} attention backend runs dense attention: only the "
            f"'native' backend reaches torch.nn.functional.scaled_dot_product_attention, which litepatch "
            f"intercepts; {SUPPORTED_PATH}"
        )
    return None


__all__ = ["SDPA_BACKENDS", "context_parallel_config", "dense_reason", "ulysses_degree", "ulysses_degree_of"]
