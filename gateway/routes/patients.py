"""Patient registration and cross-reference (REST)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from gateway.deps import Context, IdempotencyKey
from gateway.routes import rpc
from hie.common.v1 import common_pb2
from hie.mpi.v1 import mpi_pb2

router = APIRouter(prefix="/api/v1/patients", tags=["patients"])

_GENDERS = {
    "male": mpi_pb2.GENDER_MALE,
    "female": mpi_pb2.GENDER_FEMALE,
    "other": mpi_pb2.GENDER_OTHER,
    "unknown": mpi_pb2.GENDER_UNKNOWN,
}
_GENDER_NAMES = {v: k for k, v in _GENDERS.items()}
_LINK_METHODS = {
    mpi_pb2.LINK_METHOD_NEW: "new",
    mpi_pb2.LINK_METHOD_NATIONAL_ID: "national-id",
    mpi_pb2.LINK_METHOD_PROBABILISTIC: "probabilistic",
    mpi_pb2.LINK_METHOD_STEWARD: "steward",
    mpi_pb2.LINK_METHOD_MERGE: "merge",
}


class IdentifierIn(BaseModel):
    system: str = Field(max_length=256, json_schema_extra={"minLength": 1})
    value: str = Field(max_length=128, json_schema_extra={"minLength": 1})
    type: str = Field(default="", max_length=16)


class AddressIn(BaseModel):
    province: str = Field(default="", max_length=32)
    city: str = Field(default="", max_length=32)
    district: str = Field(default="", max_length=32)
    line: str = Field(default="", max_length=200)
    postal_code: str = Field(default="", max_length=12)


# The mpi's rules (services/mpi/domain.py), stated in the OpenAPI document; the mpi enforces
# them with its own reasons (`local-id-invalid`, `name-missing`, `birth-date-invalid`, …).
_LOCAL_ID = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,63}$"
# A name: the full name, or else the family or given name, with a non-space character in it.
_A_NAME: dict[str, Any] = {
    "anyOf": [{"required": [field], "properties": {field: {"pattern": r"\S"}}} for field in ("name", "family", "given")]
}


class PatientIn(BaseModel):
    """A patient of the calling hospital, under the hospital's own local id. It needs a name (or
    a family or given name)."""

    model_config = ConfigDict(json_schema_extra=_A_NAME)

    local_id: str = Field(min_length=1, max_length=64, json_schema_extra={"pattern": _LOCAL_ID})
    name: str = Field(default="", max_length=64, description="Full name as written, e.g. 张伟")
    family: str = Field(default="", max_length=64)
    given: str = Field(default="", max_length=64)
    gender: Literal["male", "female", "other", "unknown"] = "unknown"
    birth_date: str = Field(
        default="",
        max_length=10,
        description="YYYY-MM-DD, from 1880 to today",
        json_schema_extra={"anyOf": [{"maxLength": 0}, {"format": "date"}]},
    )
    national_id: str = Field(
        default="",
        max_length=20,
        description="居民身份证号 (18 digits, or legacy 15)",
        json_schema_extra={"pattern": "^([0-9]{17}[0-9Xx]|[0-9]{15})?$"},
    )
    phones: list[str] = Field(default_factory=list, max_length=5)
    address: AddressIn = Field(default_factory=AddressIn)
    identifiers: list[IdentifierIn] = Field(default_factory=list, max_length=20)


def patient_json(patient: mpi_pb2.Patient) -> dict[str, Any]:
    return {
        "domain": patient.ref.domain,
        "local_id": patient.ref.local_id,
        "enterprise_id": patient.enterprise_id,
        "name": patient.name.text,
        "family": patient.name.family,
        "given": patient.name.given,
        "gender": _GENDER_NAMES.get(patient.gender, "unknown"),
        "birth_date": patient.birth_date,
        "identifiers": [{"system": i.system, "value": i.value, "type": i.type} for i in patient.identifiers],
        "phones": list(patient.phones),
        "address": {
            "province": patient.address.province,
            "city": patient.address.city,
            "district": patient.address.district,
            "line": patient.address.line,
            "postal_code": patient.address.postal_code,
        },
    }


@router.post("", status_code=201, responses={200: {"description": "the patient was known: updated"}})
async def register_patient(
    body: PatientIn, ctx: Context, request: Request, response: Response, key: IdempotencyKey
) -> dict[str, Any]:
    """Register (201) or update (200) a patient of the caller's domain, linked to their enterprise id."""
    ctx.require_scope("Patient", "c")
    identifiers = [common_pb2.Identifier(system=i.system, value=i.value, type=i.type) for i in body.identifiers]
    if body.national_id:
        identifiers.append(common_pb2.Identifier(type="NNCHN", value=body.national_id))
    message = mpi_pb2.Patient(
        ref=common_pb2.PatientRef(local_id=body.local_id),
        identifiers=identifiers,
        name=mpi_pb2.HumanName(text=body.name, family=body.family, given=body.given),
        gender=_GENDERS[body.gender],
        birth_date=body.birth_date,
        phones=body.phones,
        address=mpi_pb2.Address(**body.address.model_dump()),
    )
    result = await rpc(
        request.app.state.stubs.mpi.RegisterPatient(
            mpi_pb2.RegisterPatientRequest(patient=message, idempotency_key=key),
            metadata=ctx.metadata,
        )
    )
    if not result.created:
        response.status_code = 200
    return {
        **patient_json(result.patient),
        "created": result.created,
        "link_method": _LINK_METHODS.get(result.link_method, "unknown"),
        "audit_event_ids": list(result.audit_event_ids),
        # A possible match a data steward decides (e.g. a second record of one person at the same
        # hospital): said in the answer, so the registrar knows the link is pending.
        "review_task_ids": list(result.review_task_ids),
        **(
            {"review": "a possible match with another record was sent to a data steward's review"}
            if result.review_task_ids
            else {}
        ),
    }


@router.get("/{local_id}/cross-references")
async def cross_references(local_id: str, ctx: Context, request: Request, domain: str = "") -> dict[str, Any]:
    """PIX: the person's identities in every domain (the caller's own domain unless named)."""
    ctx.require_scope("Patient", "r")
    result = await rpc(
        request.app.state.stubs.mpi.CrossReference(
            mpi_pb2.CrossReferenceRequest(
                ref=common_pb2.PatientRef(domain=domain or ctx.caller.organization_id, local_id=local_id)
            ),
            metadata=ctx.metadata,
        )
    )
    return {
        "enterprise_id": result.enterprise_id,
        "identities": [{"domain": r.domain, "local_id": r.local_id} for r in result.refs],
    }
