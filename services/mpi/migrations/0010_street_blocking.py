"""street blocking: file every active record under its new `sw:` keys (the first words of a
Latin street address with the locality, and with the postcode)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 01:00:00

Matching also looks candidates up by the street (`matching._typo_tolerant_keys`): a record whose
name parts and birth date are mistyped or missing together shares no other key with its person.
As in 0006 and 0008, each active record gets its new keys from its opened personal data with the
keys the runner passes (blind indexes cannot be derived from each other); the keys it has are kept.
"""

from collections.abc import Sequence

from alembic import context, op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    from services.mpi.refiling import file_active_records_under_current_keys

    file_active_records_under_current_keys(op.get_bind(), context.config.attributes.get("protection"))


def downgrade() -> None:
    # The new keys cannot be told from the others (blind indexes); the old code never reads them.
    pass
