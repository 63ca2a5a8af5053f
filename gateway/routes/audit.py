"""Audit log search, CSV export, reports and the signed chain head (REST).

Who sees what is decided by the audit service: the authority's auditors the whole region's log,
a hospital's auditors (or admins) the records of its own requests, or every access to one of its
own patients (patient access report). The gateway checks the scope `system/AuditEvent.r` and
turns the query string into the service's filters.
"""

from __future__ import annotations

import csv
import datetime
import io
import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from google.protobuf.timestamp_pb2 import Timestamp

from gateway.deps import CallContext, Context
from gateway.errors import ApiError
from gateway.routes import rpc
from hie.audit.v1 import audit_pb2
from hie.common.v1 import common_pb2
from services.shared.timestamps import isoformat, to_datetime, to_timestamp
from services.shared.user_assertion import PURPOSES_OF_USE

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])

OUTCOMES: dict[str, audit_pb2.Outcome.ValueType] = {
    "success": audit_pb2.OUTCOME_SUCCESS,
    "minor-failure": audit_pb2.OUTCOME_MINOR_FAILURE,
    "serious-failure": audit_pb2.OUTCOME_SERIOUS_FAILURE,
    "major-failure": audit_pb2.OUTCOME_MAJOR_FAILURE,
}
_OUTCOME_NAMES = {value: name for name, value in OUTCOMES.items()}
_OUTCOME_VALUES = {"enum": ["", *OUTCOMES]}
_PURPOSE_VALUES = {"enum": ["", *sorted(PURPOSES_OF_USE)]}
_ACTION_NAMES = {
    audit_pb2.ACTION_CREATE: "create",
    audit_pb2.ACTION_READ: "read",
    audit_pb2.ACTION_UPDATE: "update",
    audit_pb2.ACTION_DELETE: "delete",
    audit_pb2.ACTION_EXECUTE: "execute",
}
BREAK_GLASS_TYPE = "consent.break-glass"
# Rows one CSV export may hold; a larger result is refused (narrow the filters) rather than cut.
MAX_EXPORT_ROWS = 100_000
_EXPORT_PAGE = 500
CSV_COLUMNS = (
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
)
# A spreadsheet evaluates a cell starting with one of these as a formula (OWASP CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# A "+" in a query string arrives as a space when the client did not percent-encode it.
_UNENCODED_PLUS = re.compile(r" (\d{2}(?::?\d{2})?)$")
_DATE_HELP = "ISO 8601 date-time with a time zone, e.g. 2025-12-31T16:00:00Z or 2026-01-01T00:00:00+08:00"


async def audit_context(ctx: Context) -> CallContext:
    """The verified caller, holding `system/AuditEvent.r`."""
    ctx.require_scope("AuditEvent", "r")
    return ctx


AuditContext = Annotated[CallContext, Depends(audit_context)]


def outcome_name(outcome: int) -> str:
    return _OUTCOME_NAMES.get(outcome, "unspecified")  # type: ignore[call-overload]


def action_name(action: int) -> str:
    return _ACTION_NAMES.get(action, "unspecified")  # type: ignore[call-overload]


# What `parse_instant` takes, stated in the OpenAPI document: empty (no bound) or an RFC 3339
# date-time (which always carries its zone).
OPTIONAL_INSTANT: dict[str, Any] = {"anyOf": [{"maxLength": 0}, {"format": "date-time"}]}


def timestamp(value: datetime.datetime, name: str) -> Timestamp:
    """A protobuf timestamp of an aware datetime; 400 `date-invalid` when out of range."""
    try:
        return to_timestamp(value.astimezone(datetime.UTC))
    except (OverflowError, ValueError):
        raise ApiError(400, "date-invalid", f"{name}: date out of range") from None


def parse_instant(value: str, name: str) -> Timestamp | None:
    """An ISO 8601 date-time with a zone (`Z` or an offset); None when empty. The value is
    never echoed back in the error."""
    if not value:
        return None
    text = value.strip()
    if "T" in text:
        text = _UNENCODED_PLUS.sub(r"+\1", text)
    try:
        parsed = datetime.datetime.fromisoformat(text)
    except ValueError:
        parsed = None
    if parsed is None or parsed.utcoffset() is None:
        raise ApiError(400, "date-invalid", f"{name}: {_DATE_HELP}")
    return timestamp(parsed, name)


def parse_outcome(value: str) -> audit_pb2.Outcome.ValueType:
    if not value:
        return audit_pb2.OUTCOME_UNSPECIFIED
    if value not in OUTCOMES:
        raise ApiError(400, "outcome-invalid", "outcome: one of " + ", ".join(OUTCOMES))
    return OUTCOMES[value]


def check_purpose(value: str) -> str:
    if value and value not in PURPOSES_OF_USE:
        raise ApiError(400, "purpose-invalid", "purpose_of_use: one of " + ", ".join(sorted(PURPOSES_OF_USE)))
    return value


def event_json(event: audit_pb2.AuditEvent) -> dict[str, Any]:
    return {
        "event_id": event.event_id,
        "sequence": event.sequence,
        "occurred": isoformat(event.occurred),
        "type": event.type,
        "action": action_name(event.action),
        "outcome": outcome_name(event.outcome),
        "organization_id": event.actor.organization_id,
        "client_id": event.actor.client_id,
        "practitioner_id": event.actor.practitioner_id,
        "practitioner_name": event.actor.practitioner_name,
        "role": event.actor.role,
        "purpose_of_use": event.actor.purpose_of_use,
        "patient_enterprise_id": event.patient_enterprise_id,
        "entities": [{"type": e.type, "id": e.id} for e in event.entities],
        "source_address": event.source_address,
        "trace_id": event.trace_id,
        "span_id": event.span_id,
        "source_service": event.source_service,
        "hash": event.hash,
    }


def _set_range(message: Any, since: str, until: str) -> None:
    for field, value in (("since", since), ("until", until)):
        ts = parse_instant(value, field)
        if ts is not None:
            getattr(message, field).CopyFrom(ts)


def event_filter(
    trace_id: str = Query(default="", max_length=32, pattern="^[0-9a-f]*$"),
    organization_id: str = Query(default="", max_length=64),
    patient_enterprise_id: str = Query(default="", max_length=36),
    type: str = Query(default="", max_length=64),
    patient_local_id: str = Query(default="", max_length=64, description="patient access report"),
    patient_domain: str = Query(default="", max_length=64),
    practitioner_id: str = Query(default="", max_length=64),
    purpose_of_use: str = Query(
        default="", max_length=32, description=", ".join(sorted(PURPOSES_OF_USE)), json_schema_extra=_PURPOSE_VALUES
    ),
    outcome: str = Query(default="", max_length=32, description=", ".join(OUTCOMES), json_schema_extra=_OUTCOME_VALUES),
    failures_only: bool = Query(default=False, description="denied or failed accesses only"),
    since: str = Query(
        default="", max_length=64, description=f"occurred at or after: {_DATE_HELP}", json_schema_extra=OPTIONAL_INSTANT
    ),
    until: str = Query(
        default="", max_length=64, description=f"occurred before: {_DATE_HELP}", json_schema_extra=OPTIONAL_INSTANT
    ),
) -> audit_pb2.QueryRequest:
    """The search filters shared by the JSON search and the CSV export (no paging)."""
    query = audit_pb2.QueryRequest(
        trace_id=trace_id,
        organization_id=organization_id,
        patient_enterprise_id=patient_enterprise_id,
        type=type,
        practitioner_id=practitioner_id,
        purpose_of_use=check_purpose(purpose_of_use),
        outcome=parse_outcome(outcome),
        failures_only=failures_only,
    )
    if patient_local_id or patient_domain:
        query.patient.CopyFrom(common_pb2.PatientRef(domain=patient_domain, local_id=patient_local_id))
    _set_range(query, since, until)
    return query


EventFilter = Annotated[audit_pb2.QueryRequest, Depends(event_filter)]


async def query_page(
    request: Request, ctx: CallContext, query: audit_pb2.QueryRequest, *, page_size: int, page_token: str
) -> audit_pb2.QueryResponse:
    """One page of the audit service's search."""
    paged = audit_pb2.QueryRequest()
    paged.CopyFrom(query)
    paged.page.CopyFrom(common_pb2.PageRequest(page_size=page_size, page_token=page_token))
    return await rpc(request.app.state.stubs.audit.Query(paged, metadata=ctx.metadata))


def _events_page(result: audit_pb2.QueryResponse) -> dict[str, Any]:
    return {"events": [event_json(e) for e in result.events], "next_page_token": result.page.next_page_token}


@router.get("/events")
async def search_events(
    ctx: AuditContext,
    request: Request,
    query: EventFilter,
    page_size: int = Query(default=100, ge=1, le=500),
    page_token: str = Query(default="", max_length=32),
) -> dict[str, Any]:
    result = await query_page(request, ctx, query, page_size=page_size, page_token=page_token)
    return _events_page(result)


def _csv_cell(value: object) -> str:
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def csv_row(event: audit_pb2.AuditEvent) -> list[str]:
    values: list[object] = [
        event.event_id,
        event.sequence,
        isoformat(event.occurred),
        event.type,
        action_name(event.action),
        outcome_name(event.outcome),
        event.actor.organization_id,
        event.actor.client_id,
        event.actor.practitioner_id,
        event.actor.practitioner_name,
        event.actor.role,
        event.actor.purpose_of_use,
        event.patient_enterprise_id,
        ";".join(f"{e.type}/{e.id}" for e in event.entities),
        event.source_address,
        event.trace_id,
        event.source_service,
        event.hash,
    ]
    return [_csv_cell(v) for v in values]


@router.get(
    "/events.csv",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}, "description": "one row per audit event, UTF-8, no BOM"}},
)
async def export_events(ctx: AuditContext, request: Request, query: EventFilter) -> Response:
    """Every matching record as CSV (RFC 4180, UTF-8), paged through in sequence order.

    The export is a snapshot of the records that occurred before it started (`until` is at most
    the request's time), so it does not list the searches it makes itself. More than
    MAX_EXPORT_ROWS records: 422 `export-too-large`, nothing is sent.
    """
    now = datetime.datetime.now(datetime.UTC)
    if not query.HasField("until") or to_datetime(query.until) > now:
        query.until.CopyFrom(timestamp(now, "until"))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    rows, token = 0, ""
    while True:
        result = await query_page(request, ctx, query, page_size=_EXPORT_PAGE, page_token=token)
        if rows + len(result.events) > MAX_EXPORT_ROWS:
            raise ApiError(
                422, "export-too-large", f"more than {MAX_EXPORT_ROWS} records: narrow the time range or filters"
            )
        writer.writerows(csv_row(e) for e in result.events)
        rows += len(result.events)
        token = result.page.next_page_token
        if not token:
            break
    return Response(
        buffer.getvalue().encode("utf-8"),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="audit-events.csv"', "X-HIE-Record-Count": str(rows)},
    )


@router.get("/reports/volumes")
async def volume_report(
    ctx: AuditContext,
    request: Request,
    since: str = Query(default="", max_length=64, description=_DATE_HELP, json_schema_extra=OPTIONAL_INSTANT),
    until: str = Query(default="", max_length=64, description=_DATE_HELP, json_schema_extra=OPTIONAL_INSTANT),
    organization_id: str = Query(default="", max_length=64),
) -> dict[str, Any]:
    """Exchange volumes per UTC day, organisation, event type and outcome."""
    report = audit_pb2.ReportRequest(organization_id=organization_id)
    _set_range(report, since, until)
    result = await rpc(request.app.state.stubs.audit.Report(report, metadata=ctx.metadata))
    return {
        "rows": [
            {
                "day": r.day,
                "organization_id": r.organization_id,
                "type": r.type,
                "outcome": outcome_name(r.outcome),
                "count": r.count,
            }
            for r in result.rows
        ]
    }


async def _report_events(
    request: Request,
    ctx: CallContext,
    query: audit_pb2.QueryRequest,
    *,
    since: str,
    until: str,
    page_size: int,
    page_token: str,
) -> dict[str, Any]:
    _set_range(query, since, until)
    return _events_page(await query_page(request, ctx, query, page_size=page_size, page_token=page_token))


@router.get("/reports/denied")
async def denied_report(
    ctx: AuditContext,
    request: Request,
    since: str = Query(default="", max_length=64, description=_DATE_HELP, json_schema_extra=OPTIONAL_INSTANT),
    until: str = Query(default="", max_length=64, description=_DATE_HELP, json_schema_extra=OPTIONAL_INSTANT),
    organization_id: str = Query(default="", max_length=64),
    page_size: int = Query(default=100, ge=1, le=500),
    page_token: str = Query(default="", max_length=32),
) -> dict[str, Any]:
    """Denied or failed accesses (every outcome other than success)."""
    query = audit_pb2.QueryRequest(organization_id=organization_id, failures_only=True)
    return await _report_events(
        request, ctx, query, since=since, until=until, page_size=page_size, page_token=page_token
    )


@router.get("/reports/break-glass")
async def break_glass_report(
    ctx: AuditContext,
    request: Request,
    since: str = Query(default="", max_length=64, description=_DATE_HELP, json_schema_extra=OPTIONAL_INSTANT),
    until: str = Query(default="", max_length=64, description=_DATE_HELP, json_schema_extra=OPTIONAL_INSTANT),
    organization_id: str = Query(default="", max_length=64),
    page_size: int = Query(default=100, ge=1, le=500),
    page_token: str = Query(default="", max_length=32),
) -> dict[str, Any]:
    """Emergency (break-the-glass) accesses: events of type `consent.break-glass`."""
    query = audit_pb2.QueryRequest(organization_id=organization_id, type=BREAK_GLASS_TYPE)
    return await _report_events(
        request, ctx, query, since=since, until=until, page_size=page_size, page_token=page_token
    )


@router.get("/checkpoint")
async def latest_checkpoint(ctx: AuditContext, request: Request) -> dict[str, Any]:
    """The newest signed checkpoint of the chain head, to keep outside the exchange and hand to
    `hie audit verify --expect`."""
    result = await rpc(
        request.app.state.stubs.audit.LatestCheckpoint(audit_pb2.LatestCheckpointRequest(), metadata=ctx.metadata)
    )
    checkpoint = {
        "sequence": result.sequence,
        "hash": result.hash,
        "signed_at": isoformat(result.signed_at),
        "jws": result.jws,
    }
    if result.sm2_signature:
        checkpoint["sm2"] = {"signature": result.sm2_signature, "public_key": result.sm2_public_key}
    return checkpoint


@router.get("/verification")
async def verify_chain(ctx: AuditContext, request: Request) -> dict[str, Any]:
    """The authority verifies the whole hash chain and its signed checkpoints now (as
    `hie audit verify` does): intact, records checked, and where it first breaks."""
    result = await rpc(request.app.state.stubs.audit.VerifyChain(audit_pb2.VerifyChainRequest(), metadata=ctx.metadata))
    return {
        "intact": result.intact,
        "records_checked": result.records_checked,
        "first_break_sequence": result.first_break_sequence,
        "detail": result.detail,
    }


# --- registrations followed by cross-domain reads ------------------------------------------------

REGISTRATION_TYPE = "patient.register"
_READ_TYPES = ("document.read", "document.retrieve")
# An organisation stands out when at least this many of its cross-domain patients were registered
# just before being read, and its share of such patients is this far above the region's.
_OUTLIER_MIN_PATIENTS = 5
_OUTLIER_SHARE_MARGIN = 0.3
# ... or when it reads across domains this many times more than the median reading organisation.
_OUTLIER_VOLUME_FACTOR = 3


def registrations_then_reads(
    registrations: list[audit_pb2.AuditEvent], reads: list[audit_pb2.AuditEvent]
) -> list[dict[str, Any]]:
    """Per organisation: patients registered, cross-domain reads (reads of documents another
    organisation registered), the patients read that way, those of them the organisation had no
    earlier encounter with (its first record of the person was registered in the period, before the
    read: linking by national id is evidence of identity, the report shows whether a care
    relationship followed), their share, and whether the organisation is an outlier. Pure: the
    events in, the rows out."""
    registered_at: dict[tuple[str, str], datetime.datetime] = {}
    counts: dict[str, dict[str, Any]] = {}

    def row(org: str) -> dict[str, Any]:
        return counts.setdefault(org, {"registrations": 0, "cross_domain_reads": 0, "patients": set(), "new": set()})

    for event in registrations:
        if event.outcome != audit_pb2.OUTCOME_SUCCESS or not event.patient_enterprise_id:
            continue
        org = event.actor.organization_id
        row(org)["registrations"] += 1
        key = (org, event.patient_enterprise_id)
        occurred = to_datetime(event.occurred)
        registered_at[key] = min(registered_at.get(key, occurred), occurred)
    for event in reads:
        org = event.actor.organization_id
        sources = {e.id for e in event.entities if e.type == "Organization"}
        if event.outcome != audit_pb2.OUTCOME_SUCCESS or not sources - {org}:
            continue
        counts_of = row(org)
        counts_of["cross_domain_reads"] += 1
        counts_of["patients"].add(event.patient_enterprise_id)
        registered = registered_at.get((org, event.patient_enterprise_id))
        if registered is not None and registered <= to_datetime(event.occurred):
            counts_of["new"].add(event.patient_enterprise_id)
    patients = sum(len(c["patients"]) for c in counts.values())
    regional_share = sum(len(c["new"]) for c in counts.values()) / patients if patients else 0.0
    volumes = sorted(c["cross_domain_reads"] for c in counts.values() if c["cross_domain_reads"])
    median = volumes[len(volumes) // 2] if volumes else 0
    rows = []
    for org, c in sorted(counts.items()):
        share = len(c["new"]) / len(c["patients"]) if c["patients"] else 0.0
        outlier = (len(c["new"]) >= _OUTLIER_MIN_PATIENTS and share > regional_share + _OUTLIER_SHARE_MARGIN) or (
            len(volumes) > 2 and c["cross_domain_reads"] > _OUTLIER_VOLUME_FACTOR * median
        )
        rows.append(
            {
                "organization_id": org,
                "registrations": c["registrations"],
                "cross_domain_reads": c["cross_domain_reads"],
                "patients_read_cross_domain": len(c["patients"]),
                "patients_without_prior_encounter": len(c["new"]),
                "share_without_prior_encounter": round(share, 4),
                "outlier": outlier,
            }
        )
    return rows


async def _all_events(request: Request, ctx: CallContext, query: audit_pb2.QueryRequest) -> list[audit_pb2.AuditEvent]:
    events: list[audit_pb2.AuditEvent] = []
    token = ""
    while True:
        result = await query_page(request, ctx, query, page_size=_EXPORT_PAGE, page_token=token)
        events.extend(result.events)
        if len(events) > MAX_EXPORT_ROWS:
            raise ApiError(422, "report-too-large", f"more than {MAX_EXPORT_ROWS} records: narrow the time range")
        token = result.page.next_page_token
        if not token:
            return events


@router.get("/reports/registrations-then-reads")
async def registrations_then_reads_report(
    ctx: AuditContext,
    request: Request,
    since: str = Query(default="", max_length=64, description=_DATE_HELP, json_schema_extra=OPTIONAL_INSTANT),
    until: str = Query(default="", max_length=64, description=_DATE_HELP, json_schema_extra=OPTIONAL_INSTANT),
    organization_id: str = Query(default="", max_length=64),
) -> dict[str, Any]:
    """For the authority, next to the patient access report: each organisation's registrations
    followed by reads of other organisations' documents about the same people (volume, share of
    patients with no prior encounter, outliers). A hospital's auditors get their own row."""
    registrations = audit_pb2.QueryRequest(organization_id=organization_id, type=REGISTRATION_TYPE)
    _set_range(registrations, since, until)
    reads = []
    for read_type in _READ_TYPES:
        query = audit_pb2.QueryRequest(organization_id=organization_id, type=read_type)
        _set_range(query, since, until)
        reads += await _all_events(request, ctx, query)
    return {"organizations": registrations_then_reads(await _all_events(request, ctx, registrations), reads)}
