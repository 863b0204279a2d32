"""Exactly-once outputs: the committed attempt of each chunk, and the finaliser's lease.

`jobs.execution` fixes the micro-batch size, precision and device class of a job's items;
`chunks.claims` counts every claim ever made of a chunk (never reset: it numbers the
attempts' output keys); `chunks.output_tag` names the attempt whose shard objects
(`shards/NNNNNN-<tag>.*`) are canonical; `jobs.finalize_token` / `jobs.finalize_expires_at` let
one finaliser at a time run.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("chunks", sa.Column("output_tag", sa.String(length=32), nullable=True))
    op.add_column(
        "chunks", sa.Column("claims", sa.Integer(), server_default=sa.text("0"), nullable=False)
    )
    op.add_column("jobs", sa.Column("finalize_token", sa.String(length=36), nullable=True))
    op.add_column(
        "jobs", sa.Column("finalize_expires_at", sa.DateTime(timezone=True), nullable=True)
    )
    json_type = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
    op.add_column("jobs", sa.Column("execution", json_type, nullable=True))
    # chunks committed before attempt tags wrote the untagged keys `shards/NNNNNN.*`
    op.execute("UPDATE chunks SET output_tag = '' WHERE state = 'done'")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("finalize_expires_at")
        batch.drop_column("finalize_token")
        batch.drop_column("execution")
    with op.batch_alter_table("chunks") as batch:
        batch.drop_column("claims")
        batch.drop_column("output_tag")
