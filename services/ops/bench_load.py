"""`hie bench load`: mixed regional traffic through the gateway, with nothing lost.

It registers a region on an exchange (10 hospitals with their own keys and tokens, patients
loaded with the mpi's bulk load, documents registered as ITI-65 submission sets, one bundle per
patient), then drives a mix of operations shaped like the reference region's day (300k
in-hospital system calls, 100k patient-facing calls, 100k other calls): PDQ and PIX, document
query, metadata read, retrieve, register, consent lookups, and referral and consultation moves
(a referral created and accepted; a teleconsultation requested, the patient's informed consent
recorded, accepted by the consulting hospital's specialist).

Two modes: closed loop (N clients, each sending its next request when the last is answered:
the maximum throughput) and open loop (requests sent at a fixed arrival rate whatever the
answers; each latency runs from the request's *intended* send time, so a stalled exchange shows
as latency rather than as fewer requests: no coordinated omission).

It reports throughput, p50 / p95 / p99 per operation, errors by status, and CPU time per
operation per process (utime + stime from /proc of the exchange's processes, its PostgreSQL
backends and the load generator, summed over the run). Afterwards it checks that every
acknowledged write is present and audited exactly once and that the audit chain verifies.

On a shared 2-core machine the load generator and the exchange compete for the cores, and
anything else running (other test runs) depresses throughput; CPU per operation is the figure
that carries over.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import csv
import dataclasses
import datetime
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from sqlalchemy.exc import SQLAlchemyError

from gateway.client import DEFAULT_SCOPES, HospitalClient, Practitioner, new_traceparent, user_assertion
from services.shared import gb11643
from services.shared.config import Settings
from services.shared.keys import generate_ec_key, jwks
from services.shared.process_cpu import cpu_seconds

HOSPITALS = 10
# Pre-signed user assertions per hospital at most (each lives five minutes).
PRESIGN_LIMIT = 3000
DEFAULT_PATIENTS = 100_000
DEFAULT_DOCUMENTS = 500_000
# Tiers of the ten hospitals: two tertiary, three secondary, five community (referrals go up).
TIERS = ("tertiary", "tertiary", "secondary", "secondary", "secondary") + ("community",) * 5
SCOPES = DEFAULT_SCOPES.replace("ServiceRequest.crs", "ServiceRequest.crus") + " system/Consent.rs"

# The day's mix (weights per 100 requests): in-hospital system calls (PIX, queries, reads,
# retrieves, registrations) about 60 %, patient-facing lookups (PDQ, consent) about 20 %, the
# rest (metadata reads, referral and consultation moves) about 20 %.
MIX: dict[str, int] = {
    "pix": 14,
    "pdq": 8,
    "document_query": 24,
    "metadata_read": 8,
    "retrieve": 14,
    "register_document": 10,
    "consent_check": 12,
    "referral_create": 2,
    "referral_accept": 2,
    "consultation_request": 2,
    "consultation_consent": 2,
    "consultation_accept": 2,
}
# The audit event type each acknowledged write must leave exactly once (under its own trace).
WRITE_AUDIT_TYPES = {
    "register_document": "document.register",
    "referral_create": "referral.create",
    "referral_accept": "referral.accept",
    "consultation_request": "consultation.request",
    "consultation_consent": "consultation.record-consent",
    "consultation_accept": "consultation.accept",
}
# A consultation move waits for the one before it: a consent needs a requested consultation, an
# acceptance a consented one; with none waiting, the move before it is made instead.
_CONSULTATION_STEPS = ("consultation_request", "consultation_consent", "consultation_accept")
# The consulting (tertiary) hospitals' specialist every accepted consultation is assigned to.
SPECIALIST = Practitioner(id="BL-SPEC", name="压测会诊专家", role="doctor", department="心内科")
ADMIN = Practitioner(id="BL-ADM", name="压测信息科", role="admin", department="信息科")
_FAMILY = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗"
_GIVEN = ("伟", "芳", "娜", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰", "娟", "涛", "明", "超", "秀英")
CDA = "<ClinicalDocument xmlns='urn:hl7-org:v3'><title>{title}</title><text>{text}</text></ClinicalDocument>"
DOCTOR = Practitioner(id="BL-D1", name="压测医生", role="doctor", department="内科")
AUDITOR = Practitioner(id="BL-AUD", name="压测审计", role="auditor", department="医政医管处")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of `values` (q in 0..1)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# --- CPU accounting from /proc ---------------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == parent:
            found.append(int(entry.name))
    return found


def exchange_processes(up_pid: int) -> dict[str, int]:
    """The processes `hie up` (pid `up_pid`) supervises, by component name."""
    named: dict[str, int] = {}
    for pid in _children(up_pid):
        args = _cmdline(pid)
        if "-m" in args and args.index("-m") + 1 < len(args):
            module = args[args.index("-m") + 1]
            name = module.removeprefix("services.").split(".")[0] if module.startswith("services.") else module
            named["mllp" if "mllp" in args else name] = pid
    return named


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def client_ports_towards(pids: Iterable[int], server_port: int) -> set[int]:
    """Local TCP ports of the processes' connections to `server_port` (their database sockets)."""
    inodes: set[str] = set()
    for pid in pids:
        inodes |= _socket_inodes(pid)
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            local, remote, inode = cols[1], cols[2], cols[9]
            if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == server_port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


async def postgres_backends(database_url: str, pids: Iterable[int]) -> list[int]:
    """The PostgreSQL backend processes serving the given processes' connections."""
    if not database_url.startswith("postgresql"):
        return []
    import asyncpg

    url = httpx.URL(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    ports = client_ports_towards(pids, url.port or 5432)
    if not ports:
        return []
    try:
        conn = await asyncpg.connect(str(url))
        try:
            rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE client_port = ANY($1::int[])", list(ports))
        finally:
            await conn.close()
    except (asyncpg.PostgresError, OSError):
        # No connection to spare (max_connections reached): the run goes on, PostgreSQL's CPU
        # is left out of the figures (the JSON says so: no "postgres" group).
        return []
    return [row["pid"] for row in rows]


@dataclass
class CpuMeter:
    """CPU seconds per group of processes between `start` and `stop`."""

    groups: dict[str, list[int]] = field(default_factory=dict)
    _before: dict[int, float] = field(default_factory=dict)
    spent: dict[str, float] = field(default_factory=dict)

    def start(self) -> None:
        self._before = {pid: cpu_seconds(pid) or 0.0 for pids in self.groups.values() for pid in pids}

    def stop(self, later: dict[str, list[int]] | None = None) -> dict[str, float]:
        """CPU per group; `later` adds processes seen only at the end (counted from zero: they
        started during the run)."""
        for name, pids in (later or {}).items():
            self.groups.setdefault(name, [])
            self.groups[name] = sorted(set(self.groups[name]) | set(pids))
        for name, pids in self.groups.items():
            total = 0.0
            for pid in pids:
                now = cpu_seconds(pid)
                if now is not None:
                    total += now - self._before.get(pid, 0.0)
            self.spent[name] = round(total, 3)
        return self.spent


# --- the region --------------------------------------------------------------------------------


@dataclass
class Member:
    """One hospital of the region: its organisation, its key and a client as its system would be."""

    index: int
    org_id: str
    tier: str
    client: HospitalClient
    assertions: collections.deque[str] = field(default_factory=collections.deque)

    def assertion(self, purpose: str) -> str:
        """A fresh user assertion (each is taken once): pre-signed ones for treatment first, so
        that signing does not take the load generator's CPU during the measured run."""
        if purpose == "treatment" and self.assertions:
            return self.assertions.popleft()
        return user_assertion(
            key=self.client.key, client_id=self.client.client_id, practitioner=DOCTOR, purpose=purpose
        )

    def presign(self, count: int) -> None:
        for _ in range(count):
            self.assertions.append(
                user_assertion(
                    key=self.client.key, client_id=self.client.client_id, practitioner=DOCTOR, purpose="treatment"
                )
            )


@dataclass(frozen=True)
class Person:
    """A patient with a record at a home hospital (where documents are written) and at a
    second one (which reads them: a care relationship the exchange can check)."""

    index: int
    national_id: str
    name: str
    home: int
    second: int

    def local_id(self, hospital: int) -> str:
        return f"BL{self.index:07d}H{hospital}"


def make_people(count: int, salt: int) -> list[Person]:
    """`count` synthetic residents with valid and (within a run) unique national ids."""
    people = []
    base = datetime.date(1940, 1, 1)
    for i in range(count):
        n = i + salt
        born = base + datetime.timedelta(days=n % 25_000)
        body = f"330106{born:%Y%m%d}{(n // 25_000) % 1000:03d}"
        home = i % HOSPITALS
        second = (home + 1 + (i // HOSPITALS) % (HOSPITALS - 1)) % HOSPITALS
        name = _FAMILY[i % len(_FAMILY)] + _GIVEN[(i // len(_FAMILY)) % len(_GIVEN)]
        people.append(Person(i, body + gb11643.check_digit(body), name, home, second))
    return people


@dataclass
class Write:
    """An acknowledged write: what the exchange answered 2xx to, under which trace."""

    op: str
    trace_id: str
    member: int
    key: str  # document id, referral id or consultation id


@dataclass
class Region:
    members: list[Member]
    authority: HospitalClient
    people: list[Person]
    documents: list[tuple[str, int]] = field(default_factory=list)  # (document id, person index)
    writes: list[Write] = field(default_factory=list)
    pending_referrals: collections.deque[tuple[str, int]] = field(default_factory=collections.deque)
    # Consultations waiting for their informed consent (requester, consultant, person index) and
    # for acceptance (consultation id, consultant).
    pending_consents: collections.deque[tuple[str, int, int, int]] = field(default_factory=collections.deque)
    pending_accepts: collections.deque[tuple[str, int]] = field(default_factory=collections.deque)
    setup_seconds: dict[str, float] = field(default_factory=dict)


async def _register_member(
    settings: Settings, base_url: str, run: str, index: int, *, type: str = "hospital", tier: str = ""
) -> tuple[str, HospitalClient]:
    from gateway.organizations import register_organization

    key = generate_ec_key()
    org_id = f"bl-{run}-{index}" if type == "hospital" else f"bl-{run}-authority"
    org = await register_organization(
        settings, org_id=org_id, name=f"压测医院{index}", type=type, jwks=jwks(key), tier=tier
    )
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    client = HospitalClient(
        base_url=base_url,
        client_id=org.client_id,
        key=key,
        scopes=SCOPES if type == "hospital" else "system/AuditEvent.rs",
        http=httpx.AsyncClient(timeout=60, limits=limits),
    )
    client.practitioner = DOCTOR if type == "hospital" else AUDITOR
    await client.access_token()
    return org_id, client


async def _register_specialist(member: Member) -> None:
    """The consulting hospital's specialist in its directory (by its admin), qualified for
    specialist consultations, so that its doctors can accept them."""
    r = await member.client.call(
        "PUT",
        f"/api/v1/specialists/{SPECIALIST.id}",
        as_user=ADMIN,
        json={
            "name": SPECIALIST.name,
            "department": SPECIALIST.department,
            "professional_title": "主任医师",
            "years_independent_practice": 12,
            "kinds": ["specialist"],
        },
    )
    if r.status_code != 200:
        raise RuntimeError(f"specialist directory: HTTP {r.status_code}")


def _patient_csv(path: Path, people: Iterable[Person], hospital: int) -> int:
    rows = 0
    with path.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["local_id", "name", "national_id", "birth_date", "gender"])
        for p in people:
            if hospital in (p.home, p.second):
                out.writerow(
                    [
                        p.local_id(hospital),
                        p.name,
                        p.national_id,
                        gb11643.birth_date(p.national_id).isoformat(),
                        gb11643.gender(p.national_id),
                    ]
                )
                rows += 1
    return rows


def _document_bundle(local_id: str, person: Person, count: int) -> dict[str, Any]:
    entries: list[dict[str, Any]] = []
    for k in range(count):
        content = CDA.format(title="出院小结", text=f"第{k + 1}次住院，好转出院。").encode()
        binary_url = f"urn:uuid:{secrets.token_hex(16)}"
        entries.append(
            {
                "fullUrl": f"urn:uuid:{secrets.token_hex(16)}",
                "resource": {
                    "resourceType": "DocumentReference",
                    "masterIdentifier": {
                        "system": "urn:ietf:rfc:3986",
                        "value": f"urn:oid:2.25.{secrets.randbits(96)}",
                    },
                    "status": "current",
                    "type": {"coding": [{"system": "http://loinc.org", "code": "18842-5", "display": "出院小结"}]},
                    "subject": {"identifier": {"value": local_id}},
                    "date": "2026-11-20T10:00:00+08:00",
                    "description": "出院小结",
                    "content": [
                        {
                            "attachment": {
                                "contentType": "application/hl7-cda+xml",
                                "url": binary_url,
                                "size": len(content),
                            }
                        }
                    ],
                },
                "request": {"method": "POST", "url": "DocumentReference"},
            }
        )
        entries.append(
            {
                "fullUrl": binary_url,
                "resource": {
                    "resourceType": "Binary",
                    "contentType": "application/hl7-cda+xml",
                    "data": base64.b64encode(content).decode(),
                },
                "request": {"method": "POST", "url": "Binary"},
            }
        )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


async def _bounded(items: Iterable[Any], work: Callable[[Any], Awaitable[None]], concurrency: int) -> None:
    queue: asyncio.Queue[Any] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)

    async def worker() -> None:
        while not queue.empty():
            await work(queue.get_nowait())

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def build_region(
    settings: Settings,
    base_url: str,
    *,
    patients: int,
    documents: int,
    echo: Callable[[str], None] = print,
    concurrency: int = 8,
) -> Region:
    """Register ten hospitals and an authority, bulk-load the patients into the mpi (one CSV per
    hospital, `hie mpi load`'s code) and register the documents as ITI-65 submission sets."""
    from services.mpi.bulk import load_csv
    from services.mpi.standalone import open_index, parameters

    run = secrets.token_hex(3)
    started = time.perf_counter()
    members = []
    for i in range(HOSPITALS):
        org_id, client = await _register_member(settings, base_url, run, i, tier=TIERS[i])
        members.append(Member(i, org_id, TIERS[i], client))
    _, authority = await _register_member(settings, base_url, run, 0, type="authority")
    for member in members:
        if member.tier == "tertiary":
            await _register_specialist(member)
    people = make_people(patients, salt=secrets.randbelow(10**6))
    region = Region(members, authority, people)
    region.setup_seconds["organisations"] = round(time.perf_counter() - started, 2)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hie-bench-load-") as tmp:
        # The weights in force, not re-learnt from the synthetic region (EM after each hospital's
        # load would dominate the setup and is measured by `hie bench mpi`).
        async with open_index(settings, params=dataclasses.replace(parameters(), learn_weights=False)) as index:
            for member in members:
                path = Path(tmp) / f"{member.org_id}.csv"
                rows = _patient_csv(path, people, member.index)
                report = await load_csv(
                    index,
                    path,
                    domain_id=member.org_id,
                    mapping=[],
                    rejects=path.with_suffix(".rejects.csv"),
                    batch_size=1000,
                )
                if report.counts.rejected:
                    raise RuntimeError(f"bulk load rejected {report.counts.rejected} of {rows} rows")
    region.setup_seconds["patients_bulk_load"] = round(time.perf_counter() - started, 2)
    echo(
        f"patients: {patients} people, {2 * patients} records bulk-loaded"
        f" in {region.setup_seconds['patients_bulk_load']} s"
    )

    started = time.perf_counter()
    per_person = max(1, documents // max(1, patients))

    async def submit(person: Person) -> None:
        member = members[person.home]
        bundle = _document_bundle(person.local_id(person.home), person, per_person)
        headers = {"Idempotency-Key": f"bl-bundle-{person.index}-{secrets.token_hex(4)}"}
        for attempt in range(6):
            response = await _send(member, "POST", "/fhir/R4/", json=bundle, headers=headers)
            # 503 (database busy, on a shared machine): the same bundle again under the same key.
            if response.status_code != 503:
                break
            await asyncio.sleep(0.5 * 2**attempt)
        if response.status_code not in (200, 201):
            raise RuntimeError(f"document bundle: HTTP {response.status_code}")
        for entry in response.json()["entry"]:
            location = entry["response"].get("location", "")
            if location.startswith("DocumentReference/"):
                region.documents.append((location.split("/")[1], person.index))

    await _bounded(people, submit, concurrency)
    region.setup_seconds["documents"] = round(time.perf_counter() - started, 2)
    echo(f"documents: {len(region.documents)} in {patients} submission sets in {region.setup_seconds['documents']} s")
    return region


async def _send(
    member: Member,
    method: str,
    path: str,
    *,
    purpose: str = "treatment",
    traceparent: str | None = None,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> httpx.Response:
    client = member.client
    headers = {
        **(headers or {}),
        "Authorization": f"Bearer {await client.access_token()}",
        "X-HIE-User-Assertion": member.assertion(purpose),
    }
    if traceparent:
        headers["traceparent"] = traceparent
    return await client.http.request(method, f"{client.base_url}{path}", headers=headers, **kwargs)


# --- the operations ------------------------------------------------------------------------------


class Traffic:
    """Picks and sends one operation of the mix; records acknowledged writes."""

    def __init__(self, region: Region, rng: random.Random) -> None:
        self.region = region
        self.rng = rng
        self.ops = list(MIX)
        self.weights = [MIX[op] for op in self.ops]
        # A document of each person (registered by their home hospital): the material a
        # consultation attaches and the signed consent form its informed consent cites.
        self.document_of: dict[int, str] = {}
        for document_id, person_index in region.documents:
            self.document_of.setdefault(person_index, document_id)
        self.community_patients = [
            p for p in region.people if TIERS[p.home] == "community" and p.index in self.document_of
        ]

    def pick(self) -> str:
        return self.rng.choices(self.ops, self.weights)[0]

    def _reader(self) -> tuple[Member, Person]:
        person = self.region.people[self.rng.randrange(len(self.region.people))]
        return self.region.members[person.second], person

    def _document(self) -> tuple[Member, str]:
        document_id, person_index = self.region.documents[self.rng.randrange(len(self.region.documents))]
        return self.region.members[self.region.people[person_index].second], document_id

    async def run(self, op: str) -> tuple[str, int, str]:
        """Send one `op`; the operation sent (a referral is created when none waits to be
        accepted), its HTTP status and, for a refusal, the reason the exchange gave."""
        trace = new_traceparent()
        if op == "pix":
            member, person = self._reader()
            r = await _send(member, "GET", f"/api/v1/patients/{person.local_id(member.index)}/cross-references")
        elif op == "pdq":
            member, person = self._reader()
            r = await _send(member, "GET", "/api/v1/patients/search", params={"national_id": person.national_id})
        elif op == "document_query":
            member, person = self._reader()
            r = await _send(
                member, "GET", "/api/v1/documents", params={"patient_local_id": person.local_id(member.index)}
            )
        elif op == "metadata_read":
            member, document_id = self._document()
            r = await _send(member, "GET", f"/api/v1/documents/{document_id}")
        elif op == "retrieve":
            member, document_id = self._document()
            r = await _send(member, "GET", f"/api/v1/documents/{document_id}/content")
        elif op == "consent_check":
            member, person = self._reader()
            r = await _send(
                member, "GET", "/api/v1/consent/directives", params={"patient_local_id": person.local_id(member.index)}
            )
        elif op == "register_document":
            person = self.region.people[self.rng.randrange(len(self.region.people))]
            member = self.region.members[person.home]
            content = CDA.format(title="检验报告", text=f"血常规：正常 {secrets.token_hex(4)}").encode()
            body = {
                "source_document_id": f"BL-{secrets.token_hex(8)}",
                "patient_local_id": person.local_id(member.index),
                "type": {"system": "http://loinc.org", "code": "11502-2", "display": "检验报告"},
                "title": "检验报告",
                "mime_type": "text/xml",
                "sha256": hashlib.sha256(content).hexdigest(),
                "size": len(content),
                "content_base64": base64.b64encode(content).decode(),
            }
            r = await _send(member, "POST", "/api/v1/documents", json=body, traceparent=trace)
            if r.status_code == 201:
                self._acknowledged(op, trace, member, r.json()["document_id"])
        elif op in _CONSULTATION_STEPS:
            op, r = await self._consultation(op, trace)
        elif op == "referral_create" or (op == "referral_accept" and not self.region.pending_referrals):
            op = "referral_create"
            r, member, referral_id, target = await self._create_referral(trace)
            if r.status_code == 201:
                self._acknowledged(op, trace, member, referral_id)
                self.region.pending_referrals.append((referral_id, target))
        else:
            referral_id, target = self.region.pending_referrals.popleft()
            member = self.region.members[target]
            r = await _send(
                member, "POST", f"/api/v1/referrals/{referral_id}/accept", purpose="referral", traceparent=trace
            )
            if r.status_code == 200:
                self._acknowledged(op, trace, member, referral_id)
        return op, r.status_code, _reason(r) if r.status_code >= 400 else ""

    async def _create_referral(self, trace: str) -> tuple[httpx.Response, Member, str, int]:
        # Up the alliance: a community hospital's patient to a tertiary hospital.
        while True:
            person = self.region.people[self.rng.randrange(len(self.region.people))]
            origin = next((h for h in (person.home, person.second) if TIERS[h] == "community"), None)
            if origin is not None:
                break
        target = self.rng.choice([i for i, tier in enumerate(TIERS) if tier == "tertiary"])
        member = self.region.members[origin]
        body = {
            "patient_local_id": person.local_id(origin),
            "target_organization_id": self.region.members[target].org_id,
            "reason": "反复胸痛一周，基层无法明确诊断",
            "diagnosis": {"code": "I20.0", "text": "不稳定型心绞痛"},
            "urgency": "routine",
            "service": "outpatient",
        }
        r = await _send(member, "POST", "/api/v1/referrals", json=body, purpose="referral", traceparent=trace)
        referral_id = r.json().get("referral_id", "") if r.status_code == 201 else ""
        return r, member, referral_id, target

    async def _consultation(self, op: str, trace: str) -> tuple[str, httpx.Response]:
        """A consultation move: requested by a community hospital of a tertiary one, the patient's
        informed consent recorded by the requester, accepted by the consultant (assigning its
        specialist). A move with none waiting for it makes the move before it instead."""
        region = self.region
        if op == "consultation_accept" and not region.pending_accepts:
            op = "consultation_consent"
        if op == "consultation_consent" and not region.pending_consents:
            op = "consultation_request"
        if op == "consultation_request":
            # A community hospital's own patient (the attached document is the requester's own).
            person = self.rng.choice(self.community_patients)
            target = self.rng.choice([i for i, tier in enumerate(TIERS) if tier == "tertiary"])
            member = region.members[person.home]
            body = {
                "patient_local_id": person.local_id(person.home),
                "consultant_organization_id": region.members[target].org_id,
                "kind": "specialist",
                "question": "反复胸闷，冠脉造影指征请会诊",
                "purpose": "明确诊断及治疗方案",
                "summary": "活动后胸闷三月，心电图 ST 段压低",
                "document_ids": [self.document_of[person.index]],
            }
            r = await _send(
                member, "POST", "/api/v1/consultations", json=body, purpose="consultation", traceparent=trace
            )
            if r.status_code == 201:
                consultation_id = r.json()["consultation_id"]
                self._acknowledged(op, trace, member, consultation_id)
                region.pending_consents.append((consultation_id, person.home, target, person.index))
        elif op == "consultation_consent":
            consultation_id, origin, target, person_index = region.pending_consents.popleft()
            member = region.members[origin]
            consent = {"evidence_document_id": self.document_of[person_index], "signer": "patient"}
            r = await _send(
                member,
                "POST",
                f"/api/v1/consultations/{consultation_id}/record-consent",
                json={"informed_consent": consent},
                purpose="consultation",
                traceparent=trace,
            )
            if r.status_code == 200:
                self._acknowledged(op, trace, member, consultation_id)
                region.pending_accepts.append((consultation_id, target))
        else:
            consultation_id, target = region.pending_accepts.popleft()
            member = region.members[target]
            r = await _send(
                member,
                "POST",
                f"/api/v1/consultations/{consultation_id}/accept",
                json={"assignee_ids": [SPECIALIST.id], "reason": "同意会诊"},
                purpose="consultation",
                traceparent=trace,
            )
            if r.status_code == 200:
                self._acknowledged(op, trace, member, consultation_id)
        return op, r

    def _acknowledged(self, op: str, trace: str, member: Member, key: str) -> None:
        self.region.writes.append(Write(op, trace.split("-")[1], member.index, key))


def _reason(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["reason"])[:64]
    except (ValueError, KeyError, TypeError):
        return ""


@dataclass
class Samples:
    latencies: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    errors: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    late_starts: int = 0

    def add(self, op: str, ms: float, status: int, reason: str = "") -> None:
        self.latencies[op].append(ms)
        if not 200 <= status < 300:
            self.errors[op][f"{status} {reason}".strip()] += 1


async def _one(traffic: Traffic, samples: Samples, op: str, intended: float) -> None:
    try:
        op, status, reason = await traffic.run(op)
    except httpx.HTTPError as exc:
        samples.errors[op][type(exc).__name__] += 1
        samples.latencies[op].append((time.perf_counter() - intended) * 1000)
        return
    samples.add(op, (time.perf_counter() - intended) * 1000, status, reason)


async def closed_loop(traffic: Traffic, *, clients: int, seconds: float) -> Samples:
    """`clients` clients, each sending its next request as soon as the last is answered."""
    samples = Samples()
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < deadline:
            await _one(traffic, samples, traffic.pick(), time.perf_counter())

    await asyncio.gather(*(client() for _ in range(clients)))
    return samples


async def open_loop(traffic: Traffic, *, rate: float, seconds: float, max_in_flight: int = 2000) -> Samples:
    """Requests at a fixed arrival rate for `seconds`; latency from each intended send time."""
    samples = Samples()
    total = int(rate * seconds)
    started = time.perf_counter()
    tasks: set[asyncio.Task[None]] = set()
    for i in range(total):
        intended = started + i / rate
        delay = intended - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= max_in_flight:
            # The exchange is this far behind: wait for answers rather than open more sockets;
            # the latency still counts from the intended time.
            samples.late_starts += 1
            _, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        task = asyncio.create_task(_one(traffic, samples, traffic.pick(), intended))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks)
    return samples


# --- the correctness check ------------------------------------------------------------------


@dataclass
class Verdict:
    writes: int
    lost: list[Write]
    unaudited: list[Write]
    audited_twice: list[Write]
    chain_intact: bool
    records_checked: int

    @property
    def ok(self) -> bool:
        return not (self.lost or self.unaudited or self.audited_twice) and self.chain_intact

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "acknowledged_writes": self.writes,
            "lost": [dataclasses.asdict(w) for w in self.lost],
            "unaudited": [dataclasses.asdict(w) for w in self.unaudited],
            "audited_more_than_once": [dataclasses.asdict(w) for w in self.audited_twice],
            "audit_chain_intact": self.chain_intact,
            "audit_records_checked": self.records_checked,
        }


def judge(
    writes: list[Write], present: dict[str, bool], audit_counts: dict[str, int], *, chain_intact: bool, records: int
) -> Verdict:
    """The verdict over acknowledged writes: each must be present and audited exactly once
    (keys: the write's trace id)."""
    return Verdict(
        writes=len(writes),
        lost=[w for w in writes if not present.get(w.trace_id, False)],
        unaudited=[w for w in writes if audit_counts.get(w.trace_id, 0) == 0],
        audited_twice=[w for w in writes if audit_counts.get(w.trace_id, 0) > 1],
        chain_intact=chain_intact,
        records_checked=records,
    )


async def _present(region: Region, write: Write) -> bool:
    member = region.members[write.member]
    if write.op == "register_document":
        r = await _send(member, "GET", f"/api/v1/documents/{write.key}")
        return r.status_code == 200
    if write.op in _CONSULTATION_STEPS:
        r = await _send(member, "GET", f"/api/v1/consultations/{write.key}", purpose="consultation")
        if r.status_code != 200:
            return False
        if write.op == "consultation_consent":
            return r.json().get("informed_consent") is not None
        if write.op == "consultation_accept":
            return r.json().get("state") not in ("requested", "")
        return True
    r = await _send(member, "GET", f"/api/v1/referrals/{write.key}", purpose="referral")
    if r.status_code != 200:
        return False
    return write.op != "referral_accept" or r.json().get("state") not in ("requested", "")


async def _audit_count(region: Region, write: Write) -> int:
    r = await region.authority.call(
        "GET",
        "/api/v1/audit/events",
        params={"trace_id": write.trace_id, "type": WRITE_AUDIT_TYPES[write.op], "page_size": 10},
        purpose="audit",
    )
    r.raise_for_status()
    return len(r.json()["events"])


async def check_writes(region: Region, *, settle_seconds: float = 60.0, concurrency: int = 8) -> Verdict:
    """Ask the exchange, as its users would: each acknowledged write read back by the hospital
    that made it, its audit records looked up by trace id by the authority's auditor (waiting
    up to `settle_seconds` for the outbox relays), then the whole chain verified."""
    present: dict[str, bool] = {}
    counts: dict[str, int] = {}

    async def check(write: Write) -> None:
        present[write.trace_id] = await _present(region, write)
        deadline = time.monotonic() + settle_seconds
        while True:
            counts[write.trace_id] = await _audit_count(region, write)
            if counts[write.trace_id] or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.5)

    await _bounded(region.writes, check, concurrency)
    verification = await region.authority.call("GET", "/api/v1/audit/verification", purpose="audit")
    verification.raise_for_status()
    body = verification.json()
    return judge(
        region.writes, present, counts, chain_intact=bool(body["intact"]), records=int(body["records_checked"])
    )


# --- a run ---------------------------------------------------------------------------------------


def summarise(samples: Samples, seconds: float, cpu: dict[str, float]) -> dict[str, Any]:
    """Throughput, latency per operation, errors by status, CPU per operation per process."""
    total = sum(len(v) for v in samples.latencies.values())
    operations = {}
    for op in MIX:
        values = samples.latencies.get(op, [])
        if not values:
            continue
        operations[op] = {
            "n": len(values),
            "per_second": round(len(values) / seconds, 1),
            "p50_ms": round(statistics.median(values), 2),
            "p95_ms": round(percentile(values, 0.95), 2),
            "p99_ms": round(percentile(values, 0.99), 2),
            "max_ms": round(max(values), 2),
            "errors": dict(samples.errors.get(op, {})),
        }
    all_values = [v for values in samples.latencies.values() for v in values]
    return {
        "requests": total,
        "seconds": round(seconds, 2),
        "per_second": round(total / seconds, 1) if seconds else 0.0,
        "p50_ms": round(statistics.median(all_values), 2) if all_values else None,
        "p99_ms": round(percentile(all_values, 0.99), 2) if all_values else None,
        "late_starts": samples.late_starts,
        "operations": operations,
        "cpu_seconds": cpu,
        # Mixed traffic: CPU per request averaged over the mix (one operation alone: --only).
        "cpu_ms_per_request": {name: round(1000 * s / total, 3) for name, s in cpu.items()} if total else {},
        "cpu_ms_per_request_exchange": round(
            1000 * sum(s for name, s in cpu.items() if name != "load-generator") / total, 3
        )
        if total
        else None,
    }


async def drive(
    region: Region,
    *,
    mode: str,
    seconds: float,
    clients: int,
    rate: float,
    up_pid: int | None,
    database_url: str,
    only: str = "",
    seed: int = 1,
) -> dict[str, Any]:
    """One measured run of the mix (or of `only` one operation) with CPU accounting."""
    traffic = Traffic(region, random.Random(seed))
    if only:
        traffic.ops, traffic.weights = [only], [1]
    if mode == "open":
        # Signed before the clock starts, so that signing (ES384, ~1-2 ms each here) does not
        # delay sends; a closed loop signs as it goes (its clients wait for answers anyway).
        for member in region.members:
            member.presign(min(int(rate * seconds) // HOSPITALS + 20, PRESIGN_LIMIT))
    processes = exchange_processes(up_pid) if up_pid else {}
    groups = {name: [pid] for name, pid in processes.items()}
    backends = await postgres_backends(database_url, processes.values())
    if backends:
        groups["postgres"] = backends
    groups["load-generator"] = [os.getpid()]
    meter = CpuMeter(groups)
    meter.start()
    started = time.perf_counter()
    if mode == "closed":
        samples = await closed_loop(traffic, clients=clients, seconds=seconds)
    else:
        samples = await open_loop(traffic, rate=rate, seconds=seconds)
    elapsed = time.perf_counter() - started
    later = await postgres_backends(database_url, processes.values())
    cpu = meter.stop({"postgres": later} if later else None)
    result = summarise(samples, elapsed, cpu)
    result.update(
        {"mode": mode, "clients": clients if mode == "closed" else None, "rate": rate if mode == "open" else None}
    )
    if only:
        result["only"] = only
    return result


def table(result: dict[str, Any]) -> str:
    """The run as a plain-text table."""
    lines = [
        f"{result['mode']} loop: {result['requests']} requests in {result['seconds']} s = {result['per_second']} req/s"
        + (f" (target rate {result['rate']}/s)" if result.get("rate") else f" ({result['clients']} clients)"),
        f"{'operation':<22}{'n':>7}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}  errors",
    ]
    for op, row in result["operations"].items():
        errors = ", ".join(f"{k}×{v}" for k, v in row["errors"].items()) or "-"
        lines.append(
            f"{op:<22}{row['n']:>7}{row['per_second']:>8}{row['p50_ms']:>9}{row['p95_ms']:>9}{row['p99_ms']:>9}"
            f"{row['max_ms']:>9}  {errors}"
        )
    lines.append("CPU ms per request (summed over the run / requests):")
    lines.append(
        "  "
        + "  ".join(f"{name} {ms}" for name, ms in sorted(result["cpu_ms_per_request"].items(), key=lambda x: -x[1]))
    )
    lines.append(f"  exchange total {result['cpu_ms_per_request_exchange']} ms")
    return "\n".join(lines)


# --- an exchange of its own -----------------------------------------------------------------


def free_port_block(size: int = 7) -> int:
    """A port P with P..P+size-1 free on loopback."""
    for _ in range(500):
        first = random.randint(20_000, 60_000)
        socks = []
        try:
            for port in range(first, first + size):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no block of free ports found")


@dataclass
class OwnExchange:
    """The services and the gateway as processes of this one (so their CPU is theirs)."""

    processes: list[subprocess.Popen[bytes]]
    data_dir: Path
    gateway_url: str
    env: dict[str, str]

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def start_own_exchange(database_url: str, extra_env: dict[str, str] | None = None) -> OwnExchange:
    """The exchange's processes as `hie up` starts them (audit first, the gateway last), in a
    temporary data dir, on free ports, in `bench_*` schemas when on PostgreSQL; ready when the
    gateway's /readyz says so (waiting up to five minutes: a busy shared machine is slow)."""
    from services.shared.components import SERVICES
    from services.shared.config import SERVICE_PORTS
    from services.shared.keys import ensure_exchange_keys

    data_dir = Path(tempfile.mkdtemp(prefix="hie-bench-load-"))
    ports = free_port_block(1 + len(SERVICES))
    keys = ensure_exchange_keys(data_dir / "keys")
    targets = {name: f"127.0.0.1:{ports + 1 + i}" for i, name in enumerate(SERVICE_PORTS)}
    url = f"http://127.0.0.1:{ports}"
    env = {
        **os.environ,
        "HIE_DATA_DIR": str(data_dir),
        "HIE_TRUSTED_JWKS_FILE": str(keys["trusted"]),
        "HIE_GATEWAY_SIGNING_KEY_FILE": str(keys["gateway"]),
        "HIE_SERVICE_SIGNING_KEY_FILE": str(keys["platform"]),
        "HIE_PUBLIC_URL": url,
        "HIE_DB_SCHEMA_PREFIX": f"bench_{secrets.token_hex(3)}_",
        **{f"HIE_{name.upper()}_TARGET": target for name, target in targets.items()},
        **(extra_env or {}),
    }
    if database_url:
        env["HIE_DATABASE_URL"] = database_url
    log = (data_dir / "exchange.log").open("wb")
    processes = []
    for name in (c.name for c in SERVICES):
        processes.append(
            subprocess.Popen(  # noqa: S603 - this interpreter, a fixed module name
                [sys.executable, "-m", f"services.{name}"],
                env={**env, "HIE_LISTEN": targets[name]},
                stdout=log,
                stderr=log,
            )
        )
    processes.append(
        subprocess.Popen(
            [sys.executable, "-m", "gateway"], env={**env, "HIE_LISTEN": f"127.0.0.1:{ports}"}, stdout=log, stderr=log
        )
    )
    own = OwnExchange(processes, data_dir, url, env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            break
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return own
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    own.stop()
    if database_url:
        asyncio.run(drop_bench_schemas(database_url, env["HIE_DB_SCHEMA_PREFIX"]))
    raise RuntimeError(f"the benchmark's exchange did not become ready: see {data_dir / 'exchange.log'}")


async def drop_bench_schemas(database_url: str, prefix: str) -> None:
    """Drop the schemas of an exchange of the benchmark's own."""
    import asyncpg

    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        names = await conn.fetch("SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", prefix + "%")
        for row in names:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{row["nspname"]}" CASCADE')
    finally:
        await conn.close()


async def run(
    settings: Settings,
    gateway_url: str,
    *,
    patients: int,
    documents: int,
    modes: list[str],
    seconds: float,
    clients: int,
    rate: float,
    up_pid: int | None,
    only: str = "",
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build the region, run each mode, check the writes."""
    region = await build_region(settings, gateway_url, patients=patients, documents=documents, echo=echo)
    result: dict[str, Any] = {
        "hospitals": HOSPITALS,
        "patients": patients,
        "documents": len(region.documents),
        "database": "postgresql" if (settings.database_url or "").startswith("postgresql") else "sqlite",
        "machine": {"cpus": os.cpu_count(), "load_average_before": os.getloadavg()},
        "setup_seconds": region.setup_seconds,
        "runs": [],
    }
    for mode in modes:
        echo(f"{mode} loop for {seconds} s …")
        outcome = await drive(
            region,
            mode=mode,
            seconds=seconds,
            clients=clients,
            rate=rate,
            up_pid=up_pid,
            database_url=settings.database_url or "",
            only=only,
        )
        echo(table(outcome))
        result["runs"].append(outcome)
    echo(f"checking {len(region.writes)} acknowledged writes …")
    verdict = await check_writes(region)
    result["correctness"] = verdict.as_dict()
    result["machine"]["load_average_after"] = os.getloadavg()
    for member in region.members:
        await member.client.aclose()
    await region.authority.aclose()
    return result


def write_json(result: dict[str, Any], output: Path) -> None:
    """Write the result as JSON (the folder made if needed)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2, ensure_ascii=False))


# --- the command ---------------------------------------------------------------------------------


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def command(
    scale: Annotated[
        float, typer.Option(help="Fraction of the default region (100,000 patients, 500,000 documents); 0.001 smokes")
    ] = 1.0,
    patients: Annotated[int, typer.Option(help="Patients (overrides --scale)")] = 0,
    documents: Annotated[int, typer.Option(help="Documents (overrides --scale)")] = 0,
    mode: Annotated[str, typer.Option(help="closed | open | both")] = "both",
    seconds: Annotated[float, typer.Option(min=0.1, help="Length of each measured run")] = 30.0,
    clients: Annotated[int, typer.Option(min=1, help="Closed loop: concurrent clients")] = 16,
    rate: Annotated[float, typer.Option(min=0.1, help="Open loop: requests per second (arrival rate)")] = 100.0,
    only: Annotated[str, typer.Option(help=f"One operation instead of the mix: {', '.join(MIX)}")] = "",
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Measure the running `hie up` of this data dir [default: an exchange of its own]"),
    ] = None,
    database_url: Annotated[
        str,
        typer.Option(envvar="HIE_DATABASE_URL", help="postgresql+asyncpg://… (its own bench_* schemas, dropped after)"),
    ] = "",
    output: Annotated[Path, typer.Option(help="JSON results")] = Path("bench-results/load.json"),
) -> None:
    """Mixed regional traffic through the gateway (closed and open loop): throughput, p50 / p95 /
    p99 per operation, errors, CPU per request per process; then every acknowledged write checked
    present and audited exactly once, and the audit chain verified. Exit 1 when that check fails."""
    if mode not in ("closed", "open", "both"):
        typer.echo("--mode is closed, open or both", err=True)
        raise typer.Exit(2)
    if only and only not in MIX:
        typer.echo(f"--only is one of {', '.join(MIX)}", err=True)
        raise typer.Exit(2)
    # SIGTERM stops as Ctrl-C does, so that an exchange of its own is stopped and its schemas dropped.
    signal.signal(signal.SIGTERM, _interrupt)
    n_patients = patients or max(10, round(DEFAULT_PATIENTS * scale))
    n_documents = documents or max(n_patients, round(DEFAULT_DOCUMENTS * scale))
    own: OwnExchange | None = None
    if data_dir is None:
        typer.echo(f"starting an exchange of its own ({'PostgreSQL' if database_url else 'SQLite'}) …")
        try:
            own = start_own_exchange(database_url)
        except RuntimeError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        env, url, up_pid = own.env, own.gateway_url, os.getpid()
    else:
        try:
            state = json.loads((data_dir / "up.json").read_text())
        except (OSError, ValueError):
            typer.echo(f"no running exchange found in {data_dir} (start one with `hie up`)", err=True)
            raise typer.Exit(3) from None
        env = {**os.environ, "HIE_DATA_DIR": str(data_dir)}
        if state.get("database_url") or database_url:
            env["HIE_DATABASE_URL"] = state.get("database_url") or database_url
        url, up_pid = state["gateway_url"], int(state["pid"])
    settings = Settings.from_env(env)
    modes = ["closed", "open"] if mode == "both" else [mode]
    try:
        result = asyncio.run(
            run(
                settings,
                url,
                patients=n_patients,
                documents=n_documents,
                modes=modes,
                seconds=seconds,
                clients=clients,
                rate=rate,
                up_pid=up_pid,
                only=only,
                echo=typer.echo,
            )
        )
    except (RuntimeError, httpx.HTTPError, OSError, SQLAlchemyError) as exc:
        # One line, never a traceback (nor a response body: it could name a patient).
        typer.echo(f"error: the benchmark stopped: {type(exc).__name__}: {str(exc)[:200]}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("stopped", err=True)
        raise typer.Exit(1) from None
    finally:
        if own is not None:
            own.stop()
            if database_url:
                asyncio.run(drop_bench_schemas(database_url, own.env["HIE_DB_SCHEMA_PREFIX"]))
            shutil.rmtree(own.data_dir, ignore_errors=True)
    write_json(result, output)
    verdict = result["correctness"]
    typer.echo(
        f"acknowledged writes {verdict['acknowledged_writes']}: lost {len(verdict['lost'])}, unaudited "
        f"{len(verdict['unaudited'])}, audited more than once {len(verdict['audited_more_than_once'])}; audit chain "
        f"{'intact' if verdict['audit_chain_intact'] else 'BROKEN'} ({verdict['audit_records_checked']} records)"
    )
    typer.echo(f"written to {output}")
    if not verdict["ok"]:
        raise typer.Exit(1)
