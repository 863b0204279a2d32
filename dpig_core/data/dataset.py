"""Person records → model-ready tensors (image, pose, limb mask, ROI boxes)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from dpig_core.config import DPIGConfig
from dpig_core.data.records import PersonRecord
from dpig_core.pose import FloatArray, PoseError, as_rcv, limb_mask, roi_boxes

log = logging.getLogger(__name__)

Sample = dict[str, torch.Tensor]


def image_to_tensor(pixels: np.ndarray[Any, Any]) -> torch.Tensor:
    """uint8 [H, W, 3] → float [3, H, W] in [−1, 1] (pixel / 127.5 − 1)."""
    return torch.from_numpy(np.array(pixels, copy=True)).permute(2, 0, 1).float() / 127.5 - 1


def load_person(
    path: Any, rcv: FloatArray, height: int, width: int
) -> tuple[np.ndarray[Any, np.dtype[np.uint8]], FloatArray]:
    """Read an image, resize it to height×width if needed, and rescale its keypoints to match."""
    with Image.open(path) as opened:
        img = opened.convert("RGB")
    src_w, src_h = img.size
    if (src_h, src_w) != (height, width):
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(img, dtype=np.uint8)
    rcv = rcv.copy()
    rcv[:, 0] *= height / src_h
    rcv[:, 1] *= width / src_w
    return pixels, as_rcv(rcv, height, width)


def conditioning(rcv: FloatArray, config: DPIGConfig) -> Sample:
    """Everything derived from a pose: the limb mask [1, H, W] and the 7 ROI boxes and flags."""
    h, w = config.height, config.width
    boxes, vis = roi_boxes(rcv, h, w, config.roi_padding)
    mask = limb_mask(rcv, h, w, config.mask_radius)
    return {
        "rcv": torch.from_numpy(rcv),
        "mask": torch.from_numpy(mask).float()[None],
        "boxes": torch.from_numpy(boxes).float(),
        "vis": torch.from_numpy(vis).float(),
    }


@dataclass
class SkipCounts:
    no_keypoints: int = 0
    bad_keypoints: int = 0
    unreadable: int = 0

    @property
    def total(self) -> int:
        return self.no_keypoints + self.bad_keypoints + self.unreadable


class PersonDataset(Dataset[Sample | None]):
    """Records with keypoints → {"image", "rcv", "mask", "boxes", "vis", "index"}.

    Records without usable keypoints are dropped up front (counted in `skipped`, with a warning).
    An image that cannot be decoded yields None: `collate_skipping` drops it and the trainer counts
    it, so one corrupt file neither stops training nor is trained on. With `cache`, decoded samples
    are kept in memory (small images, single-process loading).
    """

    def __init__(
        self, records: Sequence[PersonRecord], config: DPIGConfig, *, cache: bool = False
    ) -> None:
        self.config = config
        self.skipped = SkipCounts()
        kept = []
        for record in records:
            if record.rcv is None:
                self.skipped.no_keypoints += 1
                continue
            try:
                as_rcv(record.rcv)
            except PoseError:
                self.skipped.bad_keypoints += 1
                continue
            kept.append(record)
        self.records = kept
        self._cache: dict[int, Sample] | None = {} if cache else None
        if self.skipped.total:
            log.warning(
                "skipped %d of %d records (%d without keypoints, %d with bad keypoints)",
                self.skipped.total, len(records), self.skipped.no_keypoints,
                self.skipped.bad_keypoints,
            )  # fmt: skip
        if not self.records:
            raise ValueError("no usable records: every item lacks keypoints or has bad keypoints")

    def __len__(self) -> int:
        return len(self.records)

    def pose_of(self, index: int) -> FloatArray | None:
        """The record's pose in the model's frame (reads only the image header for its size);
        None when the image cannot be opened or the pose falls outside it."""
        record = self.records[index]
        assert record.rcv is not None
        try:
            with Image.open(record.path) as img:
                src_w, src_h = img.size
            rcv = record.rcv.copy()
            rcv[:, 0] *= self.config.height / src_h
            rcv[:, 1] *= self.config.width / src_w
            return as_rcv(rcv, self.config.height, self.config.width)
        except (OSError, UnidentifiedImageError, PoseError) as exc:
            log.warning("skipping the pose of %s: %s", record.path, exc)
            return None

    def __getitem__(self, index: int) -> Sample | None:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        record = self.records[index]
        assert record.rcv is not None
        try:
            pixels, rcv = load_person(
                record.path, record.rcv, self.config.height, self.config.width
            )
        except (OSError, UnidentifiedImageError, PoseError, ValueError) as exc:
            log.warning("skipping %s: %s", record.path, exc)
            return None
        sample = {"image": image_to_tensor(pixels), **conditioning(rcv, self.config)}
        sample["index"] = torch.tensor(index)
        if self._cache is not None:
            self._cache[index] = sample
        return sample


def in_order_batches(dataset: PersonDataset, batch_size: int) -> Iterator[Sample]:
    """The readable items of `dataset` in index order, `batch_size` at a time (for encoding and
    evaluation; training draws shuffled batches instead)."""
    for start in range(0, len(dataset), batch_size):
        batch = collate_skipping(
            [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        )
        batch.pop("skipped")
        if batch:
            yield batch


def collate_skipping(items: Sequence[Sample | None]) -> Sample:
    """Stack the good items; `skipped` says how many of the batch were dropped."""
    good = [item for item in items if item is not None]
    skipped = torch.tensor(len(items) - len(good))
    if not good:
        return {"skipped": skipped}
    batch = {key: torch.stack([item[key] for item in good]) for key in good[0]}
    batch["skipped"] = skipped
    return batch
