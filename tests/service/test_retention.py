"""Job expiry and output retention (service/retention.py) on the embedded default (SQLite + a
local folder) with the bundled model; the clock is passed in, not waited for."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from service import metrics
from service.executor import PipelineCache, execute_chunk
from service.jobs import (
    Context,
    claim_chunk,
    get_job,
    job_prefix,
    open_context,
    release_chunk,
    submit,
    tenant_id,
)
from service.retention import delete_due, expire_due
from service.runner import run_job
from service.settings import Settings
from service.specs import parse_spec

pytestmark = pytest.mark.usefixtures("single_thread_torch")


@pytest.fixture(scope="module")
def pipes() -> PipelineCache:
    return PipelineCache(batch_size=4)


@pytest.fixture
def ctx(tmp_path: Path) -> Context:
    return open_context(Settings.from_values(home=tmp_path / "home"), embedded=True)


def out(ctx: Context, job_id: str) -> Path:
    return Path(ctx.storage.root_url.removeprefix("file://")) / job_prefix(job_id)


def test_an_expired_job_keeps_its_shards_in_a_valid_manifest(
    ctx: Context, pipes: PipelineCache
) -> None:
    import webdataset as wds

    tenant = tenant_id(ctx)
    spec = {"kind": "sample", "count": 8, "chunk_size": 2, "expires_after": 600}
    job = submit(ctx, tenant, parse_spec(spec))
    assert job.expires_at is not None and job.retain_days is None
    deadline = job.expires_at
    assert timedelta(seconds=599) < deadline - job.created_at <= timedelta(seconds=601)

    first = claim_chunk(ctx, "worker-a", job_id=job.id)
    assert first is not None and execute_chunk(ctx, first, pipes).state == "committed"
    running = claim_chunk(ctx, "worker-b", job_id=job.id)  # leased when the deadline passes
    assert running is not None

    before = metrics.JOBS_EXPIRED._value.get()
    assert expire_due(ctx, now=deadline - timedelta(seconds=1)) == 0
    assert expire_due(ctx, now=deadline) == 1
    assert metrics.JOBS_EXPIRED._value.get() == before + 1
    # the running chunk stops at its next micro-batch: the job waits for it
    assert get_job(ctx, tenant, job.id).state == "cancelling"
    release_chunk(ctx, running)  # what the executor does when told to stop
    assert run_job(ctx, job.id, pipes) == "expired"  # nothing more runs
    view = get_job(ctx, tenant, job.id)
    assert (view.state, view.done_items, view.failed_items) == ("expired", 2, 0)
    assert view.error == "expired: not finished before expires_at"

    folder = out(ctx, job.id)
    rows = pq.read_table(folder / "manifest.parquet").to_pylist()
    assert [(r["item"], r["status"]) for r in rows] == [(0, "ok"), (1, "ok")] + [
        (i, "expired") for i in range(2, 8)
    ]
    assert [r["key"] for r in rows] == [f"{i:010d}" for i in range(8)]
    assert len((folder / "manifest.jsonl").read_text().splitlines()) == 8
    assert json.loads((folder / "_EXPIRED").read_text()) == {
        "items": 8, "done": 2, "failed": 0, "expired": 6, "shards": ["shards/000000-1"]
    }  # fmt: skip
    assert (folder / "errors.jsonl").read_text() == ""
    assert not (folder / "_SUCCESS").exists() and not (folder / "_CANCELLED").exists()
    samples = list(
        wds.WebDataset(str(next((folder / "shards").glob("000000-*.tar"))), shardshuffle=False)
    )
    assert [s["__key__"] for s in samples] == [rows[0]["key"], rows[1]["key"]]
    assert expire_due(ctx, now=deadline + timedelta(days=1)) == 0  # finished: left alone


def test_finished_and_operator_default_jobs_do_not_expire(
    tmp_path: Path, pipes: PipelineCache
) -> None:
    ctx = open_context(
        Settings.from_values(home=tmp_path / "h", default_expires_after_s=3600), embedded=True
    )
    tenant = tenant_id(ctx)
    job = submit(ctx, tenant, parse_spec({"kind": "sample", "count": 2}))
    assert job.expires_at is not None
    assert timedelta(seconds=3599) < job.expires_at - job.created_at <= timedelta(seconds=3601)
    assert run_job(ctx, job.id, pipes) == "completed"
    assert expire_due(ctx, now=job.expires_at + timedelta(seconds=1)) == 0
    assert get_job(ctx, tenant, job.id).state == "completed"
    paused = submit(ctx, tenant, parse_spec({"kind": "sample", "count": 2, "expires_after": 60}))
    from service.jobs import pause

    pause(ctx, tenant, paused.id)
    assert paused.expires_at is not None
    assert expire_due(ctx, now=paused.expires_at) == 1  # paused jobs expire too
    assert get_job(ctx, tenant, paused.id).state == "expired"
    rows = pq.read_table(out(ctx, paused.id) / "manifest.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["expired", "expired"]


def test_retention_deletes_outputs_and_nothing_else(ctx: Context, pipes: PipelineCache) -> None:
    tenant = tenant_id(ctx)
    other = tenant_id(ctx, "other")
    short = submit(ctx, tenant, parse_spec({"kind": "sample", "count": 3, "retain_days": 1}))
    long = submit(ctx, tenant, parse_spec({"kind": "sample", "count": 3, "retain_days": 30}))
    kept = submit(ctx, tenant, parse_spec({"kind": "sample", "count": 3}))
    theirs = submit(ctx, other, parse_spec({"kind": "sample", "count": 3, "retain_days": 1}))
    running = submit(ctx, tenant, parse_spec({"kind": "sample", "count": 3, "retain_days": 1}))
    for job in (short, long, kept, theirs):
        assert run_job(ctx, job.id, pipes) == "completed"
    finished = get_job(ctx, tenant, short.id).finished_at
    assert finished is not None

    def snapshot() -> dict[str, bytes]:
        root = Path(ctx.storage.root_url.removeprefix("file://"))
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    before = snapshot()
    deleted_before = metrics.JOBS_DELETED._value.get()
    assert delete_due(ctx, now=finished + timedelta(hours=23)) == 0
    day = finished + timedelta(days=1, seconds=5)
    assert delete_due(ctx, now=day) == 2  # short and theirs
    assert metrics.JOBS_DELETED._value.get() == deleted_before + 2
    after = snapshot()
    gone = {k for k in before if k.startswith((job_prefix(short.id), job_prefix(theirs.id)))}
    assert gone and set(before) - set(after) == gone
    assert all(after[k] == before[k] for k in after)  # every other object untouched
    assert not any(k.startswith(job_prefix(running.id)) for k in gone)

    view = get_job(ctx, tenant, short.id)
    assert (view.state, view.deleted_at, view.done_items) == ("deleted", day, 3)
    assert get_job(ctx, other, theirs.id).state == "deleted"
    for job in (long, kept):
        assert get_job(ctx, tenant, job.id).state == "completed"
    assert get_job(ctx, tenant, running.id).state == "queued"  # unfinished: never deleted
    assert delete_due(ctx, now=day + timedelta(days=100)) == 1  # long, at last; once
    assert get_job(ctx, tenant, kept.id).state == "completed"  # no retain_days: kept forever
