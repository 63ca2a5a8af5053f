"""subscriptions and the notification dead-letter list

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import services.shared.db

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "subscription",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("organization_id", sa.String(length=64), nullable=False),
        sa.Column("topic", sa.Integer(), nullable=False),
        sa.Column("patient_domain", sa.String(length=64), nullable=False),
        sa.Column("patient_local_id", sa.String(length=64), nullable=False),
        sa.Column("type_code", sa.String(length=64), nullable=False),
        sa.Column("endpoint_url", sa.String(length=512), nullable=False),
        sa.Column("expires", services.shared.db.UtcDateTime(timezone=True), nullable=False),
        sa.Column("created", services.shared.db.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("subscription", schema=None) as batch_op:
        batch_op.create_index("ix_subscription_patient", ["topic", "patient_domain", "patient_local_id"], unique=False)
        batch_op.create_index("ix_subscription_type", ["topic", "type_code"], unique=False)
        batch_op.create_index("ix_subscription_org", ["organization_id"], unique=False)
    op.create_table(
        "notification_dead_letter",
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("subscription_id", sa.String(length=36), nullable=False),
        sa.Column("organization_id", sa.String(length=64), nullable=False),
        sa.Column("endpoint_url", sa.String(length=512), nullable=False),
        sa.Column("event_type", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.String(length=200), nullable=False),
        sa.Column("created", services.shared.db.UtcDateTime(timezone=True), nullable=False),
        sa.Column("dead_lettered", services.shared.db.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("event_id"),
    )
    with op.batch_alter_table("notification_dead_letter", schema=None) as batch_op:
        batch_op.create_index("ix_dead_letter_org", ["organization_id", "dead_lettered"], unique=False)


def downgrade() -> None:
    op.drop_table("notification_dead_letter")
    op.drop_table("subscription")
