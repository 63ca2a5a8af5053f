"""The audit log for auditors through the gateway: REST search filters, CSV export, reports, the
signed checkpoint and the FHIR R4 AuditEvent search, over one real exchange between two hospitals.

The exchange is shared with other tests: every assertion is narrowed to this module's own
organisations, practitioners and time window."""

from __future__ import annotations

import asyncio
import base64
import csv
import datetime
import io
import json
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest

from gateway.client import HospitalClient, Practitioner
from gateway.routes import audit as audit_routes
from tests.conftest import Exchange
from tests.support.factories import document, person

UTC = datetime.UTC
CSV_HEADER = [
    "event_id",
    "sequence",
    "occurred",
    "type",
    "action",
    "outcome",
    "organization_id",
    "client_id",
    "practitioner_id",
    "practitioner_name",
    "role",
    "purpose_of_use",
    "patient_enterprise_id",
    "entities",
    "source_address",
    "trace_id",
    "source_service",
    "hash",
]
FORMULA_NAME = '=HYPERLINK("http://evil.example/x","点我")'


@dataclass
class Scenario:
    a: HospitalClient
    b: HospitalClient
    auditor: HospitalClient
    a_org: str
    b_org: str
    enterprise_id: str
    plain_id: str
    restricted_id: str
    doctor: Practitioner
    formula: Practitioner
    b_auditor: Practitioner
    started: datetime.datetime
    ended: datetime.datetime
    retrieve_trace: str

    def window(self, **params: Any) -> dict[str, Any]:
        return {"since": self.started.isoformat(), "until": self.ended.isoformat(), **params}


@pytest.fixture(scope="module")
async def scenario(exchange: Exchange) -> Scenario:
    """Hospital A registers a patient and two documents (one restricted); hospital B's doctor
    finds and retrieves the plain one, is refused the restricted one, searches for a referral;
    a practitioner whose name is a spreadsheet formula searches too."""
    tag = secrets.token_hex(3)
    a = await exchange.member(name="市第一人民医院")
    b = await exchange.member(name="城东社区卫生服务中心")
    auditor = await exchange.member(type="authority", scopes="system/AuditEvent.rs", name="市卫健委")
    doctor = Practitioner(id=f"B-DOC-{tag}", name="李医生", role="doctor", department="心内科")
    formula = Practitioner(id=f"B-EVIL-{tag}", name=FORMULA_NAME, role="doctor", department="急诊科")
    b_auditor = Practitioner(id=f"B-AUD-{tag}", name="院内审计", role="auditor", department="质控科")
    started = datetime.datetime.now(UTC) - datetime.timedelta(seconds=1)

    someone = person("王五")
    at_a = await a.call("POST", "/api/v1/patients", json={"local_id": "AUD-A", **someone})
    at_b = await b.call("POST", "/api/v1/patients", json={"local_id": "AUD-B", **someone})
    assert at_a.status_code == at_b.status_code == 201, (at_a.text, at_b.text)
    enterprise_id = at_a.json()["enterprise_id"]
    assert at_b.json()["enterprise_id"] == enterprise_id
    plain = await a.call("POST", "/api/v1/documents", json=document("AUD-A", "门诊记录".encode()))
    restricted = await a.call(
        "POST", "/api/v1/documents", json=document("AUD-A", "精神科门诊记录".encode(), security_labels=["PSY"])
    )
    assert plain.status_code == restricted.status_code == 201
    plain_id, restricted_id = plain.json()["document_id"], restricted.json()["document_id"]

    found = await b.call("GET", "/api/v1/documents", params={"patient_local_id": "AUD-B"}, as_user=doctor)
    assert [e["document_id"] for e in found.json()["entries"]] == [plain_id]
    retrieved = await b.call("GET", f"/api/v1/documents/{plain_id}/content", as_user=doctor)
    assert retrieved.status_code == 200
    denied = await b.call("GET", f"/api/v1/documents/{restricted_id}/content", as_user=doctor)
    assert denied.status_code == 403
    assert denied.json()["error"]["reason"] == "consent-denied"
    referral = await b.call(
        "GET", "/api/v1/documents", params={"patient_local_id": "AUD-B"}, as_user=doctor, purpose="referral"
    )
    assert referral.status_code == 200
    evil = await b.call("GET", "/api/v1/documents", params={"patient_local_id": "AUD-B"}, as_user=formula)
    assert evil.status_code == 200

    await exchange.audit_settled()
    ended = datetime.datetime.now(UTC)
    await asyncio.sleep(0.01)  # anything later occurs after the window
    yield Scenario(
        a=a,
        b=b,
        auditor=auditor,
        a_org=a.org_id,  # type: ignore[attr-defined]
        b_org=b.org_id,  # type: ignore[attr-defined]
        enterprise_id=enterprise_id,
        plain_id=plain_id,
        restricted_id=restricted_id,
        doctor=doctor,
        formula=formula,
        b_auditor=b_auditor,
        started=started,
        ended=ended,
        retrieve_trace=retrieved.headers["x-trace-id"],
    )
    for member in (a, b, auditor):
        await member.aclose()


async def _events(client: HospitalClient, as_user: Practitioner | None = None, **params: Any) -> list[dict[str, Any]]:
    """Every event of a REST search, following next_page_token."""
    events: list[dict[str, Any]] = []
    token = ""
    while True:
        response = await client.call(
            "GET",
            "/api/v1/audit/events",
            params={**params, "page_size": 200, **({"page_token": token} if token else {})},
            purpose="audit",
            as_user=as_user,
        )
        assert response.status_code == 200, response.text
        events += response.json()["events"]
        token = response.json()["next_page_token"]
        if not token:
            return events


# --- REST search -----------------------------------------------------------------------------


async def test_search_by_time_range(scenario: Scenario) -> None:
    s = scenario
    inside = await _events(s.auditor, **s.window(organization_id=s.b_org))
    types = {(e["type"], e["outcome"]) for e in inside}
    assert {("document.query", "success"), ("document.retrieve", "success")} <= types
    assert ("document.retrieve", "minor-failure") in types
    assert all(s.started <= datetime.datetime.fromisoformat(e["occurred"]) < s.ended for e in inside)
    # A's registrations are in the window too, under A.
    of_a = await _events(s.auditor, **s.window(organization_id=s.a_org))
    assert {"patient.register", "document.register"} <= {e["type"] for e in of_a}
    # Before and after the window: nothing of B's.
    assert await _events(s.auditor, organization_id=s.b_org, until=s.started.isoformat()) == []
    assert await _events(s.auditor, organization_id=s.b_org, since=s.ended.isoformat()) == []
    # Other zones and Z are the same instants.
    east = s.started.astimezone(datetime.timezone(datetime.timedelta(hours=8))).isoformat()
    zulu = s.ended.isoformat().replace("+00:00", "Z")
    assert [e["event_id"] for e in await _events(s.auditor, organization_id=s.b_org, since=east, until=zulu)] == [
        e["event_id"] for e in inside
    ]


async def test_unencoded_plus_in_the_zone_is_accepted(scenario: Scenario) -> None:
    s = scenario
    since = s.started.astimezone(datetime.timezone(datetime.timedelta(hours=8))).replace(microsecond=0)
    # A literal "+" in a query string is a space once decoded: the offset is still understood.
    raw = f"/api/v1/audit/events?organization_id={s.b_org}&since={since.isoformat()}&page_size=500"
    assert "+08:00" in raw
    response = await s.auditor.call("GET", raw, purpose="audit")
    assert response.status_code == 200, response.text
    assert response.json()["events"]


async def test_search_by_practitioner_purpose_and_outcome(scenario: Scenario) -> None:
    s = scenario
    by_doctor = await _events(s.auditor, **s.window(practitioner_id=s.doctor.id))
    assert by_doctor
    assert {e["practitioner_id"] for e in by_doctor} == {s.doctor.id}
    assert {e["practitioner_name"] for e in by_doctor} == {"李医生"}
    assert {e["type"] for e in by_doctor} == {"document.query", "document.retrieve"}

    referral = await _events(s.auditor, **s.window(organization_id=s.b_org, purpose_of_use="referral"))
    assert [(e["type"], e["practitioner_id"]) for e in referral] == [("document.query", s.doctor.id)]
    treatment = await _events(s.auditor, **s.window(practitioner_id=s.doctor.id, purpose_of_use="treatment"))
    assert len(treatment) == len(by_doctor) - 1

    denied = await _events(s.auditor, **s.window(organization_id=s.b_org, outcome="minor-failure"))
    assert [(e["type"], e["action"], e["entities"]) for e in denied] == [
        # A read of another organisation's document names that organisation (for the authority's
        # registrations-then-reads report).
        (
            "document.retrieve",
            "read",
            [{"type": "DocumentReference", "id": s.restricted_id}, {"type": "Organization", "id": s.a_org}],
        )
    ]
    assert denied[0]["patient_enterprise_id"] == s.enterprise_id
    failures = await _events(s.auditor, **s.window(organization_id=s.b_org, failures_only="true"))
    assert [e["event_id"] for e in failures] == [denied[0]["event_id"]]
    succeeded = await _events(s.auditor, **s.window(organization_id=s.b_org, outcome="success"))
    assert denied[0]["event_id"] not in {e["event_id"] for e in succeeded}
    assert all(e["outcome"] == "success" for e in succeeded)


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"since": "2026-11-01T00:00:00"}, "date-invalid"),  # no zone
        ({"until": "2026-11-01"}, "date-invalid"),
        ({"since": "yesterday"}, "date-invalid"),
        ({"until": "2026-13-01T00:00:00Z"}, "date-invalid"),
        ({"since": "0001-01-01T00:00:00+14:00"}, "date-invalid"),  # before the first instant
        ({"outcome": "failed"}, "outcome-invalid"),
        ({"outcome": "8"}, "outcome-invalid"),
        ({"purpose_of_use": "marketing"}, "purpose-invalid"),
    ],
)
async def test_bad_filters_are_400(scenario: Scenario, params: dict[str, str], reason: str) -> None:
    for path in ("/api/v1/audit/events", "/api/v1/audit/events.csv"):
        response = await scenario.auditor.call("GET", path, params=params, purpose="audit")
        assert response.status_code == 400, response.text
        body = response.json()["error"]
        assert body["reason"] == reason
        for value in params.values():
            assert value not in body["message"]


# --- CSV export ------------------------------------------------------------------------------


def _csv(response: httpx.Response) -> tuple[list[str], list[dict[str, str]]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["content-disposition"] == 'attachment; filename="audit-events.csv"'
    assert not response.content.startswith(b"\xef\xbb\xbf")
    rows = list(csv.reader(io.StringIO(response.content.decode("utf-8"), newline="")))
    header, body = rows[0], rows[1:]
    return header, [dict(zip(header, row, strict=True)) for row in body]


async def test_csv_export(scenario: Scenario, monkeypatch: pytest.MonkeyPatch) -> None:
    s = scenario
    # Small pages, so the export follows next_page_token several times.
    monkeypatch.setattr(audit_routes, "_EXPORT_PAGE", 2)
    response = await s.auditor.call(
        "GET", "/api/v1/audit/events.csv", params=s.window(organization_id=s.b_org), purpose="audit"
    )
    header, rows = _csv(response)
    assert header == CSV_HEADER
    searched = await _events(s.auditor, **s.window(organization_id=s.b_org))
    assert len(rows) > 2
    assert [r["event_id"] for r in rows] == [e["event_id"] for e in searched]
    assert response.headers["x-hie-record-count"] == str(len(rows))
    by_id = {e["event_id"]: e for e in searched}
    for row in rows:
        event = by_id[row["event_id"]]
        assert row["sequence"] == str(event["sequence"])
        assert row["occurred"] == event["occurred"]
        assert row["organization_id"] == s.b_org
        assert row["trace_id"] == event["trace_id"]
        assert row["hash"] == event["hash"]
        assert row["entities"] == ";".join(f"{e['type']}/{e['id']}" for e in event["entities"])
    denied = [r for r in rows if r["outcome"] == "minor-failure"]
    assert [(r["type"], r["action"], r["entities"]) for r in denied] == [
        ("document.retrieve", "read", f"DocumentReference/{s.restricted_id};Organization/{s.a_org}")
    ]
    assert denied[0]["practitioner_name"] == "李医生"
    assert denied[0]["patient_enterprise_id"] == s.enterprise_id
    retrieved = [r for r in rows if r["type"] == "document.retrieve" and r["outcome"] == "success"]
    assert retrieved[0]["trace_id"] == s.retrieve_trace
    assert retrieved[0]["purpose_of_use"] == "treatment"
    assert retrieved[0]["source_service"] == "registry"
    # Formula injection is neutralised: the name is kept, behind an apostrophe.
    evil = [r for r in rows if r["practitioner_id"] == s.formula.id]
    assert evil
    assert {r["practitioner_name"] for r in evil} == {"'" + FORMULA_NAME}
    for row in rows:
        assert not any(cell.startswith(("=", "+", "-", "@")) for cell in row.values())
    # The JSON search is not altered.
    assert {e["practitioner_name"] for e in searched if e["practitioner_id"] == s.formula.id} == {FORMULA_NAME}


async def test_csv_export_filters_and_bound(scenario: Scenario, monkeypatch: pytest.MonkeyPatch) -> None:
    s = scenario
    only_doctor = await s.auditor.call(
        "GET",
        "/api/v1/audit/events.csv",
        params=s.window(practitioner_id=s.doctor.id, failures_only="true"),
        purpose="audit",
    )
    _, rows = _csv(only_doctor)
    assert [(r["type"], r["outcome"], r["practitioner_name"]) for r in rows] == [
        ("document.retrieve", "minor-failure", "李医生")
    ]
    empty = await s.auditor.call(
        "GET", "/api/v1/audit/events.csv", params={"organization_id": s.b_org, "until": s.started.isoformat()}
    )
    header, rows = _csv(empty)
    assert header == CSV_HEADER
    assert rows == []
    # Larger than the bound: refused, not cut.
    monkeypatch.setattr(audit_routes, "MAX_EXPORT_ROWS", 2)
    monkeypatch.setattr(audit_routes, "_EXPORT_PAGE", 1)
    too_many = await s.auditor.call(
        "GET", "/api/v1/audit/events.csv", params=s.window(organization_id=s.b_org), purpose="audit"
    )
    assert too_many.status_code == 422
    assert too_many.json()["error"]["reason"] == "export-too-large"


# --- reports and checkpoint ------------------------------------------------------------------


async def test_volume_report(scenario: Scenario) -> None:
    s = scenario
    response = await s.auditor.call(
        "GET", "/api/v1/audit/reports/volumes", params=s.window(organization_id=s.b_org), purpose="audit"
    )
    assert response.status_code == 200, response.text
    rows = response.json()["rows"]
    assert rows
    assert {r["organization_id"] for r in rows} == {s.b_org}
    assert set(rows[0]) == {"day", "organization_id", "type", "outcome", "count"}
    counts = {(r["type"], r["outcome"]): r["count"] for r in rows}
    assert counts[("document.retrieve", "success")] >= 1
    assert counts[("document.retrieve", "minor-failure")] >= 1
    assert counts[("document.query", "success")] >= 3
    days = {s.started.date().isoformat(), s.ended.date().isoformat()}
    assert {r["day"] for r in rows} <= days
    # The whole region: A's rows are there too.
    region = await s.auditor.call("GET", "/api/v1/audit/reports/volumes", params=s.window(), purpose="audit")
    assert {s.a_org, s.b_org} <= {r["organization_id"] for r in region.json()["rows"]}
    bad = await s.auditor.call("GET", "/api/v1/audit/reports/volumes", params={"since": "2026-11-01"})
    assert bad.status_code == 400
    assert bad.json()["error"]["reason"] == "date-invalid"


async def test_denied_and_break_glass_reports(scenario: Scenario) -> None:
    s = scenario
    denied = await s.auditor.call(
        "GET", "/api/v1/audit/reports/denied", params=s.window(organization_id=s.b_org), purpose="audit"
    )
    assert denied.status_code == 200, denied.text
    events = denied.json()["events"]
    assert [(e["type"], e["outcome"], e["practitioner_id"]) for e in events] == [
        ("document.retrieve", "minor-failure", s.doctor.id)
    ]
    assert events[0]["entities"] == [
        {"type": "DocumentReference", "id": s.restricted_id},
        {"type": "Organization", "id": s.a_org},
    ]
    region = await s.auditor.call("GET", "/api/v1/audit/reports/denied", params=s.window(), purpose="audit")
    assert events[0]["event_id"] in {e["event_id"] for e in region.json()["events"]}
    assert all(e["outcome"] != "success" for e in region.json()["events"])
    # Nobody in this scenario broke the glass (other tests in the session may have: the
    # region-wide report holds only break-glass events, whatever ran before).
    for params in (s.window(organization_id=s.b_org), {"organization_id": s.b_org}):
        glass = await s.auditor.call("GET", "/api/v1/audit/reports/break-glass", params=params, purpose="audit")
        assert glass.status_code == 200, glass.text
        assert glass.json() == {"events": [], "next_page_token": ""}
    region = await s.auditor.call("GET", "/api/v1/audit/reports/break-glass", params=s.window(), purpose="audit")
    assert all(e["type"] == "consent.break-glass" for e in region.json()["events"])


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


async def test_checkpoint(scenario: Scenario) -> None:
    response = await scenario.auditor.call("GET", "/api/v1/audit/checkpoint", purpose="audit")
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"sequence", "hash", "signed_at", "jws"}
    parts = body["jws"].split(".")
    assert len(parts) == 3
    assert all(parts)
    assert json.loads(_b64(parts[0]))["typ"] == "hie-audit-checkpoint+jwt"
    claims = json.loads(_b64(parts[1]))
    assert (claims["sequence"], claims["hash"]) == (body["sequence"], body["hash"])
    assert body["sequence"] >= 1
    assert len(body["hash"]) == 64
    assert datetime.datetime.fromisoformat(body["signed_at"]).tzinfo is not None
    # The checkpoint covers this module's records.
    mine = await _events(scenario.auditor, **scenario.window(organization_id=scenario.b_org))
    assert body["sequence"] >= max(e["sequence"] for e in mine)


# --- FHIR AuditEvent -------------------------------------------------------------------------


async def _bundle(client: HospitalClient, params: Any, as_user: Practitioner | None = None) -> httpx.Response:
    return await client.call("GET", "/fhir/R4/AuditEvent", params=params, purpose="audit", as_user=as_user)


def _resources(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    bundle = response.json()
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "searchset"
    assert "total" not in bundle
    assert bundle["link"][0]["relation"] == "self"
    for entry in bundle.get("entry", []):
        resource = entry["resource"]
        assert entry["fullUrl"].endswith(f"/fhir/R4/AuditEvent/{resource['id']}")
        assert entry["search"] == {"mode": "match"}
        _check_audit_event(resource)
    return [entry["resource"] for entry in bundle.get("entry", [])]


def _check_audit_event(resource: dict[str, Any]) -> None:
    """The FHIR R4 AuditEvent structure: required elements present, codes from their value sets,
    no empty strings anywhere."""
    assert resource["resourceType"] == "AuditEvent"
    assert resource["type"] == {
        "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
        "code": "rest",
        "display": "RESTful Operation",
    }
    assert resource["subtype"][0]["system"] == "urn:hie:audit-event-type"
    assert resource.get("action", "E") in {"C", "R", "U", "D", "E"}
    assert resource.get("outcome", "0") in {"0", "4", "8", "12"}
    assert datetime.datetime.fromisoformat(resource["recorded"]).tzinfo is not None
    assert resource["agent"]
    for agent in resource["agent"]:
        assert isinstance(agent["requestor"], bool)
        assert agent["who"]["identifier"]["value"]
    assert sum(agent["requestor"] for agent in resource["agent"]) == 1
    assert resource["source"]["observer"]["display"].startswith("hie-")
    assert resource["source"]["type"] == [
        {
            "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
            "code": "4",
            "display": "Application Server",
        }
    ]
    for entity in resource.get("entity", []):
        assert entity["type"]["system"] == "http://terminology.hl7.org/CodeSystem/audit-entity-type"
        assert entity["type"]["code"] in {"1", "2"}
    for extension in resource.get("extension", []):
        assert extension["url"] in {"urn:hie:trace-id", "urn:hie:audit-hash"}

    def no_empty(value: Any) -> None:
        if isinstance(value, dict):
            assert value
            for item in value.values():
                no_empty(item)
        elif isinstance(value, list):
            assert value
            for item in value:
                no_empty(item)
        elif isinstance(value, str):
            assert value

    no_empty(resource)


def _org_of(resource: dict[str, Any]) -> str:
    (org,) = [
        a["who"]["identifier"]["value"]
        for a in resource["agent"]
        if a["who"]["identifier"]["system"] == "urn:hie:organization"
    ]
    return org


def _fhir_window(s: Scenario) -> list[tuple[str, str]]:
    return [("date", f"ge{s.started.isoformat()}"), ("date", f"lt{s.ended.isoformat()}")]


async def test_fhir_search_maps_audit_events(scenario: Scenario) -> None:
    s = scenario
    resources = _resources(await _bundle(s.auditor, [*_fhir_window(s), ("agent", s.doctor.id)]))
    assert {_org_of(r) for r in resources} == {s.b_org}
    events = await _events(s.auditor, **s.window(practitioner_id=s.doctor.id))
    assert [r["id"] for r in resources] == [e["event_id"] for e in events]
    by_id = {e["event_id"]: e for e in events}
    retrieve = [r for r in resources if r["subtype"][0]["code"] == "document.retrieve"]
    assert sorted(r["outcome"] for r in retrieve) == ["0", "4"]
    for resource in retrieve:
        event = by_id[resource["id"]]
        assert resource["action"] == "R"
        assert resource["recorded"] == event["occurred"]
        practitioner, organisation = resource["agent"]
        assert practitioner == {
            "type": {"coding": [{"system": "urn:hie:role", "code": "doctor"}]},
            "who": {
                "identifier": {"system": f"urn:hie:practitioner:{s.b_org}", "value": s.doctor.id},
                "display": "李医生",
            },
            "requestor": True,
            "network": {"address": event["source_address"], "type": "2"},
        }
        assert organisation == {
            "who": {"identifier": {"system": "urn:hie:organization", "value": s.b_org}},
            "requestor": False,
        }
        document_id = s.plain_id if resource["outcome"] == "0" else s.restricted_id
        assert resource["entity"] == [
            {
                "what": {"identifier": {"system": "urn:hie:enterprise-id", "value": s.enterprise_id}},
                "type": {
                    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                    "code": "1",
                    "display": "Person",
                },
                "role": {
                    "system": "http://terminology.hl7.org/CodeSystem/object-role",
                    "code": "1",
                    "display": "Patient",
                },
            },
            {
                "what": {"reference": f"DocumentReference/{document_id}"},
                "type": {
                    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                    "code": "2",
                    "display": "System Object",
                },
            },
            {
                # The facade serves no Organization by id: an identifier, as for the agent.
                "what": {"identifier": {"system": "urn:hie:organization", "value": s.a_org}},
                "type": {
                    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                    "code": "2",
                    "display": "System Object",
                },
            },
        ]
        assert resource["purposeOfEvent"] == [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                        "code": "TREAT",
                        "display": "treatment",
                    },
                    {"system": "urn:hie:purpose-of-use", "code": "treatment"},
                ],
                "text": "treatment",
            }
        ]
        assert resource["source"]["observer"] == {"display": "hie-registry"}
        assert {x["url"]: x["valueString"] for x in resource["extension"]} == {
            "urn:hie:trace-id": event["trace_id"],
            "urn:hie:audit-hash": event["hash"],
        }
    referral = [r for r in resources if r["purposeOfEvent"][0]["text"] == "referral"]
    assert len(referral) == 1
    assert referral[0]["purposeOfEvent"][0]["coding"][0]["code"] == "TREAT"
    assert referral[0]["subtype"][0]["code"] == "document.query"
    assert referral[0]["action"] == "E"


async def test_fhir_search_parameters(scenario: Scenario) -> None:
    s = scenario
    window = _fhir_window(s)

    async def ids(*params: tuple[str, str]) -> list[str]:
        return [r["id"] for r in _resources(await _bundle(s.auditor, [*window, *params]))]

    everything = await ids(("agent", s.doctor.id))
    assert len(everything) == 4  # a search for treatment, one for a referral, two retrievals
    assert await ids(("agent", f"Practitioner/{s.doctor.id}")) == everything
    # Dates: outside the window nothing; the whole day (UTC) all of it.
    assert _resources(await _bundle(s.auditor, [("date", f"lt{s.started.isoformat()}"), ("agent", s.doctor.id)])) == []
    assert _resources(await _bundle(s.auditor, [("date", f"gt{s.ended.isoformat()}"), ("agent", s.doctor.id)])) == []
    day = [("date", f"ge{s.started.date().isoformat()}"), ("date", f"le{s.ended.date().isoformat()}")]
    assert [r["id"] for r in _resources(await _bundle(s.auditor, [*day, ("agent", s.doctor.id)]))] == everything
    east = s.started.astimezone(datetime.timezone(datetime.timedelta(hours=8))).replace(microsecond=0)
    since_east = [("date", f"ge{east.isoformat()}"), ("agent", s.doctor.id)]
    assert [r["id"] for r in _resources(await _bundle(s.auditor, since_east))] == everything
    # Outcome, type / subtype, purpose.
    (denied,) = await ids(("agent", s.doctor.id), ("outcome", "4"))
    assert await ids(("agent", s.doctor.id), ("outcome", "8")) == []
    retrievals = await ids(("agent", s.doctor.id), ("subtype", "document.retrieve"))
    assert denied in retrievals
    assert len(retrievals) == 2
    assert await ids(("agent", s.doctor.id), ("type", "document.retrieve")) == retrievals
    assert await ids(("agent", s.doctor.id), ("subtype", "urn:hie:audit-event-type|document.retrieve")) == retrievals
    assert await ids(("agent", s.doctor.id), ("type", "rest")) == everything
    assert await ids(("agent", s.doctor.id), ("subtype", "document.query"), ("subtype", "document.retrieve")) == []
    assert await ids(("agent", s.doctor.id), ("purpose", "TREAT")) == everything
    referral = await ids(("agent", s.doctor.id), ("purpose", "urn:hie:purpose-of-use|referral"))
    assert len(referral) == 1
    assert await ids(("agent", s.doctor.id), ("purpose", "referral")) == referral
    treatment = await ids(
        ("agent", s.doctor.id), ("purpose", "http://terminology.hl7.org/CodeSystem/v3-ActReason|TREAT")
    )
    assert treatment == everything
    assert await ids(("agent", s.doctor.id), ("purpose", "HRESCH")) == []
    # Patient: every access to the person, by anyone.
    about = _resources(await _bundle(s.auditor, [*window, ("patient", f"Patient/{s.enterprise_id}")]))
    assert {_org_of(r) for r in about} >= {s.a_org, s.b_org}
    for resource in about:
        enterprise = {"identifier": {"system": "urn:hie:enterprise-id", "value": s.enterprise_id}}
        assert enterprise in [e["what"] for e in resource["entity"]]
    assert [r["id"] for r in about] == await ids(("patient", s.enterprise_id))


async def _walk(client: HospitalClient, params: list[tuple[str, str]]) -> tuple[list[str], int]:
    """Follow the Bundle's next links; (ids, pages)."""
    response = await _bundle(client, params)
    found: list[str] = []
    pages = 0
    while True:
        pages += 1
        found += [r["id"] for r in _resources(response)]
        links = {link["relation"]: link["url"] for link in response.json()["link"]}
        if "next" not in links:
            return found, pages
        url = urlsplit(links["next"])
        assert dict(parse_qsl(url.query))["_count"] == dict(params)["_count"]
        response = await client.call("GET", f"{url.path}?{url.query}", purpose="audit")
        assert pages < 20


async def test_fhir_paging_with_count(scenario: Scenario) -> None:
    s = scenario
    params = [*_fhir_window(s), ("agent", s.doctor.id)]
    everything = [r["id"] for r in _resources(await _bundle(s.auditor, params))]
    first = await _bundle(s.auditor, [*params, ("_count", "1")])
    assert len(first.json()["entry"]) == 1
    links = {link["relation"]: link["url"] for link in first.json()["link"]}
    assert links["self"].startswith(s.auditor.base_url + "/fhir/R4/AuditEvent?")
    assert "page=" in links["next"]
    assert await _walk(s.auditor, [*params, ("_count", "1")]) == (everything, len(everything))
    # Several of our purposes behind one v3 code: merged pages, in sequence order, none lost.
    treat = [*params, ("purpose", "TREAT")]
    assert (await _walk(s.auditor, [*treat, ("_count", "1")]))[0] == everything
    two = await _walk(s.auditor, [*treat, ("_count", "2")])
    assert two[0] == everything
    assert two[1] == 2


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ([("foo", "bar")], "search-param-unknown"),
        ([("agent:identifier", "x|y")], "search-param-unknown"),
        ([("_sort", "-date")], "search-param-unknown"),
        ([("date", "2026-11-01T10:00:00")], "date-invalid"),  # a time without a zone
        ([("date", "ne2026-11-01")], "date-invalid"),
        ([("date", "2026-13")], "date-invalid"),
        ([("date", "yesterday")], "date-invalid"),
        ([("outcome", "3")], "outcome-invalid"),
        ([("outcome", "success")], "outcome-invalid"),
        ([("purpose", "HMARKT")], "purpose-invalid"),
        ([("purpose", "http://example.org/purpose|TREAT")], "search-value-invalid"),
        ([("subtype", "document.query,document.retrieve")], "search-value-invalid"),
        ([("patient", "Patient/../x")], "search-value-invalid"),
        ([("_count", "0")], "count-invalid"),
        ([("_count", "many")], "count-invalid"),
        ([("page", "abc")], "page-invalid"),
    ],
)
async def test_fhir_bad_search_is_operation_outcome(
    scenario: Scenario, params: list[tuple[str, str]], reason: str
) -> None:
    response = await _bundle(scenario.auditor, params)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    (issue,) = outcome["issue"]
    assert (issue["severity"], issue["code"]) == ("error", "invalid")
    assert issue["details"]["coding"] == [{"system": "urn:hie:error-reason", "code": reason}]
    for _, value in params:
        assert value not in issue["diagnostics"]


async def test_capability_statement_lists_audit_event_search(exchange: Exchange) -> None:
    async with httpx.AsyncClient() as http:
        statement = (await http.get(f"{exchange.base_url}/fhir/R4/metadata")).json()
    resource = next(r for r in statement["rest"][0]["resource"] if r["type"] == "AuditEvent")
    assert resource["interaction"] == [{"code": "search-type"}]
    params = {p["name"]: p for p in resource["searchParam"]}
    assert set(params) == {"date", "agent", "patient", "type", "subtype", "outcome", "purpose"}
    assert {p["type"] for p in params.values()} == {"date", "reference", "token"}
    assert params["date"]["type"] == "date"
    assert params["outcome"]["definition"] == "http://hl7.org/fhir/SearchParameter/AuditEvent-outcome"
    assert all(p["documentation"] for p in params.values())
    assert "strict" in resource["documentation"]


# --- who may read what -----------------------------------------------------------------------


async def test_hospital_auditor_sees_only_its_own_records(scenario: Scenario) -> None:
    s = scenario
    own = await _events(s.b, as_user=s.b_auditor, **s.window())
    assert own
    assert {e["organization_id"] for e in own} == {s.b_org}
    assert {"document.query", "document.retrieve"} <= {e["type"] for e in own}
    other = await s.b.call(
        "GET", "/api/v1/audit/events", params={"organization_id": s.a_org}, purpose="audit", as_user=s.b_auditor
    )
    assert other.status_code == 403
    assert other.json()["error"]["reason"] == "audit-scope"

    window = _fhir_window(s)
    resources = _resources(await _bundle(s.b, window, as_user=s.b_auditor))
    assert resources
    assert {_org_of(r) for r in resources} == {s.b_org}
    by_patient = await _bundle(s.b, [*window, ("patient", s.enterprise_id)], as_user=s.b_auditor)
    assert by_patient.status_code == 403
    assert by_patient.json()["resourceType"] == "OperationOutcome"
    assert s.enterprise_id not in by_patient.text

    exported = await s.b.call(
        "GET", "/api/v1/audit/events.csv", params=s.window(), purpose="audit", as_user=s.b_auditor
    )
    _, rows = _csv(exported)
    assert rows
    assert {r["organization_id"] for r in rows} == {s.b_org}
    volumes = await s.b.call(
        "GET", "/api/v1/audit/reports/volumes", params=s.window(), purpose="audit", as_user=s.b_auditor
    )
    assert volumes.status_code == 200
    assert {r["organization_id"] for r in volumes.json()["rows"]} == {s.b_org}
    denied = await s.b.call(
        "GET", "/api/v1/audit/reports/denied", params=s.window(), purpose="audit", as_user=s.b_auditor
    )
    assert [e["organization_id"] for e in denied.json()["events"]] == [s.b_org]
    # A hospital is nobody else's auditor: A's auditor does not see B's requests.
    a_auditor = Practitioner(id="A-AUD", name="质控科", role="auditor", department="质控科")
    of_a = await _events(s.a, as_user=a_auditor, **s.window())
    assert of_a
    assert {e["organization_id"] for e in of_a} == {s.a_org}


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/audit/events",
        "/api/v1/audit/events.csv",
        "/api/v1/audit/reports/volumes",
        "/api/v1/audit/reports/denied",
        "/api/v1/audit/reports/break-glass",
        "/api/v1/audit/checkpoint",
        "/fhir/R4/AuditEvent",
    ],
)
async def test_hospital_doctor_may_not_read_the_audit_log(scenario: Scenario, path: str) -> None:
    response = await scenario.b.call("GET", path, as_user=scenario.doctor)
    assert response.status_code == 403, response.text
    if path.startswith("/fhir/"):
        assert response.json()["issue"][0]["details"]["coding"][0]["code"] == "role"
    else:
        assert response.json()["error"]["reason"] == "role"


async def test_audit_scope_is_required(exchange: Exchange) -> None:
    hospital = await exchange.member(scopes="system/Patient.crs")
    auditor = Practitioner(id="H-AUD", name="院内审计", role="auditor", department="审计科")
    for path in ("/api/v1/audit/events", "/api/v1/audit/events.csv", "/fhir/R4/AuditEvent"):
        response = await hospital.call("GET", path, purpose="audit", as_user=auditor)
        assert response.status_code == 403, path
        assert "scope" in response.text
    unauthenticated = await hospital.http.get(f"{exchange.base_url}/fhir/R4/AuditEvent")
    assert unauthenticated.status_code == 401
    assert unauthenticated.json()["resourceType"] == "OperationOutcome"
    await hospital.aclose()
