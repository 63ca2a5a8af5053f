"""probabilistic matching: blocking keys, name frequencies, review tasks, non-matches, merges

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 05:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import services.shared.db

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("patient", schema=None) as batch_op:
        batch_op.add_column(sa.Column("link_score", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("linked_at", services.shared.db.UtcDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("merged_into", sa.String(length=36), nullable=True))
    with op.batch_alter_table("link_history", schema=None) as batch_op:
        batch_op.add_column(sa.Column("previous_enterprise_id", sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column("score", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("reason", sa.String(length=32), server_default="", nullable=False))

    op.create_table(
        "blocking_key",
        sa.Column("key", sa.String(length=128), nullable=False),
        sa.Column("patient_id", sa.String(length=36), nullable=False),
        sa.ForeignKeyConstraint(["patient_id"], ["patient.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("key", "patient_id"),
    )
    op.create_index("ix_blocking_key_patient", "blocking_key", ["patient_id"], unique=False)

    op.create_table(
        "name_frequency",
        sa.Column("field", sa.String(length=16), nullable=False),
        sa.Column("value", sa.String(length=64), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("field", "value"),
    )

    op.create_table(
        "review_task",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("patient_id", sa.String(length=36), nullable=False),
        sa.Column("candidate_id", sa.String(length=36), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("comparison", sa.Text(), nullable=False),
        sa.Column("hold", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", services.shared.db.UtcDateTime(timezone=True), nullable=False),
        sa.Column("decided_at", services.shared.db.UtcDateTime(timezone=True), nullable=True),
        sa.Column("decided_by", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["patient_id"], ["patient.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["candidate_id"], ["patient.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_review_task_status", "review_task", ["status", "created_at"], unique=False)
    op.create_index("ix_review_task_pair", "review_task", ["patient_id", "candidate_id"], unique=False)

    op.create_table(
        "non_match",
        sa.Column("patient_a", sa.String(length=36), nullable=False),
        sa.Column("patient_b", sa.String(length=36), nullable=False),
        sa.Column("decided_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", services.shared.db.UtcDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["patient_a"], ["patient.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["patient_b"], ["patient.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("patient_a", "patient_b"),
    )
    op.create_index("ix_non_match_b", "non_match", ["patient_b"], unique=False)

    op.create_table(
        "merge",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("domain", sa.String(length=64), nullable=False),
        sa.Column("survivor_id", sa.String(length=36), nullable=False),
        sa.Column("subsumed_id", sa.String(length=36), nullable=False),
        sa.Column("moved", sa.Text(), nullable=False),
        sa.Column("created_at", services.shared.db.UtcDateTime(timezone=True), nullable=False),
        sa.Column("decided_by", sa.String(length=64), nullable=False),
        sa.Column("undone_at", services.shared.db.UtcDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["survivor_id"], ["patient.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["subsumed_id"], ["patient.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_merge_subsumed", "merge", ["subsumed_id"], unique=False)

    op.create_table(
        "inbound_message",
        sa.Column("facility", sa.String(length=64), nullable=False),
        sa.Column("control_id", sa.String(length=64), nullable=False),
        sa.Column("ack_code", sa.String(length=2), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=False),
        sa.Column("received_at", services.shared.db.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("facility", "control_id"),
    )

    op.create_table(
        "bulk_load",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("domain", sa.String(length=64), nullable=False),
        sa.Column("rows_done", sa.Integer(), nullable=False),
        sa.Column("counts", sa.Text(), nullable=False),
        sa.Column("updated_at", services.shared.db.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("bulk_load")
    op.drop_table("inbound_message")
    op.drop_index("ix_merge_subsumed", table_name="merge")
    op.drop_table("merge")
    op.drop_index("ix_non_match_b", table_name="non_match")
    op.drop_table("non_match")
    op.drop_index("ix_review_task_pair", table_name="review_task")
    op.drop_index("ix_review_task_status", table_name="review_task")
    op.drop_table("review_task")
    op.drop_table("name_frequency")
    op.drop_index("ix_blocking_key_patient", table_name="blocking_key")
    op.drop_table("blocking_key")
    with op.batch_alter_table("link_history", schema=None) as batch_op:
        batch_op.drop_column("reason")
        batch_op.drop_column("score")
        batch_op.drop_column("previous_enterprise_id")
    with op.batch_alter_table("patient", schema=None) as batch_op:
        batch_op.drop_column("merged_into")
        batch_op.drop_column("linked_at")
        batch_op.drop_column("link_score")
