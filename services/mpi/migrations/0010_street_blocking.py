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

import sqlalchemy as sa
from alembic import context, op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BATCH = 1000


def upgrade() -> None:
    bind = op.get_bind()
    if not bind.execute(sa.text("SELECT count(*) FROM patient WHERE merged_into IS NULL")).scalar():
        return
    protection = context.config.attributes.get("protection")
    if protection is None:
        raise RuntimeError("re-keying the mpi's existing records needs the data keys (HIE_DATA_KEYS_FILE)")

    from services.mpi import matching
    from services.mpi.records import match_record_of_row
    from services.mpi.sealing import RecordSealing

    sealing = RecordSealing(protection)  # type: ignore[arg-type]
    after = ""
    while True:
        rows = (
            bind.execute(
                sa.text(
                    "SELECT id, domain, enterprise_id, sealed, gender, birth_date, province, city, district, "
                    "postal_code FROM patient WHERE id > :after AND merged_into IS NULL ORDER BY id LIMIT :n"
                ),
                {"after": after, "n": _BATCH},
            )
            .mappings()
            .all()
        )
        if not rows:
            break
        new = []
        for row in rows:
            record = match_record_of_row(_dated(row), sealing)
            new += [{"k": sealing.key(k), "p": row["id"]} for k in sorted(matching.blocking_keys(record))]
        bind.execute(sa.text("INSERT INTO blocking_key (key, patient_id) VALUES (:k, :p) ON CONFLICT DO NOTHING"), new)
        after = rows[-1]["id"]


def _dated(row: sa.RowMapping) -> dict[str, object]:
    # SQLite hands a DATE column back as text through plain SQL.
    values = dict(row)
    if isinstance(values["birth_date"], str):
        import datetime

        values["birth_date"] = datetime.date.fromisoformat(values["birth_date"])
    return values


def downgrade() -> None:
    # The new keys cannot be told from the others (blind indexes); the old code never reads them.
    pass
