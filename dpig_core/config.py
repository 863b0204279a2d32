"""Model configurations: plain, frozen, JSON-serialisable values (presets in `PRESETS`)."""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

from dpig_core.pose import RoiPadding

# Field annotations (strings under postponed evaluation) whose values are checked at construction.
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float), "str": str}


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
        problems = self._problems()
        if problems:
            raise ValueError(f"invalid config {self.name!r}: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        for f in fields(self):
            value = getattr(self, f.name)
            wanted = _FIELD_TYPES.get(str(f.type))
            if wanted is not None and (not isinstance(value, wanted) or isinstance(value, bool)):
                return [f"{f.name} must be {f.type}, got {value!r}"]
        problems = []
        positive = ("height", "width", "hidden", "roi_size", "roi_dim", "bg_dim", "bottleneck_dim",
                    "disc_dim", "pose_dim", "pose_hidden", "map_hidden_fg", "map_hidden_bg",
                    "map_hidden_pose", "critic_hidden", "roi_depth", "bg_depth",
                    "decoder_depth", "critic_layers")  # fmt: skip
        problems += [f"{n} must be positive, got {getattr(self, n)}" for n in positive
                     if getattr(self, n) <= 0]  # fmt: skip
        if self.encoder not in ("fgbg", "app"):
            problems.append(f"encoder must be 'fgbg' or 'app', got {self.encoder!r}")
        if self.roi_style not in ("market", "deepfashion"):
            problems.append(f"roi_style must be 'market' or 'deepfashion', got {self.roi_style!r}")
        size = f"{self.height}x{self.width}"
        for depth_name, sides in (("decoder_depth", (self.height, self.width)),
                                  ("bg_depth", (self.height, self.width) if self.has_bg else ()),
                                  ("roi_depth", (self.roi_size,))):  # fmt: skip
            down = 2 ** (getattr(self, depth_name) - 1)
            if down >= 1 and any(side % down for side in sides):
                what = f"roi_size {self.roi_size}" if depth_name == "roi_depth" else size
                problems.append(f"{what} must be divisible by 2^({depth_name}-1) = {down}")
        if self.height % 16 or self.width % 16:
            problems.append(f"{size}: height and width must be multiples of 16 (discriminator)")
        elif self.disc_logit_width is not None and (
            self.disc_logit_width <= 0 or self.disc_features % self.disc_logit_width
        ):
            problems.append(
                f"disc_logit_width {self.disc_logit_width} must be a positive divisor of the "
                f"{self.disc_features} discriminator features"
            )
        return problems

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
        required = [f.name for f in fields(cls) if f.default is MISSING and f.name not in data]
        if required:
            raise ValueError(f"config is missing field(s): {', '.join(required)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> DPIGConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("config must be a JSON object")
        return cls.from_dict(data)

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
