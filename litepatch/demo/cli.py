"""``litepatch demo``: the built-in trained demo DiT, generated dense and with litepatch, compared.

Prints per denoising step the fraction of attention tiles computed and the PSNR of the patched
latents against the dense ones at the same step, then the final PSNR/SSIM and the wall time of both
runs. Writes ``frames.png`` (dense row over patched row, and their difference) and
``kept_tiles.png`` (kept fraction per layer x step) into ``--out``.

Example:
    >>> from litepatch.cli import main
    >>> main(["demo", "--steps", "10", "--out", "/tmp/demo"])
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

DEFAULT_PROMPT = "red circle moving right"
DEFAULT_STEPS = 25
DEMO_RECIPE = "demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"denoising steps (default {DEFAULT_STEPS})")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument(
        "--threshold", type=float, default=None,
        help="uniform skip threshold in log2 units, <= 0 (default: the built-in demo recipe's)",
    )
    parser.add_argument("--warmup-steps", type=int, default=None, help="dense steps first (default: the recipe's)")
    parser.add_argument("--recipe", default=DEMO_RECIPE, help="recipe path or name (default: the built-in 'demo')")
    parser.add_argument(
        "--prompt", default=DEFAULT_PROMPT,
        help=f"shape, colour and direction, e.g. 'blue triangle moving up' (default {DEFAULT_PROMPT!r})",
    )
    parser.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (default 4)")
    parser.add_argument(
        "--device", default="auto", help="'auto' (cuda when present, else cpu), 'cpu', 'cuda', 'cuda:1'"
    )
    parser.add_argument(
        "--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
        help="model dtype; 'auto': bfloat16 on CUDA (what the GPU kernel takes), float32 on CPU",
    )
    parser.add_argument("--weights", default=None, help="demo model weights (default: the committed ones)")
    parser.add_argument("--out", default="litepatch-out", help="output folder (default ./litepatch-out/)")


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a torch device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available on this machine; use --device cpu")
    return device


def _dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _load_recipe(name_or_path: str):
    from litepatch.recipes import load, resolve

    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return load(path)
    return resolve(name_or_path)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate(model, cond, args, device, on_step):
    from .sampling import sample

    _sync(device)
    start = time.perf_counter()
    latents = sample(model, cond, steps=args.steps, guidance=args.guidance, seed=args.seed, callback=on_step)
    _sync(device)
    return latents, time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    import torch

    import litepatch

    from .data import describe, parse_condition
    from .model import load_demo_model
    from .sampling import psnr, ssim

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.threshold is not None:
        litepatch.kernels.check_threshold(args.threshold)
    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    device = _device(args.device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe = _load_recipe(args.recipe)
    cond = torch.tensor([parse_condition(args.prompt)])
    model = load_demo_model(args.weights, device=device)
    dtype = _dtype(args.dtype, device)
    model = model.to(dtype)
    cfg = model.config
    print(f"litepatch demo: {describe(cond[0])!r}, {args.steps} steps, CFG {args.guidance}, seed {args.seed}, "
          f"device {device} ({torch.get_num_threads()} threads), {dtype}" if device.type == "cpu" else
          f"litepatch demo: {describe(cond[0])!r}, {args.steps} steps, CFG {args.guidance}, seed {args.seed}, "
          f"device {device} ({torch.cuda.get_device_name(device)}), {dtype}")
    print(f"model: demo DiT, {cfg.layers} layers, {cfg.heads} heads x {cfg.head_dim}, {cfg.seq_len} video tokens "
          f"({cfg.frames}x{cfg.height}x{cfg.width} RGB latents)")

    dense_steps: list[torch.Tensor] = []
    with torch.inference_mode():
        dense, dense_time = _generate(model, cond, args, device, lambda i, s, x: dense_steps.append(x.clone()))

    handle = litepatch.apply(model, recipe=recipe, threshold=args.threshold, warmup_steps=args.warmup_steps)
    try:
        rows: list[tuple[int, float, dict, float]] = []
        seen = [0]

        def on_step(i: int, sigma: float, x: torch.Tensor) -> None:
            records = handle.stats().records
            new, seen[0] = records[seen[0]:], len(records)
            per_branch: dict = {}
            for r in new:
                per_branch.setdefault(r["branch"], []).append(r)
            fractions = {b: _weighted(rs) for b, rs in per_branch.items()}
            fractions["all"] = _weighted(new)
            rows.append((i, sigma, fractions, psnr(x, dense_steps[i])))

        with torch.inference_mode():
            patched, patched_time = _generate(model, cond, args, device, on_step)
        stats = handle.stats()
    finally:
        handle.remove()

    threshold = args.threshold if args.threshold is not None else recipe.threshold
    warmup = args.warmup_steps if args.warmup_steps is not None else recipe.warmup_steps
    print(f"recipe {stats.recipe_name!r}: threshold {threshold}, warm-up {warmup} steps")
    branches = [b for b in rows[0][2] if b != "all"] if rows else []
    names = {0: "cond", 1: "uncond"}  # sample() calls the conditional branch first
    header = f"{'step':>4} {'sigma':>6} {'tiles computed':>15}" + "".join(
        f" {names.get(b, str(b)):>9}" for b in branches
    )
    print(header + f" {'PSNR vs dense':>14}")
    for i, sigma, fractions, p in rows:
        cells = "".join(f" {fractions.get(b, float('nan')):>9.3f}" for b in branches)
        print(f"{i:>4} {sigma:>6.3f} {fractions['all']:>15.3f}{cells} {_db(p):>14}")

    final_psnr, final_ssim = psnr(patched, dense), ssim(patched, dense)
    kept = stats.kept_fraction()
    print(f"final: PSNR {_db(final_psnr)} dB, SSIM {final_ssim:.4f} vs dense; tiles computed {kept:.3f} "
          f"({(1 - kept) * 100:.1f} % skipped)")
    for line in speed_lines(device, kept, dense_time, patched_time):
        print(line)

    frames_path = write_frames_png(dense, patched, out_dir / "frames.png")
    heat_path = write_heatmap_png(stats.records, out_dir / "kept_tiles.png", steps=args.steps)
    print(f"wrote {frames_path} (top: dense, middle: litepatch, bottom: |difference| x4) and {heat_path}")
    return 0


def speed_lines(device: torch.device, kept: float, dense_time: float, patched_time: float) -> list[str]:
    """The demo's last lines: what the run says about speed, and only what it can say on this device.

    On CUDA the wall times compare the fast kernels. On a CPU the sparse path is the exact PyTorch
    reference (an oracle, slower than SDPA whatever it skips), so the result there is the attention
    work saved, and the wall times are labelled as what they are.
    """
    from litepatch.kernels import registry

    saved = f"attention work saved: {(1 - kept) * 100:.1f} % of the tiles (the attention FLOPs scale with them)"
    if device.type == "cuda":
        probe = torch.empty(1, 128, 1, 64, device=device, dtype=torch.bfloat16)
        backend = registry.select(probe, 128).name if registry.refusal(probe, 128) is None else "model's own"
        return [saved, f"wall time (cuda, {backend} backend): dense {dense_time:.2f} s, litepatch {patched_time:.2f} s "
                       f"({dense_time / patched_time:.2f}x speed-up)"]
    return [
        saved,
        f"wall time (cpu, not a speed result): dense {dense_time:.2f} s, litepatch {patched_time:.2f} s. On a CPU "
        "the sparse path is the exact PyTorch reference, an oracle that is slower than SDPA however much it skips.",
        "speed is measured on the GPU: python benchmarks/e2e.py (README, Performance: H200 numbers).",
    ]


def _weighted(records: list[dict]) -> float:
    total = sum(r["total_tiles"] for r in records)
    return sum(r["kept_tiles"] for r in records) / total if total else 1.0


def _db(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2f}"


def write_frames_png(dense, patched, path: Path, scale: int = 4) -> Path:
    """PNG strip: dense frames on top, litepatch frames below, then their absolute difference x4."""
    import numpy as np
    from PIL import Image, ImageDraw

    from .sampling import to_frames

    d, p = to_frames(dense)[0].numpy(), to_frames(patched)[0].numpy()  # [F, H, W, 3]
    diff = np.clip(np.abs(d.astype(np.int16) - p.astype(np.int16)) * 4, 0, 255).astype(np.uint8)
    label_w, gap = 70, 2
    frames, h, w, _ = d.shape
    tile_h, tile_w = h * scale, w * scale
    canvas = Image.new("RGB", (label_w + frames * (tile_w + gap), 3 * (tile_h + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for row, (name, video) in enumerate((("dense", d), ("litepatch", p), ("|diff| x4", diff))):
        y = row * (tile_h + gap)
        draw.text((4, y + tile_h // 2 - 6), name, fill=(0, 0, 0))
        for f in range(frames):
            tile = Image.fromarray(video[f]).resize((tile_w, tile_h), Image.NEAREST)
            canvas.paste(tile, (label_w + f * (tile_w + gap), y))
    canvas.save(path)
    return path


def write_heatmap_png(records: list[dict], path: Path, steps: int, cell: int = 14) -> Path:
    """PNG heatmap of the fraction of tiles computed per layer (rows) x step (columns), branches averaged."""
    import numpy as np
    from PIL import Image, ImageDraw

    layers = sorted({r["layer"] for r in records}, key=_natural_key)
    kept = np.full((len(layers), steps), np.nan)
    for li, layer in enumerate(layers):
        for step in range(steps):
            rs = [r for r in records if r["layer"] == layer and r["step"] == step]
            if rs:
                kept[li, step] = _weighted(rs)
    label_w, top, bar = 150, 24, 30
    width = label_w + steps * cell + bar + 40
    height = top + max(1, len(layers)) * cell + 30
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), "fraction of attention tiles computed (layer x step); grey: no record", fill=(0, 0, 0))
    for li, layer in enumerate(layers):
        y = top + li * cell
        draw.text((4, y + 1), layer, fill=(0, 0, 0))
        for step in range(steps):
            x = label_w + step * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=_colour(kept[li, step]))
    for step in range(0, steps, 5):
        draw.text((label_w + step * cell, top + len(layers) * cell + 4), str(step), fill=(0, 0, 0))
    x0 = label_w + steps * cell + 10
    for k in range(len(layers) * cell):
        value = 1 - k / max(1, len(layers) * cell - 1)
        draw.line([x0, top + k, x0 + bar // 2, top + k], fill=_colour(value))
    draw.text((x0 + bar // 2 + 2, top - 2), "1.0", fill=(0, 0, 0))
    draw.text((x0 + bar // 2 + 2, top + len(layers) * cell - 10), "0.0", fill=(0, 0, 0))
    canvas.save(path)
    return path


def _colour(value: float) -> tuple[int, int, int]:
    """Dark blue (0: every tile skipped) to yellow (1: every tile computed); grey for NaN."""
    if value != value:
        return (200, 200, 200)
    stops = [(0.0, (48, 18, 59)), (0.25, (50, 101, 204)), (0.5, (27, 190, 170)), (0.75, (160, 220, 60)),
             (1.0, (250, 230, 40))]
    value = min(1.0, max(0.0, float(value)))
    for (v0, c0), (v1, c1) in zip(stops, stops[1:]):
        if value <= v1:
            t = (value - v0) / (v1 - v0)
            return tuple(int(round(a + (b - a) * t)) for a, b in zip(c0, c1))
    return stops[-1][1]


def _natural_key(name: str) -> list:
    import re

    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
