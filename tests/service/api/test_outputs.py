"""Running a job (with the embedded runner, as a worker would) and reading it through the API:
outputs with presigned URLs (local folder and S3), server-sent progress, retry."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio
import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from service import jobs
from service.api import create_app
from service.db import ApiKey, utcnow
from service.db.keys import new_api_key
from service.dispatch import finalize_ready
from service.executor import PipelineCache
from service.jobs import Context
from service.runner import run_job
from service.settings import Settings

Headers = dict[str, str]
Spec = Callable[..., dict[str, Any]]

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def pipes() -> PipelineCache:
    """One pipeline cache for the module: the bundled model is loaded once."""
    return PipelineCache(batch_size=4)


def _submit(client: TestClient, auth: Headers, spec: dict[str, Any]) -> str:
    response = client.post("/v1/jobs", headers=auth, json=spec)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _events(text: str) -> list[tuple[str, Any]]:
    """(event name, parsed data) of each event in a text/event-stream body."""
    out = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            out.append((fields["event"], json.loads(fields["data"])))
    return out


def test_outputs_after_run(
    client: TestClient, ctx: Context, auth: Headers, sample_spec: Spec, pipes: PipelineCache
) -> None:
    job_id = _submit(client, auth, sample_spec())
    before = client.get(f"/v1/jobs/{job_id}/outputs", headers=auth).json()
    assert [o["key"] for o in before["data"]] == ["job.json"]  # written at submit

    assert run_job(ctx, job_id, pipes) == "completed"
    job = client.get(f"/v1/jobs/{job_id}", headers=auth).json()
    assert job["state"] == "completed"
    assert (job["done_items"], job["failed_items"], job["running_items"]) == (4, 0, 0)
    assert job["images_per_second"] > 0 and job["eta_seconds"] is None

    response = client.get(f"/v1/jobs/{job_id}/outputs?expires_in=60", headers=auth)
    assert response.status_code == 200
    body = response.json()
    keys = {o["key"] for o in body["data"]}
    assert body["count"] == len(keys) and body["expires_in"] == 60
    assert {"job.json", "manifest.parquet", "manifest.jsonl", "_SUCCESS"} <= keys
    untagged = {re.sub(r"-[0-9a-f]+\.", ".", key) for key in keys}  # the attempt's tag
    assert {"shards/000000.tar", "shards/000001.tar", "shards/000000.done.json"} <= untagged
    for item in body["data"]:
        path = Path(unquote(urlsplit(item["url"]).path))
        assert item["url"].startswith("file://") and path.is_file()
    manifest = json.loads(ctx.storage.get_bytes(f"jobs/{job_id}/job.json"))
    assert manifest["job_id"] == job_id and manifest["total_items"] == 4

    conflict = client.post(f"/v1/jobs/{job_id}:retry", headers=auth)
    assert conflict.status_code == 409
    assert conflict.json()["detail"] == "the job has no failed items to retry"
    assert client.post(f"/v1/jobs/{job_id}:cancel", headers=auth).status_code == 409

    # a finished job's stream is one event, then it ends
    stream = client.get(f"/v1/jobs/{job_id}/events", headers=auth)
    assert stream.status_code == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.text.startswith("retry: ")
    events = _events(stream.text)
    assert [(name, data["state"]) for name, data in events] == [("progress", "completed")]


def test_events_follow_a_running_job(
    client: TestClient, ctx: Context, auth: Headers, sample_spec: Spec, pipes: PipelineCache
) -> None:
    job_id = _submit(client, auth, sample_spec(count=8))
    failures: list[BaseException] = []

    def work() -> None:
        try:
            time.sleep(1.0)  # the stream sees the job queued first
            run_job(ctx, job_id, pipes)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failures.append(exc)
            jobs.cancel(ctx, jobs.job_row(ctx, job_id).tenant_id, job_id)  # end the stream
            jobs.maybe_finalize(ctx, job_id)

    worker = threading.Thread(target=work)
    worker.start()
    try:
        stream = client.get(f"/v1/jobs/{job_id}/events", headers=auth)
    finally:
        worker.join()
    assert not failures
    events = _events(stream.text)
    states = [data["state"] for _, data in events]
    assert {name for name, _ in events} == {"progress"}
    assert states[0] == "queued" and states[-1] == "completed"
    assert states.count("completed") == 1
    done = [data["done_items"] for _, data in events]
    assert done == sorted(done) and done[-1] == 8
    assert len({json.dumps(data, sort_keys=True) for _, data in events}) == len(events)


def test_events_end_on_cancel(
    client: TestClient, ctx: Context, auth: Headers, sample_spec: Spec
) -> None:
    job_id = _submit(client, auth, sample_spec())

    def cancel_then_finalise() -> None:
        client.post(f"/v1/jobs/{job_id}:cancel", headers=auth)
        time.sleep(1.0)  # the request only marks the job: the stream shows it cancelling
        finalize_ready(ctx)  # what the dispatcher's finaliser does next

    timer = threading.Timer(1.0, cancel_then_finalise)
    timer.start()
    stream = client.get(f"/v1/jobs/{job_id}/events", headers=auth)
    timer.join()
    states = [data["state"] for _, data in _events(stream.text)]
    assert states[0] == "queued" and states[-1] == "cancelled"
    assert set(states) <= {"queued", "cancelling", "cancelled"}


def test_events_end_when_the_key_is_revoked(
    client: TestClient, ctx: Context, auth: Headers, sample_spec: Spec
) -> None:
    job_id = _submit(client, auth, sample_spec())
    answer: dict[str, str] = {}
    reader = threading.Thread(
        target=lambda: answer.update(
            text=client.get(f"/v1/jobs/{job_id}/events", headers=auth).text
        )
    )
    reader.start()
    time.sleep(1.0)
    with ctx.session() as session:
        session.execute(update(ApiKey).values(revoked_at=utcnow()))
    reader.join(timeout=10)
    ended = not reader.is_alive()
    if not ended:  # end the stream for the old code, then report
        jobs.cancel(ctx, jobs.job_row(ctx, job_id).tenant_id, job_id)
        jobs.maybe_finalize(ctx, job_id)
        reader.join(timeout=10)
    assert ended, "the stream outlived its key"
    events = _events(answer["text"])
    assert events[0][0] == "progress" and events[0][1]["spec"] is None
    assert events[-1] == ("error", {"detail": "API key revoked"})


def test_event_streams_are_capped_per_tenant(
    make_settings: Callable[..., Settings], sample_spec: Spec
) -> None:
    with TestClient(create_app(make_settings(max_event_streams_per_tenant=1))) as client:
        ctx: Context = client.app.state.context  # type: ignore[attr-defined]
        keys = {}
        for name in ("alice", "bob"):
            clear, prefix, key_hash = new_api_key()
            with ctx.session() as session:
                tid = jobs.tenant_id(ctx, name)
                session.add(ApiKey(tenant_id=tid, prefix=prefix, key_hash=key_hash))
            keys[name] = {"Authorization": f"Bearer {clear}"}
        alice_job = _submit(client, keys["alice"], sample_spec())
        bob_job = _submit(client, keys["bob"], sample_spec())
        reader = threading.Thread(
            target=lambda: client.get(f"/v1/jobs/{alice_job}/events", headers=keys["alice"])
        )
        reader.start()
        time.sleep(1.0)
        try:
            second = client.get(f"/v1/jobs/{alice_job}/events", headers=keys["alice"])
            assert second.status_code == 429, second.text
            assert second.json()["detail"].startswith("events: 1 event streams are already open")
            # another tenant's streams are counted apart; a finished job's stream is one event
            client.post(f"/v1/jobs/{bob_job}:cancel", headers=keys["bob"])
            jobs.maybe_finalize(ctx, bob_job)  # the dispatcher's finaliser
            bobs = client.get(f"/v1/jobs/{bob_job}/events", headers=keys["bob"])
            assert bobs.status_code == 200
        finally:
            client.post(f"/v1/jobs/{alice_job}:cancel", headers=keys["alice"])
            jobs.maybe_finalize(ctx, alice_job)
            reader.join(timeout=10)
        # the slot is given back when the stream ends
        again = client.get(f"/v1/jobs/{alice_job}/events", headers=keys["alice"])
        assert again.status_code == 200


@pytest.fixture
def s3_client_app(
    s3_server: Any, s3_bucket: str, clean_database: str, tmp_path: Path
) -> Iterator[TestClient]:
    settings: Settings = s3_server.settings(
        tmp_path / "home", database_url=clean_database, storage_url=f"s3://{s3_bucket}/out"
    )
    with TestClient(create_app(settings)) as client:
        yield client


def test_s3_outputs_are_presigned(
    s3_client_app: TestClient, s3_server: Any, sample_spec: Spec, pipes: PipelineCache
) -> None:
    client = s3_client_app
    ctx: Context = client.app.state.context  # type: ignore[attr-defined]
    tid = jobs.tenant_id(ctx, "alice")
    clear, prefix, key_hash = new_api_key()
    with ctx.session() as session:
        session.add(ApiKey(tenant_id=tid, prefix=prefix, key_hash=key_hash))
    auth = {"Authorization": f"Bearer {clear}"}

    assert client.get("/readyz").status_code == 200
    job_id = _submit(client, auth, sample_spec())
    assert run_job(ctx, job_id, pipes) == "completed"
    body = client.get(f"/v1/jobs/{job_id}/outputs", headers=auth).json()
    by_key = {o["key"]: o["url"] for o in body["data"]}
    (tar_key,) = [k for k in by_key if k.startswith("shards/000000-") and k.endswith(".tar")]
    assert "_SUCCESS" in by_key
    url = by_key["job.json"]
    assert url.startswith(s3_server.endpoint_url) and "X-Amz-Signature=" in url
    fetched = httpx.get(url, timeout=10)
    assert fetched.status_code == 200
    assert json.loads(fetched.content)["job_id"] == job_id
    tar = httpx.get(by_key[tar_key], timeout=10)
    assert tar.status_code == 200 and tar.content == ctx.storage.get_bytes(
        f"jobs/{job_id}/{tar_key}"
    )
    # the signature is checked: no signature, or another key, is refused
    assert httpx.get(url.split("?")[0], timeout=10).status_code == 403
    other = url.replace("job.json", "_SUCCESS")
    assert httpx.get(other, timeout=10).status_code == 403
    # pages: every object once, in pages of at most `limit`
    keys, cursor = [], None
    while True:
        query = f"/v1/jobs/{job_id}/outputs?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(query, headers=auth).json()
        assert page["count"] <= 2
        keys += [o["key"] for o in page["data"]]
        if (cursor := page["next_cursor"]) is None:
            break
    assert sorted(keys) == sorted(by_key)


def test_outputs_are_paged_and_url_lifetime_capped(
    client: TestClient, ctx: Context, auth: Headers, sample_spec: Spec
) -> None:
    job_id = _submit(client, auth, sample_spec())
    for k in range(5):
        ctx.storage.put_bytes(f"jobs/{job_id}/shards/{k:06d}.tar", b"t")
    first = client.get(f"/v1/jobs/{job_id}/outputs?limit=4", headers=auth).json()
    assert [o["key"] for o in first["data"]] == [
        "job.json",
        "shards/000000.tar",
        "shards/000001.tar",
        "shards/000002.tar",
    ]
    rest = client.get(
        f"/v1/jobs/{job_id}/outputs?limit=4&cursor={first['next_cursor']}", headers=auth
    ).json()
    assert [o["key"] for o in rest["data"]] == ["shards/000003.tar", "shards/000004.tar"]
    assert rest["next_cursor"] is None
    week = client.get(f"/v1/jobs/{job_id}/outputs?expires_in=604800", headers=auth)
    assert week.status_code == 422
    assert week.json()["detail"] == "expires_in: 604800 s exceeds the limit of 86400 s"


def test_a_stream_dropped_before_its_first_byte_gives_its_slot_back(
    make_settings: Callable[..., Settings], sample_spec: Spec
) -> None:
    with TestClient(create_app(make_settings(max_event_streams_per_tenant=1))) as client:
        ctx: Context = client.app.state.context  # type: ignore[attr-defined]
        clear, prefix, key_hash = new_api_key()
        with ctx.session() as session:
            session.add(
                ApiKey(tenant_id=jobs.tenant_id(ctx, "alice"), prefix=prefix, key_hash=key_hash)
            )
        auth = {"Authorization": f"Bearer {clear}"}
        job_id = _submit(client, auth, sample_spec())
        path, bearer = f"/v1/jobs/{job_id}/events", f"Bearer {clear}".encode()

        async def dropped() -> None:
            """The client is gone before the response starts: the body is never iterated."""

            async def receive() -> dict[str, Any]:
                return {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    await anyio.sleep(5)  # the disconnect is noticed first

            scope = {
                "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
                "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
                "server": ("testserver", 80),
                "headers": [(b"host", b"testserver"), (b"authorization", bearer)],
            }  # fmt: skip
            with anyio.fail_after(10):
                await client.app(scope, receive, send)

        client.portal.call(dropped)  # type: ignore[union-attr]
        client.post(f"/v1/jobs/{job_id}:cancel", headers=auth)
        jobs.maybe_finalize(ctx, job_id)  # the dispatcher's finaliser
        again = client.get(path, headers=auth)  # a finished job's stream: one event, then the end
        assert again.status_code == 200, again.text
