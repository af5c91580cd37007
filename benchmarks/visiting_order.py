"""Key-tile visiting order on the trained demo DiT: "anchor" (last call's strongest tile first, then
ascending) vs "alternate" (the published kernel's direction flip per call), DESIGN §1.

For each order and threshold: fraction of tiles computed over the generation and PSNR/SSIM of the
final latents against the dense generation of the same seed. The better order at equal quality
(more tiles skipped) is the default.

Usage:
    python benchmarks/visiting_order.py --steps 15 --thresholds=-4,-2,0 --json order.json
"""

from __future__ import annotations

import argparse
import json

import torch

import litepatch
from litepatch.demo.data import parse_condition
from litepatch.demo.model import load_demo_model
from litepatch.demo.sampling import psnr, sample, ssim


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--thresholds", default="-4,-2,0", help="comma-separated log2 thresholds")
    parser.add_argument("--prompt", default="red circle moving right")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    thresholds = [float(v) for v in args.thresholds.split(",") if v.strip()]

    # bfloat16 on CUDA, as `litepatch demo` runs it: the GPU kernel does not take float32.
    model = load_demo_model(device=args.device).to(torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    cond = torch.tensor([parse_condition(args.prompt)])
    with torch.inference_mode():
        dense = sample(model, cond, steps=args.steps, seed=args.seed)
        rows = []
        for threshold in thresholds:
            for order in ("anchor", "alternate"):
                handle = litepatch.apply(model, threshold=threshold, order=order)
                try:
                    patched = sample(model, cond, steps=args.steps, seed=args.seed)
                    kept = handle.stats().kept_fraction()
                finally:
                    handle.remove()
                rows.append(dict(threshold=threshold, order=order, kept_fraction=kept,
                                 psnr=psnr(patched, dense), ssim=ssim(patched, dense)))

    print(f"visiting order on the demo DiT ({args.steps} steps, CFG, seed {args.seed}, {args.device})")
    print(f"{'threshold':>9}  {'order':<9}  {'tiles computed':>14}  {'PSNR dB':>8}  {'SSIM':>6}")
    for row in rows:
        print(f"{row['threshold']:>9.1f}  {row['order']:<9}  {row['kept_fraction']:>14.3f}  "
              f"{row['psnr']:>8.2f}  {row['ssim']:>6.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
