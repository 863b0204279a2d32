"""Synthetic people in Market-1501 format, with ground truth for every factor (spec §2).

No real person dataset can be downloaded where dpig is built and tested, so it draws its own. An
image is a pure function of four recorded factors: an `Identity` (body and clothes), a pose (COCO-18
RCV array), a `Background` (the scene behind the person) and the camera (a mild colour response)
with a noise seed. `rerender` can therefore produce the exact ground truth of "this identity in that
pose on that background" for pose-transfer and swap evaluation.

The renderer reads the pose from the 18 keypoints alone (scale from the torso length, viewpoint
from the shoulder/hip spans and which face points are visible), so it can draw a synthetic identity
in any RCV pose, including decoded ones. Everything is numpy + Pillow; no torch at render time.
"""

from __future__ import annotations

import colorsys
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, get_args

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from dpig_core.pose import NUM_KEYPOINTS, FloatArray, UInt8Array, as_rcv, write_keypoints_csv

GENERATOR_VERSION = "dpig-synth/1"
SUPERSAMPLE = 4
CAMERAS = 6
SCENES_PER_CAMERA = 4
MAX_TEST_PAIRS = 2000
JPEG_QUALITY = 95
SPLIT_DIRS: dict[str, str] = {
    "train": "bounding_box_train",
    "test": "bounding_box_test",
    "query": "query",
}

Color = tuple[int, int, int]
HairStyle = Literal["short", "long", "bald", "cap"]
Pattern = Literal["solid", "hstripes", "vstripes", "two_tone", "checks"]
Sleeves = Literal["short", "long"]
BottomType = Literal["trousers", "shorts", "skirt"]
BagKind = Literal["backpack", "shoulder"]
Side = Literal["left", "right"]
SceneKind = Literal["street", "indoor"]
View = Literal[
    "front", "back", "right", "left", "front-right", "front-left", "back-right", "back-left"
]
RectKind = Literal["window", "door", "sign", "panel"]
Split = Literal["train", "test", "query"]

T = TypeVar("T")

# COCO-18 indices (dpig_core.pose.KEYPOINT_NAMES).
NOSE, NECK = 0, 1
R_SHOULDER, R_ELBOW, R_WRIST, L_SHOULDER, L_ELBOW, L_WRIST = 2, 3, 4, 5, 6, 7
R_HIP, R_KNEE, R_ANKLE, L_HIP, L_KNEE, L_ANKLE = 8, 9, 10, 11, 12, 13
R_EYE, L_EYE, R_EAR, L_EAR = 14, 15, 16, 17


# --------------------------------------------------------------------------------------------------
# Factors


def _color(value: Any) -> Color:
    r, g, b = (int(v) for v in value)
    return (r, g, b)


def _literal(value: Any, kind: Any, name: str) -> Any:
    if value not in get_args(kind):
        raise ValueError(f"{name} must be one of {get_args(kind)}, got {value!r}")
    return value


@dataclass(frozen=True)
class Build:
    """Body build; 1.0 is the average person."""

    height_scale: float  # scales the person's height in the frame and (inversely) the head size
    shoulder_width: float  # torso width beyond the shoulder keypoints
    limb_thickness: float


@dataclass(frozen=True)
class BagSpec:
    kind: BagKind
    color: Color
    side: Side  # the shoulder bag hangs at this hip; ignored for a backpack


@dataclass(frozen=True)
class Identity:
    """What a person looks like, independent of pose, background and camera."""

    skin: Color
    hair_color: Color
    hair_style: HairStyle
    cap_color: Color  # used only when hair_style == "cap"
    top_color: Color
    top_secondary: Color
    top_pattern: Pattern
    pattern_repeats: int  # stripes or checks across the torso
    sleeves: Sleeves
    bottom_type: BottomType
    bottom_color: Color
    shoe_color: Color
    bag: BagSpec | None
    build: Build

    def to_dict(self) -> dict[str, Any]:
        bag = self.bag
        return {
            "skin": list(self.skin),
            "hair_color": list(self.hair_color),
            "hair_style": self.hair_style,
            "cap_color": list(self.cap_color),
            "top_color": list(self.top_color),
            "top_secondary": list(self.top_secondary),
            "top_pattern": self.top_pattern,
            "pattern_repeats": self.pattern_repeats,
            "sleeves": self.sleeves,
            "bottom_type": self.bottom_type,
            "bottom_color": list(self.bottom_color),
            "shoe_color": list(self.shoe_color),
            "bag": None
            if bag is None
            else {"kind": bag.kind, "color": list(bag.color), "side": bag.side},
            "build": {
                "height_scale": self.build.height_scale,
                "shoulder_width": self.build.shoulder_width,
                "limb_thickness": self.build.limb_thickness,
            },
        }

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> Identity:
        bag = data["bag"]
        build = data["build"]
        return Identity(
            skin=_color(data["skin"]),
            hair_color=_color(data["hair_color"]),
            hair_style=_literal(data["hair_style"], HairStyle, "hair_style"),
            cap_color=_color(data["cap_color"]),
            top_color=_color(data["top_color"]),
            top_secondary=_color(data["top_secondary"]),
            top_pattern=_literal(data["top_pattern"], Pattern, "top_pattern"),
            pattern_repeats=int(data["pattern_repeats"]),
            sleeves=_literal(data["sleeves"], Sleeves, "sleeves"),
            bottom_type=_literal(data["bottom_type"], BottomType, "bottom_type"),
            bottom_color=_color(data["bottom_color"]),
            shoe_color=_color(data["shoe_color"]),
            bag=None
            if bag is None
            else BagSpec(
                kind=_literal(bag["kind"], BagKind, "bag.kind"),
                color=_color(bag["color"]),
                side=_literal(bag["side"], Side, "bag.side"),
            ),
            build=Build(
                height_scale=float(build["height_scale"]),
                shoulder_width=float(build["shoulder_width"]),
                limb_thickness=float(build["limb_thickness"]),
            ),
        )


@dataclass(frozen=True)
class Rect:
    """A window, door, sign or panel; rows and columns are fractions of the frame."""

    kind: RectKind
    top: float
    left: float
    bottom: float
    right: float
    color: Color


@dataclass(frozen=True)
class Blob:
    """An elliptical clutter object (bush, car, bin, distant passer-by), in frame fractions."""

    row: float
    col: float
    half_height: float
    half_width: float
    color: Color


@dataclass(frozen=True)
class Background:
    """The scene behind the person: a wall above a horizon, the ground, clutter and lighting."""

    kind: SceneKind
    wall_color: Color
    ground_color: Color
    horizon: float  # row fraction where the ground starts
    wall_gradient: float  # relative brightness change from the top of the frame to the bottom
    ground_lines: int  # pavement/tile lines on the ground (0 = plain)
    rects: tuple[Rect, ...]
    blobs: tuple[Blob, ...]
    noise: float  # texture noise, grey levels (standard deviation)
    brightness: float
    tint: tuple[float, float, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "wall_color": list(self.wall_color),
            "ground_color": list(self.ground_color),
            "horizon": self.horizon,
            "wall_gradient": self.wall_gradient,
            "ground_lines": self.ground_lines,
            "rects": [
                [r.kind, r.top, r.left, r.bottom, r.right, list(r.color)] for r in self.rects
            ],
            "blobs": [
                [b.row, b.col, b.half_height, b.half_width, list(b.color)] for b in self.blobs
            ],
            "noise": self.noise,
            "brightness": self.brightness,
            "tint": list(self.tint),
        }

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> Background:
        tint = [float(t) for t in data["tint"]]
        return Background(
            kind=_literal(data["kind"], SceneKind, "kind"),
            wall_color=_color(data["wall_color"]),
            ground_color=_color(data["ground_color"]),
            horizon=float(data["horizon"]),
            wall_gradient=float(data["wall_gradient"]),
            ground_lines=int(data["ground_lines"]),
            rects=tuple(
                Rect(
                    _literal(k, RectKind, "rect kind"),
                    float(t),
                    float(le),
                    float(b),
                    float(r),
                    _color(c),
                )
                for k, t, le, b, r, c in data["rects"]
            ),
            blobs=tuple(
                Blob(float(r), float(c), float(h), float(w), _color(col))
                for r, c, h, w, col in data["blobs"]
            ),
            noise=float(data["noise"]),
            brightness=float(data["brightness"]),
            tint=(tint[0], tint[1], tint[2]),
        )


# --------------------------------------------------------------------------------------------------
# Sampling helpers


def _pick(rng: np.random.Generator, options: Sequence[T], probs: Sequence[float]) -> T:
    return options[int(rng.choice(len(options), p=np.asarray(probs) / np.sum(probs)))]


def _u(rng: np.random.Generator, low: float, high: float) -> float:
    return round(float(rng.uniform(low, high)), 4)


def _hsv(h: float, s: float, v: float) -> Color:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (round(r * 255), round(g * 255), round(b * 255))


def _color_distance(a: Color, b: Color) -> float:
    return math.dist(a, b)


def _sample_skin(rng: np.random.Generator) -> Color:
    tone = float(rng.uniform())  # 0 = dark, 1 = light
    return _hsv(
        rng.uniform(0.03, 0.09), 0.52 - 0.27 * tone + rng.uniform(-0.05, 0.05), 0.36 + 0.6 * tone
    )


def _sample_hair(rng: np.random.Generator) -> Color:
    kind = _pick(
        rng,
        ("black", "dark", "brown", "blonde", "grey", "dyed"),
        (0.42, 0.25, 0.13, 0.1, 0.06, 0.04),
    )
    if kind == "black":
        return _hsv(rng.uniform(), rng.uniform(0.05, 0.3), rng.uniform(0.05, 0.16))
    if kind == "dark":
        return _hsv(rng.uniform(0.04, 0.09), rng.uniform(0.4, 0.7), rng.uniform(0.17, 0.32))
    if kind == "brown":
        return _hsv(rng.uniform(0.05, 0.1), rng.uniform(0.4, 0.65), rng.uniform(0.32, 0.52))
    if kind == "blonde":
        return _hsv(rng.uniform(0.1, 0.14), rng.uniform(0.35, 0.6), rng.uniform(0.62, 0.88))
    if kind == "grey":
        return _hsv(0.0, rng.uniform(0.0, 0.06), rng.uniform(0.5, 0.8))
    return _hsv(rng.uniform(-0.05, 0.05), rng.uniform(0.55, 0.8), rng.uniform(0.4, 0.65))


def _sample_cloth(rng: np.random.Generator) -> Color:
    if rng.uniform() < 0.3:  # neutrals: black, greys, white
        return _hsv(rng.uniform(), rng.uniform(0.0, 0.12), rng.uniform(0.08, 0.95))
    return _hsv(rng.uniform(), rng.uniform(0.35, 0.95), rng.uniform(0.25, 0.95))


def _sample_contrasting(rng: np.random.Generator, other: Color, minimum: float = 90.0) -> Color:
    color = _sample_cloth(rng)
    for _ in range(12):
        if _color_distance(color, other) >= minimum:
            break
        color = _sample_cloth(rng)
    return color


def _sample_shoe(rng: np.random.Generator) -> Color:
    kind = _pick(rng, ("dark", "white", "colour"), (0.5, 0.25, 0.25))
    if kind == "dark":
        return _hsv(rng.uniform(), rng.uniform(0.0, 0.4), rng.uniform(0.05, 0.25))
    if kind == "white":
        return _hsv(rng.uniform(), rng.uniform(0.0, 0.08), rng.uniform(0.82, 0.97))
    return _sample_cloth(rng)


def sample_identity(rng: np.random.Generator) -> Identity:
    """A random person: skin, hair, clothes and build, with diverse, distinguishable colours."""
    top = _sample_cloth(rng)
    bag: BagSpec | None = None
    if rng.uniform() < 0.35:
        bag = BagSpec(
            kind=_pick(rng, ("backpack", "shoulder"), (0.55, 0.45)),
            color=_sample_cloth(rng),
            side=_pick(rng, ("left", "right"), (0.5, 0.5)),
        )
    return Identity(
        skin=_sample_skin(rng),
        hair_color=_sample_hair(rng),
        hair_style=_pick(rng, ("short", "long", "bald", "cap"), (0.55, 0.3, 0.05, 0.1)),
        cap_color=_sample_cloth(rng),
        top_color=top,
        top_secondary=_sample_contrasting(rng, top),
        top_pattern=_pick(
            rng,
            ("solid", "hstripes", "vstripes", "two_tone", "checks"),
            (0.45, 0.17, 0.1, 0.18, 0.1),
        ),
        pattern_repeats=int(rng.integers(3, 8)),
        sleeves=_pick(rng, ("short", "long"), (0.45, 0.55)),
        bottom_type=_pick(rng, ("trousers", "shorts", "skirt"), (0.65, 0.2, 0.15)),
        bottom_color=_sample_cloth(rng),
        shoe_color=_sample_shoe(rng),
        bag=bag,
        build=Build(
            height_scale=_u(rng, 0.93, 1.06),
            shoulder_width=_u(rng, 0.88, 1.15),
            limb_thickness=_u(rng, 0.85, 1.2),
        ),
    )


def _sample_wall(rng: np.random.Generator, kind: SceneKind) -> Color:
    if kind == "indoor":
        return _hsv(rng.uniform(), rng.uniform(0.03, 0.25), rng.uniform(0.6, 0.92))
    facade = _pick(rng, ("concrete", "brick", "beige", "glass"), (0.4, 0.2, 0.25, 0.15))
    if facade == "concrete":
        return _hsv(rng.uniform(), rng.uniform(0.0, 0.08), rng.uniform(0.4, 0.8))
    if facade == "brick":
        return _hsv(rng.uniform(0.0, 0.06), rng.uniform(0.4, 0.62), rng.uniform(0.35, 0.6))
    if facade == "beige":
        return _hsv(rng.uniform(0.08, 0.14), rng.uniform(0.15, 0.35), rng.uniform(0.6, 0.9))
    return _hsv(rng.uniform(0.52, 0.62), rng.uniform(0.15, 0.4), rng.uniform(0.3, 0.6))


def _sample_ground(rng: np.random.Generator, kind: SceneKind) -> Color:
    if kind == "indoor":
        return _hsv(rng.uniform(0.0, 0.15), rng.uniform(0.05, 0.35), rng.uniform(0.35, 0.8))
    surface = _pick(rng, ("asphalt", "pavement", "grass"), (0.45, 0.45, 0.1))
    if surface == "asphalt":
        return _hsv(rng.uniform(), rng.uniform(0.0, 0.08), rng.uniform(0.25, 0.5))
    if surface == "pavement":
        return _hsv(rng.uniform(0.05, 0.12), rng.uniform(0.05, 0.2), rng.uniform(0.45, 0.72))
    return _hsv(rng.uniform(0.2, 0.32), rng.uniform(0.35, 0.6), rng.uniform(0.28, 0.5))


def _sample_rect(rng: np.random.Generator, kind: SceneKind, horizon: float) -> Rect:
    rect_kind: RectKind = _pick(rng, ("window", "door", "sign", "panel"), (0.4, 0.2, 0.2, 0.2))
    width = _u(rng, 0.15, 0.6)
    left = _u(rng, -0.2, 1.0 - width / 2)
    if rect_kind == "door":
        top = _u(rng, max(horizon - 0.5, 0.0), max(horizon - 0.3, 0.05))
        bottom = horizon
        color = _hsv(rng.uniform(), rng.uniform(0.0, 0.5), rng.uniform(0.1, 0.5))
    elif rect_kind == "window":
        top = _u(rng, -0.05, max(horizon - 0.25, 0.0))
        bottom = round(top + rng.uniform(0.1, 0.3), 4)
        glass = (0.55, 0.65) if kind == "street" else (0.0, 1.0)
        color = _hsv(rng.uniform(*glass), rng.uniform(0.05, 0.35), rng.uniform(0.15, 0.55))
    elif rect_kind == "sign":
        top = _u(rng, 0.0, max(horizon - 0.15, 0.0))
        bottom = round(top + rng.uniform(0.04, 0.12), 4)
        color = _hsv(rng.uniform(), rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.0))
    else:
        top = _u(rng, 0.0, horizon)
        bottom = round(top + rng.uniform(0.1, 0.4), 4)
        color = _sample_cloth(rng)
    return Rect(rect_kind, top, left, bottom, round(left + width, 4), color)


def _sample_blob(rng: np.random.Generator, horizon: float) -> Blob:
    kind = _pick(rng, ("bush", "car", "thing"), (0.35, 0.35, 0.3))
    if kind == "bush":
        color = _hsv(rng.uniform(0.2, 0.35), rng.uniform(0.35, 0.7), rng.uniform(0.15, 0.45))
    elif kind == "car":
        color = _sample_cloth(rng)
    else:
        color = _hsv(rng.uniform(), rng.uniform(0.0, 0.3), rng.uniform(0.1, 0.6))
    return Blob(
        row=_u(rng, horizon - 0.08, horizon + 0.05),
        col=_u(rng, -0.2, 1.2),
        half_height=_u(rng, 0.04, 0.16),
        half_width=_u(rng, 0.12, 0.5),
        color=color,
    )


def sample_background(rng: np.random.Generator) -> Background:
    """A plausible street (mostly) or indoor backdrop for a pedestrian crop."""
    kind: SceneKind = _pick(rng, ("street", "indoor"), (0.75, 0.25))
    horizon = _u(rng, 0.35, 0.8)
    rects = tuple(_sample_rect(rng, kind, horizon) for _ in range(int(rng.integers(1, 6))))
    blobs = tuple(_sample_blob(rng, horizon) for _ in range(int(rng.integers(0, 4))))
    return Background(
        kind=kind,
        wall_color=_sample_wall(rng, kind),
        ground_color=_sample_ground(rng, kind),
        horizon=horizon,
        wall_gradient=_u(rng, -0.2, 0.2),
        ground_lines=int(rng.integers(0, 7)),
        rects=rects,
        blobs=blobs,
        noise=_u(rng, 1.5, 6.0),
        brightness=_u(rng, 0.85, 1.12),
        tint=(_u(rng, 0.93, 1.07), _u(rng, 0.93, 1.07), _u(rng, 0.93, 1.07)),
    )


def jitter_background(bg: Background, rng: np.random.Generator) -> Background:
    """The same scene seen from another crop: shifted clutter, moved horizon, new lighting."""
    shift = float(rng.uniform(-0.2, 0.2))
    horizon_shift = float(rng.uniform(-0.04, 0.04))
    rects = tuple(
        Rect(
            r.kind,
            round(r.top + horizon_shift, 4),
            round(r.left + shift, 4),
            round(r.bottom + horizon_shift, 4),
            round(r.right + shift, 4),
            r.color,
        )
        for r in bg.rects
    )
    blobs = [
        Blob(
            round(b.row + horizon_shift, 4),
            round(b.col + shift, 4),
            b.half_height,
            b.half_width,
            b.color,
        )
        for b in bg.blobs
        if rng.uniform() > 0.15
    ]
    if rng.uniform() < 0.3:
        blobs.append(_sample_blob(rng, bg.horizon + horizon_shift))
    return Background(
        kind=bg.kind,
        wall_color=bg.wall_color,
        ground_color=bg.ground_color,
        horizon=round(bg.horizon + horizon_shift, 4),
        wall_gradient=bg.wall_gradient,
        ground_lines=bg.ground_lines,
        rects=rects,
        blobs=tuple(blobs),
        noise=round(bg.noise * float(rng.uniform(0.8, 1.2)), 4),
        brightness=round(bg.brightness * float(rng.uniform(0.94, 1.06)), 4),
        tint=bg.tint,
    )


# --------------------------------------------------------------------------------------------------
# Pose: an articulated pseudo-3-D skeleton, projected orthographically
#
# Body model in units of the person's height: Y down from the top of the head, X towards the
# person's left, Z forwards. Yaw θ = 0 faces the camera; θ = +90° shows the right side (the person
# faces image right). The renderer reads the same constants back from the 2-D keypoints.

_HEAD_CENTER_Y = 0.075
_HEAD_RX, _HEAD_RY = 0.062, 0.075
_NECK_Y = 0.18
_SHOULDER_X, _SHOULDER_Y = 0.105, 0.19
_HIP_X, _HIP_Y = 0.065, 0.52
_TORSO = _HIP_Y - _NECK_Y
_UPPER_ARM, _FOREARM = 0.165, 0.15
_THIGH, _SHIN = 0.225, 0.225
_SOLE = 0.04
_TORSO_HALF_WIDTH = (0.125, 0.1)  # outline at shoulders and hips, in the frontal plane
_TORSO_HALF_DEPTH = (0.075, 0.07)
_LIMB_PAD = 0.045
# Extra body-model points after the 18 keypoints.
_HEAD, _R_SOLE, _L_SOLE = 18, 19, 20
_UPPER_BODY = (NOSE, NECK, R_SHOULDER, R_ELBOW, R_WRIST, L_SHOULDER, L_ELBOW, L_WRIST,
               R_EYE, L_EYE, R_EAR, L_EAR, _HEAD)  # fmt: skip

# Face points relative to the head centre (X, Y, Z), their outward normal and visibility threshold.
_FACE: dict[int, tuple[tuple[float, float, float], tuple[float, float, float], float]] = {
    NOSE: ((0.0, 0.012, 0.06), (0.0, 0.0, 1.0), -0.35),
    R_EYE: ((-0.027, -0.008, 0.05), (-0.45, 0.0, 0.89), 0.05),
    L_EYE: ((0.027, -0.008, 0.05), (0.45, 0.0, 0.89), 0.05),
    R_EAR: ((-0.064, 0.004, -0.005), (-0.97, 0.0, -0.1), -0.5),
    L_EAR: ((0.064, 0.004, -0.005), (0.97, 0.0, -0.1), -0.5),
}

# Yaw centre (degrees) and sampling weight of each viewpoint; "right" shows the person's right side.
_VIEWS: tuple[tuple[View, float, float], ...] = (
    ("front", 0.0, 0.25),
    ("back", 180.0, 0.25),
    ("right", 90.0, 0.125),
    ("left", -90.0, 0.125),
    ("front-right", 45.0, 0.0625),
    ("front-left", -45.0, 0.0625),
    ("back-right", 135.0, 0.0625),
    ("back-left", -135.0, 0.0625),
)


@dataclass(frozen=True)
class _Limb:
    abduct: float  # degrees, away from the body in the frontal plane
    flex: float  # degrees, forwards in the sagittal plane
    fore_abduct: float  # the distal segment (forearm / shin), absolute angles
    fore_flex: float


def _direction(side: float, abduct: float, flex: float) -> tuple[float, float, float]:
    a, f = math.radians(abduct), math.radians(flex)
    return (side * math.sin(a), math.cos(a) * math.cos(f), math.cos(a) * math.sin(f))


def _hanging_arm(rng: np.random.Generator) -> _Limb:
    abduct, flex = float(rng.uniform(8, 16)), float(rng.uniform(-8, 8))
    return _Limb(abduct, flex, abduct + float(rng.uniform(-4, 4)), flex + float(rng.uniform(0, 15)))


def _bent_arm(rng: np.random.Generator) -> _Limb:
    return _Limb(
        float(rng.uniform(6, 15)),
        float(rng.uniform(-10, 20)),
        float(rng.uniform(-25, 5)),
        float(rng.uniform(55, 100)),
    )


def _hip_arm(rng: np.random.Generator) -> _Limb:
    return _Limb(
        float(rng.uniform(35, 50)),
        float(rng.uniform(-15, 0)),
        -float(rng.uniform(40, 70)),
        float(rng.uniform(-10, 10)),
    )


def _raised_arm(rng: np.random.Generator) -> _Limb:
    if rng.uniform() < 0.6:  # up at the side, waving
        abduct = float(rng.uniform(100, 165))
        fore = min(abduct + float(rng.uniform(0, 30)), 180.0)
        return _Limb(abduct, float(rng.uniform(-10, 15)), fore, float(rng.uniform(-10, 30)))
    flex = float(rng.uniform(70, 160))  # forwards, pointing
    return _Limb(
        float(rng.uniform(5, 20)), flex, float(rng.uniform(0, 20)), flex + float(rng.uniform(0, 30))
    )


def _phone_arm(rng: np.random.Generator) -> _Limb:
    return _Limb(
        float(rng.uniform(10, 25)),
        float(rng.uniform(20, 40)),
        -float(rng.uniform(150, 170)),
        float(rng.uniform(10, 40)),
    )


_ARM_KINDS: dict[str, Callable[[np.random.Generator], _Limb]] = {
    "hang": _hanging_arm,
    "bent": _bent_arm,
    "hip": _hip_arm,
    "raised": _raised_arm,
    "phone": _phone_arm,
}


def _sample_limbs(rng: np.random.Generator) -> tuple[_Limb, _Limb, _Limb, _Limb, float]:
    """Right arm, left arm, right leg, left leg (legs: fore_* is the shin) and the torso pitch."""
    if rng.uniform() < 0.6:  # walking: legs in antiphase, arms swinging against them
        phase, stride = float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(12, 32))
        swing, knee_swing = stride * float(rng.uniform(0.6, 1.2)), float(rng.uniform(35, 60))
        legs, arms = [], []
        for leg_phase in (phase, phase + math.pi):
            flex = stride * math.sin(leg_phase)
            knee = 5 + knee_swing * max(0.0, math.cos(leg_phase)) ** 1.5
            abduct = float(rng.uniform(1, 5))
            legs.append(_Limb(abduct, flex, abduct * 0.5, flex - knee))
            arm_flex = -swing * math.sin(leg_phase)
            abduct = float(rng.uniform(7, 14))
            elbow = float(rng.uniform(5, 25)) + max(0.0, arm_flex) * 0.6
            arms.append(_Limb(abduct, arm_flex, abduct, arm_flex + elbow))
        if rng.uniform() < 0.25:  # carrying something or on the phone while walking
            arms[int(rng.integers(2))] = _pick(rng, (_bent_arm, _phone_arm), (0.7, 0.3))(rng)
        pitch = float(rng.uniform(0, 7))
        return arms[0], arms[1], legs[0], legs[1], pitch
    legs = []
    for _ in range(2):
        abduct, flex = float(rng.uniform(2, 9)), float(rng.uniform(-4, 4))
        legs.append(_Limb(abduct, flex, abduct, flex - float(rng.uniform(0, 6))))
    if rng.uniform() < 0.3:  # weight on one leg, the other relaxed forwards
        k = int(rng.integers(2))
        flex = float(rng.uniform(5, 15))
        legs[k] = _Limb(legs[k].abduct, flex, legs[k].abduct, flex - float(rng.uniform(8, 20)))
    pattern = _pick(rng, ("same", "mixed"), (0.6, 0.4))
    names = ("hang", "bent", "hip", "raised", "phone")
    if pattern == "same":
        kind = _pick(rng, names, (0.55, 0.15, 0.15, 0.1, 0.05))
        arms = [_ARM_KINDS[kind](rng), _ARM_KINDS[kind](rng)]
    else:
        arms = [_ARM_KINDS[_pick(rng, names, (0.45, 0.3, 0.1, 0.1, 0.05))](rng) for _ in range(2)]
    return arms[0], arms[1], legs[0], legs[1], float(rng.uniform(-3, 4))


def _rotation(pitch: float, roll: float) -> npt.NDArray[np.float64]:
    p, r = math.radians(pitch), math.radians(roll)
    about_x = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    about_z = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    rotation: npt.NDArray[np.float64] = about_z @ about_x
    return rotation


def _skeleton(rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """(21, 3) body-model points: the 18 keypoints, then the head centre and the two soles."""
    r_arm, l_arm, r_leg, l_leg, pitch = _sample_limbs(rng)
    pts = np.zeros((21, 3))
    head = np.array([0.0, _HEAD_CENTER_Y, 0.0])
    pts[NECK] = (0.0, _NECK_Y, 0.0)
    pts[_HEAD] = head
    for k, (offset, _, _) in _FACE.items():
        pts[k] = head + offset
    for side, arm, (sh, el, wr) in (
        (-1.0, r_arm, (R_SHOULDER, R_ELBOW, R_WRIST)),
        (1.0, l_arm, (L_SHOULDER, L_ELBOW, L_WRIST)),
    ):
        pts[sh] = (side * _SHOULDER_X, _SHOULDER_Y, 0.0)
        pts[el] = pts[sh] + _UPPER_ARM * np.array(_direction(side, arm.abduct, arm.flex))
        pts[wr] = pts[el] + _FOREARM * np.array(_direction(side, arm.fore_abduct, arm.fore_flex))
    hip_centre = np.array([0.0, _HIP_Y, 0.0])
    upper = list(_UPPER_BODY)
    lean = _rotation(pitch, float(rng.uniform(-3, 3)))
    pts[upper] = (pts[upper] - hip_centre) @ lean.T + hip_centre
    for side, leg, (hp, kn, an), sole in (
        (-1.0, r_leg, (R_HIP, R_KNEE, R_ANKLE), _R_SOLE),
        (1.0, l_leg, (L_HIP, L_KNEE, L_ANKLE), _L_SOLE),
    ):
        pts[hp] = (side * _HIP_X, _HIP_Y, 0.0)
        pts[kn] = pts[hp] + _THIGH * np.array(_direction(side, leg.abduct, leg.flex))
        pts[an] = pts[kn] + _SHIN * np.array(_direction(side, leg.fore_abduct, leg.fore_flex))
        pts[sole] = pts[an] + (0.0, _SOLE, 0.0)
    return pts


def _sample_yaw(rng: np.random.Generator, view: View | None) -> float:
    if view is None:
        _, centre, _ = _pick(rng, _VIEWS, [p for _, _, p in _VIEWS])
    else:
        centre = {name: yaw for name, yaw, _ in _VIEWS}[_literal(view, View, "view")]
    return centre + float(rng.uniform(-14, 14))


def _face_visible(yaw: float) -> dict[int, bool]:
    t = math.radians(yaw)
    towards_camera = (-math.sin(t), 0.0, math.cos(t))  # the camera direction in body coordinates
    return {
        k: sum(n * d for n, d in zip(normal, towards_camera, strict=True)) > threshold
        for k, (_, normal, threshold) in _FACE.items()
    }


def _torso_half_width(level: int, cos_t: float, sin_t: float, shoulder_scale: float) -> float:
    return math.hypot(
        _TORSO_HALF_WIDTH[level] * shoulder_scale * cos_t, _TORSO_HALF_DEPTH[level] * sin_t
    )


def sample_pose(
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    height_scale: float = 1.0,
    view: View | None = None,
) -> FloatArray:
    """A random (18, 3) RCV pose for a `height`×`width` pedestrian crop (COCO-18 order).

    Standing or walking, with several arm gestures, seen from the front, back, a side or
    three-quarter; the person spans 75–95% of the image height (times `height_scale`, clipped),
    roughly centred. About 5% of poses have the feet cropped off (ankles below the frame,
    invisible). `view` fixes the viewpoint (±14°) instead of drawing it. Coordinates are multiples
    of 1/4 px so they round-trip exactly through JSON.
    """
    pts = _skeleton(rng)
    yaw = _sample_yaw(rng, view)
    t = math.radians(yaw)
    cos_t, sin_t = math.cos(t), math.sin(t)
    x = pts[:, 0] * cos_t + pts[:, 2] * sin_t
    y = pts[:, 1]
    # The person's extent: keypoints padded by a limb's half-width, the torso outline, the head.
    pad, head = _LIMB_PAD, _HEAD
    torso_w = _torso_half_width(0, cos_t, sin_t, 1.15)
    x_low = min(float(np.min(x[:18])) - pad, x[NECK] - torso_w, x[head] - _HEAD_RX * 1.1)
    x_high = max(float(np.max(x[:18])) + pad, x[NECK] + torso_w, x[head] + _HEAD_RX * 1.1)
    y_low = min(float(np.min(y[:18])) - pad, y[head] - _HEAD_RY * 1.05)
    y_high = max(float(np.max(y)), float(np.max(y[:18])) + pad)

    fraction = min(max(float(rng.uniform(0.8, 0.92)) * height_scale, 0.75), 0.95)
    scale = min(fraction * height / (y_high - y_low), 0.96 * width / (x_high - x_low))
    top = (height - (y_high - y_low) * scale) * float(rng.uniform(0.3, 0.7))
    ankles_y = min(y[R_ANKLE], y[L_ANKLE])
    if rng.uniform() < 0.05:  # feet cropped, as in many Market detections: zoom in a little
        crop_top = float(rng.uniform(0.01, 0.05)) * height
        crop_scale = (height + float(rng.uniform(0.5, 3.0)) - crop_top) / (ankles_y - y_low)
        if crop_scale * (x_high - x_low) <= 0.96 * width:
            scale, top = crop_scale, crop_top
    rows = top + (y - y_low) * scale

    # Centre the body (neck and hips), not the extent: a raised arm should not push the torso aside.
    body_x = (x[NECK] + (x[R_HIP] + x[L_HIP]) / 2) / 2
    centre = width / 2 + float(rng.uniform(-0.07, 0.07)) * width
    offset = centre - body_x * scale
    offset = min(max(offset, 0.5 - x_low * scale), width - 0.5 - x_high * scale)
    cols = offset + x * scale

    rcv = np.zeros((NUM_KEYPOINTS, 3), dtype=np.float32)
    rcv[:, 0] = np.round(rows[:18] * 4) / 4
    rcv[:, 1] = np.round(cols[:18] * 4) / 4
    rcv[:, 2] = 1.0
    for k, visible in _face_visible(yaw).items():
        rcv[k, 2] = float(visible)
    inside = (rcv[:, 0] >= 0) & (rcv[:, 0] < height) & (rcv[:, 1] >= 0) & (rcv[:, 1] < width)
    rcv[~inside, 2] = 0.0
    rcv[rcv[:, 2] == 0] = 0.0
    return rcv


# --------------------------------------------------------------------------------------------------
# Reading a body back from 18 keypoints


@dataclass(frozen=True)
class _Figure:
    """The pose in supersampled canvas coordinates (complex x + iy) and what is inferred from it."""

    pts: tuple[complex | None, ...]
    unit: float  # person height in canvas pixels
    up: complex  # unit vector from the hips to the neck
    cos: float  # yaw estimate
    sin: float
    neck: complex
    hip: complex  # mid-hip

    @property
    def right(self) -> complex:
        return self.up * 1j

    def body(self, lateral: float, along: float, depth: float = 0.0) -> complex:
        """A body-frame point: `along` is the height below the neck, lateral/depth as X/Z."""
        x = lateral * self.cos + depth * self.sin
        return self.neck + (self.right * x - self.up * along) * self.unit

    def at(self, k: int) -> complex | None:
        return self.pts[k]


_BONES = (
    (R_HIP, R_KNEE, _THIGH),
    (L_HIP, L_KNEE, _THIGH),
    (R_KNEE, R_ANKLE, _SHIN),
    (L_KNEE, L_ANKLE, _SHIN),
    (R_SHOULDER, R_ELBOW, _UPPER_ARM),
    (L_SHOULDER, L_ELBOW, _UPPER_ARM),
)


def _mean(points: Iterable[complex | None]) -> complex | None:
    present = [p for p in points if p is not None]
    return sum(present, 0j) / len(present) if present else None


def _dot(a: complex, b: complex) -> float:
    return a.real * b.real + a.imag * b.imag


def _estimate_unit(
    pts: Sequence[complex | None], neck: complex | None, hip: complex | None, fallback: float
) -> float:
    if neck is not None and hip is not None and abs(neck - hip) > 1e-3:
        return abs(neck - hip) / _TORSO
    lengths = [
        abs(pa - pb) / length
        for a, b, length in _BONES
        if (pa := pts[a]) is not None and (pb := pts[b]) is not None
    ]
    return max(lengths) if lengths and max(lengths) > 1e-3 else fallback


def _estimate_yaw(
    pts: Sequence[complex | None], neck: complex, up: complex, unit: float
) -> tuple[float, float]:
    right = up * 1j
    spans = []
    for r, l_, half in ((R_SHOULDER, L_SHOULDER, _SHOULDER_X), (R_HIP, L_HIP, _HIP_X)):
        pr, pl = pts[r], pts[l_]
        if pr is not None and pl is not None:
            spans.append(_dot(pl - pr, right) / (2 * half * unit))
    cos_t = min(max(sum(spans) / len(spans), -1.0), 1.0) if spans else 1.0
    nose = pts[NOSE]
    if nose is not None:
        sign = math.copysign(1.0, _dot(nose - neck, right))
    elif pts[R_EYE] is not None or pts[L_EYE] is not None:
        sign = 1.0 if pts[R_EYE] is not None else -1.0
    elif (pts[R_EAR] is None) != (pts[L_EAR] is None):
        sign = 1.0 if pts[R_EAR] is not None else -1.0
    else:
        sign = 0.0
    return cos_t, sign * math.sqrt(max(0.0, 1.0 - cos_t**2))


def _figure(pose: FloatArray, height: int, ss: int) -> _Figure | None:
    rcv = as_rcv(pose)
    pts = tuple(complex(c * ss, r * ss) if v > 0 else None for r, c, v in rcv.tolist())
    neck = pts[NECK] if pts[NECK] is not None else _mean((pts[R_SHOULDER], pts[L_SHOULDER]))
    hip = _mean((pts[R_HIP], pts[L_HIP]))
    unit = _estimate_unit(pts, neck, hip, 0.85 * height * ss)
    if neck is not None and hip is not None and abs(neck - hip) > 1e-3:
        up = (neck - hip) / abs(neck - hip)
    else:
        up = -1j
    if neck is None and hip is None:
        return None
    if hip is None:
        hip = cast(complex, neck) - up * _TORSO * unit
    if neck is None:
        neck = hip + up * _TORSO * unit
    cos_t, sin_t = _estimate_yaw(pts, neck, up, unit)
    return _Figure(pts, unit, up, cos_t, sin_t, neck, hip)


def _head_centre(fig: _Figure) -> complex:
    estimates = []
    for k, ((x, y, z), _, _) in _FACE.items():
        p = fig.at(k)
        if p is not None:
            estimates.append(p - (fig.right * (x * fig.cos + z * fig.sin) - fig.up * y) * fig.unit)
    centre = _mean(estimates)
    return (
        centre if centre is not None else fig.neck + fig.up * (_NECK_Y - _HEAD_CENTER_Y) * fig.unit
    )


# --------------------------------------------------------------------------------------------------
# Drawing


def _shade(color: Color, factor: float) -> Color:
    return (
        min(round(color[0] * factor), 255),
        min(round(color[1] * factor), 255),
        min(round(color[2] * factor), 255),
    )


class _Painter:
    """Polygons, discs and capsules; in mask mode every colour is 255 (on an 'L' image)."""

    def __init__(self, image: Image.Image, mask: bool = False) -> None:
        self.draw = ImageDraw.Draw(image)
        self.mask = mask

    def _fill(self, color: Color) -> Color | int:
        return 255 if self.mask else color

    def polygon(self, points: Sequence[complex], color: Color) -> None:
        self.draw.polygon([(p.real, p.imag) for p in points], fill=self._fill(color))

    def ellipse(self, centre: complex, rx: float, ry: float, color: Color) -> None:
        box = (centre.real - rx, centre.imag - ry, centre.real + rx, centre.imag + ry)
        self.draw.ellipse(box, fill=self._fill(color))

    def disc(self, centre: complex, radius: float, color: Color) -> None:
        self.ellipse(centre, radius, radius, color)

    def capsule(self, a: complex, b: complex, width_a: float, width_b: float, color: Color) -> None:
        length = abs(b - a)
        if length > 1e-6:
            normal = (b - a) / length * 1j
            self.polygon(
                [
                    a + normal * width_a / 2,
                    b + normal * width_b / 2,
                    b - normal * width_b / 2,
                    a - normal * width_a / 2,
                ],
                color,
            )
        self.disc(a, width_a / 2, color)
        self.disc(b, width_b / 2, color)


def _lerp(a: complex, b: complex, t: float) -> complex:
    return a + (b - a) * t


def _far_side_shade(fig: _Figure, side: float) -> float:
    """Darken the limbs on the side turned away from the camera (side: −1 right, +1 left)."""
    depth = -side * fig.sin
    return 1.0 if depth >= -0.35 else 0.82


def _ankle(fig: _Figure, hip: int, knee: int, ankle: int) -> complex | None:
    p_ankle, p_knee, p_hip = fig.at(ankle), fig.at(knee), fig.at(hip)
    if p_ankle is not None or p_knee is None or p_hip is None or abs(p_knee - p_hip) < 1e-6:
        return p_ankle
    # Feet cropped off the frame: continue the shin straight on, out of the image.
    return p_knee + (p_knee - p_hip) / abs(p_knee - p_hip) * _SHIN * fig.unit


def _draw_leg(paint: _Painter, ident: Identity, fig: _Figure, side: float) -> None:
    hip_k, knee_k, ankle_k = (R_HIP, R_KNEE, R_ANKLE) if side < 0 else (L_HIP, L_KNEE, L_ANKLE)
    hip, knee, ankle = fig.at(hip_k), fig.at(knee_k), _ankle(fig, hip_k, knee_k, ankle_k)
    if hip is None or knee is None:
        return
    u, lt = fig.unit, ident.build.limb_thickness
    shade = _far_side_shade(fig, side)
    skin, cloth = _shade(ident.skin, shade), _shade(ident.bottom_color, shade)
    w_hip, w_knee, w_ankle = 0.105 * u * lt, 0.08 * u * lt, 0.065 * u * lt
    if ankle is not None:
        toe = ankle + (fig.right * fig.sin * 0.07 - fig.up * 0.028) * u
        paint.capsule(
            ankle - fig.up * 0.012 * u, toe, 0.055 * u, 0.05 * u, _shade(ident.shoe_color, shade)
        )
    if ident.bottom_type == "trousers":
        paint.capsule(hip, knee, w_hip, w_knee, cloth)
        if ankle is not None:
            paint.capsule(knee, ankle, w_knee, w_ankle, cloth)
        return
    paint.capsule(hip, knee, w_hip * 0.85, w_knee * 0.85, skin)
    if ankle is not None:
        paint.capsule(knee, ankle, w_knee * 0.8, w_ankle * 0.8, skin)
    if ident.bottom_type == "shorts":
        paint.capsule(hip, _lerp(hip, knee, 0.6), w_hip * 1.05, w_knee * 1.15, cloth)


def _draw_skirt(paint: _Painter, ident: Identity, fig: _Figure) -> None:
    r_hip, l_hip, r_knee, l_knee = fig.at(R_HIP), fig.at(L_HIP), fig.at(R_KNEE), fig.at(L_KNEE)
    if r_hip is None or l_hip is None:
        return
    u = fig.unit
    knees = _mean((r_knee, l_knee))
    hem_centre = _lerp(fig.hip, knees, 0.8) if knees is not None else fig.hip - fig.up * 0.17 * u
    top_w = _torso_half_width(1, fig.cos, fig.sin, ident.build.shoulder_width) * u * 1.05
    spread = (
        abs(_dot(r_knee - l_knee, fig.right)) / 2
        if r_knee is not None and l_knee is not None
        else 0.0
    )
    hem_w = max(top_w * 1.25, spread + 0.07 * u)
    r = fig.right
    paint.polygon(
        [fig.hip - r * top_w, fig.hip + r * top_w, hem_centre + r * hem_w, hem_centre - r * hem_w],
        ident.bottom_color,
    )


def _quad_point(quad: Sequence[complex], u: float, v: float) -> complex:
    top = _lerp(quad[0], quad[1], u)
    bottom = _lerp(quad[3], quad[2], u)
    return _lerp(top, bottom, v)


def _quad_cell(
    quad: Sequence[complex], u0: float, u1: float, v0: float, v1: float
) -> list[complex]:
    return [
        _quad_point(quad, u0, v0),
        _quad_point(quad, u1, v0),
        _quad_point(quad, u1, v1),
        _quad_point(quad, u0, v1),
    ]


def _draw_pattern(paint: _Painter, ident: Identity, quad: Sequence[complex]) -> None:
    n, second = ident.pattern_repeats, ident.top_secondary
    if ident.top_pattern == "hstripes":
        for i in range(1, 2 * n, 2):
            paint.polygon(_quad_cell(quad, 0, 1, i / (2 * n), (i + 1) / (2 * n)), second)
    elif ident.top_pattern == "vstripes":
        for i in range(1, 2 * n, 2):
            paint.polygon(_quad_cell(quad, i / (2 * n), (i + 1) / (2 * n), 0, 1), second)
    elif ident.top_pattern == "two_tone":
        paint.polygon(_quad_cell(quad, 0, 1, 0.5, 1), second)
    elif ident.top_pattern == "checks":
        cols, rows = max(2, n // 2 + 1), n
        for i in range(cols):
            for j in range(rows):
                if (i + j) % 2:
                    paint.polygon(
                        _quad_cell(quad, i / cols, (i + 1) / cols, j / rows, (j + 1) / rows), second
                    )


def _draw_torso(paint: _Painter, ident: Identity, fig: _Figure) -> None:
    u, r = fig.unit, fig.right
    shoulders_w = _torso_half_width(0, fig.cos, fig.sin, ident.build.shoulder_width) * u
    p_r, p_l = fig.at(R_SHOULDER), fig.at(L_SHOULDER)
    if p_r is not None and p_l is not None:
        # Never narrower than the shoulder keypoints say (poses not drawn by sample_pose).
        shoulders_w = max(shoulders_w, abs(_dot(p_l - p_r, r)) / 2 + 0.02 * u)
    hips_w = _torso_half_width(1, fig.cos, fig.sin, ident.build.shoulder_width) * u
    top = fig.neck + fig.up * 0.015 * u
    corner = fig.neck - fig.up * 0.035 * u
    bottom = fig.hip - fig.up * 0.035 * u
    quad = [
        corner - r * shoulders_w,
        corner + r * shoulders_w,
        bottom + r * hips_w,
        bottom - r * hips_w,
    ]
    paint.polygon(
        [top - r * shoulders_w * 0.7, top + r * shoulders_w * 0.7, *quad[1:], quad[0]],
        ident.top_color,
    )
    _draw_pattern(paint, ident, quad)


def _draw_arm(paint: _Painter, ident: Identity, fig: _Figure, side: float) -> None:
    sh_k, el_k, wr_k = (
        (R_SHOULDER, R_ELBOW, R_WRIST) if side < 0 else (L_SHOULDER, L_ELBOW, L_WRIST)
    )
    shoulder, elbow, wrist = fig.at(sh_k), fig.at(el_k), fig.at(wr_k)
    if shoulder is None or elbow is None:
        return
    u, lt = fig.unit, ident.build.limb_thickness
    shade = _far_side_shade(fig, side)
    # Sleeves a touch darker than the chest, so an arm in front of the torso stays visible.
    skin, cloth = _shade(ident.skin, shade), _shade(ident.top_color, shade * 0.9)
    w_sh, w_el, w_wr = 0.078 * u * lt, 0.062 * u * lt, 0.05 * u * lt
    if ident.sleeves == "long":
        paint.capsule(shoulder, elbow, w_sh, w_el, cloth)
        if wrist is not None:
            paint.capsule(elbow, wrist, w_el, w_wr, cloth)
    else:
        paint.capsule(shoulder, elbow, w_sh * 0.85, w_el * 0.85, skin)
        if wrist is not None:
            paint.capsule(elbow, wrist, w_el * 0.85, w_wr * 0.85, skin)
        paint.capsule(shoulder, _lerp(shoulder, elbow, 0.5), w_sh * 1.05, w_el * 1.1, cloth)
    if wrist is not None:
        hand = wrist + (wrist - elbow) / max(abs(wrist - elbow), 1e-6) * 0.02 * u
        paint.disc(hand, 0.027 * u * lt, skin)


def _bag_box(bag: BagSpec, fig: _Figure) -> tuple[complex, float, float]:
    """Centre, half-width and half-height of the bag in canvas pixels."""
    if bag.kind == "backpack":
        half_w = math.hypot(0.1 * fig.cos, 0.06 * fig.sin)
        return fig.body(0.0, 0.14, -0.11), half_w * fig.unit, 0.12 * fig.unit
    x = -0.14 if bag.side == "right" else 0.14
    half_w = math.hypot(0.06 * fig.cos, 0.035 * fig.sin)
    return fig.body(x, _TORSO - 0.02), half_w * fig.unit, 0.055 * fig.unit


def _draw_bag(paint: _Painter, bag: BagSpec, fig: _Figure) -> None:
    centre, half_w, half_h = _bag_box(bag, fig)
    r, up = fig.right * half_w, fig.up * half_h
    paint.polygon([centre - r + up, centre + r + up, centre + r - up, centre - r - up], bag.color)


def _draw_bag_straps(paint: _Painter, bag: BagSpec, fig: _Figure) -> None:
    width = 0.018 * fig.unit
    if bag.kind == "backpack":
        for x in (-0.07, 0.07):
            paint.capsule(fig.body(x, 0.0), fig.body(x * 1.1, 0.2), width, width, bag.color)
        return
    centre, _, half_h = _bag_box(bag, fig)
    shoulder = fig.body(0.08 if bag.side == "right" else -0.08, 0.0)
    paint.capsule(shoulder, centre - fig.up * half_h * 0.8, width, width, bag.color)


def _bag_in_front(bag: BagSpec, fig: _Figure) -> bool:
    if bag.kind == "backpack":
        return fig.cos < 0
    side = -1.0 if bag.side == "right" else 1.0
    return -side * fig.sin > -0.2


def _head_radii(ident: Identity, fig: _Figure) -> tuple[float, float]:
    scale = fig.unit / ident.build.height_scale  # taller people have relatively smaller heads
    return _HEAD_RX * scale, _HEAD_RY * scale


def _draw_long_hair(paint: _Painter, ident: Identity, fig: _Figure) -> None:
    """The hair hanging behind the head down past the shoulders."""
    r, (rx, ry) = fig.right, _head_radii(ident, fig)
    top, bottom = _head_centre(fig) - fig.up * 0.2 * ry, fig.neck - fig.up * 0.12 * fig.unit
    back = -r * fig.sin * 0.3 * rx
    paint.polygon(
        [
            top - r * rx * 1.1 + back,
            top + r * rx * 1.1 + back,
            bottom + r * rx * 1.25 + back,
            bottom - r * rx * 1.25 + back,
        ],
        ident.hair_color,
    )


def _draw_head(paint: _Painter, ident: Identity, fig: _Figure) -> None:
    """Neck, head, hair (covering the face from behind), cap and eyes."""
    u, up, r = fig.unit, fig.up, fig.right
    rx, ry = _head_radii(ident, fig)
    centre = _head_centre(fig)
    facing = fig.sin  # image-right component of where the face points
    face_visible = any(fig.at(k) is not None for k in (NOSE, R_EYE, L_EYE))
    style = ident.hair_style
    paint.capsule(fig.neck + up * 0.01 * u, centre, 0.058 * u, 0.05 * u, ident.skin)
    paint.ellipse(centre, rx, ry, ident.skin)
    if style != "bald":
        drop = 0.12 if face_visible else 0.05
        shift = -r * facing * 0.15 * rx + up * drop * ry
        paint.ellipse(centre + shift, rx * 1.06, ry * 0.9, ident.hair_color)
        if face_visible:
            face = centre + r * facing * 0.28 * rx - up * 0.32 * ry
            paint.ellipse(face, rx * (0.6 + 0.2 * abs(fig.cos)), ry * 0.6, ident.skin)
    if style == "cap":
        crown = centre + up * 0.6 * ry - r * facing * 0.1 * rx
        paint.ellipse(crown, rx * 1.1, ry * 0.5, ident.cap_color)
        if fig.cos > -0.3:
            brim = centre + up * 0.22 * ry + r * facing * rx * 0.8
            paint.ellipse(
                brim, rx * (0.45 + 0.7 * abs(fig.cos)), ry * 0.16, _shade(ident.cap_color, 0.8)
            )
    for k in (R_EYE, L_EYE):
        eye = fig.at(k)
        if eye is not None:
            paint.disc(eye, 0.008 * u, (30, 22, 22))


def _draw_shadow(paint: _Painter, fig: _Figure, background: Background, height: int) -> None:
    feet = [a for a in (fig.at(R_ANKLE), fig.at(L_ANKLE)) if a is not None]
    if not feet or paint.mask:
        return
    ground = max(f.imag for f in feet) + _SOLE * fig.unit
    if ground >= height * SUPERSAMPLE:
        return
    centre = complex(sum(f.real for f in feet) / len(feet), ground)
    paint.ellipse(centre, 0.12 * fig.unit, 0.022 * fig.unit, _shade(background.ground_color, 0.6))


def _draw_person(
    paint: _Painter, ident: Identity, fig: _Figure, background: Background, height: int
) -> None:
    """Back to front: far limbs and what hangs behind, torso, head, then the arms in front."""
    _draw_shadow(paint, fig, background, height)
    near = -1.0 if fig.sin > 0 else 1.0  # the right side faces the camera when sin > 0
    sideways = abs(fig.sin) > 0.35
    bag = ident.bag
    if bag is not None and not _bag_in_front(bag, fig):
        _draw_bag(paint, bag, fig)
    if ident.hair_style == "long" and fig.cos >= 0:
        _draw_long_hair(paint, ident, fig)
    if sideways:
        _draw_arm(paint, ident, fig, -near)
    for side in (-near, near):
        _draw_leg(paint, ident, fig, side)
    if ident.bottom_type == "skirt":
        _draw_skirt(paint, ident, fig)
    _draw_torso(paint, ident, fig)
    if bag is not None:
        _draw_bag_straps(paint, bag, fig)
        if _bag_in_front(bag, fig):
            _draw_bag(paint, bag, fig)
    if ident.hair_style == "long" and fig.cos < 0:
        _draw_long_hair(paint, ident, fig)
    _draw_head(paint, ident, fig)
    for side in (near,) if sideways else (-near, near):
        _draw_arm(paint, ident, fig, side)


# --------------------------------------------------------------------------------------------------
# Background, camera, noise

_SENSOR_NOISE = 1.5
# Mild per-camera colour responses (RGB gains); camera 0 / None is neutral.
_CAMERA_GAIN: dict[int, tuple[float, float, float]] = {
    1: (1.0, 1.0, 1.0),
    2: (1.04, 1.0, 0.95),
    3: (0.95, 0.99, 1.05),
    4: (0.94, 0.94, 0.93),
    5: (1.05, 1.05, 1.02),
    6: (0.98, 1.03, 0.97),
}


def _draw_scene(bg: Background, height: int, width: int) -> Image.Image:
    ss = SUPERSAMPLE
    w, h = width * ss, height * ss
    image = Image.new("RGB", (w, h), bg.wall_color)
    draw = ImageDraw.Draw(image)
    horizon = bg.horizon * h
    draw.rectangle((0, horizon, w, h), fill=bg.ground_color)
    line = _shade(bg.ground_color, 0.8)
    for i in range(1, bg.ground_lines + 1):
        # Tiles get further apart towards the camera (the bottom of the frame).
        y = horizon + (h - horizon) * (i / (bg.ground_lines + 1)) ** 1.6
        draw.line((0, y, w, y), fill=line, width=ss)
    for rect in bg.rects:
        box = (rect.left * w, rect.top * h, rect.right * w, rect.bottom * h)
        if box[2] - box[0] < 1 or box[3] - box[1] < 1:
            continue
        frame = _shade(rect.color, 0.6) if rect.kind != "window" else _shade(bg.wall_color, 1.15)
        draw.rectangle(box, fill=rect.color, outline=frame, width=ss * 2)
        if rect.kind == "window":
            mid = (box[0] + box[2]) / 2
            draw.line((mid, box[1], mid, box[3]), fill=frame, width=ss)
    for blob in bg.blobs:
        cx, cy = blob.col * w, blob.row * h
        rx, ry = blob.half_width * w, blob.half_height * h
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=blob.color)
    return image


def _noise(seed: int, height: int, width: int) -> np.ndarray:
    """(H, W, 5) standard normals: texture luminance, texture RGB, sensor luminance."""
    return np.random.default_rng(seed).standard_normal((height, width, 5), dtype=np.float32)


def _background_layer(bg: Background, height: int, width: int, noise: np.ndarray) -> UInt8Array:
    scene = np.asarray(_draw_scene(bg, height, width).reduce(SUPERSAMPLE), dtype=np.float32)
    rows = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None, None]
    light = (1.0 + bg.wall_gradient * rows) * bg.brightness * np.asarray(bg.tint, np.float32)
    texture = bg.noise * (noise[..., :1] + 0.35 * noise[..., 1:4])
    return np.clip(np.rint(scene * light + texture), 0, 255).astype(np.uint8)


def _finish(image: UInt8Array, camera: int | None, noise: np.ndarray) -> UInt8Array:
    out = image.astype(np.float32)
    if camera is not None and camera in _CAMERA_GAIN:
        out *= np.asarray(_CAMERA_GAIN[camera], np.float32)
    out += _SENSOR_NOISE * noise[..., 4:5]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render_background(
    bg: Background, height: int, width: int, rng_seed: int, *, camera: int | None = None
) -> UInt8Array:
    """The scene alone as uint8 (H, W, 3); equals `render_person` with the same seed wherever the
    person is not drawn."""
    noise = _noise(rng_seed, height, width)
    return _finish(_background_layer(bg, height, width, noise), camera, noise)


def render_person(
    identity: Identity,
    pose: FloatArray,
    background: Background,
    height: int,
    width: int,
    *,
    seed: int = 0,
    camera: int | None = None,
    noise: bool = True,
) -> UInt8Array:
    """`identity` in `pose` (RCV, pixels of this size) on `background`: uint8 (H, W, 3).

    Deterministic for the same inputs. Drawn at 4× and box-filtered down, so edges are anti-aliased;
    `seed` drives the texture and sensor noise, `camera` (1–6) a mild colour response.
    `noise=False` leaves out the texture and sensor noise: the best any model can predict.
    """
    normals = _noise(seed, height, width) if noise else np.zeros((height, width, 5), np.float32)
    base = _background_layer(background, height, width, normals)
    ss = SUPERSAMPLE
    canvas = Image.fromarray(base).resize((width * ss, height * ss), Image.Resampling.NEAREST)
    fig = _figure(pose, height, ss)
    if fig is not None:
        _draw_person(_Painter(canvas), identity, fig, background, height)
    person = np.asarray(canvas.reduce(ss), dtype=np.uint8)
    return _finish(person, camera, normals)


def render_person_mask(identity: Identity, pose: FloatArray, height: int, width: int) -> UInt8Array:
    """Soft foreground mask of the drawn person (uint8 (H, W), 255 = fully covered)."""
    ss = SUPERSAMPLE
    canvas = Image.new("L", (width * ss, height * ss), 0)
    fig = _figure(pose, height, ss)
    if fig is not None:
        blank = Background(
            "street", (0, 0, 0), (0, 0, 0), 1.0, 0.0, 0, (), (), 0.0, 1.0, (1.0, 1.0, 1.0)
        )
        _draw_person(_Painter(canvas, mask=True), identity, fig, blank, height)
    return np.asarray(canvas.reduce(ss), dtype=np.uint8)


# --------------------------------------------------------------------------------------------------
# Records and the Market-1501 writer


@dataclass(frozen=True)
class FactorRecord:
    """Everything needed to re-render one stored image exactly."""

    name: str
    split: Split
    pid: int
    camera: int
    seed: int
    height: int
    width: int
    identity: Identity
    background: Background
    pose: FloatArray = field(compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "split": self.split,
            "pid": self.pid,
            "camera": self.camera,
            "seed": self.seed,
            "height": self.height,
            "width": self.width,
            "identity": self.identity.to_dict(),
            "background": self.background.to_dict(),
            "pose": [[float(v) for v in row] for row in self.pose.tolist()],
        }

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> FactorRecord:
        return FactorRecord(
            name=str(data["name"]),
            split=_literal(data["split"], Split, "split"),
            pid=int(data["pid"]),
            camera=int(data["camera"]),
            seed=int(data["seed"]),
            height=int(data["height"]),
            width=int(data["width"]),
            identity=Identity.from_dict(data["identity"]),
            background=Background.from_dict(data["background"]),
            pose=as_rcv(data["pose"], int(data["height"]), int(data["width"])),
        )

    @property
    def path(self) -> Path:
        """Relative path of the image inside the dataset root."""
        return Path(SPLIT_DIRS[self.split]) / self.name


@dataclass(frozen=True)
class SynthSummary:
    root: Path
    height: int
    width: int
    train_identities: int
    test_identities: int
    train_images: int
    test_images: int
    query_images: int
    train_pairs: int
    test_pairs: int
    seconds: float

    @property
    def images(self) -> int:
        return self.train_images + self.test_images + self.query_images

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")


def rerender(
    record: FactorRecord,
    *,
    pose: FloatArray | None = None,
    background: Background | None = None,
    identity: Identity | None = None,
    noise: bool = True,
) -> UInt8Array:
    """The image of `record` with any factor replaced (same camera, noise seed and size);
    `noise=False` renders it without texture and sensor noise (a perfect render's ceiling)."""
    return render_person(
        identity if identity is not None else record.identity,
        pose if pose is not None else record.pose,
        background if background is not None else record.background,
        record.height,
        record.width,
        seed=record.seed,
        camera=record.camera,
        noise=noise,
    )


def read_factors(root: str | Path) -> dict[str, FactorRecord]:
    """`factors.jsonl` of a dataset written by `write_market_dataset`, keyed by image name."""
    lines = (Path(root) / "factors.jsonl").read_text().splitlines()
    records = (FactorRecord.from_dict(json.loads(line)) for line in lines if line.strip())
    return {r.name: r for r in records}


def _image_cameras(rng: np.random.Generator, count: int, queries: int) -> list[int]:
    """Cameras for one identity's images; the first `queries` share a camera no other image uses."""
    cams = [int(c) + 1 for c in rng.permutation(CAMERAS)]
    query_cam, others = cams[0], cams[1:]
    gallery = others[: int(rng.integers(1, min(5, max(count - queries, 1)) + 1))]
    if queries == 0:
        gallery = [query_cam, *gallery]
    rest = [
        gallery[i] if i < len(gallery) else gallery[int(rng.integers(len(gallery)))]
        for i in range(count - queries)
    ]
    return [query_cam] * queries + rest


def _plan_identity(
    pid: int,
    split_test: bool,
    *,
    per_identity: int,
    queries: int,
    height: int,
    width: int,
    seed: int,
    scenes: Mapping[int, Sequence[Background]],
) -> list[FactorRecord]:
    rng = np.random.default_rng((seed, 3, pid))
    identity = sample_identity(rng)
    cameras = _image_cameras(rng, per_identity, queries if split_test else 0)
    sequence = {cam: int(rng.integers(1, 7)) for cam in range(1, CAMERAS + 1)}
    frame = {cam: int(rng.integers(0, 150_000)) for cam in range(1, CAMERAS + 1)}
    records = []
    for k, cam in enumerate(cameras):
        frame[cam] += int(rng.integers(5, 80))
        name = (
            f"{pid:04d}_c{cam}s{sequence[cam]}_{frame[cam]:06d}_{int(rng.integers(1, 4)):02d}.jpg"
        )
        scene = scenes[cam][int(rng.integers(len(scenes[cam])))]
        split: Split = "train" if not split_test else ("query" if k < queries else "test")
        records.append(
            FactorRecord(
                name=name,
                split=split,
                pid=pid,
                camera=cam,
                seed=int(rng.integers(2**31)),
                height=height,
                width=width,
                identity=identity,
                background=jitter_background(scene, rng),
                pose=sample_pose(rng, height, width, height_scale=identity.build.height_scale),
            )
        )
    return records


def _pairs(
    records: Sequence[FactorRecord], rng: np.random.Generator, limit: int | None
) -> list[tuple[str, str]]:
    """All ordered pairs of different images of one identity, shuffled, optionally capped."""
    by_pid: dict[int, list[str]] = {}
    for r in records:
        by_pid.setdefault(r.pid, []).append(r.name)
    pairs = [(a, b) for names in by_pid.values() for a in names for b in names if a != b]
    order = rng.permutation(len(pairs))
    if limit is not None:
        order = order[:limit]
    return [pairs[int(i)] for i in order]


def _write_pairs(path: Path, pairs: Iterable[tuple[str, str]]) -> int:
    lines = ["from,to", *(f"{a},{b}" for a, b in pairs)]
    path.write_text("\n".join(lines) + "\n")
    return len(lines) - 1


def write_market_dataset(
    out: Path,
    *,
    identities: int,
    per_identity: int,
    height: int = 128,
    width: int = 64,
    seed: int = 0,
    test_fraction: float = 0.5,
    query_per_identity: int = 1,
    progress: bool = True,
    max_test_pairs: int = MAX_TEST_PAIRS,
) -> SynthSummary:
    """Write a Market-1501-format dataset of synthetic people with full ground truth to `out`.

    Folders `bounding_box_train/`, `bounding_box_test/`, `query/`; annotation CSVs
    `market-annotation-{train,test}.csv`; pair CSVs `market-pairs-{train,test}.csv`; `factors.jsonl`
    (one record per image, see `FactorRecord`) and `synth.json`. Identities are split by identity;
    each test identity has `query_per_identity` images in `query/`, from a camera its gallery images
    do not use. The same arguments give byte-identical files. Refuses a folder that already holds
    images.
    """
    if identities < 1 or per_identity < 2:
        raise ValueError("need at least 1 identity and 2 images per identity")
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    if not 0 <= query_per_identity < per_identity:
        raise ValueError(
            f"query_per_identity must be in [0, {per_identity - 1}], got {query_per_identity}"
        )
    if height < 16 or width < 8:
        raise ValueError(f"image size {height}x{width} is too small (minimum 16x8)")
    start = time.perf_counter()
    out = Path(out)
    # Stale images from an earlier run would silently join this dataset's splits.
    existing = [p for d in SPLIT_DIRS.values() if (out / d).is_dir() for p in (out / d).iterdir()]
    if existing:
        raise FileExistsError(f"{out} already holds {len(existing)} images; use an empty folder")
    for folder in SPLIT_DIRS.values():
        (out / folder).mkdir(parents=True, exist_ok=True)

    scenes = {
        cam: [
            sample_background(np.random.default_rng((seed, 1, cam, j)))
            for j in range(SCENES_PER_CAMERA)
        ]
        for cam in range(1, CAMERAS + 1)
    }
    test_count = round(identities * test_fraction)
    test_ids = {
        int(i) + 1 for i in np.random.default_rng((seed, 2)).permutation(identities)[:test_count]
    }
    records = [
        r
        for pid in range(1, identities + 1)
        for r in _plan_identity(
            pid,
            pid in test_ids,
            per_identity=per_identity,
            queries=query_per_identity,
            height=height,
            width=width,
            seed=seed,
            scenes=scenes,
        )
    ]
    _render_all(out, records, progress)

    train = [r for r in records if r.split == "train"]
    test = [r for r in records if r.split != "train"]
    write_keypoints_csv(
        out / "market-annotation-train.csv",
        ((r.name, r.pose) for r in sorted(train, key=lambda r: r.name)),
    )
    write_keypoints_csv(
        out / "market-annotation-test.csv",
        ((r.name, r.pose) for r in sorted(test, key=lambda r: r.name)),
    )
    train_pairs = _write_pairs(
        out / "market-pairs-train.csv", _pairs(train, np.random.default_rng((seed, 4)), None)
    )
    test_pairs = _write_pairs(
        out / "market-pairs-test.csv",
        _pairs(test, np.random.default_rng((seed, 5)), max_test_pairs),
    )
    with (out / "factors.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r.to_dict(), separators=(",", ":")) + "\n")

    summary = SynthSummary(
        root=out,
        height=height,
        width=width,
        train_identities=identities - len(test_ids),
        test_identities=len(test_ids),
        train_images=len(train),
        test_images=sum(r.split == "test" for r in records),
        query_images=sum(r.split == "query" for r in records),
        train_pairs=train_pairs,
        test_pairs=test_pairs,
        seconds=time.perf_counter() - start,
    )
    manifest = {
        "generator": GENERATOR_VERSION,
        "format": "market-1501",
        "arguments": {
            "identities": identities,
            "per_identity": per_identity,
            "height": height,
            "width": width,
            "seed": seed,
            "test_fraction": test_fraction,
            "query_per_identity": query_per_identity,
            "max_test_pairs": max_test_pairs,
        },
        "counts": {
            "train_identities": summary.train_identities,
            "test_identities": summary.test_identities,
            "train_images": summary.train_images,
            "test_images": summary.test_images,
            "query_images": summary.query_images,
            "train_pairs": train_pairs,
            "test_pairs": test_pairs,
        },
    }
    (out / "synth.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return summary


def _render_all(out: Path, records: Sequence[FactorRecord], progress: bool) -> None:
    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("rendering synthetic people", total=len(records))
        for r in records:
            # 4:4:4 chroma keeps the stored image within ~2 grey levels of its re-rendered truth.
            Image.fromarray(rerender(r)).save(
                out / r.path, "JPEG", quality=JPEG_QUALITY, subsampling=0
            )
            bar.advance(task)
