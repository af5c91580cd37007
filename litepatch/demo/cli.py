"""``litepatch demo``: a built-in trained demo DiT, generated dense and with litepatch, compared.

The model fits the machine (``--model auto``): the video-scale DiT (16 frames of 64x128, 32768
tokens, heads of 128) on a CUDA GPU, where attention is most of a step and skipped tiles show in
wall time; the small one (8 frames of 32x32, 2048 tokens) on a CPU, where it runs in seconds.
Each comes with its built-in calibrated recipe (``demo-video`` / ``demo``).

Prints per denoising step the fraction of attention tiles computed and the PSNR of the patched
latents against the dense ones at the same step, then the final PSNR/SSIM, the dense-vs-dense
floor (the same generation with another exact SDPA kernel: the noise level to compare with) and
what the run says about speed. On CUDA the times are warm (one generation of each first), same
seed, CUDA-synchronised, against the fastest exact dense kernel measured; on a CPU the sparse path is
the exact PyTorch reference, so the result there is the attention work saved and the speed is
measured on the GPU. Writes ``frames.png`` (dense, patched, difference) and ``kept_tiles.png``
(kept fraction per layer x step, and per head x step for one layer) into ``--out``.

Example:
    >>> from litepatch.cli import main
    >>> main(["demo", "--steps", "10", "--out", "/tmp/demo"])
    >>> main(["demo", "--model", "video"])        # on a CUDA GPU
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

DEFAULT_PROMPT = "red circle moving right"
DEFAULT_STEPS = 25  # on CUDA, as the recipes were calibrated
DEFAULT_STEPS_CPU = 15  # on a CPU: the exact reference is slow, and the demo must finish in under 2 minutes
DEMO_RECIPE = "demo"
RECIPES = {"small": "demo", "video": "demo-video"}
MODELS = ("auto", "small", "video")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="auto", choices=MODELS,
        help="'auto' (default): the video-scale DiT on CUDA, the small one on CPU; or 'small' / 'video'",
    )
    parser.add_argument(
        "--steps", type=int, default=None,
        help=f"denoising steps (default {DEFAULT_STEPS} on CUDA, {DEFAULT_STEPS_CPU} on CPU)",
    )
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument(
        "--threshold", type=float, default=None,
        help="uniform skip threshold in log2 units, <= 0 (default: the built-in recipe's)",
    )
    parser.add_argument("--warmup-steps", type=int, default=None, help="dense steps first (default: the recipe's)")
    parser.add_argument(
        "--recipe", default=None,
        help="recipe path or name (default: the model's built-in one, 'demo' or 'demo-video')",
    )
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
    parser.add_argument(
        "--cfg-mode", default=None, choices=("sequential", "batched"),
        help="classifier-free guidance as two forwards per step or one forward of both branches (half the host work "
             "per step), for the dense and patched runs alike; default: batched on CUDA, sequential on CPU",
    )
    parser.add_argument(
        "--fuse-pointwise", action=argparse.BooleanOptionalAction, default=None,
        help="compile each block's parts between attention calls (projections, norms, RoPE, modulation, MLP) for the "
             "dense and the patched run alike; default: on with CUDA (the eager video forward is bound by the host "
             "issuing its small ops there), off on CPU",
    )
    parser.add_argument("--out", default="litepatch-out", help="output folder (default ./litepatch-out/)")


def _machine_defaults(args: argparse.Namespace, device: torch.device) -> None:
    """The CFG mode and the compiled regions where the command line leaves them open: on CUDA one forward of both
    CFG branches and compiled regions (the eager 32768-token forward is bound by the host issuing its ops, which
    hides what skipped tiles save), on CPU two forwards and eager ops (no compiler needed). Both runs use them."""
    cuda = device.type == "cuda"
    if getattr(args, "cfg_mode", None) is None:
        args.cfg_mode = "batched" if cuda else "sequential"
    if getattr(args, "fuse_pointwise", None) is None:
        args.fuse_pointwise = cuda and _can_compile_for_cuda()
        if cuda and not args.fuse_pointwise:
            print('note: Triton is not installed, so the demo runs eager ops (slower on the host): pip install '
                  '"litepatch[cuda]" compiles the regions between attention calls')


def _can_compile_for_cuda() -> bool:
    """Whether torch.compile can generate GPU code here (its inductor backend needs Triton)."""
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def choose_model(requested: str, device, weights: str | None = None) -> tuple[str, str | None]:
    """Which built-in model the demo runs: ``(name, note)``; ``note`` says why when it is not the asked one.

    ``auto`` is the video-scale model on CUDA (when its weights are there or ``weights`` is given) and
    the small one elsewhere: at 32768 tokens a CPU generation would take far too long.

    Example:
        >>> choose_model("auto", torch.device("cpu"))
        ('small', None)
    """
    from .model import default_weights_path

    if requested not in MODELS:
        raise ValueError(f"--model must be one of {MODELS}, got {requested!r}")
    if requested != "auto":
        return requested, None
    if device.type != "cuda":
        return "small", None
    if weights is None and not default_weights_path("video").is_file():
        return "small", (f"the video-scale weights ({default_weights_path('video').name}) are not installed; "
                         "running the small model")
    return "video", None


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


def timed_generation(model, cond, args, device, on_step=None):
    """``(latents, seconds)`` of one generation with ``args``' steps, guidance, seed and CFG mode, the device
    synchronised before and after (what `litepatch demo` and ``benchmarks/demo_profile.py`` time)."""
    from .sampling import sample

    _sync(device)
    start = time.perf_counter()
    latents = sample(model, cond, steps=args.steps, guidance=args.guidance, seed=args.seed, callback=on_step,
                     cfg_mode=getattr(args, "cfg_mode", "sequential"))
    _sync(device)
    return latents, time.perf_counter() - start


def floor_backend(device) -> tuple[str, list]:
    """The other exact SDPA kernel of the dense-vs-dense floor: ``(label, [SDPBackend])``.

    CUDA: the memory-efficient kernel (the default is flash or cuDNN); CPU: the math kernel (the
    default for float32 is the fused flash kernel).
    """
    from torch.nn.attention import SDPBackend

    if device.type == "cuda":
        return "SDPA memory-efficient", [SDPBackend.EFFICIENT_ATTENTION]
    return "SDPA math", [SDPBackend.MATH]


def _head_fractions(handle, layer: str) -> list[float] | None:
    """Per head, the fraction of tiles in ``layer``'s read list (the next call's tiles), first branch."""
    states = handle.skip_states().get(layer) or {}
    state = states.get(min(states, key=str)) if states else None
    if state is None or not state.initialized:
        return None
    keep = state.read_list()  # [B, H, q_tiles, k_tiles]
    return keep.float().mean(dim=(0, 2, 3)).tolist()


def run(args: argparse.Namespace) -> int:
    import torch

    import litepatch

    from .data import describe, parse_condition
    from .model import load_demo_model
    from .sampling import psnr, ssim

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.threshold is not None:
        litepatch.kernels.check_threshold(args.threshold)
    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    device = _device(args.device)
    if args.steps is None:
        args.steps = DEFAULT_STEPS if device.type == "cuda" else DEFAULT_STEPS_CPU
    _machine_defaults(args, device)
    which, note = choose_model(getattr(args, "model", "auto"), device, args.weights)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe = _load_recipe(args.recipe or RECIPES[which])
    cond = torch.tensor([parse_condition(args.prompt)])
    model = load_demo_model(args.weights, device=device, model=which)
    dtype = _dtype(args.dtype, device)
    model = model.to(dtype)
    if getattr(args, "fuse_pointwise", False):
        model.fuse_pointwise()
    cfg = model.config
    cuda = device.type == "cuda"
    where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} threads"
    if note:
        print(f"note: {note}")
    print(f"litepatch demo: {describe(cond[0])!r}, {args.steps} steps, CFG {args.guidance} ({args.cfg_mode}"
          f"{', fused regions' if args.fuse_pointwise else ''}), seed {args.seed}, "
          f"device {device} ({where}), {dtype}")
    print(f"model: {which} demo DiT, {cfg.layers} layers, {cfg.heads} heads x {cfg.head_dim}, {cfg.seq_len} video "
          f"tokens ({cfg.frames}x{cfg.height}x{cfg.width} RGB latents)")
    if which == "video" and not cuda:
        print("note: the video-scale model on a CPU takes minutes per step; --model small is the CPU demo")

    dense_steps: list[torch.Tensor] = []
    fused = getattr(args, "fuse_pointwise", False)
    with torch.inference_mode():
        if cuda or fused:  # warm-up: kernel selection, allocator; the fused ops' compilation
            timed_generation(model, cond, args, device)
        dense, sdpa_time = timed_generation(model, cond, args, device, lambda i, s, x: dense_steps.append(x.clone()))
        floor_label, backends = floor_backend(device)
        with torch.nn.attention.sdpa_kernel(backends):
            other, _ = timed_generation(model, cond, args, device)
    floor = psnr(other, dense)
    dense_times = {"SDPA (the model's own)": sdpa_time}

    handle = litepatch.apply(model, recipe=recipe, threshold=args.threshold, warmup_steps=args.warmup_steps)
    try:
        probe_layer = handle.layers[len(handle.layers) // 2]
        if cuda:
            # litepatch's own dense path (flash-attn-4 where it runs): a dense baseline too, the faster one counts
            handle.configure(threshold=float("-inf"), warmup_steps=0)
            with torch.inference_mode():
                timed_generation(model, cond, args, device)
                _, lite_dense_time = timed_generation(model, cond, args, device)
            kernel = _dense_kernel_label(model, cfg, device, dtype)
            dense_times[f"{kernel} (litepatch's dense path)"] = lite_dense_time
            handle.configure(recipe=recipe, threshold=args.threshold, warmup_steps=args.warmup_steps)
            with torch.inference_mode():
                timed_generation(model, cond, args, device)  # warm-up of the sparse kernel
                _, patched_time = timed_generation(model, cond, args, device)  # timed: no per-step host syncs
        rows: list[tuple[int, float, dict, float]] = []
        heads: list[list[float] | None] = []
        handle.clear_stats()
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
            heads.append(_head_fractions(handle, probe_layer))

        with torch.inference_mode():
            patched, instrumented_time = timed_generation(model, cond, args, device, on_step)
        if not cuda:
            patched_time = instrumented_time
        records = handle.stats().records
        stats_name = handle.stats().recipe_name
    finally:
        handle.remove()

    threshold = args.threshold if args.threshold is not None else recipe.threshold
    warmup = args.warmup_steps if args.warmup_steps is not None else recipe.warmup_steps
    print(f"recipe {stats_name!r}: threshold {threshold}{' (per-layer overrides)' if recipe.layers else ''}, "
          f"warm-up {warmup} steps")
    branches = [b for b in rows[0][2] if b != "all"] if rows else []
    # sample() calls the conditional branch first; batched CFG runs both in one call (rows of one state)
    names = {0: "cond+unc"} if getattr(args, "cfg_mode", "sequential") == "batched" else {0: "cond", 1: "uncond"}
    header = f"{'step':>4} {'sigma':>6} {'tiles computed':>15}" + "".join(
        f" {names.get(b, str(b)):>9}" for b in branches
    )
    print(header + f" {'PSNR vs dense':>14}")
    for i, sigma, fractions, p in rows:
        cells = "".join(f" {fractions.get(b, float('nan')):>9.3f}" for b in branches)
        print(f"{i:>4} {sigma:>6.3f} {fractions['all']:>15.3f}{cells} {_db(p):>14}")

    final_psnr, final_ssim = psnr(patched, dense), ssim(patched, dense)
    kept = _weighted(records)
    print(f"final: PSNR {_db(final_psnr)} dB, SSIM {final_ssim:.4f} vs dense; tiles computed {kept:.3f} "
          f"({(1 - kept) * 100:.1f} % skipped)")
    print(f"dense-vs-dense floor: PSNR {_db(floor)} dB (the same generation with {floor_label} vs the default "
          "kernel; differences below this are kernel noise)")
    frames_path = write_frames_png(dense, patched, out_dir / "frames.png", scale=4 if cfg.width <= 32 else 1,
                                   max_frames=8)
    head_rows = [None] + heads[:-1]  # the read list after step i is what step i + 1 computes
    heat_path = write_kept_png(records, out_dir / "kept_tiles.png", steps=args.steps, heads=head_rows,
                               head_layer=probe_layer)
    print(f"wrote {frames_path} (top: dense, middle: litepatch, bottom: |difference| x4) and {heat_path}")
    for line in speed_lines(device, kept, dense_times, patched_time):
        print(line)
    return 0


def _dense_kernel_label(model, cfg, device, dtype) -> str:
    import torch

    from litepatch.kernels.dense import dense_kernel_name

    probe = torch.empty(1, cfg.seq_len, cfg.heads, cfg.head_dim, device=device, dtype=dtype)
    return dense_kernel_name(probe)


def speed_lines(device, kept: float, dense_times: dict[str, float] | float, patched_time: float) -> list[str]:
    """The demo's last lines: what the run says about speed, and only what it can say on this device.

    On CUDA the wall times (warm, same seed, synchronised) compare litepatch with the fastest exact
    dense kernel measured. On a CPU the sparse path is the exact PyTorch reference (an oracle, slower
    than SDPA whatever it skips), so the result there is the attention work saved, the wall times are
    labelled as what they are, and the last line says where speed is measured.

    Example:
        >>> speed_lines(torch.device("cpu"), 0.6, {"SDPA": 7.0}, 20.0)[-1]
        'speed is measured on the GPU: ...'
    """
    if not isinstance(dense_times, dict):
        dense_times = {"SDPA": float(dense_times)}
    saved = f"attention work saved: {(1 - kept) * 100:.1f} % of the tiles (the attention FLOPs scale with them)"
    fastest = min(dense_times, key=dense_times.get)
    dense_time = dense_times[fastest]
    if device.type == "cuda":
        others = ", ".join(f"{k} {v:.3f} s" for k, v in dense_times.items())
        return [
            saved,
            f"dense generation: {others}; baseline = the fastest, {fastest}",
            f"speed-up (cuda, warm, same seed, synchronised): dense {dense_time:.3f} s, litepatch "
            f"{patched_time:.3f} s = {dense_time / patched_time:.2f}x end to end",
        ]
    return [
        saved,
        f"wall time (cpu, not a speed result): dense {dense_time:.2f} s, litepatch {patched_time:.2f} s. On a CPU "
        "the sparse path is the exact PyTorch reference, an oracle that is slower than SDPA however much it skips.",
        "speed is measured on the GPU: `litepatch demo` on a CUDA machine runs the video-scale model and prints "
        "the end-to-end speed-up (README, The demo model).",
    ]


def _weighted(records: list[dict]) -> float:
    total = sum(r["total_tiles"] for r in records)
    return sum(r["kept_tiles"] for r in records) / total if total else 1.0


def _db(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2f}"


def write_frames_png(dense, patched, path: Path, scale: int = 4, max_frames: int | None = None) -> Path:
    """PNG strip: dense frames on top, litepatch frames below, then their absolute difference x4.

    ``max_frames``: show at most this many frames, evenly spaced (long clips stay readable).
    """
    import numpy as np
    from PIL import Image, ImageDraw

    from .sampling import to_frames

    d, p = to_frames(dense)[0].numpy(), to_frames(patched)[0].numpy()  # [F, H, W, 3]
    if max_frames is not None and d.shape[0] > max_frames:
        pick = np.linspace(0, d.shape[0] - 1, max_frames).round().astype(int)
        d, p = d[pick], p[pick]
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


def write_kept_png(records: list[dict], path: Path, steps: int, heads: list[list[float] | None] | None = None,
                   head_layer: str | None = None) -> Path:
    """Kept-tiles picture: fraction computed per layer x step, and per head x step for ``head_layer``.

    With matplotlib (the ``plot``/``test`` extras) both panels get labelled axes and a colour bar;
    without it, the layer x step heatmap of :func:`write_heatmap_png`. ``heads[i]``: per-head kept
    fraction at step ``i`` (``None`` where unknown, e.g. warm-up steps).

    Example:
        >>> write_kept_png(handle.stats().records, Path("kept.png"), steps=25)
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return write_heatmap_png(records, path, steps=steps)
    import numpy as np

    layers = sorted({r["layer"] for r in records}, key=_natural_key)
    kept = np.full((max(1, len(layers)), steps), np.nan)
    for li, layer in enumerate(layers):
        for step in range(steps):
            rs = [r for r in records if r["layer"] == layer and r["step"] == step]
            if rs:
                kept[li, step] = _weighted(rs)
    n_heads = max((len(h) for h in heads or [] if h), default=0)
    panels = 2 if n_heads else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels + 1, 3.2), squeeze=False)
    ax = axes[0, 0]
    image = ax.imshow(kept, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(layers)), [name.replace(".self_attn", "") for name in layers], fontsize=7)
    ax.set_xlabel("denoising step")
    ax.set_ylabel("self-attention layer")
    ax.set_title("fraction of tiles computed (branches averaged)", fontsize=9)
    if n_heads:
        per_head = np.full((n_heads, steps), np.nan)
        for step, row in enumerate(heads[:steps]):
            if row:
                per_head[:, step] = row
        ax2 = axes[0, 1]
        ax2.imshow(per_head, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        ax2.set_yticks(range(n_heads), [f"head {h}" for h in range(n_heads)], fontsize=7)
        ax2.set_xlabel("denoising step")
        ax2.set_ylabel("head")
        ax2.set_title(f"{head_layer}, first CFG branch, per head", fontsize=9)
    fig.colorbar(image, ax=list(axes[0]), label="kept fraction")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
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
