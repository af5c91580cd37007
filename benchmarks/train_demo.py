"""Trains the built-in demo DiT (litepatch/demo/model.py) on procedural videos and writes its weights.

Flow matching (``x_t = (1 - s) x0 + s noise``, the model predicts ``noise - x0``, logit-normal s),
bf16 autocast, AdamW with warm-up and cosine decay, EMA weights, 10 % condition dropout for
classifier-free guidance. The data (procedural videos, litepatch/demo/data.py) is rendered once on
the device from the seed. Everything random comes from the seed: the same seed and step count give
the same run up to the non-determinism of GPU reductions.

Usage (one H100, under 10 minutes):
    python benchmarks/train_demo.py --seed 0 --out litepatch/assets/demo_dit.safetensors

Example (a CPU smoke run):
    >>> python benchmarks/train_demo.py --steps 5 --batch 2 --videos 16 --device cpu --out /tmp/w.safetensors
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch

from litepatch.demo.data import make_videos
from litepatch.demo.model import DemoConfig, DemoDiT, attention_locality, save_demo_model


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--videos", type=int, default=60000, help="procedural videos rendered up front")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--cond-dropout", type=float, default=0.1)
    p.add_argument("--max-seconds", type=float, default=math.inf, help="stop early (recorded in the metadata)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="litepatch/assets/demo_dit.safetensors")
    p.add_argument("--log-every", type=int, default=250)
    return p.parse_args(argv)


def render_dataset(n: int, seed: int, cfg: DemoConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    chunk = 2048
    videos, conds = [], []
    for i, start in enumerate(range(0, n, chunk)):
        v, c = make_videos(
            min(chunk, n - start), seed=seed * 100003 + i, frames=cfg.frames, height=cfg.height, width=cfg.width,
            device=device,
        )
        videos.append(v.to(torch.bfloat16))
        conds.append(c)
    return torch.cat(videos), torch.cat(conds)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    cfg = DemoConfig()
    model = DemoDiT(cfg)  # initialised on the CPU: the same weights whatever the device
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    model = model.to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"demo DiT: {n_params / 1e6:.2f} M parameters, {cfg.seq_len} tokens, device {device}", flush=True)

    t0 = time.time()
    videos, conds = render_dataset(args.videos, args.seed, cfg, device)
    print(f"rendered {len(videos)} videos in {time.time() - t0:.1f} s", flush=True)

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "embedding" in name or "modulation" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.99), fused=device.type == "cuda",
    )

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    start, running, step = time.time(), 0.0, 0
    for step in range(args.steps):
        idx = torch.randint(len(videos), (args.batch,), generator=gen, device=device)
        x0 = videos[idx].float()
        cond = conds[idx].clone()
        drop = torch.rand(args.batch, generator=gen, device=device) < args.cond_dropout
        cond[drop] = -1
        sigma = torch.sigmoid(torch.randn(args.batch, generator=gen, device=device))
        noise = torch.randn(x0.shape, generator=gen, device=device)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with autocast:
            pred = model(xt, timestep=sigma * 1000, cond=cond)
        loss = torch.nn.functional.mse_loss(pred.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = 0.0 if step < args.warmup else args.ema
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        running += loss.detach()
        if (step + 1) % args.log_every == 0:
            elapsed = time.time() - start
            print(f"step {step + 1:6d}  loss {float(running) / args.log_every:.4f}  lr {lr_at(step):.2e}  "
                  f"{elapsed:6.0f} s  {elapsed / (step + 1) * 1000:.0f} ms/step", flush=True)
            running = 0.0
        if time.time() - start > args.max_seconds:
            print(f"stopping at step {step + 1}: --max-seconds {args.max_seconds} reached", flush=True)
            break
    steps_done = step + 1
    train_seconds = time.time() - start

    ema = ema.float().eval()
    with torch.no_grad():
        vx, vc = make_videos(16, seed=10**6 + args.seed, device=device)
        eval_gen = torch.Generator(device=device).manual_seed(7)
        losses = []
        for sig in (0.25, 0.5, 0.75):
            noise = torch.randn(vx.shape, generator=eval_gen, device=device)
            pred = ema(vx * (1 - sig) + sig * noise, timestep=torch.full((16,), sig * 1000, device=device), cond=vc)
            losses.append(float(torch.nn.functional.mse_loss(pred, noise - vx)))
        noisy = vx[:2] * 0.5 + 0.5 * torch.randn(vx[:2].shape, generator=eval_gen, device=device)
        loc = attention_locality(ema, noisy, 500.0, vc[:2])
    print(f"held-out loss at sigma 0.25/0.5/0.75: {losses}", flush=True)
    print(f"attention locality (mass within 1 frame, 2 rows, 2 columns): per layer "
          f"{[round(v, 3) for v in loc['per_layer']]}, uniform would be {loc['uniform']:.3f}", flush=True)
    meta = {
        "seed": args.seed, "steps": steps_done, "batch": args.batch, "lr": args.lr, "videos": args.videos,
        "ema": args.ema, "train_seconds": round(train_seconds, 1), "device": torch.cuda.get_device_name(device)
        if device.type == "cuda" else "cpu", "heldout_loss": json.dumps([round(v, 5) for v in losses]),
        "locality": json.dumps([round(v, 4) for v in loc["per_layer"]]), "torch": torch.__version__,
    }
    save_demo_model(ema, args.out, meta)
    print(f"wrote {args.out} ({steps_done} steps in {train_seconds:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
