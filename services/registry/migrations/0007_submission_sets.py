"""submission sets: the SubmissionSet of an MHD ITI-65 bundle (its List) is kept, for ITI-66

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-20 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import services.shared.db

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "submission_set",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("source_id", sa.String(length=128), nullable=False),
        sa.Column("source_organization_id", sa.String(length=64), nullable=False),
        sa.Column("patient_domain", sa.String(length=64), nullable=False),
        sa.Column("patient_local_id", sa.String(length=64), nullable=False),
        sa.Column("enterprise_id", sa.String(length=36), nullable=False),
        sa.Column("title", sa.String(length=256), nullable=False),
        sa.Column("content_type_system", sa.String(length=128), nullable=False),
        sa.Column("content_type_code", sa.String(length=64), nullable=False),
        sa.Column("content_type_display", sa.String(length=128), nullable=False),
        sa.Column("submitted", services.shared.db.UtcDateTime(timezone=True), nullable=False),
        sa.Column("document_ids", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("source_organization_id", "source_id", name="uq_submission_set_source"),
    )
    with op.batch_alter_table("submission_set", schema=None) as batch_op:
        batch_op.create_index(
            "ix_submission_set_patient", ["patient_domain", "patient_local_id", "submitted"], unique=False
        )


def downgrade() -> None:
    op.drop_table("submission_set")
