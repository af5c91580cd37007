"""Where the video demo's generation time goes on a GPU, dense and patched: GPU time by kernel family, host syncs.

Made when `litepatch demo` on the H200 measured dense 0.514 s and patched 0.512 s at 38.6 % of the tiles skipped. It
tells apart the causes of such a result: the sparse calls' kernels not getting faster (GPU time per family), the
forward waiting on the host (GPU busy time well below wall time), host-device syncs inside the patched forward
(counted with torch's sync debug mode), or a "dense" baseline that is not dense (its kept fraction is recorded;
that was the cause then).

``--compile-blocks`` compiles each transformer block whole (attention through litepatch's custom op), the test of
whether the host is what holds the patched run back: a compiled block issues its kernels from one graph call instead
of ~90 Python-level ops. On a CPU (``--device cpu --model small``) the script runs as a smoke test: CPU op time
instead of GPU kernel time, no syncs to count.

Example (one GPU, flash-attn-4 installed):
    $ python benchmarks/demo_profile.py --cfg-mode batched --fuse-pointwise --json bench-out/demo_profile.json
    $ python benchmarks/demo_profile.py --cfg-mode batched --compile-blocks --json bench-out/demo_profile_compiled.json
"""

from __future__ import annotations

import argparse
import collections
import json
import warnings

import torch

import litepatch
from litepatch.demo.cli import timed_generation
from litepatch.demo.model import load_demo_model
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
    """Seconds of one generation, timed as `litepatch demo` times it."""
    return timed_generation(model, cond, args, torch.device(args.device))[1]


def syncs_per_generation(model, cond, args) -> int | None:
    if args.device != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            generate(model, cond, args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing CUDA operation" in str(w.message) for w in caught)


def gpu_time_by_family(model, cond, args) -> dict[str, dict]:
    """Milliseconds of GPU kernel time per family over one generation, and the kernel counts (on a CPU: CPU time
    of the ops, for the smoke test)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        generate(model, cond, args)
    totals: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)
    for event in prof.key_averages():
        us = (getattr(event, "self_device_time_total", 0.0) or getattr(event, "self_cuda_time_total", 0.0)
              if cuda else event.self_cpu_time_total)
        if us <= 0:
            continue
        totals[family(event.key)] += us / 1000
        counts[family(event.key)] += event.count
    return {name: {"ms": round(ms, 2), "kernels": counts[name]} for name, ms in sorted(totals.items())}


def measure(model, cond, args, label: str) -> dict:
    if args.device == "cuda" or args.compile_blocks:
        generate(model, cond, args)  # warm-up: kernel selection, compilation
    wall = min(generate(model, cond, args) for _ in range(args.timed))
    by_family = gpu_time_by_family(model, cond, args)
    busy = sum(v["ms"] for v in by_family.values())
    row = {"wall_s": round(wall, 4), "gpu_busy_ms": round(busy, 1), "gpu_busy_share": round(busy / 1000 / wall, 3),
           "syncs": syncs_per_generation(model, cond, args), "gpu_ms_by_family": by_family}
    print(f"{label}: wall {wall:.3f} s, GPU busy {busy:.0f} ms ({busy / 10 / wall:.0f} %), "
          f"syncs per generation {row['syncs'] if row['syncs'] is not None else 'n/a'}")
    for name, v in by_family.items():
        print(f"    {name:40s} {v['ms']:9.1f} ms  {v['kernels']:6d} kernels")
    return row


def prepared_model(args, recipe=None) -> tuple[torch.nn.Module, litepatch.LiteHandle | None]:
    """The demo model as the run asks for it (bf16 on the GPU, fused pointwise ops, compiled blocks), patched with
    ``recipe`` before its blocks are compiled when one is given; and the handle."""
    model = load_demo_model(device=args.device, model=args.model)
    model = model.to(torch.bfloat16 if args.device == "cuda" else torch.float32)
    if args.fuse_pointwise:
        model.fuse_pointwise()
    handle = litepatch.apply(model, recipe=recipe) if recipe is not None else None
    if args.compile_blocks:
        for block in model.blocks:
            block.compile(backend=args.compile_backend)
    return model, handle


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg-mode", default="batched", choices=("sequential", "batched"))
    parser.add_argument("--fuse-pointwise", action="store_true")
    parser.add_argument("--compile-blocks", action="store_true",
                        help="torch.compile each block whole (the patched copy after litepatch is applied)")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timed", type=int, default=2, help="timed generations per run (the fastest counts)")
    parser.add_argument("--model", default="video", choices=("video", "small"))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--recipe", default=None, help="default: the shipped recipe of --model")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    recipe = resolve(args.recipe or ("demo-video" if args.model == "video" else "demo"))
    if args.compile_blocks:
        # six blocks, each with dense and sparse calls, fresh and used skip states: room for all of them, so that no
        # block falls back to eager (the count of graphs is reported)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    cond = torch.tensor([[0, 0, 1]])
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "model": args.model,
              "cfg_mode": args.cfg_mode, "fuse_pointwise": args.fuse_pointwise, "compile_blocks": args.compile_blocks}
    with torch.inference_mode():
        result["dense SDPA"] = measure(prepared_model(args)[0], cond, args, "dense SDPA")
        # a second copy, patched before its blocks are compiled: they trace through litepatch's attention (no
        # torch._dynamo.reset() under compiled modules, which left a compiled block calling a dropped graph)
        model, handle = prepared_model(args, recipe)
        handle.configure(threshold=float("-inf"), warmup_steps=0)
        result["litepatch dense path"] = measure(model, cond, args, "litepatch dense path (threshold -inf)")
        result["litepatch dense path"]["kept_fraction"] = handle.stats().kept_fraction()  # 1.0, or not a dense path
        handle.configure(recipe=recipe)
        handle.clear_stats()
        result["patched"] = measure(model, cond, args, f"patched ({recipe.name})")
        result["kept_fraction"] = handle.stats().kept_fraction()
        if args.compile_blocks:
            from torch._dynamo.utils import counters

            result["graphs_compiled"] = counters["stats"]["unique_graphs"]
            print(f"graphs compiled: {result['graphs_compiled']}")
        print(f"kept fraction {result['kept_fraction']:.3f}")
        handle.remove()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
