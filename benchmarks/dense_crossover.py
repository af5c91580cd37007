"""Where flash-attn-4's dense forward starts to beat the SDPA call a model makes itself, host time included.

A patched model's dense calls (warm-up steps, layers a recipe keeps dense, ``threshold=-inf``) run
``litepatch.kernels.dense_attention`` where :func:`litepatch.kernels.beats_sdpa` says so (until 2026-12-05: only
above 1e12 FLOP, as flash-attn-4's interface cost 62-82 us of host time per call). Below some size a call is
host-bound, and then what counts is the host time of a launch, not the kernel. So each call here is timed as a model issues it: ``--calls`` calls back
to back, one synchronisation at the end, time per call (the larger of host and GPU time wins). Per shape, in
interleaved rounds (median of per-round ratios):

* ``sdpa``: ``F.scaled_dot_product_attention`` on ``[B, H, S, D]`` views, PyTorch's own choice of kernel (what the
  model would run);
* ``direct``: ``flash_attn_4_dense``, flash-attn-4's kernel launched directly (what ``dense_attention`` runs);
* ``interface``: flash-attn-4's ``_flash_attn_fwd`` (its Python interface).

Usage::

    python benchmarks/dense_crossover.py --json dense_crossover.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from kernel import median_ratio  # noqa: E402

# (batch, tokens, heads, head_dim), from a few hundred tokens to Flux 1024^2 and Wan 480p
SHAPES = {
    "s512-h12": (1, 512, 12, 128),
    "s1024-h24": (1, 1024, 24, 128),
    "s2048-h24": (1, 2048, 24, 128),
    "sd3-1024 (4429 tok)": (1, 4429, 24, 64),
    "flux-512 (1536 tok)": (1, 1536, 24, 128),
    "flux-1024 (4608 tok)": (1, 4608, 24, 128),
    "s8192-h24": (1, 8192, 24, 128),
    "wan1.3b-480p": (1, 32760, 12, 128),
}


def per_call_us(fn, calls: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def shape_row(shape, calls: int, rounds: int) -> dict:
    from flash_attn.cute import interface as fa4

    from litepatch.kernels import beats_sdpa
    from litepatch.kernels.cute_fwd import flash_attn_4_dense

    batch, seq, heads, dim = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    fns = {
        "sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt),
        "direct": lambda: flash_attn_4_dense(q, k, v),
        "interface": lambda: fa4._flash_attn_fwd(q, k, v)[0],
    }
    n = max(5, min(calls, int(2e13 / (4.0 * batch * heads * seq * seq * dim))))  # long shapes: fewer calls
    for fn in fns.values():  # compile, warm up
        per_call_us(fn, 3)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        names = list(fns)[r % len(fns):] + list(fns)[: r % len(fns)]  # rotate the order
        for name in names:
            times[name].append(per_call_us(fns[name], n))
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "shape": dict(zip(("batch", "seq", "heads", "dim"), shape)),
        "flop": 4.0 * batch * heads * seq * seq * dim,
        "calls_per_timing": n,
        "us_per_call": med,
        "sdpa_over_direct": median_ratio(times, "sdpa", "direct"),  # above 1: the direct flash-attn-4 launch is faster
        "interface_over_direct": median_ratio(times, "interface", "direct"),
        "beats_sdpa_says": beats_sdpa(q),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="back-to-back calls per timing (fewer on long shapes)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = {}
    print(f"{torch.cuda.get_device_name()}: time per call, {args.rounds} rotating rounds")
    for name, shape in SHAPES.items():
        row = rows[name] = shape_row(shape, args.calls, args.rounds)
        us = row["us_per_call"]
        print(f"{name:<22} {row['flop']:9.2e} FLOP  sdpa {us['sdpa']:9.1f} us  direct {us['direct']:9.1f}  "
              f"interface {us['interface']:9.1f}  sdpa/direct {row['sdpa_over_direct']:.3f}  "
              f"interface/direct {row['interface_over_direct']:.3f}  beats_sdpa {row['beats_sdpa_says']}",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
