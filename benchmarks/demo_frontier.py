"""What any per-layer setting can reach on the demo DiT: a wide random search of the calibrator's space.

Each trial draws a threshold per attention layer in ``[--low, 0]`` and a warm-up in ``[0, steps/4]``
(the space ``benchmarks/calibrate_demo.py`` searches, without the sensitivity parameterisation) and
records the kept fraction and the worst PSNR vs dense over the calibration samples (the demo's PSNR: latents in
[-1, 1], data range 2, as ``litepatch demo`` and ``calibrate_demo.py`` report it). The best kept
fraction at ``psnr >= --psnr`` over many trials is an estimate of the attainable frontier, against
which the calibrator's 30-generation result is judged.

Example:
    $ python benchmarks/demo_frontier.py --trials 150 --json bench-out/demo_frontier.json
"""

from __future__ import annotations

import argparse
import json
import random
import warnings

import torch

from calibrate_demo import CALIBRATION


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--trials", type=int, default=150)
    parser.add_argument("--low", type=float, default=-6.0)
    parser.add_argument("--psnr", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    import litepatch
    from litepatch.demo.model import load_demo_model
    from litepatch.demo.sampling import psnr, sample

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_demo_model(device=device).to(torch.bfloat16 if device == "cuda" else torch.float32)

    def run(s) -> torch.Tensor:
        cond, seed = s
        return sample(model, torch.tensor([cond]), steps=args.steps, guidance=args.guidance, seed=seed).clamp(-1, 1)

    dense = [run(s) for s in CALIBRATION]
    rng = random.Random(args.seed)
    handle = litepatch.apply(model, threshold=-6.0)
    trials = []
    try:
        for _ in range(args.trials):
            layers = {name: round(rng.uniform(args.low, 0.0), 3) for name in handle.layers}
            warmup = rng.randint(0, max(1, args.steps // 4))
            kept, worst = [], float("inf")
            for s, ref in zip(CALIBRATION, dense):
                handle.configure(threshold=args.low, warmup_steps=warmup, layers=layers)
                worst = min(worst, psnr(run(s), ref))
                kept.append(handle.stats().kept_fraction())
            trials.append({"layers": layers, "warmup": warmup, "kept_fraction": sum(kept) / len(kept), "psnr": worst})
    finally:
        handle.remove()
    feasible = [t for t in trials if t["psnr"] >= args.psnr]
    best = min(feasible, key=lambda t: t["kept_fraction"], default=None)
    print(f"{len(trials)} random per-layer trials ({2 * len(trials)} generations) on {device}: "
          f"{len(feasible)} reach psnr >= {args.psnr}")
    if best:
        print(f"best: {1 - best['kept_fraction']:.1%} skipped at {best['psnr']:.2f} dB, warm-up {best['warmup']}, "
              f"thresholds {best['layers']}")
    for bound in (40, 35, 30, 25, 20):
        ok = [t for t in trials if t["psnr"] >= bound]
        top = max((1 - t["kept_fraction"] for t in ok), default=0.0)
        print(f"  psnr >= {bound} dB: at most {top:.1%} skipped")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "steps": args.steps, "trials": trials}, f, indent=1)


if __name__ == "__main__":
    main()
