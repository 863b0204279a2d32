"""Exponential moving average of module weights: the generator's exported weights (an option)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class EMA:
    """shadow ← decay·shadow + (1 − decay)·weights at every update; integer buffers copied."""

    def __init__(self, modules: Sequence[nn.Module], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.modules, self.decay = list(modules), decay
        self.shadow = [
            {k: v.detach().clone() for k, v in m.state_dict().items()} for m in self.modules
        ]

    @torch.no_grad()
    def update(self) -> None:
        for module, shadow in zip(self.modules, self.shadow, strict=True):
            for name, value in module.state_dict().items():
                if value.is_floating_point():
                    shadow[name].lerp_(value, 1.0 - self.decay)
                else:
                    shadow[name].copy_(value)

    def copy_to_modules(self) -> None:
        for module, shadow in zip(self.modules, self.shadow, strict=True):
            module.load_state_dict(shadow)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The modules hold the EMA weights inside the block and their own weights again after."""
        own = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in self.modules]
        self.copy_to_modules()
        try:
            yield
        finally:
            for module, state in zip(self.modules, own, strict=True):
                module.load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for shadow, saved in zip(self.shadow, state["shadow"], strict=True):
            for name, value in saved.items():
                shadow[name].copy_(value)
