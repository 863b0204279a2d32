"""Training hyper-parameters per stage; defaults are the reference values (spec §3.5, §4, §5)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class StageConfig:
    steps: int
    batch_size: int
    lr: float = 2e-5
    lr_halve_every: int = 50_000
    log_every: int = 50
    sample_every: int = 600
    checkpoint_every: int = 6000
    seed: int = 0
    # "halve": the reference (halved every lr_halve_every steps); "cosine": constant until
    # cosine_from, then a cosine down to 0 at cosine_to (0: the last step). A fixed cosine_to
    # keeps the schedule when a run is resumed with more --steps.
    lr_schedule: str = "halve"
    cosine_from: int = 0
    cosine_to: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, **values: Any) -> Any:
        """A copy with every non-None override applied (CLI options default to None)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"{type(self).__name__} has no field(s) {', '.join(unknown)}; "
                f"fields: {', '.join(sorted(known))}"
            )
        changes = {k: v for k, v in values.items() if v is not None}
        return type(self)(**{**asdict(self), **changes})

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("halve", "cosine"):
            raise ValueError(f"lr_schedule must be 'halve' or 'cosine', got {self.lr_schedule!r}")

    def lr_at(self, step: int) -> float:
        if self.lr_schedule == "cosine":
            if step < self.cosine_from:
                return self.lr
            span = max((self.cosine_to or self.steps) - self.cosine_from, 1)
            return (
                self.lr * 0.5 * (1 + math.cos(math.pi * min(step - self.cosine_from, span) / span))
            )
        return self.lr * 0.5 ** (step // self.lr_halve_every)


@dataclass(frozen=True)
class Stage1Config(StageConfig):
    """Reconstruction: Adam(β 0.5, 0.999), loss = DCGAN adversarial + 20·L1 (model 1)."""

    steps: int = 120_000
    batch_size: int = 16
    l1_weight: float = 20.0
    # The reference weighs the adversarial term 1. Short CPU runs at a raised learning rate let the
    # discriminator win before anything is reconstructed; a smaller weight keeps L1 in charge.
    adv_weight: float = 1.0
    beta1: float = 0.5
    beta2: float = 0.999
    # Recipe options (docs/training.md); every default is the reference behaviour.
    ema_decay: float = 0.0  # > 0: keep an EMA of encoder + decoder; the saved weights are the EMA
    warmup_steps: int = 0  # L1 only (no adversarial term, no D update) for this many steps
    person_l1_weight: float = 0.0  # weight of mean(|x̂ − x|·mask), the reference's PoseMaskLoss
    d_same_batch: bool = False  # D sees the G step's detached output instead of a fresh batch
    freeze_d_in_g_step: bool = False  # D's requires_grad off while G's loss is backpropagated
    bf16_cpu: bool = False  # bf16 autocast on the CPU too (CUDA always uses it)
    eval_data: str = ""  # a synthetic held-out dataset scored every eval_every steps
    eval_every: int = 0
    eval_images: int = 256


@dataclass(frozen=True)
class PoseAEConfig(StageConfig):
    """Pose auto-encoder: Adam(β1 0.5), loss = 20·MSE (model 2)."""

    steps: int = 60_000
    batch_size: int = 64
    mse_weight: float = 20.0
    beta1: float = 0.5


@dataclass(frozen=True)
class MappingConfig(StageConfig):
    """Stage II: one Φ and critic per factor, WGAN with weight clipping, RMSProp (models 3, 4)."""

    steps: int = 120_000
    batch_size: int = 32
    n_critic: int = 5
    clip: float = 0.01
    z_std: float = 0.2
    sample_every: int = 0
