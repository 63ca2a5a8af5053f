"""The FHIR facade's CapabilityStatement (`GET /fhir/R4/metadata`), assembled from the resource
modules, and the routers of them all.

Adding a FHIR resource: a module in this package with `router` (an APIRouter under /fhir/R4),
`CAPABILITY_RESOURCES` (its entries of CapabilityStatement.rest.resource) and, if it implements
IHE actors, `INSTANTIATES`; then one entry in RESOURCES below.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gateway.routes.fhir import audit_event, consent, documents, patient, referral, teleconsult
from gateway.routes.fhir.negotiation import FHIR_JSON

# In the statement's order and the order their routes are matched in. Teleconsultation before
# referral: its reads of ServiceRequest, Task and Appointment hand an id that is not a
# consultation's on to the referral module.
RESOURCES = (audit_event, consent, patient, documents, teleconsult, referral)

router = APIRouter(prefix="/fhir/R4", tags=["fhir"])


@router.get("/metadata")
async def capability_statement(request: Request) -> JSONResponse:
    """The CapabilityStatement: exactly the resources and interactions served."""
    base = request.app.state.settings.public_url
    statement: dict[str, Any] = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-22",
        "kind": "instance",
        "instantiates": [url for module in RESOURCES for url in getattr(module, "INSTANTIATES", [])],
        "software": {"name": "hie-exchange", "version": "0.1.0"},
        "implementation": {"description": "Regional health information exchange", "url": f"{base}/fhir/R4"},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json"],
        "rest": [
            {
                "mode": "server",
                "security": {
                    "service": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                    "code": "SMART-on-FHIR",
                                }
                            ]
                        }
                    ],
                    "extension": [
                        {
                            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                            "extension": [{"url": "token", "valueUri": f"{base}/oauth2/token"}],
                        }
                    ],
                    "description": "SMART Backend Services (private_key_jwt); see /.well-known/smart-configuration. "
                    "Every request also carries the hospital's signed user assertion (X-HIE-User-Assertion).",
                },
                "resource": [entry for module in RESOURCES for entry in module.CAPABILITY_RESOURCES],
            }
        ],
    }
    return JSONResponse(statement, media_type=FHIR_JSON)


def routers() -> list[APIRouter]:
    """The facade's routers: the statement's, then each resource module's, in RESOURCES order."""
    return [router, *(module.router for module in RESOURCES)]
