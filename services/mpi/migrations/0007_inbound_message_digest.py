"""HL7 v2 inbound messages keep a digest of their content

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-20 10:00:00

A message whose control id (MSH-10) was used before is a retry only if it says the same thing:
the listener compares the SHA-256 of its content (`mllp.content_digest`, without MSH-7) with the
one kept here, and refuses a different message under a used id (AR, `control-id-reused`). Rows
from before have an empty digest and are taken as retries, as they were. Plain ADD COLUMN.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("inbound_message", sa.Column("digest", sa.String(length=64), nullable=False, server_default=""))


def downgrade() -> None:
    op.drop_column("inbound_message", "digest")
