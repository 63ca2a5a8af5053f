"""The HL7 v2 ingress (gateway/mllp) is a client of the mpi like the gateway: a message from a
legacy HIS leaves the same audit record as a REST registration, naming the sending facility; a
resent MSH-10 gets the mpi's first answer and registers nobody twice; the ingress process runs
with no mpi database at all. Driven with the `hl7` package's MLLP client over real sockets."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import hl7
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.client import HospitalClient
from tests.conftest import Exchange
from tests.support.factories import fresh_national_id
from tests.support.mllp import running_ingress, send


def adt(facility: str, control_id: str, local_id: str, *, event: str = "A04", name: str = "钱^多多") -> bytes:
    msh = (
        f"MSH|^~\\&|HIS|{facility}|HIE|HIE|20261201120000||ADT^{event}^ADT_{event}|{control_id}|P|2.5"
        "|||||CHN|UNICODE UTF-8"
    )
    pid = f"PID|1||{local_id}^^^{facility}^MR~{fresh_national_id()}^^^CHN^NNCHN||{name}||19850312|F"
    return "\r".join([msh, f"EVN|{event}|20261201120000", pid]).encode()


def msa(ack: bytes) -> list[str]:
    return str(hl7.parse(ack.decode()).segment("MSA")).split("|")[1:3]


async def _audit_events(auditor: HospitalClient, organization_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    token = ""
    while True:
        response = await auditor.call(
            "GET",
            "/api/v1/audit/events",
            params={"organization_id": organization_id, "page_size": 200, **({"page_token": token} if token else {})},
            purpose="audit",
        )
        assert response.status_code == 200, response.text
        events += response.json()["events"]
        token = response.json()["next_page_token"]
        if not token:
            return events


def _about(events: list[dict[str, Any]], facility: str, local_id: str) -> list[dict[str, Any]]:
    entity = {"type": "Patient", "id": f"{facility}|{local_id}"}
    return [e for e in events if entity in e["entities"]]


@pytest.fixture
async def members(exchange: Exchange) -> AsyncIterator[tuple[HospitalClient, HospitalClient]]:
    hospital = await exchange.member(name="县中医院")
    auditor = await exchange.member(type="authority", scopes="system/AuditEvent.rs", name="市卫健委")
    try:
        yield hospital, auditor
    finally:
        await hospital.aclose()
        await auditor.aclose()


async def test_a_feed_message_is_audited_like_a_rest_registration_naming_the_facility(
    exchange: Exchange, members: tuple[HospitalClient, HospitalClient], spans: InMemorySpanExporter
) -> None:
    hospital, auditor = members
    facility = hospital.org_id  # type: ignore[attr-defined]
    tag = secrets.token_hex(3)
    rest = await hospital.call(
        "POST",
        "/api/v1/patients",
        json={"local_id": f"REST-{tag}", "name": "孙丽", "gender": "female", "birth_date": "1979-05-06"},
    )
    assert rest.status_code == 201, rest.text
    async with running_ingress(exchange.settings) as port:
        ack = await send(port, adt(facility, f"AUD-{tag}", f"V2-{tag}"))
    assert msa(ack) == ["AA", f"AUD-{tag}"]
    await exchange.audit_settled()
    events = await _audit_events(auditor, facility)
    [via_rest] = _about(events, facility, f"REST-{tag}")
    [via_v2] = _about(events, facility, f"V2-{tag}")
    # The same record, by the same service, for the same organisation: only the channel differs.
    same = ("type", "action", "outcome", "organization_id", "source_service")
    assert {k: via_v2[k] for k in same} == {k: via_rest[k] for k in same}
    assert via_v2["organization_id"] == facility
    assert (via_v2["type"], via_v2["action"], via_v2["source_service"]) == ("patient.register", "create", "mpi")
    assert via_v2["client_id"] == f"hl7v2:{facility}"
    assert via_v2["practitioner_id"] == "hl7v2-feed"
    assert via_v2["purpose_of_use"] == "operations"
    assert via_v2["source_address"] == "127.0.0.1"
    assert via_v2["patient_enterprise_id"]
    # One trace from the ingress's message through the mpi to the audit record.
    [message_span] = [s for s in spans.get_finished_spans() if s.name == "HL7v2 ADT"]
    assert format(message_span.context.trace_id, "032x") == via_v2["trace_id"]
    assert message_span.attributes["hie.organization_id"] == facility
    assert message_span.attributes["hl7.ack_code"] == "AA"


async def test_a_resent_control_id_gets_the_same_ack_and_registers_once(
    exchange: Exchange, members: tuple[HospitalClient, HospitalClient]
) -> None:
    hospital, auditor = members
    facility = hospital.org_id  # type: ignore[attr-defined]
    tag = secrets.token_hex(3)
    message = adt(facility, f"DUP-{tag}", f"V2-{tag}")
    async with running_ingress(exchange.settings) as port:
        first = await send(port, message)
        # The HIS did not see the ACK (a dropped connection) and sends the message again.
        again = await send(port, message)
        # An update of the patient is a new message with its own control id: applied.
        update = await send(port, adt(facility, f"UPD-{tag}", f"V2-{tag}", event="A08"))
    first_segments = first.decode().split("\r")
    again_segments = again.decode().split("\r")
    assert msa(first) == msa(again) == ["AA", f"DUP-{tag}"]
    assert first_segments[1:] == again_segments[1:]
    assert msa(update) == ["AA", f"UPD-{tag}"]
    await exchange.audit_settled()
    events = _about(await _audit_events(auditor, facility), facility, f"V2-{tag}")
    assert sorted(e["type"] for e in events) == ["patient.register", "patient.update"]
    crossref = await hospital.call("GET", f"/api/v1/patients/V2-{tag}/cross-references")
    assert crossref.status_code == 200, crossref.text


@pytest.mark.parametrize("members_from", ["registry", "facility-option"])
async def test_the_ingress_process_never_opens_the_mpi_database(
    exchange: Exchange, members: tuple[HospitalClient, HospitalClient], tmp_path: Path, members_from: str
) -> None:
    """`python -m gateway.mllp` as `hie up` runs it, with a data directory of its own: the mpi's
    database is neither configured nor reachable from there, and no mpi module is even imported."""
    hospital, _ = members
    facility = hospital.org_id  # type: ignore[attr-defined]
    settings = exchange.settings
    data_dir = tmp_path / "ingress"
    data_dir.mkdir()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("HIE_") or key in ("HIE_TEST_DATABASE_URL",)
    }
    env.update(
        HIE_DATA_DIR=str(data_dir),
        HIE_MPI_TARGET=settings.targets["mpi"],
        HIE_GATEWAY_SIGNING_KEY_FILE=str(settings.gateway_signing_key_file),
        HIE_PUBLIC_URL=settings.public_url,
        HIE_MLLP_PORT="0",
    )
    arguments = []
    if members_from == "facility-option":
        arguments = [f"--facility={facility}"]
    elif settings.database_url:
        # PostgreSQL: the gateway's schema is all it reads (the URL is the cluster's).
        env.update(HIE_DATABASE_URL=settings.database_url, HIE_DB_SCHEMA_PREFIX=settings.schema_prefix)
    else:
        # SQLite: the URL names the gateway's database file, the only database it is given.
        env.update(HIE_DATABASE_URL=f"sqlite+aiosqlite:///{(settings.data_dir / 'gateway.db').resolve()}")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-X",
        "importtime",
        "-m",
        "gateway.mllp",
        *arguments,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
        found = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert found, line
        tag = secrets.token_hex(3)
        ack = await send(int(found.group(1)), adt(facility, f"PROC-{tag}", f"V2-{tag}"))
        assert msa(ack) == ["AA", f"PROC-{tag}"]
    finally:
        process.terminate()
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()[-2000:]
    crossref = await hospital.call("GET", f"/api/v1/patients/V2-{tag}/cross-references")
    assert crossref.status_code == 200, crossref.text
    imported = {m.group(1) for m in re.finditer(r"\|\s+([\w.]+)\s*$", stderr.decode(), re.MULTILINE)}
    assert "gateway.mllp.feed" in imported
    assert not {m for m in imported if m == "services.mpi" or m.startswith("services.mpi.")}
    assert not (data_dir / "mpi.db").exists()
    # Nothing opened or created in its own data directory either (an SQLite mpi.db would be).
    assert not list(data_dir.iterdir())
    # The gateway's registry, which the ingress read beside the running gateway, is intact: a
    # member registered now gets a token and registers a patient.
    newcomer = await exchange.member(name="新成员医院")
    try:
        registered = await newcomer.call(
            "POST", "/api/v1/patients", json={"local_id": f"N-{tag}", "name": "吴刚", "birth_date": "1970-01-02"}
        )
        assert registered.status_code == 201, registered.text
    finally:
        await newcomer.aclose()
