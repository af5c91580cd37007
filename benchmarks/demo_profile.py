"""Where the video demo's generation time goes on a GPU, dense and patched: GPU time by kernel family, host syncs.

`litepatch demo` on the H200 (batched CFG, fused pointwise, the shipped recipe) measured dense 0.514 s and patched
0.512 s at 38.6 % of the tiles skipped. This script tells apart the possible causes: the sparse calls' kernels not
getting faster (GPU time per family), the forward waiting on the host (GPU busy time well below wall time), or
host-device syncs inside the patched forward (counted with torch's sync debug mode).

Example (one GPU, flash-attn-4 installed):
    $ python benchmarks/demo_profile.py --cfg-mode batched --fuse-pointwise --json bench-out/demo_profile.json
"""

from __future__ import annotations

import argparse
import collections
import json
import time
import warnings

import torch

import litepatch
from litepatch.demo.model import load_demo_model
from litepatch.demo.sampling import sample
from litepatch.recipes import resolve

FAMILIES = (  # kernel name fragment -> family, first match wins
    ("LiteAttentionForwardSm90", "LiteAttention (CuTe)"),
    ("FlashAttentionForwardSm90", "flash-attn-4 dense"),
    ("_list_kernel", "list + commit kernels"),
    ("_commit_kernel", "list + commit kernels"),
    ("_lite_fwd", "LiteAttention (Triton)"),
    ("triton", "other Triton (fused pointwise, ...)"),
    ("flash", "SDPA flash / cuDNN / other attention"),
    ("fmha", "SDPA flash / cuDNN / other attention"),
    ("cudnn", "SDPA flash / cuDNN / other attention"),
    ("gemm", "GEMMs"),
    ("cutlass", "GEMMs"),
    ("nvjet", "GEMMs"),
)


def family(name: str) -> str:
    lowered = name.lower()
    for fragment, label in FAMILIES:
        if fragment.lower() in lowered:
            return label
    return "other"


def generate(model, cond, args) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    sample(model, cond, steps=args.steps, guidance=4.0, seed=0, cfg_mode=args.cfg_mode)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def syncs_per_generation(model, cond, args) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            generate(model, cond, args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing CUDA operation" in str(w.message) for w in caught)


def gpu_time_by_family(model, cond, args) -> dict[str, float]:
    """Milliseconds of GPU kernel time per family over one generation, and the kernel counts."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        generate(model, cond, args)
    totals: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", 0.0) or getattr(event, "self_cuda_time_total", 0.0)
        if us <= 0:
            continue
        totals[family(event.key)] += us / 1000
        counts[family(event.key)] += event.count
    return {name: {"ms": round(ms, 2), "kernels": counts[name]} for name, ms in sorted(totals.items())}


def measure(model, cond, args, label: str) -> dict:
    generate(model, cond, args)  # warm-up
    wall = min(generate(model, cond, args) for _ in range(2))
    by_family = gpu_time_by_family(model, cond, args)
    busy = sum(v["ms"] for v in by_family.values())
    row = {"wall_s": round(wall, 4), "gpu_busy_ms": round(busy, 1), "gpu_busy_share": round(busy / 1000 / wall, 3),
           "syncs": syncs_per_generation(model, cond, args), "gpu_ms_by_family": by_family}
    print(f"{label}: wall {wall:.3f} s, GPU busy {busy:.0f} ms ({busy / 10 / wall:.0f} %), "
          f"syncs per generation {row['syncs']}")
    for name, v in by_family.items():
        print(f"    {name:40s} {v['ms']:9.1f} ms  {v['kernels']:6d} kernels")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg-mode", default="batched", choices=("sequential", "batched"))
    parser.add_argument("--fuse-pointwise", action="store_true")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--recipe", default="demo-video")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model = load_demo_model(device="cuda", model="video").to(torch.bfloat16)
    if args.fuse_pointwise:
        model.fuse_pointwise()
    cond = torch.tensor([[0, 0, 1]])
    result = {"gpu": torch.cuda.get_device_name(), "cfg_mode": args.cfg_mode, "fuse_pointwise": args.fuse_pointwise}
    with torch.inference_mode():
        result["dense SDPA"] = measure(model, cond, args, "dense SDPA")
        handle = litepatch.apply(model, recipe=resolve(args.recipe))
        handle.configure(threshold=float("-inf"), warmup_steps=0)
        result["litepatch dense path"] = measure(model, cond, args, "litepatch dense path (threshold -inf)")
        handle.configure(recipe=resolve(args.recipe))
        handle.clear_stats()
        result["patched"] = measure(model, cond, args, f"patched ({args.recipe})")
        result["kept_fraction"] = handle.stats().kept_fraction()
        print(f"kept fraction {result['kept_fraction']:.3f}")
        handle.remove()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
