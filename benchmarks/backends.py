"""Backends side by side on the six DiT shapes of issue 12: one run, interleaved calls, one JSON.

Per shape (bf16), all in one interleaved round per repetition:

* dense: SDPA cuDNN, flash-attn-4 dense, ``litepatch.kernels.dense_attention`` (what a patched model's dense
  calls run), ours with every tile listed at ``threshold=-inf`` (the CuTe kernel without the vote, anchor
  tracking on) and at ``-1e30`` (the vote runs on every tile, nothing is dropped), the first (list-writing)
  call at threshold -10, and the Triton kernel at ``-inf``;
* kept fractions k: the read list set to a band of round(k·KT) key tiles around each q-tile's diagonal;
  time(k) / time(1) for the CuTe kernel with the vote on (``-1e30``) and for the Triton kernel;
* vote overhead at k = 1: ``-1e30`` over ``-inf`` on the CuTe kernel;
* what the ``-inf`` kernel's tail mask and anchor tracking cost (``ablation_gain``: kernels compiled without them);
* the voting kernel with its tail mask on every visit over the one with it behind a branch (the default)
  (``vote_select_over_branch``: above 1, the branch is the faster);
* where the dense gap goes (stages left out one at a time): flash-attn-4 dense; flash-attn-4's own block-sparse
  forward with every block listed (the library's cost of reading lists); ours at ``-inf`` (our list and commit
  kernels and the anchor tracking on top); ours at ``-1e30`` (the vote on top).

Usage::

    python benchmarks/backends.py --json backends.json [--shapes wan1.3b-480p flux-1024] [--reps 10]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from functools import partial

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from kernel import banded_read_list, interleaved, median_ratio  # noqa: E402

SHAPES = {
    "wan1.3b-480p": (1, 12, 32760, 128),
    "wan14b-720p": (1, 40, 75600, 128),
    "hunyuan-720p": (1, 24, 119040, 128),
    "cogvideox": (2, 48, 17776, 64),
    "ltx": (1, 32, 24576, 64),
    "flux-1024": (1, 24, 4608, 128),
}
FRACTIONS = (0.75, 0.5, 0.25, 0.1, 0.05)


def shape_rows(name: str, reps: int, warmup: int, three_stages: bool = False) -> dict:
    from flash_attn.cute import interface as fa4_interface
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from litepatch.kernels import SkipState, dense_attention, lite_attention, pack_bits
    from litepatch.kernels.cute_sm90 import COMPILE_SECONDS

    batch, heads, seq, dim = SHAPES[name]
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, seq, heads, dim, device=device, dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    flops = 4.0 * batch * heads * seq * seq * dim

    full = SkipState()
    lite_attention(q, k, v, full, threshold=-math.inf, backend="cute")  # sizes it; every tile listed
    first = SkipState()
    fa4_full = _fa4_full_lists(batch, heads, full.q_tiles, full.k_tiles, full.tiles, device)

    def first_call():  # the reset is untimed setup: the call then sizes the state and writes the first list
        lite_attention(q, k, v, first, threshold=-10.0, backend="cute")

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            F.scaled_dot_product_attention(qt, kt, vt)

    calls = {
        "cudnn": (None, cudnn),
        "fa4": (None, lambda: fa4_interface._flash_attn_fwd(q, k, v)[0]),  # the library as a user calls it
        "dense_attention": (None, lambda: dense_attention(q, k, v)),
        "ours_read_full": (None, lambda: lite_attention(q, k, v, full, threshold=-math.inf, backend="cute")),
        # the voting call with its tail mask on every visit without a branch (the -inf variant's way) instead of
        # behind a branch (kernels/cute_sm90.py, LiteAttentionForwardSm90 tail_mode)
        "ours_vote_full_select": (None, partial(_ablated, dict(tail_mode="select"), lambda: lite_attention(
            q, k, v, full, threshold=-1e30, backend="cute"))),
        "ours_first": (first.reset, first_call),
        # what the tail tile's key-length mask and the anchor tracking cost at -inf (these kernels compute wrong
        # results: timing only)
        "ours_read_full_no_tail": (None, partial(_ablated, dict(mask_tail=False), lambda: lite_attention(
            q, k, v, full, threshold=-math.inf, backend="cute"))),
        "ours_read_full_no_anchor": (None, partial(_ablated, dict(ablate=("anchor",)), lambda: lite_attention(
            q, k, v, full, threshold=-math.inf, backend="cute"))),
        "ours_read_full_neither": (None, partial(_ablated, dict(mask_tail=False, ablate=("anchor",)), lambda: (
            lite_attention(q, k, v, full, threshold=-math.inf, backend="cute")))),
        "ours_vote_full": (None, lambda: lite_attention(q, k, v, full, threshold=-1e30, backend="cute")),
        "triton_dense": (None, lambda: lite_attention(q, k, v, full, threshold=-math.inf, backend="triton")),
    }
    if three_stages:  # three K/V pipeline stages instead of flash-attn-4's two (kernels/cute_sm90.py STAGES)
        calls.update({
            "ours_read_full_s3": (None, partial(_ablated, dict(stages=3), lambda: lite_attention(
                q, k, v, full, threshold=-math.inf, backend="cute"))),
            "ours_vote_full_s3": (None, partial(_ablated, dict(stages=3), lambda: lite_attention(
                q, k, v, full, threshold=-1e30, backend="cute"))),
            "dense_attention_s3": (None, partial(_ablated, dict(stages=3), lambda: dense_attention(q, k, v),
                                                 "run_dense_sm90")),
        })
    try:  # the library's block-sparse entry point is not part of litepatch: a refusal only drops this row
        fa4_sparse_full = partial(fa4_interface._flash_attn_fwd, q, k, v, block_sparse_tensors=fa4_full)
        fa4_sparse_full()
        calls["fa4_sparse_full"] = (None, fa4_sparse_full)
    except Exception as exc:  # noqa: BLE001
        print(f"flash-attn-4 block-sparse forward refused the full lists ({exc}); its row is left out", flush=True)
    for fraction in FRACTIONS:
        state = SkipState()
        lite_attention(q, k, v, state, threshold=-math.inf, backend="cute")
        state_t = SkipState()
        lite_attention(q, k, v, state_t, threshold=-math.inf, backend="triton")
        # each backend's own tiles (the CuTe kernel's q-tiles are 192 rows at head dim 64, Triton's 128)
        band, band_t = (pack_bits(banded_read_list(batch, heads, s.q_tiles, s.k_tiles, fraction, s.tiles.block_m,
                                                   s.tiles.block_n, device)) for s in (state, state_t))

        def reset(s=state, s_t=state_t, b=band, b_t=band_t):
            s.set_read_words(b)
            s_t.set_read_words(b_t)

        calls[f"ours_read_k{fraction}"] = (reset, lambda s=state: lite_attention(q, k, v, s, threshold=-1e30,
                                                                                  backend="cute"))
        if three_stages and fraction == 0.5:
            calls["ours_read_k0.5_s3"] = (reset, partial(_ablated, dict(stages=3), lambda s=state: lite_attention(
                q, k, v, s, threshold=-1e30, backend="cute")))
        calls[f"triton_k{fraction}"] = (None, lambda s=state_t: lite_attention(q, k, v, s, threshold=-1e30,
                                                                             backend="triton"))
    times = interleaved(calls, warmup, reps)
    med = {key: sorted(val)[len(val) // 2] for key, val in times.items()}
    row = {
        "shape": dict(zip(("batch", "heads", "seq", "dim"), SHAPES[name])),
        "ms": med,
        "tflops": {key: flops / ms / 1e9 for key, ms in med.items() if "_k" not in key},
        "fa4_over_cudnn": median_ratio(times, "cudnn", "fa4"),
        "ours_dense_over_fa4": median_ratio(times, "fa4", "dense_attention"),
        "ours_read_full_over_fa4": median_ratio(times, "fa4", "ours_read_full"),
        "fa4_sparse_full_over_fa4": median_ratio(times, "fa4", "fa4_sparse_full") if "fa4_sparse_full" in times
        else math.nan,
        "ours_read_full_over_fa4_sparse_full": median_ratio(times, "fa4_sparse_full", "ours_read_full")
        if "fa4_sparse_full" in times else math.nan,
        "first_over_fa4": median_ratio(times, "ours_first", "fa4"),
        "triton_over_cudnn": median_ratio(times, "cudnn", "triton_dense"),
        "vote_overhead_k1": median_ratio(times, "ours_vote_full", "ours_read_full") - 1.0,
        "vote_select_over_branch": median_ratio(times, "ours_vote_full_select", "ours_vote_full"),
        # time(ours -inf) / time(ours -inf without the part): above 1, the part costs that much
        "ablation_gain": {part: median_ratio(times, "ours_read_full", f"ours_read_full_{part}")
                          for part in ("no_tail", "no_anchor", "neither")},
        "read_k": {str(f): median_ratio(times, f"ours_read_k{f}", "ours_vote_full") for f in FRACTIONS},
        # time with flash-attn-4's 2 stages / time with 3: above 1, three stages are faster
        **({"stages3_gain": {"read_full": median_ratio(times, "ours_read_full", "ours_read_full_s3"),
                             "vote_full": median_ratio(times, "ours_vote_full", "ours_vote_full_s3"),
                             "read_k0.5": median_ratio(times, "ours_read_k0.5", "ours_read_k0.5_s3"),
                             "dense": median_ratio(times, "dense_attention", "dense_attention_s3")},
            "ours_vote_full_s3_over_fa4": median_ratio(times, "fa4", "ours_vote_full_s3")} if three_stages else {}),
        "compile_s": {str(key): sec for key, sec in COMPILE_SECONDS.items()},
        "triton_k": {str(f): median_ratio(times, f"triton_k{f}", "triton_dense") for f in FRACTIONS},
        "state_bytes": full.nbytes(),
        # GPU time per kernel inside one call (where ours' gap to flash-attn-4 dense goes: main kernel vs the small
        # list and commit kernels)
        "kernels_us": {key: _kernel_times_or_error(calls[key][1]) for key in ("fa4", "ours_read_full", "ours_vote_full")},
    }
    return row


def _ablated(options, call, launcher: str = "run_sm90"):
    """``call()`` with the kernel ``cute_fwd.<launcher>`` launches compiled with ``options``: for ``run_sm90`` (the
    CuTe LiteAttention kernel) ``tail_mode``, ``mask_tail=False``, ``ablate``, ``stages`` (``kernels/cute_sm90.py``;
    where the keys do not fill their last tile, ``mask_tail=False`` gives wrong results: timing only); for
    ``run_dense_sm90`` (flash-attn-4 dense) ``stages``."""
    from unittest import mock

    from litepatch.kernels import cute_fwd

    with mock.patch.object(cute_fwd, launcher, partial(getattr(cute_fwd, launcher), **options)):
        return call()


def _kernel_times_or_error(call) -> dict:
    try:  # a profiler failure only drops the breakdown
        return kernel_times(call)
    except Exception as exc:  # noqa: BLE001
        return {"error": repr(exc)}


def kernel_times(call, reps: int = 5) -> dict[str, float]:
    """Mean GPU microseconds per call of each CUDA kernel ``call`` launches (torch.profiler, after one warm call)."""
    from torch.profiler import ProfilerActivity, profile

    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            call()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        gpu_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA and gpu_us > 0:
            totals[event.key[:80]] = gpu_us / reps
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def _fa4_full_lists(batch, heads, q_tiles, k_tiles, tiles, device):
    """flash-attn-4's block-sparse tensors listing every block of our tiles as "full" (no masked blocks)."""
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    def zeros(*shape):
        return torch.zeros(*shape, dtype=torch.int32, device=device)

    full_idx = torch.arange(k_tiles, dtype=torch.int32, device=device).expand(batch, heads, q_tiles, -1).contiguous()
    return BlockSparseTensorsTorch(zeros(batch, heads, q_tiles), zeros(batch, heads, q_tiles, k_tiles),
                                   torch.full((batch, heads, q_tiles), k_tiles, dtype=torch.int32, device=device),
                                   full_idx, block_size=(tiles.block_m, tiles.block_n))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--json", default="backends_bench.json")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--three-stages", action="store_true",
                        help="also time the CuTe kernels with 3 K/V stages (no gain on the H100, 2026-12-06)")
    args = parser.parse_args(argv)

    from litepatch.kernels.cute_fwd import scratch_bytes

    gpu = torch.cuda.get_device_name()
    results = {"gpu": gpu, "torch": torch.__version__, "shapes": {}}
    print(f"GPU: {gpu}, torch {torch.__version__}, bf16; speed ratios are time(other)/time(ours) unless noted")
    print(f"{'shape':<14}{'cuDNN TF/s':>11}{'FA4/cuDNN':>10}{'dense/FA4':>10}{'-inf/FA4':>13}{'first/FA4':>10}"
          f"{'Triton/cuDNN':>13}{'vote ovh':>9}{'FA4 lists/FA4':>14}{'-inf/FA4 lists':>15}   voting time(k)/time(1) k=" + "/".join(map(str, FRACTIONS)))
    for name in args.shapes:
        row = shape_rows(name, args.reps, args.warmup, args.three_stages)
        results["shapes"][name] = row
        print(f"{name:<14}{row['tflops']['cudnn']:>11.0f}{row['fa4_over_cudnn']:>10.3f}{row['ours_dense_over_fa4']:>10.3f}"
              f"{row['ours_read_full_over_fa4']:>13.3f}{row['first_over_fa4']:>10.3f}{row['triton_over_cudnn']:>13.3f}"
              f"{100 * row['vote_overhead_k1']:>8.0f}%{row['fa4_sparse_full_over_fa4']:>14.3f}"
              f"{row['ours_read_full_over_fa4_sparse_full']:>15.3f}   " + " / ".join(f"{x:.3f}" for x in row["read_k"].values())
              + "   (Triton: " + " / ".join(f"{x:.3f}" for x in row["triton_k"].values()) + ")"
              + f"   vote: tail select / branch {row['vote_select_over_branch']:.3f}", flush=True)
        print("    -inf over -inf without: " + ", ".join(f"{k} {v:.3f}" for k, v in row["ablation_gain"].items()))
        if args.three_stages:
            print("    3 stages (time with 2 / with 3): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in row["stages3_gain"].items())
                  + f"; voting call with 3 stages / FA4 dense {row['ours_vote_full_s3_over_fa4']:.3f}", flush=True)
        for key, kernels in row["kernels_us"].items():
            print(f"    {key}: " + ", ".join(f"{name} {us}" for name, us in kernels.items()), flush=True)
        torch.cuda.empty_cache()
    results["scratch_bytes"] = scratch_bytes()
    with open(args.json, "w") as fh:
        json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
