"""Operations metrics move when the events happen: requests, consent denials, break-the-glass,
notification dead letters, an outbox backlog while its relay is stopped, token refusals per
organisation — driven over HTTP through the gateway, read from the Prometheus scrape endpoint
the way Prometheus reads it, and never carrying a patient's name or identifiers."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import os
import re
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.client import HospitalClient, Practitioner
from services.shared.keys import generate_ec_key
from tests.conftest import Exchange, base_settings, drop_schemas, start_exchange
from tests.support.factories import document, person
from tests.support.metrics import metrics_url, scrape, value
from tests.support.webhooks import Receiver

SCOPES = (
    "system/Patient.crs system/DocumentReference.crs system/Consent.cruds system/ServiceRequest.crus "
    "system/AuditEvent.rs"
)

PATIENT_NAME = "欧阳监测"
EMERGENCY_DOCTOR = Practitioner(id="M-ER-1", name="急诊值班医生", role="doctor", department="急诊科")


async def until(name: str, done: Callable[[float], bool], **labels: str) -> float:
    """Scrape until the summed series satisfies `done` (15 s at most); returns the last value."""
    deadline = asyncio.get_running_loop().time() + 15.0
    while True:
        _page, samples = await scrape(name)
        current = value(samples, name, **labels)
        if done(current) or asyncio.get_running_loop().time() > deadline:
            return current
        await asyncio.sleep(0.5)


@contextmanager
def environment(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class Scene:
    exchange: Exchange
    a: HospitalClient
    b: HospitalClient
    enterprise_id: str
    document_id: str
    national_id: str


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def metered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, keys_dir: Path):  # type: ignore[no-untyped-def]
    """An exchange of its own whose samplers run every 0.2 s and whose notification broker
    gives up on an endpoint after 1.5 s."""
    backend = request.param
    if backend == "postgres" and not os.environ.get("HIE_TEST_DATABASE_URL"):
        pytest.skip("HIE_TEST_DATABASE_URL not set")
    settings = base_settings(tmp_path_factory.mktemp(f"metered-{backend}"), keys_dir, backend)
    settings = dataclasses.replace(settings, metrics_sample_seconds=0.2)
    with environment(
        HIE_NOTIFY_RETRY_BASE_SECONDS="0.05",
        HIE_NOTIFY_MAX_BACKOFF_SECONDS="0.2",
        HIE_NOTIFY_DEAD_LETTER_AFTER_SECONDS="1.5",
    ):
        running, gateway = await start_exchange(settings, backend)
    try:
        yield running
    finally:
        await gateway.stop()
        for service in running.services.values():
            await service.stop(grace=None)
        await drop_schemas(settings)


@pytest.fixture
async def scene(metered: Exchange) -> AsyncIterator[Scene]:
    a = await metered.member(scopes=SCOPES, name="城东社区卫生服务中心")
    b = await metered.member(scopes=SCOPES, name="市中心医院")
    a.practitioner = Practitioner(id="M-GP-1", name="全科医生", role="doctor", department="全科")
    b.practitioner = EMERGENCY_DOCTOR
    local = f"MT-{secrets.token_hex(3)}"
    patient = person(PATIENT_NAME)
    at_a = await a.call("POST", "/api/v1/patients", json={"local_id": local + "A", **patient})
    at_b = await b.call("POST", "/api/v1/patients", json={"local_id": local + "B", **patient})
    assert at_a.status_code == at_b.status_code == 201, at_a.text
    summary = await a.call("POST", "/api/v1/documents", json=document(local + "A", "出院小结：血压平稳".encode()))
    assert summary.status_code == 201, summary.text
    a.local_id = local + "A"  # type: ignore[attr-defined]
    b.local_id = local + "B"  # type: ignore[attr-defined]
    yield Scene(metered, a, b, at_a.json()["enterprise_id"], summary.json()["document_id"], patient["national_id"])
    for member in (a, b):
        await member.aclose()


async def test_a_request_moves_its_routes_counter_and_histogram(scene: Scene) -> None:
    s = scene
    route = {"route": "/api/v1/documents/{document_id}", "method": "GET"}
    _page, before = await scrape()
    read = await s.a.call("GET", f"/api/v1/documents/{s.document_id}")
    assert read.status_code == 200, read.text
    missing = await s.a.call("GET", f"/api/v1/documents/{secrets.token_hex(8)}")
    assert missing.status_code == 404
    _page, after = await scrape()

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("hie_http_server_requests_total", **route, status="200") == 1
    assert moved("hie_http_server_requests_total", **route, status="404") == 1
    assert moved("hie_http_server_duration_seconds_count", **route) == 2
    assert moved("hie_http_server_duration_seconds_sum", **route) > 0
    reason = missing.json()["error"]["reason"]
    assert moved("hie_http_server_errors_total", route=route["route"], status="404", reason=reason) == 1
    # The registry answered the read over gRPC: its RPC counter and histogram moved too.
    assert moved("hie_rpc_server_requests_total", component="registry", code="OK") >= 1
    assert moved("hie_rpc_server_duration_seconds_count", component="registry") >= 1
    assert moved("hie_rpc_server_errors_total", component="registry", code="NOT_FOUND") >= 1
    # No series carries the raw path (with the document id in it).
    assert not any(s.document_id in dict(labels).get("route", "") for (_n, labels) in after)


async def test_consent_denial_and_break_glass_are_counted(scene: Scene) -> None:
    s = scene
    directive = await s.a.call(
        "POST",
        "/api/v1/consent/directives",
        json={
            "patient_local_id": s.a.local_id,  # type: ignore[attr-defined]
            "policy_ids": ["urn:oid:2.16.156.10011.2.5.1"],
            "evidence_document_id": "consent-form-MT-1",
            "provision": {"type": "deny", "actors": [{"kind": "organization", "organization_id": s.b.org_id}]},  # type: ignore[attr-defined]
        },
    )
    assert directive.status_code == 201, directive.text
    _page, before = await scrape()
    denied = await s.b.call("GET", f"/api/v1/documents/{s.document_id}/content")
    assert denied.status_code == 403
    _page, after = await scrape()
    assert (
        value(after, "hie_consent_denials_total", basis="directive-deny")
        - value(before, "hie_consent_denials_total", basis="directive-deny")
        >= 1
    )
    assert (
        value(after, "hie_http_server_errors_total", status="403", reason="consent-denied")
        - value(before, "hie_http_server_errors_total", status="403", reason="consent-denied")
        == 1
    )

    declared = await s.b.call(
        "POST",
        "/api/v1/consent/break-glass",
        purpose="emergency",
        json={"patient_local_id": s.b.local_id, "reason": "患者昏迷送入急诊", "duration_seconds": 60},  # type: ignore[attr-defined]
    )
    assert declared.status_code == 201, declared.text
    opened = await s.b.call("GET", f"/api/v1/documents/{s.document_id}/content", purpose="emergency")
    assert opened.status_code == 200, opened.text
    _page, glass = await scrape()
    org = s.b.org_id  # type: ignore[attr-defined]
    assert value(glass, "hie_consent_break_glass_declarations_total", organization=org) == 1
    assert (
        value(glass, "hie_consent_break_glass_accesses_total") - value(after, "hie_consent_break_glass_accesses_total")
        >= 1
    )


async def test_a_dead_lettered_notification_shows(scene: Scene) -> None:
    s = scene
    receiver = Receiver()
    await receiver.start()
    receiver.statuses = [503] * 1000
    try:
        _page, before = await scrape()
        # Hospital B follows the patient; A's new document is notified to B's (failing) endpoint.
        subscribed = await s.b.call(
            "POST",
            "/api/v1/subscriptions",
            json={
                "topic": "patient-document",
                "patient_local_id": s.b.local_id,  # type: ignore[attr-defined]
                "endpoint_url": receiver.url,
                "expires": (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)).isoformat(),
            },
        )
        assert subscribed.status_code == 201, subscribed.text
        more = await s.a.call("POST", "/api/v1/documents", json=document(s.a.local_id, "检验报告".encode()))  # type: ignore[attr-defined]
        assert more.status_code == 201, more.text
        dead = value(before, "hie_notify_deliveries_total", outcome="dead-letter")
        assert await until("hie_notify_deliveries_total", lambda v: v > dead, outcome="dead-letter") > dead
        _page, after = await scrape()
        # Every attempt the endpoint refused is counted: retried, or finally dead-lettered.
        attempts = sum(
            value(after, "hie_notify_deliveries_total", outcome=o)
            - value(before, "hie_notify_deliveries_total", outcome=o)
            for o in ("retry", "dead-letter")
        )
        assert attempts == len(receiver.received) >= 1
        # The relay counts the dead letter once its transaction (which recorded the attempt) commits.
        dead_before = value(before, "hie_outbox_dead_letters_total", component="registry")
        assert (
            await until("hie_outbox_dead_letters_total", lambda v: v > dead_before, component="registry") > dead_before
        )
    finally:
        await receiver.stop()


async def test_outbox_backlog_shows_while_its_relay_is_stopped(scene: Scene) -> None:
    s = scene
    outbox = s.exchange.services["registry"].runtime.outbox
    await s.exchange.audit_settled()
    assert await until("hie_outbox_backlog", lambda v: v == 0, component="registry") == 0
    await outbox.stop()
    try:
        # Each read is audited through the registry's outbox: with the relay down they wait there.
        for _ in range(3):
            read = await s.a.call("GET", f"/api/v1/documents/{s.document_id}")
            assert read.status_code == 200
        assert await until("hie_outbox_backlog", lambda v: v >= 3, component="registry") >= 3
        assert await until("hie_outbox_oldest_age_seconds", lambda v: v > 0.3, component="registry") > 0.3
    finally:
        outbox.start()
    assert await until("hie_outbox_backlog", lambda v: v == 0, component="registry") == 0
    assert await until("hie_outbox_oldest_age_seconds", lambda v: v == 0, component="registry") == 0


async def test_token_refusals_are_counted_per_organisation(scene: Scene) -> None:
    s = scene
    org = s.a.org_id  # type: ignore[attr-defined]
    _page, before = await scrape()
    issued_before = value(before, "hie_oauth_tokens_total", organization=org, outcome="issued")
    # A registered client signing with a key it never registered.
    impostor = HospitalClient(base_url=s.exchange.base_url, client_id=s.a.client_id, key=generate_ec_key())
    refused = await impostor.request_token()
    assert refused.status_code == 401
    # A client id nobody registered: counted, under "unknown".
    stranger = HospitalClient(base_url=s.exchange.base_url, client_id="not-registered", key=generate_ec_key())
    assert (await stranger.request_token()).status_code == 401
    fresh = HospitalClient(base_url=s.exchange.base_url, client_id=s.a.client_id, key=s.a.key)
    assert (await fresh.request_token()).status_code == 200
    for client in (impostor, stranger, fresh):
        await client.aclose()
    _page, after = await scrape()

    def moved(**labels: str) -> float:
        return value(after, "hie_oauth_tokens_total", **labels) - value(before, "hie_oauth_tokens_total", **labels)

    assert moved(organization=org, outcome="refused", reason="invalid_client") == 1
    assert moved(organization="unknown", outcome="refused") == 1
    assert value(after, "hie_oauth_tokens_total", organization=org, outcome="issued") == issued_before + 1
    assert not any(dict(labels).get("organization") == "not-registered" for (_n, labels) in after)


async def test_the_metrics_page_carries_no_patient_data(scene: Scene) -> None:
    s = scene
    for purpose in ("treatment", "emergency"):
        await s.b.call("GET", "/api/v1/documents", params={"patient_local_id": s.b.local_id}, purpose=purpose)  # type: ignore[attr-defined]
    await s.a.call("GET", f"/api/v1/patients/{s.a.local_id}/cross-references")  # type: ignore[attr-defined]
    await s.exchange.audit_settled()
    page, samples = await scrape()
    assert value(samples, "hie_http_server_requests_total") > 0
    for secret in (PATIENT_NAME, s.national_id, s.enterprise_id, s.document_id, s.a.local_id, s.b.local_id):  # type: ignore[attr-defined]
        assert secret not in page


async def test_hie_status_shows_components_backlog_and_firing_alerts(
    scene: Scene, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`hie status` against a running exchange, as an operator runs it (in a thread: the
    exchange answers on this test's event loop)."""
    from typer.testing import CliRunner

    from services.ops import alerts
    from services.ops.cli import app

    s = scene
    runner = CliRunner()

    async def status(*args: str) -> tuple[int, str]:
        result = await asyncio.to_thread(
            runner.invoke, app, ["status", "--gateway-url", s.exchange.base_url, *args], catch_exceptions=False
        )
        return result.exit_code, result.output

    code, out = await status("--metrics", f"exchange={metrics_url()}")
    assert code == 0, out
    assert f"exchange ready: {s.exchange.base_url}" in out
    for component in ("gateway", "mpi", "registry", "consent", "referral", "teleconsult", "audit"):
        assert re.search(rf"^{component}\s+(ready|serving)\s", out, re.MULTILINE), out
    assert "HieOutboxBacklogOld" not in out

    # The registry's relay stops: its backlog grows and ages past the (lowered) threshold.
    monkeypatch.setattr(alerts, "OUTBOX_AGE_SECONDS", 1)
    outbox = s.exchange.services["registry"].runtime.outbox
    await s.exchange.audit_settled()
    await outbox.stop()
    try:
        for _ in range(3):
            assert (await s.a.call("GET", f"/api/v1/documents/{s.document_id}")).status_code == 200
        assert await until("hie_outbox_oldest_age_seconds", lambda v: v > 1.5, component="registry") > 1.5
        code, out = await status("--metrics", f"exchange={metrics_url()}")
    finally:
        outbox.start()
    assert code == 0, out
    registry_row = re.search(r"^registry\s+serving\s+\S+\s+(\d+)\s", out, re.MULTILINE)
    assert registry_row, out
    assert int(registry_row.group(1)) >= 3, out
    assert re.search(r"HieOutboxBacklogOld\s+\[page\] registry: oldest undelivered message", out), out
    # An endpoint that does not answer is an alert of its own.
    code, out = await status("--metrics", f"exchange={metrics_url()}", "--metrics", "mpi=http://127.0.0.1:9/metrics")
    assert "HieComponentDown" in out
    assert "mpi: metrics endpoint" in out
    # Not ready: the exit code `hie status --wait` scripts rely on.
    result = await asyncio.to_thread(runner.invoke, app, ["status", "--gateway-url", "http://127.0.0.1:9"])
    assert result.exit_code == 3


async def test_a_possible_match_grows_the_review_queue_gauge(scene: Scene) -> None:
    s = scene
    before = await until("hie_mpi_review_queue_size", lambda v: True)
    phone = f"139{secrets.randbelow(10**8):08d}"
    person_ = {"name": "钱监测", "gender": "female", "birth_date": "1981-03-04", "phones": [phone]}
    first = await s.a.call("POST", "/api/v1/patients", json={"local_id": f"RQ-{phone}-1", **person_})
    second = await s.a.call("POST", "/api/v1/patients", json={"local_id": f"RQ-{phone}-2", **person_})
    assert first.status_code == second.status_code == 201, second.text
    assert len(second.json()["review_task_ids"]) == 1
    assert await until("hie_mpi_review_queue_size", lambda v: v >= before + 1) >= before + 1
