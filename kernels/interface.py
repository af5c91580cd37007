"""Public LiteAttention entry point: validation, state sizing and backend dispatch.

Three layers, as in FlashAttention:

1. the backends (the reference, the Triton kernel, the CuTe-DSL kernel) share one tensor signature
   and declare what they can take in :mod:`litepatch.kernels.registry`, which picks one per call;
2. ``torch.ops.litepatch.lite_attention_fwd``, a custom op (``torch.compile`` sees one node that
   mutates the state tensors), whose body runs the backend the registry chose;
3. :func:`lite_attention`, which checks inputs, sizes the :class:`SkipState` and calls the op while
   ``torch.compile`` traces, or the backend directly in eager mode (same computation, less host time). In eager
   mode a state's next call of the same form repeats its last one through the backend's ``repeat`` where it has one
   (:class:`_Repeat`): a model makes each layer's call in one form at every step, and deciding it again cost more
   host time than the launches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from . import registry
from .registry import available_backends
from .state import ORDERS, SkipState, normalize_ranges, settle
from .vocabulary import DEFAULT_ORDER, DEFAULT_THRESHOLD, threshold_problem

# Every dtype some backend takes (each backend's own set is in its registry constraints).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_threshold(threshold: float, name: str = "threshold") -> float:
    """Returns ``threshold`` as a float or raises ``ValueError`` naming ``name``.

    The rule (a real number <= 0 in log2 units, ``-inf`` skips nothing; NaN and positive values refused)
    and its messages are :func:`litepatch.kernels.vocabulary.threshold_problem`, which recipe validation uses too.
    """
    if type(threshold) is float and threshold <= 0.0:  # the common case, without the rule's slower checks
        return threshold
    problem = threshold_problem(threshold, name)
    if problem:
        raise ValueError(problem)
    return float(threshold)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    q_shape, k_shape = q.shape, k.shape
    if (len(q_shape) == 4 and k_shape == v.shape and len(k_shape) == 4 and q.dtype == k.dtype == v.dtype
            and q.dtype in SUPPORTED_DTYPES and q.device == k.device == v.device and q_shape[0] == k_shape[0]
            and q_shape[2] == k_shape[2] and q_shape[3] == k_shape[3] and q_shape[1] and k_shape[1]):
        return  # every rule below holds (one pass over the attributes: this runs on every call)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [batch, seqlen, heads, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: {', '.join(map(str, SUPPORTED_DTYPES))}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, heads and head_dim "
            "(layout [batch, seqlen, heads, head_dim]; grouped K/V heads are not supported)"
        )
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError(f"empty sequence: q has {q.shape[1]} tokens, k has {k.shape[1]}")


def key_mask_from(
    key_mask: torch.Tensor | None, key_lengths: torch.Tensor | Sequence[int] | None, batch: int, seq_k: int, device
) -> torch.Tensor | None:
    """Bool ``[batch, seq_k]`` (True: the key takes part) from a boolean mask or valid lengths, or ``None``.

    A mask may be ``[batch, seq_k]`` or any shape that broadcasts to SDPA's ``[batch, 1, 1, seq_k]``
    (a per-key mask); a mask that varies over heads or queries is not a key-padding mask and is refused.
    """
    if key_mask is not None and key_lengths is not None:
        raise ValueError("give key_mask or key_lengths, not both")
    if key_lengths is not None:
        lengths = torch.as_tensor(key_lengths, device=device).reshape(-1)
        if lengths.numel() != batch or lengths.dtype.is_floating_point:
            raise ValueError(f"key_lengths must be {batch} integers (one per batch row), got {tuple(lengths.shape)}")
        return torch.arange(seq_k, device=device)[None, :] < lengths[:, None]
    if key_mask is None:
        return None
    if key_mask.dtype != torch.bool:
        raise TypeError(f"key_mask must be a bool tensor (True: the key takes part), got {key_mask.dtype}")
    mask = key_padding_view(key_mask, batch, seq_k)
    if mask is None:
        raise ValueError(
            f"key_mask of shape {tuple(key_mask.shape)} is not a per-key mask for {batch} batch rows and {seq_k} keys "
            "([batch, seq_k] or [batch, 1, 1, seq_k])"
        )
    return mask.to(device)


def key_padding_view(mask: torch.Tensor, batch: int, seq_k: int) -> torch.Tensor | None:
    """``mask`` seen as ``[batch, seq_k]`` when it is per key (``[B, S_k]``, ``[S_k]``, or anything that broadcasts
    from ``[B or 1, 1, 1, S_k]``, SDPA's layout); ``None`` when it varies over heads or queries.

    >>> key_padding_view(torch.ones(2, 1, 1, 7, dtype=torch.bool), 2, 7).shape
    torch.Size([2, 7])
    """
    while mask.dim() > 2 and mask.shape[1] == 1:
        mask = mask.squeeze(1)
    if mask.dim() == 1:
        mask = mask[None]
    if mask.dim() != 2 or mask.shape[-1] != seq_k or mask.shape[0] not in (1, batch):
        return None
    return mask.expand(batch, seq_k)


def lite_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: SkipState | None = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    order: str = DEFAULT_ORDER,
    must_compute_queries: Sequence[tuple[int, int]] | None = None,
    must_compute_keys: Sequence[tuple[int, int]] | None = None,
    key_mask: torch.Tensor | None = None,
    key_lengths: torch.Tensor | Sequence[int] | None = None,
    vote: bool = True,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LiteAttention forward: computes the tiles of ``state``'s read list and writes the next one.

    Args:
        q (`torch.Tensor`): ``(batch_size, seqlen_q, nheads, headdim)``, fp16/bf16 (fp32 on the reference).
        k, v (`torch.Tensor`): ``(batch_size, seqlen_k, nheads, headdim)``. Any strides.
        state (`SkipState`, *optional*): skip lists of this layer and branch, updated in place. A new or
            reset state (or ``None``) computes every tile.
        threshold (`float`, defaults to `-10.0`): skip test in log2 units; ``-inf`` skips nothing, ``0``
            is the most aggressive allowed.
        softmax_scale (`float`, *optional*): defaults to ``1/sqrt(headdim)``.
        return_lse (`bool`, defaults to `False`): also return the natural-log LSE ``(batch_size, nheads, seqlen_q)``.
        order (`str`, defaults to `"anchor"`): key-tile visiting order, ``"anchor"`` or ``"alternate"``.
        must_compute_queries, must_compute_keys: ``[(start, end), ...]`` token ranges whose tiles are never
            skipped (e.g. text tokens of joint attention).
        key_mask (`torch.Tensor`, *optional*): bool ``[batch_size, seqlen_k]`` (or ``[batch_size, 1, 1, seqlen_k]``),
            True where the key takes part (SDPA's boolean convention): a key-padding mask. Tiles with no valid key
            are not computed and do not vote; partly masked tiles are masked inside.
        key_lengths (*optional*): valid keys per batch row (a prefix), instead of ``key_mask``.
        vote (`bool`, defaults to `True`): run the skip test and write the next list. ``False`` reads the list
            and leaves it as it is (a read-only call; its threshold is not used).
        backend (`str`, defaults to `"auto"`): a name from :func:`available_backends`; ``"auto"`` asks the
            registry (:mod:`litepatch.kernels.registry`) for the fastest backend that takes the call.

    Returns:
        ``out`` with the shape and dtype of ``q``, or ``(out, lse)``.

    Example:
        >>> state = SkipState()
        >>> for step in range(50):
        ...     out = lite_attention(q, k, v, state, threshold=-6.0)
        >>> state.kept_fraction()
    """
    compiling = torch.compiler.is_compiling()
    settings = None if compiling else (threshold, softmax_scale, order, vote, backend, registry.generation)
    if settings and state is not None and state.repeat is not None and key_mask is None and key_lengths is None:
        out = state.repeat.run_if_same(state, q, k, v, settings, must_compute_queries, must_compute_keys,
                                       return_lse)
        if out is not None:  # this state's last call again, on new inputs (_Repeat)
            state.count_call()
            return out if return_lse else out[0]
    _check_inputs(q, k, v)
    threshold = check_threshold(threshold)
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    batch, seq_q, heads, head_dim = q.shape
    seq_k = k.shape[1]
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    must_q = normalize_ranges(must_compute_queries, seq_q, "must_compute_queries")
    must_k = normalize_ranges(must_compute_keys, seq_k, "must_compute_keys")
    key_valid = key_mask_from(key_mask, key_lengths, batch, seq_k, q.device)
    chosen = registry.select(q, seq_k, backend=backend, key_padding=key_valid is not None)
    tiles = chosen.tiles(head_dim)
    state = state if state is not None else SkipState()
    shape = (batch, heads, seq_q, seq_k)
    state.prepare(shape, tiles, q.device, must_q, must_k)
    must_q_mask, must_k_mask = state.must_masks(q.device)
    descending = state.descending(order)
    threshold = threshold if vote else -math.inf
    if compiling:  # the custom op: one opaque node that declares its mutations
        out, lse = torch.ops.litepatch.lite_attention_fwd(
            q, k, v, state.keep, state.anchor, state.kept, must_q_mask, must_k_mask, key_valid,
            chosen.name, tiles.block_m, tiles.block_n, threshold, scale, order == "anchor", descending,
        )
    else:  # eager: the op's body directly (its Python dispatch alone costs ~70 us of host time per call)
        settle(state.keep)  # a commit its backend deferred (litepatch.kernels.commits) lands before this call
        arguments = (q, k, v, state.keep, state.anchor, state.kept, must_q_mask, must_k_mask, key_valid)
        options = dict(block_m=tiles.block_m, block_n=tiles.block_n, threshold=threshold, softmax_scale=scale,
                       use_anchor=order == "anchor", descending=descending)
        out, lse = chosen.forward(*arguments, **options)
        state.repeat = _Repeat.of(chosen, arguments, options, settings, must_compute_queries, must_compute_keys)
    state.count_call()
    return (out, lse) if return_lse else out


class _Repeat(NamedTuple):
    """A state's last call as its backend repeats it (``Backend.repeat``): the next call of the same form (the
    inputs' shapes, dtypes and devices, every other argument equal, no key mask) on the same state makes it again
    without the checks, sizing and dispatch of :func:`lite_attention`, which decided all of that for this form."""

    inputs: tuple  # q, k, v: shapes, dtypes, devices
    settings: tuple  # threshold, softmax_scale, order, vote, backend as given, and the registry's generation
    must_q: object  # must_compute_queries and must_compute_keys as given
    must_k: object
    keep: torch.Tensor  # the state's lists it was made for (a state sized again has new ones)
    run: Callable

    @classmethod
    def of(cls, chosen, arguments: tuple, options: dict, settings: tuple, must_q, must_k) -> _Repeat | None:
        q, k, v, keep = arguments[:4]
        if (chosen.repeat is None or arguments[-1] is not None or type(settings[0]) not in _NUMBERS
                or (settings[1] is not None and type(settings[1]) not in _NUMBERS)
                or type(must_q) not in _RANGES or type(must_k) not in _RANGES):
            return None  # a key mask, or arguments compared otherwise than by value
        run = chosen.repeat(*arguments, **options)
        return None if run is None else cls(_form(q, k, v), settings, must_q, must_k, keep, run)

    def run_if_same(self, state: SkipState, q, k, v, settings: tuple, must_q, must_k, lse_wanted: bool = True):
        """``(out, lse)`` of the repeated call on ``q, k, v``, or ``None`` where this call is not the same
        (``lse_wanted=False``: the LSE is dropped, and may be a buffer the backend reuses)."""
        # ranges compared only as the same kind of sequence, in one tuple comparison (no call of ours per call)
        if (self.keep is not state.keep or _form(q, k, v) != self.inputs or type(settings[0]) not in _NUMBERS
                or settings != self.settings or type(must_q) not in _RANGES or type(must_k) not in _RANGES
                or (must_q, must_k) != (self.must_q, self.must_k)):
            return None
        return self.run(q, k, v, lse_wanted)


def repeat_call(state: SkipState, repeat: object, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                ) -> torch.Tensor | None:
    """``state``'s last call made again on new ``q, k, v``, for a caller that keeps what :func:`lite_attention` left in
    ``state.repeat`` after a call and vouches that every argument but ``q, k, v`` (and their form: shapes, dtypes,
    devices) is that call's, with ``return_lse=False``: the output, or ``None``, launching nothing, where the state
    changed since (sized again, copied out of inference mode, another call made) or the backend declines (then call
    :func:`lite_attention`). Without lite_attention's checks, which that caller has answered for this form already.

    >>> out = lite_attention(q, k, v, state, threshold=-4.0)
    >>> kept = state.repeat
    >>> out = repeat_call(state, kept, q2, k2, v2)  # None: make the call through lite_attention
    """
    if repeat is None or state.repeat is not repeat or repeat.keep is not state.keep:
        return None
    out = repeat.run(q, k, v, False)
    if out is None:
        return None
    state.count_call()
    return out[0]


_NUMBERS = frozenset((float, int))
_RANGES = frozenset((type(None), list, tuple))


def _form(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
    return q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device



def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    anchor: torch.Tensor,
    kept: torch.Tensor,
    must_q: torch.Tensor,
    must_k: torch.Tensor,
    key_valid: torch.Tensor | None,
    backend: str,
    block_m: int,
    block_n: int,
    threshold: float,
    softmax_scale: float,
    use_anchor: bool,
    descending: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The body of ``litepatch::lite_attention_fwd``: the forward of the backend named ``backend``."""
    return registry.get(backend).forward(
        q, k, v, keep, anchor, kept, must_q, must_k, key_valid,
        block_m=block_m, block_n=block_n, threshold=threshold, softmax_scale=softmax_scale,
        use_anchor=use_anchor, descending=descending,
    )


_lite_attention_fwd = torch.library.custom_op(
    "litepatch::lite_attention_fwd", mutates_args=("keep", "anchor", "kept"))(_forward)


@_lite_attention_fwd.register_fake
def _(q, k, v, keep, anchor, kept, must_q, must_k, key_valid, backend, block_m, block_n, threshold, softmax_scale,
      use_anchor, descending):
    lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return q.new_empty(q.shape), lse
