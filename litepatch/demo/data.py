"""Procedural training videos for the demo DiT (no downloads).

Each video is one shape moving across a dark, shaded background with a static fine texture,
turning and pulsing in colour as it goes. Its condition is three indices: shape, colour and direction of motion
(:data:`SHAPES`, :data:`COLOURS`, :data:`DIRECTIONS`). Everything is vectorised torch, so a GPU
renders tens of thousands of videos in a second, and a seeded ``torch.Generator`` makes the data
reproducible. Videos are ``[N, 3, frames, height, width]`` in ``[-1, 1]`` (RGB, the demo's latent space).

Example:
    >>> videos, cond = make_videos(4, seed=0)
    >>> videos.shape, cond.shape
    (torch.Size([4, 3, 8, 32, 32]), torch.Size([4, 3]))
    >>> describe(cond[0])
    'red circle moving right'
"""

from __future__ import annotations

import math

import torch

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta")
DIRECTIONS = ("left", "right", "up", "down")
COLOUR_RGB = torch.tensor(
    [[0.95, 0.15, 0.1], [0.15, 0.85, 0.2], [0.2, 0.35, 1.0], [0.95, 0.9, 0.15], [0.1, 0.9, 0.95], [0.9, 0.2, 0.9]]
)
_DIRECTION_XY = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])  # image y grows downwards


def describe(cond: torch.Tensor | list[int]) -> str:
    """Words for one condition ``[shape, colour, direction]``."""
    shape, colour, direction = (int(c) for c in cond)
    return f"{COLOURS[colour]} {SHAPES[shape]} moving {DIRECTIONS[direction]}"


def parse_condition(text: str) -> list[int]:
    """``"red circle right"`` (any order, any of the words) -> ``[shape, colour, direction]``.

    >>> parse_condition("blue triangle moving up")
    [2, 2, 2]
    """
    found = {"shape": None, "colour": None, "direction": None}
    for word in text.lower().replace(",", " ").split():
        for key, names in (("shape", SHAPES), ("colour", COLOURS), ("direction", DIRECTIONS)):
            if word in names:
                found[key] = names.index(word)
    missing = [k for k, v in found.items() if v is None]
    if missing:
        raise ValueError(
            f"condition {text!r} names no {', '.join(missing)}; "
            f"shapes {SHAPES}, colours {COLOURS}, directions {DIRECTIONS}"
        )
    return [found["shape"], found["colour"], found["direction"]]


def _uniform(gen: torch.Generator, n: int, low: float, high: float, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (high - low) + low


def make_videos(
    n: int,
    *,
    seed: int = 0,
    frames: int = 8,
    height: int = 32,
    width: int = 32,
    device: str | torch.device = "cpu",
    cond: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Renders ``n`` videos; returns ``(videos [n, 3, frames, height, width] in [-1, 1], cond [n, 3])``.

    ``cond`` fixes the conditions (the rest stays random); by default they are drawn uniformly.
    Any size renders (the video-scale demo model uses 16 frames of 64x128); sizes scale with the
    smaller side, and clips longer than 8 frames move proportionally slower so the path fits.

    Example:
        >>> videos, _ = make_videos(2, seed=0, frames=16, height=64, width=128)
        >>> videos.shape
        torch.Size([2, 3, 16, 64, 128])
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    if cond is None:
        cond = torch.stack(
            [torch.randint(len(names), (n,), generator=gen, device=device) for names in (SHAPES, COLOURS, DIRECTIONS)],
            dim=1,
        )
    else:
        cond = torch.as_tensor(cond, device=device).long().reshape(n, 3)
    shape, colour, direction = cond.unbind(1)
    size = min(height, width)
    radius = _uniform(gen, n, 0.14, 0.22, device) * size
    # clips longer than 8 frames move proportionally slower, so that the whole path stays in the frame
    speed = _uniform(gen, n, 0.9, 1.8, device) * size / 32 * min(1.0, 7 / max(1, frames - 1))
    travel = speed * (frames - 1)
    dxy = _DIRECTION_XY.to(device)[direction]  # [n, 2]
    # start so that the whole path stays inside the frame
    along_lo = radius + 1
    along_hi = torch.tensor([float(width), float(height)], device=device)[None] - radius[:, None] - 1
    u = torch.rand(n, 2, generator=gen, device=device)
    start = along_lo[:, None] + u * (along_hi - along_lo[:, None])
    moving_axis = dxy.abs() > 0
    room = (along_hi - along_lo[:, None] - travel[:, None]).clamp(min=0)
    start_moving = torch.where(dxy > 0, along_lo[:, None] + u * room, along_hi - u * room)
    start = torch.where(moving_axis, start_moving, start)
    angle0 = _uniform(gen, n, 0, 2 * math.pi, device)
    spin = _uniform(gen, n, -0.35, 0.35, device)
    pulse_phase = _uniform(gen, n, 0, 2 * math.pi, device)
    pulse_rate = _uniform(gen, n, 0.3, 0.9, device)
    hue_mix = _uniform(gen, n, 0.0, 0.35, device)
    bg = _uniform(gen, n * 3, 0.02, 0.25, device).view(n, 3)
    bg_dir = _uniform(gen, n, 0, 2 * math.pi, device)
    bg_amp = _uniform(gen, n, 0.0, 0.15, device)
    texture_amp = _uniform(gen, n, 0.04, 0.15, device)
    texture = torch.randn(n, 1, height // 2, width // 2, generator=gen, device=device)

    t = torch.arange(frames, device=device, dtype=torch.float32)  # [F]
    ys = torch.arange(height, device=device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=device, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # [H, W]

    centre = start[:, None] + dxy[:, None] * (speed[:, None, None] * t[None, :, None])  # [n, F, 2]
    theta = angle0[:, None] + spin[:, None] * t[None]  # [n, F]
    px = xx[None, None] - centre[..., 0, None, None]
    py = yy[None, None] - centre[..., 1, None, None]
    cos, sin = torch.cos(theta)[..., None, None], torch.sin(theta)[..., None, None]
    x, y = cos * px + sin * py, -sin * px + cos * py  # shape frame coordinates
    r = radius[:, None, None, None]
    sdf = torch.stack(
        [
            torch.sqrt(x * x + y * y) - r,
            torch.maximum(x.abs(), y.abs()) - 0.8 * r,
            torch.maximum(
                torch.maximum(-y, math.sqrt(3) / 2 * x + 0.5 * y), -math.sqrt(3) / 2 * x + 0.5 * y
            ) - 0.5 * r,
            torch.minimum(
                torch.maximum(x.abs() - r, y.abs() - 0.35 * r), torch.maximum(x.abs() - 0.35 * r, y.abs() - r)
            ),
        ],
        dim=1,
    )  # [n, shapes, F, H, W]
    sdf = sdf.gather(1, shape.view(n, 1, 1, 1, 1).expand(-1, 1, *sdf.shape[2:])).squeeze(1)
    alpha = torch.sigmoid(-sdf * 3.0 * size / 32)  # about one pixel of soft edge

    rgb = COLOUR_RGB.to(device)
    base, neighbour = rgb[colour], rgb[(colour + 1) % len(COLOURS)]
    mix = hue_mix[:, None] * 0.5 * (1 + torch.sin(pulse_phase[:, None] + 0.7 * pulse_rate[:, None] * t[None]))
    bright = 0.75 + 0.25 * torch.cos(pulse_phase[:, None] + pulse_rate[:, None] * t[None])  # [n, F]
    fg = (base[:, None] * (1 - mix[..., None]) + neighbour[:, None] * mix[..., None]) * bright[..., None]  # [n, F, 3]

    cos_bg, sin_bg = torch.cos(bg_dir)[:, None, None], torch.sin(bg_dir)[:, None, None]
    grad = cos_bg * (xx / width - 0.5) + sin_bg * (yy / height - 0.5)
    background = bg[:, :, None, None] * (1 + 2 * bg_amp[:, None, None, None] * grad[:, None])  # [n, 3, H, W]
    # a static fine texture: only a copy from the same place in other frames predicts it, which is
    # what teaches the model sharp, position-precise attention
    texture = torch.nn.functional.interpolate(texture, size=(height, width), mode="bilinear", align_corners=False)
    background = background + texture_amp[:, None, None, None] * texture
    video = background[:, :, None] * (1 - alpha[:, None]) + fg.permute(0, 2, 1)[..., None, None] * alpha[:, None]
    return (video.clamp(0, 1) * 2 - 1).contiguous(), cond
