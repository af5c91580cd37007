"""What litepatch reads of diffusers' context parallelism (``model.enable_parallelism``); its private names live here.

litepatch does not bring its own sequence parallelism into a diffusers model: it runs inside diffusers'. Each patched
layer's processor proxy intercepts ``dispatch_attention_fn`` (:mod:`litepatch.adapters.diffusers`), so it sees the
``parallel_config`` diffusers passes with every self-attention call:

* **Ulysses** (``ContextParallelConfig(ulysses_degree=P)``) with the ``native`` attention backend: the dispatch runs as
  it is and its SDPA call beneath ``TemplatedUlyssesAttention`` is intercepted. That template all-to-alls the sequence
  shards ``[B, S/P, H, D]`` into head shards ``[B, S, H/P, D]``; each rank runs LiteAttention over the full sequence
  for its ``H/P`` heads, with its own state per layer and branch: read lists per head equal the single-process run's
  (tests/unit/test_parallel_diffusers.py). Joint text+video sequences arrive as ``P`` shards laid end to end, each
  with its own text tokens: the must-compute ranges repeat per shard (:func:`ulysses_degree`). Another backend runs
  its kernels below SDPA, where litepatch sees nothing: :func:`dense_reason` says so and ``apply`` warns.
* **Ring** (``ring_degree > 1``, alone or with Ulysses): diffusers' ring template asks a per-chunk *forward op* for
  each K/V chunk's output and log-sum-exp and merges them by LSE. litepatch calls that template itself with a forward
  op of its own (:func:`run_ring_template`), whatever the attention backend: every (query shard, K/V chunk) call is
  one LiteAttention call with its own state (:mod:`litepatch.ring_diffusers`). Dense calls keep the chosen
  backend's ring path, except for ``native``, whose forward op refuses ``return_lse`` (diffusers raises, patched or
  not): there the same template runs with an exact dense op that returns the LSE
  (:func:`litepatch.parallel.sdpa_with_lse`). ``ring_anything=True`` (uneven chunks, another template) runs dense,
  said once.

The private names (diffusers 0.42.1, ``diffusers/models/attention_dispatch.py`` and ``_modeling_parallel.py``):

* ``_templated_context_parallel_attention(q, k, v, ..., forward_op=, backward_op=, _parallel_config=)``, the entry
  point of the ring / unified (Ulysses x ring) templates, and the contract of its ``forward_op``: called as
  ``forward_op(ctx, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse=True, _save_ctx=,
  _parallel_config=)`` once per K/V chunk, first the rank's own chunk then those of ring ranks ``r + 1, r + 2, ...``
  (``TemplatedRingAttention.forward``), returning ``(out [B, S, H, D], lse [B, S, H])``;
* ``ContextParallelConfig._ring_local_rank`` and ``_ulysses_local_rank`` (set by ``setup``);
* ``_AttentionBackendRegistry.get_active_backend()`` for a layer without a backend of its own.

:func:`ring_support_problem` checks they exist and names the installed diffusers version when they do not. Importing
this module never imports diffusers; it is imported when a model has a parallel config.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Backends whose context-parallel forward op calls torch.nn.functional.scaled_dot_product_attention.
SDPA_BACKENDS = ("native",)
# Backends whose context-parallel forward op refuses return_lse=True, so diffusers' ring template cannot use them.
LSE_LESS_BACKENDS = ("native",)
TESTED_DIFFUSERS = "0.42.1"

SUPPORTED_PATH = (
    "use Ulysses (ContextParallelConfig(ulysses_degree=...)) with the 'native' attention backend, or ring "
    "(ring_degree=...), which litepatch runs sparse with any backend"
)
_RING_CONFIG_NAMES = ("ring_degree", "ulysses_degree", "_ring_local_rank", "_ulysses_local_rank")


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


def ring_degree_of(parallel_config) -> int:
    """The ring degree of the ``parallel_config`` diffusers passes to ``dispatch_attention_fn`` (1: no ring)."""
    cp = getattr(parallel_config, "context_parallel_config", None)
    return int(getattr(cp, "ring_degree", 1) or 1) if cp is not None else 1


def _ulysses(cp) -> int:
    if cp is None or (getattr(cp, "ring_degree", 1) or 1) > 1:
        return 1
    return int(getattr(cp, "ulysses_degree", 1) or 1)


def _diffusers_version() -> str:
    try:
        import diffusers

        return str(diffusers.__version__)
    except Exception as err:  # noqa: BLE001 (reported, not hidden)
        return f"(not importable: {err})"


def _ring_template():
    from diffusers.models import attention_dispatch

    return getattr(attention_dispatch, "_templated_context_parallel_attention", None)


def ring_support_problem(parallel_config=None) -> str | None:
    """Why litepatch cannot run sparse ring attention with the installed diffusers (private names missing), or None.

    >>> ring_support_problem(model._parallel_config)   # None with diffusers 0.42.1
    """
    missing = [] if _ring_template() is not None else ["attention_dispatch._templated_context_parallel_attention"]
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is not None:
        missing += [f"ContextParallelConfig.{name}" for name in _RING_CONFIG_NAMES if not hasattr(cp, name)]
    if not missing:
        return None
    return (
        f"litepatch's sparse ring attention needs diffusers' private {', '.join(missing)}, which diffusers "
        f"{_diffusers_version()} does not have (litepatch is tested with diffusers {TESTED_DIFFUSERS}); pin "
        f"diffusers=={TESTED_DIFFUSERS} or use Ulysses context parallelism"
    )


@dataclass(frozen=True)
class RingLayout:
    """Where this rank sits in diffusers' ring (and Ulysses) mesh.

    Attributes:
        ring_degree / ring_rank: ranks in the ring and this rank's place (its query shard index).
        ulysses_degree / ulysses_rank: the Ulysses group inside each ring rank (1 / 0 for pure ring): the forward op
            sees that many rank shards laid end to end, for ``H / ulysses_degree`` heads.
        ring_anything: diffusers' uneven-chunk ring template (not supported sparse).
    """

    ring_degree: int
    ring_rank: int
    ulysses_degree: int
    ulysses_rank: int
    ring_anything: bool

    @classmethod
    def of(cls, parallel_config) -> RingLayout:
        """The layout of a diffusers ``ParallelConfig``; ``RuntimeError`` naming the diffusers version when the
        private names it reads are missing."""
        problem = ring_support_problem(parallel_config)
        if problem is not None:
            raise RuntimeError(problem)
        cp = parallel_config.context_parallel_config
        if cp._ring_local_rank is None:
            raise RuntimeError("diffusers' ContextParallelConfig was not set up (call model.enable_parallelism)")
        return cls(int(cp.ring_degree), int(cp._ring_local_rank), int(cp.ulysses_degree or 1),
                   int(cp._ulysses_local_rank or 0), bool(getattr(cp, "ring_anything", False)))

    def chunk_of(self, step: int) -> int:
        """The origin ring rank of the K/V chunk the template hands to its forward op at ``step`` (0-based)."""
        return (self.ring_rank + step) % self.ring_degree


ChunkFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _no_backward(ctx, grad_out, *args, **kwargs):
    raise NotImplementedError("litepatch's ring forward op has no backward (inference only)")


def run_ring_template(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attend_chunk: ChunkFn,
    *,
    scale: float | None,
    parallel_config,
) -> torch.Tensor:
    """diffusers' ring (or Ulysses x ring) template with ``attend_chunk`` as the per-chunk forward op.

    Args:
        query, key, value: this rank's shard ``[B, S/P, H, D]``, as ``dispatch_attention_fn`` received them.
        attend_chunk: ``attend_chunk(chunk, q, k, v) -> (out [B, Sq, Hl, D], lse [B, Hl, Sq])`` for the K/V chunk of
            ring rank ``chunk`` (the origin rank, not the rotation step). Under Ulysses x ring ``q, k, v`` are the
            Ulysses group's shards laid end to end, for its ``Hl = H / ulysses_degree`` heads.
        scale: the softmax scale (None: ``1 / sqrt(D)``).
        parallel_config: the ``ParallelConfig`` diffusers passed to the dispatch.

    Returns the merged output ``[B, S/P, H, D]``. ``RuntimeError`` when the template does not call the op once per
    chunk (another diffusers version), since the per-chunk states would then be misassigned.

    >>> out = run_ring_template(q, k, v, lambda c, q, k, v: sdpa_with_lse(q, k, v), scale=None,
    ...                         parallel_config=parallel_config)
    """
    layout = RingLayout.of(parallel_config)
    steps = itertools.count()
    calls = []

    def forward_op(ctx, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                   return_lse=False, _save_ctx=True, _parallel_config=None):
        chunk = layout.chunk_of(next(steps))
        calls.append(chunk)
        out, lse = attend_chunk(chunk, q, k, v)
        return out, lse.transpose(1, 2)  # the template merges LSE as [B, S, H]

    out = _ring_template()(
        query, key, value, None, 0.0, False, scale, False, False,
        forward_op=forward_op, backward_op=_no_backward, _parallel_config=parallel_config,
    )
    if sorted(calls) != list(range(layout.ring_degree)):
        raise RuntimeError(
            f"diffusers {_diffusers_version()}'s ring template called the forward op for K/V chunks {calls} with "
            f"ring_degree={layout.ring_degree}; litepatch needs one call per chunk (tested with diffusers "
            f"{TESTED_DIFFUSERS})"
        )
    return out


def backend_name(module: torch.nn.Module) -> str | None:
    """The attention backend of the first processor under ``module`` that has one (its own or the active one)."""
    for sub in module.modules():
        processor = getattr(sub, "processor", None)
        if processor is None or not hasattr(processor, "_attention_backend"):
            continue
        return dispatch_backend_name(processor._attention_backend)
    return None


def dispatch_backend_name(backend) -> str:
    """The name of the ``backend`` argument of ``dispatch_attention_fn`` (None: diffusers' active backend)."""
    if backend is None:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        backend, _ = _AttentionBackendRegistry.get_active_backend()
    return str(getattr(backend, "value", backend))


def dense_reason(model: torch.nn.Module) -> str | None:
    """Why diffusers' context parallelism on ``model`` keeps every patched layer dense, or None when it does not.

    >>> dense_reason(model)     # Ulysses with the 'flash' backend
    "diffusers context parallelism with the 'flash' attention backend runs dense attention: ..."
    """
    cp = context_parallel_config(model)
    if cp is None:
        return None
    ring = getattr(cp, "ring_degree", 1) or 1
    if ring > 1:
        if getattr(cp, "ring_anything", False):
            return (
                f"diffusers ring context parallelism with ring_anything=True (ring_degree={ring}) runs dense "
                "attention: its uneven-chunk template is not supported; use equal shards (ring_anything=False)"
            )
        return ring_support_problem(getattr(model, "_parallel_config", None))
    backend = backend_name(model)
    if backend is not None and backend not in SDPA_BACKENDS:
        return (
            f"diffusers context parallelism with the {backend!r} attention backend runs dense attention: only the "
            f"'native' backend reaches torch.nn.functional.scaled_dot_product_attention, which litepatch "
            f"intercepts; {SUPPORTED_PATH}"
        )
    return None


__all__ = [
    "LSE_LESS_BACKENDS", "SDPA_BACKENDS", "RingLayout", "backend_name", "context_parallel_config", "dense_reason",
    "dispatch_backend_name", "ring_degree_of", "ring_support_problem", "run_ring_template", "ulysses_degree",
    "ulysses_degree_of",
]
