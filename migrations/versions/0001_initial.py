"""Initial schema: tenants, API keys, registered models, jobs and chunks.

Revision ID: 0001
Revises:
Create Date: 2025-11-25
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def _timestamp(name: str, *, nullable: bool = True, now: bool = False) -> sa.Column[Any]:
    default = sa.func.now() if now else None
    return sa.Column(name, sa.DateTime(timezone=True), server_default=default, nullable=nullable)


def _zero(name: str, type_: type[sa.Integer] = sa.Integer) -> sa.Column[Any]:
    return sa.Column(name, type_(), server_default=sa.text("0"), nullable=False)


def upgrade() -> None:
    op.create_table(
        "registered_models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("weights_sha256", sa.String(length=64), nullable=False),
        sa.Column("config", _json(), nullable=False),
        _timestamp("created_at", nullable=False, now=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_registered_models")),
        sa.UniqueConstraint("name", name=op.f("uq_registered_models_name")),
    )

    op.create_table(
        "tenants",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        _timestamp("created_at", nullable=False, now=True),
        sa.Column("max_items_per_job", sa.BigInteger(), nullable=True),
        sa.Column("max_active_jobs", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenants")),
        sa.UniqueConstraint("name", name=op.f("uq_tenants_name")),
    )

    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("prefix", sa.String(length=8), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        _timestamp("created_at", nullable=False, now=True),
        _timestamp("revoked_at"),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_api_keys_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    op.create_index(op.f("ix_api_keys_prefix"), "api_keys", ["prefix"])
    op.create_index(op.f("ix_api_keys_tenant_id"), "api_keys", ["tenant_id"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), server_default="queued", nullable=False),
        sa.Column("queue", sa.String(length=16), server_default="bulk", nullable=False),
        _zero("priority"),
        sa.Column("spec", _json(), nullable=False),
        sa.Column("spec_sha256", sa.String(length=64), nullable=False),
        sa.Column("model_name", sa.String(length=200), nullable=False),
        sa.Column("weights_sha256", sa.String(length=64), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("total_items", sa.BigInteger(), nullable=False),
        sa.Column("chunk_size", sa.Integer(), nullable=False),
        _zero("done_items", sa.BigInteger),
        _zero("failed_items", sa.BigInteger),
        sa.Column("output_uri", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        _timestamp("created_at", nullable=False, now=True),
        _timestamp("started_at"),
        _timestamp("finished_at"),
        _timestamp("updated_at", nullable=False, now=True),
        sa.CheckConstraint(
            "state IN ('queued', 'running', 'finalizing', 'completed', 'failed', 'paused', "
            "'cancelling', 'cancelled')",
            name=op.f("ck_jobs_state"),
        ),
        sa.CheckConstraint("queue IN ('interactive', 'bulk')", name=op.f("ck_jobs_queue")),
        sa.CheckConstraint("chunk_size > 0", name=op.f("ck_jobs_chunk_size_positive")),
        sa.CheckConstraint(
            "total_items >= 0 AND done_items >= 0 AND failed_items >= 0",
            name=op.f("ck_jobs_counts_nonnegative"),
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_jobs_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index("ix_jobs_state_queue", "jobs", ["state", "queue"])
    op.create_index("ix_jobs_tenant_id_created_at", "jobs", ["tenant_id", "created_at"])

    op.create_table(
        "chunks",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("item_start", sa.BigInteger(), nullable=False),
        sa.Column("item_stop", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=16), server_default="pending", nullable=False),
        _zero("attempts"),
        sa.Column("lease_owner", sa.String(length=200), nullable=True),
        sa.Column("lease_token", sa.String(length=36), nullable=True),
        _timestamp("lease_expires_at"),
        _timestamp("published_at"),
        sa.Column("last_error", sa.Text(), nullable=True),
        _zero("done_items"),
        _zero("failed_items"),
        _timestamp("started_at"),
        _timestamp("finished_at"),
        sa.CheckConstraint(
            "state IN ('pending', 'running', 'done', 'failed', 'dead')",
            name=op.f("ck_chunks_state"),
        ),
        sa.CheckConstraint(
            "item_start >= 0 AND item_stop > item_start", name=op.f("ck_chunks_item_range")
        ),
        sa.CheckConstraint(
            "attempts >= 0 AND done_items >= 0 AND failed_items >= 0",
            name=op.f("ck_chunks_counts_nonnegative"),
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_chunks_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_chunks")),
        sa.UniqueConstraint("job_id", "index", name=op.f("uq_chunks_job_id_index")),
    )
    op.create_index(
        "ix_chunks_pending",
        "chunks",
        ["job_id", "index"],
        postgresql_where=sa.text("state = 'pending'"),
        sqlite_where=sa.text("state = 'pending'"),
    )
    op.create_index(
        "ix_chunks_running_lease",
        "chunks",
        ["lease_expires_at"],
        postgresql_where=sa.text("state = 'running'"),
        sqlite_where=sa.text("state = 'running'"),
    )


def downgrade() -> None:
    op.drop_index("ix_chunks_running_lease", table_name="chunks")
    op.drop_index("ix_chunks_pending", table_name="chunks")
    op.drop_table("chunks")
    op.drop_index("ix_jobs_tenant_id_created_at", table_name="jobs")
    op.drop_index("ix_jobs_state_queue", table_name="jobs")
    op.drop_table("jobs")
    op.drop_index(op.f("ix_api_keys_tenant_id"), table_name="api_keys")
    op.drop_index(op.f("ix_api_keys_prefix"), table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("tenants")
    op.drop_table("registered_models")
