"""FHIR R4 Patient, one module per IHE transaction: PDQm search and read (pdqm.py), `$match`
(match.py), PIXm `$ihe-pix` (pixm.py) and the PIXm Patient Identity Feed, ITI-104 (feed.py); the
resource's mapping and CapabilityStatement entry in resource.py."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.routes.fhir.patient import feed, match, pdqm, pixm
from gateway.routes.fhir.patient.resource import INSTANTIATES, PATIENT_CAPABILITY

# PDQm last: its read `Patient/{patient_id}` would otherwise take `GET Patient/$ihe-pix`.
router = APIRouter()
for _transaction in (match, pixm, feed, pdqm):
    router.include_router(_transaction.router)

CAPABILITY_RESOURCES = [PATIENT_CAPABILITY]

__all__ = ["CAPABILITY_RESOURCES", "INSTANTIATES", "router"]
