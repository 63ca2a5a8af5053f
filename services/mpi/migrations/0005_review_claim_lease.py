"""review claims are leases: the steward whose lapsed claim a new one replaced

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08 10:00:00

A claim's expiry is its `assigned_at` plus the configured lease (HIE_MPI_REVIEW_CLAIM_SECONDS),
computed when read, so no column holds it. Two nullable columns name the steward whose claim had
lapsed when another took the task. Plain ADD COLUMN (no batch table copy on SQLite).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("review_assignment", sa.Column("lapsed_organization_id", sa.String(length=64), nullable=True))
    op.add_column("review_assignment", sa.Column("lapsed_assignee", sa.String(length=64), nullable=True))


def downgrade() -> None:
    op.drop_column("review_assignment", "lapsed_assignee")
    op.drop_column("review_assignment", "lapsed_organization_id")
