"""`hie bench exchange`: latency of the exchange's core operations through the gateway,
against a running `hie up`, as two hospitals would drive it. Prints a table and writes JSON."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import statistics
import time
from pathlib import Path
from typing import Any

from gateway.client import HospitalClient, Practitioner
from gateway.organizations import register_organization
from services.ops.demo import discharge_summary_cda
from services.shared import gb11643
from services.shared.config import Settings
from services.shared.keys import generate_ec_key, jwks

OPERATIONS = ("register_patient", "link_patient", "register_document", "find_documents", "retrieve_document")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def _member(settings: Settings, base_url: str, name: str) -> HospitalClient:
    key = generate_ec_key()
    org = await register_organization(
        settings, org_id=f"bench-{secrets.token_hex(4)}", name=name, type="hospital", jwks=jwks(key)
    )
    client = HospitalClient(base_url=base_url, client_id=org.client_id, key=key)
    client.practitioner = Practitioner(id="BENCH", name="压测医生", role="doctor", department="信息科")
    return client


async def run_exchange_bench(settings: Settings, base_url: str, *, exchanges: int) -> dict[str, Any]:
    """Run `exchanges` full exchanges (two registrations, a document, a search, a retrieval)."""
    a = await _member(settings, base_url, "压测医院甲")
    b = await _member(settings, base_url, "压测医院乙")
    timings: dict[str, list[float]] = {op: [] for op in OPERATIONS}
    content = discharge_summary_cda("压测患者")
    digest = hashlib.sha256(content).hexdigest()

    async def timed(op: str, coro: Any, expect: int) -> Any:
        started = time.perf_counter()
        response = await coro
        timings[op].append((time.perf_counter() - started) * 1000)
        if response.status_code != expect:
            raise RuntimeError(f"{op}: HTTP {response.status_code}")
        return response

    await a.access_token()
    await b.access_token()
    started = time.perf_counter()
    for i in range(exchanges):
        body17 = f"110105{19500101 + (i % 28)}{i % 1000:03d}"
        national_id = body17 + gb11643.check_digit(body17)
        person = {
            "name": f"测试{i}",
            "national_id": national_id,
            "birth_date": gb11643.birth_date(national_id).isoformat(),
            "gender": gb11643.gender(national_id),
        }
        run = secrets.token_hex(3)
        await timed("register_patient", a.call("POST", "/api/v1/patients", json={"local_id": f"A{run}", **person}), 201)
        await timed("link_patient", b.call("POST", "/api/v1/patients", json={"local_id": f"B{run}", **person}), 201)
        doc = {
            "source_document_id": f"DS-{run}",
            "patient_local_id": f"A{run}",
            "type": {"system": "http://loinc.org", "code": "18842-5", "display": "出院小结"},
            "title": "出院小结",
            "mime_type": "text/xml",
            "sha256": digest,
            "size": len(content),
            "content_base64": base64.b64encode(content).decode(),
        }
        registered = await timed("register_document", a.call("POST", "/api/v1/documents", json=doc), 201)
        await timed("find_documents", b.call("GET", "/api/v1/documents", params={"patient_local_id": f"B{run}"}), 200)
        document_id = registered.json()["document_id"]
        await timed("retrieve_document", b.call("GET", f"/api/v1/documents/{document_id}/content"), 200)
    wall = time.perf_counter() - started
    for member in (a, b):
        await member.aclose()
    result = {
        "exchanges": exchanges,
        "wall_seconds": round(wall, 3),
        "exchanges_per_second": round(exchanges / wall, 2),
        "operations": {
            op: {
                "n": len(values),
                "p50_ms": round(statistics.median(values), 2),
                "p95_ms": round(_percentile(values, 0.95), 2),
                "p99_ms": round(_percentile(values, 0.99), 2),
                "max_ms": round(max(values), 2),
            }
            for op, values in timings.items()
        },
    }
    return result


def write_result(result: dict[str, Any], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))


async def replay_check_cost(database_url: str, *, rounds: int = 2000) -> dict[str, float]:
    """What refusing a reused user-assertion jti adds to each API request: one insert of the jti
    in its own transaction (gateway/deps.py), timed alone against the gateway's database.

    `python -c "import asyncio; from services.ops.bench import replay_check_cost;
    print(asyncio.run(replay_check_cost('sqlite+aiosqlite:///tmp/replay.db')))"`
    """
    import datetime
    import uuid

    from gateway import store
    from services.shared.db import create_engine, session_factory

    engine = create_engine(database_url, schema="gateway_replay_bench")
    try:
        async with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                await conn.exec_driver_sql("CREATE SCHEMA IF NOT EXISTS gateway_replay_bench")
            await conn.run_sync(store.metadata.create_all, tables=[store.UsedAssertion.__table__])
        sessions = session_factory(engine)
        expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            async with sessions() as session, session.begin():
                await store.remember_user_assertion(
                    session, jti=str(uuid.uuid4()), client_id="bench", expires_at=expires
                )
            times.append((time.perf_counter() - started) * 1000)
        return {
            "rounds": rounds,
            "mean_ms": round(statistics.fmean(times), 3),
            "p50_ms": round(_percentile(times, 0.5), 3),
            "p95_ms": round(_percentile(times, 0.95), 3),
        }
    finally:
        if engine.dialect.name == "postgresql":
            async with engine.begin() as conn:
                await conn.exec_driver_sql("DROP SCHEMA IF EXISTS gateway_replay_bench CASCADE")
        await engine.dispose()
