"""The dataset builder's contract: job expiry, output retention and webhook deliveries.

Jobs gain `expires_at` (a job not finished by then becomes `expired`), `retain_days` (a finished
job's outputs are deleted that many days after it finished, and it becomes `deleted`) and
`deleted_at`; the state check admits `expired` and `deleted`. SQLite alters the table by copying
it (batch mode). `webhook_deliveries` records each notification of a job's terminal state to its
`callback_url` and its attempts (service.webhooks).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STATES = "'queued', 'running', 'finalizing', 'completed', 'failed', 'paused', 'cancelling', "
OLD_STATES = f"state IN ({_STATES}'cancelled')"
NEW_STATES = f"state IN ({_STATES}'cancelled', 'expired', 'deleted')"


def _jobs(*, revision_0002: bool) -> sa.Table:
    """The jobs table as it is before the change, for SQLite's copy-and-move (given whole, so
    that nothing is lost to reflection and `--sql` works without a database)."""
    json = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")

    def stamp(name: str, *, now: bool = False) -> sa.Column[Any]:
        default = sa.func.now() if now else None
        return sa.Column(name, sa.DateTime(timezone=True), server_default=default, nullable=not now)

    def zero(name: str, type_: type[sa.Integer] = sa.Integer) -> sa.Column[Any]:
        return sa.Column(name, type_(), server_default=sa.text("0"), nullable=False)

    added = (
        [stamp("expires_at"), sa.Column("retain_days", sa.Integer()), stamp("deleted_at")]
        if revision_0002
        else []
    )
    return sa.Table(
        "jobs",
        sa.MetaData(),
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), server_default="queued", nullable=False),
        sa.Column("queue", sa.String(length=16), server_default="bulk", nullable=False),
        zero("priority"),
        sa.Column("spec", json, nullable=False),
        sa.Column("spec_sha256", sa.String(length=64), nullable=False),
        sa.Column("model_name", sa.String(length=200), nullable=False),
        sa.Column("weights_sha256", sa.String(length=64), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("total_items", sa.BigInteger(), nullable=False),
        sa.Column("chunk_size", sa.Integer(), nullable=False),
        zero("done_items", sa.BigInteger),
        zero("failed_items", sa.BigInteger),
        sa.Column("output_uri", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        stamp("created_at", now=True),
        stamp("started_at"),
        stamp("finished_at"),
        stamp("updated_at", now=True),
        *added,
        sa.CheckConstraint(NEW_STATES if revision_0002 else OLD_STATES, name="ck_jobs_state"),
        sa.CheckConstraint("queue IN ('interactive', 'bulk')", name="ck_jobs_queue"),
        sa.CheckConstraint("chunk_size > 0", name="ck_jobs_chunk_size_positive"),
        sa.CheckConstraint(
            "total_items >= 0 AND done_items >= 0 AND failed_items >= 0",
            name="ck_jobs_counts_nonnegative",
        ),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_jobs_tenant_id_tenants"),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.Index("ix_jobs_state_queue", "state", "queue"),
        sa.Index("ix_jobs_tenant_id_created_at", "tenant_id", "created_at"),
    )


def upgrade() -> None:
    with op.batch_alter_table("jobs", copy_from=_jobs(revision_0002=False)) as batch:
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("retain_days", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
        batch.drop_constraint(op.f("ck_jobs_state"), type_="check")
        batch.create_check_constraint("state", NEW_STATES)
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "state IN ('pending', 'delivered', 'failed')",
            name=op.f("ck_webhook_deliveries_state"),
        ),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["jobs.id"],
            name=op.f("fk_webhook_deliveries_job_id_jobs"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_webhook_deliveries_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
    )
    op.create_index("ix_webhook_deliveries_job_id", "webhook_deliveries", ["job_id"])
    op.create_index(
        "ix_webhook_deliveries_due",
        "webhook_deliveries",
        ["next_attempt_at"],
        postgresql_where=sa.text("state = 'pending'"),
        sqlite_where=sa.text("state = 'pending'"),
    )
    # the cleaners' scans: unfinished jobs by deadline, finished jobs by finish time
    op.create_index(
        "ix_jobs_expires_at",
        "jobs",
        ["expires_at"],
        postgresql_where=sa.text("expires_at IS NOT NULL"),
        sqlite_where=sa.text("expires_at IS NOT NULL"),
    )
    op.create_index(
        "ix_jobs_retain_finished",
        "jobs",
        ["finished_at"],
        postgresql_where=sa.text("retain_days IS NOT NULL AND deleted_at IS NULL"),
        sqlite_where=sa.text("retain_days IS NOT NULL AND deleted_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_table("webhook_deliveries")
    op.drop_index("ix_jobs_retain_finished", table_name="jobs")
    op.drop_index("ix_jobs_expires_at", table_name="jobs")
    # the old check cannot hold expired or deleted jobs: they read as cancelled
    op.execute("UPDATE jobs SET state = 'cancelled' WHERE state IN ('expired', 'deleted')")
    with op.batch_alter_table("jobs", copy_from=_jobs(revision_0002=True)) as batch:
        batch.drop_constraint(op.f("ck_jobs_state"), type_="check")
        batch.create_check_constraint("state", OLD_STATES)
        batch.drop_column("deleted_at")
        batch.drop_column("retain_days")
        batch.drop_column("expires_at")
