"""Tokens, assertions, scopes and integrity: refused with the right status, nothing written."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
import uuid

import httpx
import jwt
import pytest

from gateway.client import HospitalClient, Practitioner, client_assertion, user_assertion
from gateway.smart import CLIENT_ASSERTION_TYPE
from services.shared.config import TOKEN_AUDIENCE
from services.shared.keys import ensure_exchange_keys, generate_ec_key, load_private_key, public_jwk, rotate_gateway_key
from tests.conftest import Exchange
from tests.support.factories import document, person

PATIENT = {"name": "李四", "gender": "male", "birth_date": "1980-05-06"}


def _gateway_token(exchange: Exchange, **overrides: object) -> str:
    key = load_private_key(exchange.settings.gateway_signing_key_file)
    now = int(time.time())
    claims = {
        "iss": exchange.settings.public_url,
        "sub": "someone",
        "aud": TOKEN_AUDIENCE,
        "iat": now,
        "exp": now + 300,
        "jti": str(uuid.uuid4()),
        "scope": "system/Patient.crs system/DocumentReference.crs",
        "org": "hosp-x",
        "org_type": "hospital",
        **overrides,
    }
    return jwt.encode(claims, key, algorithm="ES384", headers={"kid": public_jwk(key)["kid"]})


async def _not_registered(exchange: Exchange, local_id: str, org_id: str) -> bool:
    """Look the record up with a valid token of the same organisation."""
    checker = await exchange.member()
    response = await checker.call("GET", f"/api/v1/patients/{local_id}/cross-references", params={"domain": org_id})
    await checker.aclose()
    return response.status_code == 404


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(claims: dict[str, object]) -> str:
    header = _b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64url(json.dumps(claims).encode())}."


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "garbage",
        "expired",
        "unknown-key",
        "alg-none",
        "hs256-confusion",
        "wrong-audience",
        "platform",
    ],
)
async def test_bad_bearer_tokens_are_refused_and_write_nothing(exchange: Exchange, case: str) -> None:
    now = int(time.time())
    if case == "missing":
        token = None
    elif case == "garbage":
        token = "not-a-jwt"
    elif case == "expired":
        token = _gateway_token(exchange, iat=now - 900, exp=now - 600)
    elif case == "unknown-key":
        stranger = generate_ec_key()
        token = jwt.encode(
            {
                "iss": "x",
                "sub": "x",
                "aud": TOKEN_AUDIENCE,
                "iat": now,
                "exp": now + 300,
                "org": "hosp-x",
                "org_type": "hospital",
                "scope": "system/Patient.crs",
            },
            stranger,
            algorithm="ES384",
            headers={"kid": public_jwk(stranger)["kid"]},
        )
    elif case == "alg-none":
        token = _unsigned(
            {
                "iss": "x",
                "sub": "x",
                "aud": TOKEN_AUDIENCE,
                "iat": now,
                "exp": now + 300,
                "org": "hosp-x",
                "org_type": "hospital",
                "scope": "system/Patient.crs",
            }
        )
    elif case == "hs256-confusion":
        public = json.dumps(public_jwk(load_private_key(exchange.settings.gateway_signing_key_file)))
        header = _b64url(json.dumps({"alg": "HS256", "kid": json.loads(public)["kid"]}).encode())
        payload = _b64url(
            json.dumps(
                {
                    "iss": "x",
                    "sub": "x",
                    "aud": TOKEN_AUDIENCE,
                    "iat": now,
                    "exp": now + 300,
                    "org": "hosp-x",
                    "org_type": "hospital",
                }
            ).encode()
        )
        signature = _b64url(hmac.new(public.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest())
        token = f"{header}.{payload}.{signature}"
    elif case == "wrong-audience":
        token = _gateway_token(exchange, aud="https://elsewhere.example")
    else:
        token = _gateway_token(exchange, org="platform", org_type="platform")
    local_id = f"X-{secrets.token_hex(3)}"
    headers = {"X-HIE-Purpose-Of-Use": "treatment"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{exchange.base_url}/api/v1/patients", json={"local_id": local_id, **PATIENT}, headers=headers
        )
    assert response.status_code == 401
    assert response.json()["error"]["reason"] == "token"
    assert "www-authenticate" in response.headers
    assert await _not_registered(exchange, local_id, "hosp-x")


async def _post_patient(exchange: Exchange, client: HospitalClient, assertion: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {await client.access_token()}"}
    if assertion is not None:
        headers["X-HIE-User-Assertion"] = assertion
    async with httpx.AsyncClient() as http:
        return await http.post(
            f"{exchange.base_url}/api/v1/patients",
            json={"local_id": f"UA-{secrets.token_hex(3)}", **PATIENT},
            headers=headers,
        )


async def test_user_assertion_is_required_and_bound_to_the_client(exchange: Exchange) -> None:
    a = await exchange.member()
    b = await exchange.member()
    doctor = Practitioner(id="A-D1", name="刘医生", role="doctor", department="心内科")

    def signed(key: object, client_id: str, **kwargs: object) -> str:
        return user_assertion(key=key, client_id=client_id, practitioner=doctor, purpose="treatment", **kwargs)

    refused = {
        "missing": None,
        "garbage": "abc.def.ghi",
        "signed by another hospital's key": signed(b.key, a.client_id),
        "another hospital's own assertion": signed(b.key, b.client_id),
        "expired": signed(a.key, a.client_id, lifetime=-60),
        "over an hour": signed(a.key, a.client_id, lifetime=7200),
        "unknown role": user_assertion(
            key=a.key, client_id=a.client_id, practitioner=Practitioner(role="janitor"), purpose="treatment"
        ),
        "unknown purpose": user_assertion(key=a.key, client_id=a.client_id, practitioner=doctor, purpose="marketing"),
    }
    for case, assertion in refused.items():
        response = await _post_patient(exchange, a, assertion)
        assert response.status_code == 401, case
        assert response.json()["error"]["reason"] == "user-assertion", case
    accepted = await _post_patient(exchange, a, signed(a.key, a.client_id))
    assert accepted.status_code == 201
    for member in (a, b):
        await member.aclose()


async def test_role_per_operation(exchange: Exchange) -> None:
    hospital = await exchange.member()
    registered = await hospital.call("POST", "/api/v1/patients", json={"local_id": "ROLE-1", **PATIENT})
    assert registered.status_code == 201
    auditor = Practitioner(id="H-AUD", name="院内审计", role="auditor", department="审计科")
    search = await hospital.call("GET", "/api/v1/documents", params={"patient_local_id": "ROLE-1"}, as_user=auditor)
    assert search.status_code == 403
    assert search.json()["error"]["reason"] == "role"
    nurse = Practitioner(id="H-N1", name="周护士", role="nurse", department="内科")
    assert (
        await hospital.call("GET", "/api/v1/documents", params={"patient_local_id": "ROLE-1"}, as_user=nurse)
    ).status_code == 200
    # A hospital doctor cannot read the audit log; the hospital's auditor can (its own part).
    assert (await hospital.call("GET", "/api/v1/audit/events", purpose="audit")).status_code == 403
    assert (await hospital.call("GET", "/api/v1/audit/events", purpose="audit", as_user=auditor)).status_code == 200
    await hospital.aclose()


async def _token_response(exchange: Exchange, form: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(f"{exchange.base_url}/oauth2/token", data=form)


async def test_token_endpoint_refuses_bad_assertions(exchange: Exchange) -> None:
    hospital = await exchange.member()
    endpoint = f"{exchange.settings.public_url}/oauth2/token"

    def form(assertion: str, **extra: str) -> dict[str, str]:
        return {
            "grant_type": "client_credentials",
            "scope": "system/Patient.rs",
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": assertion,
            **extra,
        }

    good = client_assertion(key=hospital.key, client_id=hospital.client_id, token_endpoint=endpoint)
    first = await _token_response(exchange, form(good))
    assert first.status_code == 200
    assert first.json()["token_type"] == "bearer"
    assert first.json()["expires_in"] <= 300
    assert first.headers["cache-control"] == "no-store"
    # Replayed jti.
    replay = await _token_response(exchange, form(good))
    assert replay.status_code == 401
    assert replay.json()["error"] == "invalid_client"
    # Signed by a key the client never registered.
    rogue = client_assertion(key=generate_ec_key(), client_id=hospital.client_id, token_endpoint=endpoint)
    assert (await _token_response(exchange, form(rogue))).status_code == 401
    # Wrong audience.
    wrong_aud = client_assertion(key=hospital.key, client_id=hospital.client_id, token_endpoint="https://x/token")
    assert (await _token_response(exchange, form(wrong_aud))).status_code == 401
    # exp more than five minutes ahead.
    too_long = client_assertion(key=hospital.key, client_id=hospital.client_id, token_endpoint=endpoint, lifetime=900)
    assert (await _token_response(exchange, form(too_long))).status_code == 401
    # Unknown client.
    unknown = client_assertion(key=hospital.key, client_id=str(uuid.uuid4()), token_endpoint=endpoint)
    assert (await _token_response(exchange, form(unknown))).status_code == 401
    # Wrong grant type, and a scope the hospital cannot have.
    fresh = client_assertion(key=hospital.key, client_id=hospital.client_id, token_endpoint=endpoint)
    assert (await _token_response(exchange, form(fresh, grant_type="password"))).json()["error"] == (
        "unsupported_grant_type"
    )
    fresh = client_assertion(key=hospital.key, client_id=hospital.client_id, token_endpoint=endpoint)
    bad_scope = await _token_response(exchange, form(fresh, scope="user/Patient.rs patient/*.cruds"))
    assert bad_scope.status_code == 400
    assert bad_scope.json()["error"] == "invalid_scope"
    await hospital.aclose()


async def test_smart_configuration_and_jwks(exchange: Exchange) -> None:
    async with httpx.AsyncClient() as http:
        config = (await http.get(f"{exchange.base_url}/.well-known/smart-configuration")).json()
        assert config["token_endpoint"] == f"{exchange.settings.public_url}/oauth2/token"
        assert config["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
        assert "ES384" in config["token_endpoint_auth_signing_alg_values_supported"]
        keys = (await http.get(f"{exchange.base_url}/.well-known/jwks.json")).json()["keys"]
    gateway_kid = public_jwk(load_private_key(exchange.settings.gateway_signing_key_file))["kid"]
    platform_kid = public_jwk(load_private_key(exchange.settings.service_signing_key_file))["kid"]
    kids = [k["kid"] for k in keys]
    assert gateway_kid in kids
    assert platform_kid not in kids
    assert all("d" not in k for k in keys)


async def test_gateway_key_rotation_keeps_live_tokens_valid(exchange: Exchange) -> None:
    keys_dir = exchange.settings.trusted_jwks_file.parent
    hospital = await exchange.member()
    old_token = await hospital.access_token()
    old_kid, new_kid = rotate_gateway_key(keys_dir)
    assert jwt.get_unverified_header(old_token)["kid"] == old_kid
    # A token signed before the rotation still works, through the gateway and the services.
    assert (await hospital.call("POST", "/api/v1/patients", json={"local_id": "ROT-1", **PATIENT})).status_code == 201
    hospital._token = ""
    new_token = await hospital.access_token()
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    async with httpx.AsyncClient() as http:
        published = {k["kid"] for k in (await http.get(f"{exchange.base_url}/.well-known/jwks.json")).json()["keys"]}
    assert {old_kid, new_kid} <= published
    # Once every old token has expired the old key is pruned, and a token it signed is refused.
    ensure_exchange_keys(keys_dir, now=time.time() + 601)
    hospital._token = old_token
    assert (await hospital.call("GET", "/api/v1/patients/ROT-1/cross-references")).status_code == 401
    hospital._token = new_token
    assert (await hospital.call("GET", "/api/v1/patients/ROT-1/cross-references")).status_code == 200
    await hospital.aclose()


async def test_scope_is_enforced_per_route(exchange: Exchange) -> None:
    hospital = await exchange.member(scopes="system/Patient.crs")
    response = await hospital.call("GET", "/api/v1/documents", params={"patient_local_id": "P-1"})
    assert response.status_code == 403
    assert response.json()["error"]["reason"] == "scope"
    await hospital.aclose()


async def test_document_with_wrong_hash_is_rejected_and_nothing_stored(exchange: Exchange) -> None:
    hospital = await exchange.member()
    assert (await hospital.call("POST", "/api/v1/patients", json={"local_id": "H-1", **PATIENT})).status_code == 201
    content = "检验报告：血常规正常".encode()
    body = document("H-1", content, sha256=hashlib.sha256(b"something else").hexdigest())
    rejected = await hospital.call("POST", "/api/v1/documents", json=body)
    assert rejected.status_code == 400
    assert rejected.json()["error"]["reason"] == "hash-mismatch"
    listed = await hospital.call("GET", "/api/v1/documents", params={"patient_local_id": "H-1"})
    assert listed.json()["entries"] == []
    # The same source id with the right content is then a new registration.
    accepted = await hospital.call(
        "POST",
        "/api/v1/documents",
        json=document("H-1", content, source_document_id=body["source_document_id"]),
    )
    assert accepted.status_code == 201
    assert accepted.json()["created"] is True
    wrong_size = await hospital.call("POST", "/api/v1/documents", json=document("H-1", content, size=len(content) + 1))
    assert wrong_size.status_code == 400
    assert wrong_size.json()["error"]["reason"] == "size-mismatch"
    await hospital.aclose()


async def test_document_for_unknown_patient_is_refused(exchange: Exchange) -> None:
    hospital = await exchange.member()
    response = await hospital.call("POST", "/api/v1/documents", json=document("NOBODY", b"<x/>"))
    assert response.status_code == 422
    assert response.json()["error"]["reason"] == "patient-not-registered"
    await hospital.aclose()


async def test_invalid_national_id_error_does_not_echo_it(exchange: Exchange) -> None:
    hospital = await exchange.member()
    bad = "110105194912310021"  # wrong check digit
    response = await hospital.call("POST", "/api/v1/patients", json={"local_id": "N-1", **PATIENT, "national_id": bad})
    assert response.status_code == 400
    assert response.json()["error"]["reason"] == "national-id-check_digit"
    assert bad not in response.text
    assert "19491231" not in response.text
    # Pydantic validation errors name fields only, never the values.
    response = await hospital.call("POST", "/api/v1/patients", json={"local_id": "N-2", "gender": "王五的性别"})
    assert response.status_code == 400
    assert "王五" not in response.text
    await hospital.aclose()


async def test_restricted_document_is_hidden_from_other_hospitals(exchange: Exchange) -> None:
    a = await exchange.member()
    b = await exchange.member()
    someone = person("赵六")
    assert (await a.call("POST", "/api/v1/patients", json={"local_id": "R-A", **someone})).status_code == 201
    assert (await b.call("POST", "/api/v1/patients", json={"local_id": "R-B", **someone})).status_code == 201
    psy = await a.call(
        "POST", "/api/v1/documents", json=document("R-A", "精神科门诊记录".encode(), security_labels=["PSY"])
    )
    plain = await a.call("POST", "/api/v1/documents", json=document("R-A", "门诊记录".encode()))
    assert psy.status_code == plain.status_code == 201
    seen_by_b = await b.call("GET", "/api/v1/documents", params={"patient_local_id": "R-B"})
    assert [e["document_id"] for e in seen_by_b.json()["entries"]] == [plain.json()["document_id"]]
    denied = await b.call("GET", f"/api/v1/documents/{psy.json()['document_id']}/content")
    assert denied.status_code == 403
    assert denied.json()["error"]["reason"] == "consent-denied"
    # The registering hospital always sees its own.
    seen_by_a = await a.call("GET", "/api/v1/documents", params={"patient_local_id": "R-A"})
    assert len(seen_by_a.json()["entries"]) == 2
    # Research is not permitted by the regional default.
    research = await b.call("GET", f"/api/v1/documents/{plain.json()['document_id']}/content", purpose="research")
    assert research.status_code == 403
    for member in (a, b):
        await member.aclose()


async def test_unknown_route_and_document_answer_json(exchange: Exchange) -> None:
    hospital = await exchange.member()
    missing = await hospital.call("GET", f"/api/v1/documents/{uuid.uuid4()}/content")
    assert missing.status_code == 404
    assert missing.json()["error"]["reason"] == "document-not-found"
    async with httpx.AsyncClient() as http:
        nowhere = await http.get(f"{exchange.base_url}/api/v1/nowhere")
    assert nowhere.status_code == 404
    assert nowhere.json()["error"]["reason"] == "no-route"
    await hospital.aclose()


async def test_openapi_and_capability_statement_are_published(exchange: Exchange) -> None:
    async with httpx.AsyncClient() as http:
        openapi = (await http.get(f"{exchange.base_url}/openapi.json")).json()
        metadata = await http.get(f"{exchange.base_url}/fhir/R4/metadata")
        headers = (await http.get(f"{exchange.base_url}/healthz")).headers
    paths = set(openapi["paths"])
    for path in (
        "/oauth2/token",
        "/.well-known/smart-configuration",
        "/api/v1/patients",
        "/api/v1/patients/{local_id}/cross-references",
        "/api/v1/documents",
        "/api/v1/documents/{document_id}/content",
        "/api/v1/referrals",
        "/api/v1/consultations",
        "/api/v1/audit/events",
    ):
        assert path in paths
    assert openapi["paths"]["/api/v1/documents"]["post"]["security"] == [
        {"smartBackendServices": [], "userAssertion": []}
    ]
    assert "clientCredentials" in openapi["components"]["securitySchemes"]["smartBackendServices"]["flows"]
    assert metadata.status_code == 200
    assert metadata.headers["content-type"].startswith("application/fhir+json")
    statement = metadata.json()
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["fhirVersion"] == "4.0.1"
    assert statement["rest"][0]["security"]["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    # Security headers on every response; CORS stays closed unless configured.
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert "access-control-allow-origin" not in headers


async def test_fhir_routes_answer_with_operation_outcome(exchange: Exchange) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{exchange.base_url}/fhir/R4/Observation/unknown")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/fhir+json")
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "not-found"
