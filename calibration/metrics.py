"""Quality metrics between a patched output and the dense output of the same sample.

Every metric takes ``(output, reference)`` tensors of one shape (latents or frames, any layout)
and returns a float. Built-ins: ``psnr`` (dB, higher is better), ``ssim`` (higher is better),
``rel_l2`` (``||output - reference|| / ||reference||``, lower is better). User metrics (LPIPS,
VBench scores...) are plugged in with :func:`register_metric` and can then be named in a budget.

Example:
    >>> import torch
    >>> ref = torch.zeros(1, 3, 4, 8, 8); out = ref + 0.1
    >>> round(psnr(out, ref, data_range=1.0), 6)
    20.0
    >>> register_metric("max_abs", lambda o, r: float((o - r).abs().max()), higher_is_better=False)
    >>> get_metric("max_abs")(out, ref)
    0.10000000149011612
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MetricFn = Callable[[torch.Tensor, torch.Tensor], float]


@dataclass(frozen=True)
class Metric:
    """A named quality metric; ``higher_is_better`` fixes which budget direction makes sense."""

    name: str
    fn: MetricFn
    higher_is_better: bool
    description: str = ""

    def __call__(self, output: torch.Tensor, reference: torch.Tensor) -> float:
        if output.shape != reference.shape:
            raise ValueError(
                f"metric {self.name!r}: output shape {tuple(output.shape)} differs from the dense "
                f"reference {tuple(reference.shape)}; run() must return the same tensor shape every time"
            )
        value = float(self.fn(output, reference))
        if math.isnan(value):
            raise ValueError(f"metric {self.name!r} returned NaN (does the output contain NaN or inf?)")
        return value


_REGISTRY: dict[str, Metric] = {}


def register_metric(
    name: str, fn: MetricFn, *, higher_is_better: bool, description: str = "", overwrite: bool = False
) -> Metric:
    """Adds a metric ``fn(output, reference) -> float`` that budgets can name (e.g. LPIPS).

    Args:
        name (`str`): identifier used in budgets (``"lpips <= 0.05"``): letters, digits and ``_``.
        fn (`Callable`): called with the patched and the dense output of one sample.
        higher_is_better (`bool`): ``True`` for similarities (PSNR, SSIM), ``False`` for distances.
        overwrite (`bool`, defaults to `False`): replace an existing metric of that name.
    """
    if not name or not name.replace("_", "a").isalnum() or name[0].isdigit():
        raise ValueError(f"metric name must be an identifier (letters, digits, _), got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"metric {name!r} is already registered; pass overwrite=True to replace it")
    if not callable(fn):
        raise TypeError(f"metric {name!r}: fn must be callable, got {type(fn).__name__}")
    metric = Metric(name, fn, bool(higher_is_better), description)
    _REGISTRY[name] = metric
    return metric


def get_metric(name: str) -> Metric:
    """The registered metric called ``name``; an unknown name lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; available: {', '.join(available_metrics())}") from None


def available_metrics() -> list[str]:
    return sorted(_REGISTRY)


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float64)


def psnr(output: torch.Tensor, reference: torch.Tensor, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical tensors.

    ``data_range`` defaults to the peak-to-peak range of ``reference`` (the dense output), so the value
    does not depend on whether ``run`` returns latents in [-1, 1] or frames in [0, 255].
    """
    out, ref = _as_float(output), _as_float(reference).to(output.device)
    mse = float((out - ref).pow(2).mean())
    if mse == 0.0:
        return math.inf
    if data_range is None:
        data_range = float(ref.max() - ref.min()) or 1.0
    return 10.0 * math.log10(data_range**2 / mse)


def rel_l2(output: torch.Tensor, reference: torch.Tensor) -> float:
    """Relative L2 error ``||output - reference|| / ||reference||`` (0 for identical tensors)."""
    out, ref = _as_float(output), _as_float(reference).to(output.device)
    norm = float(ref.norm())
    diff = float((out - ref).norm())
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


def ssim(
    output: torch.Tensor,
    reference: torch.Tensor,
    data_range: float | None = None,
    window: int = 11,
    sigma: float = 1.5,
) -> float:
    """Mean structural similarity over the last two dims (height, width); other dims are images.

    Gaussian window (``window`` x ``window``, ``sigma`` 1.5, shrunk to fit small images), valid
    convolution, ``K1 = 0.01``, ``K2 = 0.03`` as in Wang et al. 2004. ``data_range`` defaults to the
    peak-to-peak range of ``reference``.
    """
    if output.dim() < 2:
        raise ValueError(f"ssim needs at least 2-D tensors (..., height, width), got shape {tuple(output.shape)}")
    out, ref = _as_float(output), _as_float(reference).to(output.device)
    h, w = out.shape[-2:]
    size = min(window, h, w)
    if data_range is None:
        data_range = float(ref.max() - ref.min()) or 1.0
    a = out.reshape(-1, 1, h, w)
    r = ref.reshape(-1, 1, h, w)
    coords = torch.arange(size, dtype=torch.float64, device=a.device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :])[None, None]

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_r = blur(a), blur(r)
    var_a = blur(a * a) - mu_a**2
    var_r = blur(r * r) - mu_r**2
    cov = blur(a * r) - mu_a * mu_r
    s = ((2 * mu_a * mu_r + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_r**2 + c1) * (var_a + var_r + c2))
    return float(s.mean())


register_metric("psnr", psnr, higher_is_better=True, description="peak signal-to-noise ratio (dB) vs dense")
register_metric("ssim", ssim, higher_is_better=True, description="structural similarity vs dense")
register_metric("rel_l2", rel_l2, higher_is_better=False, description="relative L2 error vs dense")
