"""Calibrates the built-in demo DiT and compares the result with the best uniform threshold.

1. ``litepatch.calibration.calibrate`` on 2 calibration samples (budget ``psnr >= 30`` vs dense),
   SQLite storage in the output folder (re-running the script resumes the study);
2. the chosen recipe is checked on held-out samples (PSNR, SSIM, skipped tiles, time);
3. baseline: one threshold for every layer (same warm-up as the chosen recipe; the default visiting
   order, and also the recipe's when ``--orders`` let it choose another), bisected until its
   kept fraction on the held-out samples equals the recipe's (equal speed: on CUDA the kernel's time
   follows the computed tiles; on CPU the reference backend is not faster, so kept fraction is the
   speed proxy), and its held-out PSNR at that point, interpolated between the bracketing thresholds.

Outputs in ``--out``: recipe.yaml, report.md/json, plots, and ``summary.json`` / ``summary.md``.

Example:
    $ python benchmarks/calibrate_demo.py --steps 20 --trials 12 --out bench-out/calibrate_demo
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import torch

CALIBRATION = [([0, 0, 1], 0), ([2, 3, 0], 1)]  # (condition [shape, colour, direction], seed)
HELD_OUT = [([1, 2, 3], 7), ([3, 5, 2], 8)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--budget", default="psnr >= 30")
    parser.add_argument("--objective", default="auto", choices=("auto", "time", "sparsity"))
    parser.add_argument("--max-dense-layers", type=int, default=2)
    parser.add_argument("--schedule", action="store_true", help="also search a per-step threshold ramp")
    parser.add_argument("--orders", default="anchor", help="visiting orders to search, e.g. anchor,alternate")
    parser.add_argument("--bisect-steps", type=int, default=5, help="uniform-threshold bisection steps")
    parser.add_argument("--out", default="bench-out/calibrate_demo")
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    from litepatch.calibration import SearchSpace, calibrate
    from litepatch.demo.model import load_demo_model
    from litepatch.demo.sampling import sample
    from litepatch.recipes import save

    device = "cuda" if torch.cuda.is_available() else "cpu"
    objective = args.objective if args.objective != "auto" else ("time" if device == "cuda" else "sparsity")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # bfloat16 on CUDA, as `litepatch demo` runs it: the GPU kernel does not take float32.
    model = load_demo_model(device=device).to(torch.bfloat16 if device == "cuda" else torch.float32)

    def run(m, s) -> torch.Tensor:  # one generation; frames live in [-1, 1]
        cond, seed = s
        return sample(m, torch.tensor([cond]), steps=args.steps, guidance=args.guidance, seed=seed).clamp(-1, 1)

    start = time.perf_counter()
    recipe, report = calibrate(
        run, CALIBRATION, args.budget, model=model, trials=args.trials, objective=objective,
        storage=f"sqlite:///{(out_dir / 'study.db').resolve()}",
        study_name=f"demo-{args.steps}steps-{objective}-{args.budget.replace(' ', '')}{'-schedule' if args.schedule else ''}{'-' + args.orders.replace(',', '-') if args.orders != 'anchor' else ''}",
        held_out=HELD_OUT, space=SearchSpace(level=(-8.0, 0.0), warmup=(0, max(1, args.steps // 4)),
                                             max_dense_layers=args.max_dense_layers, schedule=args.schedule,
                                             orders=tuple(args.orders.split(","))),
        cache_dir=out_dir / "dense", name="demo-dit", context={"steps": args.steps, "cfg_mode": "sequential"},
    )
    calib_seconds = time.perf_counter() - start
    save(recipe, out_dir / "recipe.yaml")
    report.save(out_dir)

    # ---- the uniform baseline at equal kept fraction (speed) on the held-out samples, in the default
    # visiting order and, when the recipe chose another, in the recipe's order too
    dense = {json.dumps(s): run(model, s) for s in HELD_OUT}
    target = 1.0 - report.held_out_skipped()
    baselines = {order: uniform_baseline(model, run, dense, recipe.warmup_steps, order, target, args.bisect_steps)
                 for order in dict.fromkeys(("anchor", recipe.order))}
    uniform_psnr, points = baselines["anchor"]

    ours_psnr = report.held_out_worst("psnr")
    summary = {
        "device": report.hardware, "steps": args.steps, "guidance": args.guidance, "objective": objective,
        "budget": args.budget, "trials_run": len(report.trials), "trials_to_best": report.trials_to_best(),
        "calibration_generations": report.generations, "final_check_generations": report.held_out_generations,
        "calibration_seconds": calib_seconds,
        "held_out_psnr_worst": ours_psnr, "held_out_ssim_worst": report.held_out_worst("ssim"),
        "held_out_skipped": report.held_out_skipped(), "speedup_measured": report.speedup,
        "uniform_psnr_at_equal_kept": uniform_psnr, "uniform_points": points, "recipe_order": recipe.order,
        "uniform_by_order": {o: {"psnr_at_equal_kept": b[0], "points": b[1]} for o, b in baselines.items()},
        "gain_db": ours_psnr - uniform_psnr, "chosen_params": report.best["params"],
        "per_layer_threshold": report.per_layer_threshold,
        "targets": {
            "held_out_psnr>=30": ours_psnr >= 30, "skipped>=40%": report.held_out_skipped() >= 0.40,
            "generations<=30": report.generations["total"] <= 30, "gain>=2dB": ours_psnr - uniform_psnr >= 2.0,
        },
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=repr))
    lines = [
        f"| demo DiT, {args.steps} steps, CFG {args.guidance}, {report.hardware} | value |",
        "|---|---|",
        f"| trials run / to the chosen one | {len(report.trials)} / {report.trials_to_best()} |",
        f"| calibration cost (generations) | {report.generations['total']} "
        f"({report.generations['dense']} dense + {report.generations['sensitivity']} sensitivity + "
        f"{report.generations['trials']} trials) |",
        f"| held-out PSNR (worst of {len(HELD_OUT)}) | {ours_psnr:.2f} dB |",
        f"| held-out tiles skipped | {report.held_out_skipped():.1%} |",
        f"| uniform threshold at equal kept fraction: PSNR | {uniform_psnr:.2f} dB |",
        f"| gain over uniform | {ours_psnr - uniform_psnr:+.2f} dB |",
        *(f"| uniform threshold in the recipe's order ({o}) at equal kept fraction: PSNR | {b[0]:.2f} dB |"
          for o, b in baselines.items() if o != "anchor"),
        f"| measured time patched / dense | {report.patched_seconds:.2f} s / {report.dense_seconds:.2f} s |",
    ]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(summary["targets"]))


def uniform_baseline(model, run, dense: dict, warmup: int, order: str, target: float, bisect_steps: int):
    """PSNR (worst held-out sample) of one threshold for every layer, bisected to the kept fraction
    ``target`` and interpolated between the bracketing thresholds; returns ``(psnr, points)``."""
    import litepatch
    from litepatch.calibration import get_metric

    psnr = get_metric("psnr")
    handle = litepatch.apply(model, threshold=-8.0)
    points = []

    def uniform(t: float) -> float:
        kept, worst = [], math.inf
        for s in HELD_OUT:
            handle.configure(threshold=t, warmup_steps=warmup, order=order)
            out = run(model, s)
            kept.append(handle.stats().kept_fraction())
            worst = min(worst, psnr(out, dense[json.dumps(s)]))
        points.append({"threshold": t, "kept_fraction": sum(kept) / len(kept), "psnr": worst})
        return points[-1]["kept_fraction"]

    try:
        lo, hi = -8.0, 0.0  # kept fraction falls as the threshold rises
        k_lo, k_hi = uniform(lo), uniform(hi)
        if not (k_hi <= target <= k_lo):
            print(f"uniform thresholds in [{lo}, {hi}] keep {k_hi:.3f}..{k_lo:.3f}; target {target:.3f} is outside")
        for _ in range(bisect_steps):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if uniform(mid) > target else (lo, mid)
    finally:
        handle.remove()
    above = min((p for p in points if p["kept_fraction"] >= target), key=lambda p: p["kept_fraction"], default=None)
    below = max((p for p in points if p["kept_fraction"] < target), key=lambda p: p["kept_fraction"], default=None)
    if above and below:
        w = (above["kept_fraction"] - target) / (above["kept_fraction"] - below["kept_fraction"])
        return above["psnr"] + w * (below["psnr"] - above["psnr"]), points
    return (above or below)["psnr"], points


if __name__ == "__main__":
    main()
