"""review task assignment (who holds which open task) and the first answers of idempotent
registrations

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 10:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import services.shared.db

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "review_assignment",
        sa.Column("task_id", sa.String(length=36), nullable=False),
        sa.Column("organization_id", sa.String(length=64), nullable=False),
        sa.Column("assignee", sa.String(length=64), nullable=False),
        sa.Column("assigned_by", sa.String(length=64), nullable=False),
        sa.Column("assigned_at", services.shared.db.UtcDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["task_id"], ["review_task.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("task_id"),
    )
    op.create_index("ix_review_assignment_assignee", "review_assignment", ["organization_id", "assignee"], unique=False)
    op.create_table(
        "registration_key",
        sa.Column("organization_id", sa.String(length=64), nullable=False),
        sa.Column("idempotency_key", sa.String(length=128), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("record_id", sa.String(length=36), nullable=False),
        sa.Column("created", sa.Boolean(), nullable=False),
        sa.Column("link_method", sa.String(length=16), nullable=False),
        sa.Column("audit_event_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", services.shared.db.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("organization_id", "idempotency_key"),
    )


def downgrade() -> None:
    op.drop_table("registration_key")
    op.drop_index("ix_review_assignment_assignee", table_name="review_assignment")
    op.drop_table("review_assignment")
