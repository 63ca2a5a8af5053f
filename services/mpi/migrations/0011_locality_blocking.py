"""locality blocking: file every active record under its new `lp:` / `ln:` keys (the locality
with the first three letters of each Latin name part, or with a Han name)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 04:30:00

Matching also looks candidates up by the locality with the name (`matching._typo_tolerant_keys`):
a record whose postcode is mistyped (digits transposed) together with its street and birth date
shares no other key with its person. As in 0006, 0008 and 0010, each active record gets its new
keys from its opened personal data with the keys the runner passes (blind indexes cannot be
derived from each other); the keys it has are kept.
"""

from collections.abc import Sequence

from alembic import context, op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    from services.mpi.refiling import file_active_records_under_current_keys

    file_active_records_under_current_keys(op.get_bind(), context.config.attributes.get("protection"))


def downgrade() -> None:
    # The new keys cannot be told from the others (blind indexes); the old code never reads them.
    pass
