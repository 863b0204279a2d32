"""Job specifications: one pydantic model per job kind, discriminated by `kind` (DESIGN §3).

A spec is everything needed to reproduce a job's pixels: with the model's weights hash and the
frozen list of source images written at submit, item i always maps to the same inputs and noise.
Validation errors name the field (pydantic's `loc`) and the problem.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

NUM_KEYPOINTS = 18
# No accepted format has a side this long (JPEG's limit); a point beyond it is in no image's frame.
MAX_IMAGE_SIDE = 65_535
Layout = Literal["webdataset", "files"]
QueueName = Literal["interactive", "bulk"]
ImageFormatName = Literal["png", "webp", "jpeg"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_keypoints(value: list[list[float]]) -> list[list[float]]:
    """18 rows of (row, col, visibility), finite, non-negative coordinates."""
    if len(value) != NUM_KEYPOINTS:
        raise ValueError(f"expected {NUM_KEYPOINTS} keypoints (COCO-18), got {len(value)}")
    for k, point in enumerate(value):
        if len(point) != 3:
            raise ValueError(
                f"keypoint {k} must be (row, col, visibility), got {len(point)} values"
            )
        if not all(math.isfinite(v) for v in point):
            raise ValueError(f"keypoint {k} is not finite: {point}")
        if point[2] > 0 and (point[0] < 0 or point[1] < 0):
            raise ValueError(f"keypoint {k} lies outside the image: {point[:2]}")
        if point[2] > 0 and max(point[0], point[1]) >= MAX_IMAGE_SIDE:
            raise ValueError(
                f"keypoint {k} lies outside any accepted image frame (sides below "
                f"{MAX_IMAGE_SIDE} pixels): {point[:2]}"
            )
    return value


Keypoints = Annotated[list[list[float]], Field(description="18 × (row, col, visible), pixels")]
CustomId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Caller-chosen id (1–64 of A–Z a–z 0–9 _ -), unique within the job; it "
        "appears in the manifest, the shard metadata and errors.jsonl.",
    ),
]


def check_unique_ids(ids: list[str | None]) -> None:
    """Refuse a custom_id given twice within one job."""
    seen: dict[str, int] = {}
    for index, value in enumerate(ids):
        if value is None:
            continue
        if value in seen:
            raise ValueError(
                f"custom_id {value!r} is given twice (at {seen[value]} and {index}); "
                "custom ids must be unique within a job"
            )
        seen[value] = index


class ImageRef(_Strict):
    """One person image: a URI (s3://bucket/key, or a local path in embedded mode) and, where
    known, its COCO-18 keypoints in the image's own pixels. Without keypoints they are estimated
    (needs the `pose` extra); an image where that fails fails its item only."""

    uri: str = Field(min_length=1, max_length=2048)
    keypoints: Keypoints | None = None

    @field_validator("keypoints")
    @classmethod
    def _check(cls, value: list[list[float]] | None) -> list[list[float]] | None:
        return None if value is None else check_keypoints(value)


class Pose(_Strict):
    """A target pose: 18 keypoints in a `height`×`width` frame (rescaled to the model's frame)."""

    id: str = Field(default="", max_length=200)
    keypoints: Keypoints
    height: int = Field(gt=0, le=10_000)
    width: int = Field(gt=0, le=10_000)

    @field_validator("keypoints")
    @classmethod
    def _check(cls, value: list[list[float]]) -> list[list[float]]:
        return check_keypoints(value)

    @model_validator(mode="after")
    def _in_frame(self) -> Pose:
        points = np.asarray(self.keypoints)
        out = (points[:, 2] > 0) & ((points[:, 0] >= self.height) | (points[:, 1] >= self.width))
        for k in np.flatnonzero(out):
            r, c = self.keypoints[k][:2]
            raise ValueError(
                f"keypoint {k} ({r}, {c}) lies outside the {self.height}x{self.width} frame"
            )
        return self


class OutputFormat(_Strict):
    """How each image is compressed: `png` (lossless; `compress_level` 0–9, default 6), `webp`
    (`lossless`, or lossy at `quality` 1–100, default 90) or `jpeg` (`quality` 1–100, default 90).
    An option of another format is refused rather than ignored."""

    format: ImageFormatName = "png"
    compress_level: int | None = Field(default=None, ge=0, le=9)
    quality: int | None = Field(default=None, ge=1, le=100)
    lossless: bool | None = None

    @model_validator(mode="after")
    def _options_fit_the_format(self) -> OutputFormat:
        if self.compress_level is not None and self.format != "png":
            raise ValueError(f"compress_level applies to png only, not {self.format}")
        if self.lossless is not None and self.format != "webp":
            raise ValueError(f"lossless applies to webp only, not {self.format}")
        if self.quality is not None and self.format == "png":
            raise ValueError("quality applies to webp and jpeg; png takes compress_level")
        if self.quality is not None and self.lossless:
            raise ValueError("quality applies to lossy webp; lossless webp takes none")
        return self

    @property
    def extension(self) -> str:
        """The file extension (WebDataset decodes by it): png, webp or jpg."""
        return "jpg" if self.format == "jpeg" else self.format

    @property
    def content_type(self) -> str:
        return f"image/{self.format}"


class _Common(_Strict):
    model: str = Field(
        default="default",
        min_length=1,
        max_length=200,
        description="Registered model name; 'default' is the bundled model.",
    )
    seed: int = Field(default=0, ge=0, lt=2**63)
    chunk_size: int | None = Field(default=None, ge=1, le=100_000)
    layout: Layout = "webdataset"
    output: OutputFormat = Field(default_factory=OutputFormat)
    queue: QueueName = "bulk"
    priority: int = Field(default=0, ge=-100, le=100)
    expires_after: int | None = Field(
        default=None,
        ge=60,
        le=366 * 86_400,
        description="Seconds from submit: a job not finished by then becomes `expired` "
        "(default: the operator's DPIG_DEFAULT_EXPIRES_AFTER_S; unset: never).",
    )
    callback_url: str | None = Field(
        default=None,
        min_length=1,
        max_length=2048,
        description="Called (POST, signed) on every terminal state; its host must be on the "
        "operator's allow-list (service.webhooks).",
    )
    retain_days: int | None = Field(
        default=None,
        ge=1,
        le=36_500,
        description="Days a finished job's outputs are kept before they are deleted "
        "(default: the operator's DPIG_DEFAULT_RETAIN_DAYS; unset: forever).",
    )


FactorChoice = Literal["sample"] | ImageRef


class SampleSpec(_Common):
    """`count` new people, or `identities` × `per_identity` (one foreground per identity: the
    Virtual Market). Each factor is sampled through Φ or fixed from a reference image."""

    kind: Literal["sample"] = "sample"
    count: int | None = Field(default=None, ge=1)
    identities: int | None = Field(default=None, ge=1)
    per_identity: int | None = Field(default=None, ge=1)
    fg: FactorChoice = "sample"
    bg: FactorChoice = "sample"
    pose: FactorChoice = "sample"

    @model_validator(mode="after")
    def _one_shape(self) -> SampleSpec:
        vm = self.identities is not None or self.per_identity is not None
        if vm and (self.identities is None or self.per_identity is None):
            raise ValueError("identities and per_identity go together")
        if (self.count is None) == (not vm):
            raise ValueError("give either count, or identities and per_identity")
        if vm and self.fg != "sample":
            raise ValueError("fg: a Virtual Market samples one foreground per identity")
        return self

    @property
    def total(self) -> int:
        if self.count is not None:
            return self.count
        assert self.identities is not None and self.per_identity is not None
        return self.identities * self.per_identity


class PoseGridSpec(_Common):
    """Every source image × every target pose; item i = (source, pose) = divmod(i, len(poses)).
    Source keypoints: `source_keypoints` (file name → keypoints), else estimated."""

    kind: Literal["pose_grid"] = "pose_grid"
    images: str = Field(
        min_length=1,
        max_length=2048,
        description="s3://bucket/prefix/ or, in embedded mode, a local folder",
    )
    poses: list[Pose] = Field(min_length=1, max_length=100_000)
    source_keypoints: dict[str, Keypoints] | None = None
    source_custom_ids: dict[str, CustomId] | None = Field(
        default=None, description="Source key → custom_id (every item of that source carries it)."
    )
    max_sources: int | None = Field(default=None, ge=1)

    @field_validator("source_custom_ids")
    @classmethod
    def _unique_sources(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        check_unique_ids(list((value or {}).values()))
        return value

    @field_validator("source_keypoints")
    @classmethod
    def _check_sources(cls, value: dict[str, list[list[float]]] | None) -> Any:
        for name, kp in (value or {}).items():
            try:
                check_keypoints(kp)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return value


class SwapItem(_Strict):
    fg: ImageRef
    bg: ImageRef | None = None
    pose: ImageRef
    custom_id: CustomId | None = None


class SwapSpec(_Common):
    """Recombine factors: item i takes its foreground, background and pose from three images."""

    kind: Literal["swap"] = "swap"
    items: list[SwapItem] = Field(min_length=1, max_length=10_000)

    @field_validator("items")
    @classmethod
    def _unique(cls, value: list[SwapItem]) -> list[SwapItem]:
        check_unique_ids([item.custom_id for item in value])
        return value


class InterpolatePair(_Strict):
    a: ImageRef
    b: ImageRef
    custom_id: CustomId | None = None


class InterpolateSpec(_Common):
    """`steps` images from a to b per pair; item i = (pair, step) = divmod(i, steps)."""

    kind: Literal["interpolate"] = "interpolate"
    pairs: list[InterpolatePair] = Field(min_length=1, max_length=10_000)
    steps: int = Field(default=8, ge=2, le=1000)
    method: Literal["linear", "slerp", "inverse"] = "linear"
    factors: list[Literal["fg", "bg", "pose"]] = Field(default=["fg", "bg", "pose"], min_length=1)

    @field_validator("pairs")
    @classmethod
    def _unique(cls, value: list[InterpolatePair]) -> list[InterpolatePair]:
        check_unique_ids([pair.custom_id for pair in value])
        return value


JobSpec = Annotated[
    SampleSpec | PoseGridSpec | SwapSpec | InterpolateSpec, Field(discriminator="kind")
]
JOB_SPEC: TypeAdapter[JobSpec] = TypeAdapter(JobSpec)
KINDS = ("sample", "pose_grid", "swap", "interpolate")


def parse_spec(data: Any) -> JobSpec:
    """Validate a spec from JSON-like data (raises pydantic.ValidationError)."""
    return JOB_SPEC.validate_python(data)


def spec_json(spec: JobSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json")


def canonical_json(data: dict[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def spec_sha256(spec: JobSpec | dict[str, Any]) -> str:
    data = spec if isinstance(spec, dict) else spec_json(spec)
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


def describe_errors(exc: Any) -> str:
    """pydantic errors → 'field.path: message; ...' (one line, for the CLI and API)."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in KINDS) or "spec"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)
