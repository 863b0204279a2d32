"""Dispatcher fixes found by the end-to-end drills (tests/e2e), each pinned here on SQLite:

- a cancelled or paused job's published-but-unstarted chunks held in-flight slots for ever, so
  one cancel could stop a whole queue;
- resuming a job waited for the lost-message delay before its chunks went out again;
- a failed chunk was published again at the next tick, so a dependency outage of a few seconds
  dead-lettered every chunk in flight (now: exponential backoff);
- a finalisation that failed (S3 down while the manifest was written) left the job `finalizing`
  for ever.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from service.db import Chunk, Job, utcnow
from service.dispatch import DispatchConfig, finalize_ready, housekeep, tick
from service.jobs import (
    Context,
    cancel,
    claim_chunk,
    job_prefix,
    open_context,
    pause,
    release_chunk,
    resume,
    submit,
    tenant_id,
)
from service.settings import Settings
from service.specs import parse_spec
from service.storage import StorageError
from tests.service.conftest import commit_placeholder_shard


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[Context]:
    settings = Settings.from_values(
        home=tmp_path / "home",
        database_url=f"sqlite:///{tmp_path / 'dpig.db'}",
        storage_url=(tmp_path / "outputs").as_uri(),
        max_attempts=5,
        lease_seconds=300,
    )
    context = open_context(settings, embedded=False)
    yield context
    context.sessions.kw["bind"].dispose()


class Recorder:
    def __init__(self) -> None:
        self.ids: list[int] = []

    def __call__(self, chunk_id: int, queue: str) -> None:
        self.ids.append(chunk_id)


def _submit(ctx: Context, count: int) -> str:
    spec = parse_spec({"kind": "sample", "count": count, "chunk_size": 1})
    return submit(ctx, tenant_id(ctx), spec).id


def _chunk_ids(ctx: Context, job_id: str) -> list[int]:
    with ctx.session() as session:
        query = select(Chunk.id).where(Chunk.job_id == job_id).order_by(Chunk.index)
        return [int(c) for c in session.scalars(query)]


def _set(ctx: Context, chunk_ids: list[int], **values: Any) -> None:
    with ctx.session() as session:
        session.execute(update(Chunk).where(Chunk.id.in_(chunk_ids)).values(**values))


def _state(ctx: Context, job_id: str) -> str:
    with ctx.session() as session:
        return str(session.scalar(select(Job.state).where(Job.id == job_id)))


def _config(**values: Any) -> DispatchConfig:
    return DispatchConfig(max_in_flight={"interactive": 2, "bulk": 3}, **values)


def test_cancelled_and_paused_jobs_do_not_hold_in_flight_slots(ctx: Context) -> None:
    first = _submit(ctx, 3)
    publish = Recorder()
    tick(ctx, publish, _config())
    assert publish.ids == _chunk_ids(ctx, first)  # the queue's 3 slots, none started yet

    cancel(ctx, tenant_id(ctx), first)
    assert _state(ctx, first) == "cancelling"
    second = _submit(ctx, 3)
    publish.ids.clear()
    tick(ctx, publish, _config())
    assert publish.ids == _chunk_ids(ctx, second)
    assert _state(ctx, first) == "cancelled"

    pause(ctx, tenant_id(ctx), second)
    third = _submit(ctx, 3)
    publish.ids.clear()
    tick(ctx, publish, _config())
    assert publish.ids == _chunk_ids(ctx, third)


def test_a_resumed_job_is_published_at_once(ctx: Context) -> None:
    job = _submit(ctx, 2)
    publish = Recorder()
    tick(ctx, publish, _config())
    pause(ctx, tenant_id(ctx), job)  # the workers skip its messages meanwhile
    resume(ctx, tenant_id(ctx), job)
    publish.ids.clear()
    tick(ctx, publish, _config(republish_after_s=3600))
    assert publish.ids == _chunk_ids(ctx, job)


def test_a_failed_chunk_waits_for_an_exponential_backoff(ctx: Context) -> None:
    job = _submit(ctx, 1)
    (chunk_id,) = _chunk_ids(ctx, job)
    publish, config = Recorder(), _config(retry_backoff_s=10, retry_backoff_max_s=25)
    for attempt, wait in ((1, 10), (2, 20), (3, 25), (4, 25)):
        publish.ids.clear()
        tick(ctx, publish, config)
        assert publish.ids == [chunk_id]
        claim = claim_chunk(ctx, "w", chunk_id=chunk_id)
        assert claim is not None and claim.attempt == attempt
        release_chunk(ctx, claim, error="S3 unavailable")
        _set(ctx, [chunk_id], started_at=utcnow() - timedelta(seconds=wait - 1))
        publish.ids.clear()
        tick(ctx, publish, config)
        assert publish.ids == [], f"published again {wait - 1} s after attempt {attempt}"
        _set(ctx, [chunk_id], started_at=utcnow() - timedelta(seconds=wait + 1))

    # without a backoff (the DispatchConfig default) it goes out at the next tick
    claim = claim_chunk(ctx, "w", chunk_id=chunk_id)
    assert claim is not None
    release_chunk(ctx, claim, error="boom")  # the fifth attempt: dead
    assert _state(ctx, job) == "running"
    publish.ids.clear()
    tick(ctx, publish, _config())
    assert publish.ids == [] and _state(ctx, job) == "failed"

    other = _submit(ctx, 1)
    (other_id,) = _chunk_ids(ctx, other)
    tick(ctx, publish, _config())
    claim = claim_chunk(ctx, "w", chunk_id=other_id)
    assert claim is not None
    release_chunk(ctx, claim, error="boom")
    publish.ids.clear()
    tick(ctx, publish, _config())
    assert publish.ids == [other_id]


def test_a_failed_finalisation_is_retried(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    job = _submit(ctx, 1)
    (chunk_id,) = _chunk_ids(ctx, job)
    claim = claim_chunk(ctx, "w", chunk_id=chunk_id)
    assert claim is not None
    commit_placeholder_shard(ctx, claim)

    put_bytes = ctx.storage.put_bytes

    def storage_down(key: str, data: bytes, content_type: str | None = None) -> None:
        raise StorageError(f"cannot write {key}: S3 unavailable")

    monkeypatch.setattr(ctx.storage, "put_bytes", storage_down)
    with pytest.raises(StorageError):
        tick(ctx, Recorder(), _config())
    assert _state(ctx, job) == "finalizing"

    monkeypatch.setattr(ctx.storage, "put_bytes", put_bytes)
    assert tick(ctx, Recorder(), _config()).finalized == 1
    assert _state(ctx, job) == "completed"
    assert ctx.storage.exists(job_prefix(job) + "_SUCCESS")


def test_a_tick_without_finalisation_leaves_it_to_the_finaliser(ctx: Context) -> None:
    """`dpig dispatcher` finalises beside its ticks, so a long finalisation never stops
    publishing or lease sweeping: its ticks do not finalise."""
    job = _submit(ctx, 1)
    (chunk_id,) = _chunk_ids(ctx, job)
    claim = claim_chunk(ctx, "w", chunk_id=chunk_id)
    assert claim is not None
    commit_placeholder_shard(ctx, claim)
    assert tick(ctx, Recorder(), _config(finalize_in_tick=False)).finalized == 0
    assert _state(ctx, job) == "running"
    assert finalize_ready(ctx) == 1 and _state(ctx, job) == "completed"


def test_a_tick_without_finalisation_only_marks_an_expired_job(ctx: Context) -> None:
    """Expiry finalises the job (a stream over all its shards): with `finalize_in_tick` off the
    tick only marks it, and the finaliser thread's `housekeep` ends it `expired`."""
    job = _submit(ctx, 2)
    with ctx.session() as session:
        session.execute(
            update(Job).where(Job.id == job).values(expires_at=utcnow() - timedelta(seconds=1))
        )
    tick(ctx, Recorder(), _config(finalize_in_tick=False))
    assert _state(ctx, job) == "cancelling"
    assert housekeep(ctx) == 1 and _state(ctx, job) == "expired"
