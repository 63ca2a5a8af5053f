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

import sqlalchemy as sa
from alembic import context, op

revision: str = "0011"
down_revision: str | None = "0010"
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
