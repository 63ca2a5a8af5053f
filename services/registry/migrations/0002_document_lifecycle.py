"""document life cycle (relations, status), service-time ordering, shared types, imaging
references, idempotency keys, chunked content

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
    with op.batch_alter_table("document_entry", schema=None) as batch_op:
        batch_op.add_column(sa.Column("service_time", services.shared.db.UtcDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("shared_type", sa.String(length=32), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("relation_type", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("related_document_id", sa.String(length=36), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("content_kind", sa.Integer(), nullable=False, server_default="1"))
        batch_op.add_column(sa.Column("study_instance_uid", sa.String(length=64), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("wado_rs_url", sa.String(length=512), nullable=False, server_default=""))
    op.execute("UPDATE document_entry SET service_time = COALESCE(service_start, created)")
    with op.batch_alter_table("document_entry", schema=None) as batch_op:
        batch_op.alter_column("service_time", nullable=False)
        batch_op.drop_index("ix_entry_patient")
        batch_op.create_index(
            "ix_entry_patient_time", ["patient_domain", "patient_local_id", "service_time", "id"], unique=False
        )
        batch_op.create_index("ix_entry_related", ["related_document_id"], unique=False)
        batch_op.create_index(
            "uq_entry_idempotency_key",
            ["source_organization_id", "idempotency_key"],
            unique=True,
            postgresql_where=sa.text("idempotency_key <> ''"),
            sqlite_where=sa.text("idempotency_key <> ''"),
        )
    op.create_table(
        "document_chunk",
        sa.Column("document_id", sa.String(length=36), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["document_id"], ["document_entry.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("document_id", "seq"),
    )
    # Content registered before chunking becomes one chunk (at most 50 MB, still one row).
    op.execute(
        "INSERT INTO document_chunk (document_id, seq, data) SELECT document_id, 0, content FROM document_content"
    )
    op.drop_table("document_content")


def downgrade() -> None:
    # Content does not go back: documents registered in chunks have no single-row form.
    op.create_table(
        "document_content",
        sa.Column("document_id", sa.String(length=36), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["document_id"], ["document_entry.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("document_id"),
    )
    op.drop_table("document_chunk")
    with op.batch_alter_table("document_entry", schema=None) as batch_op:
        batch_op.drop_index("uq_entry_idempotency_key")
        batch_op.drop_index("ix_entry_related")
        batch_op.drop_index("ix_entry_patient_time")
        batch_op.create_index("ix_entry_patient", ["patient_domain", "patient_local_id", "created"], unique=False)
        for column in (
            "wado_rs_url",
            "study_instance_uid",
            "content_kind",
            "related_document_id",
            "relation_type",
            "shared_type",
            "service_time",
        ):
            batch_op.drop_column(column)
