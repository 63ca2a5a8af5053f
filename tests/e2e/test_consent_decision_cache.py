"""The registry keeps consent's decisions for the query and read hot path
(services/registry/decision_cache.py): every change to a patient's consent is seen by the very
next read through the gateway (consent has the registry drop the patient's decisions before the
change's answer is returned), a kept decision is not used past the moment consent said it holds
until, and break-the-glass reads are never answered from it (consent audits each one)."""

from __future__ import annotations

import asyncio
import datetime
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from gateway.client import HospitalClient, Practitioner
from hie.registry.v1 import registry_pb2, registry_pb2_grpc
from services.registry.decision_cache import ConsentDecisionCache
from services.shared.auth import PlatformCredentials
from tests.conftest import Exchange
from tests.support.factories import document, grpc_metadata, person

SCOPES = (
    "system/Patient.crs system/DocumentReference.crs system/ServiceRequest.crus system/Consent.cruds "
    "system/AuditEvent.rs"
)
DOCTOR = Practitioner(id="B-ER-7", name="急诊科医生", role="doctor", department="急诊科")


@dataclass
class Scene:
    exchange: Exchange
    a: HospitalClient
    b: HospitalClient
    a_local: str
    b_local: str
    enterprise_id: str
    summary_id: str

    @property
    def decisions(self) -> ConsentDecisionCache:
        registry = self.exchange.services["registry"].servicers["hie.registry.v1.DocumentRegistry"]
        return registry._decisions  # type: ignore[no-any-return]

    async def b_finds(self, purpose: str = "treatment") -> bool:
        found = await self.b.call(
            "GET", "/api/v1/documents", params={"patient_local_id": self.b_local}, purpose=purpose
        )
        assert found.status_code == 200, found.text
        return self.summary_id in {e["document_id"] for e in found.json()["entries"]}

    async def b_reads(self, purpose: str = "treatment") -> int:
        read = await self.b.call("GET", f"/api/v1/documents/{self.summary_id}/content", purpose=purpose)
        if read.status_code == 403:
            assert read.json()["error"]["reason"] == "consent-denied"
        return read.status_code

    async def b_sees_cached(self, purpose: str = "treatment") -> bool:
        """Whether B finds and reads the summary, asked twice: the second answer is the kept one."""
        first = await self.b_finds(purpose), await self.b_reads(purpose)
        assert self.decisions.kept_for(self.enterprise_id) > 0  # consent's answer is kept
        second = await self.b_finds(purpose), await self.b_reads(purpose)
        assert first == second
        assert first in {(True, 200), (False, 403)}
        return first[0]

    async def b_sees_next(self, purpose: str = "treatment") -> bool:
        seen = await self.b_finds(purpose), await self.b_reads(purpose)
        assert seen in {(True, 200), (False, 403)}
        return seen[0]

    async def directive(self, provision: dict, **extra: object) -> str:
        recorded = await self.a.call(
            "POST",
            "/api/v1/consent/directives",
            json={
                "patient_local_id": self.a_local,
                "policy_ids": ["urn:oid:2.16.156.10011.2.5.1"],
                "evidence_document_id": f"consent-form-{secrets.token_hex(3)}",
                "provision": provision,
                **extra,
            },
        )
        assert recorded.status_code == 201, recorded.text
        return recorded.json()["directive_id"]


@pytest.fixture
async def scene(exchange: Exchange) -> AsyncIterator[Scene]:
    a = await exchange.member(scopes=SCOPES, name="城南社区卫生服务中心")
    b = await exchange.member(scopes=SCOPES, name="市第二人民医院")
    a.practitioner = Practitioner(id="A-GP-7", name="全科医生", role="doctor", department="全科")
    b.practitioner = DOCTOR
    tag = secrets.token_hex(3)
    patient = person("慕容青")
    at_a = await a.call("POST", "/api/v1/patients", json={"local_id": f"DC-A-{tag}", **patient})
    at_b = await b.call("POST", "/api/v1/patients", json={"local_id": f"DC-B-{tag}", **patient})
    assert at_a.status_code == at_b.status_code == 201, at_b.text
    assert at_b.json()["enterprise_id"] == at_a.json()["enterprise_id"]
    summary = await a.call("POST", "/api/v1/documents", json=document(f"DC-A-{tag}", "出院小结：肺炎".encode()))
    assert summary.status_code == 201, summary.text
    yield Scene(
        exchange,
        a,
        b,
        f"DC-A-{tag}",
        f"DC-B-{tag}",
        at_a.json()["enterprise_id"],
        summary.json()["document_id"],
    )
    for member in (a, b):
        await member.aclose()


async def test_a_deny_directive_and_its_revocation_are_seen_by_the_very_next_read(scene: Scene) -> None:
    s = scene
    assert await s.b_sees_cached()  # the regional default permits treatment: kept
    directive_id = await s.directive(
        {"type": "deny", "actors": [{"kind": "organization", "organization_id": s.b.org_id}]}  # type: ignore[attr-defined]
    )
    assert not await s.b_sees_next()  # no stale permit
    assert not await s.b_sees_cached()  # the deny is kept in turn
    revoked = await s.a.call("DELETE", f"/api/v1/consent/directives/{directive_id}")
    assert revoked.status_code == 200, revoked.text
    assert await s.b_sees_next()


async def test_a_revoked_permit_is_not_used_by_the_very_next_read(scene: Scene) -> None:
    s = scene
    # Research is not a default purpose: only the patient's permit opens it.
    assert not await s.b_sees_next("research")
    permit = await s.directive(
        {
            "type": "permit",
            "purposes": ["research"],
            "actors": [{"kind": "organization", "organization_id": s.b.org_id}],  # type: ignore[attr-defined]
        }
    )
    assert await s.b_sees_cached("research")
    revoked = await s.a.call("DELETE", f"/api/v1/consent/directives/{permit}")
    assert revoked.status_code == 200, revoked.text
    assert not await s.b_sees_next("research")


async def test_a_kept_permit_is_not_used_past_the_end_of_the_directive_that_gave_it(scene: Scene) -> None:
    s = scene
    end = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=1.5)
    await s.directive(
        {
            "type": "permit",
            "purposes": ["research"],
            "actors": [{"kind": "organization", "organization_id": s.b.org_id}],  # type: ignore[attr-defined]
        },
        period={"end": end.isoformat()},
    )
    assert await s.b_sees_cached("research")
    # Nothing is recorded when the period ends: the kept permit ends there on its own.
    await asyncio.sleep(max(0.0, (end - datetime.datetime.now(datetime.UTC)).total_seconds()) + 0.05)
    assert not await s.b_sees_next("research")


async def test_break_the_glass_is_seen_at_once_and_each_of_its_reads_reaches_consent(scene: Scene) -> None:
    s = scene
    await s.directive(
        {"type": "deny", "actors": [{"kind": "organization", "organization_id": s.b.org_id}]}  # type: ignore[attr-defined]
    )
    assert not await s.b_sees_cached("emergency")  # the deny is kept
    declared = await s.b.call(
        "POST",
        "/api/v1/consent/break-glass",
        purpose="emergency",
        json={"patient_local_id": s.b_local, "reason": "患者昏迷送入急诊，需既往病史", "duration_seconds": 60},
    )
    assert declared.status_code == 201, declared.text
    reads = 3
    for _ in range(reads):
        assert await s.b_sees_next("emergency")
    # Never kept: every break-the-glass access went to consent, which put it on the record.
    assert s.decisions.kept_for(s.enterprise_id) == 0
    await s.exchange.audit_settled()
    auditor = await s.exchange.member(type="authority", scopes="system/AuditEvent.rs", name="市卫健委")
    report = await auditor.call(
        "GET",
        "/api/v1/audit/reports/break-glass",
        params={"organization_id": s.b.org_id},  # type: ignore[attr-defined]
        purpose="audit",
    )
    assert report.status_code == 200, report.text
    opened = [
        e for e in report.json()["events"] if e["action"] == "read" and e["patient_enterprise_id"] == s.enterprise_id
    ]
    assert len(opened) == 2 * reads  # a query and a read each time
    await auditor.aclose()


async def test_a_closed_referral_grant_is_seen_by_the_very_next_read(scene: Scene) -> None:
    s = scene
    referral = {
        "patient_local_id": s.a_local,
        "target_organization_id": s.b.org_id,  # type: ignore[attr-defined]
        "direction": "up",
        "reason": "血压控制不佳，转上级医院",
        "document_ids": [s.summary_id],
    }
    created = await s.a.call("POST", "/api/v1/referrals", purpose="referral", json=referral)
    assert created.status_code == 201, created.text
    referral_id = created.json()["referral_id"]
    accepted = await s.b.call(
        "POST", f"/api/v1/referrals/{referral_id}/accept", purpose="referral", json={"reason": "同意接收"}
    )
    assert accepted.status_code == 200, accepted.text
    await s.exchange.audit_settled()  # the referral outbox delivers the grant to consent
    assert await s.b_sees_cached("referral")
    cancelled = await s.a.call("POST", f"/api/v1/referrals/{referral_id}/cancel", purpose="referral")
    assert cancelled.status_code == 200, cancelled.text
    await s.exchange.audit_settled()  # consent revokes the grant, then has the registry drop it
    assert not await s.b_sees_next("referral")


async def test_only_the_consent_service_invalidates_decisions(exchange: Exchange) -> None:
    hospital = await exchange.member(name="第八人民医院")
    key_file = exchange.settings.service_signing_key_file
    as_mpi = PlatformCredentials.from_file(key_file, service="mpi", issuer="urn:hie:service:mpi")
    as_consent = PlatformCredentials.from_file(key_file, service="consent", issuer="urn:hie:service:consent")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{exchange.services['registry'].port}") as channel:
        stub = registry_pb2_grpc.DocumentRegistryStub(channel)
        request = registry_pb2.InvalidateConsentDecisionsRequest(enterprise_id="E-none")
        for refused in (grpc_metadata(hospital, await hospital.access_token()), as_mpi.metadata()):
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await stub.InvalidateConsentDecisions(request, metadata=refused)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        first = await stub.InvalidateConsentDecisions(request, metadata=as_consent.metadata())
        second = await stub.InvalidateConsentDecisions(request, metadata=as_consent.metadata())
        assert second.generation > first.generation > 0
    await hospital.aclose()
