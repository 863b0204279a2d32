"""DESIGN §6 over HTTP: every bad input gets a 4xx JSON error naming the field and the problem,
and nothing is written (no job row, no storage object)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.settings import Settings

Headers = dict[str, str]
Written = Callable[[], tuple[int, list[str]]]


def _keypoints(n: int = 18, *, row: float = 10.0, col: float = 10.0) -> list[list[float]]:
    return [[row + k, col, 1.0] for k in range(n)]


def _pose(**values: Any) -> dict[str, Any]:
    return {"keypoints": _keypoints(), "height": 128, "width": 64, **values}


def _grid(**values: Any) -> dict[str, Any]:
    return {"kind": "pose_grid", "images": "s3://photos/people/", "poses": [_pose()], **values}


def _ref(uri: str = "s3://photos/a.jpg") -> dict[str, Any]:
    return {"uri": uri, "keypoints": _keypoints()}


def _ref_at(point: list[float]) -> dict[str, Any]:
    return {"uri": "s3://photos/a.jpg", "keypoints": _with_point(point)}


def _swap(**item: Any) -> dict[str, Any]:
    return {"kind": "swap", "items": [{"fg": _ref(), "pose": _ref(), **item}]}


def _with_point(point: list[float], k: int = 3) -> list[list[float]]:
    points = _keypoints()
    points[k] = point
    return points


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    """Sources may come from s3://photos only; S3 itself is unreachable (fails fast if asked)."""
    return make_settings(
        allowed_source_prefixes=["s3://photos"],
        s3_endpoint_url="http://127.0.0.1:9",
        s3_max_attempts=1,
    )


# (id, body, status, what the one-line message must contain)
CASES: list[tuple[str, Any, int, list[str]]] = [
    ("pose-17-keypoints", _grid(poses=[_pose(keypoints=_keypoints(17))]), 422,
     ["poses.0.keypoints", "expected 18 keypoints", "got 17"]),
    ("pose-keypoint-2-values", _grid(poses=[_pose(keypoints=_with_point([1.0, 2.0]))]), 422,
     ["poses.0.keypoints", "keypoint 3 must be (row, col, visibility)"]),
    ("swap-fg-19-keypoints", _swap(fg={"uri": "s3://photos/a.jpg", "keypoints": _keypoints(19)}),
     422, ["items.0.fg.keypoints", "expected 18 keypoints"]),
    ("pose-out-of-frame-row", _grid(poses=[_pose(keypoints=_with_point([500.0, 1.0, 1.0]))]), 422,
     ["poses.0", "keypoint 3", "outside the 128x64 frame"]),
    ("pose-out-of-frame-col", _grid(poses=[_pose(keypoints=_with_point([1.0, 64.0, 1.0]))]), 422,
     ["poses.0", "outside the 128x64 frame"]),
    ("ref-keypoint-1e39", _swap(fg=_ref_at([1e39, 5.0, 1.0])), 422,
     ["items.0.fg.keypoints", "keypoint 3 lies outside any accepted image frame"]),
    ("grid-source-keypoint-huge",
     _grid(source_keypoints={"a.jpg": _with_point([5.0, 70000.0, 1.0])}), 422,
     ["source_keypoints", "a.jpg: keypoint 3 lies outside any accepted image frame"]),
    ("pose-negative", _grid(poses=[_pose(keypoints=_with_point([-1.0, 5.0, 1.0]))]), 422,
     ["poses.0.keypoints", "outside the image"]),
    ("pose-zero-height", _grid(poses=[_pose(height=0)]), 422, ["poses.0.height", "greater than"]),
    ("no-poses", _grid(poses=[]), 422, ["poses", "at least 1"]),
    ("unknown-model", {"kind": "sample", "count": 4, "model": "nope"}, 422,
     ["model", "unknown model 'nope'"]),
    ("zero-count", {"kind": "sample", "count": 0}, 422, ["count", "greater than or equal to 1"]),
    ("negative-count", {"kind": "sample", "count": -5}, 422, ["count"]),
    ("absurd-count", {"kind": "sample", "count": 10**12}, 422,
     ["total_items", "1000000000000 items exceed the quota of 10000000"]),
    ("absurd-identities", {"kind": "sample", "identities": 10**6, "per_identity": 10**6}, 422,
     ["total_items", "exceed the quota"]),
    ("count-and-identities", {"kind": "sample", "count": 2, "identities": 2, "per_identity": 2},
     422, ["give either count, or identities and per_identity"]),
    ("count-not-int", {"kind": "sample", "count": "many"}, 422, ["count", "valid integer"]),
    ("chunk-size-zero", {"kind": "sample", "count": 4, "chunk_size": 0}, 422, ["chunk_size"]),
    ("unknown-field", {"kind": "sample", "count": 4, "colour": "red"}, 422,
     ["colour", "Extra inputs are not permitted"]),
    ("unknown-kind", {"kind": "teleport", "count": 4}, 422, ["kind", "teleport"]),
    ("no-kind", {"count": 4}, 422, ["kind"]),
    ("not-an-object", [1, 2, 3], 422, ["valid dictionary or object"]),
    ("http-images", _grid(images="http://example.com/people/"), 422,
     ["images", "scheme 'http'", "no URL fetching"]),
    ("https-images", _grid(images="https://169.254.169.254/latest/"), 422,
     ["images", "scheme 'https'"]),
    ("other-bucket-images", _grid(images="s3://someone-elses-bucket/photos/"), 422,
     ["images", "outside the allowed source prefixes"]),
    ("local-images", _grid(images="/etc/"), 422, ["images", "outside the allowed source prefixes"]),
    ("escape-images", _grid(images="s3://photos/../secrets/"), 422, ["images"]),
    ("http-swap-uri", _swap(pose=_ref("http://example.com/p.jpg")), 422,
     ["items.0.pose.uri", "scheme 'http'"]),
    ("other-bucket-fg", {"kind": "sample", "count": 2, "bg": _ref("s3://elsewhere/b.jpg")}, 422,
     ["bg.uri", "outside the allowed source prefixes"]),
    ("interpolate-file-uri", {"kind": "interpolate", "pairs": [{"a": _ref("file:///etc/passwd"),
     "b": _ref()}]}, 422, ["pairs.0.a.uri", "outside the allowed source prefixes"]),
    ("nul-in-pose-id", _grid(poses=[_pose(id="a\x00b")]), 422, ["poses.0.id", "NUL"]),
    ("custom-id-space", _swap(custom_id="a b"), 422, ["items.0.custom_id", "pattern"]),
    ("custom-id-65", _swap(custom_id="x" * 65), 422, ["items.0.custom_id", "at most 64"]),
    ("custom-id-empty", _swap(custom_id=""), 422, ["items.0.custom_id", "at least 1"]),
    ("custom-id-twice-swap",
     {"kind": "swap", "items": [{"fg": _ref(), "pose": _ref(), "custom_id": "p-1"}] * 2}, 422,
     ["items", "custom_id 'p-1' is given twice (at 0 and 1)"]),
    ("custom-id-twice-interpolate",
     {"kind": "interpolate", "pairs": [{"a": _ref(), "b": _ref(), "custom_id": "q"}] * 2}, 422,
     ["pairs", "custom_id 'q' is given twice"]),
    ("custom-id-twice-grid", _grid(source_custom_ids={"a.jpg": "s", "b.jpg": "s"}), 422,
     ["source_custom_ids", "custom_id 's' is given twice"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "status", "needles"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_spec(
    client: TestClient,
    auth: Headers,
    written: Written,
    body: Any,
    status: int,
    needles: list[str],
) -> None:
    response = client.post("/v1/jobs", headers=auth, json=body)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    for needle in needles:
        assert needle in detail, (needle, detail)
    assert written() == (0, [])


@pytest.mark.parametrize(
    ("raw", "needles"),
    [
        (b'{"kind": "sample", "count": 4', ["body: malformed JSON", "character"]),
        (b"{'kind': 'sample'}", ["body: malformed JSON"]),
        (b"", ["body: Field required"]),
        (b"null", ["body: Input should be a valid dictionary"]),
        (b"\xff\xfe garbage", ["body: malformed JSON"]),
    ],
    ids=["truncated", "single-quotes", "empty", "null", "not-utf8"],
)
def test_malformed_json(
    client: TestClient, auth: Headers, written: Written, raw: bytes, needles: list[str]
) -> None:
    headers = {**auth, "Content-Type": "application/json"}
    response = client.post("/v1/jobs", headers=headers, content=raw)
    assert response.status_code in (400, 422), response.text
    detail = response.json()["detail"]
    for needle in needles:
        assert needle in detail, (needle, detail)
    assert written() == (0, [])


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_coordinates(
    client: TestClient, auth: Headers, written: Written, literal: str
) -> None:
    points = json.dumps(_keypoints()).replace("[13.0, 10.0, 1.0]", f"[13.0, {literal}, 1.0]")
    raw = (
        '{"kind": "pose_grid", "images": "s3://photos/p/", '
        f'"poses": [{{"keypoints": {points}, "height": 128, "width": 64}}]}}'
    )
    assert literal in raw
    response = client.post(
        "/v1/jobs", headers={**auth, "Content-Type": "application/json"}, content=raw
    )
    assert response.status_code == 422, response.text
    body = response.json()
    assert "poses.0.keypoints" in body["detail"] and "keypoint 3 is not finite" in body["detail"]
    assert body["errors"][0]["loc"] == ["body", "pose_grid", "poses", 0, "keypoints"]
    assert written() == (0, [])


def test_wrong_content_type(client: TestClient, auth: Headers, written: Written) -> None:
    response = client.post(
        "/v1/jobs",
        headers={**auth, "Content-Type": "text/plain"},
        content=b'{"kind": "sample", "count": 4}',
    )
    assert response.status_code == 422
    assert written() == (0, [])


def test_structured_errors(client: TestClient, auth: Headers) -> None:
    response = client.post(
        "/v1/jobs", headers=auth, json={"kind": "sample", "count": 0, "seed": -1}
    )
    assert response.status_code == 422
    body = response.json()
    parts = sorted(body["detail"].split("; "))
    assert [p.split(":")[0] for p in parts] == ["count", "seed"]
    assert sorted(e["loc"] for e in body["errors"]) == [
        ["body", "sample", "count"],
        ["body", "sample", "seed"],
    ]
    assert all(e["type"] == "greater_than_equal" and e["msg"] for e in body["errors"])


def test_allowed_image_uris_are_accepted(client: TestClient, auth: Headers) -> None:
    swap = _swap(bg=_ref("s3://photos/sub/bg.png"))
    response = client.post("/v1/jobs", headers=auth, json=swap)
    assert response.status_code == 201, response.text
    assert response.json()["total_items"] == 1
