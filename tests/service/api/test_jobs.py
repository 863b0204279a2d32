"""Submit, look up, list and control jobs; tenants never see each other's jobs."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.db import JobState
from service.dispatch import finalize_ready
from service.jobs import Context

Headers = dict[str, str]
Spec = Callable[..., dict[str, Any]]


def submit(client: TestClient, auth: Headers, spec: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/jobs", headers=auth, json=spec)
    assert response.status_code == 201, response.text
    return dict(response.json())


def test_submit_get_list(client: TestClient, auth: Headers, sample_spec: Spec) -> None:
    response = client.post("/v1/jobs", headers=auth, json=sample_spec(seed=7))
    assert response.status_code == 201, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["state"] == "queued" and job["kind"] == "sample" and job["model"] == "default"
    assert job["total_items"] == 4 and job["done_items"] == 0 and job["running_items"] == 0
    assert job["spec"] is None  # the spec only in the full view
    assert job["output_uri"].endswith(f"/jobs/{job['id']}/")

    fetched = client.get(f"/v1/jobs/{job['id']}", headers=auth)
    assert fetched.status_code == 200
    assert fetched.json() == job
    full = client.get(f"/v1/jobs/{job['id']}?view=full", headers=auth).json()
    assert full["spec"]["seed"] == 7 and full["spec"]["chunk_size"] == 2
    assert full == {**job, "spec": full["spec"]}

    second = submit(client, auth, sample_spec(count=2))
    listed = client.get("/v1/jobs", headers=auth).json()
    assert listed["count"] == 2
    assert [j["id"] for j in listed["data"]] == [second["id"], job["id"]]  # newest first
    assert client.get("/v1/jobs?limit=1", headers=auth).json()["count"] == 1
    queued = client.get("/v1/jobs?state=queued", headers=auth).json()
    assert queued["count"] == 2
    assert client.get("/v1/jobs?state=completed", headers=auth).json()["count"] == 0


def test_list_parameters_are_validated(client: TestClient, auth: Headers) -> None:
    for query, field in [("state=done", "state"), ("limit=0", "limit"), ("limit=x", "limit")]:
        response = client.get(f"/v1/jobs?{query}", headers=auth)
        assert response.status_code == 422, query
        assert response.json()["detail"].startswith(f"{field}: "), response.json()


@pytest.mark.parametrize("job_id", [str(uuid.uuid4()), "nope", "x" * 300, "%00"])
def test_unknown_job_is_404(client: TestClient, auth: Headers, job_id: str) -> None:
    for method, path in [
        ("GET", f"/v1/jobs/{job_id}"),
        ("GET", f"/v1/jobs/{job_id}/outputs"),
        ("GET", f"/v1/jobs/{job_id}/events"),
        ("POST", f"/v1/jobs/{job_id}:cancel"),
        ("POST", f"/v1/jobs/{job_id}:retry"),
    ]:
        response = client.request(method, path, headers=auth)
        assert response.status_code == 404, (method, path, response.text)
        assert "not found" in response.json()["detail"]


def test_tenant_isolation(
    client: TestClient, auth: Headers, other_auth: Headers, sample_spec: Spec
) -> None:
    job = submit(client, auth, sample_spec())
    mine = submit(client, other_auth, sample_spec())
    for method, path in [
        ("GET", f"/v1/jobs/{job['id']}"),
        ("GET", f"/v1/jobs/{job['id']}/outputs"),
        ("GET", f"/v1/jobs/{job['id']}/events"),
        ("POST", f"/v1/jobs/{job['id']}:cancel"),
        ("POST", f"/v1/jobs/{job['id']}:pause"),
        ("POST", f"/v1/jobs/{job['id']}:resume"),
        ("POST", f"/v1/jobs/{job['id']}:retry"),
    ]:
        response = client.request(method, path, headers=other_auth)
        assert response.status_code == 404, (method, path, response.text)
    listed = client.get("/v1/jobs", headers=other_auth).json()
    assert [j["id"] for j in listed["data"]] == [mine["id"]]
    # untouched by the other tenant's attempts
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth).json()["state"] == "queued"


def test_active_job_quota_counts_own_jobs_only(
    make_settings: Callable[..., Any], auth: Headers, other_auth: Headers, sample_spec: Spec
) -> None:
    from service.api import create_app

    alice, bob = auth, other_auth
    with TestClient(create_app(make_settings(max_active_jobs=1))) as client:
        submit(client, alice, sample_spec())
        submit(client, bob, sample_spec())  # alice's job does not count against bob
        refused = client.post("/v1/jobs", headers=alice, json=sample_spec())
        assert refused.status_code == 429
        assert refused.json()["detail"].startswith("quota: 1 active jobs")


def test_pause_resume_cancel(
    client: TestClient, ctx: Context, auth: Headers, sample_spec: Spec
) -> None:
    job_id = submit(client, auth, sample_spec())["id"]

    def act(action: str) -> Any:
        return client.post(f"/v1/jobs/{job_id}:{action}", headers=auth)

    paused = act("pause")
    assert paused.status_code == 200 and paused.json()["state"] == "paused"
    assert act("pause").status_code == 409
    assert act("retry").status_code == 409
    resumed = act("resume")
    assert resumed.status_code == 200 and resumed.json()["state"] == "queued"
    conflict = act("resume")
    assert conflict.status_code == 409
    assert conflict.json()["detail"] == "cannot resume a job that is queued"

    cancelled = act("cancel")
    assert cancelled.status_code == 200
    # the request only marks it, even with nothing running (issue 17, finding 2)
    assert cancelled.json()["state"] == "cancelling"
    assert act("cancel").json()["detail"] == "cannot cancel a job that is cancelling"
    assert finalize_ready(ctx) == 1  # the dispatcher's finaliser ends it
    for action in ("cancel", "pause", "resume", "retry"):
        response = act(action)
        assert response.status_code == 409, action
        assert response.json()["detail"] == f"cannot {action} a job that is cancelled"


def test_cancel_paused_job(client: TestClient, auth: Headers, sample_spec: Spec) -> None:
    job_id = submit(client, auth, sample_spec())["id"]
    assert client.post(f"/v1/jobs/{job_id}:pause", headers=auth).status_code == 200
    response = client.post(f"/v1/jobs/{job_id}:cancel", headers=auth)
    assert response.status_code == 200 and response.json()["state"] == "cancelling"


def test_unknown_action_is_not_routed(client: TestClient, auth: Headers, sample_spec: Spec) -> None:
    job_id = submit(client, auth, sample_spec())["id"]
    response = client.post(f"/v1/jobs/{job_id}:explode", headers=auth)
    assert response.status_code in (404, 405)
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).json()["state"] == JobState.QUEUED


def test_models(client: TestClient, auth: Headers) -> None:
    response = client.get("/v1/models", headers=auth)
    assert response.status_code == 200
    body = response.json()
    assert body["count"] == len(body["data"]) >= 1
    default = body["data"][0]
    assert default["name"] == "default" and len(default["weights_sha256"]) == 64
    assert "path" not in default  # server paths are not shown to tenants


def test_list_pages_with_a_cursor_and_leaves_specs_out(
    client: TestClient, auth: Headers, sample_spec: Spec
) -> None:
    made = [submit(client, auth, sample_spec(seed=k))["id"] for k in range(5)]
    seen, cursor, pages = [], None, 0
    while True:
        query = "/v1/jobs?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(query, headers=auth).json()
        assert all(job["spec"] is None for job in page["data"])
        seen += [job["id"] for job in page["data"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == made[::-1]  # newest first, each once
    bad = client.get("/v1/jobs?cursor=garbage", headers=auth)
    assert bad.status_code == 422 and bad.json()["detail"].startswith("cursor: ")
