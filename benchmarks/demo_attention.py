"""Evidence that the demo DiT's attention is learned and local, and its sparsity/quality trade-off.

1. Locality: the fraction of self-attention probability mass inside a spatio-temporal
   neighbourhood of each query token, for the trained weights and for random initial weights, on
   noised procedural videos at several noise levels.
2. Sweep: uniform thresholds applied with ``litepatch.apply`` to every self-attention layer; for
   each, the fraction of tiles computed and the PSNR/SSIM of the final latents against the dense
   generation of the same seed and prompt.

Usage:
    python benchmarks/demo_attention.py                      # CPU is fine (a few minutes)
    python benchmarks/demo_attention.py --json sweep.json --thresholds=-inf,-10,-6,-2

Example:
    >>> python benchmarks/demo_attention.py --steps 10 --prompts "red circle right" --thresholds=-6,0
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

DEFAULT_THRESHOLDS = [-math.inf, -20, -14, -10, -8, -6, -4, -2, 0]
DEFAULT_PROMPTS = ["red circle moving right", "blue triangle moving up"]
RADII = {"1 frame, 2 rows, 2 cols": (1, 2, 2), "same place, any frame": (7, 1, 1)}


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"thresholds must be comma-separated numbers, got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", nargs="+", default=DEFAULT_PROMPTS)
    p.add_argument(
        "--thresholds", type=_floats, default=DEFAULT_THRESHOLDS,
        help="comma-separated, e.g. --thresholds=-inf,-10,-6,0 (default: %(default)s)",
    )
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-locality", action="store_true")
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def locality_table(device) -> dict:
    from litepatch.demo.data import make_videos
    from litepatch.demo.model import DemoDiT, attention_locality, load_demo_model

    trained = load_demo_model(device=device)
    torch.manual_seed(0)
    random_model = DemoDiT(trained.config).to(device).eval()
    videos, cond = make_videos(4, seed=12345, device=device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    noise = torch.randn(videos.shape, generator=gen).to(device)
    results = {}
    print("\n## Attention locality (fraction of self-attention mass inside the neighbourhood, mean over 4 videos)\n")
    print("| neighbourhood | sigma | uniform | random weights | trained (mean) | trained per layer |")
    print("|---|---|---|---|---|---|")
    for label, radius in RADII.items():
        for sigma in (0.25, 0.5, 0.75):
            noisy = (1 - sigma) * videos + sigma * noise
            t = sigma * 1000.0
            tr = attention_locality(trained, noisy, t, cond, radius=radius)
            rd = attention_locality(random_model, noisy, t, cond, radius=radius)
            results[f"{label} @ {sigma}"] = {"trained": tr, "random": rd}
            per_layer = " ".join(f"{v:.2f}" for v in tr["per_layer"])
            print(f"| {label} | {sigma} | {tr['uniform']:.3f} | {rd['mean']:.3f} | {tr['mean']:.3f} | {per_layer} |")
    return results


def sweep_table(args, device) -> list[dict]:
    import litepatch
    from litepatch.demo.data import parse_condition
    from litepatch.demo.model import load_demo_model
    from litepatch.demo.sampling import psnr, sample, ssim

    model = load_demo_model(device=device)
    conds = [torch.tensor([parse_condition(p)]) for p in args.prompts]
    with torch.inference_mode():
        dense = [sample(model, c, steps=args.steps, guidance=args.guidance, seed=args.seed + i)
                 for i, c in enumerate(conds)]
    rows = []
    print(f"\n## Uniform threshold sweep ({args.steps} steps, CFG {args.guidance}, warm-up {args.warmup_steps}, "
          f"{len(conds)} prompts, tiles 128x64, {device})\n")
    print("| threshold | tiles computed | PSNR vs dense (dB) | SSIM vs dense | min PSNR |")
    print("|---|---|---|---|---|")
    for threshold in args.thresholds:
        handle = litepatch.apply(model, threshold=threshold, warmup_steps=args.warmup_steps)
        try:
            psnrs, ssims = [], []
            start = time.perf_counter()
            for i, (c, ref) in enumerate(zip(conds, dense)):
                handle.reset()
                with torch.inference_mode():
                    x = sample(model, c, steps=args.steps, guidance=args.guidance, seed=args.seed + i)
                psnrs.append(psnr(x, ref))
                ssims.append(ssim(x, ref))
            seconds = time.perf_counter() - start
            kept = handle.stats().kept_fraction()
        finally:
            handle.remove()
        finite = [p for p in psnrs if math.isfinite(p)]
        mean_psnr = sum(finite) / len(finite) if len(finite) == len(psnrs) else math.inf
        row = {"threshold": threshold, "kept_fraction": kept, "psnr": mean_psnr, "min_psnr": min(psnrs),
               "ssim": sum(ssims) / len(ssims), "seconds": seconds}
        rows.append(row)
        print(f"| {threshold:g} | {kept:.3f} | {_db(mean_psnr)} | {row['ssim']:.4f} | {_db(min(psnrs))} |", flush=True)
    return rows


def _db(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    out = {"device": str(device), "steps": args.steps, "prompts": args.prompts}
    if not args.skip_locality:
        out["locality"] = locality_table(device)
    if not args.skip_sweep:
        out["sweep"] = sweep_table(args, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
