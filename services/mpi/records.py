"""Record mapping: a stored record, a `patient` row read with Core, or a registration, as the
matcher's comparable MatchRecord."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.mpi.domain import Identifier, Registration
from services.mpi.matching import MatchRecord, match_record
from services.mpi.sealing import RecordSealing
from services.mpi.tables import PatientRecord


def match_record_of(record: PatientRecord) -> MatchRecord:
    """The comparable form of a stored record."""
    return match_record(
        record_id=record.id,
        domain=record.domain,
        enterprise_id=record.enterprise_id,
        name_text=record.name_text,
        family=record.family,
        given=record.given,
        gender=record.gender,
        birth_date=record.birth_date,
        national_id=record.national_id,
        phones=record.phones,
        province=record.province,
        city=record.city,
        district=record.district,
        address_line=record.address_line,
        postal_code=record.postal_code,
        identifiers=[(i.system, i.value) for i in record.identifiers],
    )


def match_record_of_row(row: Mapping[str, Any], sealing: RecordSealing) -> MatchRecord:
    """The comparable form of a `patient` row read with Core (no ORM object): its sealed part
    opened here."""
    opened = sealing.open(row["id"], row["sealed"])
    return match_record(
        record_id=row["id"],
        domain=row["domain"],
        enterprise_id=row["enterprise_id"],
        name_text=opened["text"],
        family=opened["family"],
        given=opened["given"],
        gender=row["gender"],
        birth_date=row["birth_date"],
        national_id=opened["national_id"],
        phones=opened["phones"],
        province=row["province"],
        city=row["city"],
        district=row["district"],
        address_line=opened["line"],
        postal_code=row["postal_code"],
        identifiers=[(system, value) for system, value, _ in opened["identifiers"]],
    )


def match_record_of_registration(registration: Registration, *, record_id: str, enterprise_id: str) -> MatchRecord:
    """The comparable form of a registration before (or instead of) storing it."""
    return match_record(
        record_id=record_id,
        domain=registration.domain,
        enterprise_id=enterprise_id,
        name_text=registration.name_text,
        family=registration.family,
        given=registration.given,
        gender=registration.gender.value,
        birth_date=registration.birth_date,
        national_id=registration.national_id,
        phones=registration.phones,
        province=registration.province,
        city=registration.city,
        district=registration.district,
        address_line=registration.address_line,
        postal_code=registration.postal_code,
        identifiers=[(i.system, i.value) for i in registration.identifiers],
    )


def record_identifiers(record: PatientRecord) -> list[Identifier]:
    return list(record.identifiers)
