"""FHIR `Patient/$match` (IHE PDQm Match, ITI-119): candidates for a Patient, best first, in a
searchset Bundle with `search.score` (probability) and the match-grade extension."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse

from gateway.deps import Context
from gateway.routes import rpc
from gateway.routes.fhir.models import validate_resource
from gateway.routes.fhir.negotiation import FHIR_JSON
from gateway.routes.fhir.patient.resource import bad, patient_message, scored_entry
from hie.mpi.v1 import mpi_pb2

router = APIRouter(prefix="/fhir/R4", tags=["fhir"])


@router.post(
    "/Patient/$match",
    response_class=JSONResponse,
    responses={200: {"content": {FHIR_JSON: {}}, "description": "a searchset Bundle scored and graded"}},
)
async def match_patient(ctx: Context, request: Request, parameters: Annotated[dict[str, Any], Body()]) -> JSONResponse:
    """FHIR Patient/$match: candidates for the given Patient, best first, with `search.score`
    (probability) and the match-grade extension (certain / probable / possible)."""
    ctx.require_scope("Patient", "r")
    if parameters.get("resourceType") != "Parameters":
        raise bad("parameters-invalid", "the body must be a Parameters resource")
    validate_resource(parameters, "Parameters")
    resource: dict[str, Any] | None = None
    count, only_certain = 10, False
    for parameter in parameters.get("parameter") or []:
        if not isinstance(parameter, dict):
            raise bad("parameters-invalid", "the body must be a Parameters resource")
        name = parameter.get("name")
        if name == "resource":
            resource = parameter.get("resource")
        elif name == "count":
            count = parameter.get("valueInteger", 10)
        elif name == "onlyCertainMatches":
            only_certain = parameter.get("valueBoolean") is True
    if resource is None:
        raise bad("parameters-invalid", "the resource parameter is required")
    validate_resource(resource, "Patient", root="Parameters.parameter.resource")
    if not isinstance(count, int) or not 1 <= count <= 100:
        raise bad("parameters-invalid", "count must be 1 to 100")
    result = await rpc(
        request.app.state.stubs.mpi.MatchPatient(
            mpi_pb2.MatchPatientRequest(patient=patient_message(resource), count=count, only_certain=only_certain),
            metadata=ctx.metadata,
        )
    )
    base = request.app.state.settings.public_url
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": len(result.results)}
    if result.results:  # JSON-FHIR has no empty arrays
        bundle["entry"] = [scored_entry(base, r, grade=True) for r in result.results]
    return JSONResponse(bundle, media_type=FHIR_JSON)
