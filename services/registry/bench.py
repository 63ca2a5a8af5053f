"""`hie bench registry`: query-by-patient latency with consent filtering, register throughput
(20 KB documents) and streamed retrieve throughput (1 MB documents), at the registry service.

A fresh database (a throw-away PostgreSQL schema prefix, or SQLite files in a temporary
directory) gets the real migrations and is filled with `documents` entries spread over
`patients` patients (10 per patient by default), by COPY on PostgreSQL (executemany on
SQLite), bypassing the service: registering a million documents over gRPC would take hours.
The audit, mpi, consent and registry services are then started as their own processes
(`python -m services.<name>`) on loopback ports, as deployed. The patients whose documents are
queried (`--sample`) are registered in mpi through its API, as a hospital would; their entries
sit among everyone else's in the same table and index. Each filled entry has a small CDA body
stored as a registration stores it: sealed under the entry's own data key, that key wrapped by
the key-encryption key (envelope encryption, services/shared/protection), real hash and size. The
register and retrieve runs go through the service end to end (mpi cross-reference, consent,
envelope-encrypted chunked content with hash checks, audit events through the outbox).

Timings are at the gRPC client (this process), calling the registry process; on a small machine
the client, four services and the database share its cores.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import os
import platform
import random
import secrets
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import jwt
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from hie.common.v1 import common_pb2
from hie.mpi.v1 import mpi_pb2, mpi_pb2_grpc
from hie.registry.v1 import registry_pb2, registry_pb2_grpc
from services.registry import store
from services.registry.service import SPEC as REGISTRY
from services.shared import gb11643, migrations
from services.shared.config import SERVICE_PORTS, TOKEN_AUDIENCE, Settings
from services.shared.db import engine_for
from services.shared.keys import algorithm_for, ensure_exchange_keys, generate_ec_key, load_private_key, public_jwk
from services.shared.protection import DataProtection
from services.shared.user_assertion import MAX_LIFETIME_SECONDS

UTC = datetime.UTC
QUERY_P99_TARGET_MS = 15.0
REGISTER_TARGET_PER_SECOND = 500.0
_FILL_BATCH = 20_000
_ORGS = 20
_TYPES = (
    ("http://loinc.org", "18842-5", "出院小结", "discharge-summary", "summary"),
    ("http://loinc.org", "11502-2", "检验报告", "lab-report", "report"),
    ("http://loinc.org", "18748-4", "检查报告", "examination-report", "report"),
    ("http://loinc.org", "34108-1", "门（急）诊病历", "outpatient-record", "clinical-note"),
    ("http://loinc.org", "11524-6", "心电图报告", "ecg-report", "report"),
)


def _bench_settings(work_dir: Path, database_url: str) -> Settings:
    keys = work_dir / "keys"
    ensure_exchange_keys(keys)
    env = {
        "HIE_DATA_DIR": str(work_dir),
        "HIE_TRUSTED_JWKS_FILE": str(keys / "trusted.jwks.json"),
        "HIE_GATEWAY_SIGNING_KEY_FILE": str(keys / "gateway.pem"),
        "HIE_SERVICE_SIGNING_KEY_FILE": str(keys / "platform.pem"),
        "HIE_LOG_LEVEL": "WARNING",
    }
    if database_url:
        env["HIE_DATABASE_URL"] = database_url
        env["HIE_DB_SCHEMA_PREFIX"] = f"bench_registry_{secrets.token_hex(3)}_"
    return Settings.from_env(env)


@dataclasses.dataclass
class _Hospital:
    """A member hospital as the gateway would forward it: a gateway-signed token and the
    hospital's signed user assertion (an assertion lives at most MAX_LIFETIME_SECONDS: both are
    signed again when the last pair is a minute from expiring)."""

    org: str
    gateway_key_file: Path
    key: Any = dataclasses.field(default_factory=generate_ec_key)
    _signed: tuple[float, tuple[tuple[str, str], ...]] | None = None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        if self._signed is None or time.time() - self._signed[0] > MAX_LIFETIME_SECONDS - 60:
            self._signed = (time.time(), self._sign())
        return self._signed[1]

    def _sign(self) -> tuple[tuple[str, str], ...]:
        now = int(time.time())
        client_id = f"client-{self.org}"
        gateway_key = load_private_key(self.gateway_key_file)
        token = jwt.encode(
            {
                "iss": "gateway",
                "sub": client_id,
                "client_id": client_id,
                "aud": TOKEN_AUDIENCE,
                "iat": now,
                "exp": now + 3600,
                "org": self.org,
                "org_type": "hospital",
                "scope": "system/Patient.crs system/DocumentReference.crs",
                "client_jkt": [public_jwk(self.key)["kid"]],
            },
            gateway_key,
            algorithm=algorithm_for(gateway_key),
            headers={"kid": public_jwk(gateway_key)["kid"]},
        )
        jwk = public_jwk(self.key)
        assertion = jwt.encode(
            {
                "iss": client_id,
                "sub": "D0001",
                "aud": TOKEN_AUDIENCE,
                "iat": now,
                "exp": now + MAX_LIFETIME_SECONDS,
                "jti": str(uuid.uuid4()),
                "name": "基准测试医生",
                "role": "doctor",
                "department": "内科",
                "purpose_of_use": "treatment",
            },
            self.key,
            algorithm=algorithm_for(self.key),
            headers={"kid": jwk["kid"], "jwk": {k: jwk[k] for k in ("kty", "crv", "x", "y") if k in jwk}},
        )
        return (("authorization", f"Bearer {token}"), ("x-hie-user-assertion", assertion))


def _national_id(rng: random.Random) -> str:
    born = datetime.date(1940, 1, 1) + datetime.timedelta(days=rng.randrange(365 * 70))
    body = f"{rng.choice(('110105', '310104', '440106', '510107'))}{born:%Y%m%d}{rng.randrange(1000):03d}"
    return body + gb11643.check_digit(body)


def _filled_content(n: int) -> bytes:
    """The small CDA body of filled entry n (distinct per entry, so each has its own hash)."""
    return (
        '<ClinicalDocument xmlns="urn:hl7-org:v3"><title>出院小结</title>'
        f'<id extension="D{n}"/><text>病情稳定，好转出院。第{n}号。</text></ClinicalDocument>'
    ).encode()


def _entry_rows(
    patients: int, documents: int, rng: random.Random, start: int, count: int, protection: DataProtection | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Entries start..start+count (patient i of org i % _ORGS, spread evenly over patients) and
    their content: one chunk each, sealed under the entry's own data key exactly as a
    registration seals it (the key wrapped by the key-encryption key)."""
    now = datetime.datetime.now(UTC)
    rows = []
    chunks = []
    for n in range(start, start + count):
        patient = n % patients
        system, code, display, shared, klass = _TYPES[n % len(_TYPES)]
        when = now - datetime.timedelta(minutes=rng.randrange(5 * 365 * 24 * 60))
        source = f"org-{rng.randrange(_ORGS):02d}"
        labels = "PSY" if n % 17 == 0 else ""
        document_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        content = _filled_content(n)
        key = protection.new_content_key(document_id) if protection else None
        chunks.append(
            {
                "document_id": document_id,
                "seq": 0,
                "data": key.seal_chunk(0, content, final=True) if key else content,
            }
        )
        rows.append(
            {
                "id": document_id,
                "source_document_id": f"D{n}",
                "source_organization_id": source,
                "patient_domain": f"org-{patient % _ORGS:02d}",
                "patient_local_id": f"P{patient}",
                "enterprise_id": "",
                "author_id": "D0001",
                "author_name": "王医生",
                "author_role": "doctor",
                "author_department": "内科",
                "class_system": "urn:hie:document-class",
                "class_code": klass,
                "class_display": "",
                "type_system": system,
                "type_code": code,
                "type_display": display,
                "confidentiality": "N",
                "security_labels": labels,
                "title": display,
                "language": "zh-CN",
                "mime_type": "application/hl7-cda+xml",
                "size": len(content),
                "sha256": hashlib.sha256(content).hexdigest(),
                "status": 1,
                "created": when,
                "service_start": when,
                "service_end": None,
                "registered_at": when,
                "idempotency_key": "",
                "service_time": when,
                "shared_type": shared,
                "relation_type": 0,
                "related_document_id": "",
                "content_kind": 1,
                "study_instance_uid": "",
                "wado_rs_url": "",
                "format_system": "",
                "format_code": "",
                "format_display": "",
                "facility_type_system": "",
                "facility_type_code": "",
                "facility_type_display": "",
                "practice_setting_system": "",
                "practice_setting_code": "",
                "practice_setting_display": "",
                "content_key": key.wrapped if key else None,
            }
        )
    return rows, chunks


async def fill(
    engine: AsyncEngine,
    *,
    schema: str,
    patients: int,
    documents: int,
    progress: Callable[[int], None],
    protection: DataProtection | None = None,
) -> dict[str, Any]:
    """COPY (PostgreSQL) or executemany (SQLite) `documents` entries and their envelope-encrypted
    content, one transaction per batch."""
    tables = [(store.DocumentEntryRecord.__table__, 0), (store.DocumentChunk.__table__, 1)]
    copy = engine.dialect.name == "postgresql"
    rng = random.Random(4)
    started = time.perf_counter()
    for start in range(0, documents, _FILL_BATCH):
        batch = _entry_rows(patients, documents, rng, start, min(_FILL_BATCH, documents - start), protection)
        async with engine.begin() as conn:
            for table, which in tables:
                rows = batch[which]
                if copy:
                    columns = [c.name for c in table.columns]
                    driver = (await conn.get_raw_connection()).driver_connection
                    await driver.copy_records_to_table(
                        table.name,
                        schema_name=schema,
                        columns=columns,
                        records=[tuple(row[c] for c in columns) for row in rows],
                    )
                else:
                    await conn.execute(insert(table), rows)
        progress(start + len(batch[0]))
    if copy:
        async with engine.begin() as conn:
            await conn.execute(text("ANALYZE document_entry"))
            await conn.execute(text("ANALYZE document_chunk"))
    seconds = time.perf_counter() - started
    return {"entries": documents, "seconds": round(seconds, 1), "entries_per_second": round(documents / seconds)}


def _summary(latencies: list[float]) -> dict[str, Any]:
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000, 2)

    return {
        "n": len(ordered),
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "max_ms": round(ordered[-1] * 1000, 2),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 2),
    }


async def _register_sample(channel: grpc.aio.Channel, hospitals: list[_Hospital], sample: list[int]) -> None:
    """The queried patients, registered in mpi through its API in their hospitals' domains."""
    stub = mpi_pb2_grpc.PatientIndexStub(channel)
    rng = random.Random(7)
    names = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗"
    semaphore = asyncio.Semaphore(8)

    async def one(patient: int) -> None:
        hospital = hospitals[patient % _ORGS]
        nid = _national_id(rng)
        request = mpi_pb2.RegisterPatientRequest(
            patient=mpi_pb2.Patient(
                ref=common_pb2.PatientRef(local_id=f"P{patient}"),
                identifiers=[common_pb2.Identifier(type="NNCHN", value=nid)],
                name=mpi_pb2.HumanName(text=rng.choice(names) + "某某"),
                gender=mpi_pb2.GENDER_MALE if gb11643.gender(nid) == "male" else mpi_pb2.GENDER_FEMALE,
                birth_date=gb11643.birth_date(nid).isoformat(),
            )
        )
        async with semaphore:
            for attempt in range(6):
                try:
                    await stub.RegisterPatient(request, metadata=hospital.metadata())
                    return
                except grpc.aio.AioRpcError as exc:
                    # UNAVAILABLE (database busy, on a shared machine): the same registration again.
                    if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == 5:
                        raise
                await asyncio.sleep(0.5 * 2**attempt)

    await asyncio.gather(*(one(p) for p in sample))


async def _query(
    stub: registry_pb2_grpc.DocumentRegistryStub, hospitals: list[_Hospital], sample: list[int], queries: int
) -> tuple[dict[str, Any], float]:
    members = {h.org: h for h in hospitals}
    rng = random.Random(11)
    latencies = []
    returned = 0
    for _ in range(queries):
        patient = rng.choice(sample)
        org = f"org-{patient % _ORGS:02d}"
        started = time.perf_counter()
        response = await stub.FindDocuments(
            registry_pb2.FindDocumentsRequest(
                patient=common_pb2.PatientRef(local_id=f"P{patient}"), page=common_pb2.PageRequest(page_size=50)
            ),
            metadata=members[org].metadata(),
        )
        latencies.append(time.perf_counter() - started)
        returned += len(response.entries)
    return _summary(latencies), returned / queries


async def _register_run(
    stub: registry_pb2_grpc.DocumentRegistryStub,
    hospitals: list[_Hospital],
    sample: list[int],
    *,
    count: int,
    size: int,
    concurrency: int,
) -> tuple[dict[str, Any], list[str]]:
    members = {h.org: h for h in hospitals}
    body = ("<ClinicalDocument>" + "出院小结：病情稳定，好转出院。" * (size // 40))[: size // 3].encode()
    body = (body + b" " * size)[:size]
    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    ids: list[str] = []

    async def one(n: int) -> None:
        patient = sample[n % len(sample)]
        org = f"org-{patient % _ORGS:02d}"
        content = body[:-12] + f"{n:012d}".encode()
        async with semaphore:
            started = time.perf_counter()
            response = await stub.RegisterDocument(
                registry_pb2.RegisterDocumentRequest(
                    entry=registry_pb2.DocumentEntry(
                        source_document_id=f"B{size}-{n}-{secrets.token_hex(3)}",
                        patient=common_pb2.PatientRef(local_id=f"P{patient}"),
                        type_code=registry_pb2.Coding(system="http://loinc.org", code="18842-5"),
                        title="出院小结",
                        mime_type="application/hl7-cda+xml",
                        sha256=hashlib.sha256(content).hexdigest(),
                        size=len(content),
                    ),
                    content=content,
                ),
                metadata=members[org].metadata(),
            )
            latencies.append(time.perf_counter() - started)
            ids.append(response.entry.document_id)

    started = time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(count)))
    seconds = time.perf_counter() - started
    return (
        {
            **_summary(latencies),
            "documents": count,
            "document_bytes": size,
            "concurrency": concurrency,
            "seconds": round(seconds, 2),
            "documents_per_second": round(count / seconds, 1),
        },
        ids,
    )


async def _register_sets_run(
    stub: registry_pb2_grpc.DocumentRegistryStub,
    hospitals: list[_Hospital],
    sample: list[int],
    *,
    count: int,
    size: int,
    set_size: int,
    concurrency: int,
) -> dict[str, Any]:
    """`count` documents of `size` bytes in submission sets of `set_size`, each set one patient's."""
    members = {h.org: h for h in hospitals}
    body = ("<ClinicalDocument>" + "检验报告：血常规，白细胞正常。" * (size // 40))[: size // 3].encode()
    body = (body + b" " * size)[:size]
    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    sets = -(-count // set_size)

    async def one(k: int) -> None:
        patient = sample[k % len(sample)]
        org = f"org-{patient % _ORGS:02d}"
        documents = []
        for n in range(k * set_size, min(count, (k + 1) * set_size)):
            content = body[:-12] + f"{n:012d}".encode()
            documents.append(
                registry_pb2.RegisterDocumentRequest(
                    entry=registry_pb2.DocumentEntry(
                        source_document_id=f"S{size}-{n}-{secrets.token_hex(3)}",
                        patient=common_pb2.PatientRef(local_id=f"P{patient}"),
                        type_code=registry_pb2.Coding(system="http://loinc.org", code="11502-2"),
                        title="检验报告",
                        mime_type="application/hl7-cda+xml",
                        sha256=hashlib.sha256(content).hexdigest(),
                        size=len(content),
                    ),
                    content=content,
                )
            )
        async with semaphore:
            started = time.perf_counter()
            await stub.RegisterSubmissionSet(
                registry_pb2.RegisterSubmissionSetRequest(documents=documents), metadata=members[org].metadata()
            )
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(sets)))
    seconds = time.perf_counter() - started
    return {
        **{f"set_{k}": v for k, v in _summary(latencies).items()},
        "documents": count,
        "document_bytes": size,
        "documents_per_set": set_size,
        "concurrency": concurrency,
        "seconds": round(seconds, 2),
        "documents_per_second": round(count / seconds, 1),
    }


async def _retrieve_run(
    stub: registry_pb2_grpc.DocumentRegistryStub, hospital: _Hospital, ids: list[str], *, rounds: int, concurrency: int
) -> dict[str, Any]:
    semaphore = asyncio.Semaphore(concurrency)
    received = 0

    async def one(document_id: str) -> None:
        nonlocal received
        async with semaphore:
            call = stub.RetrieveDocumentStream(
                registry_pb2.RetrieveDocumentStreamRequest(document_id=document_id), metadata=hospital.metadata()
            )
            async for message in call:
                received += len(message.chunk)

    started = time.perf_counter()
    await asyncio.gather(*(one(d) for _ in range(rounds) for d in ids))
    seconds = time.perf_counter() - started
    return {
        "retrievals": rounds * len(ids),
        "bytes": received,
        "seconds": round(seconds, 2),
        "mb_per_second": round(received / seconds / 1e6, 1),
        "concurrency": concurrency,
    }


async def run_registry_bench(
    *,
    patients: int,
    documents: int,
    database_url: str = "",
    sample: int = 500,
    queries: int = 2000,
    registrations: int = 2000,
    retrievals: int = 40,
    set_size: int = 50,
    log: Callable[[str], None] | None = None,
    cpu_probe: CpuProbe | None = None,
) -> dict[str, Any]:
    say = log or (lambda _message: None)
    work_dir = Path(tempfile.mkdtemp(prefix="hie-bench-registry-"))
    settings = _bench_settings(work_dir, database_url)
    backend = "postgresql" if settings.database_url else "sqlite"
    processes: list[asyncio.subprocess.Process] = []
    engine = engine_for(settings, REGISTRY.name)
    rng = random.Random(3)
    sampled = sorted(rng.sample(range(patients), min(sample, patients)))
    hospitals = [_Hospital(f"org-{i:02d}", settings.gateway_signing_key_file) for i in range(_ORGS)]
    try:
        await migrations.upgrade(
            engine, schema=settings.schema_for(REGISTRY.name), versions=REGISTRY.versions, metadata=REGISTRY.metadata
        )
        say(f"filling {documents} entries for {patients} patients into {backend}")
        step = max(documents // 10, _FILL_BATCH)
        filled = await fill(
            engine,
            schema=settings.schema_for(REGISTRY.name),
            patients=patients,
            documents=documents,
            protection=DataProtection.from_settings(settings),
            progress=lambda done: say(f"  {done} entries") if done % step < _FILL_BATCH else None,
        )
        say(f"filled in {filled['seconds']} s; starting audit, mpi, consent and registry (one process each)")
        settings = await _spawn(settings, processes)
        async with (
            grpc.aio.insecure_channel(settings.targets["mpi"]) as mpi_channel,
            grpc.aio.insecure_channel(
                settings.targets["registry"],
                options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
            ) as channel,
        ):
            say(f"registering the {len(sampled)} queried patients in mpi")
            await _register_sample(mpi_channel, hospitals, sampled)
            stub = registry_pb2_grpc.DocumentRegistryStub(channel)
            await _query(stub, hospitals, sampled, 50)  # warm-up
            say(f"{queries} queries by patient")
            pids = {name: process.pid for name, process in zip(_SERVICES, processes, strict=True)}
            finish = await cpu_probe(pids, settings.database_url or "") if cpu_probe else None
            query, per_query = await _query(stub, hospitals, sampled, queries)
            if finish is not None:
                query["cpu_ms_per_query"] = await finish(queries)
            query["load_average"] = [round(x, 2) for x in os.getloadavg()]
            say(f"query p50 {query['p50_ms']} ms, p99 {query['p99_ms']} ms; registering {registrations} x 20 KB")
            register, _ids = await _register_run(
                stub, hospitals, sampled, count=registrations, size=20 * 1024, concurrency=32
            )
            say(f"{register['documents_per_second']} documents/s one by one; in submission sets of {set_size}")
            register_sets = await _register_sets_run(
                stub, hospitals, sampled, count=registrations, size=20 * 1024, set_size=set_size, concurrency=4
            )
            say(f"{register_sets['documents_per_second']} documents/s; registering {retrievals} x 1 MB to retrieve")
            reader = sampled[:1]
            _, big = await _register_run(stub, hospitals, reader, count=retrievals, size=1024 * 1024, concurrency=4)
            retrieve = await _retrieve_run(stub, hospitals[reader[0] % _ORGS], big, rounds=5, concurrency=4)
            say(f"retrieve {retrieve['mb_per_second']} MB/s")
    finally:
        for process in reversed(processes):  # the audit service last: the others relay to it
            if process.returncode is None:
                process.terminate()
                await process.wait()
        await engine.dispose()
        if settings.database_url:
            await _drop_schemas(settings)
        shutil.rmtree(work_dir, ignore_errors=True)
    return {
        "benchmark": "registry: query by patient with consent, register 20 KB, retrieve 1 MB (one process per service)",
        "backend": backend,
        "patients": patients,
        "documents": documents,
        "queried_patients": len(sampled),
        "fill": filled,
        "query_by_patient": {**query, "entries_per_query": round(per_query, 1), "target_p99_ms": QUERY_P99_TARGET_MS},
        "register_20kb": {**register, "target_per_second": REGISTER_TARGET_PER_SECOND},
        "register_20kb_in_submission_sets": {**register_sets, "target_per_second": REGISTER_TARGET_PER_SECOND},
        "retrieve_1mb": retrieve,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "run_at": datetime.datetime.now(UTC).isoformat(timespec="seconds"),
    }


_SERVICES = ("audit", "mpi", "consent", "registry")
# Starts CPU accounting of the services (by name: pid) and their database backends; returns what
# gives CPU ms per operation per process group for n operations since then. The operator tooling
# supplies it (services/ops/cli_registry.py: /proc, as `hie bench load` measures).
CpuProbe = Callable[[dict[str, int], str], Awaitable[Callable[[int], Awaitable[dict[str, float]]]]]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _spawn(settings: Settings, processes: list[asyncio.subprocess.Process]) -> Settings:
    """The four services as their own processes (as deployed), on free loopback ports; returns the
    settings naming them once each answers SERVING."""
    ports = {name: _free_port() for name in ("audit", "mpi", "consent", "registry")}
    targets = {**settings.targets, **{name: f"127.0.0.1:{port}" for name, port in ports.items()}}
    env = {
        **os.environ,
        "HIE_DATA_DIR": str(settings.data_dir),
        "HIE_TRUSTED_JWKS_FILE": str(settings.trusted_jwks_file),
        "HIE_GATEWAY_SIGNING_KEY_FILE": str(settings.gateway_signing_key_file),
        "HIE_SERVICE_SIGNING_KEY_FILE": str(settings.service_signing_key_file),
        "HIE_DB_SCHEMA_PREFIX": settings.schema_prefix,
        "HIE_LOG_LEVEL": "WARNING",
        **{f"HIE_{name.upper()}_TARGET": target for name, target in targets.items()},
    }
    if settings.database_url:
        env["HIE_DATABASE_URL"] = settings.database_url
    for name, port in ports.items():
        processes.append(
            await asyncio.create_subprocess_exec(
                sys.executable, "-m", f"services.{name}", env={**env, "HIE_LISTEN": f"127.0.0.1:{port}"}
            )
        )
    for name, target in ((n, targets[n]) for n in ports):
        async with grpc.aio.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(600):
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    pass
                if any(p.returncode is not None for p in processes):
                    raise RuntimeError(f"a service exited while starting ({name})")
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError(f"{name} did not start")
    return dataclasses.replace(settings, targets=targets)


async def _drop_schemas(settings: Settings) -> None:
    engine = create_async_engine(settings.database_url or "")
    async with engine.begin() as conn:
        for component in SERVICE_PORTS:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{settings.schema_for(component)}" CASCADE'))
    await engine.dispose()


def run(**kwargs: Any) -> dict[str, Any]:
    return asyncio.run(run_registry_bench(**kwargs))
