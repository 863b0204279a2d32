"""Pose files for pose-grid jobs (DESIGN §3): read, validate, rescale and write.

Formats read by `load_pose_file`:
- ours (written by `write_pose_file`):
  `{"format": "dpig-poses/1", "height": H, "width": W, "poses": [{"id": …, "rcv": 18×[r, c, v]}]}`;
- OpenPose JSON (`people[].pose_keypoints_2d`, COCO-18 or BODY_25, one pose per person), or a folder
  of such files;
- COCO keypoints JSON (an `annotations` list with 51 `keypoints` each) or a bare list of 17×3
  (or of such lists); the neck is synthesised;
- the Market-1501 `name:keypoints_y:keypoints_x` CSV.

Every pose is checked (18 keypoints, finite numbers, at least one visible keypoint, inside the frame
when the frame is known); the first bad one raises a `PoseFileError` naming the file, the pose and
the problem.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpig_core.data.readers import image_size
from dpig_core.data.records import PersonRecord
from dpig_core.pose import (
    CSV_HEADER,
    NUM_KEYPOINTS,
    FloatArray,
    PoseError,
    as_rcv,
    from_coco17,
    from_openpose,
    parse_keypoints_csv_line,
)

POSE_FORMAT = "dpig-poses/1"

COCO17_NAMES: tuple[str, ...] = (
    "nose", "l_eye", "r_eye", "l_ear", "r_ear", "l_shoulder", "r_shoulder", "l_elbow", "r_elbow",
    "l_wrist", "r_wrist", "l_hip", "r_hip", "l_knee", "r_knee", "l_ankle", "r_ankle",
)  # fmt: skip


class PoseFileError(ValueError):
    """A pose file that cannot be used; the message names the file, the pose and the problem."""


@dataclass(frozen=True)
class PoseSet:
    """Validated poses, in file order: (pose id, (18, 3) RCV) pairs in a `height`×`width` frame
    (None when the file does not say and the caller did not either)."""

    poses: list[tuple[str, FloatArray]]
    height: int | None = None
    width: int | None = None
    format: str = "dpig"
    skipped: int = 0  # entries left out on purpose (COCO annotations without a labelled keypoint)

    def __len__(self) -> int:
        return len(self.poses)

    def __iter__(self) -> Iterator[tuple[str, FloatArray]]:
        return iter(self.poses)

    @property
    def ids(self) -> list[str]:
        return [pid for pid, _ in self.poses]

    @property
    def frame(self) -> tuple[int, int] | None:
        return None if self.height is None or self.width is None else (self.height, self.width)

    def stack(self) -> FloatArray:
        """All poses as one [N, 18, 3] float32 array."""
        if not self.poses:
            return np.zeros((0, NUM_KEYPOINTS, 3), dtype=np.float32)
        return np.stack([rcv for _, rcv in self.poses]).astype(np.float32)

    def rescaled(self, height: int, width: int) -> PoseSet:
        """The same poses in a `height`×`width` frame (needs a known frame)."""
        if self.frame is None:
            raise PoseFileError("cannot rescale poses whose frame size is unknown")
        poses = [(pid, rescale_rcv(rcv, self.frame, (height, width))) for pid, rcv in self.poses]
        return PoseSet(poses, height, width, self.format, self.skipped)


def rescale_rcv(rcv: FloatArray, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> FloatArray:
    """Scale rows by to_h / from_h and columns by to_w / from_w; missing keypoints stay (0, 0, 0).

    A keypoint inside the source frame stays inside the target frame.
    """
    (fh, fw), (th, tw) = from_hw, to_hw
    if min(fh, fw, th, tw) <= 0:
        raise ValueError(f"frame sizes must be positive, got {fh}x{fw} → {th}x{tw}")
    out = np.array(rcv, dtype=np.float32, copy=True)
    vis = out[:, 2] > 0
    out[:, 0] = np.where(vis, out[:, 0] * (th / fh), 0.0)
    out[:, 1] = np.where(vis, out[:, 1] * (tw / fw), 0.0)
    out[:, 2] = vis
    return out


# --------------------------------------------------------------------------------------------------
# Reading


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _frame(height: Any, width: Any) -> tuple[int, int] | None:
    return (int(height), int(width)) if _positive_int(height) and _positive_int(width) else None


class _Collector:
    """Validates poses one by one into a PoseSet; every error carries the file label."""

    def __init__(self, label: str, frame: tuple[int, int] | None) -> None:
        self.label = label
        self.frame = frame
        self.poses: list[tuple[str, FloatArray]] = []
        self.seen: dict[str, int] = {}

    def error(self, message: str) -> PoseFileError:
        return PoseFileError(f"{self.label}: {message}")

    def add(
        self,
        pid: str,
        raw: Any,
        convert: Callable[[Any], FloatArray] | None = None,
        *,
        frame: tuple[int, int] | None = None,
    ) -> None:
        """Convert (`convert(raw)` → RCV), check and append; `frame` overrides the set's frame."""
        i = len(self.poses)
        where = f"pose {i} ({pid!r})"
        if pid in self.seen:
            raise self.error(f"{where}: id already used by pose {self.seen[pid]}")
        frame = frame or self.frame
        try:
            rcv = as_rcv(convert(raw) if convert is not None else raw, *(frame or (None, None)))
        except (PoseError, ValueError, TypeError) as exc:
            raise self.error(f"{where}: {exc}") from None
        if not (rcv[:, 2] > 0).any():
            raise self.error(f"{where}: no visible keypoint")
        self.seen[pid] = i
        self.poses.append((pid, rcv))


def _finite_triples(values: Any, names: Sequence[str], what: str) -> FloatArray:
    """Numbers → (K, 3) float32, naming the first keypoint that is not a finite number."""
    try:
        arr = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):
        raise PoseError(f"{what} is not a list of numbers") from None
    if arr.size % 3 != 0:
        raise PoseError(f"{what} must hold (x, y, confidence) triples, got {arr.size} numbers")
    arr = arr.reshape(-1, 3)
    bad = np.argwhere(~np.isfinite(arr))
    if len(bad):
        k = int(bad[0, 0])
        name = f" ({names[k]})" if len(arr) == len(names) else ""
        raise PoseError(f"keypoint {k}{name} is not a finite number")
    return arr


def _load_ours(data: dict[str, Any], out: _Collector) -> None:
    height, width = data.get("height"), data.get("width")
    for key, value in (("height", height), ("width", width)):
        if not _positive_int(value):
            raise out.error(f"{key!r} must be a positive integer, got {value!r}")
    out.frame = _frame(height, width)
    poses = data.get("poses")
    if not isinstance(poses, list) or not poses:
        raise out.error("'poses' must be a non-empty list")
    for i, entry in enumerate(poses):
        if not isinstance(entry, dict) or "rcv" not in entry:
            raise out.error(f"pose {i}: must be an object with 'id' and 'rcv'")
        pid = entry.get("id", str(i))
        if not isinstance(pid, str) or not pid:
            raise out.error(f"pose {i}: 'id' must be a non-empty string, got {pid!r}")
        out.add(pid, entry["rcv"])


def _openpose_poses(data: Any, stem: str, out: _Collector) -> None:
    people = data.get("people") if isinstance(data, dict) else None
    if not isinstance(people, list):
        raise out.error("OpenPose JSON has no 'people' list")
    for j, person in enumerate(people):
        flat = person.get("pose_keypoints_2d") if isinstance(person, dict) else None
        if flat is None:
            raise out.error(f"person {j} has no 'pose_keypoints_2d'")
        out.add(f"{stem}#{j}", flat, _from_openpose)


def _from_openpose(values: Any) -> FloatArray:
    return from_openpose(_finite_triples(values, (), "pose_keypoints_2d").ravel().tolist())


def _from_coco(values: Any) -> FloatArray:
    return from_coco17(_finite_triples(values, COCO17_NAMES, "keypoints").tolist())


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, int | float)


def _bare_coco_entries(data: list[Any]) -> list[Any]:
    """A bare list is one pose (51 numbers, or 17 triples) or a list of such poses."""
    if all(_is_scalar(v) for v in data):
        return [data]
    if all(isinstance(v, list) and len(v) == 3 and all(map(_is_scalar, v)) for v in data):
        return [data]
    return data


def _openpose_stem(path: Path) -> str:
    return path.stem.removesuffix("_keypoints")


def _coco_poses(data: Any, out: _Collector, requested: tuple[int, int] | None) -> int:
    """COCO JSON (a dict with `annotations`) or a bare list; returns how many entries were skipped.

    Annotations are checked against their image's size (from `images`) when it is known.
    """
    if isinstance(data, list):
        for i, entry in enumerate(_bare_coco_entries(data)):
            out.add(str(i), entry, _from_coco)
        return 0
    images = {
        img.get("id"): (img.get("height"), img.get("width"))
        for img in data.get("images") or []
        if isinstance(img, dict)
    }
    annotations = data.get("annotations")
    if not isinstance(annotations, list):
        raise out.error("COCO JSON 'annotations' must be a list")
    skipped = 0
    frames: list[tuple[int, int] | None] = []
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "keypoints" not in ann:
            raise out.error(f"annotation {i} has no 'keypoints'")
        try:
            labelled = np.asarray(ann["keypoints"], dtype=np.float32).reshape(-1, 3)[:, 2]
        except (TypeError, ValueError):
            labelled = None  # malformed: out.add reports it
        if labelled is not None and bool(np.all(labelled == 0)):
            skipped += 1  # COCO lists people with no labelled keypoint (num_keypoints = 0)
            continue
        h, w = images.get(ann.get("image_id"), (None, None))
        frame = _frame(h, w)
        frames.append(frame)
        out.add(str(ann.get("id", i)), ann["keypoints"], _from_coco, frame=frame)
    known = set(frames) - {None}
    if known and None in frames:
        raise out.error("some annotations refer to images of unknown size")
    if len(known) == 1:
        out.frame = frames[0]
    elif len(known) > 1:
        if requested is None:
            sizes = ", ".join(f"{h}x{w}" for h, w in sorted(f for f in known if f is not None))
            raise out.error(f"poses refer to images of different sizes ({sizes}); give a frame")
        out.poses = [
            (pid, rescale_rcv(rcv, frame, requested))
            for (pid, rcv), frame in zip(out.poses, frames, strict=True)
            if frame is not None
        ]
        out.frame = requested
    return skipped


def _csv_poses(text: str, out: _Collector) -> None:
    lines = text.splitlines()
    if not lines or lines[0].strip() != CSV_HEADER:
        raise out.error(f"first line must be {CSV_HEADER!r}")
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            name, rcv = parse_keypoints_csv_line(line)
        except (ValueError, TypeError) as exc:
            raise out.error(f"line {lineno}: {exc}") from None
        out.add(name, rcv)


def _read_text(path: Path, label: str) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise PoseFileError(f"{label}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PoseFileError(f"{label}: cannot read ({exc})") from None


def _parse_json(text: str, label: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PoseFileError(
            f"{label}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None


def load_pose_file(
    path: str | Path, height: int | None = None, width: int | None = None
) -> PoseSet:
    """Read and validate every pose of a pose file (any format of the module docstring).

    `height`/`width` is the frame the caller wants the poses in. Poses are checked against the frame
    the file declares (ours; COCO images with sizes) or else against `height`×`width`. When both are
    known and differ, poses are rescaled to `height`×`width`.
    """
    source = Path(path)
    label = source.name or str(source)
    if (height is None) != (width is None):
        raise PoseFileError(f"{label}: give both height and width, or neither")
    requested = (height, width) if height is not None and width is not None else None
    if requested is not None and min(requested) <= 0:
        raise PoseFileError(f"{label}: frame must be positive, got {height}x{width}")
    out = _Collector(label, requested)
    skipped = 0
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() == ".json")
        if not files:
            raise PoseFileError(f"{label}: folder holds no .json files")
        for file in files:
            out.label = f"{label}/{file.name}"
            data = _parse_json(_read_text(file, out.label), out.label)
            _openpose_poses(data, _openpose_stem(file), out)
        out.label, fmt = label, "openpose"
    else:
        text = _read_text(source, label)
        if source.suffix.lower() == ".csv" or text.lstrip().startswith(CSV_HEADER):
            _csv_poses(text, out)
            fmt = "csv"
        else:
            data = _parse_json(text, label)
            declared = data.get("format") if isinstance(data, dict) else None
            if isinstance(declared, str):
                if declared != POSE_FORMAT:
                    raise out.error(f"unsupported format {declared!r} (expected {POSE_FORMAT!r})")
                _load_ours(data, out)
                fmt = "dpig"
            elif isinstance(data, dict) and "people" in data:
                _openpose_poses(data, _openpose_stem(source), out)
                fmt = "openpose"
            elif isinstance(data, list) or (isinstance(data, dict) and "annotations" in data):
                skipped = _coco_poses(data, out, requested)
                fmt = "coco"
            else:
                raise out.error(
                    f"unrecognised pose file: expected {POSE_FORMAT!r}, OpenPose ('people'), "
                    "COCO ('annotations' or a list of 17×3 keypoints) or a keypoints CSV"
                )
    if not out.poses:
        raise out.error("holds no poses")
    frame = out.frame
    height_, width_ = frame if frame is not None else (None, None)
    poses = PoseSet(out.poses, height_, width_, format=fmt, skipped=skipped)
    if requested is not None and frame is not None and frame != requested:
        return poses.rescaled(*requested)
    return poses


# --------------------------------------------------------------------------------------------------
# Writing


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else round(float(value), 3)


def write_pose_file(
    path: str | Path, poses: Iterable[tuple[str, FloatArray]], height: int, width: int
) -> None:
    """Write poses in our format, one pose per line; they are validated as `load_pose_file` does."""
    out = _Collector(Path(path).name, (height, width))
    if not (_positive_int(height) and _positive_int(width)):
        raise PoseFileError(f"{out.label}: frame must be positive integers, got {height}x{width}")
    for pid, rcv in poses:
        out.add(pid, rcv)
    if not out.poses:
        raise out.error("no poses to write")
    lines = [
        json.dumps({"id": pid, "rcv": [[_number(v) for v in row] for row in rcv.tolist()]})
        for pid, rcv in out.poses
    ]
    body = ",\n    ".join(lines)
    text = (
        f'{{"format": "{POSE_FORMAT}", "height": {height}, "width": {width}, "poses": [\n'
        f"    {body}\n]}}\n"
    )
    Path(path).write_text(text)


# --------------------------------------------------------------------------------------------------
# Export from a dataset


def export_poses(
    records: Sequence[PersonRecord],
    *,
    root: Path,
    limit: int | None = None,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
) -> PoseSet:
    """Real poses of `records` (those with keypoints) as a PoseSet, ids = paths relative to `root`,
    sorted by id. `limit` picks that many at random (`seed`), deterministically. The frame is the
    images' common size, or `height`×`width` (every pose rescaled from its own image size)."""
    candidates = sorted((r for r in records if r.rcv is not None), key=lambda r: r.path)
    if limit is not None and limit < len(candidates):
        candidates = sorted(random.Random(seed).sample(candidates, limit), key=lambda r: r.path)
    if not candidates:
        raise PoseFileError("no images with keypoints to export")
    rows: list[tuple[str, FloatArray, tuple[int, int]]] = []
    for record in candidates:
        size = image_size(record.path)
        if size is None or record.rcv is None:
            continue  # unreadable header: check_images reports it
        path = record.path
        pid = (path.relative_to(root) if path.is_relative_to(root) else path).as_posix()
        rows.append((pid, record.rcv, size))
    if not rows:
        raise PoseFileError("no readable images with keypoints to export")
    if height is not None and width is not None:
        poses = [(pid, rescale_rcv(rcv, size, (height, width))) for pid, rcv, size in rows]
        return PoseSet(sorted(poses, key=lambda p: p[0]), height, width, "dpig")
    sizes = Counter(size for _, _, size in rows)
    if len(sizes) > 1:
        listed = ", ".join(f"{h}x{w} ({n})" for (h, w), n in sorted(sizes.items()))
        raise PoseFileError(
            f"images have different sizes: {listed}; give height and width to rescale the poses"
        )
    (h, w) = next(iter(sizes))
    return PoseSet(sorted(((p, r) for p, r, _ in rows), key=lambda p: p[0]), h, w, "dpig")
