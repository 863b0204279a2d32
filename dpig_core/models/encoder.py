"""Stage-I encoders (spec §3.1 and §6): image → foreground (+ background) embedding."""

from __future__ import annotations

import torch
from torch import nn

from dpig_core.config import DPIGConfig
from dpig_core.layers import ResBlock, SameConv2d, Tower, crop_and_resize, xavier_
from dpig_core.pose import NUM_ROIS


class _RoiBranch(nn.Module):
    """Shared-weight tower over the 7 body-ROI crops → 7 × roi_dim, zeroed for invisible parts."""

    def __init__(self, config: DPIGConfig) -> None:
        super().__init__()
        self.roi_size = config.roi_size
        self.tower = Tower(config.hidden, config.roi_depth)
        side = config.roi_size // 2 ** (config.roi_depth - 1)
        self.fc = nn.Linear(side * side * self.tower.out_channels, config.roi_dim)

    def forward(self, features: torch.Tensor, boxes: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
        b = features.shape[0]
        crops = crop_and_resize(features, boxes, self.roi_size)  # [B, 7, C, S, S]
        crops = crops.flatten(0, 1)  # [7B, C, S, S]: the 7 ROIs share the tower
        codes = self.fc(self.tower(crops).flatten(1)).view(b, NUM_ROIS, -1)  # [B, 7, roi_dim]
        gated: torch.Tensor = (codes * vis.to(codes.dtype)[..., None]).flatten(1)  # [B, 7·roi_dim]
        return gated


class _Stem(nn.Sequential):
    """conv3×3 (3 → n) + ReLU, then one residual block: [B, 3, H, W] → [B, n, H, W]."""

    def __init__(self, hidden: int) -> None:
        super().__init__(SameConv2d(3, hidden, 3), nn.ReLU(), ResBlock(hidden))


class FgBgEncoder(nn.Module):
    """Market encoder (`..._BodyROIVis_FgBgFeaTwoBranch`): the stem features are split by the limb
    mask; ROIs are pooled from the foreground half, a tower runs on the background half.

    image [B, 3, H, W], mask [B, 1, H, W] ∈ {0, 1}, boxes [B, 7, 4], vis [B, 7]
    → [B, 7·roi_dim + bg_dim] = [fg | bg].
    """

    def __init__(self, config: DPIGConfig) -> None:
        super().__init__()
        self.stem = _Stem(config.hidden)
        self.roi = _RoiBranch(config)
        self.bg_tower = Tower(config.hidden, config.bg_depth)
        down = 2 ** (config.bg_depth - 1)
        flat = (config.height // down) * (config.width // down) * self.bg_tower.out_channels
        self.bg_fc = nn.Linear(flat, config.bg_dim)
        xavier_(self)

    def forward(
        self,
        image: torch.Tensor,
        mask: torch.Tensor | None,
        boxes: torch.Tensor,
        vis: torch.Tensor,
    ) -> torch.Tensor:
        if mask is None:
            raise ValueError("FgBgEncoder needs the limb mask of each image")
        features = self.stem(image)
        mask = mask.to(features.dtype)
        fg = self.roi(features * mask, boxes, vis)
        bg = self.bg_fc(self.bg_tower(features * (1 - mask)).flatten(1))
        return torch.cat([fg, bg], dim=1)


class AppEncoder(nn.Module):
    """DeepFashion encoder (`..._BodyROIVis`): ROIs from the unmasked stem features, no background.

    image [B, 3, H, W], boxes [B, 7, 4], vis [B, 7] → [B, 7·roi_dim]; the mask is ignored.
    """

    def __init__(self, config: DPIGConfig) -> None:
        super().__init__()
        self.stem = _Stem(config.hidden)
        self.roi = _RoiBranch(config)
        xavier_(self)

    def forward(
        self,
        image: torch.Tensor,
        mask: torch.Tensor | None,  # noqa: ARG002 - same signature as FgBgEncoder
        boxes: torch.Tensor,
        vis: torch.Tensor,
    ) -> torch.Tensor:
        fg: torch.Tensor = self.roi(self.stem(image), boxes, vis)
        return fg


def build_encoder(config: DPIGConfig) -> FgBgEncoder | AppEncoder:
    return FgBgEncoder(config) if config.has_bg else AppEncoder(config)
