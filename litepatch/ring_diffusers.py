"""Sparse ring attention inside diffusers' context parallelism (``ContextParallelConfig(ring_degree=P)``).

A patched layer's ``dispatch_attention_fn`` interceptor (:mod:`litepatch.adapters.diffusers`) gets every
self-attention call diffusers makes with a ring ``parallel_config`` and hands it to the layer as an
:class:`~litepatch.adapters.base.AttentionCall` whose ``ring`` is a :class:`RingCall`.
:meth:`litepatch.layer_patch.LayerPatch.attend` decides the call as always (warm-up, dense layer, refusal, which tokens are
text) and then lets the :class:`RingCall` run it:

* **sparse**: diffusers' own ring template (:func:`litepatch.diffusers_cp.run_ring_template`: all-gather of the K/V
  chunks, LSE merge, and the Ulysses all-to-all around it under Ulysses x ring) with a forward op that runs one
  :func:`~litepatch.kernels.lite_attention` per (query shard, K/V chunk), returning its LSE. Each pair has its own
  :class:`~litepatch.kernels.SkipState`, keyed :class:`~litepatch.parallel.ChunkKey` ``(branch, shard, chunk)``
  with ``shard`` the ring rank and ``chunk`` the K/V chunk's origin ring rank (not the rotation step), so the lists
  equal :func:`~litepatch.parallel.chunked_lite_attention`'s for the same shard and chunk. Text ranges of joint
  attention are mapped into each chunk's local coordinates (:func:`~litepatch.parallel.shard_ranges`). Every chunk
  call is one stats record.
* **dense** (warm-up, a dense layer, ``threshold=-inf``, a call litepatch refuses): the chosen attention backend's
  ring path (``dispatch_attention_fn`` as diffusers runs it); for the ``native`` backend, whose forward op cannot
  return the LSE the ring needs, the same template with an exact dense op (:func:`~litepatch.parallel.sdpa_with_lse`).
  Every chunk is one dense stats record.

Attention masks are refused under ring (diffusers' ring template applies the local key mask to every K/V chunk), as
are dropout, ``is_causal``, grouped K/V heads, autograd and ``ring_anything=True``: those calls run the backend's
own ring path, and the layer warns once per reason.

Example (what a user writes; everything above happens inside):
    >>> model.enable_parallelism(config=ContextParallelConfig(ring_degree=2))
    >>> handle = litepatch.apply(model, threshold=-6.0, warmup_steps=2)
    >>> out = model(**inputs)
    >>> sorted(handle.skip_states()["blocks.0.attn1"])    # on ring rank 0
    [ChunkKey(branch=0, shard=0, chunk=0), ChunkKey(branch=0, shard=0, chunk=1)]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from litepatch.diffusers_cp import LSE_LESS_BACKENDS, RingLayout, dispatch_backend_name, run_ring_template
from litepatch.kernels import lite_attention
from litepatch.parallel import ChunkKey, sdpa_with_lse, shard_ranges

Ranges = list[tuple[int, int]]

__all__ = ["RingCall", "ring_call"]


def ring_call(original: Callable, parallel_config, backend, args: tuple) -> RingCall | None:
    """The :class:`RingCall` of one ``dispatch_attention_fn`` call, or None when ``parallel_config`` has no ring.

    ``args`` are the dispatch's ``(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
    attention_kwargs)``; ``original`` is diffusers' ``dispatch_attention_fn``.
    """
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None or int(getattr(cp, "ring_degree", 1) or 1) <= 1:
        return None
    return RingCall(original, parallel_config, backend, args)


class RingCall:
    """Runs one ring self-attention call of a patched layer, chunk by chunk (see the module docstring).

    Created by the dispatch interceptor, called by :meth:`litepatch.layer_patch.LayerPatch.attend` as
    ``ring(layer, call, plan, reason, must)`` once it has decided the call: ``reason`` is why it must be dense
    (None: sparse if the plan has a state), ``must`` the text token ranges of this rank's shard.
    """

    def __init__(self, original: Callable, parallel_config, backend, args: tuple):
        self.original = original
        self.parallel_config = parallel_config
        self.backend = backend
        self.args = args
        self.layout = RingLayout.of(parallel_config)

    # ---------------------------------------------------------------------------------------- the decision
    def problem(self, call) -> str | None:
        """What litepatch cannot take under ring beyond what ``LayerPatch`` refuses anyway."""
        attn_mask = self.args[3]
        if attn_mask is not None:
            return ("an attention mask under ring context parallelism (diffusers' ring template applies the local "
                    "key mask to every K/V chunk)")
        if self.layout.ring_anything:
            return "ring_anything=True (uneven K/V chunks) is not supported sparse"
        return None

    def __call__(self, layer, call, plan, reason: str | None, must: Ranges) -> torch.Tensor:
        if plan.state is not None and not plan.state.initialized and layer.states.get(plan.branch) is plan.state:
            del layer.states[plan.branch]  # made by the pre-hook for an unchunked call; the ring keeps per-chunk ones
        reason = reason or self.problem(call)
        if reason is not None:
            layer._warn(reason)
            return self._dense(layer, call, plan, reason)
        if plan.state is None:  # warm-up, a dense layer, threshold -inf (the plan's dense_reason says which)
            return self._dense(layer, call, plan, "")
        return self._sparse(layer, call, plan, must)

    # -------------------------------------------------------------------------------------------- sparse
    def _sparse(self, layer, call, plan, must: Ranges) -> torch.Tensor:
        layout = self.layout
        shard = layout.ring_rank
        plans = [layer.make_plan(layer.call_index, chunk=(shard, c)) for c in range(layout.ring_degree)]
        local = call.q.shape[1]
        # the whole sequence is every rank's shard laid end to end, each with its own text tokens
        shards = layout.ring_degree * layout.ulysses_degree
        must_global = [(lo + r * local, hi + r * local) for r in range(shards) for lo, hi in must]
        order, backend = layer.runtime.recipe.order, layer.runtime.backend

        def attend_chunk(chunk: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
            if layer.last_call is not None:  # the previous chunk's record
                layer.flush()
            chunk_plan = plans[chunk]
            seq_q, seq_k = q.shape[1], k.shape[1]
            must_q = shard_ranges(must_global, shard * seq_q, seq_q)
            must_k = shard_ranges(must_global, chunk * seq_k, seq_k)
            out, lse = lite_attention(
                q, k, v, chunk_plan.state, threshold=chunk_plan.threshold, softmax_scale=call.scale,
                return_lse=True, order=order, must_compute_queries=must_q or None,
                must_compute_keys=must_k or None, backend=backend,
            )
            layer.last_call = (chunk_plan, "", 0)
            return out, lse

        return run_ring_template(call.q, call.k, call.v, attend_chunk, scale=call.scale,
                                 parallel_config=self.parallel_config)

    # --------------------------------------------------------------------------------------------- dense
    def _dense(self, layer, call, plan, reason: str) -> torch.Tensor:
        self._record_dense(layer, call, plan, reason)
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, attention_kwargs = self.args
        plain = (attn_mask is None and not attention_kwargs and not is_causal and not enable_gqa
                 and not (dropout_p and float(dropout_p) > 0.0) and not self.layout.ring_anything
                 and not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))))
        if not plain or dispatch_backend_name(self.backend) not in LSE_LESS_BACKENDS:
            return self.original(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                 attention_kwargs, backend=self.backend, parallel_config=self.parallel_config)
        return run_ring_template(query, key, value, lambda chunk, q, k, v: sdpa_with_lse(q, k, v, scale),
                                 scale=scale, parallel_config=self.parallel_config)

    def _record_dense(self, layer, call, plan, reason: str) -> None:
        """One dense record per chunk call (tiles of this rank's query shard against one K/V chunk)."""
        q, k = call.q, call.k
        if q.dim() != 4 or k.dim() != 4:
            total = 0
        else:
            u = self.layout.ulysses_degree
            tiles = layer._tiles_of(q, k.shape[1] * u, False)
            heads = q.shape[2] // u if q.shape[2] % u == 0 else q.shape[2]
            total = (q.shape[0] * heads * -(-q.shape[1] * u // tiles.block_m)
                     * -(-k.shape[1] * u // tiles.block_n))
        shard = self.layout.ring_rank
        for chunk in range(self.layout.ring_degree):
            if layer.last_call is not None:
                layer.flush()
            chunk_plan = dataclasses.replace(plan, branch=ChunkKey(plan.branch, shard, chunk))
            layer.last_call = (chunk_plan, reason, total)
