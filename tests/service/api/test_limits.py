"""Request body limits and per-tenant quotas: refused before anything is written."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from service.db import Job, Tenant
from service.dispatch import finalize_ready
from service.jobs import Context
from service.settings import Settings

Headers = dict[str, str]
Spec = Callable[..., dict[str, Any]]
Written = Callable[[], tuple[int, list[str]]]
LIMIT = 2000


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(max_body_bytes=LIMIT, max_items_per_job=100, max_active_jobs=2)


def _big_spec(size: int) -> bytes:
    body = {"kind": "sample", "count": 4, "model": "default" + " " * size}
    return json.dumps(body).encode()


def test_declared_length_over_limit_is_413(
    client: TestClient, auth: Headers, written: Written
) -> None:
    raw = _big_spec(LIMIT)
    assert len(raw) > LIMIT
    headers = {**auth, "Content-Type": "application/json"}
    response = client.post("/v1/jobs", headers=headers, content=raw)
    assert response.status_code == 413
    assert response.json()["detail"] == f"body: request body exceeds the limit of {LIMIT} bytes"
    assert written() == (0, [])


def test_streamed_body_over_limit_is_413(
    client: TestClient, auth: Headers, written: Written
) -> None:
    raw = _big_spec(3 * LIMIT)

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        for start in range(0, len(raw), 500):
            yield raw[start : start + 500]

    headers = {**auth, "Content-Type": "application/json"}
    response = client.post("/v1/jobs", headers=headers, content=chunks())
    assert response.status_code == 413, response.text
    assert "exceeds the limit" in response.json()["detail"]
    assert written() == (0, [])


def test_body_at_limit_is_accepted(client: TestClient, auth: Headers, sample_spec: Spec) -> None:
    raw = json.dumps(sample_spec(), indent=1).encode()
    raw = raw[:-1] + b" " * (LIMIT - len(raw)) + b"}"
    assert len(raw) == LIMIT
    headers = {**auth, "Content-Type": "application/json"}
    assert client.post("/v1/jobs", headers=headers, content=raw).status_code == 201


def test_bad_content_length_is_400(client: TestClient, auth: Headers) -> None:
    headers = {**auth, "Content-Type": "application/json", "Content-Length": "lots"}
    response = client.post("/v1/jobs", headers=headers, content=b"{}")
    assert response.status_code == 400
    assert response.json()["detail"].startswith("Content-Length")


def test_items_per_job_quota(
    client: TestClient, auth: Headers, written: Written, sample_spec: Spec
) -> None:
    response = client.post("/v1/jobs", headers=auth, json=sample_spec(count=101))
    assert response.status_code == 422
    assert response.json()["detail"] == "total_items: 101 items exceed the quota of 100"
    assert written() == (0, [])
    assert client.post("/v1/jobs", headers=auth, json=sample_spec(count=100)).status_code == 201


def test_tenant_quota_overrides_settings(
    client: TestClient, ctx: Context, auth: Headers, written: Written, sample_spec: Spec
) -> None:
    with ctx.session() as session:
        session.execute(update(Tenant).values(max_items_per_job=3, max_active_jobs=5))
    response = client.post("/v1/jobs", headers=auth, json=sample_spec(count=4))
    assert response.status_code == 422
    assert "quota of 3" in response.json()["detail"]
    assert written() == (0, [])
    for _ in range(3):  # the tenant's own limit of 5 active jobs, not the settings' 2
        assert client.post("/v1/jobs", headers=auth, json=sample_spec(count=3)).status_code == 201


def test_active_jobs_quota(
    client: TestClient, ctx: Context, auth: Headers, written: Written, sample_spec: Spec
) -> None:
    first = client.post("/v1/jobs", headers=auth, json=sample_spec()).json()
    client.post("/v1/jobs", headers=auth, json=sample_spec())
    before = written()
    response = client.post("/v1/jobs", headers=auth, json=sample_spec())
    assert response.status_code == 429
    assert response.json()["detail"] == "quota: 2 active jobs, the limit is 2"
    assert written() == before
    # a finished (cancelled) job no longer counts
    assert client.post(f"/v1/jobs/{first['id']}:cancel", headers=auth).status_code == 200
    assert finalize_ready(ctx) == 1  # the dispatcher's finaliser
    assert client.post("/v1/jobs", headers=auth, json=sample_spec()).status_code == 201


def test_quota_of_zero_means_zero(
    client: TestClient, ctx: Context, auth: Headers, written: Written, sample_spec: Spec
) -> None:
    with ctx.session() as session:
        session.execute(update(Tenant).values(max_active_jobs=0))
    response = client.post("/v1/jobs", headers=auth, json=sample_spec())
    assert response.status_code == 429, response.text
    assert response.json()["detail"] == "quota: 0 active jobs, the limit is 0"
    assert written() == (0, [])


def test_active_jobs_quota_is_atomic(
    client: TestClient, ctx: Context, auth: Headers, sample_spec: Spec
) -> None:
    """A concurrent submit holds the tenant's row and has inserted its job, not yet committed:
    this submit must wait for it and then count it, instead of both passing the check."""
    with ctx.session() as session:
        session.execute(update(Tenant).values(max_active_jobs=1))
        tenant = session.scalar(select(Tenant.id).where(Tenant.name == "alice"))
    other = ctx.sessions()
    other.begin()
    other.execute(select(Tenant.id).where(Tenant.id == tenant).with_for_update())
    other.add(
        Job(
            tenant_id=tenant,
            kind="sample",
            spec={},
            spec_sha256="0" * 64,
            model_name="default",
            weights_sha256="0" * 64,
            seed=0,
            total_items=1,
            chunk_size=1,
        )
    )
    other.flush()
    answer: dict[str, int] = {}
    thread = threading.Thread(
        target=lambda: answer.update(
            status=client.post("/v1/jobs", headers=auth, json=sample_spec()).status_code
        )
    )
    thread.start()
    thread.join(timeout=1.5)
    assert thread.is_alive(), f"the submit did not wait for the tenant lock: {answer}"
    other.commit()
    other.close()
    thread.join(timeout=30)
    assert answer == {"status": 429}
    with ctx.session() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 1


@pytest.mark.parametrize(
    ("values", "detail"),
    [
        ({"queue": "interactive"}, "queue: 'interactive' is not allowed for this tenant"),
        ({"priority": 1}, "priority: 1 exceeds this tenant's maximum of 0"),
        ({"chunk_size": 5000, "count": 5000}, "chunk_size: 5000 exceeds the limit of 4096"),
    ],
)
def test_queue_priority_and_chunk_size_limits(
    client: TestClient,
    auth: Headers,
    written: Written,
    sample_spec: Spec,
    values: dict[str, Any],
    detail: str,
) -> None:
    response = client.post("/v1/jobs", headers=auth, json=sample_spec(**values))
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith(detail)
    assert written() == (0, [])


def test_operator_grants_queue_and_priority_per_tenant(
    make_settings: Callable[..., Settings], sample_spec: Spec
) -> None:
    from service.api import create_app

    granted = {"alice": {"max_priority": 10, "queues": ["bulk", "interactive"]}}
    with TestClient(create_app(make_settings(tenants=granted))) as client:
        alice = {"Authorization": f"Bearer {_key(client, 'alice')}"}
        bob = {"Authorization": f"Bearer {_key(client, 'bob')}"}
        spec = sample_spec(queue="interactive", priority=10)
        assert client.post("/v1/jobs", headers=alice, json=spec).status_code == 201
        assert client.post("/v1/jobs", headers=bob, json=spec).status_code == 422
        too_high = sample_spec(priority=11)
        assert client.post("/v1/jobs", headers=alice, json=too_high).status_code == 422


def _key(client: TestClient, tenant: str) -> str:
    from service.db import ApiKey
    from service.db.keys import new_api_key
    from service.jobs import tenant_id

    ctx: Context = client.app.state.context  # type: ignore[attr-defined]
    clear, prefix, key_hash = new_api_key()
    with ctx.session() as session:
        session.add(ApiKey(tenant_id=tenant_id(ctx, tenant), prefix=prefix, key_hash=key_hash))
    return clear


def test_quota_is_checked_before_sources_are_listed(
    make_settings: Callable[..., Settings], sample_spec: Spec
) -> None:
    """A tenant at its quota gets 429 at once: no listing of a (slow, huge) source prefix."""
    from service.api import create_app

    settings = make_settings(
        max_active_jobs=1,
        allowed_source_prefixes=["s3://photos"],
        s3_endpoint_url="http://127.0.0.1:9",
        s3_max_attempts=1,
    )
    pose = {"keypoints": [[10.0 + k, 10.0, 1.0] for k in range(18)], "height": 128, "width": 64}
    grid = {"kind": "pose_grid", "images": "s3://photos/people/", "poses": [pose]}
    with TestClient(create_app(settings)) as client:
        auth = {"Authorization": f"Bearer {_key(client, 'alice')}"}
        assert client.post("/v1/jobs", headers=auth, json=sample_spec()).status_code == 201
        response = client.post("/v1/jobs", headers=auth, json=grid)
        assert response.status_code == 429, response.text
