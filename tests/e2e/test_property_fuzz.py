"""A bounded property-based run against the live gateway: whatever a hospital sends, the
exchange answers without a server error, and every error body is the documented JSON."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.client import HospitalClient
from tests.conftest import Exchange

# Any JSON value, including lone surrogates and control characters in strings.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
TEXT = st.text(st.characters(codec="utf-8"), max_size=80) | st.text(max_size=80)
PATIENT = st.fixed_dictionaries(
    {"local_id": TEXT},
    optional={
        "name": TEXT,
        "family": TEXT,
        "given": TEXT,
        "gender": st.sampled_from(["male", "female", "other", "unknown"]) | TEXT,
        "birth_date": TEXT | st.dates().map(str),
        "national_id": TEXT | st.from_regex(r"[0-9]{17}[0-9Xx]", fullmatch=True),
        "phones": st.lists(TEXT, max_size=6),
        "address": st.dictionaries(st.sampled_from(["province", "city", "district", "line", "postal_code"]), TEXT),
        "identifiers": st.lists(st.fixed_dictionaries({"system": TEXT, "value": TEXT}), max_size=3),
        "extra": JSON,
    },
)
DOCUMENT = st.fixed_dictionaries(
    {
        "source_document_id": TEXT,
        "patient_local_id": TEXT,
        "type": st.fixed_dictionaries({"code": TEXT}) | JSON,
        "title": TEXT,
        "mime_type": TEXT | st.sampled_from(["text/xml", "application/pdf", "application/fhir+json"]),
        "sha256": TEXT | st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
        "size": st.integers(min_value=-5, max_value=10**12),
        "content_base64": TEXT,
    },
    optional={"security_labels": st.lists(TEXT, max_size=3), "confidentiality": TEXT, "created": TEXT},
)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _well_formed(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        body = response.json()
        assert set(body["error"]) >= {"status", "reason", "message"}
        assert "Traceback" not in response.text


@pytest.fixture
async def hospital(exchange: Exchange) -> HospitalClient:
    client = await exchange.member()
    registered = await client.call("POST", "/api/v1/patients", json={"local_id": "FZ-1", "name": "吴十一"})
    assert registered.status_code in {200, 201}
    return client


@FUZZ
@given(body=PATIENT)
async def test_patient_registration_never_fails_inside(hospital: HospitalClient, body: dict[str, Any]) -> None:
    _well_formed(await hospital.call("POST", "/api/v1/patients", json=body))


@FUZZ
@given(body=DOCUMENT)
async def test_document_registration_never_fails_inside(hospital: HospitalClient, body: dict[str, Any]) -> None:
    _well_formed(await hospital.call("POST", "/api/v1/documents", json=body))


@FUZZ
@given(raw=st.binary(max_size=300) | JSON.map(lambda v: json.dumps(v).encode()))
async def test_arbitrary_bodies_never_fail_inside(hospital: HospitalClient, raw: bytes) -> None:
    for path in ("/api/v1/patients", "/api/v1/documents", "/api/v1/referrals", "/api/v1/consultations"):
        _well_formed(await hospital.call("POST", path, content=raw, headers={"Content-Type": "application/json"}))


@FUZZ
@given(
    value=TEXT, key=st.sampled_from(["patient_local_id", "patient_domain", "type", "status", "page_token", "page_size"])
)
async def test_query_strings_never_fail_inside(hospital: HospitalClient, value: str, key: str) -> None:
    params = {"patient_local_id": "FZ-1", key: value}
    _well_formed(await hospital.call("GET", "/api/v1/documents", params=params))
    segment = urllib.parse.quote(value.encode("utf-8", "surrogatepass"), safe="") or "x"
    _well_formed(await hospital.call("GET", f"/api/v1/documents/{segment}/content"))
    _well_formed(await hospital.call("GET", f"/api/v1/patients/{segment}/cross-references"))
    _well_formed(await hospital.call("GET", f"/api/v1/referrals/{segment}"))
