"""Streaming dataset writers: generated people → a COCO keypoints dataset, a Market-1501 folder, or
plain image folders. Each takes one item at a time and keeps O(1) items in memory (the COCO JSON
is assembled from two spooled part files at `close`), so a 10⁶-item job exports in bounded memory.

An item is its PNG bytes plus its metadata (the job's per-item JSON: `item`, `identity`,
`source`, `keypoints` as COCO-18 RCV in the image's pixels, `custom_id`, `labels`).
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import numpy as np
from PIL import Image

from dpig_core.pose import COCO17_OF_COCO18, CSV_HEADER, format_keypoints_csv_line

COCO_KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)  # fmt: skip
COCO_SKELETON = [
    [16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9],
    [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7],
]  # fmt: skip
BOX_MARGIN = 0.1  # a keypoint box grows by this fraction of its size on each side
MAX_MARKET_IDENTITY = 9999  # Market-1501 names start with 4 digits; 0000 is its junk identity
_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


class ExportError(ValueError):
    """The items cannot be written in this format (one line for the user)."""


class DatasetWriter(Protocol):
    def add(self, png: bytes, meta: dict[str, Any]) -> None: ...
    def close(self) -> dict[str, Any]: ...


def _rcv(meta: dict[str, Any]) -> np.ndarray | None:
    kp = meta.get("keypoints")
    return None if kp is None else np.asarray(kp, np.float64).reshape(18, 3)


def coco17(rcv: np.ndarray) -> list[float]:
    """COCO-18 RCV [18, 3] → COCO's flat [x, y, v] × 17 (v = 2: labelled and visible)."""
    out = [0.0] * 51
    for slot, index in enumerate(COCO17_OF_COCO18):
        if index >= 0 and rcv[slot, 2] > 0:
            out[3 * index : 3 * index + 3] = [float(rcv[slot, 1]), float(rcv[slot, 0]), 2.0]
    return out


def keypoint_box(xyv: list[float], width: int, height: int) -> list[float] | None:
    """[x, y, w, h] around the visible keypoints, grown by BOX_MARGIN, clipped to the image."""
    points = np.asarray(xyv, np.float64).reshape(17, 3)
    seen = points[points[:, 2] > 0]
    if not len(seen):
        return None
    x0, y0 = seen[:, 0].min(), seen[:, 1].min()
    x1, y1 = seen[:, 0].max() + 1, seen[:, 1].max() + 1  # a keypoint fills its pixel
    mx, my = BOX_MARGIN * (x1 - x0), BOX_MARGIN * (y1 - y0)
    x0, y0 = max(0.0, x0 - mx), max(0.0, y0 - my)
    x1, y1 = min(float(width), x1 + mx), min(float(height), y1 + my)
    return [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]


def _key(meta: dict[str, Any]) -> str:
    return f"{int(meta['item']):010d}"


class CocoWriter:
    """`images/<key>.png` plus `annotations/person_keypoints.json` (COCO keypoints format: one
    person per image, category 1 "person", boxes from the keypoints)."""

    def __init__(self, out: Path, *, description: str = "dpig") -> None:
        self.out, self.description = out, description
        (out / "images").mkdir(parents=True, exist_ok=True)
        (out / "annotations").mkdir(exist_ok=True)
        self._images = (out / "annotations" / ".images.part").open("w")
        self._annotations = (out / "annotations" / ".annotations.part").open("w")
        self.images = self.annotations = 0

    def add(self, png: bytes, meta: dict[str, Any]) -> None:
        name = f"images/{_key(meta)}.png"
        (self.out / name).write_bytes(png)
        with Image.open(io.BytesIO(png)) as image:
            width, height = image.size
        image_id = int(meta["item"]) + 1  # COCO ids start at 1
        entry = {"id": image_id, "file_name": name, "width": width, "height": height}
        if meta.get("custom_id"):
            entry["custom_id"] = meta["custom_id"]
        self._images.write(("," if self.images else "") + json.dumps(entry))
        self.images += 1
        rcv = _rcv(meta)
        if rcv is None:
            return
        xyv = coco17(rcv)
        box = keypoint_box(xyv, width, height)
        if box is None:
            return
        annotation = {
            "id": image_id,
            "image_id": image_id,
            "category_id": 1,
            "keypoints": xyv,
            "num_keypoints": int(sum(v > 0 for v in xyv[2::3])),
            "bbox": box,
            "area": round(box[2] * box[3], 2),
            "iscrowd": 0,
        }
        self._annotations.write(("," if self.annotations else "") + json.dumps(annotation))
        self.annotations += 1

    def close(self) -> dict[str, Any]:
        self._images.close()
        self._annotations.close()
        category = {
            "id": 1, "name": "person", "supercategory": "person",
            "keypoints": list(COCO_KEYPOINTS), "skeleton": COCO_SKELETON,
        }  # fmt: skip
        target = self.out / "annotations" / "person_keypoints.json"
        parts = [Path(self._images.name), Path(self._annotations.name)]
        with target.open("w") as handle:
            handle.write(json.dumps({"description": self.description})[:-1])
            handle.write(', "categories": ' + json.dumps([category]) + ', "images": [')
            with parts[0].open() as part:
                shutil.copyfileobj(part, handle)
            handle.write('], "annotations": [')
            with parts[1].open() as part:
                shutil.copyfileobj(part, handle)
            handle.write("]}")
        for part_path in parts:
            part_path.unlink()
        return {"images": self.images, "annotations": self.annotations, "file": str(target)}


class MarketWriter:
    """A Market-1501 folder that `dpig_core.data.readers.read_market` reads back:
    `bounding_box_train/<pid:04d>_c1s1_<item:06d>_00.png` and `market-annotation-train.csv`
    (`name:keypoints_y:keypoints_x`, −1 = missing). The person id is the item's identity + 1 (a
    Virtual Market), else one id per distinct source image in order of first appearance, else
    one per item; ids stop at 9999 (Market names have four digits, 0000 is junk)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.folder = out / "bounding_box_train"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._csv = (out / "market-annotation-train.csv").open("w")
        self._csv.write(CSV_HEADER + "\n")
        self._by_source: dict[str, int] = {}  # at most MAX_MARKET_IDENTITY entries
        self.images = 0

    def _person(self, meta: dict[str, Any]) -> int:
        if meta.get("identity") is not None:
            pid = int(meta["identity"]) + 1
        elif meta.get("source") is not None:
            pid = self._by_source.setdefault(str(meta["source"]), len(self._by_source) + 1)
        else:
            pid = int(meta["item"]) + 1
        if pid > MAX_MARKET_IDENTITY:
            raise ExportError(
                f"market: person id {pid} exceeds {MAX_MARKET_IDENTITY} (Market-1501 names have "
                "four digits); export fewer identities, or use --format coco or files"
            )
        return pid

    def add(self, png: bytes, meta: dict[str, Any]) -> None:
        name = f"{self._person(meta):04d}_c1s1_{int(meta['item']):06d}_00.png"
        (self.folder / name).write_bytes(png)
        rcv = _rcv(meta)
        if rcv is not None:
            self._csv.write(format_keypoints_csv_line(name, rcv.astype(np.float32)) + "\n")
        self.images += 1

    def close(self) -> dict[str, Any]:
        self._csv.close()
        return {"images": self.images, "folder": str(self.folder)}


class FilesWriter:
    """Images in folders, one per identity (`0012/`), else per source image, else `all/`, and
    `labels.jsonl` with each image's path and metadata."""

    def __init__(self, out: Path) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self._labels = (out / "labels.jsonl").open("w")
        self.images = 0

    @staticmethod
    def _folder(meta: dict[str, Any]) -> str:
        if meta.get("identity") is not None:
            return f"{int(meta['identity']):04d}"
        if meta.get("source"):
            return _SAFE.sub("_", PurePosixPath(str(meta["source"])).stem)[:100] or "source"
        return "all"

    def add(self, png: bytes, meta: dict[str, Any]) -> None:
        path = f"{self._folder(meta)}/{_key(meta)}.png"
        (self.out / path).parent.mkdir(exist_ok=True)
        (self.out / path).write_bytes(png)
        self._labels.write(json.dumps({"path": path, **meta}, sort_keys=True) + "\n")
        self.images += 1

    def close(self) -> dict[str, Any]:
        self._labels.close()
        return {"images": self.images, "labels": str(self.out / "labels.jsonl")}


WRITERS = {"coco": CocoWriter, "market": MarketWriter, "files": FilesWriter}
