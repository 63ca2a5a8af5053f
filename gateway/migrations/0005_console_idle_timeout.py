"""console session last activity (idle timeout)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 00:50:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import services.shared.db

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Sessions open at the upgrade count as active now (no one is signed out by the upgrade).
    with op.batch_alter_table("console_session", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "last_seen_at",
                services.shared.db.UtcDateTime(timezone=True),
                server_default=sa.func.now(),
                nullable=False,
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("console_session", schema=None) as batch_op:
        batch_op.drop_column("last_seen_at")
