"""Flow-matching Euler sampler with classifier-free guidance, and the demo's image metrics.

The model is called like a diffusers transformer, ``model(latents, timestep=t, cond=c)``, once per
CFG branch (``cfg_mode="sequential"``: conditional first, then unconditional, with the same timestep), which is
how the litepatch patcher tells branches and steps apart; ``cfg_mode="batched"`` runs both branches as one forward
of twice the batch (conditional rows first), as pipelines that batch CFG do: half the forwards, so half the
host work per step for the same GPU work.

Example:
    >>> model = load_demo_model()
    >>> latents = sample(model, torch.tensor([[0, 0, 1]]), steps=30, seed=0)   # red circle moving right
    >>> frames = to_frames(latents)                                            # uint8 [1, 8, 32, 32, 3]
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CFG_MODES = ("sequential", "batched")


def flow_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """``steps + 1`` sigmas from 1 to 0 (Wan/SD3 time shift ``shift * s / (1 + (shift - 1) * s)``)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * s / (1 + (shift - 1) * s)).float()


def initial_noise(batch: int, shape: tuple[int, int, int, int], seed: int) -> torch.Tensor:
    """Seeded Gaussian noise ``[batch, *shape]``, drawn on the CPU so every device starts from the same."""
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(int(seed)))


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    cond: torch.Tensor,
    *,
    steps: int = 50,
    guidance: float = 4.0,
    shift: float = 1.0,
    seed: int = 0,
    noise: torch.Tensor | None = None,
    callback: Callable[[int, float, torch.Tensor], None] | None = None,
    cfg_mode: str = "sequential",
) -> torch.Tensor:
    """Generates ``[B, C, F, H, W]`` latents for ``cond`` ``[B, 3]`` with ``steps`` Euler steps.

    ``guidance`` 1.0 skips the unconditional branch. ``callback(step, sigma, latents)`` runs after each step.
    ``cfg_mode``: ``"sequential"`` (two forwards per step) or ``"batched"`` (one forward of batch ``2B``).
    """
    if cfg_mode not in CFG_MODES:
        raise ValueError(f"cfg_mode must be one of {CFG_MODES}, got {cfg_mode!r}")
    param = next(model.parameters())
    # ordinary tensors even under inference_mode: their version counter lets the model check them on the first
    # forward only (an inference tensor is checked on every forward, three host-device syncs each time)
    with torch.inference_mode(False):
        cond = torch.as_tensor(cond, device=param.device).long().clone()
        if cond.dim() == 1:
            cond = cond[None]
        both_cond = torch.cat([cond, model.null_cond(cond.shape[0], param.device)])
    config = model.config
    if noise is None:
        noise = initial_noise(cond.shape[0], (config.in_channels, config.frames, config.height, config.width), seed)
    x = noise.to(param.device, torch.float32)
    sigmas = flow_sigmas(steps, shift)
    for i in range(steps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        t = torch.full((x.shape[0],), sigma * 1000.0, device=x.device)
        if guidance == 1.0:
            velocity = model(x, timestep=t, cond=cond).float()
        elif cfg_mode == "batched":
            both = model(torch.cat([x, x]), timestep=torch.cat([t, t]), cond=both_cond).float()
            velocity, uncond = both.chunk(2)
            velocity = uncond + guidance * (velocity - uncond)
        else:
            velocity = model(x, timestep=t, cond=cond).float()
            uncond = model(x, timestep=t, cond=None).float()
            velocity = uncond + guidance * (velocity - uncond)
        x = x + (sigma_next - sigma) * velocity
        if callback is not None:
            callback(i, sigma, x)
    return x


def to_frames(latents: torch.Tensor) -> torch.Tensor:
    """Decodes demo latents ``[B, 3, F, H, W]`` in ``[-1, 1]`` to uint8 RGB frames ``[B, F, H, W, 3]``."""
    return ((latents.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu()


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB of ``x`` against ``ref`` (``inf`` when equal); latents span [-1, 1]."""
    from litepatch.calibration.metrics import psnr as _psnr

    return _psnr(x, ref, data_range=data_range)


DEMO_PSNR = "demo_psnr"


def register_demo_metrics() -> str:
    """Registers :func:`psnr` (data range 2, the demo latents' [-1, 1]) as the calibration metric ``demo_psnr``;
    returns its name. The calibrator's own ``psnr`` takes the dense output's peak-to-peak range instead, which for a
    dark or flat clip is below 2 and reads several dB lower than what the demo prints for the same generation.

    Example:
        >>> calibrate(run, samples, f"{register_demo_metrics()} >= 30", model=model)
    """
    from litepatch.calibration.metrics import register_metric

    register_metric(DEMO_PSNR, psnr, higher_is_better=True, overwrite=True,
                    description="PSNR (dB) of demo latents in [-1, 1] (data range 2) vs dense")
    return DEMO_PSNR


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0, window: int = 7) -> float:
    """Mean SSIM over frames and channels of ``[B, C, F, H, W]`` videos (Gaussian window, sigma 1.5)."""
    if x.shape != ref.shape or x.dim() != 5:
        raise ValueError(
            f"ssim needs two [B, C, F, H, W] tensors of one shape, got {tuple(x.shape)}, {tuple(ref.shape)}"
        )
    from litepatch.calibration.metrics import ssim as _ssim

    return _ssim(x, ref, data_range=data_range, window=window)
