"""Trains a built-in demo DiT (litepatch/demo/model.py) on procedural videos and writes its weights.

Flow matching (``x_t = (1 - s) x0 + s noise``, the model predicts ``noise - x0``, logit-normal s),
bf16 autocast, AdamW with warm-up and cosine decay, EMA weights, 10 % condition dropout for
classifier-free guidance. The data (procedural videos, litepatch/demo/data.py) is rendered once on
the device from the seed, at the model's full clip size.

``--model video`` trains the video-scale model (16 frames of 64x128, 32768 tokens) with a
**curriculum** of crops (``--curriculum``): most steps on short, small crops of the rendered videos
(cheap: attention is quadratic in the tokens), the last ones on whole clips. The crops have the
same pixels, motion and sizes as the full clips, and 3D RoPE only sees relative positions, so what
is learned on crops carries over to the full size.

``--steps auto`` times a few steps of every curriculum stage first (on a throw-away copy) and picks
the step count that fits ``--max-seconds``; that count is printed and stored, and
``--steps <that count>`` with the same seed reproduces the run (up to GPU reduction order).
``--max-seconds`` also stops the loop if it runs late (recorded as ``stopped_early``).

Usage (one H200; the shipped video weights):
    python benchmarks/train_demo.py --model video --seed 0 --steps auto --max-seconds 300 \\
        --out litepatch/assets/demo_video_dit.safetensors --meta-json train_video.json

Example (CPU smoke runs):
    $ python benchmarks/train_demo.py --steps 5 --batch 2 --videos 16 --device cpu --out /tmp/w.safetensors
    $ python benchmarks/train_demo.py --model video --tiny --steps 4 --videos 4 --device cpu --out /tmp/v.safetensors
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from litepatch.demo.data import make_videos
from litepatch.demo.model import DemoConfig, DemoDiT, attention_locality, preset, save_demo_model

# crops (frames x height x width) : batch : share of the steps; the last stage is the full clip
VIDEO_CURRICULUM = "4x32x64:32:0.6,8x64x64:8:0.25,16x64x128:2:0.15"
# a tiny video-shaped config for CPU tests (same code paths, seconds per step)
TINY_VIDEO = DemoConfig(frames=4, height=16, width=32, dim=64, heads=1, ffn_dim=128, layers=2)


@dataclass(frozen=True)
class Stage:
    """One curriculum stage: crops of ``frames x height x width`` in batches of ``batch``."""

    frames: int
    height: int
    width: int
    batch: int
    share: float

    @property
    def tokens(self) -> int:
        return self.frames * self.height * self.width


def parse_curriculum(text: str, cfg: DemoConfig) -> list[Stage]:
    """``"4x32x64:32:0.6,16x64x128:2:0.4"`` -> stages; shares are normalised, crops must fit the clip.

    >>> [s.batch for s in parse_curriculum("2x8x8:4:1,4x16x32:2:1", TINY_VIDEO)]
    [4, 2]
    """
    stages = []
    for part in text.split(","):
        try:
            size, batch, share = part.strip().split(":")
            f, h, w = (int(v) for v in size.lower().split("x"))
            stage = Stage(f, h, w, int(batch), float(share))
        except ValueError:
            raise ValueError(f"curriculum stage {part!r} is not FRAMESxHEIGHTxWIDTH:BATCH:SHARE") from None
        if not (0 < f <= cfg.frames and 0 < h <= cfg.height and 0 < w <= cfg.width):
            raise ValueError(f"curriculum crop {size} does not fit the clip {cfg.frames}x{cfg.height}x{cfg.width}")
        if f % cfg.patch[0] or h % cfg.patch[1] or w % cfg.patch[2]:
            raise ValueError(f"curriculum crop {size} is not divisible by the patch {cfg.patch}")
        if stage.batch < 1 or not stage.share > 0:
            raise ValueError(f"curriculum stage {part!r} needs batch >= 1 and share > 0")
        stages.append(stage)
    if not stages:
        raise ValueError("empty curriculum")
    total = sum(s.share for s in stages)
    return [replace(s, share=s.share / total) for s in stages]


def stage_steps(stages: list[Stage], steps: int) -> list[int]:
    """Steps per stage for ``steps`` in total (rounded; every stage gets at least one step)."""
    counts = [max(1, round(s.share * steps)) for s in stages[:-1]]
    return counts + [max(1, steps - sum(counts))]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small", choices=("small", "video"), help="which built-in demo model")
    p.add_argument("--tiny", action="store_true", help="a tiny config of the same shape family (CPU tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", default="5000", help="training steps, or 'auto' (fit --max-seconds)")
    p.add_argument("--batch", type=int, default=64, help="batch size (small model; the video curriculum sets its own)")
    p.add_argument("--curriculum", default=None, help=f"video model stages (default {VIDEO_CURRICULUM!r})")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--videos", type=int, default=None, help="procedural videos rendered up front "
                   "(default 60000 small, 6000 video)")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--cond-dropout", type=float, default=0.1)
    p.add_argument("--max-seconds", type=float, default=math.inf, help="time box of the training loop")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="weights path (default: the model's file in litepatch/assets/)")
    p.add_argument("--meta-json", default=None, help="also write the run's metadata (steps, time, loss) here")
    p.add_argument("--log-every", type=int, default=250)
    return p.parse_args(argv)


def render_dataset(n: int, seed: int, cfg: DemoConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    # chunks of 2048 videos at the small size (as the committed small weights were made), fewer at larger sizes
    chunk = max(1, min(2048, 2048 * 2048 * 8 // (cfg.frames * cfg.height * cfg.width)))
    videos, conds = [], []
    for i, start in enumerate(range(0, n, chunk)):
        v, c = make_videos(
            min(chunk, n - start), seed=seed * 100003 + i, frames=cfg.frames, height=cfg.height, width=cfg.width,
            device=device,
        )
        videos.append(v.to(torch.bfloat16))
        conds.append(c)
    return torch.cat(videos), torch.cat(conds)


def crop_batch(videos: torch.Tensor, idx: torch.Tensor, stage: Stage, gen: torch.Generator) -> torch.Tensor:
    """Random ``stage``-sized crops (one offset per video) of ``videos[idx]``, in float32."""
    _, _, f_all, h_all, w_all = videos.shape
    if (stage.frames, stage.height, stage.width) == (f_all, h_all, w_all):
        return videos[idx].float()
    device = videos.device
    out = []
    for i in idx.tolist():
        f0, y0, x0 = (int(torch.randint(full - size + 1, (1,), generator=gen, device=device))
                      for full, size in ((f_all, stage.frames), (h_all, stage.height), (w_all, stage.width)))
        out.append(videos[i, :, f0:f0 + stage.frames, y0:y0 + stage.height, x0:x0 + stage.width])
    return torch.stack(out).float()


class Trainer:
    """One model, its EMA, optimiser and random stream; :meth:`step` runs one training step."""

    def __init__(self, model: DemoDiT, args: argparse.Namespace, device: torch.device, total_steps: int):
        self.model, self.args, self.device, self.total = model, args, device, total_steps
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            (no_decay if p.dim() < 2 or "embedding" in name or "modulation" in name else decay).append(p)
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
            lr=args.lr, betas=(0.9, 0.99), fused=device.type == "cuda",
        )
        self.warmup = min(args.warmup, max(1, total_steps // 10))
        self.gen = torch.Generator(device=device).manual_seed(args.seed + 1)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.args.lr * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    def step(self, step: int, videos: torch.Tensor, conds: torch.Tensor, stage: Stage) -> torch.Tensor:
        gen, device, batch = self.gen, self.device, stage.batch
        idx = torch.randint(len(videos), (batch,), generator=gen, device=device)
        x0 = crop_batch(videos, idx, stage, gen)
        cond = conds[idx].clone()
        drop = torch.rand(batch, generator=gen, device=device) < self.args.cond_dropout
        cond[drop] = -1
        sigma = torch.sigmoid(torch.randn(batch, generator=gen, device=device))
        noise = torch.randn(x0.shape, generator=gen, device=device)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(step)
        with self.autocast:
            pred = self.model(xt, timestep=sigma * 1000, cond=cond)
        loss = torch.nn.functional.mse_loss(pred.float(), noise - x0)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        with torch.no_grad():
            d = 0.0 if step < self.warmup else self.args.ema
            for pe, pm in zip(self.ema.parameters(), self.model.parameters()):
                pe.lerp_(pm, 1 - d)
        return loss.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_stages(model: DemoDiT, args, device, videos, conds, stages: list[Stage], reps: int = 3) -> list[float]:
    """Seconds per training step of each stage, measured on a throw-away copy (the real run is untouched)."""
    probe_args = argparse.Namespace(**{**vars(args), "seed": args.seed + 12345})
    trainer = Trainer(copy.deepcopy(model), probe_args, device, total_steps=100)
    seconds = []
    for stage in stages:
        trainer.step(0, videos, conds, stage)  # warm-up (kernel selection, allocator)
        _sync(device)
        start = time.perf_counter()
        for i in range(reps):
            trainer.step(1 + i, videos, conds, stage)
        _sync(device)
        seconds.append((time.perf_counter() - start) / reps)
    return seconds


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    cfg = TINY_VIDEO if (args.tiny and args.model == "video") else preset(args.model)
    if args.tiny and args.model == "small":
        cfg = DemoConfig(frames=2, height=8, width=8, dim=64, heads=1, ffn_dim=128, layers=2)
    out = Path(args.out or f"litepatch/assets/{'demo_video_dit' if args.model == 'video' else 'demo_dit'}.safetensors")
    n_videos = args.videos or (6000 if args.model == "video" else 60000)
    if args.model == "video":
        stages = parse_curriculum(args.curriculum or (
            "2x8x16:4:0.6,4x16x32:2:0.4" if args.tiny else VIDEO_CURRICULUM), cfg)
    else:
        stages = [Stage(cfg.frames, cfg.height, cfg.width, args.batch, 1.0)]
    if stages[-1].tokens != cfg.frames * cfg.height * cfg.width:
        print(f"note: the last curriculum stage {stages[-1]} is not the full clip", flush=True)

    wall_start = time.time()
    model = DemoDiT(cfg)  # initialised on the CPU: the same weights whatever the device
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    model = model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"demo DiT ({args.model}{', tiny' if args.tiny else ''}): {n_params / 1e6:.2f} M parameters, "
          f"{cfg.seq_len} tokens per clip, device {device}", flush=True)

    t0 = time.time()
    videos, conds = render_dataset(n_videos, args.seed, cfg, device)
    render_seconds = time.time() - t0
    print(f"rendered {len(videos)} videos of {cfg.frames}x{cfg.height}x{cfg.width} in {render_seconds:.1f} s",
          flush=True)

    stage_seconds = None
    if args.steps == "auto":
        if not math.isfinite(args.max_seconds):
            raise ValueError("--steps auto needs --max-seconds (the time box the step count is fitted to)")
        stage_seconds = time_stages(model, args, device, videos, conds, stages)
        per_step = sum(s.share * t for s, t in zip(stages, stage_seconds))
        steps = max(len(stages), int(0.95 * args.max_seconds / per_step))
        print(f"--steps auto: {[round(t * 1000, 1) for t in stage_seconds]} ms/step per stage -> {steps} steps "
              f"in ~{steps * per_step:.0f} s (reproduce with --steps {steps})", flush=True)
    else:
        steps = int(args.steps)
        if steps < 1:
            raise ValueError(f"--steps must be >= 1 or 'auto', got {args.steps}")
    counts = stage_steps(stages, steps)
    plan = [(stage, sum(counts[:i]), sum(counts[:i + 1])) for i, stage in enumerate(stages)]

    trainer = Trainer(model, args, device, total_steps=steps)
    start, running, n_running, step, stopped_early = time.time(), 0.0, 0, -1, False
    losses_by_stage: list[float] = []
    for stage, first, last in plan:
        stage_loss, stage_n = 0.0, 0
        for step in range(first, last):
            loss = trainer.step(step, videos, conds, stage)
            running, n_running = running + loss, n_running + 1
            stage_loss, stage_n = stage_loss + loss, stage_n + 1
            if (step + 1) % args.log_every == 0:
                elapsed = time.time() - start
                print(f"step {step + 1:6d}  {stage.frames}x{stage.height}x{stage.width}  loss "
                      f"{float(running) / n_running:.4f}  lr {trainer.lr_at(step):.2e}  {elapsed:6.0f} s", flush=True)
                running, n_running = 0.0, 0
            if time.time() - start > args.max_seconds:
                stopped_early = True
                break
        losses_by_stage.append(round(float(stage_loss) / max(1, stage_n), 5))
        if stopped_early:
            print(f"stopping at step {step + 1}: --max-seconds {args.max_seconds} reached", flush=True)
            break
    steps_done = step + 1
    train_seconds = time.time() - start

    ema = trainer.ema.float().eval()
    del videos, trainer
    with torch.no_grad():
        vx, vc = make_videos(4, seed=10**6 + args.seed, frames=cfg.frames, height=cfg.height, width=cfg.width,
                             device=device)
        eval_gen = torch.Generator(device=device).manual_seed(7)
        losses = []
        for sig in (0.25, 0.5, 0.75):
            noise = torch.randn(vx.shape, generator=eval_gen, device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                pred = ema(vx * (1 - sig) + sig * noise, timestep=torch.full((4,), sig * 1000, device=device),
                           cond=vc)
            losses.append(float(torch.nn.functional.mse_loss(pred.float(), noise - vx)))
        # locality on a crop (the full clip's S x S attention matrix would not fit at video scale)
        crop = vx[:2, :, : min(cfg.frames, 8), : min(cfg.height, 32), : min(cfg.width, 32)]
        noisy = crop * 0.5 + 0.5 * torch.randn(crop.shape, generator=eval_gen, device=device)
        loc = attention_locality(ema, noisy, 500.0, vc[:2])
    print(f"held-out loss at sigma 0.25/0.5/0.75: {[round(v, 5) for v in losses]}", flush=True)
    print(f"attention locality (mass within 1 frame, 2 rows, 2 columns): per layer "
          f"{[round(v, 3) for v in loc['per_layer']]}, uniform would be {loc['uniform']:.3f}", flush=True)
    meta = {
        "model": args.model + ("-tiny" if args.tiny else ""), "seed": args.seed, "steps": steps_done,
        "steps_planned": steps, "stopped_early": stopped_early, "batch": stages[-1].batch, "lr": args.lr,
        "videos": n_videos, "ema": args.ema, "train_seconds": round(train_seconds, 1),
        "render_seconds": round(render_seconds, 1), "wall_seconds": round(time.time() - wall_start, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "curriculum": json.dumps([[s.frames, s.height, s.width, s.batch, c] for s, c in zip(stages, counts)]),
        "stage_ms_per_step": json.dumps(None if stage_seconds is None else [round(t * 1000, 2) for t in stage_seconds]),
        "train_loss_by_stage": json.dumps(losses_by_stage),
        "heldout_loss": json.dumps([round(v, 5) for v in losses]),
        "locality": json.dumps([round(v, 4) for v in loc["per_layer"]]), "torch": torch.__version__,
        "command": f"python benchmarks/train_demo.py --model {args.model} --seed {args.seed} --steps {steps}"
                   + (f" --curriculum {args.curriculum}" if args.curriculum else "") + (" --tiny" if args.tiny else ""),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_demo_model(ema, out, meta)
    if args.meta_json:
        decoded = {k: json.loads(v) if isinstance(v, str) and v[:1] in "[{n" else v for k, v in meta.items()}
        decoded["weights"] = str(out)
        decoded["weights_mb"] = round(out.stat().st_size / 2**20, 2)
        Path(args.meta_json).write_text(json.dumps(decoded, indent=1))
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MB; {steps_done} steps in {train_seconds:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
