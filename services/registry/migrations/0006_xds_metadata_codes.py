"""XDS metadata kept as sent: formatCode, healthcareFacilityTypeCode, practiceSettingCode

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-20 11:00:00

MHD ITI-65 sends them as DocumentReference content.format, context.facilityType and
context.practiceSetting; the registry stores each as system / code / display and returns it
(ITI-67, read). Existing entries have none (empty strings). Plain ADD COLUMN with a server default.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = [
    (f"{name}_{part}", length)
    for name in ("format", "facility_type", "practice_setting")
    for part, length in (("system", 128), ("code", 64), ("display", 128))
]


def upgrade() -> None:
    for column, length in _COLUMNS:
        op.add_column("document_entry", sa.Column(column, sa.String(length=length), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("document_entry") as batch:
        for column, _ in reversed(_COLUMNS):
            batch.drop_column(column)
