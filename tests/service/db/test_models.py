"""Models on a migrated database (SQLite and PostgreSQL): constraints, cascades, keys, engines."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, delete, func, select, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session

from service.db import (
    ApiKey,
    Chunk,
    ChunkState,
    Job,
    JobState,
    Queue,
    RegisteredModel,
    Tenant,
    hash_api_key,
    key_prefix,
    make_engine,
    new_api_key,
    new_id,
    session_factory,
    verify_api_key,
)


def _tenant(session: Session, name: str = "acme") -> Tenant:
    tenant = Tenant(name=name)
    session.add(tenant)
    session.flush()
    return tenant


def _job(tenant: Tenant, **overrides: Any) -> Job:
    fields: dict[str, Any] = {
        "tenant_id": tenant.id,
        "kind": "pose_grid",
        "spec": {"kind": "pose_grid", "poses": [[1.5, 2.0]], "sources": "s3://b/p/"},
        "spec_sha256": "0" * 64,
        "model_name": "dpig-market-small-synth",
        "weights_sha256": "f" * 64,
        "seed": 2**63 - 1,
        "total_items": 10**12,
        "chunk_size": 1024,
    }
    return Job(**(fields | overrides))


def _chunk(job: Job, index: int, **overrides: Any) -> Chunk:
    start = index * job.chunk_size
    return Chunk(**({"index": index, "item_start": start, "item_stop": start + 1} | overrides))


def _count(session: Session, model: type[Any]) -> int:
    return session.scalar(select(func.count()).select_from(model)) or 0


def test_job_and_chunks_round_trip(engine: Engine, session: Session) -> None:
    before = datetime.now(UTC)
    job = _job(_tenant(session))
    job.chunks = [_chunk(job, 1), _chunk(job, 0)]
    session.add(job)
    session.commit()

    with session_factory(engine)() as fresh:
        loaded = fresh.get_one(Job, job.id)
        assert uuid.UUID(loaded.id).version == 7
        assert (loaded.state, loaded.queue, loaded.priority) == ("queued", "bulk", 0)
        assert (loaded.done_items, loaded.failed_items) == (0, 0)
        assert loaded.seed == 2**63 - 1 and loaded.total_items == 10**12
        assert loaded.spec == {"kind": "pose_grid", "poses": [[1.5, 2.0]], "sources": "s3://b/p/"}
        assert loaded.created_at.tzinfo is UTC
        assert before - timedelta(seconds=1) <= loaded.created_at <= datetime.now(UTC)
        assert [c.index for c in loaded.chunks] == [0, 1]
        assert all(c.state == ChunkState.PENDING and c.attempts == 0 for c in loaded.chunks)


def test_server_defaults_fill_rows_written_without_the_orm(session: Session) -> None:
    session.execute(text("INSERT INTO tenants (name) VALUES ('raw')"))
    tenant = session.scalars(select(Tenant).where(Tenant.name == "raw")).one()
    assert tenant.created_at.tzinfo is UTC
    assert abs(datetime.now(UTC) - tenant.created_at) < timedelta(minutes=1)
    assert tenant.max_items_per_job is None and tenant.max_active_jobs is None


def test_timestamps_round_trip_as_utc(session: Session) -> None:
    job = _job(_tenant(session))
    job.started_at = datetime(2025, 1, 2, 3, 4, 5, 678, tzinfo=UTC)
    # Another zone goes in as the same instant.
    job.finished_at = datetime(2025, 1, 2, 5, 4, 5, tzinfo=UTC).astimezone(
        datetime.now().astimezone().tzinfo
    )
    session.add(job)
    session.commit()
    session.expire_all()
    assert job.started_at == datetime(2025, 1, 2, 3, 4, 5, 678, tzinfo=UTC)
    assert job.finished_at == datetime(2025, 1, 2, 5, 4, 5, tzinfo=UTC)
    assert job.finished_at.tzinfo is UTC


def test_naive_datetimes_are_refused(session: Session) -> None:
    job = _job(_tenant(session), started_at=datetime(2025, 1, 1))
    session.add(job)
    with pytest.raises(StatementError, match="naive datetime"):
        session.flush()


def test_updated_at_moves_on_update(session: Session) -> None:
    job = _job(_tenant(session))
    session.add(job)
    session.commit()
    first = job.updated_at
    time.sleep(0.01)
    job.state = JobState.RUNNING
    session.commit()
    session.expire_all()
    assert job.state == "running"
    assert job.updated_at > first


@pytest.mark.parametrize(
    ("field", "value"),
    [("state", "exploded"), ("queue", "urgent"), ("chunk_size", 0), ("total_items", -1)],
)
def test_job_check_constraints(session: Session, field: str, value: object) -> None:
    session.add(_job(_tenant(session), **{field: value}))
    with pytest.raises(IntegrityError):
        session.flush()


@pytest.mark.parametrize("state", list(JobState))
def test_every_job_state_is_allowed(session: Session, state: JobState) -> None:
    session.add(_job(_tenant(session), state=state, queue=Queue.INTERACTIVE))
    session.flush()


@pytest.mark.parametrize(
    "overrides",
    [{"state": "lost"}, {"item_stop": 0}, {"item_start": -5}, {"attempts": -1}],
)
def test_chunk_check_constraints(session: Session, overrides: dict[str, Any]) -> None:
    job = _job(_tenant(session))
    job.chunks = [_chunk(job, 0, **overrides)]
    session.add(job)
    with pytest.raises(IntegrityError):
        session.flush()


def test_chunk_index_is_unique_per_job(session: Session) -> None:
    tenant = _tenant(session)
    first, second = _job(tenant), _job(tenant)
    first.chunks = [_chunk(first, 0)]
    second.chunks = [_chunk(second, 0)]  # the same index in another job is fine
    session.add_all([first, second])
    session.flush()

    session.add(Chunk(job_id=first.id, index=0, item_start=5, item_stop=6))
    with pytest.raises(IntegrityError):
        session.flush()


def test_deleting_a_job_deletes_its_chunks_in_the_database(session: Session) -> None:
    tenant = _tenant(session)
    doomed, kept = _job(tenant), _job(tenant)
    doomed.chunks = [_chunk(doomed, i) for i in range(3)]
    kept.chunks = [_chunk(kept, 0)]
    session.add_all([doomed, kept])
    session.commit()

    session.execute(delete(Job).where(Job.id == doomed.id))  # no ORM cascade involved
    session.commit()
    assert session.scalars(select(Chunk.job_id)).all() == [kept.id]


def test_deleting_a_job_through_the_orm(session: Session) -> None:
    job = _job(_tenant(session))
    job.chunks = [_chunk(job, i) for i in range(3)]
    session.add(job)
    session.commit()
    session.delete(job)
    session.commit()
    assert _count(session, Chunk) == 0


def test_job_needs_an_existing_tenant(session: Session) -> None:
    session.add(_job(Tenant(id=999_999, name="ghost")))
    with pytest.raises(IntegrityError):
        session.flush()


def test_tenant_with_jobs_cannot_be_deleted_but_its_keys_go_with_it(session: Session) -> None:
    tenant = _tenant(session)
    _, prefix, key_hash = new_api_key()
    session.add(ApiKey(tenant_id=tenant.id, prefix=prefix, key_hash=key_hash))
    session.commit()
    session.execute(delete(Tenant).where(Tenant.id == tenant.id))
    session.commit()
    assert _count(session, ApiKey) == 0

    tenant = _tenant(session, "busy")
    session.add(_job(tenant))
    session.commit()
    with pytest.raises(IntegrityError):
        session.execute(delete(Tenant).where(Tenant.id == tenant.id))
        session.flush()


def test_names_are_unique(session: Session) -> None:
    _tenant(session, "same")
    with pytest.raises(IntegrityError):
        _tenant(session, "same")


def test_registered_model(session: Session) -> None:
    model = RegisteredModel(
        name="dpig-market-small-synth",
        version="0.1.0",
        uri="file:///models/dpig-market-small-synth",
        weights_sha256="a" * 64,
        config={"height": 128, "width": 64, "channels": [64, 128]},
    )
    session.add(model)
    session.commit()
    session.expire_all()
    assert model.config["channels"] == [64, 128]
    assert model.created_at.tzinfo is UTC


def test_api_keys_are_stored_hashed(session: Session) -> None:
    tenant = _tenant(session)
    clear, prefix, key_hash = new_api_key()
    session.add(ApiKey(tenant_id=tenant.id, prefix=prefix, key_hash=key_hash))
    session.commit()

    row = session.execute(text("SELECT * FROM api_keys")).mappings().one()
    assert clear not in {str(v) for v in row.values()}
    assert row["key_hash"] == hash_api_key(clear) and len(row["key_hash"]) == 64

    found = session.scalars(select(ApiKey).where(ApiKey.prefix == key_prefix(clear))).all()
    assert [k.tenant.name for k in found if verify_api_key(clear, k.key_hash)] == ["acme"]
    assert not verify_api_key(clear[:-1] + ("A" if clear[-1] != "A" else "B"), key_hash)
    assert found[0].revoked_at is None


def test_new_api_key() -> None:
    keys = [new_api_key() for _ in range(100)]
    assert len({clear for clear, _, _ in keys}) == 100
    for clear, prefix, key_hash in keys:
        assert len(clear) >= 43 and prefix == clear[:8]
        assert key_hash == hash_api_key(clear) != clear
        assert verify_api_key(clear, key_hash)
        assert verify_api_key(clear, key_hash.upper())
        assert not verify_api_key("", key_hash)


def test_new_id_is_a_time_ordered_uuid7() -> None:
    first = new_id()
    time.sleep(0.002)
    second = new_id()
    assert uuid.UUID(first).version == 7 and uuid.UUID(first).variant == uuid.RFC_4122
    assert first < second
    assert len({new_id() for _ in range(1000)}) == 1000


def test_sqlite_engine_pragmas(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
    finally:
        engine.dispose()


def test_in_memory_sqlite_is_one_database_for_all_threads() -> None:
    engine = make_engine("sqlite://")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        conn.exec_driver_sql("INSERT INTO t VALUES (7)")
    seen: list[int] = []

    def read() -> None:
        with engine.connect() as conn:
            seen.append(conn.exec_driver_sql("SELECT x FROM t").scalar_one())

    thread = threading.Thread(target=read)
    thread.start()
    thread.join()
    assert seen == [7]


def test_postgres_engine_survives_dropped_connections(postgres_url: str) -> None:
    engine = make_engine(postgres_url, pool_size=1, max_overflow=0)
    admin = make_engine(postgres_url)
    try:
        with engine.connect() as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with admin.connect() as conn:  # what a Postgres restart does to pooled connections
            assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
        with engine.connect() as conn:
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid
    finally:
        engine.dispose()
        admin.dispose()
