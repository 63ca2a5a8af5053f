"""Hostile input at the exchange's door: each attack gets the right status and writes nothing."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import jwt
import pytest

from gateway.client import HospitalClient, Practitioner, user_assertion
from gateway.organizations import set_status
from gateway.smart import CLIENT_ASSERTION_TYPE
from services.shared.keys import generate_ec_key, public_jwk
from tests.conftest import Exchange, serve_gateway
from tests.support.factories import document, person


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _assertion_claims(client: HospitalClient, endpoint: str, **overrides: object) -> dict[str, object]:
    now = int(time.time())
    return {
        "iss": client.client_id,
        "sub": client.client_id,
        "aud": endpoint,
        "iat": now,
        "exp": now + 120,
        "jti": str(uuid.uuid4()),
        **overrides,
    }


async def _token(exchange: Exchange, assertion: str) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(
            f"{exchange.base_url}/oauth2/token",
            data={
                "grant_type": "client_credentials",
                "scope": "system/Patient.rs",
                "client_assertion_type": CLIENT_ASSERTION_TYPE,
                "client_assertion": assertion,
            },
        )


@pytest.mark.parametrize(
    "attack",
    [
        "alg-none",
        "hs256-with-public-key",
        "expired",
        "not-yet-valid",
        "wrong-aud",
        "wrong-iss",
        "sub-differs",
        "unknown-kid",
        "no-jti",
    ],
)
async def test_forged_client_assertions_get_no_token(exchange: Exchange, attack: str) -> None:
    client = await exchange.member()
    endpoint = f"{exchange.settings.public_url}/oauth2/token"
    now = int(time.time())
    kid = public_jwk(client.key)["kid"]
    sign = lambda claims, **h: jwt.encode(claims, client.key, algorithm="ES384", headers={"kid": kid, **h})  # noqa: E731
    if attack == "alg-none":
        header = _b64url(json.dumps({"alg": "none", "kid": kid}).encode())
        assertion = f"{header}.{_b64url(json.dumps(_assertion_claims(client, endpoint)).encode())}."
    elif attack == "hs256-with-public-key":
        secret = json.dumps(public_jwk(client.key)).encode()
        header = _b64url(json.dumps({"alg": "HS256", "kid": kid}).encode())
        payload = _b64url(json.dumps(_assertion_claims(client, endpoint)).encode())
        signature = _b64url(hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest())
        assertion = f"{header}.{payload}.{signature}"
    elif attack == "expired":
        assertion = sign(_assertion_claims(client, endpoint, iat=now - 600, exp=now - 300))
    elif attack == "not-yet-valid":
        assertion = sign(_assertion_claims(client, endpoint, nbf=now + 600, exp=now + 700))
    elif attack == "wrong-aud":
        assertion = sign(_assertion_claims(client, endpoint, aud="https://other-exchange.example/token"))
    elif attack == "wrong-iss":
        assertion = sign(_assertion_claims(client, endpoint, iss=str(uuid.uuid4())))
    elif attack == "sub-differs":
        assertion = sign(_assertion_claims(client, endpoint, sub="someone-else"))
    elif attack == "unknown-kid":
        assertion = jwt.encode(
            _assertion_claims(client, endpoint), generate_ec_key(), algorithm="ES384", headers={"kid": "rotated-away"}
        )
    else:
        claims = _assertion_claims(client, endpoint)
        del claims["jti"]
        assertion = sign(claims)
    response = await _token(exchange, assertion)
    assert response.status_code == 401, response.text
    assert response.json()["error"] == "invalid_client"
    assert "access_token" not in response.json()
    await client.aclose()


async def test_revoked_client_gets_no_token_and_its_live_token_stops(exchange: Exchange) -> None:
    client = await exchange.member()
    before = await client.call("POST", "/api/v1/patients", json={"local_id": "REV-1", **person("钱八")})
    assert before.status_code == 201
    await set_status(exchange.settings, org_id=client.org_id, status="revoked")  # type: ignore[attr-defined]
    after = await client.call("POST", "/api/v1/patients", json={"local_id": "REV-2", **person("钱八")})
    assert after.status_code == 401
    assert (await client.request_token()).status_code == 401
    await set_status(exchange.settings, org_id=client.org_id, status="active")  # type: ignore[attr-defined]
    xref = await client.call("GET", "/api/v1/patients/REV-2/cross-references")
    assert xref.status_code == 404  # nothing was written while revoked
    await client.aclose()


async def test_removed_key_can_no_longer_sign(exchange: Exchange) -> None:
    from gateway.organizations import add_keys, remove_key
    from services.shared.keys import jwks

    client = await exchange.member()
    old_key, new_key = client.key, generate_ec_key()
    await add_keys(exchange.settings, org_id=client.org_id, jwks=jwks(new_key))  # type: ignore[attr-defined]
    client.key = new_key
    assert (await client.request_token()).status_code == 200  # the new key works alongside the old
    await remove_key(exchange.settings, org_id=client.org_id, kid=public_jwk(old_key)["kid"])  # type: ignore[attr-defined]
    client.key = old_key
    assert (await client.request_token()).status_code == 401
    await client.aclose()


async def test_other_hospitals_referrals_and_consultations_are_invisible(exchange: Exchange) -> None:
    a = await exchange.member()
    b = await exchange.member()
    c = await exchange.member()
    assert (await a.call("POST", "/api/v1/patients", json={"local_id": "P-1", **person("褚十三")})).status_code == 201
    referral = await a.call(
        "POST",
        "/api/v1/referrals",
        json={"patient_local_id": "P-1", "target_organization_id": b.org_id, "direction": "up", "reason": "胸痛待查"},  # type: ignore[attr-defined]
    )
    assert referral.status_code == 201
    consultation = await a.call(
        "POST",
        "/api/v1/consultations",
        json={
            "patient_local_id": "P-1",
            "consultant_organization_id": b.org_id,
            "kind": "ecg",
            "question": "ST 段改变？",
        },  # type: ignore[attr-defined]
    )
    assert consultation.status_code == 201
    referral_id = referral.json()["referral_id"]
    consultation_id = consultation.json()["consultation_id"]
    assert (await b.call("GET", f"/api/v1/referrals/{referral_id}", purpose="referral")).status_code == 200
    assert (await b.call("GET", f"/api/v1/consultations/{consultation_id}", purpose="consultation")).status_code == 200
    # A third hospital is told nothing exists.
    assert (await c.call("GET", f"/api/v1/referrals/{referral_id}")).status_code == 404
    assert (await c.call("GET", f"/api/v1/consultations/{consultation_id}")).status_code == 404
    for member in (a, b, c):
        await member.aclose()


INJECTIONS = [
    "' OR '1'='1",
    "1; DROP TABLE patient; --",
    "../../etc/passwd",
    "..%2F..%2Fetc%2Fpasswd",
    "%00",
    "patient:missing=true",
    "_include=*",
    "<script>alert(1)</script>",
    "张三' --",
]


@pytest.mark.parametrize("value", INJECTIONS)
async def test_injection_strings_in_path_and_query(exchange: Exchange, value: str) -> None:
    hospital = await exchange.member()
    await hospital.call("POST", "/api/v1/patients", json={"local_id": "INJ-1", **person("孙九")})
    await hospital.call("POST", "/api/v1/documents", json=document("INJ-1", "门诊记录".encode()))
    quoted = value.replace("/", "%2F")
    responses = [
        await hospital.call("GET", "/api/v1/documents", params={"patient_local_id": value}),
        await hospital.call("GET", "/api/v1/documents", params={"patient_local_id": "INJ-1", "type": value}),
        await hospital.call("GET", "/api/v1/documents", params={"patient_local_id": "INJ-1", "page_token": value}),
        await hospital.call("GET", f"/api/v1/documents/{quoted}/content"),
        await hospital.call("GET", f"/api/v1/patients/{quoted}/cross-references"),
        await hospital.call("GET", "/api/v1/audit/events", params={"trace_id": value}, purpose="audit"),
    ]
    for response in responses:
        assert response.status_code in {200, 400, 403, 404}, (value, response.status_code, response.text)
        if response.status_code == 200:
            # Only ever the caller's own, legitimately matching data.
            assert response.json().get("entries", []) == []
    # Injection as data is stored as data.
    stored = await hospital.call("POST", "/api/v1/patients", json={"local_id": "INJ-2", "name": value[:64]})
    assert stored.status_code in {201, 200, 400}
    if stored.status_code in {200, 201}:
        assert stored.json()["name"] == value.strip()[:64]
    await hospital.aclose()


async def test_oversized_deep_and_malformed_bodies(exchange: Exchange) -> None:
    hospital = await exchange.member()
    token = await hospital.access_token()
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "X-HIE-User-Assertion": user_assertion(
            key=hospital.key, client_id=hospital.client_id, practitioner=Practitioner(), purpose="treatment"
        ),
    }
    async with httpx.AsyncClient() as http:
        url = f"{exchange.base_url}/api/v1/patients"
        big = await http.post(url, content=b'{"local_id": "' + b"x" * (2 * 1024 * 1024) + b'"}', headers=headers)
        assert big.status_code == 413
        # Like every other refusal: a reason and the trace id an operator finds the request by.
        assert big.json()["error"]["reason"] == "body-too-large"
        assert len(big.json()["error"]["trace_id"]) == 32
        assert big.headers["x-trace-id"] == big.json()["error"]["trace_id"]
        deep = await http.post(url, content=b"[" * 100_000 + b"]" * 100_000, headers=headers)
        assert deep.status_code == 400
        broken_utf8 = await http.post(url, content=b'{"local_id": "A-1", "name": "\xff\xfe\xe5"}', headers=headers)
        assert broken_utf8.status_code == 400
        not_json = await http.post(url, content=b"local_id=A-1", headers=headers)
        assert not_json.status_code == 400
        lone_surrogate = await http.post(url, content=b'{"local_id": "S-1", "name": "\\ud800"}', headers=headers)
        assert lone_surrogate.status_code == 400
    # A declared length over the document limit is refused before any body is read.
    host, port = exchange.base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = (
        f"POST /api/v1/documents HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Authorization: {headers['Authorization']}\r\nContent-Length: {80 * 1024 * 1024}\r\n\r\n"
    )
    writer.write(head.encode())
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), timeout=10)
    writer.close()
    assert status_line.split()[1] == b"413"
    # The same on a FHIR route: an OperationOutcome carrying the trace id.
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head.replace("/api/v1/documents", "/fhir/R4/").encode())
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), timeout=10)  # the gateway closes after a 413
    writer.close()
    head_bytes, _, body_bytes = answer.partition(b"\r\n\r\n")
    assert head_bytes.split()[1] == b"413"
    outcome = json.loads(body_bytes)
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "too-long"
    trace_header = next(line for line in head_bytes.split(b"\r\n") if line.lower().startswith(b"x-trace-id:"))
    assert outcome["extension"][0]["valueString"].encode() == trace_header.split(b":", 1)[1].strip()
    for local_id in ("A-1", "S-1"):
        assert (await hospital.call("GET", f"/api/v1/patients/{local_id}/cross-references")).status_code == 404
    await hospital.aclose()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"local_id": "A-1", "name": "张三"'.encode(), "the request body is not valid JSON (UTF-8)"),
        (b"local_id=A-1", "the request body is not valid JSON (UTF-8)"),
        ('{"local_id": "A-1", "name": "张三"}'.encode("gb18030"), "the request body is not valid JSON (UTF-8)"),
        (b'["A-1"]', "the request body must be a JSON object"),
    ],
    ids=["truncated", "form-encoded", "gb18030", "array"],
)
async def test_a_body_that_is_not_a_json_object_is_refused_saying_so(
    exchange: Exchange, body: bytes, message: str
) -> None:
    """Found walking the README as a newcomer: a truncated body answered "invalid fields: 33" (the
    decoder's offset), a GB18030 body 400 reason "http" "request not served", an array "invalid
    fields: " with no field."""
    hospital = await exchange.member()
    token = await hospital.access_token()
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "X-HIE-User-Assertion": user_assertion(
            key=hospital.key, client_id=hospital.client_id, practitioner=Practitioner(), purpose="treatment"
        ),
    }
    async with httpx.AsyncClient() as http:
        refused = await http.post(f"{exchange.base_url}/api/v1/patients", content=body, headers=headers)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert (error["reason"], error["message"]) == ("invalid-request", message)
    assert "张" not in refused.text
    await hospital.aclose()


async def test_a_url_with_raw_chinese_gets_a_json_400_naming_the_fix(exchange: Exchange) -> None:
    """Found walking the README as a newcomer: `curl '…/api/v1/patients/search?family=张&…'` (curl
    sends the query's characters unencoded, which HTTP/1.1 forbids) answered uvicorn's bare
    text/plain "Invalid HTTP request received.": no reason, no JSON."""
    host, port = exchange.base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        "GET /api/v1/patients/search?family=张&birth_date=1949-12-31 HTTP/1.1\r\n".encode()
        + f"Host: {host}\r\n\r\n".encode()
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split()[1] == b"400", answer
    assert b"content-type: application/json" in head.lower()
    error = json.loads(body)["error"]
    assert error["reason"] == "invalid-http"
    assert "percent-encode" in error["message"]
    assert "张" not in body.decode()


@pytest.mark.parametrize(
    "name",
    ["张San", "Zhаng Wei", "ZHANG 伟", "阿卜杜热合曼·买买提", "李\u200b四", "王\u202e五", "ｗａｎｇ"],
    ids=["han-latin", "cyrillic-a", "upper-han", "uyghur-dot", "zero-width", "bidi-override", "fullwidth"],
)
async def test_mixed_script_names_are_kept_exactly_or_refused(exchange: Exchange, name: str) -> None:
    hospital = await exchange.member()
    response = await hospital.call("POST", "/api/v1/patients", json={"local_id": "MIX-1", "name": name})
    if any(ch in name for ch in "\u200b\u202e"):
        # Invisible format characters could disguise one name as another.
        assert response.status_code == 400
        assert response.json()["error"]["reason"] == "name-invalid"
    else:
        assert response.status_code == 201
        assert response.json()["name"] == name
    await hospital.aclose()


@pytest.fixture
async def strict_gateway(exchange: Exchange) -> AsyncIterator[Exchange]:
    """A second gateway over the same services with a tight rate limit: 10 burst, 1 a second."""
    gateway = await serve_gateway(
        dataclasses.replace(exchange.settings, rate_limit_burst=10, rate_limit_per_second=1.0)
    )
    try:
        yield dataclasses.replace(exchange, settings=gateway.settings, base_url=gateway.base_url)
    finally:
        await gateway.stop()


async def test_a_thousand_requests_beyond_the_rate_limit(strict_gateway: Exchange) -> None:
    hospital = await strict_gateway.member()
    # From before the token request: the client's bucket may start filling with it, and on a loaded
    # machine the time until the first patient request is enough for one more token.
    started = time.monotonic()
    await hospital.access_token()
    responses = [
        await hospital.call("POST", "/api/v1/patients", json={"local_id": f"RL-{i}", "name": "周十"})
        for i in range(1010)
    ]
    elapsed = time.monotonic() - started
    ok = [i for i, r in enumerate(responses) if r.status_code == 201]
    limited = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(limited) == 1010
    assert 10 <= len(ok) <= 10 + int(elapsed) + 1
    assert len(limited) >= 1010 - 10 - int(elapsed) - 1
    assert all(int(r.headers["Retry-After"]) >= 1 for r in limited)
    assert all(r.json()["error"]["reason"] == "rate-limited" for r in limited)
    # What was refused was not written.
    refused_index = next(i for i, r in enumerate(responses) if r.status_code == 429)
    await asyncio.sleep(1.1)
    lookup = await hospital.call("GET", f"/api/v1/patients/RL-{refused_index}/cross-references")
    assert lookup.status_code == 404
    await hospital.aclose()


async def test_a_hospital_cannot_probe_another_hospitals_local_ids(exchange: Exchange) -> None:
    a = await exchange.member()
    b = await exchange.member()
    assert (
        await a.call("POST", "/api/v1/patients", json={"local_id": "PROBE-1", **person("冯十二")})
    ).status_code == 201
    assert (await a.call("POST", "/api/v1/documents", json=document("PROBE-1", "门诊记录".encode()))).status_code == 201
    by_xref = await b.call("GET", "/api/v1/patients/PROBE-1/cross-references", params={"domain": a.org_id})  # type: ignore[attr-defined]
    assert by_xref.status_code == 404
    by_search = await b.call(
        "GET",
        "/api/v1/documents",
        params={"patient_local_id": "PROBE-1", "patient_domain": a.org_id},  # type: ignore[attr-defined]
    )
    assert by_search.status_code == 404
    assert "entries" not in by_search.json()
    for member in (a, b):
        await member.aclose()


async def test_idempotency_keys(exchange: Exchange) -> None:
    a = await exchange.member()
    b = await exchange.member()
    for local_id in ("IDEM-1", "IDEM-2"):
        registered = await a.call("POST", "/api/v1/patients", json={"local_id": local_id, **person("卫十四")})
        assert registered.status_code == 201
    body = {"patient_local_id": "IDEM-1", "target_organization_id": b.org_id, "direction": "up"}  # type: ignore[attr-defined]
    first = await a.call("POST", "/api/v1/referrals", json=body, headers={"Idempotency-Key": "ref-001"})
    again = await a.call("POST", "/api/v1/referrals", json=body, headers={"Idempotency-Key": "ref-001"})
    assert first.status_code == again.status_code == 201
    assert first.json()["referral_id"] == again.json()["referral_id"]
    different = await a.call(
        "POST", "/api/v1/referrals", json={**body, "patient_local_id": "IDEM-2"}, headers={"Idempotency-Key": "ref-001"}
    )
    assert different.status_code == 409
    assert different.json()["error"]["reason"] == "idempotency-key-reused"
    # Concurrent retries of one submission make one record.
    key = {"Idempotency-Key": "ref-002"}
    burst = await asyncio.gather(*(a.call("POST", "/api/v1/referrals", json=body, headers=key) for _ in range(8)))
    assert {r.status_code for r in burst} == {201}
    assert len({r.json()["referral_id"] for r in burst}) == 1
    for member in (a, b):
        await member.aclose()
