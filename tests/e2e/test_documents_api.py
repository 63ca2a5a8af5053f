"""Documents through the gateway: content streamed both ways (PUT by the hospital's own id,
GET content), hash checks, tampered storage never served, replace / entered-in-error and
imaging study references over REST."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import secrets
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import update

from gateway.client import HospitalClient, new_traceparent
from services.registry import store
from tests.conftest import Exchange
from tests.support.factories import document, person

MIB = 1024 * 1024


def _metadata_header(local_id: str, **extra: object) -> str:
    metadata = {
        "patient_local_id": local_id,
        "type": {"system": "urn:hie:shared-document-type", "code": "examination-report"},
        "title": "胸部CT检查报告",
        "author": {"practitioner_name": "李医生", "department": "放射科"},
        **extra,
    }
    return base64.urlsafe_b64encode(json.dumps(metadata, ensure_ascii=False).encode()).decode().rstrip("=")


def _digest(content: bytes) -> str:
    return f"sha-256=:{base64.b64encode(hashlib.sha256(content).digest()).decode()}:"


async def _pieces(content: bytes, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(content), size):
        yield content[i : i + size]


async def _upload(
    client: HospitalClient, local_id: str, content: bytes, *, source_id: str = "", digest: str = ""
) -> httpx.Response:
    return await client.call(
        "PUT",
        f"/api/v1/documents/source/{source_id or 'CT-' + secrets.token_hex(4)}",
        content=_pieces(content),  # chunked transfer: no Content-Length, nothing buffered
        headers={
            "Content-Type": "application/pdf",
            "Repr-Digest": digest or _digest(content),
            "X-HIE-Document-Metadata": _metadata_header(local_id),
        },
    )


@pytest.fixture
async def pair(exchange: Exchange) -> AsyncIterator[tuple[HospitalClient, HospitalClient, str]]:
    a = await exchange.member(name="市第一医院")
    b = await exchange.member(name="镇卫生院")
    patient = person("孙七")
    local = f"S-{secrets.token_hex(4)}"
    for client in (a, b):
        assert (await client.call("POST", "/api/v1/patients", json={"local_id": local, **patient})).status_code == 201
    yield a, b, local
    await a.aclose()
    await b.aclose()


async def test_streamed_upload_and_download(pair) -> None:
    a, b, local = pair
    content = secrets.token_bytes(5 * MIB + 123)
    uploaded = await _upload(a, local, content, source_id="CT-STREAM-1")
    assert uploaded.status_code == 201, uploaded.text
    body = uploaded.json()
    assert (body["size"], body["sha256"], body["mime_type"]) == (
        len(content),
        hashlib.sha256(content).hexdigest(),
        "application/pdf",
    )
    assert body["shared_type"]["code"] == "examination-report"
    assert body["author"]["department"] == "放射科"
    # The same id and content again: the first registration, 200.
    again = await _upload(a, local, content, source_id="CT-STREAM-1")
    assert again.status_code == 200
    assert again.json()["document_id"] == body["document_id"]

    trace_id = secrets.token_hex(16)
    retrieved = await b.call(
        "GET", f"/api/v1/documents/{body['document_id']}/content", traceparent=new_traceparent(trace_id)
    )
    assert retrieved.status_code == 200
    assert retrieved.content == content
    assert retrieved.headers["content-length"] == str(len(content))
    assert retrieved.headers["repr-digest"] == _digest(content)
    assert retrieved.headers["x-trace-id"] == trace_id
    # The stream's trace ends with it: the next request on the connection has its own.
    other = secrets.token_hex(16)
    following = await b.call("GET", f"/api/v1/patients/{local}/cross-references", traceparent=new_traceparent(other))
    assert following.headers["x-trace-id"] == other


async def test_upload_with_wrong_digest_leaves_nothing(pair) -> None:
    a, b, local = pair
    content = secrets.token_bytes(2 * MIB)
    wrong = await _upload(a, local, content, source_id="CT-BAD-1", digest=_digest(b"something else"))
    assert wrong.status_code == 400
    assert wrong.json()["error"]["reason"] == "hash-mismatch"
    found = await b.call("GET", "/api/v1/documents", params={"patient_local_id": local})
    assert found.json()["entries"] == []
    # Nothing was left behind: the same id registers cleanly with the right digest.
    assert (await _upload(a, local, content, source_id="CT-BAD-1")).status_code == 201
    missing = await a.call(
        "PUT",
        "/api/v1/documents/source/CT-BAD-2",
        content=b"x",
        headers={"Content-Type": "application/pdf", "X-HIE-Document-Metadata": _metadata_header(local)},
    )
    assert missing.status_code == 400


@pytest.mark.parametrize("size", [200_000, 3 * MIB], ids=["one-chunk", "several-chunks"])
async def test_tampered_content_is_never_served(exchange: Exchange, pair, size: int) -> None:
    a, b, local = pair
    content = secrets.token_bytes(size)
    document_id = (await _upload(a, local, content)).json()["document_id"]
    async with exchange.services["registry"].runtime.sessions() as session, session.begin():
        await session.execute(
            update(store.DocumentChunk)
            .where(store.DocumentChunk.document_id == document_id, store.DocumentChunk.seq == (size - 1) // MIB)
            .values(data=b"tampered")
        )
    path = f"/api/v1/documents/{document_id}/content"
    if size <= MIB:
        # Found before anything was sent: a proper error.
        corrupt = await b.call("GET", path)
        assert corrupt.status_code == 500
        assert corrupt.json()["error"]["reason"] == "content-corrupt"
    else:
        # Found at the last chunk, after the response started: the body stops short of its
        # Content-Length and the connection is closed, so it is never taken as complete.
        with pytest.raises(httpx.RemoteProtocolError):
            await b.call("GET", path)


async def test_replace_and_entered_in_error_over_rest(pair) -> None:
    a, b, local = pair
    first = await a.call("POST", "/api/v1/documents", json=document(local, "出院小结 v1".encode()))
    first_id = first.json()["document_id"]
    second = await a.call(
        "POST",
        "/api/v1/documents",
        json=document(local, "出院小结 v2".encode(), relation={"type": "replaces", "document_id": first_id}),
    )
    assert second.status_code == 201, second.text
    second_id = second.json()["document_id"]
    assert second.json()["relations"] == [{"type": "replaces", "document_id": first_id}]
    old = await b.call("GET", f"/api/v1/documents/{first_id}")
    assert old.json()["status"] == "superseded"
    assert old.json()["related_by"] == [{"type": "replaces", "document_id": second_id}]
    assert (await b.call("GET", f"/api/v1/documents/{first_id}/content")).content == "出院小结 v1".encode()
    key = {"Idempotency-Key": secrets.token_hex(8)}
    marked = await a.call("POST", f"/api/v1/documents/{second_id}/entered-in-error", headers=key)
    assert marked.json()["status"] == "entered-in-error"
    # A retry with the key (the first answer was lost) answers it again, not "already withdrawn".
    retried = await a.call("POST", f"/api/v1/documents/{second_id}/entered-in-error", headers=key)
    assert (retried.status_code, retried.json()) == (200, marked.json())
    reused = await a.call("POST", f"/api/v1/documents/{first_id}/entered-in-error", headers=key)
    assert (reused.status_code, reused.json()["error"]["reason"]) == (409, "idempotency-key-reused")
    assert (await b.call("GET", "/api/v1/documents", params={"patient_local_id": local})).json()["entries"] == []
    denied = await b.call("POST", f"/api/v1/documents/{first_id}/entered-in-error")
    assert denied.status_code == 404


async def test_imaging_study_reference_redirects_to_the_source_pacs(pair) -> None:
    a, b, local = pair
    uid = "1.2.156.112605.14038.20261101.1"
    url = f"https://pacs.a.example/dicom-web/studies/{uid}"
    body = document(local, b"", imaging_study={"study_instance_uid": uid, "wado_rs_url": url}, title="胸部CT影像")
    body.update(content_base64="", sha256="", size=0, mime_type="")
    registered = await a.call("POST", "/api/v1/documents", json=body)
    assert registered.status_code == 201, registered.text
    assert registered.json()["imaging_study"] == {"study_instance_uid": uid, "wado_rs_url": url}
    content = await b.call("GET", f"/api/v1/documents/{registered.json()['document_id']}/content")
    assert content.status_code == 303
    assert content.headers["location"] == url


async def test_subscriptions_over_rest_and_the_notification_key_set(exchange: Exchange, pair) -> None:
    _a, b, local = pair
    expires = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=30)).isoformat()
    created = await b.call(
        "POST",
        "/api/v1/subscriptions",
        json={
            "topic": "patient-document",
            "patient_local_id": local,
            "endpoint_url": "https://his.b.example/hie/notify",
            "expires": expires,
        },
    )
    assert created.status_code == 201, created.text
    subscription_id = created.json()["subscription_id"]
    listed = await b.call("GET", "/api/v1/subscriptions")
    assert [s["subscription_id"] for s in listed.json()["subscriptions"]] == [subscription_id]
    assert (await b.call("GET", "/api/v1/notifications/dead-letters")).status_code == 403  # role admin
    assert (await b.call("DELETE", f"/api/v1/subscriptions/{subscription_id}")).status_code == 204
    assert (await b.call("GET", "/api/v1/subscriptions")).json()["subscriptions"] == []
    async with httpx.AsyncClient() as http:
        keys = (await http.get(f"{exchange.base_url}/api/v1/notifications/jwks.json")).json()["keys"]
    assert len(keys) == 1
    assert keys[0]["alg"] == "ES384"
    assert "d" not in keys[0]


async def test_a_subscription_to_an_internal_address_is_refused_through_the_gateway(exchange: Exchange, pair) -> None:
    """SSRF: the cloud metadata address and other link-local / unspecified endpoints are refused
    at subscription, with a reason and without echoing the address."""
    _a, b, _local = pair
    expires = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)).isoformat()
    for endpoint in (
        "http://169.254.169.254/latest/meta-data/",
        "http://0.0.0.0:8400/api/v1/audit",
        "http://[fe80::1]/x",
    ):
        refused = await b.call(
            "POST",
            "/api/v1/subscriptions",
            json={"topic": "workflow-state", "endpoint_url": endpoint, "expires": expires},
        )
        assert refused.status_code == 403, (endpoint, refused.text)
        assert refused.json()["error"]["reason"] == "endpoint-address-not-allowed"
        assert "169.254" not in refused.text
    assert (await b.call("GET", "/api/v1/subscriptions")).json()["subscriptions"] == []
