"""Building blocks shared by the DPIG networks (spec §3): TF-"SAME" convolutions, residual blocks,
towers, `crop_and_resize` with TF semantics, and the TF initialisers (§11.22)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def xavier_(module: nn.Module) -> None:
    """slim default: Xavier-uniform weights, zero biases, for every conv and linear layer."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def uniform_std_(layer: nn.Conv2d | nn.Linear, std: float) -> None:
    """tflib init: uniform in ±std·√3 (so the standard deviation is `std`), zero bias."""
    bound = std * math.sqrt(3.0)
    nn.init.uniform_(layer.weight, -bound, bound)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (asymmetric, extra row/column at the bottom/right)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride, padding=0)
        self._pad: tuple[int, int, int, int] | None = None
        self._symmetric = kernel % 2 == 1 and stride == 1
        if self._symmetric:
            self.padding = (kernel // 2, kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._symmetric:
            return super().forward(x)
        k, s = self.kernel_size[0], self.stride[0]
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad order: last dim first
            total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride)


class ResBlock(nn.Module):
    """conv3×3 + ReLU → conv3×3 + ReLU, plus the block input (channel count unchanged)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = SameConv2d(channels, channels, 3)
        self.conv2 = SameConv2d(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(self.conv2(F.relu(self.conv1(x))))


class Down(nn.Module):
    """conv3×3 stride 2 + ReLU: halves H and W."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = SameConv2d(cin, cout, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x))


class Tower(nn.Module):
    """For i in 0..depth−1: Block(n·(i+1)), then Down(n·(i+2)) except after the last block.

    [B, n, H, W] → [B, n·depth, H / 2^(depth−1), W / 2^(depth−1)]; `forward_skips` also returns the
    output of every block (the U-Net skips).
    """

    def __init__(self, hidden: int, depth: int) -> None:
        super().__init__()
        self.out_channels = hidden * depth
        self.blocks = nn.ModuleList(ResBlock(hidden * (i + 1)) for i in range(depth))
        self.downs = nn.ModuleList(
            Down(hidden * (i + 1), hidden * (i + 2)) for i in range(depth - 1)
        )

    def forward_skips(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            skips.append(x)
            if i < len(self.downs):
                x = self.downs[i](x)
        return x, skips

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_skips(x)[0]


def crop_and_resize(features: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """TF `tf.image.crop_and_resize` (bilinear, extrapolation 0) of R boxes per image.

    features [B, C, H, W]; boxes [B, R, 4] as pixel (y1, x1, y2, x2), normalised here by H and W
    (not H−1 and W−1, as in the reference code) → crops [B, R, C, size, size].
    Sample i of a crop reads row y1n·(H−1) + i·(y2n − y1n)·(H−1)/(size−1), and 0 outside the image.
    """
    _, _, h, w = features.shape
    dtype = features.dtype if features.is_floating_point() else torch.float32
    coord = torch.float64 if dtype == torch.float64 else torch.float32
    boxes = boxes.to(device=features.device, dtype=coord)
    y1n, x1n = boxes[..., 0:1] / h, boxes[..., 1:2] / w  # [B, R, 1]
    y2n, x2n = boxes[..., 2:3] / h, boxes[..., 3:4] / w
    if size > 1:
        steps = torch.arange(size, device=features.device, dtype=coord) / (size - 1)
        ys = y1n * (h - 1) + steps * (y2n - y1n) * (h - 1)  # [B, R, S]
        xs = x1n * (w - 1) + steps * (x2n - x1n) * (w - 1)
    else:
        ys = 0.5 * (y1n + y2n) * (h - 1)
        xs = 0.5 * (x1n + x2n) * (w - 1)
    # grid_sample(align_corners=True) maps −1/+1 to the first/last pixel centre: exact bilinear.
    gy = ys / max(h - 1, 1) * 2 - 1
    gx = xs / max(w - 1, 1) * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(gx[..., None, :], gy[..., :, None]), dim=-1)
    inside_y = (ys >= 0) & (ys <= h - 1)
    inside_x = (xs >= 0) & (xs <= w - 1)
    inside = (inside_y[..., :, None] & inside_x[..., None, :]).to(dtype)  # [B, R, S, S]
    crops = [
        F.grid_sample(
            features, grid[:, r].to(dtype), mode="bilinear", padding_mode="zeros",
            align_corners=True,
        )  # [B, C, S, S]; one call per ROI so the features are never copied R times
        * inside[:, r, None]
        for r in range(boxes.shape[1])
    ]  # fmt: skip
    return torch.stack(crops, dim=1)
