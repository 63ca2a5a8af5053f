"""`hie bench consent`: batched consent decisions at the service (issue 5: p99 ≤ 2 ms for a batch
of 50 documents of a patient with 10 directives).

A fresh consent database (SQLite in a temporary directory, or a throw-away PostgreSQL schema) is
migrated with the real migrations, and 10 realistic directives of one patient (denies and
permits for organisations, departments, practitioners, purposes, classes, restricted labels,
data periods, nested exceptions) are stored through the service's own store and parsers. The
real consent service is then started in-process and `Decide` is called for a batch of 50 varied
documents, as the registry calls it, in two ways:

- `rpc`: over gRPC on loopback with a gateway-signed token and a signed user assertion, as the
  registry forwards them (token and assertion verification cached as in production);
- `in_service`: the servicer's `Decide` called directly in the service's event loop: the version
  read, the cached patient's records and 50 decisions, without transport;
- `decision_only`: the 50 decisions and the response message from the patient's records in hand
  (what the service computes, without the database round trip).

Each batch reads the patient's version counter from the database (that is the cache
invalidation), so both figures include one database round trip.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import os
import platform
import secrets
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import grpc
import jwt
import typer
from sqlalchemy import text

from hie.consent.v1 import consent_pb2, consent_pb2_grpc
from services.consent import messages, policy, provisions, store
from services.consent.service import SPEC as CONSENT
from services.consent.servicer import ConsentDecisionPointServicer
from services.shared.auth import current_caller
from services.shared.config import TOKEN_AUDIENCE, Settings
from services.shared.db import utcnow
from services.shared.keys import ensure_exchange_keys, generate_ec_key, load_private_key, public_jwk
from services.shared.process import RunningService, start_service
from services.shared.user_assertion import MAX_LIFETIME_SECONDS, PURPOSES_OF_USE, Practitioner, user_assertion

TARGET_P99_MS = 2.0
_PATHS = ("rpc", "in_service", "decision_only")
DOCUMENTS = 50
_REQUESTER = "hosp-bench-b"
_SOURCES = ("hosp-bench-a", "hosp-bench-c", "hosp-bench-d", _REQUESTER)
_LABELS = ((), (), (), ("N",), ("R",), ("PSY",), ("HIV",), ("V",))
_TYPES = ("18842-5", "11502-2", "18748-4", "34133-9", "60591-5")
_CLASSES = ("clinical-note", "laboratory", "imaging")

_ORG = {"kind": "organization", "organization_id": _REQUESTER}
DIRECTIVES: list[dict[str, Any]] = [
    {"type": "deny", "actors": [{"kind": "organization", "organization_id": "hosp-bench-x"}]},
    {"type": "deny", "purposes": ["research"], "provisions": [{"type": "permit", "actors": [_ORG]}]},
    {"type": "permit", "security_labels": ["PSY"], "actors": [_ORG], "purposes": ["treatment"]},
    {"type": "deny", "classes": ["imaging"], "actors": [{**_ORG, "kind": "department", "department": "骨科"}]},
    {"type": "deny", "types": ["34133-9"], "data_period": {"start": "2020-01-01T00:00:00+00:00"}},
    {"type": "permit", "actors": [{**_ORG, "kind": "practitioner", "practitioner_id": "B-DOC-1"}], "documents": []},
    {"type": "deny", "security_labels": ["V"], "provisions": [{"type": "permit", "purposes": ["emergency"]}]},
    {"type": "deny", "actions": ["disclose"]},
    {"type": "permit", "purposes": ["public-health"], "obligations": ["deidentify"]},
    {"type": "deny", "period": {"end": "2021-01-01T00:00:00+00:00"}, "actors": [{"kind": "region"}]},
]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _summary(values: list[float], decisions: int) -> dict[str, float]:
    total = sum(values)
    return {
        "batches": len(values),
        "p50_ms": round(_percentile(values, 0.50) * 1000, 3),
        "p99_ms": round(_percentile(values, 0.99) * 1000, 3),
        "max_ms": round(max(values) * 1000, 3),
        "decisions_per_second": round(decisions * len(values) / total),
    }


def _items() -> list[consent_pb2.DecisionItem]:
    items = []
    for n in range(DOCUMENTS):
        item = consent_pb2.DecisionItem(
            item_id=str(uuid.UUID(int=n + 1)),
            source_organization_id=_SOURCES[n % len(_SOURCES)],
            class_code=_CLASSES[n % len(_CLASSES)],
            type_code=_TYPES[n % len(_TYPES)],
            security_labels=_LABELS[n % len(_LABELS)],
        )
        if n % 3:
            item.data_time.FromDatetime(datetime.datetime(2019 + n % 7, 1 + n % 12, 1, tzinfo=datetime.UTC))
        items.append(item)
    return items


async def _fill(running: RunningService, enterprise_id: str) -> None:
    async with running.runtime.sessions() as session, session.begin():
        now = utcnow()
        for n, provision in enumerate(DIRECTIVES):
            parsed = provisions.provision_from_json(provision, purposes=PURPOSES_OF_USE)
            session.add(
                store.DirectiveRecord(
                    id=str(uuid.uuid4()),
                    enterprise_id=enterprise_id,
                    patient_domain="hosp-bench-a",
                    patient_local_id="BENCH-1",
                    recorded_by_organization_id="hosp-bench-a",
                    recorded_by_practitioner_id="A-DOC-1",
                    policy_ids=json.dumps(["urn:oid:2.16.156.10011.2.5.1"]),
                    evidence_document_id=f"consent-form-{n}",
                    period_start=None,
                    period_end=None,
                    provision=json.dumps(provisions.provision_to_json(parsed), ensure_ascii=False),
                    status="active",
                    revision=1,
                    recorded_at=now + datetime.timedelta(seconds=n),
                    updated_at=now,
                    idempotency_key=f"bench-{n}",
                    request_digest="0" * 64,
                )
            )
        await store.bump_version(session, enterprise_id)


def _metadata(keys: Path) -> tuple[tuple[str, str], ...]:
    """What the registry forwards: the gateway's access token and the hospital's user assertion."""
    hospital_key = generate_ec_key()
    gateway_key = load_private_key(keys / "gateway.pem")
    now = int(time.time())
    claims = {
        "iss": "bench",
        "sub": f"client-{_REQUESTER}",
        "client_id": f"client-{_REQUESTER}",
        "aud": TOKEN_AUDIENCE,
        "iat": now,
        "exp": now + 3600,
        "org": _REQUESTER,
        "org_type": "hospital",
        "scope": "system/DocumentReference.rs",
        "client_jkt": [public_jwk(hospital_key)["kid"]],
    }
    token = jwt.encode(claims, gateway_key, algorithm="ES384", headers={"kid": public_jwk(gateway_key)["kid"]})
    assertion = user_assertion(
        key=hospital_key,
        client_id=f"client-{_REQUESTER}",
        practitioner=Practitioner(id="B-DOC-1", name="压测医生", role="doctor", department="心内科"),
        purpose="treatment",
        # User assertions live at most five minutes (services/shared/user_assertion.py).
        lifetime=MAX_LIFETIME_SECONDS,
    )
    return (("authorization", f"Bearer {token}"), ("x-hie-user-assertion", assertion))


async def run_bench(settings: Settings, keys: Path, batches: int) -> dict[str, Any]:
    running = await start_service(CONSENT, settings, listen="127.0.0.1:0")
    try:
        enterprise_id = str(uuid.uuid4())
        await _fill(running, enterprise_id)
        # The requester registered the patient (the care relationship): every rule is evaluated.
        request = consent_pb2.DecideRequest(enterprise_id=enterprise_id, items=_items(), requester_holds_record=True)
        metadata = _metadata(keys)
        rpc_times: list[float] = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = consent_pb2_grpc.ConsentDecisionPointStub(channel)
            first = await stub.Decide(request, metadata=metadata)
            for _ in range(max(50, batches // 10)):  # warm up
                await stub.Decide(request, metadata=metadata)
            for _ in range(batches):
                started = time.perf_counter()
                await stub.Decide(request, metadata=metadata)
                rpc_times.append(time.perf_counter() - started)
        # The same decisions inside the service, without transport.
        servicer = ConsentDecisionPointServicer(running.runtime)
        verifier = running.runtime.verifier
        assert verifier is not None
        who = verifier.caller_from_metadata(dict(metadata))
        token = current_caller.set(who)
        in_service: list[float] = []
        try:
            for _ in range(max(50, batches // 10)):
                await servicer.Decide(request, None)
            for _ in range(batches):
                started = time.perf_counter()
                await servicer.Decide(request, None)
                in_service.append(time.perf_counter() - started)
            # The decision work alone: the patient's records already in hand (no database, no transport).
            consent = await servicer.cache.get(enterprise_id)
            requester = provisions.Requester(
                organization_id=who.organization_id,
                purpose_of_use=who.purpose_of_use,
                department=who.department,
                practitioner_id=who.practitioner_id,
                role=who.role,
                holds_record=True,
            )
            decision_only: list[float] = []
            for _ in range(batches):
                started = time.perf_counter()
                verdicts = policy.decide_batch(
                    servicer.regional_policy, consent, requester, [messages.item_of(i) for i in request.items], utcnow()
                )
                consent_pb2.DecideResponse(decisions=[messages.decision_message(v) for v in verdicts])
                decision_only.append(time.perf_counter() - started)
        finally:
            current_caller.reset(token)
        bases: dict[str, int] = {}
        for decision in first.decisions:
            bases[decision.basis] = bases.get(decision.basis, 0) + 1
        return {
            "documents": DOCUMENTS,
            "directives": len(DIRECTIVES),
            "bases": dict(sorted(bases.items())),
            "rpc": _summary(rpc_times, DOCUMENTS),
            "in_service": _summary(in_service, DOCUMENTS),
            "decision_only": _summary(decision_only, DOCUMENTS),
            "target_p99_ms": TARGET_P99_MS,
        }
    finally:
        await running.stop(grace=None)


def run(batches: int, database_url: str) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix="bench-consent-"))
    keys = scratch / "keys"
    ensure_exchange_keys(keys)
    env = {
        "HIE_DATA_DIR": str(scratch),
        "HIE_TRUSTED_JWKS_FILE": str(keys / "trusted.jwks.json"),
        "HIE_GATEWAY_SIGNING_KEY_FILE": str(keys / "gateway.pem"),
        "HIE_SERVICE_SIGNING_KEY_FILE": str(keys / "platform.pem"),
    }
    if database_url:
        env["HIE_DATABASE_URL"] = database_url
        env["HIE_DB_SCHEMA_PREFIX"] = f"bench_{secrets.token_hex(3)}_"
    settings = Settings.from_env(env)
    # Nothing relays to an audit service here: Decide records no events outside break-the-glass.
    settings = dataclasses.replace(settings, targets={**settings.targets, "audit": "127.0.0.1:9"})

    async def go() -> dict[str, Any]:
        try:
            return await run_bench(settings, keys, batches)
        finally:
            if database_url:
                from sqlalchemy.ext.asyncio import create_async_engine

                engine = create_async_engine(database_url)
                async with engine.begin() as conn:
                    await conn.execute(text(f'DROP SCHEMA IF EXISTS "{settings.schema_for("consent")}" CASCADE'))
                await engine.dispose()

    try:
        result = asyncio.run(go())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "backend": "postgresql" if database_url else "sqlite",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        # The machine's load while measuring: the figures are only as quiet as the machine was.
        "load_average": [round(v, 2) for v in os.getloadavg()],
        **result,
        "met": {path: result[path]["p99_ms"] <= TARGET_P99_MS for path in _PATHS},
    }


def bench_consent(
    batches: Annotated[int, typer.Option(min=10, help="Timed Decide batches (after a warm-up)")] = 2000,
    database_url: Annotated[
        str, typer.Option(help="postgresql+asyncpg://… (a bench_* schema, dropped after); default: SQLite")
    ] = "",
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON here")] = None,
) -> None:
    """Batched consent decisions (50 documents, 10 directives on the patient): p50 / p99 per batch and decisions/s."""
    result = run(batches, database_url)
    typer.echo(
        f"consent bench on {result['backend']}: {result['documents']} documents x {result['directives']} directives"
        f", target p99 <= {TARGET_P99_MS} ms"
    )
    typer.echo(f"{'path':<12}{'batches':>9}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}{'decisions/s':>14}")
    for path in _PATHS:
        row = result[path]
        typer.echo(
            f"{path:<12}{row['batches']:>9}{row['p50_ms']:>10}{row['p99_ms']:>10}{row['max_ms']:>10}"
            f"{row['decisions_per_second']:>14}"
        )
    typer.echo(f"decisions by rule: {result['bases']}")
    typer.echo(f"p99 <= {TARGET_P99_MS} ms: {result['met']}; load average {result['load_average']}")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2))
        typer.echo(f"written to {json_path}")
