"""What every dataset reader returns: one record per person image, plus the problems it found."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dpig_core.pose import FloatArray


@dataclass(frozen=True)
class PersonRecord:
    """One person image. `rcv` is the (18, 3) COCO-18 pose in pixels of the stored image, or None
    when the dataset has no keypoints for it (to be estimated or skipped)."""

    path: Path
    identity: str
    split: str
    camera: int | None = None
    rcv: FloatArray | None = None

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class Problem:
    """Something wrong with one item (or the whole dataset when `path` is None)."""

    kind: str  # e.g. "missing_keypoints", "unreadable_image", "bad_keypoints", "junk_identity"
    message: str
    path: Path | None = None


@dataclass
class DatasetIndex:
    """A dataset as read: its usable records (sorted by path) and everything that was skipped."""

    root: Path
    format: str
    records: list[PersonRecord] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def split(self, name: str) -> list[PersonRecord]:
        return [r for r in self.records if r.split == name]

    def with_keypoints(self) -> list[PersonRecord]:
        return [r for r in self.records if r.rcv is not None]
