"""PatientIndex gRPC servicer: translates messages, checks the caller, maps errors."""

from __future__ import annotations

import asyncio
import json

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.exc import IntegrityError

from hie.common.v1 import common_pb2
from hie.mpi.v1 import mpi_pb2, mpi_pb2_grpc
from services.mpi import domain, store
from services.shared import gb11643
from services.shared.audit_trail import Action
from services.shared.auth import Caller, caller
from services.shared.errors import InvalidArgument, NotFound
from services.shared.process import ServiceRuntime

# Role per operation (from the hospital's verified user assertion).
_REGISTRARS = ("doctor", "nurse", "data-steward", "admin")
# Auditors resolve a person to build their access report.
_READERS = ("doctor", "nurse", "pharmacist", "technician", "data-steward", "admin", "auditor")
_GENDER_FROM_PROTO = {
    mpi_pb2.GENDER_MALE: domain.Gender.MALE,
    mpi_pb2.GENDER_FEMALE: domain.Gender.FEMALE,
    mpi_pb2.GENDER_OTHER: domain.Gender.OTHER,
    mpi_pb2.GENDER_UNKNOWN: domain.Gender.UNKNOWN,
    mpi_pb2.GENDER_UNSPECIFIED: domain.Gender.UNKNOWN,
}
_GENDER_TO_PROTO = {v: k for k, v in _GENDER_FROM_PROTO.items() if k != mpi_pb2.GENDER_UNSPECIFIED}
_LINK_TO_PROTO = {
    domain.LinkMethod.NEW: mpi_pb2.LINK_METHOD_NEW,
    domain.LinkMethod.NATIONAL_ID: mpi_pb2.LINK_METHOD_NATIONAL_ID,
}


def _registration(patient: mpi_pb2.Patient, domain_id: str) -> domain.Registration:
    return domain.validate_registration(
        domain=domain_id,
        local_id=patient.ref.local_id,
        name_text=patient.name.text,
        family=patient.name.family,
        given=patient.name.given,
        gender=_GENDER_FROM_PROTO.get(patient.gender, domain.Gender.UNKNOWN),
        birth_date=patient.birth_date,
        phones=list(patient.phones),
        province=patient.address.province,
        city=patient.address.city,
        district=patient.address.district,
        address_line=patient.address.line,
        postal_code=patient.address.postal_code,
        identifiers=[domain.Identifier(system=i.system, value=i.value, type=i.type) for i in patient.identifiers],
    )


def patient_message(record: store.PatientRecord, *, reveal_national_id: bool) -> mpi_pb2.Patient:
    """A stored record as a message; the national id is masked unless the caller needs it."""
    identifiers = [
        common_pb2.Identifier(system=i.system, value=i.value, type=i.type) for i in store.record_identifiers(record)
    ]
    if record.national_id:
        value = record.national_id if reveal_national_id else gb11643.mask(record.national_id)
        identifiers.insert(
            0,
            common_pb2.Identifier(system=domain.NATIONAL_ID_SYSTEM, value=value, type=domain.NATIONAL_ID_TYPE),
        )
    updated = Timestamp()
    updated.FromDatetime(record.updated_at)
    return mpi_pb2.Patient(
        ref=common_pb2.PatientRef(domain=record.domain, local_id=record.local_id),
        identifiers=identifiers,
        name=mpi_pb2.HumanName(text=record.name_text, family=record.family, given=record.given),
        gender=_GENDER_TO_PROTO[domain.Gender(record.gender)],
        birth_date=record.birth_date.isoformat() if record.birth_date else "",
        phones=json.loads(record.phones),
        address=mpi_pb2.Address(
            province=record.province,
            city=record.city,
            district=record.district,
            line=record.address_line,
            postal_code=record.postal_code,
        ),
        enterprise_id=record.enterprise_id,
        updated=updated,
    )


def _reveals_national_id(who: Caller) -> bool:
    # Stewards resolve matches on the full number; everyone else sees it masked.
    return who.role == "data-steward"


class PatientIndexServicer(mpi_pb2_grpc.PatientIndexServicer):
    def __init__(self, runtime: ServiceRuntime) -> None:
        self._rt = runtime
        # SQLite has one writer; serialising registrations in-process keeps link decisions
        # atomic there. PostgreSQL uses an advisory lock per blocking key instead.
        self._sqlite_lock = asyncio.Lock() if runtime.engine.dialect.name == "sqlite" else None

    async def RegisterPatient(
        self, request: mpi_pb2.RegisterPatientRequest, context: object
    ) -> mpi_pb2.RegisterPatientResponse:
        who = caller()
        who.require_scope("Patient", "c")
        who.require_role(*_REGISTRARS)
        registration = _registration(request.patient, who.organization_id)
        if self._sqlite_lock is not None:
            async with self._sqlite_lock:
                return await self._register(who, registration)
        try:
            return await self._register(who, registration)
        except IntegrityError:
            # A concurrent retry of the same (domain, local id) won the insert: answer as a retry.
            return await self._register(who, registration)

    async def _register(self, who: Caller, registration: domain.Registration) -> mpi_pb2.RegisterPatientResponse:
        async with self._rt.sessions() as session, session.begin():
            if registration.national_id:
                await store.lock_blocking_key(session, registration.national_id)
            existing = await store.find_record(session, domain=registration.domain, local_id=registration.local_id)
            if existing is None:
                candidates = (
                    await store.national_id_candidates(session, registration.national_id)
                    if registration.national_id
                    else []
                )
                decision = domain.decide_link(registration, candidates)
                record = await store.insert_record(session, registration, decision, decided_by="rule")
                created, method, event_type, action = (
                    True,
                    decision.method,
                    "patient.register",
                    Action.ACTION_CREATE,
                )
            else:
                record = await store.update_record(session, existing, registration)
                created, method = False, domain.LinkMethod(record.link_method)
                event_type, action = "patient.update", Action.ACTION_UPDATE
            event_id = await self._rt.audit.record(
                session,
                caller=who,
                type=event_type,
                action=action,
                patient_enterprise_id=record.enterprise_id,
                entities=[("Patient", f"{record.domain}|{record.local_id}")],
            )
            record = await store.find_record(session, domain=registration.domain, local_id=registration.local_id)
            assert record is not None
            message = patient_message(record, reveal_national_id=_reveals_national_id(who))
        self._rt.outbox.notify()
        return mpi_pb2.RegisterPatientResponse(
            patient=message,
            created=created,
            link_method=_LINK_TO_PROTO.get(method, mpi_pb2.LINK_METHOD_UNSPECIFIED),
            audit_event_ids=[event_id],
        )

    async def CrossReference(
        self, request: mpi_pb2.CrossReferenceRequest, context: object
    ) -> mpi_pb2.CrossReferenceResponse:
        who = caller()
        who.require_scope("Patient", "r")
        who.require_role(*_READERS)
        ref = request.ref
        if not ref.domain or not ref.local_id:
            raise InvalidArgument("patient domain and local id are required", reason="patient-ref-missing")
        if who.organization_type == "hospital" and ref.domain != who.organization_id:
            # PIX from the hospital's own record of the person: another hospital's local ids are
            # not a key a hospital may probe with.
            raise NotFound("no patient with that local id in that domain", reason="patient-not-found")
        async with self._rt.sessions() as session, session.begin():
            record = await store.find_record(session, domain=ref.domain, local_id=ref.local_id)
            if record is None:
                raise NotFound("no patient with that local id in that domain", reason="patient-not-found")
            records = await store.records_of_person(session, record.enterprise_id)
            wanted = set(request.target_domains)
            refs = [
                common_pb2.PatientRef(domain=r.domain, local_id=r.local_id)
                for r in records
                if not wanted or r.domain in wanted
            ]
            if who.is_platform:
                # An exchange service resolving identity inside an operation it audits itself.
                return mpi_pb2.CrossReferenceResponse(enterprise_id=record.enterprise_id, refs=refs)
            await self._rt.audit.record(
                session,
                caller=who,
                type="patient.pix-query",
                action=Action.ACTION_EXECUTE,
                patient_enterprise_id=record.enterprise_id,
                entities=[("Patient", f"{ref.domain}|{ref.local_id}")],
            )
        self._rt.outbox.notify()
        return mpi_pb2.CrossReferenceResponse(enterprise_id=record.enterprise_id, refs=refs)

    async def GetPatient(self, request: mpi_pb2.GetPatientRequest, context: object) -> mpi_pb2.GetPatientResponse:
        who = caller()
        who.require_scope("Patient", "r")
        who.require_role(*_READERS)
        if who.organization_type == "hospital" and request.ref.domain != who.organization_id:
            raise NotFound("no patient with that local id in that domain", reason="patient-not-found")
        async with self._rt.sessions() as session, session.begin():
            record = await store.find_record(session, domain=request.ref.domain, local_id=request.ref.local_id)
            if record is None:
                raise NotFound("no patient with that local id in that domain", reason="patient-not-found")
            await self._rt.audit.record(
                session,
                caller=who,
                type="patient.read",
                action=Action.ACTION_READ,
                patient_enterprise_id=record.enterprise_id,
                entities=[("Patient", f"{record.domain}|{record.local_id}")],
            )
        self._rt.outbox.notify()
        return mpi_pb2.GetPatientResponse(patient=patient_message(record, reveal_national_id=_reveals_national_id(who)))
