"""blocking by birth date and family name, and by name with month and day: file every active
record under its new `d:` and `m:` keys

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-15 10:00:00

Matching no longer reads the birth date + gender block (it grows with the index: ~15 records at
1M, ~300 in a region of 20M) but the birth date with the family name's pinyin
(`matching._birth_date_and_family_keys`), and it also reads the name with the birth month and day
(a birth year mistyped by a digit). The old keys stay (demographic search by birth date still
reads them); each active record gets its new keys, computed from its opened personal data with
the keys the runner passes (`protection`). Blocking keys are blind indexes, so the new keys can
only be derived from the records, not from the old keys.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0006"
down_revision: str | None = "0005"
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
        # Every key of the record: the ones it has are kept (their digests are equal), only the
        # new ones are added.
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
    # The `d:` keys cannot be told from the others (blind indexes); they are harmless to the old
    # code, which never looks them up.
    pass
