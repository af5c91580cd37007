"""Step time of Wan2.1-1.3B (random weights) under context parallelism: dense vs LiteAttention at forced kept
fractions, Ulysses degree P and ring degree P against one GPU (issue 8 §4), plus per-rank attention time and
kept-work imbalance (§3).

One launch measures everything, so the ratios come from one run:

* ``single``: rank 0 runs the whole model alone (the other ranks wait); ``sdpa`` is the unpatched model.
* ``ulysses``: the sequence is sharded as diffusers' ``_cp_plan`` for Wan does it (rotary table and the input of
  ``blocks.0`` split on the sequence, ``proj_out`` gathered); every self-attention (``attn1``) runs
  :func:`litepatch.parallel.ulysses_attention` around SDPA (``sdpa``) or :func:`ulysses_lite_attention`.
* ``ring``: same sharding, :func:`litepatch.parallel.ring_attention` around SDPA-with-LSE or
  :func:`ring_lite_attention` (one state per query shard x K/V chunk).
* ``diffusers-ulysses``: what users run. A copy of the model with diffusers' own context parallelism
  (``enable_parallelism(config=ContextParallelConfig(ulysses_degree=P))``, ``native`` attention backend), unpatched
  (``sdpa``) or patched by ``litepatch.apply(model, threshold=-1e30, warmup_steps=0)``; the lite fractions are forced
  on the live states of ``handle.skip_states()``. Calls run under ``cache_context("cond")`` so every call reuses
  the one branch's states (same-timestep calls would otherwise count as new CFG branches). Attention runs inside
  diffusers' processors, so its time per rank is not measured (``-``).
* ``diffusers-ring``: the same under diffusers' ring (``ContextParallelConfig(ring_degree=P)``), where litepatch runs
  one LiteAttention per (query shard, K/V chunk) inside diffusers' ring template (:mod:`litepatch.ring_diffusers`).
  diffusers' ``native`` backend cannot run its ring (no LSE), so the copy uses ``_native_flash`` on CUDA (the dense
  row is diffusers' own ring with PyTorch's flash kernel, and litepatch's dense calls would use it too); on CPU,
  where no diffusers backend returns the LSE, the dense row is litepatch's dense ring (``threshold=-inf``: the same
  template with PyTorch's CPU flash kernel).

Cross-attention stays dense (local queries, full text keys). ``lite f`` forces the kept fraction: after one dense
call, every q-tile's read list holds ``round(f * k_tiles)`` key tiles (at least 1) chosen at random (seed 0), and
``threshold=-inf`` (hand-sharded modes; ``-1e30`` under ``litepatch.apply``, whose ``-inf`` calls run dense and keep no
lists) keeps the lists fixed, so every step computes the same fraction. The step time is the slowest
rank's median over ``--iters`` forwards (batch 1, one denoising step, no CFG). ``rel err`` is the relative L2
distance of the output to the single-device dense one: float noise for ``sdpa`` and ``lite f=1`` in every mode
(the check that the sharding and the parallel attention are right), large for the forced random fractions.

Usage (2 GPUs, NCCL):
    torchrun --standalone --nproc_per_node 2 benchmarks/multigpu.py --json multigpu.json

Example (a CPU smoke run with gloo, tiny config and 768 tokens, reference kernel; under a minute on 2 cores):
    >>> torchrun --standalone --nproc_per_node 2 benchmarks/multigpu.py --tiny --device cpu --iters 1 --warmup 1
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

import litepatch
from litepatch.kernels import SkipState, available_backends, lite_attention, pack_bits
from litepatch.parallel import (
    ChunkedSkipState,
    imbalance_ratio,
    kept_tiles,
    ring_attention,
    ring_lite_attention,
    ulysses_attention,
    ulysses_lite_attention,
)

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json
WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
)
TINY = dict(WAN_1_3B, num_attention_heads=4, attention_head_dim=64, text_dim=64, freq_dim=32, ffn_dim=512,
            num_layers=2)
MODES = ("single", "ulysses", "ring", "diffusers-ulysses", "diffusers-ring")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny config and video (CPU smoke run)")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--fractions", default="1.0,0.5,0.25,0.1", help="forced kept fractions, comma-separated")
    p.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)}")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--backend", default="auto", help="LiteAttention backend (auto: triton on CUDA when installed)")
    p.add_argument("--warmup", type=int, default=2, help="forwards before timing (the first one sizes the states)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json", default=None, help="write the results here (rank 0)")
    args = p.parse_args(argv)
    if args.tiny:
        args.frames, args.height, args.width, args.text_tokens = 9, 256, 256, 16
    args.fractions = [float(f) for f in args.fractions.split(",")]
    for f in args.fractions:
        if not 0 < f <= 1:
            raise SystemExit(f"--fractions must be in (0, 1], got {f}")
    args.modes = [m.strip() for m in args.modes.split(",")]
    for m in args.modes:
        if m not in MODES:
            raise SystemExit(f"--modes must be a subset of {','.join(MODES)}, got {m!r}")
    if args.warmup < 1 or args.iters < 1:
        raise SystemExit(f"--warmup and --iters must be >= 1, got {args.warmup} and {args.iters}")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    return args


# --------------------------------------------------------------------------------------------------- distribution


def init_distributed(device_type: str) -> tuple[int, int, torch.device]:
    """torchrun environment -> (rank, world, device); a plain ``python`` launch is one rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1:
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device_type == "cuda" else None)
    return rank, world, device


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SequenceShard:
    """Shards Wan's sequence over the ranks the way diffusers' ``WanTransformer3DModel._cp_plan`` does."""

    def __init__(self, model, rank: int, world: int):
        self.rank, self.world = rank, world
        self.handles = [
            model.rope.register_forward_hook(self._split_rope),
            model.blocks[0].register_forward_pre_hook(self._split_input),
            model.proj_out.register_forward_hook(self._gather_output),
        ]

    def _shard(self, t: torch.Tensor) -> torch.Tensor:
        if t.shape[1] % self.world:
            raise ValueError(f"sequence length {t.shape[1]} is not divisible by {self.world} ranks")
        return t.chunk(self.world, dim=1)[self.rank].contiguous()

    def _split_rope(self, module, args, output):
        return tuple(self._shard(t) for t in output)

    def _split_input(self, module, args):
        return (self._shard(args[0]), *args[1:])

    def _gather_output(self, module, args, output):
        parts = [torch.empty_like(output) for _ in range(self.world)]
        dist.all_gather(parts, output.contiguous())
        return torch.cat(parts, dim=1)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# ------------------------------------------------------------------------------------------------------ attention


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' WanAttnProcessor rotary embedding."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class Timer:
    """Accumulates the attention time of one rank (CUDA events, or wall clock on CPU)."""

    def __init__(self, device: torch.device):
        self.device, self.events, self.cpu_s = device, [], 0.0

    def __call__(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            self.events.append((start, end))
            return out
        t0 = time.perf_counter()
        out = fn()
        self.cpu_s += time.perf_counter() - t0
        return out

    def reset(self) -> None:
        self.events, self.cpu_s = [], 0.0

    def total_ms(self) -> float:
        synchronize(self.device)
        return sum(s.elapsed_time(e) for s, e in self.events) + 1e3 * self.cpu_s


class SelfAttention:
    """A WanAttnProcessor for ``attn1`` whose attention core is ``attend(q, k, v)`` on ``[B, S/P, H, D]``."""

    def __init__(self, attend: Callable, timer: Timer):
        self.attend, self.timer = attend, timer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            q, k = _rotary(q, *rotary_emb), _rotary(k, *rotary_emb)
        out = self.timer(lambda: self.attend(q, k, v)).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def sdpa_with_lse(q, k, v):
    """Dense attention and its natural-log LSE ``[B, H, S]`` (flash attention on CUDA)."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt)[:2]
    return out.transpose(1, 2), lse


def force_fraction(state: SkipState, fraction: float, seed: int) -> None:
    """Every q-tile's read list: ``round(fraction * k_tiles)`` (>= 1) random key tiles."""
    batch, heads = state.shape[:2]
    q_tiles, k_tiles = state.q_tiles, state.k_tiles
    n = max(1, round(fraction * k_tiles))
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, heads, q_tiles, k_tiles, generator=gen)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(-1, scores.topk(n, dim=-1).indices, True)
    state.keep.copy_(pack_bits(mask).to(state.keep.device))


# ---------------------------------------------------------------------------------------------------------- runs


def build_model(args, device, dtype, world):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**(TINY if args.tiny else WAN_1_3B))
    model = model.eval().requires_grad_(False)
    keep_fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or ())  # as from_pretrained(torch_dtype=...) does
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not keep_fp32.intersection(name.split(".")):
            tensor.data = tensor.data.to(dtype)
    if world > 1:  # identical weights on every rank whatever the device RNG did
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, 0)
    config = model.config
    gen = torch.Generator().manual_seed(1)
    latent = (1, config.in_channels, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    inputs = dict(
        hidden_states=torch.randn(latent, generator=gen).to(device, dtype),
        encoder_hidden_states=torch.randn(1, args.text_tokens, config.text_dim, generator=gen).to(device, dtype),
        timestep=torch.tensor([500], device=device),
        return_dict=False,
    )
    p_t, p_h, p_w = config.patch_size
    tokens = latent[2] // p_t * (latent[3] // p_h) * (latent[4] // p_w)
    return model, inputs, tokens


def run_config(model, inputs, args, device, rank, world, mode, fraction, group_ranks):
    """Times one (mode, attention) configuration. Returns (the model output, this rank's record), or
    (None, None) on a rank not taking part."""
    taking_part = rank in group_ranks
    timer = Timer(device)
    if not taking_part:
        patch = contextlib.nullcontext((list, False))
    elif mode.startswith("diffusers-"):
        patch = litepatched(model, fraction, args.backend)
    else:
        patch = hand_sharded(model, rank, world, mode, fraction, args.backend, timer)
    step_ms, output = [], None
    with patch as (live_states, timed):
        for it in range(args.warmup + args.iters):
            barrier(world)
            if not taking_part:
                continue
            if it == args.warmup:
                timer.reset()
            synchronize(device)
            t0 = time.perf_counter()
            with torch.inference_mode(), model.cache_context("cond"):  # one branch: every call reuses its states
                output = model(**inputs)[0]
            synchronize(device)
            if it >= args.warmup:
                step_ms.append(1e3 * (time.perf_counter() - t0))
            if it == 0 and fraction is not None:  # the first call sized the states: force the fraction now
                with torch.inference_mode():  # the state tensors were made under inference mode
                    for seed, state in enumerate(live_states()):
                        force_fraction(state, fraction, seed)
        states = live_states()
    if not taking_part:
        return None, None
    total = sum(s.total_tiles() for s in states)
    return output, {
        "step_ms": statistics.median(step_ms),
        "attn_ms": timer.total_ms() / args.iters if timed else None,  # unpatched or diffusers' processors
        "kept_tiles": kept_tiles(states) if states else None,
        "kept_fraction": kept_tiles(states) / total if total else 1.0,
    }


@contextlib.contextmanager
def hand_sharded(model, rank, world, mode, fraction, backend, timer):
    """The ``single``/``ulysses``/``ring`` attention of one configuration on ``attn1`` (and the sequence sharding):
    yields (its SkipStates getter, whether ``timer`` times attention); restores the model on exit."""
    processors, states, shard = {}, [], None
    for i, block in enumerate(model.blocks):
        attend = make_attend(mode, fraction, backend, states, i)
        if attend is not None:
            processors[i] = block.attn1.processor
            block.attn1.set_processor(SelfAttention(attend, timer))
    try:
        if mode != "single":
            shard = SequenceShard(model, rank, world)
        yield (lambda: flat_states(states)), bool(processors)
    finally:
        for i, proc in processors.items():
            model.blocks[i].attn1.set_processor(proc)
        if shard is not None:
            shard.remove()


@contextlib.contextmanager
def litepatched(model, fraction, backend):
    """``litepatch.apply`` on a diffusers-parallel model (nothing for ``fraction=None``): yields (the live states of
    ``handle.skip_states()``, False: attention is not timed); removes the patch on exit."""
    dense_ring = getattr(model, "_litepatch_dense_ring", False)
    if fraction is None and not dense_ring:
        yield list, False
        return
    # -1e30: every call votes and drops nothing, so the forced lists stay; -inf runs dense without lists (the dense
    # row of a ring whose backend cannot return the LSE)
    threshold = -math.inf if fraction is None else -1e30
    handle = litepatch.apply(model, threshold=threshold, warmup_steps=0, backend=backend)
    try:
        yield (lambda: [s for branches in handle.skip_states().values() for s in branches.values()]), False
    finally:
        handle.remove()


def diffusers_parallel(model, world, device, mode):
    """A copy of ``model`` under diffusers' context parallelism of degree ``world``: Ulysses with the ``native``
    backend, or ring with ``_native_flash`` on CUDA (``native`` on CPU, whose dense row litepatch runs: the
    copy's ``_litepatch_dense_ring`` says so)."""
    from diffusers import ContextParallelConfig

    model = copy.deepcopy(model)
    ring = mode == "diffusers-ring"
    flash = ring and device.type == "cuda" and next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
    model.set_attention_backend("_native_flash" if flash else "native")
    model._litepatch_dense_ring = ring and not flash
    with cpu_as_accelerator(device):
        model.enable_parallelism(config=ContextParallelConfig(**{"ring_degree" if ring else "ulysses_degree": world}))
    return model


@contextlib.contextmanager
def cpu_as_accelerator(device):
    """diffusers' ``_resolve_parallel_config`` computes ``rank % torch.accelerator.device_count()``, which divides by
    zero without an accelerator; on CPU the device it builds is only recorded, so count the CPU as one device there
    (as tests/unit/test_parallel_diffusers.py does)."""
    if device.type != "cpu" or torch.accelerator.device_count() > 0:
        yield
        return
    from unittest import mock

    with mock.patch.object(torch.accelerator, "device_count", return_value=1):
        yield


def make_attend(mode: str, fraction: float | None, backend: str, states: list, layer: int):
    """The attention core of one layer, or None for the unpatched model (single GPU, SDPA)."""
    if fraction is None:
        if mode == "single":
            return None
        if mode == "ulysses":
            return lambda q, k, v: ulysses_attention(q, k, v, sdpa)
        return lambda q, k, v: ring_attention(q, k, v, lambda q, k, v, c: sdpa_with_lse(q, k, v))[0]
    kw = dict(threshold=-math.inf, backend=backend)
    if mode == "ring":
        chunked = ChunkedSkipState()
        states.append(chunked)
        return lambda q, k, v: ring_lite_attention(q, k, v, chunked, **kw)
    state = SkipState()
    states.append(state)
    if mode == "ulysses":
        return lambda q, k, v: ulysses_lite_attention(q, k, v, state, **kw)
    return lambda q, k, v: lite_attention(q, k, v, state, **kw)


def flat_states(holders: list) -> list[SkipState]:
    """SkipStates of the layers (a ring layer holds one per K/V chunk)."""
    return [s for h in holders for s in (h.values() if isinstance(h, ChunkedSkipState) else [h])]


def gather_records(record, world):
    if world == 1:
        return [record]
    records = [None] * world
    dist.all_gather_object(records, record)
    return records


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, device = init_distributed(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    model, inputs, tokens = build_model(args, device, dtype, world)
    modes = [m for m in args.modes if m == "single" or world > 1]
    rows, reference = [], None
    for mode in modes:
        group_ranks = [0] if mode == "single" else list(range(world))
        mode_model = diffusers_parallel(model, world, device, mode) if mode.startswith("diffusers-") else model
        for fraction in [None, *args.fractions]:
            output, record = run_config(mode_model, inputs, args, device, rank, world, mode, fraction, group_ranks)
            if rank == 0 and mode == "single" and fraction is None:
                reference = output.float()
            error = None  # relative L2 to the single-device dense output (rank 0 holds the gathered output)
            if rank == 0 and reference is not None:
                error = float((output.float() - reference).norm() / reference.norm())
            records = [r for r in gather_records(record, world) if r is not None]
            attn = [r["attn_ms"] for r in records if r["attn_ms"] is not None]
            kept = [r["kept_tiles"] for r in records]
            rows.append({
                "mode": mode if mode == "single" else f"{mode}{world}",
                "attention": "sdpa" if fraction is None else f"lite f={fraction:g}",
                "fraction": fraction,
                "step_ms": max(r["step_ms"] for r in records),
                "step_ms_per_rank": [r["step_ms"] for r in records],
                "attn_ms_per_rank": attn,
                "attn_imbalance": imbalance_ratio(attn) if len(attn) > 1 else 1.0,
                "kept_fraction": statistics.mean(r["kept_fraction"] for r in records),
                "kept_tiles_per_rank": kept,
                "kept_imbalance": imbalance_ratio(kept) if fraction is not None and len(kept) > 1 else 1.0,
                "rel_err_vs_single_sdpa": error,
            })
    if rank == 0:
        report(rows, args, world, tokens, device, dtype)
    if world > 1:
        dist.destroy_process_group()
    return 0


def report(rows, args, world, tokens, device, dtype) -> None:
    base = next((r["step_ms"] for r in rows if r["mode"] == "single" and r["attention"] == "sdpa"), None)
    dense = {r["mode"]: r["step_ms"] for r in rows if r["attention"] == "sdpa"}
    for r in rows:
        r["speedup_vs_single_sdpa"] = base / r["step_ms"] if base else None
        r["speedup_vs_same_mode_sdpa"] = dense[r["mode"]] / r["step_ms"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    size = f"{args.frames}x{args.height}x{args.width}"
    print(f"\nWan2.1-1.3B{' (tiny)' if args.tiny else ''}, {size} -> {tokens} tokens, "
          f"{args.dtype}, {world} x {name}, lite backends {available_backends()}, median of {args.iters}")
    width = max(9, *(len(r["mode"]) for r in rows))
    header = (f"{'mode':<{width}} {'attention':<12} {'step ms':>9} {'vs 1-dev':>8} {'vs dense':>8} {'kept':>6} "
              f"{'attn ms/rank':>20} {'attn imb':>8} {'kept imb':>8} {'rel err':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        vs_single = f"{r['speedup_vs_single_sdpa']:.2f}x" if r["speedup_vs_single_sdpa"] else "-"
        attn = "/".join(f"{a:.1f}" for a in r["attn_ms_per_rank"]) or "-"
        err = "-" if r["rel_err_vs_single_sdpa"] is None else f"{r['rel_err_vs_single_sdpa']:.1e}"
        print(f"{r['mode']:<{width}} {r['attention']:<12} {r['step_ms']:>9.1f} {vs_single:>8} "
              f"{r['speedup_vs_same_mode_sdpa']:>7.2f}x {r['kept_fraction']:>6.2f} {attn:>20} "
              f"{r['attn_imbalance']:>8.3f} {r['kept_imbalance']:>8.3f} {err:>8}")
    if args.json:
        meta = {
            "model": "tiny" if args.tiny else "Wan2.1-T2V-1.3B", "config": TINY if args.tiny else WAN_1_3B,
            "frames": args.frames, "height": args.height, "width": args.width, "tokens": tokens,
            "dtype": args.dtype, "world_size": world, "device": name, "torch": torch.__version__,
            "lite_backends": available_backends(), "warmup": args.warmup, "iters": args.iters,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2, default=str)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    raise SystemExit(main())
