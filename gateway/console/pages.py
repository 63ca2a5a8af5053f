"""The console's screens. Every piece of exchange data comes from the public API through
`ConsoleContext.api` (so consent, scopes, masking and audit apply as to any hospital system);
only the organisation's own user administration reads the gateway's user table directly."""

from __future__ import annotations

import datetime
import re
import secrets
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from gateway.console import users
from gateway.console.web import Console, ConsoleContext, checked_form, home_of, page
from services.shared.errors import DomainError

router = APIRouter(prefix="/console", include_in_schema=False)

AUDIT_FILTERS = (
    "since",
    "until",
    "organization_id",
    "practitioner_id",
    "patient_enterprise_id",
    "type",
    "outcome",
    "purpose_of_use",
    "trace_id",
)
OUTCOMES = ("success", "minor-failure", "serious-failure", "major-failure")
PURPOSES = ("treatment", "referral", "consultation", "emergency", "research", "public-health", "audit", "operations")
_CDA = "{urn:hl7-org:v3}"


def _filters(request: Request, names: tuple[str, ...]) -> dict[str, str]:
    return {n: request.query_params.get(n, "").strip()[:64] for n in names}


@router.get("/")
async def home(ctx: Console) -> Response:
    return RedirectResponse(home_of(ctx.user), status_code=303)


# -- auditor ---------------------------------------------------------------------------------


@router.get("/audit")
async def audit_search(request: Request, ctx: Console) -> Response:
    """Search the exchange log by time, organisation, actor, patient, type, outcome, purpose, trace."""
    filters = _filters(request, AUDIT_FILTERS)
    result = None
    if any(filters.values()) or request.query_params.get("all"):
        params = {**filters, "page_size": 50, "page_token": request.query_params.get("page_token", "")[:32]}
        result = await ctx.api.get("/api/v1/audit/events", params)
    return page(
        ctx,
        "audit.html",
        filters=filters,
        result=result,
        outcomes=OUTCOMES,
        all_purposes=PURPOSES,
        export_query=urlencode({k: v for k, v in filters.items() if v}),
    )


@router.get("/audit/trace/{trace_id}")
async def audit_trace(trace_id: str, request: Request, ctx: Console) -> Response:
    """A record and every record of its trace, in time order, one lane per institution."""
    result = await ctx.api.get("/api/v1/audit/events", {"trace_id": trace_id[:32], "page_size": 500})
    events = sorted(result.body.get("events", []), key=lambda e: (e["occurred"], e["sequence"])) if result.ok else []
    organizations = list(dict.fromkeys(e["organization_id"] for e in events))
    return page(
        ctx,
        "trace.html",
        trace_id=trace_id[:32],
        result=result,
        events=events,
        organizations=organizations,
        selected=request.query_params.get("event", ""),
    )


def _bars(rows: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """Horizontal bar geometry for an SVG chart (no script, no inline style)."""
    top = max((count for _, count in rows), default=0) or 1
    return [
        {"label": label, "count": count, "width": max(2, round(400 * count / top)), "y": i * 24}
        for i, (label, count) in enumerate(rows)
    ]


@router.get("/audit/overview")
async def audit_overview(request: Request, ctx: Console) -> Response:
    """Chain verification, the latest checkpoint, and charts of volumes, denials and break-glass."""
    since = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)).replace(microsecond=0).isoformat()
    verification = await ctx.api.get("/api/v1/audit/verification")
    checkpoint = await ctx.api.get("/api/v1/audit/checkpoint")
    volumes = await ctx.api.get("/api/v1/audit/reports/volumes", {"since": since})
    denied = await ctx.api.get("/api/v1/audit/reports/denied", {"since": since, "page_size": 500})
    broken_glass = await ctx.api.get("/api/v1/audit/reports/break-glass", {"since": since, "page_size": 500})
    per_org_day: dict[tuple[str, str], int] = defaultdict(int)
    for row in volumes.body.get("rows", []) if volumes.ok else []:
        per_org_day[(row["day"], row["organization_id"] or "—")] += row["count"]
    volume_bars = _bars([(f"{day} {org}", n) for (day, org), n in sorted(per_org_day.items())])

    def per_day(result: Any) -> list[dict[str, Any]]:
        days: dict[str, int] = defaultdict(int)
        for event in result.body.get("events", []) if result.ok else []:
            days[event["occurred"][:10]] += 1
        return _bars(sorted(days.items()))

    return page(
        ctx,
        "overview.html",
        verification=verification,
        checkpoint=checkpoint,
        volumes=volumes,
        volume_bars=volume_bars,
        denied_bars=per_day(denied),
        break_glass_bars=per_day(broken_glass),
        denied=denied,
        break_glass=broken_glass,
    )


@router.get("/audit/patient-access")
async def patient_access(request: Request, ctx: Console) -> Response:
    """Every access to one patient's records (the patient access report)."""
    filters = _filters(request, ("patient_domain", "patient_local_id", "since", "until"))
    result = None
    if filters["patient_local_id"]:
        result = await ctx.api.get("/api/v1/audit/events", {**filters, "page_size": 200})
    return page(ctx, "patient_access.html", filters=filters, result=result)


@router.get("/audit/registrations")
async def registrations_then_reads(request: Request, ctx: Console) -> Response:
    """Beside the patient access report: per organisation, its registrations followed by reads
    of other organisations' documents about the same people, the share of those people it had no
    prior encounter with, and the outliers (30 days unless a range is given)."""
    filters = _filters(request, ("since", "until", "organization_id"))
    if not filters["since"]:
        since = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
        filters["since"] = since.replace(microsecond=0).isoformat()
    result = await ctx.api.get("/api/v1/audit/reports/registrations-then-reads", filters)
    return page(ctx, "registrations.html", filters=filters, result=result)


@router.get("/audit/export.csv")
async def audit_export(request: Request, ctx: Console) -> Response:
    """The API's CSV export of the same search, handed to the browser as a download."""
    result = await ctx.api.get("/api/v1/audit/events.csv", _filters(request, AUDIT_FILTERS))
    if not result.ok:
        return page(ctx, "message.html", status=result.status, title_key="common.error", detail=result.error)
    return Response(
        result.content,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="audit-events.csv"'},
    )


# -- data steward ----------------------------------------------------------------------------


def _agreement_rows(task: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, agreement in sorted(task.get("fields", {}).items()):
        rows.append({"field": name, "level": agreement["level"], "weight": agreement["weight"]})
    return rows


@router.get("/steward")
async def steward_queue(request: Request, ctx: Console) -> Response:
    """The review queue: both records side by side, per-field agreement and score."""
    assigned = request.query_params.get("assigned", "any")
    assigned = assigned if assigned in {"any", "me", "nobody"} else "any"
    # A platform steward's queue is the whole region's: it pages (oldest first).
    result = await ctx.api.get(
        "/api/v1/mpi/review-tasks",
        {"assigned": assigned, "page_size": 50, "page_token": request.query_params.get("page_token", "")[:200]},
    )
    tasks = [{**task, "agreement": _agreement_rows(task)} for task in result.body.get("tasks", [])] if result.ok else []
    next_page = (
        urlencode({"assigned": assigned, "page_token": result.body["next_page_token"]})
        if result.ok and result.body.get("next_page_token")
        else ""
    )
    return page(ctx, "steward.html", result=result, tasks=tasks, assigned=assigned, next_page=next_page)


# A confirmation page carries a fresh key; submitting it twice sends the same Idempotency-Key, so
# the API answers the second submission with the first answer instead of changing twice.
_REQUEST_KEY = re.compile(r"[A-Za-z0-9_-]{16,64}")


def _new_request_key() -> str:
    return secrets.token_urlsafe(24)


def _request_key(form: Mapping[str, str]) -> str:
    key = form.get("request_key", "")
    return f"console-{key}" if _REQUEST_KEY.fullmatch(key) else ""


async def _task_action(request: Request, ctx: ConsoleContext, method: str, path: str, json: Any = None) -> Response:
    await checked_form(request, ctx)
    result = await ctx.api.call(method, path, json=json) if json is not None else await ctx.api.call(method, path)
    if not result.ok:
        return page(ctx, "message.html", status=result.status, title_key="common.error", detail=result.error)
    return RedirectResponse("/console/steward?assigned=me&done=1", status_code=303)


@router.post("/steward/tasks/{task_id}/claim")
async def claim_task(task_id: str, request: Request, ctx: Console) -> Response:
    return await _task_action(request, ctx, "POST", f"/api/v1/mpi/review-tasks/{task_id[:64]}/assignment")


@router.post("/steward/tasks/{task_id}/release")
async def release_task(task_id: str, request: Request, ctx: Console) -> Response:
    return await _task_action(request, ctx, "DELETE", f"/api/v1/mpi/review-tasks/{task_id[:64]}/assignment")


@router.post("/steward/tasks/{task_id}/decision")
async def decide_task(task_id: str, request: Request, ctx: Console) -> Response:
    """Two steps: the decision button leads to a confirmation; the confirmation decides."""
    form = await checked_form(request, ctx)
    decision = form.get("decision", "")
    if decision not in {"same", "different"}:
        return page(ctx, "message.html", status=400, title_key="common.error", detail="decision")
    if form.get("confirmed") != "yes":
        return page(
            ctx,
            "confirm.html",
            question_key="steward.confirm_decision",
            action=f"/console/steward/tasks/{task_id[:64]}/decision",
            fields={"decision": decision, "confirmed": "yes", "request_key": _new_request_key()},
            summary=[("steward.same" if decision == "same" else "steward.different", task_id[:64])],
        )
    result = await ctx.api.post(
        f"/api/v1/mpi/review-tasks/{task_id[:64]}/decision",
        {"decision": decision},
        idempotency_key=_request_key(form),
    )
    if not result.ok:
        return page(ctx, "message.html", status=result.status, title_key="common.error", detail=result.error)
    return RedirectResponse("/console/steward?assigned=me&done=1", status_code=303)


@router.get("/steward/history")
async def link_history(request: Request, ctx: Console) -> Response:
    """Every link change of a record's person: a platform steward names any domain, a hospital's
    administrator its own records (the API decides what each may see)."""
    filters = _filters(request, ("domain", "local_id"))
    result = None
    if filters["local_id"]:
        result = await ctx.api.get(
            f"/api/v1/patients/{quote(filters['local_id'], safe='')}/link-history", {"domain": filters["domain"]}
        )
    return page(ctx, "history.html", filters=filters, result=result)


_LINK_FIELDS = ("domain", "local_id", "target_domain", "target_local_id")


@router.get("/steward/link")
async def link_form(request: Request, ctx: Console) -> Response:
    return page(ctx, "link.html", filters=_filters(request, _LINK_FIELDS))


@router.post("/steward/link")
async def link(request: Request, ctx: Console) -> Response:
    """A platform steward joins a record (any domain) to the person of another record, e.g. two
    records of one hospital found to be one person, after a confirmation. (Retiring a duplicate
    local id is a merge: the hospital's own act, below.)"""
    form = await checked_form(request, ctx)
    chosen = {name: form.get(name, "").strip()[:64] for name in _LINK_FIELDS}
    if not all(chosen.values()):
        return page(ctx, "message.html", status=400, title_key="common.error", detail={"reason": "record-missing"})
    if form.get("confirmed") != "yes":
        return page(
            ctx,
            "confirm.html",
            question_key="steward.confirm_link",
            action="/console/steward/link",
            fields={**chosen, "confirmed": "yes"},
            summary=[
                ("steward.record", f"{chosen['domain']} / {chosen['local_id']}"),
                ("steward.target", f"{chosen['target_domain']} / {chosen['target_local_id']}"),
            ],
        )
    result = await ctx.api.call(
        "POST",
        f"/api/v1/patients/{quote(chosen['local_id'], safe='')}/link",
        params={"domain": chosen["domain"]},
        json={"target": {"domain": chosen["target_domain"], "local_id": chosen["target_local_id"]}},
    )
    if not result.ok:
        return page(ctx, "message.html", status=result.status, title_key="common.error", detail=result.error)
    return page(ctx, "message.html", title_key="common.done", detail="")


@router.post("/steward/unlink")
async def unlink(request: Request, ctx: Console) -> Response:
    """A platform steward takes a record (any domain) out of its person, after a confirmation."""
    form = await checked_form(request, ctx)
    domain, local_id = form.get("domain", "").strip()[:64], form.get("local_id", "").strip()[:64]
    if not domain or not local_id:
        return page(ctx, "message.html", status=400, title_key="common.error", detail={"reason": "record-missing"})
    if form.get("confirmed") != "yes":
        return page(
            ctx,
            "confirm.html",
            question_key="steward.confirm_unlink",
            action="/console/steward/unlink",
            fields={"domain": domain, "local_id": local_id, "confirmed": "yes"},
            summary=[("steward.record", f"{domain} / {local_id}")],
        )
    result = await ctx.api.call(
        "POST", f"/api/v1/patients/{quote(local_id, safe='')}/unlink", params={"domain": domain}
    )
    if not result.ok:
        return page(ctx, "message.html", status=result.status, title_key="common.error", detail=result.error)
    return page(ctx, "message.html", title_key="common.done", detail="")


# -- a hospital's administrator: its own duplicate records -------------------------------------


@router.get("/records/merge")
async def merge_form(request: Request, ctx: Console) -> Response:
    return page(ctx, "merge.html")


@router.post("/records/merge")
async def merge(request: Request, ctx: Console) -> Response:
    """A hospital retires a duplicate local record into the surviving one (ADT^A40: only a
    hospital merges, and only its own records), after a confirmation."""
    form = await checked_form(request, ctx)
    survivor, subsumed = form.get("survivor_local_id", "")[:64], form.get("subsumed_local_id", "")[:64]
    if form.get("confirmed") != "yes":
        return page(
            ctx,
            "confirm.html",
            question_key="steward.confirm_merge",
            action="/console/records/merge",
            fields={
                "survivor_local_id": survivor,
                "subsumed_local_id": subsumed,
                "confirmed": "yes",
                "request_key": _new_request_key(),
            },
            summary=[("steward.survivor", survivor), ("steward.subsumed", subsumed)],
        )
    result = await ctx.api.post(
        "/api/v1/patients/merge",
        {"survivor_local_id": survivor, "subsumed_local_id": subsumed},
        idempotency_key=_request_key(form),
    )
    if not result.ok:
        return page(ctx, "message.html", status=result.status, title_key="common.error", detail=result.error)
    return page(ctx, "message.html", title_key="common.done", detail="")


@router.post("/records/unmerge")
async def unmerge(request: Request, ctx: Console) -> Response:
    form = await checked_form(request, ctx)
    local_id = form.get("local_id", "")[:64]
    if form.get("confirmed") != "yes":
        return page(
            ctx,
            "confirm.html",
            question_key="steward.confirm_unmerge",
            action="/console/records/unmerge",
            fields={"local_id": local_id, "confirmed": "yes", "request_key": _new_request_key()},
            summary=[("steward.local_id", local_id)],
        )
    result = await ctx.api.post(
        f"/api/v1/patients/{quote(local_id, safe='')}/unmerge", idempotency_key=_request_key(form)
    )
    if not result.ok:
        return page(ctx, "message.html", status=result.status, title_key="common.error", detail=result.error)
    return page(ctx, "message.html", title_key="common.done", detail="")


# -- clinician -------------------------------------------------------------------------------


@router.get("/clinician")
async def find_patient(request: Request, ctx: Console) -> Response:
    """Find a patient by demographics (PDQ)."""
    filters = _filters(request, ("family", "given", "birth_date", "gender", "national_id", "phone"))
    result = None
    if any(filters.values()):
        result = await ctx.api.get("/api/v1/patients/search", {**filters, "limit": 20})
    return page(ctx, "clinician.html", filters=filters, result=result)


@router.get("/clinician/documents")
async def patient_documents(request: Request, ctx: Console) -> Response:
    """The patient's shared documents across the region, consent applied by the registry."""
    filters = _filters(request, ("domain", "local_id"))
    result = await ctx.api.get(
        "/api/v1/documents", {"patient_local_id": filters["local_id"], "patient_domain": filters["domain"]}
    )
    return page(ctx, "documents.html", filters=filters, result=result)


def _screen_purpose(request: Request, ctx: ConsoleContext) -> str:
    """A document opened from a referral or a consultation is read for that purpose (`?purpose=`),
    when the person's role may act for it; otherwise for the purpose chosen in the header."""
    wanted = request.query_params.get("purpose", "")
    return wanted if wanted in users.allowed_purposes(ctx.user.role) else ""


def cda_sections(content: bytes) -> tuple[str, list[tuple[str, str]]]:
    """Title and (section title, text) pairs of a CDA document; the text only, never markup."""
    root = ET.fromstring(content)  # noqa: S314 - expat refuses external entities; output is text only
    title = "".join(root.findtext(f"{_CDA}title") or "")
    sections = []
    for section in root.iter(f"{_CDA}section"):
        heading = section.findtext(f"{_CDA}title") or ""
        text_node = section.find(f"{_CDA}text")
        text = " ".join("".join(text_node.itertext()).split()) if text_node is not None else ""
        sections.append((heading, text))
    return title, sections


@router.get("/clinician/documents/{document_id}")
async def view_document(document_id: str, request: Request, ctx: Console) -> Response:
    """Text and CDA shown as text in the page; PDF opened by the browser's own viewer."""
    purpose = _screen_purpose(request, ctx)
    entry = await ctx.api.get(f"/api/v1/documents/{document_id[:64]}", purpose=purpose)
    if not entry.ok:
        return page(ctx, "message.html", status=entry.status, title_key="common.error", detail=entry.error)
    mime = entry.body.get("mime_type", "")
    text, cda = "", None
    if mime != "application/pdf":
        content = await ctx.api.get(f"/api/v1/documents/{document_id[:64]}/content", purpose=purpose)
        if not content.ok:
            return page(ctx, "message.html", status=content.status, title_key="common.error", detail=content.error)
        if mime in {"text/xml", "application/xml", "application/hl7-cda+xml"}:
            try:
                cda = cda_sections(content.content)
            except ET.ParseError:
                cda = None
        if cda is None:
            text = content.content.decode("utf-8", errors="replace")
    return page(ctx, "viewer.html", entry=entry.body, text=text, cda=cda, purpose_query=purpose)


@router.get("/clinician/documents/{document_id}/content")
async def document_content(document_id: str, request: Request, ctx: Console) -> Response:
    """The content as the browser opens it (PDF), sandboxed: no script runs in it."""
    content = await ctx.api.get(f"/api/v1/documents/{document_id[:64]}/content", purpose=_screen_purpose(request, ctx))
    if not content.ok:
        return page(ctx, "message.html", status=content.status, title_key="common.error", detail=content.error)
    media_type = content.headers.get("content-type", "application/octet-stream")
    # Only a PDF opens in the browser; anything else (HTML a hospital registered, say) downloads.
    disposition = "inline" if media_type.split(";")[0] == "application/pdf" else "attachment"
    return Response(
        content.content,
        media_type=media_type,
        headers={"Content-Security-Policy": "sandbox; default-src 'none'", "Content-Disposition": disposition},
    )


# -- the organisation's administrator: users -------------------------------------------------


def _admin_only(ctx: ConsoleContext) -> Response | None:
    if ctx.user.role != "admin":
        return page(ctx, "message.html", status=403, title_key="common.error", detail="admin")
    return None


@router.get("/users")
async def list_users(request: Request, ctx: Console) -> Response:
    if (refused := _admin_only(ctx)) is not None:
        return refused
    async with request.app.state.sessions() as db:
        people = await users.store.users_of(db, ctx.org.id)
    return page(ctx, "users.html", people=people, roles=users.roles_for(ctx.org.type), password="")


@router.post("/users")
async def change_users(request: Request, ctx: Console) -> Response:
    """Add, disable, enable or reset the password of a person of the administrator's organisation."""
    if (refused := _admin_only(ctx)) is not None:
        return refused
    form = await checked_form(request, ctx)
    action, username = form.get("action", ""), form.get("username", "").strip()[:64]
    password = ""
    try:
        async with request.app.state.sessions() as db, db.begin():
            if action == "add":
                password = users.generate_password()
                await users.add_user(
                    db,
                    org_id=ctx.org.id,
                    username=username,
                    display_name=form.get("display_name", "").strip(),
                    role=form.get("role", ""),
                    department=form.get("department", "").strip(),
                    password=password,
                )
            elif action in {"disable", "enable"}:
                await users.set_status(
                    db, org_id=ctx.org.id, username=username, status="active" if action == "enable" else "disabled"
                )
            elif action == "reset":
                password = users.generate_password()
                await users.reset_password(db, org_id=ctx.org.id, username=username, password=password)
    except DomainError as exc:
        return page(ctx, "message.html", status=400, title_key="common.error", detail={"reason": exc.reason})
    async with request.app.state.sessions() as db:
        people = await users.store.users_of(db, ctx.org.id)
    return page(ctx, "users.html", people=people, roles=users.roles_for(ctx.org.type), password=password)
