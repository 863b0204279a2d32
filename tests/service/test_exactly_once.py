"""Exactly-once under any interleaving (issue 17), on a real PostgreSQL database and a local
output folder. Each race is forced, not timed: a second session acts from inside the first one's
transaction (an engine hook), or a stale worker is replayed after the chunk was re-run.

- a stale worker's late upload never changes a committed chunk (attempt-tagged keys), and its
  objects are swept as orphans;
- the finaliser checks every done marker's SHA-256 and re-runs a shard that fails it;
- a cancel committed while a chunk is being claimed is not overwritten;
- leases are database time: a worker whose clock is 6 minutes behind keeps its lease;
- two finalisers cannot both run, and the final state is set only by the lease holder;
- a retried chunk keeps its last committed attempt until a new one commits;
- `retry` sends its chunks through the bounded publisher, not the lost-message sweep;
- one dispatcher at a time (advisory lock);
- recounts serialise, so a finished job never shows stale counts;
- a chunk stopped by a cancel fails nothing, even after an earlier failed attempt;
- a done chunk committed by a worker from before tags keeps its untagged shard;
- an ambiguous submit commit (applied, then raising) keeps the live job's inputs.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Collection, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from sqlalchemy import delete, event, select, update

from service.chunks import recount
from service.db import Base, Chunk, Job, make_engine, utcnow
from service.dispatch import next_chunks
from service.dispatch_lock import DispatcherLock
from service.jobs import (
    Claim,
    Context,
    JobError,
    cancel,
    claim_chunk,
    commit_chunk,
    job_prefix,
    maybe_finalize,
    open_context,
    release_chunk,
    requeue_expired,
    retry,
    submit,
    tenant_id,
)
from service.settings import Settings
from service.shards import ShardWriter
from service.specs import parse_spec
from tests.service.conftest import fetch_chunk as _chunk
from tests.service.conftest import fetch_job as _job


@pytest.fixture(scope="module")
def database(new_postgres_database: Callable[..., str]) -> str:
    return new_postgres_database("dpig_exactly_once_test")


@pytest.fixture
def ctx(database: str, tmp_path: Path) -> Iterator[Context]:
    settings = Settings.from_values(
        database_url=database,
        home=tmp_path / "home",
        storage_url=(tmp_path / "outputs").as_uri(),
        max_attempts=2,
        lease_seconds=300,
    )
    context = open_context(settings, embedded=False, migrate=False)
    yield context
    engine = make_engine(database)
    try:
        with engine.begin() as conn:
            for table in reversed(Base.metadata.sorted_tables):
                conn.execute(delete(table))
    finally:
        engine.dispose()
    context.sessions.kw["bind"].dispose()


def _submit(ctx: Context, *, count: int = 2, chunk_size: int = 2) -> str:
    spec = parse_spec({"kind": "sample", "count": count, "chunk_size": chunk_size})
    return submit(ctx, tenant_id(ctx, "acme"), spec).id


def _chunk_ids(ctx: Context, job_id: str) -> list[int]:
    with ctx.session() as session:
        return list(
            session.scalars(select(Chunk.id).where(Chunk.job_id == job_id).order_by(Chunk.index))
        )


def _claim(ctx: Context, chunk_id: int) -> Claim:
    claim = claim_chunk(ctx, "worker", chunk_id=chunk_id)
    assert claim is not None
    return claim


def _write(ctx: Context, claim: Claim, png: bytes, *, fail: Collection[int] = ()) -> None:
    """What a worker does before committing: its shard, with placeholder image bytes."""
    writer = ShardWriter(ctx.storage, job_prefix(claim.job_id), claim.index, tag=claim.tag)
    for item in range(claim.item_start, claim.item_stop):
        if item in fail:
            writer.fail(item, "no person found", {"item": item, "seed": 0})
        else:
            writer.add(item, png, {"item": item, "seed": 0})
    writer.write()


def _finish(ctx: Context, claim: Claim, png: bytes, *, fail: Collection[int] = ()) -> None:
    _write(ctx, claim, png, fail=fail)
    done = claim.item_stop - claim.item_start - len(fail)
    assert commit_chunk(ctx, claim, done, len(fail))


def _expire(ctx: Context, chunk_id: int) -> None:
    with ctx.session() as session:
        session.execute(
            update(Chunk)
            .where(Chunk.id == chunk_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


def _out(ctx: Context, job_id: str) -> Path:
    return Path(ctx.settings.storage_url.removeprefix("file://")) / job_prefix(job_id)


def _manifest(ctx: Context, job_id: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = pq.read_table(_out(ctx, job_id) / "manifest.parquet").to_pylist()
    return rows


def _tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_stale_worker_never_changes_a_committed_chunk(ctx: Context) -> None:
    job = _submit(ctx)
    (chunk_id,) = _chunk_ids(ctx, job)
    stale = _claim(ctx, chunk_id)
    _expire(ctx, chunk_id)  # the worker stalls past its lease ...
    assert requeue_expired(ctx) == 1
    fresh = _claim(ctx, chunk_id)  # ... and another runs the chunk
    _write(ctx, stale, b"stale", fail={0})  # the stale upload lands before the commit
    _finish(ctx, fresh, b"fresh")
    assert not commit_chunk(ctx, stale, 1, 1)
    assert maybe_finalize(ctx, job)
    assert _job(ctx, job).state == "completed"
    out = _out(ctx, job)
    rows = _manifest(ctx, job)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert {r["sha256"] for r in rows} == {hashlib.sha256(b"fresh").hexdigest()}
    shard = f"shards/000000-{fresh.tag}"
    assert {r["object"].split("#")[0] for r in rows} == {shard + ".tar"}
    # the stale attempt's objects were orphans: swept by the finaliser
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        f"000000-{fresh.tag}.done.json",
        f"000000-{fresh.tag}.jsonl",
        f"000000-{fresh.tag}.parquet",
        f"000000-{fresh.tag}.tar",
    ]
    before = _tree(out)
    _write(ctx, stale, b"stale", fail={0})  # a later stale upload: its own keys only
    after = _tree(out)
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(after) - set(before) == {
        f"shards/000000-{stale.tag}.{ext}" for ext in ("tar", "parquet", "jsonl", "done.json")
    }


def test_the_finaliser_reruns_a_shard_that_fails_its_hash_check(ctx: Context) -> None:
    job = _submit(ctx)
    (chunk_id,) = _chunk_ids(ctx, job)
    claim = _claim(ctx, chunk_id)
    _finish(ctx, claim, b"png")
    tar = _out(ctx, job) / f"shards/000000-{claim.tag}.tar"
    tar.write_bytes(tar.read_bytes()[:-512] + b"x" * 512)  # changed behind the commit's back
    assert not maybe_finalize(ctx, job)
    chunk, state = _chunk(ctx, chunk_id), _job(ctx, job).state
    assert (chunk.state, chunk.output_tag, state) == ("pending", None, "running")
    assert "does not match its done marker's sha256" in (chunk.last_error or "")
    assert not (_out(ctx, job) / "_SUCCESS").exists()
    _finish(ctx, _claim(ctx, chunk_id), b"png")
    assert maybe_finalize(ctx, job) and _job(ctx, job).state == "completed"


def test_a_cancel_committed_during_a_claim_is_not_overwritten(ctx: Context) -> None:
    job = _submit(ctx)
    (chunk_id,) = _chunk_ids(ctx, job)
    tenant = tenant_id(ctx, "acme")
    engine = ctx.sessions.kw["bind"]
    fired: list[str] = []

    def cancel_meanwhile(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        # right after the claim has picked (and locked) its chunk, and again after it read the
        # job if it does: the cancel commits from another connection
        if not fired and "FOR UPDATE" in statement and "chunks" in statement:
            fired.append("cancel")
            cancel(ctx, tenant, job)

    event.listen(engine, "after_cursor_execute", cancel_meanwhile)
    try:
        claim = claim_chunk(ctx, "worker", chunk_id=chunk_id)
    finally:
        event.remove(engine, "after_cursor_execute", cancel_meanwhile)
    assert fired
    assert claim is None
    assert _job(ctx, job).state == "cancelling"
    assert _chunk(ctx, chunk_id).state == "pending"


def test_a_worker_whose_clock_is_behind_keeps_its_lease(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.chunks
    import service.context
    import service.jobs

    job = _submit(ctx)
    (chunk_id,) = _chunk_ids(ctx, job)
    behind = utcnow() - timedelta(minutes=6)
    with monkeypatch.context() as worker_host:
        for module in (service.jobs, service.chunks, service.context):
            worker_host.setattr(module, "utcnow", lambda: behind, raising=False)
        claim = _claim(ctx, chunk_id)
        assert claim.published_at is None
    assert requeue_expired(ctx) == 0  # the dispatcher's host has the right time
    assert _chunk(ctx, chunk_id).lease_token == claim.token


def test_two_finalisers_cannot_both_finalise(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    job = _submit(ctx, count=2, chunk_size=1)
    first, second = _chunk_ids(ctx, job)
    _finish(ctx, _claim(ctx, first), b"png")
    _finish(ctx, _claim(ctx, second), b"png", fail={1})
    seen: dict[str, Any] = {}
    storage = ctx.storage
    real_put_bytes, real_put_file = storage.put_bytes, storage.put_file

    def meanwhile(key: str) -> None:
        if key.endswith("manifest.parquet") and "second" not in seen:
            seen["second"] = "running"
            seen["second"] = maybe_finalize(ctx, job)  # the dispatcher, beside the worker
            try:
                retry(ctx, tenant_id(ctx, "acme"), job)
                seen["retry"] = "accepted"
            except JobError as exc:
                seen["retry"] = exc.status

    def put_bytes(key: str, data: bytes, content_type: str | None = None) -> None:
        meanwhile(key)
        real_put_bytes(key, data, content_type)

    def put_file(key: str, path: Any) -> None:
        meanwhile(key)
        real_put_file(key, path)

    monkeypatch.setattr(storage, "put_bytes", put_bytes)
    monkeypatch.setattr(storage, "put_file", put_file)
    assert maybe_finalize(ctx, job)
    assert seen == {"second": False, "retry": 409}
    final = _job(ctx, job)
    assert (final.state, final.finalize_token) == ("completed", None)
    assert {_chunk(ctx, c).state for c in (first, second)} == {"done"}


def test_a_finaliser_whose_lease_was_taken_over_does_not_set_the_state(ctx: Context) -> None:
    job = _submit(ctx)
    (chunk_id,) = _chunk_ids(ctx, job)
    _finish(ctx, _claim(ctx, chunk_id), b"png")
    with ctx.session() as session:  # a finaliser that died holding an expired lease
        session.execute(
            update(Job)
            .where(Job.id == job)
            .values(
                state="finalizing",
                finalize_token="gone",
                finalize_expires_at=utcnow() - timedelta(seconds=1),
            )
        )
    assert maybe_finalize(ctx, job)
    with ctx.session() as session:  # an unexpired one blocks
        session.execute(
            update(Job)
            .where(Job.id == job)
            .values(
                state="finalizing",
                finalize_token="alive",
                finalize_expires_at=utcnow() + timedelta(seconds=60),
            )
        )
    assert not maybe_finalize(ctx, job)


def test_a_retry_keeps_the_last_committed_attempt_until_a_new_one_commits(
    ctx: Context,
) -> None:
    job = _submit(ctx, count=4, chunk_size=4)
    (chunk_id,) = _chunk_ids(ctx, job)
    _finish(ctx, _claim(ctx, chunk_id), b"png", fail={3})
    assert maybe_finalize(ctx, job)
    retry(ctx, tenant_id(ctx, "acme"), job)
    for _ in range(2):  # max_attempts: the rerun dies
        release_chunk(ctx, _claim(ctx, chunk_id), error="S3 down")
    assert _chunk(ctx, chunk_id).state == "dead"
    assert maybe_finalize(ctx, job)
    final = _job(ctx, job)
    assert (final.state, final.done_items, final.failed_items) == ("completed", 3, 1)
    assert [r["status"] for r in _manifest(ctx, job)] == ["ok", "ok", "ok", "error"]


def test_retry_goes_through_the_bounded_publisher(ctx: Context) -> None:
    job = _submit(ctx, count=2, chunk_size=1)
    first, second = _chunk_ids(ctx, job)
    with ctx.session() as session:
        session.execute(update(Chunk).where(Chunk.job_id == job).values(published_at=utcnow()))
    _finish(ctx, _claim(ctx, first), b"png", fail={0})
    _finish(ctx, _claim(ctx, second), b"png")
    assert maybe_finalize(ctx, job)
    retry(ctx, tenant_id(ctx, "acme"), job)
    assert _chunk(ctx, first).published_at is None
    assert next_chunks(ctx, "bulk", 10) == [first]


def test_only_one_dispatcher_holds_the_lock(database: str) -> None:
    with DispatcherLock(database) as one, DispatcherLock(database) as two:
        assert one.acquire()
        assert not two.acquire()
        assert one.acquire()  # re-entrant for its holder
        one.release()
        assert two.acquire()


def test_recounts_in_turn_never_leave_stale_counts(ctx: Context) -> None:
    job = _submit(ctx, count=2, chunk_size=1)
    first, second = _chunk_ids(ctx, job)
    _finish(ctx, _claim(ctx, first), b"png")
    late = _claim(ctx, second)
    _write(ctx, late, b"png")
    engine = ctx.sessions.kw["bind"]
    state: dict[str, Any] = {}

    def commit_meanwhile(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        # the first recount has read its sums; the last chunk commits (and recounts) now
        if "sum(" in statement.lower() and "thread" not in state:
            state["thread"] = threading.Thread(
                target=lambda: state.update(committed=commit_chunk(ctx, late, 1, 0))
            )
            state["thread"].start()
            state["thread"].join(timeout=3)  # blocks on the first recount's lock, if it has one

    event.listen(engine, "after_cursor_execute", commit_meanwhile)
    try:
        recount(ctx, job)
    finally:
        event.remove(engine, "after_cursor_execute", commit_meanwhile)
    state["thread"].join()
    assert state["committed"]
    final = _job(ctx, job)
    assert (final.done_items, final.failed_items) == (2, 0)


def test_orphans_of_a_cancelled_job_are_removed(ctx: Context) -> None:
    job = _submit(ctx, count=4, chunk_size=2)
    first, second = _chunk_ids(ctx, job)
    _finish(ctx, _claim(ctx, first), b"png")
    lost = _claim(ctx, second)
    _write(ctx, lost, b"png")  # uploaded, then the worker died before committing
    release_chunk(ctx, lost, error="worker lost")
    cancel(ctx, tenant_id(ctx, "acme"), job)
    assert _job(ctx, job).state == "cancelling"  # the request only marks it
    assert maybe_finalize(ctx, job)
    assert _job(ctx, job).state == "cancelled"
    names = sorted(p.name for p in (_out(ctx, job) / "shards").iterdir())
    assert all(name.startswith("000000-") for name in names) and len(names) == 4
    summary = json.loads((_out(ctx, job) / "_CANCELLED").read_text())
    assert summary == {"items": 2, "done": 2, "failed": 0, "shards": ["shards/000000-1"]}


def test_a_chunk_stopped_by_a_cancel_fails_nothing_after_a_failed_attempt(ctx: Context) -> None:
    """Found by the chaos soak: a chunk whose first attempt failed (S3 down) and whose second was
    stopped by a cancel kept the first attempt's error, so the cancelled job counted its items
    as failed while its manifest listed none of them."""
    job = _submit(ctx, count=4, chunk_size=2)
    first, second = _chunk_ids(ctx, job)
    _finish(ctx, _claim(ctx, first), b"png")
    release_chunk(ctx, _claim(ctx, second), error="storage unavailable")
    stopped = _claim(ctx, second)  # the retry, running when the cancel comes
    cancel(ctx, tenant_id(ctx, "acme"), job)
    release_chunk(ctx, stopped)  # the worker saw the cancel between micro-batches
    assert (_chunk(ctx, second).state, _chunk(ctx, second).last_error) == ("dead", None)
    assert maybe_finalize(ctx, job)
    final = _job(ctx, job)
    assert (final.state, final.done_items, final.failed_items) == ("cancelled", 2, 0)
    rows = pq.read_table(_out(ctx, job) / "manifest.parquet").to_pylist()
    assert [r["item"] for r in rows] == [0, 1]
    assert (_out(ctx, job) / "errors.jsonl").read_text() == ""


def test_a_chunk_committed_by_a_worker_from_before_tags_is_kept(ctx: Context) -> None:
    """A rolling upgrade: an old worker wrote the untagged `shards/NNNNNN.*` and committed
    without a tag; the new finaliser must read those, not sweep them as orphans."""
    job = _submit(ctx)
    (chunk_id,) = _chunk_ids(ctx, job)
    claim = _claim(ctx, chunk_id)
    writer = ShardWriter(ctx.storage, job_prefix(job), claim.index)
    for item in range(claim.item_start, claim.item_stop):
        writer.add(item, b"png", {"item": item, "seed": 0})
    writer.write()
    with ctx.session() as session:
        session.execute(
            update(Chunk)
            .where(Chunk.id == chunk_id)
            .values(state="done", done_items=2, lease_token=None, output_tag=None)
        )
    recount(ctx, job)
    assert maybe_finalize(ctx, job)
    final = _job(ctx, job)
    assert (final.state, final.done_items) == ("completed", 2)
    assert [r["object"] for r in _manifest(ctx, job)] == [
        "shards/000000.tar#0000000000.png",
        "shards/000000.tar#0000000001.png",
    ]
    assert (_out(ctx, job) / "shards" / "000000.tar").is_file()


def test_an_ambiguous_submit_commit_keeps_the_live_jobs_inputs(
    ctx: Context, tmp_path: Path
) -> None:
    """The commit applies, then the call raises (a connection lost while COMMIT's answer was on
    its way): the job exists, so its inputs must stay."""
    from sqlalchemy.orm import Session

    folder = tmp_path / "sources"
    folder.mkdir()
    settings = ctx.settings.model_copy(update={"allowed_source_prefixes": [folder.as_uri()]})
    ctx = open_context(settings, embedded=False, migrate=False)
    (folder / "a.png").write_bytes(b"not read at submit")
    spec = parse_spec(
        {
            "kind": "pose_grid",
            "images": folder.as_uri(),
            "poses": [{"keypoints": [[10.0, 10.0, 1.0]] * 18, "height": 64, "width": 32}],
            "source_keypoints": {"a.png": [[10.0, 10.0, 1.0]] * 18},
        }
    )
    tenant = tenant_id(ctx, "acme")

    inserted: list[bool] = []

    def saw_job(session: Session, flush_context: Any, instances: Any) -> None:
        inserted.extend(isinstance(obj, Job) for obj in session.new)

    def lost_answer(session: Session) -> None:
        if any(inserted):  # the commit that inserted the job
            inserted.clear()
            raise ConnectionError("server closed the connection after COMMIT")

    event.listen(Session, "before_flush", saw_job)
    event.listen(Session, "after_commit", lost_answer)
    try:
        with pytest.raises(ConnectionError):
            submit(ctx, tenant, spec)
    finally:
        event.remove(Session, "after_commit", lost_answer)
        event.remove(Session, "before_flush", saw_job)
    with ctx.session() as session:
        (job_id,) = session.scalars(select(Job.id)).all()
    assert (_out(ctx, job_id) / "inputs" / "sources.json").is_file()
