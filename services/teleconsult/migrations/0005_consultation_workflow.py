"""consultation workflow: application form, sealed free text, participants, messages, report
versions, specialist directory, on-call rosters, bookable slots

Existing rows are sealed in place with the keys the runner passes (`protection`): a
consultation's clear question moves into `consultation.sealed` and every history reason is
sealed, so no clear copy remains.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 22:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

import services.shared.db

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIME = services.shared.db.UtcDateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("consultation", schema=None) as batch_op:
        batch_op.add_column(sa.Column("urgency", sa.Integer(), server_default="1", nullable=False))
        batch_op.add_column(sa.Column("sealed", sa.Text(), nullable=True))
        for name, length in (("department", 64), ("specialty", 64), ("professional_title", 32)):
            batch_op.add_column(sa.Column(name, sa.String(length=length), server_default="", nullable=False))
        batch_op.add_column(
            sa.Column("invited_practitioner_id", sa.String(length=64), server_default="", nullable=False)
        )
        batch_op.add_column(sa.Column("any_available", sa.Boolean(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("imaging_studies", sa.Text(), server_default="[]", nullable=False))
        batch_op.add_column(sa.Column("informed_consent", sa.Text(), server_default="", nullable=False))
        batch_op.add_column(
            sa.Column("business_status", sa.String(length=32), server_default="requested", nullable=False)
        )
        batch_op.add_column(sa.Column("decline_code", sa.String(length=32), server_default="", nullable=False))
        batch_op.add_column(sa.Column("appointment_start", _TIME, nullable=True))
        batch_op.add_column(sa.Column("appointment_end", _TIME, nullable=True))
        batch_op.add_column(sa.Column("join_url", sa.String(length=512), server_default="", nullable=False))
        batch_op.add_column(sa.Column("report_version", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("reported_at", _TIME, nullable=True))
    op.create_table(
        "consultation_participant",
        sa.Column("consultation_id", sa.String(length=36), nullable=False),
        sa.Column("practitioner_id", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("consultation_id", "practitioner_id"),
    )
    op.create_index(
        "ix_consultation_participant_practitioner_id", "consultation_participant", ["practitioner_id"], unique=False
    )
    op.create_table(
        "consultation_message",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("consultation_id", sa.String(length=36), nullable=False),
        sa.Column("organization_id", sa.String(length=64), nullable=False),
        sa.Column("practitioner_id", sa.String(length=64), nullable=False),
        sa.Column("move", sa.String(length=32), nullable=False),
        sa.Column("sealed", sa.Text(), nullable=False),
        sa.Column("sent_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_consultation_message_consultation_id", "consultation_message", ["consultation_id"], unique=False
    )
    op.create_table(
        "consultation_report",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("consultation_id", sa.String(length=36), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("sealed", sa.Text(), nullable=False),
        sa.Column("signature_jws", sa.Text(), nullable=False),
        sa.Column("signer_jwk", sa.Text(), nullable=False),
        sa.Column("signer_practitioner_id", sa.String(length=64), nullable=False),
        sa.Column("signed_at", _TIME, nullable=True),
        sa.Column("document_id", sa.String(length=36), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("sm2_signature", sa.Text(), server_default="", nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("consultation_id", "version", name="uq_consultation_report_version"),
    )
    op.create_index("ix_consultation_report_consultation_id", "consultation_report", ["consultation_id"], unique=False)
    op.create_table(
        "specialist",
        sa.Column("organization_id", sa.String(length=64), nullable=False),
        sa.Column("practitioner_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("department", sa.String(length=64), nullable=False),
        sa.Column("specialty", sa.String(length=64), nullable=False),
        sa.Column("professional_title", sa.String(length=32), nullable=False),
        sa.Column("years_independent_practice", sa.Integer(), nullable=False),
        sa.Column("kinds", sa.Text(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("organization_id", "practitioner_id"),
    )
    op.create_table(
        "roster_shift",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("organization_id", sa.String(length=64), nullable=False),
        sa.Column("practitioner_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.Integer(), nullable=False),
        sa.Column("start_at", _TIME, nullable=False),
        sa.Column("end_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_roster_shift_org_kind", "roster_shift", ["organization_id", "kind", "start_at"], unique=False)
    op.create_table(
        "consultation_slot",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("organization_id", sa.String(length=64), nullable=False),
        sa.Column("practitioner_id", sa.String(length=64), nullable=False),
        sa.Column("start_at", _TIME, nullable=False),
        sa.Column("end_at", _TIME, nullable=False),
        sa.Column("consultation_id", sa.String(length=36), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("organization_id", "practitioner_id", "start_at", name="uq_consultation_slot_start"),
    )
    op.create_index("ix_consultation_slot_consultation_id", "consultation_slot", ["consultation_id"], unique=False)
    bind = op.get_bind()
    if (
        bind.execute(sa.text("SELECT count(*) FROM consultation")).scalar()
        or bind.execute(sa.text("SELECT count(*) FROM consultation_state_change")).scalar()
    ):
        protection = context.config.attributes.get("protection")
        if protection is None:
            raise RuntimeError("sealing the consultations' free text needs the data keys (HIE_DATA_KEYS_FILE)")
        _seal_rows(bind, protection)


def _seal_rows(bind: sa.Connection, protection: object) -> None:
    import json

    from services.teleconsult.store import history_context, sealed_context

    fields = protection.fields  # type: ignore[attr-defined]
    for row in bind.execute(sa.text("SELECT id, question FROM consultation")).all():
        form = {"question": row.question or "", "purpose": "", "summary": ""}
        sealed = fields.encrypt(json.dumps(form, ensure_ascii=False), context=sealed_context(row.id))
        bind.execute(
            sa.text("UPDATE consultation SET sealed = :s, question = '' WHERE id = :i"), {"s": sealed, "i": row.id}
        )
    for row in bind.execute(sa.text("SELECT id, reason FROM consultation_state_change")).all():
        bind.execute(
            sa.text("UPDATE consultation_state_change SET reason = :s WHERE id = :i"),
            {"s": fields.encrypt(row.reason or "", context=history_context(row.id)), "i": row.id},
        )


def downgrade() -> None:
    for table in (
        "consultation_slot",
        "roster_shift",
        "specialist",
        "consultation_report",
        "consultation_message",
        "consultation_participant",
    ):
        op.drop_table(table)
    with op.batch_alter_table("consultation", schema=None) as batch_op:
        for name in (
            "reported_at",
            "report_version",
            "join_url",
            "appointment_end",
            "appointment_start",
            "decline_code",
            "business_status",
            "informed_consent",
            "imaging_studies",
            "any_available",
            "invited_practitioner_id",
            "professional_title",
            "specialty",
            "department",
            "sealed",
            "urgency",
        ):
            batch_op.drop_column(name)
