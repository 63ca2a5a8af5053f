"""The HL7 FHIR R4 facade. For now its CapabilityStatement, which lists exactly what is served:
no FHIR resource interactions yet (they arrive with the mpi, registry, consent and audit issues)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(prefix="/fhir/R4", tags=["fhir"])


@router.get("/metadata")
async def capability_statement(request: Request) -> JSONResponse:
    base = request.app.state.settings.public_url
    statement: dict[str, Any] = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-22",
        "kind": "instance",
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
                    "description": "SMART Backend Services (private_key_jwt); see /.well-known/smart-configuration",
                },
                "resource": [],
            }
        ],
    }
    return JSONResponse(statement, media_type="application/fhir+json")
