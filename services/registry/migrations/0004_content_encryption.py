"""document content envelope encryption: the wrapped per-document data key

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 07:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("document_entry") as batch:
        batch.add_column(sa.Column("content_key", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("document_entry") as batch:
        batch.drop_column("content_key")
