"""DCGAN discriminator (tflib `DCGANDiscriminator`, spec §3.4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpig_core.config import DPIGConfig
from dpig_core.layers import SameConv2d, uniform_std_


class DCGANDiscriminator(nn.Module):
    """image [B, 3, H, W] → logits [B, features / logit_width] (one per image unless configured).

    Four 5×5 stride-2 convs (dim, 2·dim, 4·dim, 8·dim), BatchNorm on the last three, LeakyReLU 0.2.
    The BatchNorm always uses the statistics of the batch it is given (running stats are never
    kept), as the reference does even at test time.
    """

    def __init__(self, config: DPIGConfig) -> None:
        super().__init__()
        dim = config.disc_dim
        widths = [3, dim, 2 * dim, 4 * dim, 8 * dim]
        self.convs = nn.ModuleList(SameConv2d(widths[i], widths[i + 1], 5, 2) for i in range(4))
        self.norms = nn.ModuleList(
            nn.BatchNorm2d(c, eps=1e-5, track_running_stats=False) for c in widths[2:]
        )
        self.logit_width = config.disc_logit_width or config.disc_features
        self.fc = nn.Linear(self.logit_width, 1)
        for layer in [*self.convs, self.fc]:
            uniform_std_(layer, 0.02)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.convs[0](image), 0.2)
        for conv, norm in zip(self.convs[1:], self.norms, strict=True):
            x = F.leaky_relu(norm(conv(x)), 0.2)
        rows = x.flatten(1).reshape(-1, self.logit_width)  # [B·k, logit_width]
        logits: torch.Tensor = self.fc(rows).view(image.shape[0], -1)  # [B, k]
        return logits
