"""Filing every active record under the blocking keys the current matcher derives, for the
migrations that add a blocking rule (0010, 0011): blind indexes cannot be derived from each other,
so each record's keys come from its opened personal data; the keys a record has are kept."""

from __future__ import annotations

import datetime
from typing import Any

import sqlalchemy as sa

_BATCH = 1000


def file_active_records_under_current_keys(bind: sa.Connection, protection: Any) -> None:
    """Add the current blocking keys of every active record (no-op on an empty index)."""
    if not bind.execute(sa.text("SELECT count(*) FROM patient WHERE merged_into IS NULL")).scalar():
        return
    if protection is None:
        raise RuntimeError("re-keying the mpi's existing records needs the data keys (HIE_DATA_KEYS_FILE)")

    from services.mpi import matching
    from services.mpi.records import match_record_of_row
    from services.mpi.sealing import RecordSealing

    sealing = RecordSealing(protection)
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
        values["birth_date"] = datetime.date.fromisoformat(values["birth_date"])
    return values
