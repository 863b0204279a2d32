"""Chunk receipts: `chunks.received_at` is set by the worker task as its first act, so the
dispatcher can tell a message that waits in the queue from one that was lost.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("chunks", sa.Column("received_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("chunks", "received_at")
