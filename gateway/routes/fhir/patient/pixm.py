"""IHE PIXm Query (ITI-83), `Patient/$ihe-pix`: a person's identifiers in the other domains and
the enterprise id, from one local identifier."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from gateway.deps import Context
from gateway.errors import ApiError
from gateway.routes import rpc
from gateway.routes.fhir.negotiation import FHIR_JSON
from gateway.routes.fhir.patient.resource import ENTERPRISE_ID_SYSTEM, LOCAL_ID_SYSTEM_PREFIX, bad, split_token
from hie.common.v1 import common_pb2
from hie.mpi.v1 import mpi_pb2

router = APIRouter(prefix="/fhir/R4", tags=["fhir"])


@router.get("/Patient/$ihe-pix", response_class=JSONResponse)
async def ihe_pix(
    ctx: Context,
    request: Request,
    source_identifier: str = Query(alias="sourceIdentifier", max_length=300),
    target_system: list[str] = Query(default=[], alias="targetSystem"),
) -> JSONResponse:
    """IHE PIXm: the person's identifiers in other domains, from one local identifier
    (`sourceIdentifier=urn:hie:patient-id:<domain>|<local id>`). Not found is 404."""
    ctx.require_scope("Patient", "r")
    system, value = split_token(source_identifier)
    if not system.startswith(LOCAL_ID_SYSTEM_PREFIX) or not value:
        raise bad("source-identifier-invalid", f"sourceIdentifier: {LOCAL_ID_SYSTEM_PREFIX}<domain>|<local id>")
    targets = []
    for target in target_system:
        if target == ENTERPRISE_ID_SYSTEM:
            continue
        if not target.startswith(LOCAL_ID_SYSTEM_PREFIX):
            # IHE PIXm: "targetSystem ... not recognized" is a 403 with an OperationOutcome.
            raise ApiError(403, "target-system-unknown", "targetSystem is not a domain of this exchange")
        targets.append(target.removeprefix(LOCAL_ID_SYSTEM_PREFIX))
    result = await rpc(
        request.app.state.stubs.mpi.CrossReference(
            mpi_pb2.CrossReferenceRequest(
                ref=common_pb2.PatientRef(domain=system.removeprefix(LOCAL_ID_SYSTEM_PREFIX), local_id=value),
                target_domains=targets,
            ),
            metadata=ctx.metadata,
        )
    )
    parameter: list[dict[str, Any]] = [
        {
            "name": "targetIdentifier",
            "valueIdentifier": {"system": f"{LOCAL_ID_SYSTEM_PREFIX}{ref.domain}", "value": ref.local_id},
        }
        for ref in result.refs
        if not (ref.domain == system.removeprefix(LOCAL_ID_SYSTEM_PREFIX) and ref.local_id == value)
    ]
    if not target_system or ENTERPRISE_ID_SYSTEM in target_system:
        parameter.append(
            {
                "name": "targetIdentifier",
                "valueIdentifier": {"system": ENTERPRISE_ID_SYSTEM, "value": result.enterprise_id},
            }
        )
    return JSONResponse({"resourceType": "Parameters", "parameter": parameter}, media_type=FHIR_JSON)
