"""A patched layer's attention call inside ``torch.compile``: one opaque custom op that makes the call's plan when it
runs, not when it is traced (DESIGN §3).

The graph holds ``litepatch::layer_attention(q, k, v, key_mask, layer, scale, must)``; its body runs at run time
in eager code: it settles the forward's pending GPU timestep (:class:`~litepatch.context.PendingTimestep`, at the
forward's first attention call, as in eager forwards), makes the layer's plan, and runs the dense kernel
(flash-attn-4 where it runs, else SDPA) or LiteAttention on the layer's skip state. So a compiled patched model:

* adds no host-device sync per forward (a traced call that read the plan had to have it before the forward, hence
  read the GPU timestep at the forward's start, which waits for the previous forward: 30 syncs per 25-step
  generation of the video demo, against 5 eager);
* runs its dense steps on the fastest dense kernel (the traced model's own SDPA was the only one it could trace);
* compiles one graph per form of call, whatever the step, branch, generation or skip state.

What the trace still decides is what does not change from call to call: whether the layer takes the call at all
(:meth:`litepatch.layer_patch.LayerPatch.classify`), and its must-compute ranges.

Example (what :meth:`litepatch.layer_patch.LayerPatch.attend` does while torch.compile traces it):
    >>> out = layer_attention(q, k, v, None, layer.op_id, 0.088, [])
"""

from __future__ import annotations

import itertools
import weakref
from typing import Optional

import torch

from .runtime import refuse_graph_capture

# Inductor must not capture the op into a CUDA graph (mode="reduce-overhead"): a replay skips its Python, so every
# step would repeat the captured step's plan. The tag makes Inductor run it outside graphs (torch >= 2.8).
_TAGS = tuple(tag for tag in (getattr(torch.Tag, "cudagraph_unsafe", None),) if tag is not None)
_LAYERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # op id -> LayerPatch
_IDS = itertools.count(1)


def register(layer) -> int:
    """The op id of ``layer`` (a :class:`~litepatch.layer_patch.LayerPatch`): the int its traced calls pass."""
    op_id = next(_IDS)
    _LAYERS[op_id] = layer
    return op_id


@torch.library.custom_op("litepatch::layer_attention", mutates_args=(), tags=_TAGS)
def layer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor],
                    layer: int, scale: Optional[float], must: list[int]) -> torch.Tensor:
    """One attention call of the patched layer ``layer`` on ``[B, S, H, D]`` inputs; ``must`` = flattened
    ``(start, end)`` must-compute ranges. Returns a contiguous ``[B, S, H, D]`` output."""
    patch = _LAYERS.get(layer)
    if patch is None:
        raise RuntimeError(
            f"litepatch: a compiled graph calls patched layer #{layer}, whose handle was removed; call "
            "torch._dynamo.reset() (or compile again) after handle.remove()")
    refuse_graph_capture(q)  # where the tag is missing (older torch) or a caller captures the compiled model itself
    ranges = [(must[i], must[i + 1]) for i in range(0, len(must), 2)]
    return patch.attend_planned(q, k, v, key_mask, scale, ranges).contiguous()


@layer_attention.register_fake
def _(q, k, v, key_mask, layer, scale, must):
    return q.new_empty(q.shape)
