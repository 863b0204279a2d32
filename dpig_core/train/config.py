"""Training hyper-parameters per stage; defaults are the reference values (spec §3.5, §4, §5)."""

from __future__ import annotations

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

    def lr_at(self, step: int) -> float:
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
