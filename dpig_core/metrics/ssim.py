"""SSIM as scikit-image's `structural_similarity` computes it, in the three variants the person-
generation literature uses (metrics-notes §1.5). Every report names the variant it used."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

Window = Literal["uniform", "gaussian"]

# scikit-image rgb2gray (ITU-R 709 luma).
GRAY_WEIGHTS = (0.2125, 0.7154, 0.0721)


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] → [B, 1, H, W]."""
    w = torch.tensor(GRAY_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _kernel(window: Window, win_size: int, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    """The 1-D taps [k] of the (separable) window."""
    if window == "uniform":
        k1 = torch.full((win_size,), 1.0 / win_size, dtype=dtype)
    else:
        radius = win_size // 2
        t = torch.arange(-radius, radius + 1, dtype=dtype)
        k1 = torch.exp(-0.5 * (t / sigma) ** 2)
        k1 = k1 / k1.sum()
    return k1


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: torch.Tensor | float,
    *,
    window: Window = "uniform",
    win_size: int = 7,
    sigma: float = 1.5,
    sample_covariance: bool = True,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Mean SSIM per image: x, y [B, C, H, W] (any value scale), data_range scalar or [B] → [B].

    Matches skimage: local statistics over the window with the border of half a window cropped
    (computed here as a 'valid' convolution), channels averaged. A Gaussian window has
    size 2·⌊3.5σ + 0.5⌋ + 1 (skimage's truncate = 3.5) when `window="gaussian"`.
    """
    x, y = x.double(), y.double()
    if window == "gaussian":
        win_size = 2 * int(3.5 * sigma + 0.5) + 1
    b, c, h, w = x.shape
    if win_size > min(h, w):
        raise ValueError(f"SSIM window {win_size} is larger than the {h}x{w} image")
    taps = _kernel(window, win_size, sigma, x.dtype).to(x.device)
    rows, cols = taps.view(1, 1, -1, 1), taps.view(1, 1, 1, -1)  # the window is separable

    def local_mean(t: torch.Tensor) -> torch.Tensor:
        flat = F.conv2d(F.conv2d(t.reshape(b * c, 1, h, w), rows), cols)
        return flat.view(b, c, h - win_size + 1, -1)

    n = win_size**2
    cov_norm = n / (n - 1) if sample_covariance else 1.0
    ux, uy = local_mean(x), local_mean(y)
    vx = cov_norm * (local_mean(x * x) - ux * ux)
    vy = cov_norm * (local_mean(y * y) - uy * uy)
    vxy = cov_norm * (local_mean(x * y) - ux * uy)
    r = torch.as_tensor(data_range, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
    c1, c2 = (k1 * r) ** 2, (k2 * r) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


def _per_image_range(t: torch.Tensor) -> torch.Tensor:
    flat = t.flatten(1)
    return flat.max(dim=1).values - flat.min(dim=1).values


def ssim_dpig(generated: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DPIG `score.py`: grayscale in [0, 1], uniform window 7, data_range = the target's max − min.

    Inputs: uint8-valued [B, 3, H, W] (0–255), as read from the saved PNGs.
    """
    g = rgb_to_gray(generated.double() / 255)
    t = rgb_to_gray(target.double() / 255)
    return ssim(g, t, _per_image_range(t).clamp_min(1e-12), window="uniform", win_size=7)


def ssim_patn(generated: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PATN / Def-GAN: RGB, Gaussian σ = 1.5, population covariance, data_range = the generated
    image's max − min. Inputs uint8-valued [B, 3, H, W]."""
    g, t = generated.double(), target.double()
    return ssim(g, t, _per_image_range(g).clamp_min(1e-12), window="gaussian", sigma=1.5,
                sample_covariance=False)  # fmt: skip


def ssim_gfla(generated: torch.Tensor, target: torch.Tensor, win_size: int = 51) -> torch.Tensor:
    """GFLA / PIDM `Reconstruction_Metrics`: RGB in [0, 1], uniform window 51, data_range 1.
    The window shrinks to the largest odd size that fits smaller images (noted in reports)."""
    g, t = generated.double() / 255, target.double() / 255
    fit = min(win_size, *(s - (1 - s % 2) for s in g.shape[-2:]))
    return ssim(g, t, 1.0, window="uniform", win_size=fit)


SSIM_VARIANTS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ssim_dpig": ssim_dpig,
    "ssim_patn": ssim_patn,
    "ssim_gfla": ssim_gfla,
}


def psnr(generated: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of uint8-valued images, per image."""
    mse = ((generated.double() - target.double()) ** 2).flatten(1).mean(dim=1)
    return 10 * torch.log10(255.0**2 / mse.clamp_min(1e-12))


def l1(generated: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference in [0, 1] units, per image."""
    return ((generated.double() - target.double()).abs() / 255).flatten(1).mean(dim=1)


__all__ = [
    "SSIM_VARIANTS",
    "l1",
    "psnr",
    "rgb_to_gray",
    "ssim",
    "ssim_dpig",
    "ssim_gfla",
    "ssim_patn",
]
