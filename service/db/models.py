"""Database tables: tenants, API keys, registered models, jobs and their chunks.

The schema changes only through Alembic (`migrations/`); these models must match the latest
revision exactly (a test runs autogenerate against a migrated database and expects no diff).
Everything here works on PostgreSQL (production) and SQLite (the embedded default).
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    PAUSED = "paused"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    EXPIRED = "expired"  # not finished by expires_at: finished shards kept, a valid manifest
    DELETED = "deleted"  # outputs deleted after retain_days (service.retention)


TERMINAL_JOB_STATES = frozenset(
    {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED, JobState.DELETED}
)


class ChunkState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    DEAD = "dead"


class Queue(StrEnum):
    INTERACTIVE = "interactive"
    BULK = "bulk"


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    """A UUIDv7 string: random, but ordered by creation time (keeps B-tree inserts local)."""
    value = (time.time_ns() // 1_000_000 & (1 << 48) - 1) << 80 | int.from_bytes(os.urandom(10))
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # RFC 4122 variant
    return str(uuid.UUID(int=value))


class UTCDateTime(TypeDecorator[datetime]):
    """`DateTime(timezone=True)` that always returns aware UTC datetimes.

    SQLite has no time zone storage: values are stored as naive UTC and given `UTC` back on load.
    Naive datetimes are refused on the way in, so local times cannot slip in unnoticed.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: use an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONType = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments an INTEGER PRIMARY KEY (a BIGINT key would stay NULL).
BigIntId = BigInteger().with_variant(Integer(), "sqlite")


def _in(column: str, values: type[StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSONType}


class Tenant(Base):
    """A customer; every job, key and quota belongs to exactly one. NULL quotas mean unlimited."""

    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    max_items_per_job: Mapped[int | None] = mapped_column(BigInteger)
    max_active_jobs: Mapped[int | None] = mapped_column(Integer)

    api_keys: Mapped[list[ApiKey]] = relationship(back_populates="tenant", passive_deletes=True)


class ApiKey(Base):
    """A bearer key. Only `prefix` (the key's first 8 characters, for lookup) and the SHA-256 of
    the whole key are stored; see `service.db.keys`."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(8), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    revoked_at: Mapped[datetime | None]

    tenant: Mapped[Tenant] = relationship(back_populates="api_keys")


class RegisteredModel(Base):
    """A named, versioned, hash-checked weights folder that jobs can use."""

    __tablename__ = "registered_models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    version: Mapped[str] = mapped_column(String(64))
    uri: Mapped[str] = mapped_column(Text)
    weights_sha256: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())


class Job(Base):
    """One generation job. Items are enumerated lazily from `spec`; only chunks have rows."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("state", JobState), name="state"),
        CheckConstraint(_in("queue", Queue), name="queue"),
        CheckConstraint("chunk_size > 0", name="chunk_size_positive"),
        CheckConstraint(
            "total_items >= 0 AND done_items >= 0 AND failed_items >= 0", name="counts_nonnegative"
        ),
        Index("ix_jobs_tenant_id_created_at", "tenant_id", "created_at"),
        Index("ix_jobs_state_queue", "state", "queue"),
        Index(
            "ix_jobs_expires_at",
            "expires_at",
            postgresql_where=text("expires_at IS NOT NULL"),
            sqlite_where=text("expires_at IS NOT NULL"),
        ),
        Index(
            "ix_jobs_retain_finished",
            "finished_at",
            postgresql_where=text("retain_days IS NOT NULL AND deleted_at IS NULL"),
            sqlite_where=text("retain_days IS NOT NULL AND deleted_at IS NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(
        String(16), default=JobState.QUEUED, server_default=JobState.QUEUED.value
    )
    queue: Mapped[str] = mapped_column(
        String(16), default=Queue.BULK, server_default=Queue.BULK.value
    )
    # Within a queue, higher runs first; fair share between tenants is decided by the dispatcher.
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    spec: Mapped[dict[str, Any]]
    spec_sha256: Mapped[str] = mapped_column(String(64))
    model_name: Mapped[str] = mapped_column(String(200))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    total_items: Mapped[int] = mapped_column(BigInteger)
    chunk_size: Mapped[int] = mapped_column(Integer)
    done_items: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    failed_items: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    output_uri: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]  # unfinished by then: expired
    retain_days: Mapped[int | None] = mapped_column(Integer)  # outputs kept after finished_at
    deleted_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(
        default=utcnow, onupdate=utcnow, server_default=func.now()
    )
    # micro-batch size, precision and device class the job's items are made with (see
    # `service.jobs.execution_of`); None for jobs submitted before it was recorded
    execution: Mapped[dict[str, Any] | None]
    # the finaliser's lease: one finalisation at a time, taken over only once it expires
    finalize_token: Mapped[str | None] = mapped_column(String(36))
    finalize_expires_at: Mapped[datetime | None]

    tenant: Mapped[Tenant] = relationship()
    chunks: Mapped[list[Chunk]] = relationship(
        back_populates="job",
        order_by="Chunk.index",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )


class WebhookDelivery(Base):
    """One notification of a job's terminal state to its `callback_url`, with its attempts: sent
    by `service.webhooks.deliver_due`, retried with backoff until delivered or given up."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint("state IN ('pending', 'delivered', 'failed')", name="state"),
        Index(
            "ix_webhook_deliveries_due",
            "next_attempt_at",
            postgresql_where=text("state = 'pending'"),
            sqlite_where=text("state = 'pending'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    url: Mapped[str] = mapped_column(Text)
    event: Mapped[str] = mapped_column(String(32))  # job.completed, job.expired, ...
    body: Mapped[str] = mapped_column(Text)  # exactly the bytes signed and sent
    state: Mapped[str] = mapped_column(String(16), default="pending", server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    delivered_at: Mapped[datetime | None]


class Chunk(Base):
    """A contiguous item range `[item_start, item_stop)` of a job: the unit of dispatch, retry,
    commit and output (one shard). A running chunk holds a lease renewed by heartbeat."""

    __tablename__ = "chunks"
    __table_args__ = (
        UniqueConstraint("job_id", "index"),
        CheckConstraint(_in("state", ChunkState), name="state"),
        CheckConstraint("item_start >= 0 AND item_stop > item_start", name="item_range"),
        CheckConstraint(
            "attempts >= 0 AND done_items >= 0 AND failed_items >= 0", name="counts_nonnegative"
        ),
        # Dispatcher: next pending chunks of a job, in order. Partial, so it stays small.
        Index(
            "ix_chunks_pending",
            "job_id",
            "index",
            postgresql_where=text("state = 'pending'"),
            sqlite_where=text("state = 'pending'"),
        ),
        # Sweeper: running chunks whose lease has expired.
        Index(
            "ix_chunks_running_lease",
            "lease_expires_at",
            postgresql_where=text("state = 'running'"),
            sqlite_where=text("state = 'running'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    item_start: Mapped[int] = mapped_column(BigInteger)
    item_stop: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(
        String(16), default=ChunkState.PENDING, server_default=ChunkState.PENDING.value
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_token: Mapped[str | None] = mapped_column(String(36))
    lease_expires_at: Mapped[datetime | None]
    published_at: Mapped[datetime | None]
    # set by the worker task as its first act: a message received after its publication was
    # delivered, so the dispatcher never re-sends it as lost
    received_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    done_items: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    failed_items: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # the committed attempt: its shard objects are `shards/NNNNNN-<output_tag>.*`; kept (with
    # done/failed_items) until another attempt commits
    output_tag: Mapped[str | None] = mapped_column(String(32))
    # every claim ever made (never reset, unlike `attempts`): claim n writes `shards/NNNNNN-n.*`
    claims: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))

    job: Mapped[Job] = relationship(back_populates="chunks")
