"""Stage-I decoder (spec §3.2–§3.3): a U-Net with an FC bottleneck (`GeneratorCNN_ID_UAEAfterResidual`).

Input: the embedding broadcast to every pixel, concatenated with the 18 pose maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpig_core.config import DPIGConfig
from dpig_core.layers import ResBlock, SameConv2d, Tower, xavier_
from dpig_core.pose import NUM_KEYPOINTS


def _valid_taps(size: int, kernel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[size, kernel]: 1 where tap k of a stride-1 'SAME' conv at position i reads inside the image."""
    pos = torch.arange(size, device=device)[:, None] + torch.arange(kernel, device=device) - kernel // 2
    return ((pos >= 0) & (pos < size)).to(dtype)


def constant_input_conv(
    weight: torch.Tensor, values: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Exact zero-padded 'SAME' conv (no bias) of spatially constant channels, without building them.

    weight [O, C, k, k], values [B, C] → [B, O, H, W]. Each of the k² taps contributes W_tap·v
    wherever it falls inside the image; the interior gets all taps, the border only the valid ones.
    """
    kernel = weight.shape[-1]
    taps = torch.einsum("ocyx,bc->boyx", weight, values)  # [B, O, k, k]: per-image taps
    rows = _valid_taps(height, kernel, values.device, taps.dtype)  # [H, k]
    cols = _valid_taps(width, kernel, values.device, taps.dtype)  # [W, k]
    per_col = torch.einsum("boyx,jx->boyj", taps, cols)  # [B, O, k, W]
    return torch.einsum("iy,boyj->boij", rows, per_col)  # [B, O, H, W]


class UNetDecoder(nn.Module):
    """embedding [B, E] + pose maps [B, 18, H, W] ∈ {−1, +1} → image [B, 3, H, W] (linear, no tanh).

    With `fast_input_conv` (the default) the first 3×3 conv over the E constant channels is computed
    by `constant_input_conv`: the same numbers as the plain conv, at a fraction of the cost (§9 note).
    With `early_up_conv` (the default) each decoder stage's 1×1 conv and ReLU run before the nearest
    ×2 upsampling instead of after it: both act on each pixel alone, so they commute with it, and
    run on a quarter of the pixels (the upsampling also copies fewer channels). Same numbers.
    """

    def __init__(self, config: DPIGConfig) -> None:
        super().__init__()
        n, depth = config.hidden, config.decoder_depth
        self.embedding_dim = config.embedding_dim
        self.fast_input_conv = True
        self.early_up_conv = True
        self.conv_in = SameConv2d(config.embedding_dim + NUM_KEYPOINTS, n, 3)
        self.down = Tower(n, depth)
        self.bottom = (config.height // 2 ** (depth - 1), config.width // 2 ** (depth - 1))
        cells = self.bottom[0] * self.bottom[1]
        self.fc_down = nn.Linear(cells * self.down.out_channels, config.bottleneck_dim)
        self.fc_up = nn.Linear(config.bottleneck_dim, cells * n)
        self.up_blocks = nn.ModuleList()
        self.up_convs = nn.ModuleList()
        channels = n
        for j in range(depth):
            channels += n * (depth - j)  # concatenated skip of encoder stage depth−1−j
            self.up_blocks.append(ResBlock(channels))
            if j < depth - 1:
                self.up_convs.append(nn.Conv2d(channels, n * (depth - 1 - j), 1))
                channels = n * (depth - 1 - j)
        self.conv_out = SameConv2d(channels, 3, 3)
        xavier_(self)

    def input_conv(self, embedding: torch.Tensor, pose_maps: torch.Tensor) -> torch.Tensor:
        """The first conv (before its ReLU): [B, E] + [B, 18, H, W] → [B, n, H, W]."""
        h, w = pose_maps.shape[-2:]
        weight, bias = self.conv_in.weight, self.conv_in.bias
        if not self.fast_input_conv:
            tiled = embedding[:, :, None, None].expand(-1, -1, h, w)
            out: torch.Tensor = self.conv_in(torch.cat([tiled, pose_maps.to(embedding.dtype)], 1))
            return out
        e = self.embedding_dim
        pose_part = F.conv2d(pose_maps.to(weight.dtype), weight[:, e:], bias, padding=1)
        return pose_part + constant_input_conv(weight[:, :e], embedding.to(weight.dtype), h, w)

    def forward(self, embedding: torch.Tensor, pose_maps: torch.Tensor) -> torch.Tensor:
        b = embedding.shape[0]
        x = F.relu(self.input_conv(embedding, pose_maps))
        x, skips = self.down.forward_skips(x)
        x = self.fc_up(self.fc_down(x.flatten(1))).view(b, -1, *self.bottom)  # [B, n, h, w]
        for j, block in enumerate(self.up_blocks):
            x = block(torch.cat([x, skips[-1 - j]], dim=1))
            if j < len(self.up_convs):
                if self.early_up_conv:
                    x = F.relu(self.up_convs[j](x))
                    x = F.interpolate(x, scale_factor=2.0, mode="nearest")
                else:
                    x = F.interpolate(x, scale_factor=2.0, mode="nearest")
                    x = F.relu(self.up_convs[j](x))
        out: torch.Tensor = self.conv_out(x)
        return out
