"""Fully connected residual networks: the pose auto-encoder (§4), the mappings Φ and critics (§5)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dpig_core.layers import uniform_std_, xavier_


class _ResidualFC(nn.Module):
    """[FC h→h + LReLU(0.2), FC h→h + LReLU(0.2)] plus the input."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.leaky_relu(self.fc2(F.leaky_relu(self.fc1(x), 0.2)), 0.2)


class ResidualMLP(nn.Module):
    """FC in→h (+ LReLU unless `linear_in`), `blocks` residual FC blocks, FC h→out (linear).

    This is `GaussianFCRes` (Φ) and `PoseEncoderFCRes`; `PoseDecoderFCRes` is its trunk with a
    linear first layer and two heads.
    """

    def __init__(
        self, dim_in: int, hidden: int, dim_out: int | None, blocks: int, linear_in: bool = False
    ) -> None:
        super().__init__()
        self.fc_in = nn.Linear(dim_in, hidden)
        self.linear_in = linear_in
        self.blocks = nn.Sequential(*(_ResidualFC(hidden) for _ in range(blocks)))
        self.fc_out = nn.Linear(hidden, dim_out) if dim_out is not None else None
        xavier_(self)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc_in(x)
        if not self.linear_in:
            x = F.leaky_relu(x, 0.2)
        out: torch.Tensor = self.blocks(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trunk(x)
        return self.fc_out(x) if self.fc_out is not None else x


class Mapping(ResidualMLP):
    """Φ (`GaussianFCRes`): z ~ N(0, 0.2²) of dimension d → an embedding of dimension d."""

    def __init__(self, dim: int, hidden: int, blocks: int = 4) -> None:
        super().__init__(dim, hidden, dim, blocks)
        self.dim = dim


class Critic(nn.Module):
    """WGAN critic on embeddings (tflib `FCDiscriminator`): d → h, `layers` × (h → h), → 1.

    Hidden layers use tflib's "he" uniform init, the output layer Glorot uniform (§5).
    """

    def __init__(self, dim: int, hidden: int = 512, layers: int = 3) -> None:
        super().__init__()
        linears = [nn.Linear(dim if i == 0 else hidden, hidden) for i in range(layers + 1)]
        self.hidden = nn.ModuleList(linears)
        self.out = nn.Linear(hidden, 1)
        for layer in linears:
            uniform_std_(layer, math.sqrt(2.0 / layer.in_features))
        xavier_(self.out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = F.leaky_relu(layer(x), 0.2)
        out: torch.Tensor = self.out(x)
        return out
