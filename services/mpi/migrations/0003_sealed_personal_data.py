"""personal data at rest: one sealed blob per record, blind indexes for every lookup

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 10:10:00

Existing rows are sealed in place with the keys the runner passes (`protection`): the clear
columns are read, sealed into `patient.sealed`, indexed, and then dropped, so no clear copy
remains. Blocking keys and name-frequency values are replaced by their digests.
"""

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BATCH = 1000


def upgrade() -> None:
    op.add_column("patient", sa.Column("sealed", sa.Text(), nullable=True))
    op.add_column("patient", sa.Column("national_id_index", sa.String(length=32), nullable=True))
    op.add_column("patient_identifier", sa.Column("value_index", sa.String(length=32), nullable=True))

    bind = op.get_bind()
    if bind.execute(sa.text("SELECT count(*) FROM patient")).scalar():
        protection = context.config.attributes.get("protection")
        if protection is None:
            raise RuntimeError("sealing the mpi's existing records needs the data keys (HIE_DATA_KEYS_FILE)")
        _seal_rows(bind, protection)

    # Plain ALTER TABLE, not batch mode: on SQLite a batch "move and copy" drops the old patient
    # table, and with foreign keys on that cascades into every table referring to it.
    op.drop_index("ix_patient_national_id", table_name="patient")
    for column in ("name_text", "family", "given", "national_id", "phones", "address_line"):
        op.drop_column("patient", column)
    op.create_index("ix_patient_national_id_index", "patient", ["national_id_index"])
    op.drop_index("ix_patient_identifier_value", table_name="patient_identifier")
    op.drop_column("patient_identifier", "value")
    op.create_index("ix_patient_identifier_value_index", "patient_identifier", ["system", "value_index"])
    op.create_index("ix_patient_identifier_patient_id", "patient_identifier", ["patient_id"])
    if bind.dialect.name != "sqlite":
        # (SQLite cannot add NOT NULL in place; the model requires the values on every write.)
        op.alter_column("patient", "sealed", existing_type=sa.Text(), nullable=False)
        op.alter_column("patient_identifier", "value_index", existing_type=sa.String(length=32), nullable=False)


def _seal_rows(bind: sa.Connection, protection: object) -> None:
    from services.mpi.domain import Gender, Identifier, Registration
    from services.mpi.sealing import RecordSealing

    sealing = RecordSealing(protection)  # type: ignore[arg-type]
    after = ""
    while True:
        rows = bind.execute(
            sa.text(
                "SELECT id, domain, local_id, name_text, family, given, national_id, phones, address_line "
                "FROM patient WHERE id > :after ORDER BY id LIMIT :n"
            ),
            {"after": after, "n": _BATCH},
        ).all()
        if not rows:
            break
        for row in rows:
            identifiers = bind.execute(
                sa.text("SELECT id, system, value, type FROM patient_identifier WHERE patient_id = :p"), {"p": row.id}
            ).all()
            registration = Registration(
                domain=row.domain,
                local_id=row.local_id,
                name_text=row.name_text,
                family=row.family or "",
                given=row.given or "",
                gender=Gender.UNKNOWN,
                national_id=row.national_id,
                phones=tuple(json.loads(row.phones or "[]")),
                address_line=row.address_line or "",
                identifiers=tuple(Identifier(system=i.system, value=i.value, type=i.type) for i in identifiers),
            )
            bind.execute(
                sa.text("UPDATE patient SET sealed = :sealed, national_id_index = :national_id_index WHERE id = :id"),
                {"id": row.id, **sealing.row(row.id, registration)},
            )
            for i in identifiers:
                bind.execute(
                    sa.text("UPDATE patient_identifier SET value_index = :v WHERE id = :id"),
                    {"id": i.id, "v": sealing.identifier(i.system, i.value)},
                )
        after = rows[-1].id

    keys = bind.execute(sa.text("SELECT key, patient_id FROM blocking_key")).all()
    bind.execute(sa.text("DELETE FROM blocking_key"))
    for start in range(0, len(keys), _BATCH):
        bind.execute(
            sa.text("INSERT INTO blocking_key (key, patient_id) VALUES (:k, :p)"),
            [{"k": sealing.key(k), "p": p} for k, p in keys[start : start + _BATCH]],
        )
    counts = bind.execute(sa.text("SELECT field, value, count FROM name_frequency")).all()
    bind.execute(sa.text("DELETE FROM name_frequency"))
    for start in range(0, len(counts), _BATCH):
        bind.execute(
            sa.text("INSERT INTO name_frequency (field, value, count) VALUES (:f, :v, :c)"),
            [{"f": f, "v": sealing.name_value(f, v), "c": c} for f, v, c in counts[start : start + _BATCH]],
        )


def downgrade() -> None:
    raise NotImplementedError("sealed personal data is not written back in clear")
