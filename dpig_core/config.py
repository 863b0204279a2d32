"""Model configurations: plain, frozen, JSON-serialisable values (presets in `PRESETS`)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

from dpig_core.pose import RoiPadding


@dataclass(frozen=True)
class DPIGConfig:
    """Every size of every DPIG network. `hidden` is the paper's n (conv_hidden_num)."""

    name: str
    height: int
    width: int
    # "fgbg": Market encoder (fg ROIs from masked features + a background tower);
    # "app": DeepFashion encoder (ROIs from unmasked features, no background).
    encoder: Literal["fgbg", "app"] = "fgbg"
    hidden: int = 128
    roi_size: int = 48
    roi_depth: int = 5
    roi_dim: int = 32
    bg_depth: int = 5
    bg_dim: int = 128
    decoder_depth: int = 5
    bottleneck_dim: int = 64
    disc_dim: int = 64
    # Width of each D logit row; None = one logit per image. DeepFashion's 16384: 8 logits (§6).
    disc_logit_width: int | None = None
    pose_radius: int = 4
    mask_radius: int = 7
    roi_style: Literal["market", "deepfashion"] = "market"
    roi_scale: float = 1.0
    pose_dim: int = 32
    pose_hidden: int = 512
    mlp_blocks: int = 4
    map_hidden_fg: int = 512
    map_hidden_bg: int = 256
    map_hidden_pose: int = 512
    critic_hidden: int = 512
    critic_layers: int = 3

    def __post_init__(self) -> None:
        problems = []
        for name in ("height", "width", "hidden", "roi_size", "roi_dim", "bottleneck_dim"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        down = 2 ** (self.decoder_depth - 1)
        if self.height % down or self.width % down:
            problems.append(
                f"height×width {self.height}x{self.width} must be divisible by 2^(decoder_depth-1)"
                f" = {down}"
            )
        if self.height % 16 or self.width % 16:
            problems.append("height and width must be multiples of 16 for the discriminator")
        if self.encoder == "fgbg" and (self.height % 2 ** (self.bg_depth - 1)):
            problems.append(f"height {self.height} must be divisible by 2^(bg_depth-1)")
        if self.roi_size % 2 ** (self.roi_depth - 1):
            problems.append(f"roi_size {self.roi_size} must be divisible by 2^(roi_depth-1)")
        if self.disc_logit_width is not None and self.disc_features % self.disc_logit_width:
            problems.append(
                f"disc_logit_width {self.disc_logit_width} must divide the {self.disc_features} "
                "discriminator features"
            )
        if problems:
            raise ValueError(f"invalid config {self.name!r}: " + "; ".join(problems))

    # Derived sizes -----------------------------------------------------------------------------
    @property
    def fg_dim(self) -> int:
        return 7 * self.roi_dim

    @property
    def has_bg(self) -> bool:
        return self.encoder == "fgbg"

    @property
    def embedding_dim(self) -> int:
        return self.fg_dim + (self.bg_dim if self.has_bg else 0)

    @property
    def repeat(self) -> int:
        return int(math.log2(self.height)) - 2

    @property
    def disc_features(self) -> int:
        return (self.height // 16) * (self.width // 16) * self.disc_dim * 8

    @property
    def roi_padding(self) -> RoiPadding:
        if self.roi_style == "market":
            return RoiPadding.market(self.roi_scale)
        return RoiPadding.deepfashion(self.roi_scale)

    # Serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DPIGConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> DPIGConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> DPIGConfig:
        return cls.from_json(Path(path).read_text())

    def with_changes(self, **changes: Any) -> DPIGConfig:
        return replace(self, **changes)


PRESETS: dict[str, DPIGConfig] = {
    # The paper's Market-1501 model (§3): 128×64, foreground + background.
    "market": DPIGConfig(name="market", height=128, width=64, disc_logit_width=16384),
    # The paper's DeepFashion model (§6): 256×256, appearance only, 8 D logits per image.
    "deepfashion": DPIGConfig(
        name="deepfashion",
        height=256,
        width=256,
        encoder="app",
        roi_size=64,
        roi_depth=7,
        decoder_depth=5,
        disc_logit_width=16384,
        mask_radius=4,
        roi_style="deepfashion",
    ),  # fmt: skip
    # Market layout at half resolution and a quarter of the width: trains on a 2-core CPU.
    "market-small": DPIGConfig(
        name="market-small",
        height=64,
        width=32,
        hidden=32,
        roi_size=24,
        roi_depth=4,
        bg_depth=4,
        decoder_depth=4,
        disc_dim=32,
        pose_radius=2,
        mask_radius=4,
        roi_scale=0.5,
        pose_hidden=256,
        map_hidden_fg=256,
        map_hidden_bg=128,
        map_hidden_pose=256,
        critic_hidden=256,
    ),  # fmt: skip
    # Smallest layout that still exercises every branch; for tests.
    "tiny": DPIGConfig(
        name="tiny",
        height=32,
        width=16,
        hidden=8,
        roi_size=12,
        roi_depth=3,
        roi_dim=4,
        bg_depth=3,
        bg_dim=8,
        decoder_depth=3,
        bottleneck_dim=8,
        disc_dim=8,
        pose_radius=1,
        mask_radius=2,
        roi_scale=0.25,
        pose_dim=8,
        pose_hidden=16,
        mlp_blocks=2,
        map_hidden_fg=16,
        map_hidden_bg=16,
        map_hidden_pose=16,
        critic_hidden=16,
        critic_layers=2,
    ),  # fmt: skip
}


def get_preset(name: str) -> DPIGConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
