"""Translation between the mpi protos and the domain: a Patient message as a registration, a stored
record as a Patient message masked as the caller's disclosure allows, scored results."""

from __future__ import annotations

from hie.common.v1 import common_pb2
from hie.mpi.v1 import mpi_pb2
from services.mpi import domain, index, matching, records, tables
from services.mpi.disclosure import Disclosure
from services.shared.timestamps import to_timestamp

GENDER_FROM_PROTO = {
    mpi_pb2.GENDER_MALE: domain.Gender.MALE,
    mpi_pb2.GENDER_FEMALE: domain.Gender.FEMALE,
    mpi_pb2.GENDER_OTHER: domain.Gender.OTHER,
    mpi_pb2.GENDER_UNKNOWN: domain.Gender.UNKNOWN,
    mpi_pb2.GENDER_UNSPECIFIED: domain.Gender.UNKNOWN,
}
GENDER_TO_PROTO = {v: k for k, v in GENDER_FROM_PROTO.items() if k != mpi_pb2.GENDER_UNSPECIFIED}
LINK_TO_PROTO = {
    domain.LinkMethod.NEW: mpi_pb2.LINK_METHOD_NEW,
    domain.LinkMethod.NATIONAL_ID: mpi_pb2.LINK_METHOD_NATIONAL_ID,
    domain.LinkMethod.PROBABILISTIC: mpi_pb2.LINK_METHOD_PROBABILISTIC,
    domain.LinkMethod.STEWARD: mpi_pb2.LINK_METHOD_STEWARD,
    domain.LinkMethod.MERGE: mpi_pb2.LINK_METHOD_MERGE,
}


def registration_of(patient: mpi_pb2.Patient, domain_id: str) -> domain.Registration:
    """Validate a Patient message as a registration of `domain_id`."""
    return domain.validate_registration(
        domain=domain_id,
        local_id=patient.ref.local_id,
        name_text=patient.name.text,
        family=patient.name.family,
        given=patient.name.given,
        gender=GENDER_FROM_PROTO.get(patient.gender, domain.Gender.UNKNOWN),
        birth_date=patient.birth_date,
        phones=list(patient.phones),
        province=patient.address.province,
        city=patient.address.city,
        district=patient.address.district,
        address_line=patient.address.line,
        postal_code=patient.address.postal_code,
        identifiers=[domain.Identifier(system=i.system, value=i.value, type=i.type) for i in patient.identifiers],
    )


def patient_message(record: tables.PatientRecord, disclosure: Disclosure) -> mpi_pb2.Patient:
    """A stored record as a message, masked as the caller's disclosure allows."""
    identifiers = []
    for i in records.record_identifiers(record):
        value = disclosure.identifier(i.value)
        if value is not None:
            identifiers.append(common_pb2.Identifier(system=i.system, value=value, type=i.type))
    if record.national_id:
        value = disclosure.national_id(record.national_id)
        if value is not None:
            identifiers.insert(
                0,
                common_pb2.Identifier(system=domain.NATIONAL_ID_SYSTEM, value=value, type=domain.NATIONAL_ID_TYPE),
            )
    text, family, given = disclosure.name(record.name_text, record.family, record.given)
    address = disclosure.address(
        {
            "province": record.province,
            "city": record.city,
            "district": record.district,
            "line": record.address_line,
            "postal_code": record.postal_code,
        }
    )
    # The hospital's own record number is an identifier too: de-identified views (research,
    # public health) lose it; every other view keeps it (hospitals act on their records by it).
    local_id = record.local_id if disclosure.identifier(record.local_id) is not None else ""
    return mpi_pb2.Patient(
        ref=common_pb2.PatientRef(domain=record.domain, local_id=local_id),
        identifiers=identifiers,
        name=mpi_pb2.HumanName(text=text, family=family, given=given),
        gender=GENDER_TO_PROTO[domain.Gender(record.gender)],
        birth_date=disclosure.birth_date(record.birth_date.isoformat() if record.birth_date else ""),
        phones=[p for p in (disclosure.phone(v) for v in record.phones) if p is not None],
        address=mpi_pb2.Address(**address),
        enterprise_id=record.enterprise_id,
        updated=to_timestamp(record.updated_at),
        record_id=record.id,
        link_method=LINK_TO_PROTO.get(domain.LinkMethod(record.link_method), mpi_pb2.LINK_METHOD_UNSPECIFIED),
    )


def field_agreements(comparison: matching.Comparison) -> list[mpi_pb2.FieldAgreement]:
    return [
        mpi_pb2.FieldAgreement(field=f, level=comparison.levels[f], weight=comparison.weights[f])
        for f in comparison.levels
    ]


def scored_patient(ranked: index.Ranked, disclosure: Disclosure) -> mpi_pb2.ScoredPatient:
    return mpi_pb2.ScoredPatient(
        patient=patient_message(ranked.record, disclosure.of_found(ranked.record.domain)),
        weight=ranked.comparison.total,
        probability=round(ranked.probability, 6),
        grade=ranked.grade,
        fields=field_agreements(ranked.comparison),
    )
