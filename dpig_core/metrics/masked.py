"""Mask-SSIM (Market-1501): SSIM of generated and target images with the background zeroed out by a
limb mask (metrics-notes §1.5, dpig-spec §8).

Whose keypoints draw the mask depends on the protocol, and the caller picks:

* PATN / Def-GAN / GFLA (the field's convention): the **target** image's keypoints, limbs of
  half-width 4 and joint disks r = 4 at 128×64, 5×5 closing.
* DPIG's own `score_mask.py` (and PG2's): the **source (condition)** image's mask, radius 7 at
  128×64 (pass `radius=7` with the source keypoints). Its numbers are not strictly comparable
  with the field's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from dpig_core.data.synth import FactorRecord, render_person_mask
from dpig_core.metrics.ssim import ssim, ssim_patn
from dpig_core.pose import limb_mask

MaskVariant = Literal["dpig", "patn"]


def default_radius(height: int) -> int:
    """PATN's half-width 4 at 128×64, scaled with the image height."""
    return max(1, round(4 * height / 128))


def person_masks(
    rcv: torch.Tensor | npt.NDArray[np.floating],
    height: int,
    width: int,
    radius: int | None = None,
) -> torch.Tensor:
    """Limb masks of keypoints rcv [B, 18, 3] (row, col, visible; pixels) → float {0, 1}
    [B, 1, H, W] (`dpig_core.pose.limb_mask`: disks along the 23 limbs, then a 5×5 closing).
    `radius` defaults to `default_radius(height)`."""
    arr = rcv.detach().cpu().numpy() if isinstance(rcv, torch.Tensor) else np.asarray(rcv)
    if arr.ndim != 3 or arr.shape[1:] != (18, 3):
        raise ValueError(f"rcv must be [B, 18, 3], got {arr.shape}")
    r = default_radius(height) if radius is None else radius
    masks = [limb_mask(k.astype(np.float32), height, width, r) for k in arr]
    out = np.stack(masks) if masks else np.zeros((0, height, width), np.uint8)
    return torch.from_numpy(out.astype(np.float32)).unsqueeze(1)


def true_person_masks(records: Sequence[FactorRecord], height: int, width: int) -> torch.Tensor:
    """The renderer's own person masks of synthetic records → float {0, 1} [B, 1, H, W]: a pixel
    is the person's when the drawn person covers at least half of it.

    Limb masks of radius 4 at 64×32 are about 35% background, so region scores on synthetic data
    use these instead."""
    masks = []
    for r in records:
        soft = render_person_mask(r.identity, r.pose, r.height, r.width)
        if soft.shape != (height, width):
            soft = np.asarray(
                Image.fromarray(soft).resize((width, height), Image.Resampling.BILINEAR)
            )
        masks.append(soft >= 128)
    out = np.stack(masks) if masks else np.zeros((0, height, width), bool)
    return torch.from_numpy(out.astype(np.float32)).unsqueeze(1)


def apply_mask(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """uint8-valued [B, 3, H, W] × mask [B, 1, H, W] (or [B, H, W]) → uint8-valued float64,
    floored as numpy's `astype(np.uint8)` does for the products in [0, 255]."""
    m = masks.to(images.device, torch.float64)
    if m.ndim == 3:
        m = m.unsqueeze(1)
    return torch.floor(images.double() * m).clamp(0, 255)


def mask_ssim(
    generated: torch.Tensor,
    target: torch.Tensor,
    masks: torch.Tensor,
    variant: MaskVariant = "dpig",
) -> torch.Tensor:
    """Mask-SSIM per image: uint8-valued images [B, 3, H, W] (0–255), masks [B, 1, H, W] in
    {0, 1} → [B] float64.

    `"dpig"` (DPIG `score_mask.py`): both images masked and cast to uint8, SSIM on RGB, uniform
    window 7, sample covariance, data_range 255 (skimage `compare_ssim(multichannel=True)`).
    `"patn"`: the masked images scored with `ssim_patn` (Gaussian σ 1.5, population covariance,
    data_range = the masked generated image's max − min).

    An all-zero mask leaves two black images, whose SSIM is defined as 1 (skimage gives 1 for the
    DPIG variant and 0/0 for PATN's data_range of 0).
    """
    if generated.shape != target.shape:
        raise ValueError(f"image shapes differ: {tuple(generated.shape)} vs {tuple(target.shape)}")
    g, t = apply_mask(generated, masks), apply_mask(target, masks)
    if variant == "dpig":
        score = ssim(g, t, 255.0, window="uniform", win_size=7, sample_covariance=True)
    elif variant == "patn":
        score = ssim_patn(g, t)
    else:
        raise ValueError(f"unknown mask-SSIM variant {variant!r}; choose 'dpig' or 'patn'")
    empty = masks.flatten(1).amax(dim=1).to(score.device) <= 0
    return torch.where(empty, torch.ones_like(score), score)


__all__ = ["apply_mask", "default_radius", "mask_ssim", "person_masks", "true_person_masks"]
