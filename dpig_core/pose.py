"""COCO-18 keypoints and everything DPIG derives from them (spec §2.2, §2.5–§2.7).

A pose is an RCV array: 18 rows of (row = y, col = x, visibility ∈ {0, 1}) in pixels of the stored
image, in OpenPose COCO-18 order. Missing keypoints are (0, 0, 0).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # torch is imported where it is used, so the CLI starts without it
    import torch

NUM_KEYPOINTS = 18

# OpenPose's own labels; the DPIG comments swap left/right for 14–17 (matters only for flips).
KEYPOINT_NAMES: tuple[str, ...] = (
    "nose", "neck",
    "r_shoulder", "r_elbow", "r_wrist",
    "l_shoulder", "l_elbow", "l_wrist",
    "r_hip", "r_knee", "r_ankle",
    "l_hip", "l_knee", "l_ankle",
    "r_eye", "l_eye", "r_ear", "l_ear",
)  # fmt: skip

# The 23 limbs of `_getPoseMask` (0-based): skeleton, neck–ears, hip bar, hip–shoulder bars,
# ear–ear.
LIMBS: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12),
    (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (1, 16), (1, 17), (8, 11), (11, 5),
    (8, 2), (16, 17),
)  # fmt: skip

# The 7 body ROIs (the first 7 of the 37 stored parts, spec §2.7).
BODY_ROIS: tuple[tuple[int, ...], ...] = (
    (0, 1, 2, 5, 14, 15, 16, 17),  # head + shoulders
    (2, 3, 4, 5, 6, 7, 8, 11),  # upper body
    (8, 9, 10, 11, 12, 13),  # lower body
    (5, 6, 7),  # left arm
    (2, 3, 4),  # right arm
    (11, 12, 13),  # left leg
    (8, 9, 10),  # right leg
)
NUM_ROIS = len(BODY_ROIS)

FloatArray = npt.NDArray[np.float32]
UInt8Array = npt.NDArray[np.uint8]
IntArray = npt.NDArray[np.int64]


class PoseError(ValueError):
    """A pose that cannot be used: wrong shape, NaN, or coordinates outside the frame."""


def empty_rcv() -> FloatArray:
    return np.zeros((NUM_KEYPOINTS, 3), dtype=np.float32)


def as_rcv(values: Any, height: int | None = None, width: int | None = None) -> FloatArray:
    """Validate and normalise a pose to an (18, 3) float32 RCV array.

    Invisible keypoints are reset to (0, 0, 0). With `height`/`width`, visible keypoints must lie
    in the frame; the error names the offending keypoint.
    """
    try:
        rcv = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise PoseError(f"pose is not numeric: {exc}") from None
    if rcv.ndim != 2 or rcv.shape[1] != 3:
        raise PoseError(f"pose must be 18 rows of (row, col, visibility), got shape {rcv.shape}")
    if rcv.shape[0] != NUM_KEYPOINTS:
        raise PoseError(f"pose must have {NUM_KEYPOINTS} keypoints (COCO-18), got {rcv.shape[0]}")
    if not np.isfinite(rcv).all():
        bad = int(np.argwhere(~np.isfinite(rcv))[0, 0])
        raise PoseError(f"keypoint {bad} ({KEYPOINT_NAMES[bad]}) is not a finite number")
    vis = rcv[:, 2] > 0
    out = np.where(vis[:, None], rcv, 0.0).astype(np.float32)
    out[:, 2] = vis
    if height is not None and width is not None:
        for k in np.flatnonzero(vis):
            r, c = out[k, 0], out[k, 1]
            if not (0 <= r < height and 0 <= c < width):
                raise PoseError(
                    f"keypoint {k} ({KEYPOINT_NAMES[k]}) at row {r:g}, col {c:g} is outside the "
                    f"{height}x{width} frame"
                )
    return out


# --------------------------------------------------------------------------------------------------
# Pose maps (§2.5) and decoded coordinates


def disk_offsets(radius: int) -> IntArray:
    """(dr, dc) pairs of the solid disk dr² + dc² ≤ radius² (49 offsets for radius 4)."""
    span = np.arange(-radius, radius + 1)
    dr, dc = np.meshgrid(span, span, indexing="ij")
    keep = dr**2 + dc**2 <= radius**2
    return np.stack([dr[keep], dc[keep]], axis=1).astype(np.int64)


def pose_maps(rcv: torch.Tensor, height: int, width: int, radius: int = 4) -> torch.Tensor:
    """Keypoint disks as decoder input: [B, 18, 3] RCV → [B, 18, H, W] in {−1, +1}.

    Centres are floored; the disk is clipped at the border; an invisible keypoint is an all −1 map.
    """
    import torch

    rcv = rcv.to(torch.float32)
    centre_r = torch.floor(rcv[..., 0])[..., None, None]  # [B, 18, 1, 1]
    centre_c = torch.floor(rcv[..., 1])[..., None, None]
    visible = (rcv[..., 2] > 0)[..., None, None]
    rows = torch.arange(height, device=rcv.device, dtype=torch.float32)[:, None]  # [H, 1]
    cols = torch.arange(width, device=rcv.device, dtype=torch.float32)[None, :]  # [1, W]
    inside = (rows - centre_r) ** 2 + (cols - centre_c) ** 2 <= radius**2
    return torch.where(inside & visible, 1.0, -1.0)


def pose_maps_np(rcv: FloatArray, height: int, width: int, radius: int = 4) -> FloatArray:
    """Single-pose numpy convenience: (18, 3) → (18, H, W) float32 in {−1, +1}."""
    import torch

    maps = pose_maps(torch.from_numpy(np.asarray(rcv, np.float32))[None], height, width, radius)
    return maps[0].numpy()


def normalize_rcv(rcv: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pose AE input (§4): [B, 18, 3] → [B, 54], interleaved (r', c', v); missing → (−1, −1, 0)."""
    import torch

    vis = (rcv[..., 2] > 0).to(torch.float32)
    r = torch.where(vis > 0, rcv[..., 0] / height * 2 - 1, -1.0)
    c = torch.where(vis > 0, rcv[..., 1] / width * 2 - 1, -1.0)
    return torch.stack([r, c, vis], dim=-1).reshape(rcv.shape[0], NUM_KEYPOINTS * 3)


def denormalize_rcv(
    coords: torch.Tensor, vis: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Decoded pose → RCV (§2.5 test time): [B, 18, 2] in [−1, 1] and [B, 18] → [B, 18, 3].

    row = (r + 1)/2·H clipped to [0, H − 1] and floored, then multiplied by the visibility.
    """
    import torch

    vis = (vis > 0.5).to(torch.float32)
    row = torch.floor(((coords[..., 0] + 1) / 2 * height).clamp(0, height - 1)) * vis
    col = torch.floor(((coords[..., 1] + 1) / 2 * width).clamp(0, width - 1)) * vis
    return torch.stack([row, col, vis], dim=-1)


# --------------------------------------------------------------------------------------------------
# Limb masks (§2.6)


def _stamp_disk(mask: UInt8Array, r: float, c: float, offsets: IntArray) -> None:
    rows = int(r) + offsets[:, 0]  # int() truncates, as the reference `_getSparseKeypoint` does
    cols = int(c) + offsets[:, 1]
    keep = (rows >= 0) & (rows < mask.shape[0]) & (cols >= 0) & (cols < mask.shape[1])
    mask[rows[keep], cols[keep]] = 1


def _window_extreme(image: UInt8Array, size: int, op: Literal["max", "min"]) -> UInt8Array:
    pad = size // 2
    padded = np.pad(image, pad, mode="symmetric")  # scipy.ndimage's default 'reflect'
    windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size))
    reduced = windows.max(axis=(2, 3)) if op == "max" else windows.min(axis=(2, 3))
    out: UInt8Array = reduced.astype(np.uint8)
    return out


def close_mask(mask: UInt8Array, size: int = 5) -> UInt8Array:
    """Morphological closing with a size×size square: dilation, then erosion."""
    return _window_extreme(_window_extreme(mask, size, "max"), size, "min")


def limb_mask(rcv: FloatArray, height: int, width: int, radius: int) -> UInt8Array:
    """Binary (H, W) foreground mask: disks stamped along the 23 limbs, then a 5×5 closing."""
    mask = np.zeros((height, width), dtype=np.uint8)
    offsets = disk_offsets(radius)
    for a, b in LIMBS:
        if rcv[a, 2] <= 0 or rcv[b, 2] <= 0:
            continue
        r0, c0, r1, c1 = float(rcv[a, 0]), float(rcv[a, 1]), float(rcv[b, 0]), float(rcv[b, 1])
        _stamp_disk(mask, r0, c0, offsets)
        _stamp_disk(mask, r1, c1, offsets)
        steps = int(math.hypot(r0 - r1, c0 - c1) / radius)
        for i in range(1, steps if steps > 1 else 0):
            _stamp_disk(mask, r0 + (r1 - r0) * i / steps, c0 + (c1 - c0) * i / steps, offsets)
    return close_mask(mask)


# --------------------------------------------------------------------------------------------------
# Body-ROI boxes (§2.7)


@dataclass(frozen=True)
class RoiPadding:
    """Padding of a body-ROI box around its visible keypoints, per dataset style (§2.7)."""

    style: Literal["market", "deepfashion"] = "market"
    pad: int = 6
    pad_single: int = 10
    # DeepFashion only: close-up paddings and how far the nose is moved up before boxing.
    closeup_pad: int = 20
    closeup_pad_single: int = 40
    nose_shift: int = 10
    closeup_nose_shift: int = 25

    @staticmethod
    def market(scale: float = 1.0) -> RoiPadding:
        return RoiPadding("market", round(6 * scale), round(10 * scale))

    @staticmethod
    def deepfashion(scale: float = 1.0) -> RoiPadding:
        s = scale
        return RoiPadding(
            "deepfashion", round(10 * s), round(20 * s), round(20 * s), round(40 * s),
            round(10 * s), round(25 * s),
        )  # fmt: skip


def roi_boxes(
    rcv: FloatArray, height: int, width: int, padding: RoiPadding
) -> tuple[IntArray, IntArray]:
    """The 7 body-ROI boxes [y1, x1, y2, x2] (integer pixels) and their visibility flags.

    A part with no visible keypoint gets the box [0, 0, 1, 1] and vis 0.
    """
    rcv = np.asarray(rcv, dtype=np.float32).copy()
    visible = rcv[:, 2] > 0
    pad, pad_single = padding.pad, padding.pad_single
    if padding.style == "deepfashion":
        whole_body = (visible[12] or visible[13]) and (visible[9] or visible[10])
        if not whole_body:
            pad, pad_single = padding.closeup_pad, padding.closeup_pad_single
        if visible[0]:
            rcv[0, 0] -= padding.nose_shift if whole_body else padding.closeup_nose_shift
    boxes = np.zeros((NUM_ROIS, 4), dtype=np.int64)
    vis = np.zeros(NUM_ROIS, dtype=np.int64)
    for i, part in enumerate(BODY_ROIS):
        pts = rcv[[k for k in part if visible[k]], :2]
        if len(pts) == 0:
            boxes[i] = (0, 0, 1, 1)
            continue
        p = pad if len(pts) >= 2 else pad_single
        y1, x1 = pts.min(axis=0) - p
        y2, x2 = pts.max(axis=0) + p
        boxes[i] = (
            int(max(y1, 0)), int(max(x1, 0)), int(min(y2, height - 1)), int(min(x2, width - 1)),
        )  # fmt: skip
        vis[i] = 1
    return boxes, vis


# --------------------------------------------------------------------------------------------------
# Converters from other keypoint formats

# BODY_25 → COCO-18: drop MidHip (8) and the six foot points.
_BODY25_TO_COCO18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)
# COCO-17 index for each COCO-18 slot (neck = −1, synthesised).
_COCO17_TO_COCO18 = (0, -1, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
COCO17_OF_COCO18 = _COCO17_TO_COCO18  # the COCO-17 index of each COCO-18 slot; −1: the neck


def from_xyc(points: Sequence[Sequence[float]], threshold: float = 0.0) -> FloatArray:
    """18 (x, y, confidence) triples → RCV; a confidence ≤ threshold means missing."""
    xyc = np.asarray(points, dtype=np.float32)
    rcv = np.stack([xyc[:, 1], xyc[:, 0], (xyc[:, 2] > threshold).astype(np.float32)], axis=1)
    return as_rcv(rcv)


def from_openpose(person_keypoints: Sequence[float], threshold: float = 0.0) -> FloatArray:
    """One `people[i].pose_keypoints_2d` list (COCO-18 or BODY_25, flat x, y, c) → RCV."""
    flat = np.asarray(person_keypoints, dtype=np.float32)
    if flat.size % 3 != 0 or flat.size // 3 not in (18, 25):
        raise PoseError(
            f"pose_keypoints_2d must hold 18 (COCO) or 25 (BODY_25) x,y,c triples, got {flat.size} "
            "numbers"
        )
    xyc = flat.reshape(-1, 3)
    if len(xyc) == 25:
        xyc = xyc[list(_BODY25_TO_COCO18)]
    return from_xyc(xyc.tolist(), threshold)


def read_openpose_json(source: str | Path | Mapping[str, Any]) -> list[FloatArray]:
    """Every person of an OpenPose JSON file (or its parsed dict), in file order."""
    data = json.loads(Path(source).read_text()) if isinstance(source, str | Path) else source
    people = data.get("people")
    if not isinstance(people, list):
        raise PoseError("OpenPose JSON has no 'people' list")
    return [from_openpose(p["pose_keypoints_2d"]) for p in people]


def from_coco17(keypoints: Sequence[float] | Sequence[Sequence[float]]) -> FloatArray:
    """COCO-17 keypoints (x, y, v; flat 51 or 17×3) → COCO-18 RCV with a synthesised neck.

    The neck is the shoulder midpoint when both shoulders are present (v > 0), else missing.
    """
    xyv = np.asarray(keypoints, dtype=np.float32).reshape(-1, 3)
    if len(xyv) != 17:
        raise PoseError(f"COCO keypoints must be 17 (x, y, v) triples, got {len(xyv)}")
    out = np.zeros((NUM_KEYPOINTS, 3), dtype=np.float32)
    for slot, src in enumerate(_COCO17_TO_COCO18):
        if src >= 0 and xyv[src, 2] > 0:
            out[slot] = (xyv[src, 1], xyv[src, 0], 1.0)
    l_sh, r_sh = xyv[5], xyv[6]
    if l_sh[2] > 0 and r_sh[2] > 0:
        out[1] = ((l_sh[1] + r_sh[1]) / 2, (l_sh[0] + r_sh[0]) / 2, 1.0)
    return as_rcv(out)


CSV_HEADER = "name:keypoints_y:keypoints_x"


def parse_keypoints_csv_line(line: str) -> tuple[str, FloatArray]:
    """One `name: [y0, …]: [x0, …]` row (−1 = missing) → (name, RCV)."""
    parts = line.rstrip("\n").split(":")
    if len(parts) != 3:
        raise PoseError(f"expected 'name:[ys]:[xs]', got {line[:80]!r}")
    name = parts[0].strip()
    try:
        ys = json.loads(parts[1])
        xs = json.loads(parts[2])
    except json.JSONDecodeError as exc:
        raise PoseError(f"{name}: keypoint list is not a JSON list ({exc.msg})") from None
    if len(ys) != NUM_KEYPOINTS or len(xs) != NUM_KEYPOINTS:
        raise PoseError(f"{name}: expected {NUM_KEYPOINTS} ys and xs, got {len(ys)} and {len(xs)}")
    rcv = np.zeros((NUM_KEYPOINTS, 3), dtype=np.float32)
    for k, (y, x) in enumerate(zip(ys, xs, strict=True)):
        if y != -1 and x != -1:
            rcv[k] = (y, x, 1.0)
    return name, as_rcv(rcv)


def read_keypoints_csv(path: str | Path) -> dict[str, FloatArray]:
    """A Market-1501/DeepFashion annotation file (`name:keypoints_y:keypoints_x`) → {name: RCV}."""
    lines = Path(path).read_text().splitlines()
    if not lines or lines[0].strip() != CSV_HEADER:
        raise PoseError(f"{path}: first line must be {CSV_HEADER!r}")
    rows = (parse_keypoints_csv_line(line) for line in lines[1:] if line.strip())
    return dict(rows)


def format_keypoints_csv_line(name: str, rcv: FloatArray) -> str:
    vis = rcv[:, 2] > 0
    ys = [int(y) if v else -1 for y, v in zip(rcv[:, 0], vis, strict=True)]
    xs = [int(x) if v else -1 for x, v in zip(rcv[:, 1], vis, strict=True)]
    return f"{name}: {ys}: {xs}"


def write_keypoints_csv(path: str | Path, rows: Iterable[tuple[str, FloatArray]]) -> None:
    """Write `name:keypoints_y:keypoints_x` rows; coordinates are floored to integers."""
    lines = [CSV_HEADER, *(format_keypoints_csv_line(n, r) for n, r in rows)]
    Path(path).write_text("\n".join(lines) + "\n")
