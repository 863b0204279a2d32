"""Per-item labels (docs/jobs.md, "Labels"): what each generated image shows and where it came
from, so a job's outputs are a dataset one can train on directly.

Every item's metadata (its `<key>.json` in the shard, and its manifest row) may carry:
- `keypoints`: the COCO-18 pose the person was drawn in, RCV (row, col, visible) in the generated
  image's pixels; for `sample` the pose decoder's output, for `pose_grid` the target pose rescaled
  to the model's frame, for `swap` the pose image's keypoints; none for `interpolate`;
- `labels`: what the kind knows about the item (see the functions below);
- `custom_id`: the caller's id of the swap item, interpolate pair or pose-grid source.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from dpig_core.pipeline import item_seed


def keypoints(rcv: Any) -> list[list[float]]:
    """[18, 3] tensor, array or nested list → JSON-ready rows, coordinates to 1/100 pixel."""
    rows = rcv.tolist() if hasattr(rcv, "tolist") else rcv
    return [[round(float(r), 2), round(float(c), 2), float(v > 0)] for r, c, v in rows]


def sample(
    spec: Any, item: int, rcv: Any, sampled: Iterable[str], fixed: Mapping[str, str]
) -> dict[str, Any]:
    """A sampled person: the seed of each sampled factor's z (`dpig_core.pipeline.item_seed`; the
    foreground of a Virtual Market is seeded by its identity) and the image each fixed factor
    came from."""
    z_seeds = {}
    for factor in sampled:
        key = item // spec.per_identity if factor == "fg" and spec.per_identity else item
        z_seeds[factor] = item_seed(spec.seed, key, factor)
    return {"keypoints": keypoints(rcv), "labels": {"z_seeds": z_seeds, "fixed": dict(fixed)}}


def pose_grid(
    source_keypoints: list[list[float]] | None, rcv: Any, custom_id: str | None
) -> dict[str, Any]:
    """A source in a target pose (the item's `source` key and `pose` id name both): the source's
    keypoints in its own pixels (null when they were estimated); the target's are `keypoints`."""
    return {
        "keypoints": keypoints(rcv),
        "labels": {"source_keypoints": source_keypoints},
        "custom_id": custom_id,
    }


def swap(row: Any, rcv: Any | None) -> dict[str, Any]:
    """A recombination: the image that gave each factor."""
    inputs = {"fg": row.fg.uri, "bg": row.bg.uri if row.bg else None, "pose": row.pose.uri}
    return {
        "keypoints": None if rcv is None else keypoints(rcv),
        "labels": inputs,
        "custom_id": row.custom_id,
    }


def interpolate(spec: Any, pair: int, step: int) -> dict[str, Any]:
    """A point on the path from a to b: the step (0 is a, steps − 1 is b) and the method."""
    return {
        "keypoints": None,
        "labels": {
            "a": spec.pairs[pair].a.uri,
            "b": spec.pairs[pair].b.uri,
            "step": step,
            "steps": spec.steps,
            "t": step / (spec.steps - 1),
            "method": spec.method,
            "factors": list(spec.factors),
        },
        "custom_id": spec.pairs[pair].custom_id,
    }
