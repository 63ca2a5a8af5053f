"""`hie bench audit`: how fast the audit chain verifies (issue 6: 1M records in under 30 s).

A fresh audit database (a SQLite file in a temporary directory, or a throw-away PostgreSQL
schema) is migrated with the real migrations and filled with N realistic, correctly chained
records and the signed checkpoints the service would have written along the way. The real
audit service is then started in-process against it and `VerifyChain` is called over gRPC
under the platform identity, once on the intact chain and once after one record in the middle
was altered with an UPDATE; the time includes checking the signed checkpoints, as in production.

The fill bypasses the service (appending a million events over gRPC would take hours) but hashes
with `chain.link_hash` over the values the service stores, and inserts them so that they read
back exactly: through the typed Core table on SQLite, by COPY of the same Python values on
PostgreSQL. What is verified is what production would verify.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import platform
import random
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import insert, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from hie.audit.v1 import audit_pb2, audit_pb2_grpc
from services.audit import chain, store
from services.audit.service import SPEC as AUDIT
from services.audit.servicer import CHECKPOINT_EVERY, CHECKPOINT_TYPE
from services.shared import migrations
from services.shared.auth import PlatformCredentials
from services.shared.config import Settings
from services.shared.db import engine_for
from services.shared.keys import ensure_exchange_keys
from services.shared.process import start_service

TARGET_SECONDS = 30.0
FILL_BATCH = 10_000
UTC = datetime.UTC

_SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈"
_GIVEN = "伟芳娜秀英敏静丽强磊军洋勇艳杰娟涛明超秀兰霞平刚桂英华建国志红玉兰海燕晓东雪梅"
_COMPOUND_SURNAMES = ("欧阳", "司马", "上官", "诸葛", "东方")
_DEPARTMENTS = (
    "心血管内科",
    "呼吸内科",
    "神经内科",
    "消化内科",
    "内分泌科",
    "急诊科",
    "全科",
    "普外科",
    "骨科",
    "妇产科",
    "儿科",
    "放射科",
    "检验科",
    "病案室",
    "医政医管处",
)
_ROLES = ("doctor", "doctor", "doctor", "nurse", "pharmacist", "technician", "data-steward")
_PURPOSES = ("treatment", "treatment", "treatment", "referral", "consultation", "emergency", "public-health")
_SOURCE_SERVICES = ("registry", "mpi", "consent", "referral", "teleconsult")
# (type, action, entity type, source service) of the events the services record.
_EVENTS = (
    ("document.retrieve", audit_pb2.ACTION_READ, "DocumentReference", "registry"),
    ("document.query", audit_pb2.ACTION_EXECUTE, "DocumentReference", "registry"),
    ("document.register", audit_pb2.ACTION_CREATE, "DocumentReference", "registry"),
    ("patient.register", audit_pb2.ACTION_CREATE, "Patient", "mpi"),
    ("patient.pix-query", audit_pb2.ACTION_EXECUTE, "Patient", "mpi"),
    ("consent.grant", audit_pb2.ACTION_CREATE, "Consent", "consent"),
    ("referral.create", audit_pb2.ACTION_CREATE, "ServiceRequest", "referral"),
    ("teleconsult.request", audit_pb2.ACTION_CREATE, "Appointment", "teleconsult"),
)
_HOSPITALS = tuple(
    f"{code}-{name}"
    for code, name in (
        ("110105", "chaoyang-hospital"),
        ("110102", "xicheng-renmin"),
        ("110108", "haidian-zhongyi"),
        ("310104", "xuhui-zhongshan"),
        ("440106", "tianhe-fuyou"),
        ("510107", "wuhou-huaxi"),
        ("330106", "xihu-shengli"),
        ("420106", "wuchang-xiehe"),
    )
)


def _uuid4(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:32]}"


def _name(rng: random.Random) -> str:
    surname = rng.choice(_COMPOUND_SURNAMES) if rng.random() < 0.03 else rng.choice(_SURNAMES)
    return surname + "".join(rng.choice(_GIVEN) for _ in range(rng.choice((1, 2, 2))))


def _staff(rng: random.Random) -> list[tuple[str, str, str, str, str]]:
    """(organisation, practitioner id, name, role, department) of 400 practitioners."""
    return [
        (org, f"D{rng.randrange(10_000, 99_999)}", _name(rng), rng.choice(_ROLES), rng.choice(_DEPARTMENTS))
        for org in _HOSPITALS
        for _ in range(50)
    ]


def generate_fields(n: int, *, seed: int = 6) -> Iterator[dict[str, Any]]:
    """N events as the servicer's `_fields` would store them (without sequence and hashes):
    UUID event ids, Chinese practitioner names, entity JSON, tz-aware UTC datetimes with
    microseconds (one in 997 on a whole second, as from a source with second precision)."""
    rng = random.Random(seed)
    staff = _staff(rng)
    patients = [_uuid4(rng) for _ in range(min(max(n // 20, 1), 50_000))]
    occurred = datetime.datetime(2025, 1, 1, tzinfo=UTC)
    delta = datetime.timedelta
    for i in range(n):
        org, practitioner_id, practitioner_name, role, department = rng.choice(staff)
        event_type, action, entity_type, source_service = rng.choice(_EVENTS)
        occurred += delta(microseconds=rng.randrange(1, 60_000))
        at = occurred.replace(microsecond=0) if i % 997 == 0 else occurred
        ids = [_uuid4(rng) for _ in range(rng.randrange(1, 5) if event_type == "document.query" else 1)]
        yield {
            "event_id": _uuid4(rng),
            "occurred": at,
            "recorded": at + delta(microseconds=rng.randrange(1_500, 900_000)),
            "type": event_type,
            "action": int(action),
            "outcome": audit_pb2.OUTCOME_SUCCESS if rng.random() < 0.97 else audit_pb2.OUTCOME_MINOR_FAILURE,
            "organization_id": org,
            "organization_type": "hospital",
            "client_id": f"client-{org}",
            "practitioner_id": practitioner_id,
            "practitioner_name": practitioner_name,
            "role": role,
            "department": department,
            "purpose_of_use": rng.choice(_PURPOSES),
            "patient_enterprise_id": rng.choice(patients),
            "entities": store.entities_json([(entity_type, entity_id) for entity_id in ids]),
            "source_address": f"10.{rng.randrange(1, 40)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
            "trace_id": f"{rng.getrandbits(128):032x}",
            "span_id": f"{rng.getrandbits(64):016x}",
            "source_service": source_service,
        }


async def fill(
    engine: AsyncEngine,
    n: int,
    credentials: PlatformCredentials,
    *,
    schema: str = "",
    batch: int = FILL_BATCH,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Append N chained records (and a signed checkpoint every CHECKPOINT_EVERY, as the service
    does), one transaction per batch: on SQLite with Core executemany through the typed table
    (UtcDateTime writes the times as SQLAlchemy reads them back); on PostgreSQL with COPY
    (asyncpg encodes the aware datetimes as timestamptz, exact to the microsecond)."""
    records = store.AuditRecord.__table__
    checkpoints = store.Checkpoint.__table__
    columns = [column.name for column in records.columns]
    copy = engine.dialect.name == "postgresql"
    previous = chain.GENESIS_HASH
    rows: list[dict[str, Any]] = []
    signed: list[dict[str, Any]] = []
    hashing = inserting = 0.0
    started = time.perf_counter()

    async def flush() -> None:
        async with engine.begin() as conn:
            if copy:
                driver = (await conn.get_raw_connection()).driver_connection
                await driver.copy_records_to_table(
                    "audit_record",
                    schema_name=schema,
                    columns=columns,
                    records=[tuple(row[name] for name in columns) for row in rows],
                )
            else:
                await conn.execute(insert(records), rows)
            if signed:
                await conn.execute(insert(checkpoints), signed)
        rows.clear()
        signed.clear()

    for sequence, fields in enumerate(generate_fields(n), start=1):
        fields["sequence"] = sequence
        fields["previous_hash"] = previous
        tick = time.perf_counter()
        fields["hash"] = previous = chain.link_hash(previous, fields)
        hashing += time.perf_counter() - tick
        rows.append(fields)
        if sequence % CHECKPOINT_EVERY == 0 or sequence == n:
            signed_at = fields["recorded"]
            jws = credentials.sign_statement(
                {"sequence": sequence, "hash": previous, "signed_at": signed_at.isoformat()}, typ=CHECKPOINT_TYPE
            )
            signed.append({"sequence": sequence, "hash": previous, "signed_at": signed_at, "jws": jws})
        if len(rows) >= batch or sequence == n:
            tick = time.perf_counter()
            await flush()
            inserting += time.perf_counter() - tick
            if progress:
                progress(sequence)
    seconds = time.perf_counter() - started
    return {
        "records": n,
        "checkpoints": -(-n // CHECKPOINT_EVERY),
        "method": "COPY (asyncpg copy_records_to_table)" if copy else "Core executemany (typed table)",
        "batch": batch,
        "seconds": round(seconds, 2),
        "records_per_second": round(n / seconds) if seconds else 0,
        "hashing_seconds": round(hashing, 2),
        "insert_seconds": round(inserting, 2),
    }


async def verify(port: int, credentials: PlatformCredentials) -> dict[str, Any]:
    """Call VerifyChain on the running audit service, as `hie audit verify` does; timed."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = audit_pb2_grpc.AuditLogStub(channel)
        started = time.perf_counter()
        reply = await stub.VerifyChain(audit_pb2.VerifyChainRequest(), metadata=credentials.metadata(), timeout=3600)
        seconds = time.perf_counter() - started
    return {
        "seconds": round(seconds, 2),
        "records_per_second": round(reply.records_checked / seconds) if seconds else 0,
        "intact": reply.intact,
        "records_checked": reply.records_checked,
        "first_break_sequence": reply.first_break_sequence,
        "detail": reply.detail,
    }


async def tamper(engine: AsyncEngine, sequence: int) -> None:
    """Alter one stored record, as someone with write access to the database might."""
    records = store.AuditRecord.__table__
    async with engine.begin() as conn:
        await conn.execute(update(records).where(records.c.sequence == sequence).values(practitioner_name="冒名顶替"))


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
        # The audit schema becomes bench_audit_<random>_audit; dropped afterwards.
        env["HIE_DB_SCHEMA_PREFIX"] = f"bench_audit_{secrets.token_hex(4)}_"
    return Settings.from_env(env)


async def _drop_schema(settings: Settings) -> None:
    engine = engine_for(settings, AUDIT.name)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{settings.schema_for(AUDIT.name)}" CASCADE'))
    finally:
        await engine.dispose()


async def run_audit_bench(
    records: int, *, database_url: str = "", log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Fill a fresh audit database with `records` chained records, then time VerifyChain on it,
    intact and with the record in the middle altered."""
    say = log or (lambda _message: None)
    work_dir = Path(tempfile.mkdtemp(prefix="hie-bench-audit-"))
    settings = _bench_settings(work_dir, database_url)
    backend = "postgresql" if settings.database_url else "sqlite"
    where = settings.schema_for(AUDIT.name) if settings.database_url else settings.database_url_for(AUDIT.name)
    service_credentials = PlatformCredentials.from_file(
        settings.service_signing_key_file, service=AUDIT.name, issuer=f"urn:hie:service:{AUDIT.name}"
    )
    caller = PlatformCredentials.from_file(settings.service_signing_key_file, service="bench", issuer="urn:hie:bench")
    engine = engine_for(settings, AUDIT.name)
    try:
        await migrations.upgrade(
            engine, schema=settings.schema_for(AUDIT.name), versions=AUDIT.versions, metadata=AUDIT.metadata
        )
        say(f"filling {records} records into {backend} ({where})")
        step = max(records // 10, FILL_BATCH)
        filled = await fill(
            engine,
            records,
            service_credentials,
            schema=settings.schema_for(AUDIT.name),
            progress=lambda done: say(f"  {done} records") if done % step < FILL_BATCH else None,
        )
        say(f"filled in {filled['seconds']} s ({filled['records_per_second']}/s); verifying")
        running = await start_service(AUDIT, settings, listen="127.0.0.1:0")
        try:
            intact = await verify(running.port, caller)
            tampered_sequence = records // 2 + 1
            say(f"intact chain verified in {intact['seconds']} s; altering record {tampered_sequence}")
            await tamper(engine, tampered_sequence)
            tampered = await verify(running.port, caller)
        finally:
            await running.stop(grace=None)
    finally:
        await engine.dispose()
        if settings.database_url:
            await _drop_schema(settings)
        shutil.rmtree(work_dir, ignore_errors=True)
    return {
        "benchmark": "audit chain verification (VerifyChain over gRPC, in-process audit service)",
        "backend": backend,
        "database": where,
        "records": records,
        "target_seconds": TARGET_SECONDS,
        "within_target": intact["intact"] and intact["seconds"] < TARGET_SECONDS,
        "fill": filled,
        "verify": intact,
        "tampered": {**tampered, "altered_sequence": tampered_sequence},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "run_at": datetime.datetime.now(UTC).isoformat(timespec="seconds"),
    }


def run(records: int, database_url: str = "", log: Callable[[str], None] | None = None) -> dict[str, Any]:
    return asyncio.run(run_audit_bench(records, database_url=database_url, log=log))
