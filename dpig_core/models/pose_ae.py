"""Pose auto-encoder (spec §4): 54 normalised keypoint numbers ↔ a 32-d pose code."""

from __future__ import annotations

import torch
from torch import nn

from dpig_core.config import DPIGConfig
from dpig_core.layers import xavier_
from dpig_core.models.mlp import ResidualMLP
from dpig_core.pose import NUM_KEYPOINTS


def straight_through_round(x: torch.Tensor) -> torch.Tensor:
    """Forward: round; backward: identity."""
    return x + (torch.round(x) - x).detach()


class PoseDecoder(nn.Module):
    """code [B, d] → (coords [B, 18, 2] as normalised (r, c), visibility [B, 18] ∈ {0, 1})."""

    def __init__(self, code_dim: int, hidden: int, blocks: int) -> None:
        super().__init__()
        self.trunk = ResidualMLP(code_dim, hidden, None, blocks, linear_in=True)
        self.coords = nn.Linear(hidden, NUM_KEYPOINTS * 2)
        self.vis = nn.Linear(hidden, NUM_KEYPOINTS)
        xavier_(self)

    def forward(self, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(code)
        coords = self.coords(h).view(-1, NUM_KEYPOINTS, 2)
        vis = straight_through_round(torch.sigmoid(self.vis(h)))
        return coords, vis


class PoseAE(nn.Module):
    """`PoseEncoderFCRes` + `PoseDecoderFCRes`. The encoder takes `dpig_core.pose.normalize_rcv`."""

    def __init__(self, config: DPIGConfig) -> None:
        super().__init__()
        dims = (config.pose_hidden, config.mlp_blocks)
        self.encoder = ResidualMLP(NUM_KEYPOINTS * 3, dims[0], config.pose_dim, dims[1])
        self.decoder = PoseDecoder(config.pose_dim, *dims)

    def encode(self, normalized: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.encoder(normalized)
        return out

    def decode(self, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out: tuple[torch.Tensor, torch.Tensor] = self.decoder(code)
        return out

    def forward(self, normalized: torch.Tensor) -> torch.Tensor:
        """Reconstruction in the input layout: [B, 54] interleaved (r, c, v)."""
        coords, vis = self.decode(self.encode(normalized))
        return torch.cat([coords, vis[..., None]], dim=-1).flatten(1)
