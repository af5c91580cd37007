"""The built-in demo DiT: a small Wan-like video diffusion transformer.

It works directly in a tiny RGB "latent" space (3 channels, values in [-1, 1]), so decoding is a
rescale. Layout and naming follow the original Wan repository, scaled down:

* patchify ``[B, C, F, H, W]`` with a ``Conv3d`` (patch ``(1, 2, 2)``) into tokens ordered
  frame-major (frame, row, column);
* each :class:`DemoBlock`: AdaLN-modulated self-attention with 3D rotary embedding (time, height,
  width) and RMS-normalised q/k, cross-attention to the condition tokens, AdaLN-modulated MLP;
* the timestep (``0..1000``, flow-matching sigma times 1000) drives the AdaLN modulation;
* the condition is three tokens (shape, colour, direction); index ``-1`` (or ``cond=None``) is
  the "null" token used for classifier-free guidance;
* the output is the flow-matching velocity ``noise - x0``.

Self-attention calls ``torch.nn.functional.scaled_dot_product_attention`` on ``[B, H, S, D]``
tensors, which is what the litepatch patcher finds and replaces.

Example:
    >>> model = load_demo_model()                       # the committed trained weights
    >>> latents = torch.randn(1, 3, 8, 32, 32)
    >>> cond = torch.tensor([[0, 1, 2]])                # circle, green, moving right (see data.py)
    >>> velocity = model(latents, timestep=torch.tensor([500.0]), cond=cond)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_FILE = "demo_dit.safetensors"
VIDEO_WEIGHTS_FILE = "demo_video_dit.safetensors"


@dataclass(frozen=True)
class DemoConfig:
    """Shape of the demo model and of the videos it makes (defaults: the committed weights)."""

    in_channels: int = 3
    frames: int = 8
    height: int = 32
    width: int = 32
    patch: tuple[int, int, int] = (1, 2, 2)
    dim: int = 128
    heads: int = 2
    ffn_dim: int = 512
    layers: int = 6
    freq_dim: int = 128
    cond_vocab: tuple[int, int, int] = (4, 6, 4)  # shapes, colours, directions (see data.py)
    rope_theta: float = 10000.0
    eps: float = 1e-6

    def __post_init__(self):
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head_dim must be even and >= 6, got {self.head_dim}")
        for size, p, name in zip((self.frames, self.height, self.width), self.patch, ("frames", "height", "width")):
            if size % p:
                raise ValueError(f"{name} {size} is not divisible by its patch size {p}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (frames, rows, columns) of one video."""
        return (self.frames // self.patch[0], self.height // self.patch[1], self.width // self.patch[2])

    @property
    def seq_len(self) -> int:
        return math.prod(self.grid)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> DemoConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown DemoConfig keys {unknown}; known: {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**values)


PRESETS: dict[str, DemoConfig] = {
    # the CPU demo: 8 frames x 32x32, 2048 tokens, 1.76 M parameters (litepatch/assets/demo_dit.safetensors)
    "small": DemoConfig(),
    # video scale: 16 frames x 64x128, 16x32x64 = 32768 tokens, heads of 128 (the GPU kernel's best head dim),
    # 6.9 M parameters (13.8 MB in fp16). Attention FLOPs are S / (6 dim) ~ 21x the linear layers' per token,
    # so attention is most of a step's GPU time (benchmarks/demo_video_gpu.py measures the share).
    "video": DemoConfig(frames=16, height=64, width=128, dim=256, heads=2, ffn_dim=1024, layers=6),
}
"""The built-in demo models by name: ``small`` (CPU demo and tests) and ``video`` (the GPU demo)."""

WEIGHT_FILES = {"small": WEIGHTS_FILE, "video": VIDEO_WEIGHTS_FILE}


def preset(name: str) -> DemoConfig:
    """The :class:`DemoConfig` of a built-in demo model (``"small"`` or ``"video"``).

    Example:
        >>> preset("video").seq_len, preset("video").head_dim
        (32768, 128)
    """
    if name not in PRESETS:
        raise ValueError(f"unknown demo model {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


def sinusoidal_embedding(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """``[B]`` timesteps -> ``[B, dim]`` (cos, sin) features, as in Wan."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=timestep.device) / half)
    angles = timestep.double()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


def rope_frequencies(grid: tuple[int, int, int], head_dim: int, theta: float, device) -> torch.Tensor:
    """Complex ``[S, head_dim // 2]`` rotations for a (frames, rows, columns) grid, frame-major.

    The head dim is split as in Wan: ``2 * (d // 6)`` dims each for rows and columns, the rest for time.
    """
    half = head_dim // 2
    split_hw = (head_dim // 6)
    split_t = half - 2 * split_hw
    parts = []
    for axis, n_pairs in enumerate((split_t, split_hw, split_hw)):
        freqs = 1.0 / theta ** (torch.arange(n_pairs, dtype=torch.float64, device=device) / n_pairs)
        pos = torch.arange(grid[axis], dtype=torch.float64, device=device)
        angles = pos[:, None] * freqs[None]  # [grid[axis], n_pairs]
        shape = [1, 1, 1, n_pairs]
        shape[axis] = grid[axis]
        parts.append(angles.view(shape).expand(*grid, n_pairs))
    angles = torch.cat(parts, dim=-1).reshape(-1, half)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotates ``x`` ``[B, H, S, D]`` by ``freqs`` ``[S, D/2]`` (adjacent pairs are complex numbers)."""
    return _rotate(x, rope_rotation(freqs))


def rope_rotation(freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``freqs`` ``[S, D/2]`` as two fp32 ``[S, D]`` tables for :func:`_rotate`: each pair's cosine twice, and its
    sine with the pair's first entry negated."""
    cos, sin = torch.view_as_real(freqs).unbind(-1)
    return cos.repeat_interleave(2, -1).contiguous(), torch.stack([-sin, sin], -1).flatten(-2).contiguous()


def _rotate(x: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """:func:`apply_rope` in real arithmetic: the complex product of each adjacent pair ``(x0, x1)``, i.e.
    ``(x0 cos - x1 sin, x1 cos + x0 sin)``, as ``x * cos + swapped(x) * signed_sin`` (bit for bit the same: a - b is
    a + (-b)). Six kernels in eager mode where a stack of the two halves takes nine, and a compiler fuses it
    (complex tensors do not fuse)."""
    cos, signed_sin = rotation
    x32 = x.float()
    return (x32 * cos + x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2) * signed_sin).to(x.dtype)


# ------------------------------------------------------------------ the non-attention parts of a block
# At 32768 tokens a block's non-attention time is small kernels (fp32 norms, RoPE, AdaLN modulation) and the host
# issuing ~40 PyTorch ops per block: on an H100 the patched demo with elementwise ops compiled one by one took 0.465 s
# at 23 % of the tiles computed and 0.515 s at 54 %, bound by the host. DemoDiT.fuse_pointwise() compiles each region
# between two attention calls into one graph (0.287 / 0.424 s there); the attention calls stay eager PyTorch calls in
# the attention modules, where the litepatch patcher finds and replaces them.

Linear = tuple[torch.Tensor, torch.Tensor]  # an nn.Linear's (weight, bias), passed to the regions as tensors


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, in fp32, weighted; the result in ``x``'s dtype.

    ``F.rms_norm`` computes exactly this (in fp32, the weight applied before the cast back) and is one fused kernel
    on a GPU where the formula below is eight; it needs ``x`` and ``weight`` of one dtype.
    """
    if weight.dtype == x.dtype:
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight).to(x.dtype)


def rms_heads(x: torch.Tensor, weight: torch.Tensor, eps: float, heads: int) -> torch.Tensor:
    """:func:`rms_norm` over the model dim, then ``[B, S, dim]`` -> ``[B, H, S, D]``."""
    return split_heads(rms_norm(x, weight, eps), heads)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, S, dim]`` -> ``[B, H, S, D]``."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def rms_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, heads: int, rotation: torch.Tensor) -> torch.Tensor:
    """:func:`rms_heads` then the 3D rotary embedding: a rotated query or key ``[B, H, S, D]``."""
    return _rotate(rms_heads(x, weight, eps, heads), rotation)


def modulated_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine, then the AdaLN modulation of ``[B, dim]`` scale and shift."""
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale[:, None]) + shift[:, None]


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x + gate[:, None] * y


def rotated_query_key(x: torch.Tensor, q: Linear, k: Linear, norm_q: torch.Tensor, norm_k: torch.Tensor, eps: float,
                      heads: int, rotation: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention's rotated, RMS-normalised query and key ``[B, H, S, D]``; ``q``/``k``: (weight, bias)."""
    return (rms_rope(F.linear(x, *q), norm_q, eps, heads, rotation),
            rms_rope(F.linear(x, *k), norm_k, eps, heads, rotation))


def self_qkv(x: torch.Tensor, q: Linear, k: Linear, v: Linear, norm_q: torch.Tensor, norm_k: torch.Tensor, eps: float,
             heads: int, rotation: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """:func:`rotated_query_key` and self-attention's value, ``[B, H, S, D]`` each."""
    return (*rotated_query_key(x, q, k, norm_q, norm_k, eps, heads, rotation), split_heads(F.linear(x, *v), heads))


def cross_qkv(x: torch.Tensor, context: torch.Tensor, q: Linear, k: Linear, v: Linear, norm_q: torch.Tensor,
              norm_k: torch.Tensor, eps: float, heads: int) -> tuple[torch.Tensor, ...]:
    """Cross-attention's query (from the video tokens) and key and value (from the condition tokens)."""
    return (rms_heads(F.linear(x, *q), norm_q, eps, heads), rms_heads(F.linear(context, *k), norm_k, eps, heads),
            split_heads(F.linear(context, *v), heads))


def merge_heads(out: torch.Tensor, o: Linear) -> torch.Tensor:
    """An attention output ``[B, H, S, D]`` through the output projection: ``[B, S, dim]``."""
    return F.linear(out.transpose(1, 2).flatten(2), *o)


def residual_norm(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, norm: Linear,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """After self-attention: the gated residual, and its affine LayerNorm (``norm``: weight, bias), cross-attention's
    input."""
    x = gated_residual(x, gate, y)
    return x, F.layer_norm(x, x.shape[-1:], *norm, eps)


def mlp_residual(x: torch.Tensor, cross: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float,
                 up: Linear, down: Linear, gate: torch.Tensor) -> torch.Tensor:
    """After cross-attention: its residual, then the AdaLN-modulated MLP (tanh GELU) and its gated residual."""
    x = x + cross
    y = F.linear(F.gelu(F.linear(modulated_norm(x, scale, shift, eps), *up), approximate="tanh"), *down)
    return gated_residual(x, gate, y)


@dataclass(frozen=True)
class BlockOps:
    """A block's regions between attention calls: eager (:data:`EAGER_OPS`) or compiled (:func:`compiled_ops`)."""

    modulated_norm: Callable[..., torch.Tensor]
    self_qkv: Callable[..., tuple[torch.Tensor, ...]]
    cross_qkv: Callable[..., tuple[torch.Tensor, ...]]
    merge_heads: Callable[..., torch.Tensor]
    residual_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    mlp_residual: Callable[..., torch.Tensor]


EAGER_OPS = BlockOps(modulated_norm, self_qkv, cross_qkv, merge_heads, residual_norm, mlp_residual)
_COMPILED_OPS: dict[str, BlockOps] = {}


def compiled_ops(backend: str = "inductor") -> BlockOps:
    """:data:`EAGER_OPS` through ``torch.compile`` (one graph each, no graph break), made once per backend.

    Weights go in as arguments, so the six blocks share each graph."""
    if backend not in _COMPILED_OPS:
        _COMPILED_OPS[backend] = BlockOps(*(
            torch.compile(getattr(EAGER_OPS, f.name), backend=backend, fullgraph=True, dynamic=False)
            for f in fields(BlockOps)
        ))
    return _COMPILED_OPS[backend]


def _pair(linear: nn.Linear) -> Linear:
    return linear.weight, linear.bias


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class _Projections(nn.Module):
    """q/k/v/o projections and q/k RMSNorms shared by both attentions (their weight names)."""

    ops = EAGER_OPS

    def __init__(self, dim: int, heads: int, eps: float = 1e-6):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def _projections(self) -> tuple[Linear, Linear, Linear, torch.Tensor, torch.Tensor, float, int]:
        return (_pair(self.q), _pair(self.k), _pair(self.v), self.norm_q.weight, self.norm_k.weight, self.norm_q.eps,
                self.heads)


class WanSelfAttention(_Projections):
    """Self-attention over the video tokens with 3D RoPE; calls SDPA with ``[B, H, S, D]``."""

    def query_key(
        self, x: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated ``q`` and ``k`` ``[B, H, S, D]`` (what the attention scores are made of); ``rotation`` from
        :func:`rope_rotation`. Eager, and without the value's projection."""
        return rotated_query_key(x, _pair(self.q), _pair(self.k), self.norm_q.weight, self.norm_k.weight,
                                 self.norm_q.eps, self.heads, rotation)

    def forward(self, x: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q, k, v = self.ops.self_qkv(x, *self._projections(), rotation)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.ops.merge_heads(out, _pair(self.o))


class WanCrossAttention(_Projections):
    """Cross-attention from the video tokens to the condition tokens (kept dense by litepatch)."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = self.ops.cross_qkv(x, context, *self._projections())
        out = F.scaled_dot_product_attention(q, k, v)
        return self.ops.merge_heads(out, _pair(self.o))


class DemoBlock(nn.Module):
    """One Wan block: modulated self-attention, cross-attention, modulated MLP."""

    def __init__(self, cfg: DemoConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(dim, cfg.heads, cfg.eps)
        self.norm3 = nn.LayerNorm(dim, eps=cfg.eps)
        self.cross_attn = WanCrossAttention(dim, cfg.heads, cfg.eps)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    ops = EAGER_OPS

    def forward(self, x: torch.Tensor, e: torch.Tensor, context: torch.Tensor,
                rotation: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ops = self.ops
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + e).unbind(1)  # each [B, dim]
        y = self.self_attn(ops.modulated_norm(x, scale1, shift1, self.norm1.eps), rotation)
        x, normed = ops.residual_norm(x, gate1, y, (self.norm3.weight, self.norm3.bias), self.norm3.eps)
        cross = self.cross_attn(normed, context)
        up, down = _pair(self.ffn[0]), _pair(self.ffn[2])
        return ops.mlp_residual(x, cross, scale2, shift2, self.norm2.eps, up, down, gate2)


class DemoDiT(nn.Module):
    """The demo video DiT. ``forward(latents, timestep=t, cond=c)`` returns the velocity.

    Args:
        latents: ``[B, C, F, H, W]``.
        timestep: ``[B]`` or a scalar, flow-matching sigma times 1000.
        cond: long ``[B, 3]`` (shape, colour, direction; ``-1`` = null) or ``None`` (unconditional).
    """

    def __init__(self, config: DemoConfig | None = None):
        super().__init__()
        cfg = self.config = config or DemoConfig()
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, kernel_size=cfg.patch, stride=cfg.patch)
        # one table per condition slot; the last row of each is the null token (CFG)
        self.cond_embedding = nn.ModuleList(nn.Embedding(n + 1, dim) for n in cfg.cond_vocab)
        self.text_embedding = nn.Sequential(nn.Linear(dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(DemoBlock(cfg) for _ in range(cfg.layers))
        self.head_norm = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.head_modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.head = nn.Linear(dim, cfg.in_channels * math.prod(cfg.patch))
        self._rotations: dict = {}  # RoPE tables per (grid, device): _rope
        self._checked: list[tuple[torch.Tensor, int]] = []  # conditions already checked (_check_condition)

    def fuse_pointwise(self, enabled: bool = True, backend: str = "inductor") -> DemoDiT:
        """Runs each block's parts between attention calls (projections, norms, RoPE, modulation, MLP, residuals) as
        compiled graphs: seven calls of six functions (:class:`BlockOps`) where the eager block issues ~40 PyTorch ops.

        Same math (to float rounding), fewer kernels and far fewer host calls: on a GPU the eager 32768-token forward
        is bound by the host issuing its small ops, so that skipped attention tiles could not shorten it. The attention
        calls stay eager in the attention modules, so the litepatch patcher finds and replaces them as before; the
        first forward compiles (seconds). ``enabled=False`` goes back to eager.

        Example:
            >>> model = load_demo_model(model="video", device="cuda").to(torch.bfloat16).fuse_pointwise()
        """
        ops = compiled_ops(backend) if enabled else EAGER_OPS
        for block in self.blocks:
            block.ops = block.self_attn.ops = block.cross_attn.ops = ops
        return self

    def null_cond(self, batch: int, device=None) -> torch.Tensor:
        return torch.full((batch, len(self.config.cond_vocab)), -1, dtype=torch.long, device=device)

    def embed_condition(self, cond: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        """``[B, 3]`` indices (``-1`` = null) -> ``[B, 3, dim]`` condition tokens."""
        given = cond
        if cond is None:
            cond = self.null_cond(batch, device)
        cond = torch.as_tensor(cond, device=device).long()
        if cond.dim() == 1:
            cond = cond.expand(batch, -1)
        if cond.shape != (batch, len(self.config.cond_vocab)):
            raise ValueError(f"cond must be [batch={batch}, {len(self.config.cond_vocab)}], got {tuple(cond.shape)}")
        if given is not None:  # the null condition is valid by construction
            self._check_condition(given, cond)
        tokens = []
        for slot, (table, n) in enumerate(zip(self.cond_embedding, self.config.cond_vocab)):
            idx = cond[:, slot]
            tokens.append(table(torch.where(idx < 0, n, idx)))
        return self.text_embedding(torch.stack(tokens, dim=1))

    def _check_condition(self, given, cond: torch.Tensor) -> None:
        """Raises on indices outside a slot's table. Reading them back syncs a GPU, so a tensor passed again
        unchanged (a sampler's condition, every step) is checked once: the last few checked tensors are held (so
        their memory is not reused by another) with their version counters (an in-place write counts). Inference
        tensors have no version counter, so they are checked every time."""
        tracked = isinstance(given, torch.Tensor) and not given.is_inference()
        if cond.device.type == "meta" or (tracked and any(t is given and v == t._version for t, v in self._checked)):
            return
        for slot, n in enumerate(self.config.cond_vocab):
            idx = cond[:, slot]
            if bool(((idx < -1) | (idx >= n)).any()):
                raise ValueError(f"cond slot {slot} must be in [-1, {n - 1}], got {idx.tolist()}")
        if tracked:
            self._checked = [(given, given._version), *self._checked][:4]

    def _rope(self, grid: tuple[int, int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (grid, str(device))
        if key not in self._rotations:  # the RoPE tables of a grid, made once
            freqs = rope_frequencies(grid, self.config.head_dim, self.config.rope_theta, device)
            self._rotations[key] = rope_rotation(freqs)
        return self._rotations[key]

    def forward(
        self, latents: torch.Tensor, timestep: torch.Tensor | float, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        cfg = self.config
        if latents.dim() != 5 or latents.shape[1] != cfg.in_channels:
            raise ValueError(f"latents must be [B, {cfg.in_channels}, F, H, W], got {tuple(latents.shape)}")
        batch = latents.shape[0]
        timestep = torch.as_tensor(timestep, device=latents.device, dtype=torch.float32)
        if timestep.dim() == 0:
            timestep = timestep.expand(batch)
        x = self.patch_embedding(latents.to(self.patch_embedding.weight.dtype))
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)  # [B, S, dim], frame-major
        t_emb = self.time_embedding(sinusoidal_embedding(timestep, cfg.freq_dim).to(x.dtype))
        e = self.time_projection(t_emb).unflatten(1, (6, cfg.dim))
        context = self.embed_condition(cond, batch, latents.device).to(x.dtype)
        rotation = self._rope(grid, latents.device)
        for block in self.blocks:
            x = block(x, e, context, rotation)
        shift, scale = (self.head_modulation + t_emb[:, None]).unbind(1)
        x = self.head(self.head_norm(x) * (1 + scale[:, None]) + shift[:, None])
        return self._unpatchify(x, grid).to(latents.dtype)

    def _unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        pf, ph, pw = self.config.patch
        c = self.config.in_channels
        x = x.view(x.shape[0], *grid, pf, ph, pw, c)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # B, C, F, pf, H, ph, W, pw
        return x.reshape(x.shape[0], c, grid[0] * pf, grid[1] * ph, grid[2] * pw)


def default_weights_path(model: str = "small") -> Path:
    """Path of the committed trained weights of the built-in demo model ``model`` inside the package.

    Example:
        >>> default_weights_path("video").name
        'demo_video_dit.safetensors'
    """
    preset(model)
    return Path(str(resources.files("litepatch") / "assets" / WEIGHT_FILES[model]))


def save_demo_model(model: DemoDiT, path: str | Path, metadata: dict | None = None) -> None:
    """Writes fp16 weights plus the config (and ``metadata``) as safetensors metadata."""
    import json

    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    meta = {"config": json.dumps(model.config.to_dict())}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    save_file(tensors, str(path), metadata=meta)


def load_demo_model(
    path: str | Path | None = None, device: str | torch.device = "cpu", model: str = "small"
) -> DemoDiT:
    """Loads a demo DiT in fp32 eval mode: the weights at ``path``, or the committed ones of ``model``.

    Example:
        >>> load_demo_model().config.seq_len
        2048
        >>> load_demo_model(model="video").config.seq_len      # once its weights are shipped
        32768
    """
    import json

    from safetensors import safe_open

    path = Path(path) if path is not None else default_weights_path(model)
    if not path.is_file():
        raise FileNotFoundError(
            f"demo weights not found at {path}; train them with benchmarks/train_demo.py --model {model}"
        )
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if "config" not in meta:
            raise ValueError(f"{path} has no 'config' metadata; it was not written by save_demo_model")
        config = DemoConfig.from_dict(json.loads(meta["config"]))
        state = {k: f.get_tensor(k).float() for k in f.keys()}
    model = DemoDiT(config)
    model.load_state_dict(state, strict=True)
    model.training_metadata = meta
    return model.to(device).eval()


def neighbourhood_mask(grid: tuple[int, int, int], radius: tuple[int, int, int], device=None) -> torch.Tensor:
    """Bool ``[S, S]``: key token within ``radius`` (frames, rows, columns) of the query token."""
    coords = torch.stack(
        torch.meshgrid(*(torch.arange(g, device=device) for g in grid), indexing="ij"), dim=-1
    ).reshape(-1, 3)
    diff = (coords[:, None, :] - coords[None, :, :]).abs()
    return (diff <= torch.tensor(radius, device=device)).all(-1)


@torch.no_grad()
def attention_locality(
    model: DemoDiT,
    latents: torch.Tensor,
    timestep: torch.Tensor | float,
    cond: torch.Tensor | None = None,
    radius: tuple[int, int, int] = (1, 2, 2),
) -> dict:
    """Fraction of self-attention probability mass inside a spatio-temporal neighbourhood.

    ``radius`` is in tokens (frames, rows, columns). Returns ``{"per_layer": [...], "mean": m,
    "uniform": u}``, ``u`` being what uniform attention would give (the neighbourhood's share of keys).

    Example:
        >>> videos, cond = make_videos(2, seed=0)
        >>> attention_locality(load_demo_model(), videos, 500.0, cond)["mean"]
        0.6...
    """
    captured: list[tuple[WanSelfAttention, torch.Tensor, torch.Tensor]] = []

    def hook(module, args):
        captured.append((module, args[0], args[1]))

    handles = [block.self_attn.register_forward_pre_hook(hook) for block in model.blocks]
    try:
        model(latents, timestep=timestep, cond=cond)
    finally:
        for h in handles:
            h.remove()
    grid = tuple(s // p for s, p in zip(latents.shape[2:], model.config.patch))
    mask = neighbourhood_mask(grid, radius, latents.device)
    per_layer = []
    for module, x, rotation in captured:
        q, k = module.query_key(x, rotation)
        probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)
        per_layer.append(float((probs * mask).sum(-1).mean()))
    return {"per_layer": per_layer, "mean": sum(per_layer) / len(per_layer), "uniform": float(mask.float().mean())}
