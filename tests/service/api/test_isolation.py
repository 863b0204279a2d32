"""Tenant isolation over HTTP, on PostgreSQL and a real S3 server (SeaweedFS): tenant alice
against bob's jobs, outputs and sources. Every route and every field that names an object answers
404 or 422 with nothing written, or sees only alice's own data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.settings import Settings
from tests.service.conftest import S3Server

Headers = dict[str, str]
Written = Callable[[], tuple[int, list[str]]]
PNG = b"\x89PNG\r\n\x1a\n-not-decoded-at-submit"


def _keypoints() -> list[list[float]]:
    return [[10.0 + k, 10.0, 1.0] for k in range(18)]


def _ref(uri: str) -> dict[str, Any]:
    return {"uri": uri, "keypoints": _keypoints()}


def _grid(images: str) -> dict[str, Any]:
    pose = {"keypoints": _keypoints(), "height": 128, "width": 64}
    return {"kind": "pose_grid", "images": images, "poses": [pose]}


# every spec field that names an object, as a body builder taking one URI
FIELDS: dict[str, Callable[[str, str], dict[str, Any]]] = {
    "images": lambda u, _ok: _grid(u),
    "swap.fg": lambda u, ok: {"kind": "swap", "items": [{"fg": _ref(u), "pose": _ref(ok)}]},
    "swap.bg": lambda u, ok: {
        "kind": "swap",
        "items": [{"fg": _ref(ok), "bg": _ref(u), "pose": _ref(ok)}],
    },
    "swap.pose": lambda u, ok: {"kind": "swap", "items": [{"fg": _ref(ok), "pose": _ref(u)}]},
    "interpolate.a": lambda u, ok: {
        "kind": "interpolate",
        "pairs": [{"a": _ref(u), "b": _ref(ok)}],
    },
    "interpolate.b": lambda u, ok: {
        "kind": "interpolate",
        "pairs": [{"a": _ref(ok), "b": _ref(u)}],
    },
    "sample.fg": lambda u, ok: {"kind": "sample", "count": 2, "fg": _ref(u)},
    "sample.bg": lambda u, ok: {"kind": "sample", "count": 2, "bg": _ref(u)},
    "sample.pose": lambda u, ok: {"kind": "sample", "count": 2, "pose": _ref(u)},
}


@pytest.fixture
def settings(
    make_settings: Callable[..., Settings], s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> Settings:
    """Outputs in s3://<bucket>/out; no global prefixes (the default), one prefix per tenant."""
    s3 = s3_server.settings(tmp_path / "home")
    return make_settings(
        # these grids list sources the tests do not annotate: workers with the `pose` extra
        pose_estimator_installed=True,
        storage_url=f"s3://{s3_bucket}/out",
        s3_endpoint_url=s3.s3_endpoint_url,
        s3_region=s3.s3_region,
        aws_access_key_id=s3.aws_access_key_id,
        aws_secret_access_key=s3.aws_secret_access_key,
        tenants={
            "alice": {"source_prefixes": [f"s3://{s3_bucket}/alice"]},
            "bob": {"source_prefixes": [f"s3://{s3_bucket}/bob"]},
        },
    )


@pytest.fixture
def world(
    client: TestClient, auth: Headers, other_auth: Headers, s3_server: S3Server, s3_bucket: str
) -> dict[str, str]:
    """Bob's finished-looking job with an image output, bob's and alice's sources, alice's job."""
    s3 = s3_server.client()
    bob_job = client.post("/v1/jobs", headers=other_auth, json={"kind": "sample", "count": 2})
    alice_job = client.post("/v1/jobs", headers=auth, json={"kind": "sample", "count": 2})
    assert bob_job.status_code == alice_job.status_code == 201
    bob_id, alice_id = bob_job.json()["id"], alice_job.json()["id"]
    for key in (
        f"out/jobs/{bob_id}/files/000000.png",
        f"out/jobs/{alice_id}/files/000000.png",
        "bob/secret.png",
        "alice/me.png",
    ):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=PNG)
    return {"bucket": s3_bucket, "bob": bob_id, "alice": alice_id}


def _uri(world: dict[str, str], template: str) -> str:
    return template.format(b=world["bucket"], bob=world["bob"], alice=world["alice"])


def _body(field: str, uri: str, bucket: str) -> dict[str, Any]:
    """A spec naming `uri` in `field` (other image fields name alice's own source)."""
    return FIELDS[field](uri, f"s3://{bucket}/alice/me.png")


FOREIGN = {
    "bob-output": "s3://{b}/out/jobs/{bob}/files/000000.png",
    "bob-job-folder": "s3://{b}/out/jobs/{bob}/",
    "all-jobs": "s3://{b}/out/jobs/",
    "output-store": "s3://{b}/out",
    "whole-bucket": "s3://{b}/",
    "bob-source": "s3://{b}/bob/secret.png",
    "bob-sources": "s3://{b}/bob/",
    "traversal": "s3://{b}/alice/../out/jobs/{bob}/",
}


@pytest.mark.parametrize("field", sorted(FIELDS))
@pytest.mark.parametrize("target", sorted(FOREIGN))
def test_foreign_objects_are_refused(
    client: TestClient,
    auth: Headers,
    world: dict[str, str],
    written: Written,
    field: str,
    target: str,
) -> None:
    before = written()
    uri = _uri(world, FOREIGN[target])
    response = client.post("/v1/jobs", headers=auth, json=_body(field, uri, world["bucket"]))
    assert response.status_code == 422, response.text
    assert written() == before


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_own_sources_and_own_outputs_are_accepted(
    client: TestClient, auth: Headers, world: dict[str, str], field: str
) -> None:
    for template in (
        "s3://{b}/alice/me.png" if field != "images" else "s3://{b}/alice/",
        "s3://{b}/out/jobs/{alice}/files/000000.png"
        if field != "images"
        else "s3://{b}/out/jobs/{alice}/",
    ):
        uri = _uri(world, template)
        response = client.post("/v1/jobs", headers=auth, json=_body(field, uri, world["bucket"]))
        assert response.status_code == 201, (template, response.text)


def test_own_outputs_grid_lists_only_that_job(
    client: TestClient, ctx: Any, auth: Headers, world: dict[str, str]
) -> None:
    uri = _uri(world, "s3://{b}/out/jobs/{alice}/")
    response = client.post("/v1/jobs", headers=auth, json=_grid(uri))
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    from service.jobs import read_sources

    assert read_sources(ctx, job_id) == ["files/000000.png"]


ROUTES = [
    ("get", "/v1/jobs/{bob}"),
    ("get", "/v1/jobs/{bob}?view=full"),
    ("get", "/v1/jobs/{bob}/outputs"),
    ("get", "/v1/jobs/{bob}/events"),
    ("post", "/v1/jobs/{bob}:cancel"),
    ("post", "/v1/jobs/{bob}:pause"),
    ("post", "/v1/jobs/{bob}:resume"),
    ("post", "/v1/jobs/{bob}:retry"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_foreign_job_routes_are_404(
    client: TestClient,
    auth: Headers,
    world: dict[str, str],
    written: Written,
    method: str,
    path: str,
) -> None:
    before = written()
    response = client.request(method, _uri(world, path), headers=auth)
    assert response.status_code == 404, response.text
    assert written() == before


def test_listing_shows_only_own_jobs(
    client: TestClient, auth: Headers, world: dict[str, str]
) -> None:
    listed = client.get("/v1/jobs", headers=auth).json()
    assert [job["id"] for job in listed["data"]] == [world["alice"]]


def test_listing_is_capped_and_stops_early(
    make_settings: Callable[..., Settings],
    s3_server: S3Server,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    from service.api import create_app
    from service.db import ApiKey
    from service.db.keys import new_api_key
    from service.jobs import read_sources, tenant_id

    s3 = s3_server.client()
    for k in range(6):
        s3.put_object(Bucket=s3_bucket, Key=f"alice/many/{k}.png", Body=PNG)
    for k in range(6):
        s3.put_object(Bucket=s3_bucket, Key=f"alice/noise/{k}.txt", Body=b"x")
    base = s3_server.settings(tmp_path / "home")
    settings = make_settings(
        pose_estimator_installed=True,
        storage_url=f"s3://{s3_bucket}/out",
        s3_endpoint_url=base.s3_endpoint_url,
        aws_access_key_id=base.aws_access_key_id,
        aws_secret_access_key=base.aws_secret_access_key,
        tenants={"alice": {"source_prefixes": [f"s3://{s3_bucket}/alice"]}},
        max_source_images=4,
        max_listed_objects=5,
    )
    with TestClient(create_app(settings)) as client:
        ctx = client.app.state.context  # type: ignore[attr-defined]
        clear, prefix, key_hash = new_api_key()
        with ctx.session() as session:
            session.add(ApiKey(tenant_id=tenant_id(ctx, "alice"), prefix=prefix, key_hash=key_hash))
        auth = {"Authorization": f"Bearer {clear}"}
        many = _grid(f"s3://{s3_bucket}/alice/many/")
        response = client.post("/v1/jobs", headers=auth, json=many)
        assert response.status_code == 422
        assert response.json()["detail"].startswith("images: more than 4 images under")
        noise = client.post("/v1/jobs", headers=auth, json=_grid(f"s3://{s3_bucket}/alice/noise/"))
        assert noise.status_code == 422
        assert "more than 5 objects under" in noise.json()["detail"]
        assert ctx.storage.list("jobs/") == []
        # max_sources: the listing stops after the first images
        first = client.post("/v1/jobs", headers=auth, json={**many, "max_sources": 2})
        assert first.status_code == 201, first.text
        assert read_sources(ctx, first.json()["id"]) == ["0.png", "1.png"]


def test_keys_that_uris_cannot_carry_are_refused_at_submit(
    client: TestClient,
    auth: Headers,
    world: dict[str, str],
    s3_server: S3Server,
    written: Written,
) -> None:
    s3_server.client().put_object(Bucket=world["bucket"], Key="alice/odd/x#1.png", Body=PNG)
    before = written()
    response = client.post("/v1/jobs", headers=auth, json=_grid(_uri(world, "s3://{b}/alice/odd/")))
    assert response.status_code == 422
    assert response.json()["detail"] == "images: 'x#1.png' has '#' or '?' in its name; rename it"
    assert written() == before
