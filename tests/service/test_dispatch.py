"""The dispatcher (service/dispatch.py) on a real PostgreSQL database, with a recording `publish`
instead of a broker: the in-flight bound, priorities, per-tenant fairness, paused and cancelled
jobs, the lease sweeper, lost-message re-publishing, a failing broker, finalisation and gauges.

Chunks are moved by the lease functions of service/jobs.py (claim, commit, release) or by direct
SQL for what only time would do (an expired lease, an old publication). No model runs here: a
"done" chunk gets a shard written by the real ShardWriter with placeholder image bytes.

PostgreSQL is reached at `DPIG_TEST_POSTGRES_URL` (default `postgresql://postgres@127.0.0.1:5432/
postgres`, trust auth); without it these tests are skipped, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import delete, select, update

from service.chunks import note_received
from service.db import Base, Chunk, ChunkState, Job, make_engine, utcnow
from service.dispatch import DispatchConfig, finalize_ready, next_chunks, republish_lost, tick
from service.jobs import (
    Claim,
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
from tests.service.conftest import commit_placeholder_shard as _finish
from tests.service.conftest import fetch_chunk as _chunk
from tests.service.conftest import fetch_job as _job

MAX_ATTEMPTS = 2


@pytest.fixture(scope="module")
def dispatch_database(new_postgres_database: Callable[..., str]) -> str:
    """A migrated PostgreSQL database for this module."""
    return new_postgres_database("dpig_dispatch_test")


@pytest.fixture
def ctx(dispatch_database: str, tmp_path: Path) -> Iterator[Context]:
    """A server-mode context on the module's database (emptied after the test)."""
    settings = Settings.from_values(
        database_url=dispatch_database,
        home=tmp_path / "home",
        storage_url=(tmp_path / "outputs").as_uri(),
        max_attempts=MAX_ATTEMPTS,
        lease_seconds=300,
        # these tests rank jobs by queue and priority: the operator allows every tenant both
        default_queues=["bulk", "interactive"],
        default_max_priority=100,
    )
    context = open_context(settings, embedded=False, migrate=False)
    yield context
    engine = make_engine(dispatch_database)
    try:
        with engine.begin() as conn:
            for table in reversed(Base.metadata.sorted_tables):
                conn.execute(delete(table))
    finally:
        engine.dispose()
    context.sessions.kw["bind"].dispose()


class Recorder:
    """A `publish` that records (chunk id, queue); `fail_after` makes the n-th and later raise."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.sent: list[tuple[int, str]] = []
        self.fail_after = fail_after

    def __call__(self, chunk_id: int, queue: str) -> None:
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            raise ConnectionError("broker down")
        self.sent.append((chunk_id, queue))

    @property
    def ids(self) -> list[int]:
        return [chunk_id for chunk_id, _ in self.sent]

    def clear(self) -> None:
        self.sent.clear()


def _config(interactive: int = 4, bulk: int = 8, republish_after_s: float = 120.0) -> Any:
    return DispatchConfig(
        max_in_flight={"interactive": interactive, "bulk": bulk},
        republish_after_s=republish_after_s,
    )


def _submit(
    ctx: Context,
    tenant: str = "acme",
    *,
    count: int,
    chunk_size: int = 1,
    priority: int = 0,
    queue: str = "bulk",
) -> str:
    spec = parse_spec(
        {
            "kind": "sample",
            "count": count,
            "chunk_size": chunk_size,
            "priority": priority,
            "queue": queue,
        }
    )
    return submit(ctx, tenant_id(ctx, tenant), spec).id


def _chunks(ctx: Context, job_id: str) -> dict[int, int]:
    """Chunk index → chunk id."""
    with ctx.session() as session:
        rows = session.execute(select(Chunk.index, Chunk.id).where(Chunk.job_id == job_id)).all()
    return {int(index): int(chunk_id) for index, chunk_id in rows}


def _owner(ctx: Context, chunk_ids: list[int]) -> list[str]:
    """The job id of each chunk, in order."""
    with ctx.session() as session:
        rows = dict(session.execute(select(Chunk.id, Chunk.job_id)).all())
    return [rows[c] for c in chunk_ids]


def _claim(ctx: Context, chunk_id: int) -> Claim:
    claim = claim_chunk(ctx, "test-worker", chunk_id=chunk_id)
    assert claim is not None
    return claim


def _set_chunks(ctx: Context, chunk_ids: list[int], **values: Any) -> None:
    with ctx.session() as session:
        session.execute(update(Chunk).where(Chunk.id.in_(chunk_ids)).values(**values))


def _gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


# ------------------------------------------------------------------------------------------------
# just-in-time publishing


def test_in_flight_bound_per_queue_holds_across_ticks(ctx: Context) -> None:
    bulk = _submit(ctx, count=20, queue="bulk")
    interactive = _submit(ctx, count=10, queue="interactive")
    publish, config = Recorder(), _config(interactive=2, bulk=3)

    report = tick(ctx, publish, config)
    assert report.published == {"interactive": 2, "bulk": 3}
    assert sorted(q for _, q in publish.sent) == ["bulk"] * 3 + ["interactive"] * 2
    assert set(_owner(ctx, [c for c, q in publish.sent if q == "bulk"])) == {bulk}
    assert set(_owner(ctx, [c for c, q in publish.sent if q == "interactive"])) == {interactive}

    # published but not started: still in flight, nothing more goes out
    publish.clear()
    assert tick(ctx, publish, config).published == {"interactive": 0, "bulk": 0}
    assert publish.sent == []

    # a running chunk is in flight too; a finished one frees its slot
    first_bulk = _chunks(ctx, bulk)[0]
    claim = _claim(ctx, first_bulk)
    assert tick(ctx, publish, config).published == {"interactive": 0, "bulk": 0}
    _finish(ctx, claim)
    report = tick(ctx, publish, config)
    assert report.published == {"interactive": 0, "bulk": 1}
    assert _owner(ctx, publish.ids) == [bulk]
    assert _chunk(ctx, publish.ids[0]).index == 3  # lowest unpublished index of the job

    # in flight never exceeds the bound, whatever the ticks
    for _ in range(3):
        tick(ctx, publish, config)
    with ctx.session() as session:
        in_flight = session.execute(
            select(Job.queue, Chunk.id)
            .join(Job)
            .where(
                (Chunk.state == ChunkState.RUNNING)
                | ((Chunk.state == ChunkState.PENDING) & Chunk.published_at.is_not(None))
            )
        ).all()
    assert sorted(q for q, _ in in_flight) == ["bulk"] * 3 + ["interactive"] * 2


def test_higher_priority_job_is_published_first(ctx: Context) -> None:
    low = _submit(ctx, "acme", count=6, priority=0)
    high = _submit(ctx, "acme", count=4, priority=50)
    other_tenant_low = _submit(ctx, "globex", count=3, priority=-10)
    publish = Recorder()

    tick(ctx, publish, _config(bulk=5))
    owners = _owner(ctx, publish.ids)
    assert owners[:4] == [high] * 4  # every chunk of the higher class before any other
    assert owners[4] == low  # then priority 0 before -10, whatever the tenant
    assert other_tenant_low not in owners
    assert next_chunks(ctx, "bulk", 100)[:1] == [_chunks(ctx, low)[1]]


def test_tenants_take_turns_and_a_huge_job_does_not_starve_others(ctx: Context) -> None:
    huge = _submit(ctx, "whale", count=500)  # first, and 500 chunks
    small = _submit(ctx, "minnow", count=4)
    later = _submit(ctx, "whale", count=3)  # the whale's second job does not jump the queue
    publish = Recorder()

    tick(ctx, publish, _config(bulk=8))
    owners = _owner(ctx, publish.ids)
    assert owners == [huge, small] * 4  # round-robin: one chunk per tenant in turn
    indexes = [_chunk(ctx, c).index for c in publish.ids]
    assert indexes == [0, 0, 1, 1, 2, 2, 3, 3]
    assert later not in owners

    # with the small job exhausted, the whale gets every slot (oldest job first)
    for chunk_id in publish.ids:
        _finish(ctx, _claim(ctx, chunk_id))
    publish.clear()
    tick(ctx, publish, _config(bulk=8))
    assert _owner(ctx, publish.ids) == [huge] * 8


def test_paused_and_cancelled_jobs_are_never_published(ctx: Context) -> None:
    paused = _submit(ctx, "acme", count=3, priority=10)
    cancelled = _submit(ctx, "acme", count=3, priority=10)
    runnable = _submit(ctx, "acme", count=3)
    tenant = tenant_id(ctx, "acme")
    pause(ctx, tenant, paused)
    cancel(ctx, tenant, cancelled)
    # the request only marks it: the dispatcher's finaliser ends it (issue 17, finding 2)
    assert _job(ctx, cancelled).state == "cancelling"
    # a paused job's published-then-lost chunks are not re-published either
    _set_chunks(
        ctx, list(_chunks(ctx, paused).values()), published_at=utcnow() - timedelta(hours=1)
    )
    publish = Recorder()

    for _ in range(3):
        report = tick(ctx, publish, _config(bulk=10, republish_after_s=1))
        assert report.republished == 0
    assert set(_owner(ctx, publish.ids)) == {runnable}
    assert len(publish.ids) == 3

    _set_chunks(ctx, list(_chunks(ctx, paused).values()), published_at=None)
    resume(ctx, tenant, paused)
    publish.clear()
    tick(ctx, publish, _config(bulk=10))
    assert _owner(ctx, publish.ids) == [paused] * 3
    assert _job(ctx, cancelled).state == "cancelled"


# ------------------------------------------------------------------------------------------------
# recovery


def test_expired_lease_is_requeued_keeping_attempts_then_dead(ctx: Context) -> None:
    job = _submit(ctx, count=1)
    (chunk_id,) = _chunks(ctx, job).values()
    publish, config = Recorder(), _config()
    tick(ctx, publish, config)
    assert publish.ids == [chunk_id]

    _claim(ctx, chunk_id)
    _set_chunks(ctx, [chunk_id], lease_expires_at=utcnow() - timedelta(seconds=1))
    publish.clear()
    report = tick(ctx, publish, config)
    assert report.expired == 1
    chunk = _chunk(ctx, chunk_id)
    assert chunk.attempts == 1  # the lost attempt counts
    assert chunk.lease_token is None and chunk.lease_owner is None
    assert "expired" in (chunk.last_error or "")
    assert publish.ids == [chunk_id]  # pending again, and published again in the same tick
    assert chunk.state == ChunkState.PENDING and chunk.published_at is not None

    # a lease that has not expired yet is left alone
    claim = _claim(ctx, chunk_id)
    assert tick(ctx, publish, config).expired == 0
    assert _chunk(ctx, chunk_id).state == ChunkState.RUNNING

    # the second loss reaches max_attempts: dead, with the error recorded, and the job fails
    assert claim.attempt == MAX_ATTEMPTS
    _set_chunks(ctx, [chunk_id], lease_expires_at=utcnow() - timedelta(seconds=1))
    publish.clear()
    report = tick(ctx, publish, config)
    assert report.expired == 1 and publish.ids == []
    chunk = _chunk(ctx, chunk_id)
    assert chunk.state == ChunkState.DEAD and chunk.attempts == MAX_ATTEMPTS
    assert chunk.last_error == "worker lost (its lease expired)"  # no worker names for tenants
    assert report.finalized == 1
    finished = _job(ctx, job)
    assert finished.state == "failed" and finished.failed_items == 1
    errors = (Path(ctx.settings.storage_url.removeprefix("file://")) / job_prefix(job)).joinpath(
        "errors.jsonl"
    )
    assert "expired" in errors.read_text()


def test_a_failed_attempt_is_retried_then_dead_with_its_error(ctx: Context) -> None:
    job = _submit(ctx, count=1)
    (chunk_id,) = _chunks(ctx, job).values()
    publish, config = Recorder(), _config()
    for attempt in range(1, MAX_ATTEMPTS + 1):
        publish.clear()
        tick(ctx, publish, config)
        assert publish.ids == [chunk_id]
        release_chunk(ctx, _claim(ctx, chunk_id), error=f"boom {attempt}")
    chunk = _chunk(ctx, chunk_id)
    assert (chunk.state, chunk.attempts, chunk.last_error) == ("dead", MAX_ATTEMPTS, "boom 2")
    publish.clear()
    assert tick(ctx, publish, config).finalized == 1
    assert publish.ids == [] and _job(ctx, job).state == "failed"


def test_lost_messages_are_republished_after_the_delay_and_not_before(ctx: Context) -> None:
    job = _submit(ctx, count=3)
    ids = _chunks(ctx, job)
    publish, config = Recorder(), _config(bulk=3, republish_after_s=120)
    tick(ctx, publish, config)
    assert sorted(publish.ids) == sorted(ids.values())

    running = _claim(ctx, ids[2])
    assert running.chunk_id == ids[2]
    _set_chunks(ctx, [ids[0]], published_at=utcnow() - timedelta(seconds=60))  # not yet
    _set_chunks(ctx, [ids[1], ids[2]], published_at=utcnow() - timedelta(seconds=600))
    publish.clear()
    # a chunk of the queue runs: the old message waits behind it, it is not lost
    assert tick(ctx, publish, config).republished == 0

    # received without starting the chunk: that message is gone, whatever the queue does
    note_received(ctx, ids[1])
    report = tick(ctx, publish, config)
    assert report.republished == 1
    assert publish.ids == [ids[1]]
    assert _chunk(ctx, ids[1]).published_at > utcnow() - timedelta(seconds=60)

    publish.clear()
    assert tick(ctx, publish, config).republished == 0
    assert publish.ids == []

    # the queue stalls (its last chunk finished, its last receipt long ago): the never-received
    # message is presumed lost; the direct call takes its own delay
    _finish(ctx, running)
    _set_chunks(ctx, [ids[2]], finished_at=utcnow() - timedelta(seconds=600))
    _set_chunks(ctx, [ids[1]], received_at=utcnow() - timedelta(seconds=600))
    _set_chunks(ctx, [ids[0]], published_at=utcnow() - timedelta(seconds=30))
    assert republish_lost(ctx, publish, older_than_s=40) == 0
    assert republish_lost(ctx, publish, older_than_s=20) == 1
    assert publish.ids == [ids[0]]


def test_a_publish_that_raises_leaves_chunks_unpublished_for_the_next_tick(ctx: Context) -> None:
    job = _submit(ctx, count=4)
    ids = sorted(_chunks(ctx, job).values())
    config = _config(bulk=4)

    report = tick(ctx, Recorder(fail_after=0), config)
    assert report.published == {"interactive": 0, "bulk": 0}
    assert all(_chunk(ctx, c).published_at is None for c in ids)

    flaky = Recorder(fail_after=1)  # the first send goes out, the second raises
    report = tick(ctx, flaky, config)
    assert report.published["bulk"] == 1
    assert [_chunk(ctx, c).published_at is not None for c in ids] == [True, False, False, False]

    healthy = Recorder()
    report = tick(ctx, healthy, config)
    assert report.published["bulk"] == 3
    assert sorted(healthy.ids) == ids[1:]
    assert all(_chunk(ctx, c).published_at is not None for c in ids)


# ------------------------------------------------------------------------------------------------
# finalisation and gauges


def test_finalize_ready_finalises_completed_and_cancelled_jobs(ctx: Context) -> None:
    done = _submit(ctx, "acme", count=4, chunk_size=2)
    stopped = _submit(ctx, "acme", count=4, chunk_size=2)
    open_job = _submit(ctx, "acme", count=4, chunk_size=2)
    tenant = tenant_id(ctx, "acme")
    for chunk_id in _chunks(ctx, done).values():
        _finish(ctx, _claim(ctx, chunk_id))
    stopped_chunks = _chunks(ctx, stopped)
    _finish(ctx, _claim(ctx, stopped_chunks[0]))
    running = _claim(ctx, stopped_chunks[1])
    _finish(ctx, _claim(ctx, _chunks(ctx, open_job)[0]))
    cancel(ctx, tenant, stopped)
    assert _job(ctx, stopped).state == "cancelling"  # waits for its running chunk

    # the worker's last step usually finalises; the dispatcher catches what it missed
    assert _job(ctx, done).state == "running"
    assert finalize_ready(ctx) == 1
    assert _job(ctx, done).state == "completed"
    assert _job(ctx, stopped).state == "cancelling"
    assert _job(ctx, open_job).state == "running"

    release_chunk(ctx, running)  # the running chunk stops at its next micro-batch
    report = tick(ctx, Recorder(), _config())
    assert report.finalized == 1
    assert _job(ctx, stopped).state == "cancelled"
    assert _job(ctx, open_job).state == "running"
    out = Path(ctx.settings.storage_url.removeprefix("file://"))
    assert (out / job_prefix(done) / "_SUCCESS").is_file()
    assert (out / job_prefix(stopped) / "_CANCELLED").is_file()
    assert finalize_ready(ctx) == 0


def test_gauges_hold_outstanding_items_and_jobs_by_state_after_a_tick(ctx: Context) -> None:
    bulk = _submit(ctx, "acme", count=10, chunk_size=4)  # chunks of 4, 4, 2
    _submit(ctx, "acme", count=3, chunk_size=2, queue="interactive")  # 2, 1
    paused = _submit(ctx, "globex", count=7)
    finished = _submit(ctx, "globex", count=2, chunk_size=2)
    pause(ctx, tenant_id(ctx, "globex"), paused)
    _finish(ctx, _claim(ctx, _chunks(ctx, finished)[0]))
    _claim(ctx, _chunks(ctx, bulk)[0])

    tick(ctx, Recorder(), _config(interactive=1, bulk=1))
    outstanding = "dpig_work_items_outstanding"
    assert _gauge(outstanding, queue="bulk", state="pending") == 6  # paused jobs do not count
    assert _gauge(outstanding, queue="bulk", state="running") == 4
    assert _gauge(outstanding, queue="interactive", state="pending") == 3
    assert _gauge(outstanding, queue="interactive", state="running") == 0
    jobs = {
        state: _gauge("dpig_jobs", state=state)
        for state in ("queued", "running", "paused", "completed", "failed", "cancelled")
    }
    assert jobs == {
        "queued": 1,
        "running": 1,
        "paused": 1,
        "completed": 1,
        "failed": 0,
        "cancelled": 0,
    }

    # the next tick reflects the change: the running chunk finishes, the paused job resumes
    resume(ctx, tenant_id(ctx, "globex"), paused)
    with ctx.session() as session:
        chunk_id = session.scalar(
            select(Chunk.id).where(Chunk.job_id == bulk, Chunk.state == ChunkState.RUNNING)
        )
    _set_chunks(ctx, [chunk_id], state=ChunkState.DONE, lease_token=None)
    tick(ctx, Recorder(), _config(interactive=1, bulk=1))
    assert _gauge(outstanding, queue="bulk", state="pending") == 6 + 7
    assert _gauge(outstanding, queue="bulk", state="running") == 0
    assert _gauge("dpig_jobs", state="paused") == 0
    assert _gauge("dpig_jobs", state="queued") == 2


def test_chunks_of_a_stopped_job_do_not_hold_in_flight_slots(ctx: Context) -> None:
    """A cancelled (or paused) job's published chunks never start (a worker finds nothing to
    lease), so they must not count against the queue's bound, or the queue stalls."""
    stopped = _submit(ctx, "acme", count=2)
    paused = _submit(ctx, "acme", count=2)
    publish, config = Recorder(), _config(bulk=4)
    tick(ctx, publish, config)
    assert sorted(_owner(ctx, publish.ids)) == sorted([stopped] * 2 + [paused] * 2)
    tenant = tenant_id(ctx, "acme")
    cancel(ctx, tenant, stopped)
    pause(ctx, tenant, paused)
    waiting = _submit(ctx, "globex", count=4)
    publish.clear()
    tick(ctx, publish, config)
    assert _owner(ctx, publish.ids) == [waiting] * 4
