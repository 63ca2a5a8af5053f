"""How the mpi stores personal data. A record's direct identifiers and name text (name, national id,
phones, street address, other identifier values) are sealed together in one authenticated
ciphertext (`patient.sealed`, bound to the record id); exact lookups go through keyed blind
indexes: the national id, identifier values, every blocking key and every name value of the
frequency table are stored as HMAC digests. The matcher still compares clear values: they are
opened when a record is loaded (an ORM load hook reads the session's `RecordSealing`), at a few
microseconds per candidate."""

from __future__ import annotations

import json
import logging
from typing import Any

from sqlalchemy import (
    event,
)
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import QueryContext, Session

from services.mpi.domain import Identifier, Registration
from services.mpi.tables import PatientRecord
from services.shared.errors import DataCorruption
from services.shared.protection import DataProtection, TamperedCiphertextError
from services.shared.protection.keyring import UnknownKeyError

_log = logging.getLogger(__name__)


# Where a session finds the sealing (see `sealed_sessions`).
_SEALING = "mpi.sealing"


class RecordSealing:
    """How the mpi stores personal data: one sealed blob per record, blind indexes for lookups."""

    def __init__(self, protection: DataProtection) -> None:
        self._protection = protection

    # -- blind indexes (the same value gives the same digest; the database never sees the value)
    def key(self, blocking_key: str) -> str:
        return self._protection.index.digest("mpi.blocking-key", blocking_key)

    def national_id(self, value: str) -> str:
        return self._protection.index.digest("national-id", value)

    def identifier(self, system: str, value: str) -> str:
        return self._protection.index.digest("identifier", f"{system}|{value}")

    def name_value(self, field: str, value: str) -> str:
        """A name value of the frequency table ("" stays "": it is the field's total row)."""
        return self._protection.index.digest("mpi.name", f"{field}|{value}") if value else ""

    # -- the sealed blob
    def seal(self, record_id: str, registration: Registration) -> str:
        return self._seal_document(record_id, _personal_data(registration))

    def _seal_document(self, record_id: str, document: dict[str, Any]) -> str:
        return self._protection.fields.encrypt(
            json.dumps(document, ensure_ascii=False, separators=(",", ":")), context=sealed_context(record_id)
        )

    def open(self, record_id: str, sealed: str) -> dict[str, Any]:
        """The opened personal data; DataCorruption if it was altered, moved to another row, or is
        under a key this process does not hold (never a guess)."""
        try:
            return json.loads(self._protection.fields.decrypt(sealed, context=sealed_context(record_id)))
        except (TamperedCiphertextError, UnknownKeyError):
            _log.error("mpi record %s failed its integrity check", record_id)
            raise DataCorruption("a patient record failed its integrity check", reason="record-corrupt") from None

    def apply(self, record: PatientRecord, registration: Registration) -> None:
        """Write a registration's personal data to a record: sealed column, indexes, opened view
        (from the registration itself: nothing is decrypted on the way in)."""
        document = _personal_data(registration)
        record.sealed = self._seal_document(record.id, document)
        record.national_id_index = self._national_id_index(registration)
        _set_opened(record, document)

    def row(self, record_id: str, registration: Registration) -> dict[str, Any]:
        """The personal-data columns of a new patient row (bulk insert)."""
        return {
            "sealed": self.seal(record_id, registration),
            "national_id_index": self._national_id_index(registration),
        }

    def _national_id_index(self, registration: Registration) -> str | None:
        return self.national_id(registration.national_id) if registration.national_id else None

    def identifier_rows(self, record_id: str, registration: Registration) -> list[dict[str, Any]]:
        return [
            {
                "patient_id": record_id,
                "system": i.system,
                "value_index": self.identifier(i.system, i.value),
                "type": i.type,
            }
            for i in registration.identifiers
        ]


def _personal_data(registration: Registration) -> dict[str, Any]:
    """What a record seals, in the shape `RecordSealing.open` returns."""
    return {
        "text": registration.name_text,
        "family": registration.family,
        "given": registration.given,
        "national_id": registration.national_id,
        "phones": list(registration.phones),
        "line": registration.address_line,
        "identifiers": [[i.system, i.value, i.type] for i in registration.identifiers],
    }


def sealed_context(record_id: str) -> str:
    """The associated data of a record's sealed blob: a blob copied to another row fails to open."""
    return f"mpi.patient.sealed:{record_id}"


def sealed_sessions(sessions: async_sessionmaker[AsyncSession], protection: DataProtection) -> None:
    """Make a session factory's sessions open and seal the mpi's personal data."""
    info = dict(sessions.kw.get("info") or {})
    info[_SEALING] = RecordSealing(protection)
    sessions.configure(info=info)


def sealing_of(session: AsyncSession | Session) -> RecordSealing:
    sealing = session.info.get(_SEALING)
    if sealing is None:
        # A session from a factory nobody configured would write clear personal data: refuse.
        raise RuntimeError("this session cannot seal personal data (see store.sealed_sessions)")
    return sealing


def _set_opened(record: PatientRecord, opened: dict[str, Any]) -> None:
    record.name_text = opened["text"]
    record.family = opened["family"]
    record.given = opened["given"]
    record.national_id = opened["national_id"]
    record.phones = list(opened["phones"])
    record.address_line = opened["line"]
    record.identifiers = [Identifier(system=s, value=v, type=t) for s, v, t in opened["identifiers"]]


def _open_stored(record: PatientRecord, session: Session) -> None:
    _set_opened(record, sealing_of(session).open(record.id, record.sealed))


@event.listens_for(PatientRecord, "load")
def _open_on_load(record: PatientRecord, context: QueryContext) -> None:
    _open_stored(record, context.session)


@event.listens_for(PatientRecord, "refresh")
def _open_on_refresh(record: PatientRecord, context: QueryContext, attrs: Any) -> None:
    if attrs is None or "sealed" in attrs:
        _open_stored(record, context.session)
