"""IHE PIXm Patient Identity Feed FHIR (ITI-104): a FHIR conditional update
`PUT Patient?identifier=<system>|<value>` adds, revises or, with a `replaced-by` link, merges a
record of the calling hospital; Remove Patient (conditional delete) is refused (405)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from gateway.deps import Context, IdempotencyKey
from gateway.errors import ApiError
from gateway.routes import rpc
from gateway.routes.fhir.models import validate_resource
from gateway.routes.fhir.negotiation import FHIR_JSON
from gateway.routes.fhir.patient.resource import (
    LOCAL_ID_SYSTEM_PREFIX,
    bad,
    invalid_resource,
    objects_of,
    patient_message,
    patient_resource,
    text_of,
)
from hie.common.v1 import common_pb2
from hie.mpi.v1 import mpi_pb2

router = APIRouter(prefix="/fhir/R4", tags=["fhir"])


# A Patient resource is small; anything near the facade's document limit is not one.
_FEED_BODY_LIMIT = 64 * 1024


def _own_local_id(ctx: Context, system: str, value: str, element: str) -> str:
    """The local id of an identifier of the calling hospital's own domain."""
    if system != f"{LOCAL_ID_SYSTEM_PREFIX}{ctx.caller.organization_id}":
        # IHE PIXm ITI-104 (2:3.104.5): "The Patient Identifier Cross-reference Manager should check
        # that the Patient Identity Source is only making changes to Patient Identifier Domain for
        # which it is authorized." A hospital feeds its own domain only.
        raise ApiError(
            403,
            "identifier-domain-forbidden",
            f"{element}: only your own domain's system ({LOCAL_ID_SYSTEM_PREFIX}<your organisation>) may be fed",
        )
    if not value:
        raise bad("identifier-invalid", f"{element}: a local id is required")
    return value


def _survivor(ctx: Context, links: list[dict[str, Any]], active: bool) -> str:
    """The surviving local id of a Resolve Duplicate Patient message (ITI-104 2:3.104.4.2.2: "a link
    of type 'replaced-by' shall be added with the identifier pointing to the surviving patient
    identifier")."""
    if not links:
        raise ApiError(
            422,
            "patient-inactive-unsupported",
            "active=false needs a replaced-by link (a merge); removing a patient is not supported",
        )
    if len(links) != 1 or links[0].get("type") != "replaced-by":
        raise ApiError(422, "link-unsupported", "Patient.link: one link, of type replaced-by (a merge)")
    if active:
        raise invalid_resource("active", "false on a Patient replaced by another")
    other = links[0].get("other")
    identifier = other.get("identifier") if isinstance(other, dict) else None
    if not isinstance(identifier, dict):
        raise invalid_resource("link.other.identifier", "the surviving record's identifier")
    return _own_local_id(
        ctx,
        text_of(identifier.get("system"), "link.other.identifier.system"),
        text_of(identifier.get("value"), "link.other.identifier.value"),
        "Patient.link.other.identifier",
    )


def _retired_resource(subsumed: mpi_pb2.Patient, survivor: mpi_pb2.Patient) -> dict[str, Any]:
    """A record a merge retired, as FHIR has it (Patient.link, "replaced-by")."""
    resource = patient_resource(subsumed)
    resource["active"] = False
    other: dict[str, Any] = {"reference": f"Patient/{survivor.record_id}"}
    if survivor.ref.local_id:
        system = f"{LOCAL_ID_SYSTEM_PREFIX}{survivor.ref.domain}"
        other["identifier"] = {"system": system, "value": survivor.ref.local_id}
    resource["link"] = [{"other": other, "type": "replaced-by"}]
    return resource


async def _check_resource_id(ctx: Context, request: Request, resource_id: object, local_id: str) -> None:
    """FHIR R4 conditional update: an id in the resource must be the id of the record matched;
    the index assigns ids itself (no update-as-create)."""
    if not isinstance(resource_id, str):
        raise invalid_resource("id", "a string")
    try:
        found = await rpc(
            request.app.state.stubs.mpi.GetPatient(
                mpi_pb2.GetPatientRequest(
                    ref=common_pb2.PatientRef(domain=ctx.caller.organization_id, local_id=local_id)
                ),
                metadata=ctx.metadata,
            )
        )
    except ApiError as exc:
        if exc.status != 404:
            raise
        raise bad("resource-id-unknown", "Patient.id: the exchange assigns ids; leave it out to add one") from None
    if found.patient.record_id != resource_id:
        raise bad("resource-id-mismatch", "Patient.id is not the id of the record the identifier names")


@router.put(
    "/Patient",
    response_class=JSONResponse,
    responses={
        200: {"content": {FHIR_JSON: {}}, "description": "the record revised (or, for a merge, retired)"},
        201: {"content": {FHIR_JSON: {}}, "description": "the record added"},
    },
)
async def patient_identity_feed(
    ctx: Context,
    request: Request,
    key: IdempotencyKey,
    identifier: str = Query(max_length=300, description=f"{LOCAL_ID_SYSTEM_PREFIX}<your organisation>|<local id>"),
) -> JSONResponse:
    """IHE PIXm Patient Identity Feed FHIR (ITI-104), a FHIR conditional update on the hospital's
    own identifier: adds (201) or revises (200) the record, whose link the index re-decides; a
    Patient with active=false and a `replaced-by` link to another local id of the hospital merges
    it into that survivor (200, the retired record). Errors are OperationOutcomes naming
    elements, never their values."""
    ctx.require_scope("Patient", "c")
    if ctx.caller.organization_type != "hospital":
        raise ApiError(403, "not-a-hospital", "only a hospital feeds its patients")
    items = list(request.query_params.multi_items())
    if [name for name, _ in items] != ["identifier"]:
        raise bad("conditional-update-invalid", "PUT Patient takes one parameter: identifier=<system>|<local id>")
    system, bar, value = identifier.partition("|")
    if not bar:
        raise bad("conditional-update-invalid", "identifier: <system>|<local id>")
    local_id = _own_local_id(ctx, system, value, "identifier")
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in ("", "application/fhir+json", "application/json"):
        raise ApiError(415, "media-type-unsupported", "send the Patient as application/fhir+json")
    body = await request.body()
    if len(body) > _FEED_BODY_LIMIT:
        raise ApiError(413, "body-too-large", "a Patient resource is at most 64 KiB")
    try:
        resource = json.loads(body)
    except (ValueError, RecursionError):
        raise bad("resource-invalid", "the body is not JSON") from None
    patient = patient_message(validate_resource(resource, "Patient"))
    local_ids = [
        (ident.get("system"), ident.get("value"))
        for ident in resource.get("identifier") or []
        if str(ident.get("system")).startswith(LOCAL_ID_SYSTEM_PREFIX)
    ]
    if (system, local_id) not in local_ids:
        # The conditional update's identifier is the record's; the resource must carry it.
        raise bad("identifier-mismatch", "Patient.identifier must contain the identifier of the URL")
    for other_system, other_value in local_ids:
        if (other_system, other_value) != (system, local_id):
            _own_local_id(ctx, str(other_system), str(other_value), "Patient.identifier")
            raise invalid_resource("identifier", "one local id of your domain per Patient")
    active = resource.get("active", True)
    if not isinstance(active, bool):
        raise invalid_resource("active", "a boolean")
    links = objects_of(resource, "link", "link")
    if "id" in resource:
        await _check_resource_id(ctx, request, resource["id"], local_id)
    if links or not active:
        # Resolve Duplicate Patient: the record named by the URL is retired into the survivor.
        survivor = _survivor(ctx, links, active)
        ctx.require_scope("Patient", "u")
        merged = await rpc(
            request.app.state.stubs.mpi.MergePatients(
                mpi_pb2.MergePatientsRequest(survivor_local_id=survivor, subsumed_local_id=local_id),
                metadata=ctx.metadata,
            )
        )
        return JSONResponse(_retired_resource(merged.subsumed, merged.survivor), media_type=FHIR_JSON)
    patient.ref.local_id = local_id
    result = await rpc(
        request.app.state.stubs.mpi.RegisterPatient(
            mpi_pb2.RegisterPatientRequest(patient=patient, idempotency_key=key),
            metadata=ctx.metadata,
        )
    )
    # Masked as a read of the record is (the service's one masking of every Patient it returns).
    location = f"{request.app.state.settings.public_url}/fhir/R4/Patient/{result.patient.record_id}"
    return JSONResponse(
        patient_resource(result.patient),
        status_code=201 if result.created else 200,
        media_type=FHIR_JSON,
        headers={"Location": location},
    )


# Not an operation the API offers (always 405): left out of the OpenAPI document.
@router.delete("/Patient", response_class=JSONResponse, include_in_schema=False)
async def remove_patient(ctx: Context) -> JSONResponse:
    """ITI-104 Remove Patient (conditional delete) is an option this Manager does not support: a
    hospital retires a record by merging it (replaced-by), the exchange keeps every identity it
    cross-referenced (documents may name it)."""
    # FHIR R4 http.html (delete): a server that refuses to delete resources of a type on principle
    # returns 405 Method Not Allowed.
    raise ApiError(
        405,
        "remove-patient-unsupported",
        "removing a patient is not supported; merge it into the surviving record (replaced-by)",
        headers={"Allow": "GET, PUT"},
    )
