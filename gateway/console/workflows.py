"""The clinician's referral (双向转诊) and consultation (远程会诊) screens: worklists, the request
forms, following one with its history and the moves the person's side and role may make, the
returned outcome or report. Every call goes to the same REST routes a hospital system uses
(routes/workflows.py, referrals.py, teleconsult.py, documents.py), as the signed-in person, with the
purpose of use of the screen (referral / consultation) when the person's role may act for it."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from gateway.console import users
from gateway.console.api import ApiResult
from gateway.console.pages import _new_request_key, _request_key
from gateway.console.state import console_state
from gateway.console.web import Console, ConsoleContext, checked_form, page
from services.shared.errors import DomainError
from services.teleconsult import report as report_model

router = APIRouter(prefix="/console", include_in_schema=False)

REFERRAL_STATES = (
    "requested",
    "received",
    "on_hold",
    "accepted",
    "scheduled",
    "arrived",
    "in_progress",
    "no_show",
    "completed",
    "closed",
    "rejected",
    "cancel_requested",
    "cancelled",
)
CONSULTATION_STATES = (
    "requested",
    "assigned",
    "scheduled",
    "in_session",
    "in_review",
    "information_requested",
    "report_preliminary",
    "report_final",
    "closed",
    "declined",
    "cancelled",
)
URGENCIES = ("routine", "urgent", "emergency")
REFERRAL_SERVICES = ("outpatient", "admission", "examination", "rehabilitation")
REJECTION_CODES = ("duplicate", "inappropriate", "incomplete", "no-capacity", "patient-choice")
CONSULTATION_KINDS = ("imaging", "ecg", "pathology", "ultrasound", "specialist", "multidisciplinary")
MODES = ("asynchronous", "interactive")
DECLINE_CODES = ("no-capacity", "outside-scope", "insufficient-material", "not-qualified", "patient-unsuitable")
# What a nurse may move (the referral service's own rule, services/referral/servicer.py); a
# doctor makes every move of their side. The screen offers only those; the service decides.
NURSE_REFERRAL_MOVES = frozenset({"arrive", "no-show", "start", "note"})
# Consultation moves made on the detail page's forms (the report has its own form).
CONSULTATION_FORM_MOVES = (
    "record-consent",
    "accept",
    "decline",
    "schedule",
    "start-review",
    "start-session",
    "request-information",
    "provide-information",
    "close",
    "cancel",
)
REPORT_MOVES = frozenset({"preliminary", "sign", "amend"})
# The outcome a clinician writes in the console is registered as a discharge summary (LOINC).
OUTCOME_TYPE = {"system": "http://loinc.org", "code": "18842-5", "display": "出院小结"}
_LIMITS = {"reason": 2000, "advice": 2000, "text": 8000, "summary": 4000}


def _purpose(ctx: ConsoleContext, wanted: str) -> str:
    """The screen's purpose of use when the person's role may act for it, else the chosen one."""
    return wanted if wanted in users.allowed_purposes(ctx.user.role) else ctx.session.purpose_of_use


def _choice(value: str, allowed: tuple[str, ...] | frozenset[str], default: str = "") -> str:
    return value if value in allowed else default


def _text(form: Mapping[str, str], name: str, limit: int = 64) -> str:
    return form.get(name, "").strip()[:limit]


def _error(ctx: ConsoleContext, result: ApiResult) -> Response:
    return page(ctx, "message.html", status=result.status, title_key="common.error", detail=result.error)


async def _own_documents(ctx: ConsoleContext, local_id: str, purpose: str) -> list[dict[str, Any]]:
    """The patient's documents the person's own organisation registered (those it may attach)."""
    if not local_id:
        return []
    result = await ctx.api.get(
        "/api/v1/documents", {"patient_local_id": local_id, "patient_domain": ctx.org.id}, purpose=purpose
    )
    if not result.ok:
        return []
    return [d for d in result.body.get("entries", []) if d.get("source_organization_id") == ctx.org.id]


def _document_ids(request_form: Any) -> list[str]:
    return [v[:64] for v in request_form.getlist("document_ids") if isinstance(v, str) and v][:20]


# -- referrals -------------------------------------------------------------------------------


@router.get("/referrals")
async def referral_worklist(request: Request, ctx: Console) -> Response:
    """Outgoing or incoming referrals of the person's organisation, by state, newest first."""
    box = _choice(request.query_params.get("box", ""), ("incoming", "outgoing"), "incoming")
    state = _choice(request.query_params.get("state", ""), REFERRAL_STATES)
    result = await ctx.api.get(
        "/api/v1/referrals",
        {
            "box": box,
            "state": state,
            "page_size": 50,
            "page_token": request.query_params.get("page_token", "")[:20],
        },
        purpose=_purpose(ctx, "referral"),
    )
    return page(ctx, "referrals.html", box=box, state=state, states=REFERRAL_STATES, result=result)


def _referral_form_values(form: Mapping[str, str]) -> dict[str, str]:
    return {
        "local_id": _text(form, "local_id"),
        "target_organization_id": _text(form, "target_organization_id"),
        "service": _choice(form.get("service", ""), REFERRAL_SERVICES, "outpatient"),
        "urgency": _choice(form.get("urgency", ""), URGENCIES, "routine"),
        "target_department": _text(form, "target_department"),
        "reason": _text(form, "reason", 2000),
        "diagnosis_code": _text(form, "diagnosis_code", 16),
        "diagnosis_text": _text(form, "diagnosis_text", 200),
        "clinical_summary": _text(form, "clinical_summary", 4000),
        "contact": _text(form, "contact", 200),
    }


async def _referral_form(
    ctx: ConsoleContext, values: dict[str, str], *, chosen: list[str], result: ApiResult | None = None
) -> Response:
    documents = await _own_documents(ctx, values["local_id"], _purpose(ctx, "referral"))
    return page(
        ctx,
        "referral_new.html",
        status=result.status if result is not None and not result.ok else 200,
        values=values,
        documents=documents,
        chosen=chosen,
        services=REFERRAL_SERVICES,
        urgencies=URGENCIES,
        request_key=_new_request_key(),
        result=result,
    )


@router.get("/referrals/new")
async def new_referral_form(request: Request, ctx: Console) -> Response:
    """A referral for a patient of the person's organisation (found on the search screen)."""
    values = _referral_form_values({k: v for k, v in request.query_params.items()})
    return await _referral_form(ctx, values, chosen=[])


@router.post("/referrals/new")
async def create_referral(request: Request, ctx: Console) -> Response:
    form = await checked_form(request, ctx)
    values = _referral_form_values(form)
    chosen = _document_ids(await request.form())
    body: dict[str, Any] = {
        "patient_local_id": values["local_id"],
        "target_organization_id": values["target_organization_id"],
        "service": values["service"],
        "urgency": values["urgency"],
        "target_department": values["target_department"],
        "reason": values["reason"],
        "clinical_summary": values["clinical_summary"],
        "contact": values["contact"],
        "document_ids": chosen,
    }
    if values["diagnosis_code"]:
        body["diagnosis"] = {"code": values["diagnosis_code"], "text": values["diagnosis_text"]}
    result = await ctx.api.post(
        "/api/v1/referrals", body, idempotency_key=_request_key(form), purpose=_purpose(ctx, "referral")
    )
    if not result.ok:
        # The form again, as filled, with the API's reason (e.g. referral-diagnosis).
        return await _referral_form(ctx, values, chosen=chosen, result=result)
    return RedirectResponse(f"/console/referrals/{quote(result.body['referral_id'], safe='')}", status_code=303)


def _referral_moves(ctx: ConsoleContext, referral: dict[str, Any]) -> list[str]:
    allowed = [m for m in referral.get("allowed_moves", []) if m != "decline"]
    if ctx.user.role == "doctor":
        return allowed
    if ctx.user.role == "nurse":
        return [m for m in allowed if m in NURSE_REFERRAL_MOVES]
    return []


@router.get("/referrals/{referral_id}")
async def follow_referral(referral_id: str, request: Request, ctx: Console) -> Response:
    """One referral: its details, state history, outcome, and the moves the person may make."""
    purpose = _purpose(ctx, "referral")
    result = await ctx.api.get(f"/api/v1/referrals/{quote(referral_id[:64], safe='')}", purpose=purpose)
    if not result.ok:
        return _error(ctx, result)
    referral = result.body
    moves = _referral_moves(ctx, referral)
    slots: list[dict[str, Any]] = []
    if "schedule" in moves and referral.get("service") != "admission":
        free = await ctx.api.get(
            "/api/v1/referral-slots",
            {"organization_id": ctx.org.id, "free": "true", "department": referral.get("target_department", "")},
            purpose=purpose,
        )
        slots = free.body.get("slots", []) if free.ok else []
    return page(
        ctx,
        "referral.html",
        r=referral,
        moves=moves,
        slots=slots,
        rejection_codes=REJECTION_CODES,
        request_key=_new_request_key(),
        outgoing=referral["requester_organization_id"] == ctx.org.id,
        done=request.query_params.get("done", "")[:32],
    )


async def _register_outcome(ctx: ConsoleContext, form: Mapping[str, str], key: str) -> ApiResult:
    """The outcome the clinician wrote, registered as their organisation's document for the
    patient's record there (the same POST /api/v1/documents a hospital system makes)."""
    content = form.get("outcome_text", "").strip()[:20000].encode("utf-8")
    source_id = f"console-outcome-{hashlib.sha256(key.encode()).hexdigest()[:24]}" if key else ""
    return await ctx.api.post(
        "/api/v1/documents",
        {
            "source_document_id": source_id or f"console-outcome-{_new_request_key()}",
            "patient_local_id": _text(form, "outcome_local_id"),
            "type": OUTCOME_TYPE,
            "title": _text(form, "outcome_title", 256) or OUTCOME_TYPE["display"],
            "mime_type": "text/plain",
            "sha256": hashlib.sha256(content).hexdigest(),
            "size": len(content),
            "content_base64": base64.b64encode(content).decode(),
            "author": {
                "practitioner_id": ctx.user.username,
                "practitioner_name": ctx.user.display_name,
                "role": ctx.user.role,
                "department": ctx.user.department,
            },
        },
        idempotency_key=f"{key}-outcome" if key else "",
        purpose=_purpose(ctx, "referral"),
    )


@router.post("/referrals/{referral_id}/move")
async def move_referral(referral_id: str, request: Request, ctx: Console) -> Response:
    """One move (accept, reject, schedule, arrive, complete, cancel, …) through the move route."""
    form = await checked_form(request, ctx)
    move = form.get("move", "")
    rid = quote(referral_id[:64], safe="")
    key = _request_key(form)
    body: dict[str, Any] = {
        "reason": _text(form, "reason", 2000),
        "rejection_code": _text(form, "rejection_code", 32),
        "advice": _text(form, "advice", 2000),
        "slot_id": _text(form, "slot_id"),
        "bed_department": _text(form, "bed_department"),
        "outcome_document_id": _text(form, "outcome_document_id"),
    }
    if move == "complete" and not body["outcome_document_id"] and form.get("outcome_text", "").strip():
        registered = await _register_outcome(ctx, form, key)
        if not registered.ok:
            return _error(ctx, registered)
        body["outcome_document_id"] = registered.body["document_id"]
    body = {k: v for k, v in body.items() if v}
    result = await ctx.api.call(
        "POST",
        f"/api/v1/referrals/{rid}/{quote(move[:32], safe='')}",
        json=body,
        idempotency_key=key,
        purpose=_purpose(ctx, "referral"),
    )
    if not result.ok:
        return _error(ctx, result)
    return RedirectResponse(f"/console/referrals/{rid}?done={quote(move[:32], safe='')}", status_code=303)


# -- consultations ---------------------------------------------------------------------------


@router.get("/consultations")
async def consultation_worklist(request: Request, ctx: Console) -> Response:
    """Requested (outgoing) or received (incoming) consultations, by state; `mine` narrows the
    incoming list to those assigned to the person."""
    box = _choice(request.query_params.get("box", ""), ("incoming", "outgoing"), "incoming")
    state = _choice(request.query_params.get("state", ""), CONSULTATION_STATES)
    mine = box == "incoming" and request.query_params.get("mine") == "1"
    result = await ctx.api.get(
        "/api/v1/consultations",
        {
            "box": box,
            "state": state,
            "practitioner_id": ctx.user.username if mine else "",
            "page_size": 50,
            "page_token": request.query_params.get("page_token", "")[:16],
        },
        purpose=_purpose(ctx, "consultation"),
    )
    return page(ctx, "consultations.html", box=box, state=state, mine=mine, states=CONSULTATION_STATES, result=result)


def _consultation_form_values(form: Mapping[str, str]) -> dict[str, str]:
    return {
        "local_id": _text(form, "local_id"),
        "consultant_organization_id": _text(form, "consultant_organization_id"),
        "kind": _choice(form.get("kind", ""), CONSULTATION_KINDS, "specialist"),
        "mode": _choice(form.get("mode", ""), MODES, "asynchronous"),
        "urgency": _choice(form.get("urgency", ""), URGENCIES, "routine"),
        "question": _text(form, "question", 4000),
        "purpose": _text(form, "purpose", 2000),
        "summary": _text(form, "summary", 20000),
        "department": _text(form, "department"),
        "invited_practitioner_id": _text(form, "invited_practitioner_id"),
    }


async def _consultation_form(
    ctx: ConsoleContext, values: dict[str, str], *, chosen: list[str], result: ApiResult | None = None
) -> Response:
    purpose = _purpose(ctx, "consultation")
    documents = await _own_documents(ctx, values["local_id"], purpose)
    specialists: list[dict[str, Any]] = []
    if values["consultant_organization_id"]:
        # The consulting organisation's specialist directory, for the type asked.
        found = await ctx.api.get(
            f"/api/v1/organizations/{quote(values['consultant_organization_id'], safe='')}/specialists",
            {"kind": values["kind"]},
            purpose=purpose,
        )
        specialists = found.body.get("specialists", []) if found.ok else []
    return page(
        ctx,
        "consultation_new.html",
        status=result.status if result is not None and not result.ok else 200,
        values=values,
        documents=documents,
        chosen=chosen,
        specialists=specialists,
        kinds=CONSULTATION_KINDS,
        modes=MODES,
        urgencies=URGENCIES,
        request_key=_new_request_key(),
        result=result,
    )


@router.get("/consultations/new")
async def new_consultation_form(request: Request, ctx: Console) -> Response:
    """The application form (申请单) for a patient of the person's organisation; naming the
    consulting organisation first lists its specialists for the type."""
    values = _consultation_form_values({k: v for k, v in request.query_params.items()})
    return await _consultation_form(ctx, values, chosen=[])


@router.post("/consultations/new")
async def request_consultation(request: Request, ctx: Console) -> Response:
    form = await checked_form(request, ctx)
    values = _consultation_form_values(form)
    chosen = _document_ids(await request.form())
    body = {
        "patient_local_id": values["local_id"],
        "consultant_organization_id": values["consultant_organization_id"],
        "kind": values["kind"],
        "mode": values["mode"],
        "urgency": values["urgency"],
        "question": values["question"],
        "purpose": values["purpose"],
        "summary": values["summary"],
        "department": values["department"],
        "invited_practitioner_id": values["invited_practitioner_id"],
        "document_ids": chosen,
    }
    result = await ctx.api.post(
        "/api/v1/consultations", body, idempotency_key=_request_key(form), purpose=_purpose(ctx, "consultation")
    )
    if not result.ok:
        return await _consultation_form(ctx, values, chosen=chosen, result=result)
    return RedirectResponse(f"/console/consultations/{quote(result.body['consultation_id'], safe='')}", status_code=303)


def _verified(version: dict[str, Any]) -> bool:
    """Whether a report version's signature verifies over its DiagnosticReport (shown beside it)."""
    if not version.get("signature") or not version.get("diagnostic_report"):
        return False
    try:
        report_model.verify(version["diagnostic_report"], version["signature"])
    except DomainError:
        return False
    return True


@router.get("/consultations/{consultation_id}")
async def follow_consultation(consultation_id: str, request: Request, ctx: Console) -> Response:
    """One consultation: the request, its history and messages, the report versions (with their
    signature checked), and the moves of the person's side."""
    purpose = _purpose(ctx, "consultation")
    cid = quote(consultation_id[:64], safe="")
    result = await ctx.api.get(f"/api/v1/consultations/{cid}", purpose=purpose)
    if not result.ok:
        return _error(ctx, result)
    c = result.body
    allowed = c.get("allowed_moves", []) if ctx.user.role in {"doctor", "nurse"} else []
    requester = c["requester_organization_id"] == ctx.org.id
    versions: list[dict[str, Any]] = []
    report_error: ApiResult | None = None
    if c.get("report_version"):
        reported = await ctx.api.get(f"/api/v1/consultations/{cid}/report", purpose=purpose)
        if reported.ok:
            versions = [{**v, "verified": _verified(v)} for v in reported.body.get("versions", [])]
        else:
            report_error = reported
    evidence = await _own_documents(ctx, c["patient"]["local_id"], purpose) if "record-consent" in allowed else []
    slots: list[dict[str, Any]] = []
    if "schedule" in allowed:
        free = await ctx.api.get(
            f"/api/v1/organizations/{quote(ctx.org.id, safe='')}/consultation-slots", {"free": "true"}, purpose=purpose
        )
        slots = free.body.get("slots", []) if free.ok else []
    return page(
        ctx,
        "consultation.html",
        c=c,
        moves=[m for m in CONSULTATION_FORM_MOVES if m in allowed],
        report_moves=[m for m in ("preliminary", "sign", "amend") if m in allowed and ctx.user.role == "doctor"],
        requester=requester,
        versions=versions,
        report_error=report_error,
        evidence=evidence,
        slots=slots,
        decline_codes=DECLINE_CODES,
        request_key=_new_request_key(),
        done=request.query_params.get("done", "")[:32],
    )


@router.post("/consultations/{consultation_id}/move")
async def move_consultation(consultation_id: str, request: Request, ctx: Console) -> Response:
    """One move of the consultation (consent, accept, decline, schedule, review, cancel, close…)."""
    form = await checked_form(request, ctx)
    raw = await request.form()
    move = _choice(form.get("move", ""), CONSULTATION_FORM_MOVES)
    cid = quote(consultation_id[:64], safe="")
    body: dict[str, Any] = {
        "reason": _text(form, "reason", 2000),
        "decline_code": _text(form, "decline_code", 32),
        "text": _text(form, "text", 8000),
        "slot_ids": [v[:64] for v in raw.getlist("slot_ids") if isinstance(v, str) and v][:20],
        "document_ids": _document_ids(raw),
    }
    if move == "record-consent":
        body["informed_consent"] = {
            "evidence_document_id": _text(form, "evidence_document_id"),
            "signer": _choice(form.get("signer", ""), ("patient", "guardian"), "patient"),
            "guardian_name": _text(form, "guardian_name"),
            "guardian_relationship": _text(form, "guardian_relationship", 32),
        }
    body = {k: v for k, v in body.items() if v}
    result = await ctx.api.call(
        "POST",
        f"/api/v1/consultations/{cid}/{move or 'none'}",
        json=body,
        idempotency_key=_request_key(form),
        purpose=_purpose(ctx, "consultation"),
    )
    if not result.ok:
        return _error(ctx, result)
    return RedirectResponse(f"/console/consultations/{cid}?done={move}", status_code=303)


@router.post("/consultations/{consultation_id}/report")
async def submit_report(consultation_id: str, request: Request, ctx: Console) -> Response:
    """The specialist's report: saved as preliminary, or signed (final, or an amendment of a final
    one). Signing renders the DiagnosticReport through report-draft, signs its canonical form
    (AssertionSigner.sign_report) and sends both with the sign / amend move."""
    form = await checked_form(request, ctx)
    action = _choice(form.get("action", ""), REPORT_MOVES)
    cid = quote(consultation_id[:64], safe="")
    purpose = _purpose(ctx, "consultation")
    content = {
        "findings": _text(form, "findings", 20000),
        "impression": _text(form, "impression", 8000),
        "recommendations": _text(form, "recommendations", 8000),
        "conclusion": _text(form, "conclusion", 8000),
    }
    body: dict[str, Any] = {"report": content}
    if action in {"sign", "amend"}:
        draft = await ctx.api.post(
            f"/api/v1/consultations/{cid}/report-draft",
            {"report": content, "amend": action == "amend"},
            purpose=purpose,
        )
        if not draft.ok:
            return _error(ctx, draft)
        resource = draft.body["diagnostic_report"]
        body = {
            "report": content,
            "diagnostic_report": resource,
            "signature": console_state(request.app).signer.sign_report(resource),
        }
    result = await ctx.api.call(
        "POST",
        f"/api/v1/consultations/{cid}/{action or 'none'}",
        json=body,
        idempotency_key=_request_key(form),
        purpose=purpose,
    )
    if not result.ok:
        return _error(ctx, result)
    return RedirectResponse(f"/console/consultations/{cid}?done={action}", status_code=303)
