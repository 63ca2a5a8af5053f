"""Two registry replicas sharing one database, as k8s runs them: a consent change and a link change
are seen by the very next query on *each* replica, because the mpi and consent tell every replica
they are configured with (HIE_REGISTRY_REPLICAS) and wait for each acknowledgement; a replica that
cannot be told is counted and logged by status code, and the write still succeeds."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway.client import HospitalClient, Practitioner
from hie.common.v1 import common_pb2
from hie.registry.v1 import registry_pb2, registry_pb2_grpc
from services.registry.decision_cache import ConsentDecisionCache
from services.registry.service import SPEC as REGISTRY
from services.registry.xref_cache import CrossReferenceCache
from services.shared.config import ComponentSettings, UnsafeSettingsError
from services.shared.invalidation import Replicas
from services.shared.process import RunningService, start_service
from tests.conftest import Exchange
from tests.support.factories import document, grpc_metadata, person
from tests.support.metrics import scrape, value
from tests.support.pki import make_pki

SCOPES = "system/Patient.crus system/DocumentReference.crs system/Consent.cruds"
STEWARD = Practitioner(id="DS-41", name="欧管理", role="data-steward", department="病案室")
REGISTRY_SERVICE = "hie.registry.v1.DocumentRegistry"
UNACKNOWLEDGED = "hie_invalidation_unacknowledged_total"


def _caches(registry: RunningService) -> tuple[CrossReferenceCache, ConsentDecisionCache]:
    servicer = registry.servicers[REGISTRY_SERVICE]
    return servicer._xrefs, servicer._decisions


def _told(exchange: Exchange, replicas: str) -> None:
    """Have the exchange's mpi and consent tell the registry replicas at `replicas`."""
    for name in ("mpi", "consent"):
        runtime = exchange.services[name].runtime
        runtime.options = ComponentSettings(name, {**runtime.options.given, "HIE_REGISTRY_REPLICAS": replicas})


@dataclass
class Replicated:
    exchange: Exchange
    # The exchange's own registry (behind the gateway) and a second one on the same database.
    first: RunningService
    second: RunningService

    @property
    def addresses(self) -> str:
        return f"127.0.0.1:{self.first.port},127.0.0.1:{self.second.port}"


@pytest.fixture
async def replicated(exchange: Exchange) -> AsyncIterator[Replicated]:
    first = exchange.services["registry"]
    second = await start_service(REGISTRY, first.runtime.settings, listen="127.0.0.1:0")
    saved = {name: exchange.services[name].runtime.options for name in ("mpi", "consent")}
    scene = Replicated(exchange, first, second)
    _told(exchange, scene.addresses)
    try:
        yield scene
    finally:
        for name, options in saved.items():
            exchange.services[name].runtime.options = options
        # The replicas share one outbox table: stopped mid-send, the second would leave the
        # messages it claimed leased (30 s) and the next test's audit_settled() waiting for them.
        await exchange.audit_settled()
        await second.stop(grace=None)


@dataclass
class Reader:
    """Hospital B reading a patient's documents from one replica, as the gateway would."""

    client: HospitalClient
    local_id: str
    replica: RunningService

    async def finds(self, purpose: str = "treatment") -> set[str]:
        token = await self.client.access_token()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.replica.port}") as channel:
            found = await registry_pb2_grpc.DocumentRegistryStub(channel).FindDocuments(
                registry_pb2.FindDocumentsRequest(patient=common_pb2.PatientRef(local_id=self.local_id)),
                metadata=grpc_metadata(self.client, token, purpose),
            )
        return {e.document_id for e in found.entries}


async def _shared_patient(exchange: Exchange, tag: str) -> tuple[HospitalClient, HospitalClient, str, str]:
    """Hospitals A and B, one patient known to both, and a discharge summary at A."""
    a = await exchange.member(scopes=SCOPES, name="市第九人民医院")
    b = await exchange.member(scopes=SCOPES, name="城北社区卫生服务中心")
    same = person("欧阳副本")
    at_a = await a.call("POST", "/api/v1/patients", json={"local_id": f"RA-{tag}", **same})
    at_b = await b.call("POST", "/api/v1/patients", json={"local_id": f"RB-{tag}", **same})
    assert at_a.status_code == at_b.status_code == 201, at_b.text
    assert at_a.json()["enterprise_id"] == at_b.json()["enterprise_id"]
    note = await a.call("POST", "/api/v1/documents", json=document(f"RA-{tag}", "出院小结：肺炎".encode()))
    assert note.status_code == 201, note.text
    return a, b, at_a.json()["enterprise_id"], note.json()["document_id"]


async def _deny(a: HospitalClient, b: HospitalClient, tag: str) -> httpx.Response:
    """Hospital A records the patient's directive refusing hospital B."""
    return await a.call(
        "POST",
        "/api/v1/consent/directives",
        json={
            "patient_local_id": f"RA-{tag}",
            "policy_ids": ["urn:oid:2.16.156.10011.2.5.1"],
            "evidence_document_id": f"consent-form-{tag}",
            "provision": {"type": "deny", "actors": [{"kind": "organization", "organization_id": b.org_id}]},  # type: ignore[attr-defined]
        },
    )


async def test_a_consent_change_is_seen_by_the_very_next_query_on_every_replica(replicated: Replicated) -> None:
    r = replicated
    tag = secrets.token_hex(3)
    a, b, enterprise_id, note_id = await _shared_patient(r.exchange, tag)
    readers = [Reader(b, f"RB-{tag}", replica) for replica in (r.first, r.second)]
    for reader in readers:  # asked twice on each replica: the second answer is the kept one
        assert await reader.finds() == {note_id}
        assert await reader.finds() == {note_id}
        assert _caches(reader.replica)[1].kept_for(enterprise_id) > 0
    denied = await _deny(a, b, tag)
    assert denied.status_code == 201, denied.text
    # Both replicas dropped what they kept before the directive's answer was returned.
    for reader in readers:
        assert _caches(reader.replica)[1].kept_for(enterprise_id) == 0
        assert await reader.finds() == set()
    for client in (a, b):
        await client.aclose()


async def test_a_link_change_is_seen_by_the_very_next_query_on_every_replica(replicated: Replicated) -> None:
    r = replicated
    tag = secrets.token_hex(3)
    a, b, _enterprise_id, note_id = await _shared_patient(r.exchange, tag)
    ops = await r.exchange.member(type="platform-admin", scopes="system/Patient.rus", name="平台运营")
    readers = [Reader(b, f"RB-{tag}", replica) for replica in (r.first, r.second)]
    for reader in readers:
        assert await reader.finds() == {note_id}
        assert (b.org_id, f"RB-{tag}") in _caches(reader.replica)[0]  # type: ignore[attr-defined]
    before = [_caches(replica)[0].generation for replica in (r.first, r.second)]
    unlinked = await ops.call(
        "POST",
        f"/api/v1/patients/RB-{tag}/unlink",
        params={"domain": b.org_id},  # type: ignore[attr-defined]
        as_user=STEWARD,
    )
    assert unlinked.status_code == 200, unlinked.text
    # Each replica's own generation moved on, so an answer it asked the mpi for before the
    # unlink cannot be kept after it.
    assert all(_caches(replica)[0].generation > was for replica, was in zip((r.first, r.second), before, strict=True))
    for reader in readers:
        assert await reader.finds() == set()
    for client in (a, b, ops):
        await client.aclose()


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A loopback port nothing listens on (bound, never listened: connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


async def test_a_replica_that_cannot_be_told_is_counted_and_logged_and_the_write_succeeds(
    replicated: Replicated, refusing_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    r = replicated
    tag = secrets.token_hex(3)
    a, b, enterprise_id, note_id = await _shared_patient(r.exchange, tag)
    _told(r.exchange, f"{r.addresses},127.0.0.1:{refusing_port}")
    reader = Reader(b, f"RB-{tag}", r.second)
    assert await reader.finds() == {note_id}
    _page, samples = await scrape(UNACKNOWLEDGED)
    was = value(samples, UNACKNOWLEDGED, component="consent", peer="registry", code="UNAVAILABLE")
    with caplog.at_level(logging.WARNING, logger="services.shared.invalidation"):
        denied = await _deny(a, b, tag)
    assert denied.status_code == 201, denied.text
    assert await reader.finds() == set()  # the replicas that could be told were
    _page, samples = await scrape(UNACKNOWLEDGED)
    assert value(samples, UNACKNOWLEDGED, component="consent", peer="registry", code="UNAVAILABLE") == was + 1
    lines = [rec.getMessage() for rec in caplog.records if "not acknowledged" in rec.getMessage()]
    assert lines == ["registry consent decision invalidation not acknowledged by 1 of 3 replicas: UNAVAILABLE"]
    assert enterprise_id not in caplog.text
    for client in (a, b):
        await client.aclose()


async def test_a_name_is_resolved_to_each_of_its_addresses_on_every_invalidation() -> None:
    replicas = Replicas("registry", "localhost:7102, 127.0.0.2:7102", fallback="registry:7102", component="mpi")
    resolved = await replicas.resolve()
    assert "127.0.0.1:7102" in resolved
    assert "127.0.0.2:7102" in resolved
    assert len(resolved) == len(set(resolved))
    # A name that does not resolve leaves the service's own target, so one replica is still told.
    unresolved = Replicas("registry", "no-such-host.invalid:7102", fallback="registry:7102", component="mpi")
    assert await unresolved.resolve() == ["registry:7102"]
    with pytest.raises(UnsafeSettingsError, match="HIE_REGISTRY_REPLICAS must be host:port"):
        Replicas("registry", "registry", fallback="registry:7102", component="mpi")


def test_a_malformed_replica_list_refuses_the_start_in_one_line(tmp_path: Path, keys_dir: Path) -> None:
    env = {
        **os.environ,
        "HIE_DATA_DIR": str(tmp_path),
        "HIE_TRUSTED_JWKS_FILE": str(keys_dir / "trusted.jwks.json"),
        "HIE_SERVICE_SIGNING_KEY_FILE": str(keys_dir / "platform.pem"),
        "HIE_LISTEN": "127.0.0.1:0",
        "HIE_REGISTRY_REPLICAS": "registry-replicas",  # no port
    }
    env.pop("HIE_DATABASE_URL", None)
    started = subprocess.run(
        [sys.executable, "-m", "services.consent"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert started.returncode == 2
    assert started.stderr.strip().splitlines()[-1] == (
        "consent: HIE_REGISTRY_REPLICAS must be host:port addresses separated by commas"
    )
    assert "Traceback" not in started.stderr


async def test_under_tls_a_replica_dialled_by_ip_is_checked_against_the_registrys_name(tmp_path: Path) -> None:
    # The certificate names the service ("registry"), as k8s/README.md asks: not the pod's IP.
    tls = make_pki(tmp_path, names=("registry",), ips=())
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials())
    await server.start()
    replicas = Replicas("registry", f"127.0.0.1:{port}", fallback="registry:7102", component="mpi", tls=tls)
    try:

        def check(channel: grpc.aio.Channel, deadline: float) -> Awaitable[object]:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=deadline)

        assert await replicas.tell_each(check, what="health")
        # Dialled by IP without the registry's name, the same certificate is refused.
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", tls.channel_credentials()) as by_ip:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health_pb2_grpc.HealthStub(by_ip).Check(health_pb2.HealthCheckRequest(), timeout=3)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await replicas.close()
        await server.stop(None)
