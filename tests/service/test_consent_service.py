"""The consent service over real gRPC and a real database: directives, revocation on the next
request on every replica (no stale permit), grants, break-the-glass with expiry and its audit and
notice, explain, and the caller checks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from sqlalchemy import select

from gateway.client import Practitioner
from hie.audit.v1 import audit_pb2, audit_pb2_grpc
from hie.common.v1 import common_pb2
from hie.consent.v1 import consent_pb2, consent_pb2_grpc
from services.consent.cache import PatientConsentCache
from services.consent.service import SPEC as CONSENT
from services.consent.servicer import BREAK_GLASS_TOPIC
from services.shared.auth import PlatformCredentials
from services.shared.process import start_service
from tests.conftest import Exchange
from tests.support.factories import direct_metadata, person

CONSENT_SCOPES = "system/Consent.cruds system/DocumentReference.rs system/Patient.crs"
DOCTOR = Practitioner(id="B-DOC-7", name="乙院急诊医生", role="doctor", department="急诊科")


@dataclass
class Scene:
    exchange: Exchange
    a_org: str
    b_org: str
    enterprise_id: str

    def meta(
        self,
        org: str,
        *,
        purpose: str = "treatment",
        scope: str = CONSENT_SCOPES,
        practitioner: Practitioner = DOCTOR,
        org_type: str = "hospital",
    ) -> tuple[tuple[str, str], ...]:
        return direct_metadata(
            self.exchange.settings.gateway_signing_key_file,  # type: ignore[arg-type]
            org=org,
            scope=scope,
            purpose=purpose,
            practitioner=practitioner,
            org_type=org_type,
        )

    def platform(self) -> tuple[tuple[str, str], ...]:
        credentials = PlatformCredentials.from_file(
            self.exchange.settings.service_signing_key_file,  # type: ignore[arg-type]
            service="referral",
            issuer="urn:hie:service:referral",
        )
        return tuple(credentials.metadata())

    def item(self, item_id: str, *, labels: tuple[str, ...] = (), source: str = "") -> consent_pb2.DecisionItem:
        return consent_pb2.DecisionItem(
            item_id=item_id,
            source_organization_id=source or self.a_org,
            class_code="clinical-note",
            type_code="18842-5",
            security_labels=labels,
        )


@pytest.fixture
async def scene(exchange: Exchange) -> AsyncIterator[Scene]:
    a = await exchange.member(name="同意测试甲院")
    b = await exchange.member(name="同意测试乙院")
    patient = person("钱十二")
    registered = await a.call("POST", "/api/v1/patients", json={"local_id": "CS-A", **patient})
    assert registered.status_code == 201, registered.text
    linked = await b.call("POST", "/api/v1/patients", json={"local_id": "CS-B", **patient})
    assert linked.json()["enterprise_id"] == registered.json()["enterprise_id"]
    yield Scene(exchange, a.org_id, b.org_id, registered.json()["enterprise_id"])  # type: ignore[attr-defined]
    for member in (a, b):
        await member.aclose()


def _stub(
    exchange: Exchange, port: int | None = None
) -> tuple[grpc.aio.Channel, consent_pb2_grpc.ConsentDecisionPointStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port or exchange.services['consent'].port}")
    return channel, consent_pb2_grpc.ConsentDecisionPointStub(channel)


def _deny_org(org: str) -> consent_pb2.Provision:
    return consent_pb2.Provision(
        type=consent_pb2.PROVISION_TYPE_DENY,
        actors=[consent_pb2.Actor(kind=consent_pb2.ACTOR_KIND_ORGANIZATION, organization_id=org)],
    )


def _directive(local_id: str, provision: consent_pb2.Provision) -> consent_pb2.Directive:
    return consent_pb2.Directive(
        patient=common_pb2.PatientRef(local_id=local_id),
        policy_ids=["urn:oid:2.16.156.10011.2.1"],
        evidence_document_id="signed-form-0001",
        provision=provision,
    )


async def _decide(
    stub: consent_pb2_grpc.ConsentDecisionPointStub, s: Scene, items: list[consent_pb2.DecisionItem], **meta: object
) -> list[consent_pb2.ItemDecision]:
    reply = await stub.Decide(
        # B registered the patient too: the care relationship the registry checks and passes on.
        consent_pb2.DecideRequest(enterprise_id=s.enterprise_id, items=items, requester_holds_record=True),
        metadata=s.meta(s.b_org, **meta),  # type: ignore[arg-type]
    )
    return list(reply.decisions)


async def _audit_types(s: Scene) -> list[str]:
    await s.exchange.audit_settled()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{s.exchange.services['audit'].port}") as channel:
        found = await audit_pb2_grpc.AuditLogStub(channel).Query(
            audit_pb2.QueryRequest(patient_enterprise_id=s.enterprise_id, page=common_pb2.PageRequest(page_size=500)),
            metadata=s.platform(),
        )
    return [e.type for e in found.events]


async def test_directive_lifecycle_revocation_takes_effect_on_the_next_request(scene: Scene) -> None:
    s = scene
    channel, stub = _stub(s.exchange)
    async with channel:
        assert [d.basis for d in await _decide(stub, s, [s.item("d-1")])] == ["regional-default:treatment"]
        recorded = await stub.RecordDirective(
            consent_pb2.RecordDirectiveRequest(directive=_directive("CS-A", _deny_org(s.b_org)), idempotency_key="k1"),
            metadata=s.meta(s.a_org),
        )
        directive = recorded.directive
        assert recorded.created
        assert directive.enterprise_id == s.enterprise_id
        assert directive.status == consent_pb2.DIRECTIVE_STATUS_ACTIVE
        assert directive.revision == 1
        # A retry with the same key gets the first answer (created, its audit event); another
        # request under it is refused.
        again = await stub.RecordDirective(
            consent_pb2.RecordDirectiveRequest(directive=_directive("CS-A", _deny_org(s.b_org)), idempotency_key="k1"),
            metadata=s.meta(s.a_org),
        )
        assert again == recorded
        assert len(again.audit_event_ids) == 1
        with pytest.raises(grpc.aio.AioRpcError) as reused:
            await stub.RecordDirective(
                consent_pb2.RecordDirectiveRequest(directive=_directive("CS-A", _deny_org("x")), idempotency_key="k1"),
                metadata=s.meta(s.a_org),
            )
        assert reused.value.code() == grpc.StatusCode.ALREADY_EXISTS

        [denied] = await _decide(stub, s, [s.item("d-1")])
        assert (denied.decision, denied.basis) == (consent_pb2.DECISION_DENY, "directive-deny")
        assert denied.reference == f"Consent/{directive.directive_id}#provision"
        # The registering hospital still sees its own document.
        own = await stub.Decide(
            consent_pb2.DecideRequest(enterprise_id=s.enterprise_id, items=[s.item("d-1")]), metadata=s.meta(s.a_org)
        )
        assert own.decisions[0].basis == "own-document"

        # B also registered the patient: it may read and revise the directive (its own record of them).
        listed = await stub.ListDirectives(
            consent_pb2.ListDirectivesRequest(patient=common_pb2.PatientRef(local_id="CS-B")),
            metadata=s.meta(s.b_org),
        )
        assert [d.directive_id for d in listed.directives] == [directive.directive_id]
        revised = await stub.ReviseDirective(
            consent_pb2.ReviseDirectiveRequest(
                directive=consent_pb2.Directive(
                    directive_id=directive.directive_id,
                    evidence_document_id="signed-form-0002",
                    provision=consent_pb2.Provision(
                        type=consent_pb2.PROVISION_TYPE_DENY,
                        purposes=["research"],
                        provisions=[_deny_org(s.b_org)],
                    ),
                ),
                expected_revision=1,
            ),
            metadata=s.meta(s.a_org),
        )
        assert revised.directive.revision == 2
        assert revised.directive.provision.provisions[0].actors[0].organization_id == s.b_org
        with pytest.raises(grpc.aio.AioRpcError) as conflict:
            await stub.ReviseDirective(
                consent_pb2.ReviseDirectiveRequest(directive=revised.directive, expected_revision=1),
                metadata=s.meta(s.a_org),
            )
        assert dict(conflict.value.trailing_metadata())["hie-error-reason"] == "revision-conflict"
        # Treatment is no longer inside the (research-only) deny.
        assert (await _decide(stub, s, [s.item("d-1")]))[0].decision == consent_pb2.DECISION_PERMIT
        assert (await _decide(stub, s, [s.item("d-1")], purpose="research"))[0].basis == "directive-deny"

        revoked = await stub.RevokeDirective(
            consent_pb2.RevokeDirectiveRequest(directive_id=directive.directive_id), metadata=s.meta(s.a_org)
        )
        assert revoked.directive.status == consent_pb2.DIRECTIVE_STATUS_REVOKED
        assert (await _decide(stub, s, [s.item("d-1")], purpose="research"))[0].basis == (
            "regional-default:purpose-not-permitted"
        )
        got = await stub.GetDirective(
            consent_pb2.GetDirectiveRequest(directive_id=directive.directive_id), metadata=s.meta(s.b_org)
        )
        assert got.directive.revision == 3
        # Another organisation that never registered the patient does not learn the directive exists.
        with pytest.raises(grpc.aio.AioRpcError) as hidden:
            await stub.GetDirective(
                consent_pb2.GetDirectiveRequest(directive_id=directive.directive_id), metadata=s.meta("org-stranger")
            )
        assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
    types = await _audit_types(s)
    for expected in (
        "consent.directive.record",
        "consent.directive.list",
        "consent.directive.revise",
        "consent.directive.revoke",
        "consent.directive.read",
    ):
        assert types.count(expected) == 1, (expected, types)


async def test_no_stale_permit_after_revoke_on_another_replica(scene: Scene) -> None:
    """Two replicas over one database: each caches the patient, the version counter invalidates."""
    s = scene
    replica = await start_service(CONSENT, s.exchange.settings, listen="127.0.0.1:0")
    try:
        one_channel, one = _stub(s.exchange)
        two_channel, two = _stub(s.exchange, replica.port)
        async with one_channel, two_channel:
            psy = s.item("d-psy", labels=("PSY",))
            assert (await _decide(two, s, [psy]))[0].basis == "restricted-sensitivity"
            permit = consent_pb2.Provision(
                type=consent_pb2.PROVISION_TYPE_PERMIT,
                security_labels=["PSY"],
                actors=[consent_pb2.Actor(kind=consent_pb2.ACTOR_KIND_ORGANIZATION, organization_id=s.b_org)],
            )
            recorded = await one.RecordDirective(
                consent_pb2.RecordDirectiveRequest(directive=_directive("CS-A", permit)), metadata=s.meta(s.a_org)
            )
            for _ in range(3):  # served from replica two's cache after the first load
                assert (await _decide(two, s, [psy]))[0].basis == "directive-permit"
            await one.RevokeDirective(
                consent_pb2.RevokeDirectiveRequest(directive_id=recorded.directive.directive_id),
                metadata=s.meta(s.a_org),
            )
            # The very next request on the other replica no longer permits.
            [after] = await _decide(two, s, [psy])
            assert (after.decision, after.basis) == (consent_pb2.DECISION_DENY, "restricted-sensitivity")
    finally:
        await replica.stop(grace=None)


async def test_referral_grant_open_close_revoke(scene: Scene) -> None:
    s = scene
    channel, stub = _stub(s.exchange)
    grant = consent_pb2.AccessGrant(
        organization_id=s.b_org,
        purpose_of_use="referral",
        patient=common_pb2.PatientRef(domain=s.a_org, local_id="CS-A"),
        document_ids=["d-attached"],
        include_summary=True,
        reference="ServiceRequest/test-referral-1",
    )
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as hospital:
            await stub.GrantAccess(consent_pb2.GrantAccessRequest(grant=grant), metadata=s.meta(s.a_org))
        assert dict(hospital.value.trailing_metadata())["hie-error-reason"] == "platform-only"
        items = [s.item("d-attached"), s.item("d-other")]
        assert [d.decision for d in await _decide(stub, s, items, purpose="referral")] == [
            consent_pb2.DECISION_DENY,
            consent_pb2.DECISION_DENY,
        ]
        granted = await stub.GrantAccess(consent_pb2.GrantAccessRequest(grant=grant), metadata=s.platform())
        assert granted.grant.enterprise_id == s.enterprise_id
        assert not granted.grant.HasField("end")
        decided = await _decide(stub, s, items, purpose="referral")
        assert [(d.decision, d.basis) for d in decided] == [
            (consent_pb2.DECISION_PERMIT, "grant"),
            (consent_pb2.DECISION_DENY, "regional-default:purpose-not-permitted"),
        ]
        assert decided[0].reference == f"grant/{granted.grant.grant_id}"
        # Closing sets the end to close + grace (7 days by default): still permitted now.
        closed = await stub.GrantAccess(
            consent_pb2.GrantAccessRequest(grant=grant, closed=granted.grant.start), metadata=s.platform()
        )
        assert closed.grant.end.seconds - granted.grant.start.seconds == 7 * 24 * 3600
        assert (await _decide(stub, s, items[:1], purpose="referral"))[0].basis == "grant"
        await stub.RevokeGrant(consent_pb2.RevokeGrantRequest(reference=grant.reference), metadata=s.platform())
        assert (await _decide(stub, s, items[:1], purpose="referral"))[0].decision == consent_pb2.DECISION_DENY
        # A late, re-delivered grant message does not revive a revoked grant.
        late = await stub.GrantAccess(consent_pb2.GrantAccessRequest(grant=grant), metadata=s.platform())
        assert late.grant.revoked
        assert (await _decide(stub, s, items[:1], purpose="referral"))[0].decision == consent_pb2.DECISION_DENY


async def test_break_glass_opens_audits_notifies_and_expires(scene: Scene) -> None:
    s = scene
    channel, stub = _stub(s.exchange)
    psy = s.item("d-psy-bg", labels=("PSY",))
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as no_emergency:
            await stub.DeclareBreakGlass(
                consent_pb2.DeclareBreakGlassRequest(patient=common_pb2.PatientRef(local_id="CS-B"), reason="昏迷"),
                metadata=s.meta(s.b_org),
            )
        assert no_emergency.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as no_reason:
            await stub.DeclareBreakGlass(
                consent_pb2.DeclareBreakGlassRequest(patient=common_pb2.PatientRef(local_id="CS-B"), reason=" "),
                metadata=s.meta(s.b_org, purpose="emergency"),
            )
        assert dict(no_reason.value.trailing_metadata())["hie-error-reason"] == "reason-missing"
        declared = await stub.DeclareBreakGlass(
            consent_pb2.DeclareBreakGlassRequest(
                patient=common_pb2.PatientRef(local_id="CS-B"),
                reason="患者昏迷送入急诊，需查阅既往病史",
                duration_seconds=1,
            ),
            metadata=s.meta(s.b_org, purpose="emergency"),
        )
        assert declared.enterprise_id == s.enterprise_id
        assert declared.expires.ToNanoseconds() - declared.starts.ToNanoseconds() == 1_000_000_000
        [opened] = await _decide(stub, s, [psy], purpose="emergency")
        assert (opened.decision, opened.basis, opened.break_glass) == (consent_pb2.DECISION_PERMIT, "break-glass", True)
        # Another clinician of the same hospital is not covered.
        [other] = await _decide(
            stub, s, [psy], purpose="emergency", practitioner=Practitioner(id="B-DOC-8", role="doctor")
        )
        assert other.decision == consent_pb2.DECISION_DENY
        # The notice to the home hospital (A) is in the outbox: ids only, no patient data.
        runtime = s.exchange.services["consent"].runtime
        table = runtime.outbox._table
        async with runtime.sessions() as session:
            payloads = (await session.execute(select(table.c.payload).where(table.c.topic == BREAK_GLASS_TOPIC))).all()
        notices = [json.loads(p.payload) for p in payloads]
        notice = next(n for n in notices if n["break_glass_id"] == declared.break_glass_id)
        assert notice["notify_organization_ids"] == [s.a_org]
        assert set(notice) == {
            "break_glass_id",
            "enterprise_id",
            "declared_by_organization_id",
            "practitioner_id",
            "starts",
            "expires",
            "notify_organization_ids",
        }
        await asyncio.sleep(1.05)
        [expired] = await _decide(stub, s, [psy], purpose="emergency")
        assert (expired.decision, expired.basis) == (consent_pb2.DECISION_DENY, "restricted-sensitivity")
    types = await _audit_types(s)
    # The declaration and the access it opened, both as break-glass.
    assert types.count("consent.break-glass") == 2, types


async def test_explain_for_auditors(scene: Scene) -> None:
    s = scene
    channel, stub = _stub(s.exchange)
    request = consent_pb2.ExplainRequest(
        enterprise_id=s.enterprise_id,
        item=s.item("d-9", labels=("HIV",)),
        organization_id=s.b_org,
        purpose_of_use="treatment",
    )
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as doctor:
            await stub.Explain(request, metadata=s.meta(s.a_org))
        assert dict(doctor.value.trailing_metadata())["hie-error-reason"] == "role"
        auditor = Practitioner(id="AUD-9", name="审计员", role="auditor", department="医政医管处")
        with pytest.raises(grpc.aio.AioRpcError) as other_hospital:
            await stub.Explain(
                request, metadata=s.meta(s.a_org, scope="system/Consent.r", practitioner=auditor, purpose="audit")
            )
        assert dict(other_hospital.value.trailing_metadata())["hie-error-reason"] == "explain-own-only"
        own = await stub.Explain(
            request, metadata=s.meta(s.b_org, scope="system/Consent.r", practitioner=auditor, purpose="audit")
        )
        assert own.decision.basis == "restricted-sensitivity"
        reply = await stub.Explain(
            request,
            metadata=s.meta(
                "auth-region",
                scope="system/AuditEvent.rs",
                practitioner=auditor,
                purpose="audit",
                org_type="authority",
            ),
        )
    assert reply.decision.basis == "restricted-sensitivity"
    assert reply.explanation.startswith("DENY: document d-9")
    assert "HIV" in reply.explanation


@pytest.mark.parametrize(
    ("provision", "evidence", "reason"),
    [
        (consent_pb2.Provision(), "form-1", "provision-invalid"),
        (
            consent_pb2.Provision(type=consent_pb2.PROVISION_TYPE_DENY, purposes=["marketing"]),
            "form-1",
            "provision-invalid",
        ),
        (
            consent_pb2.Provision(
                type=consent_pb2.PROVISION_TYPE_DENY, actors=[consent_pb2.Actor(kind=consent_pb2.ACTOR_KIND_DEPARTMENT)]
            ),
            "form-1",
            "provision-invalid",
        ),
        (consent_pb2.Provision(type=consent_pb2.PROVISION_TYPE_DENY), "", "evidence-missing"),
        (
            consent_pb2.Provision(type=consent_pb2.PROVISION_TYPE_PERMIT, obligations=["burn-after-reading"]),
            "form-1",
            "obligation-unknown",
        ),
    ],
)
async def test_bad_directives_are_refused(
    scene: Scene, provision: consent_pb2.Provision, evidence: str, reason: str
) -> None:
    s = scene
    channel, stub = _stub(s.exchange)
    directive = consent_pb2.Directive(
        patient=common_pb2.PatientRef(local_id="CS-A"), evidence_document_id=evidence, provision=provision
    )
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.RecordDirective(
                consent_pb2.RecordDirectiveRequest(directive=directive), metadata=s.meta(s.a_org)
            )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(refused.value.trailing_metadata())["hie-error-reason"] == reason


async def test_caller_checks(scene: Scene) -> None:
    s = scene
    channel, stub = _stub(s.exchange)
    directive = _directive("CS-A", _deny_org(s.b_org))
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as scope:
            await stub.RecordDirective(
                consent_pb2.RecordDirectiveRequest(directive=directive),
                metadata=s.meta(s.a_org, scope="system/Patient.crs"),
            )
        assert dict(scope.value.trailing_metadata())["hie-error-reason"] == "scope"
        with pytest.raises(grpc.aio.AioRpcError) as role:
            await stub.RecordDirective(
                consent_pb2.RecordDirectiveRequest(directive=directive),
                metadata=s.meta(s.a_org, practitioner=Practitioner(id="P-1", role="pharmacist")),
            )
        assert dict(role.value.trailing_metadata())["hie-error-reason"] == "role"
        # A hospital records directives only for patients it registered itself.
        with pytest.raises(grpc.aio.AioRpcError) as foreign:
            await stub.RecordDirective(
                consent_pb2.RecordDirectiveRequest(
                    directive=consent_pb2.Directive(
                        patient=common_pb2.PatientRef(domain=s.b_org, local_id="CS-B"),
                        evidence_document_id="f",
                        provision=_deny_org("x"),
                    )
                ),
                metadata=s.meta(s.a_org),
            )
        assert foreign.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as no_patient:
            await stub.Decide(consent_pb2.DecideRequest(items=[s.item("d")]), metadata=s.meta(s.b_org))
        assert dict(no_patient.value.trailing_metadata())["hie-error-reason"] == "enterprise-id-missing"


async def test_cache_reloads_a_patient_only_after_a_change(scene: Scene) -> None:
    s = scene
    runtime = s.exchange.services["consent"].runtime
    cache = PatientConsentCache(runtime.engine, runtime.sessions)
    assert (await cache.get(s.enterprise_id)).directives == ()  # nothing recorded: no load at all
    assert cache.loads == 0
    channel, stub = _stub(s.exchange)
    async with channel:
        recorded = await stub.RecordDirective(
            consent_pb2.RecordDirectiveRequest(directive=_directive("CS-A", _deny_org(s.b_org))),
            metadata=s.meta(s.a_org),
        )
        for _ in range(3):
            loaded = await cache.get(s.enterprise_id)
        assert cache.loads == 1
        assert [d.directive_id for d in loaded.directives] == [recorded.directive.directive_id]
        await stub.RevokeDirective(
            consent_pb2.RevokeDirectiveRequest(directive_id=recorded.directive.directive_id), metadata=s.meta(s.a_org)
        )
    reloaded = await cache.get(s.enterprise_id)
    await cache.close()
    assert cache.loads == 2
    assert reloaded.directives[0].status.value == "revoked"


async def test_regional_configuration_opt_in_and_never_overridable(
    scene: Scene, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consent service configured as an opt-in region that never lets break-the-glass open HIV."""
    s = scene
    monkeypatch.setenv("HIE_CONSENT_REGION_MODE", "opt-in")
    monkeypatch.setenv("HIE_CONSENT_NEVER_OVERRIDABLE", "HIV")
    configured = await start_service(CONSENT, s.exchange.settings, listen="127.0.0.1:0")
    try:
        default_channel, default = _stub(s.exchange)
        region_channel, region = _stub(s.exchange, configured.port)
        async with default_channel, region_channel:
            plain, hiv = s.item("d-plain"), s.item("d-hiv", labels=("HIV",))
            assert [d.basis for d in await _decide(default, s, [plain])] == ["regional-default:treatment"]
            assert [d.basis for d in await _decide(region, s, [plain])] == ["regional-default:opt-in"]
            await region.DeclareBreakGlass(
                consent_pb2.DeclareBreakGlassRequest(
                    patient=common_pb2.PatientRef(local_id="CS-B"), reason="急诊抢救需要既往史", duration_seconds=60
                ),
                metadata=s.meta(s.b_org, purpose="emergency"),
            )
            opened = await _decide(default, s, [plain, hiv], purpose="emergency")
            assert [d.basis for d in opened] == ["break-glass", "break-glass"]
            kept = await _decide(region, s, [plain, hiv], purpose="emergency")
            assert [(d.decision, d.basis) for d in kept] == [
                (consent_pb2.DECISION_PERMIT, "break-glass"),
                (consent_pb2.DECISION_DENY, "restricted-sensitivity"),
            ]
    finally:
        await configured.stop(grace=None)
