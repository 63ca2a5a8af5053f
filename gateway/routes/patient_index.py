"""The master patient index beyond registration (REST): demographic search, the data stewards'
review queue and decisions, link / unlink, a hospital's merge / unmerge, link history."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import BaseModel, Field

from gateway.deps import Context, IdempotencyKey
from gateway.errors import ApiError
from gateway.routes import rpc
from gateway.routes.patients import _GENDERS, _LINK_METHODS, patient_json
from hie.common.v1 import common_pb2
from hie.mpi.v1 import mpi_pb2
from services.shared.timestamps import isoformat

router = APIRouter(prefix="/api/v1", tags=["patient index"])
_ASSIGNMENT_FILTERS = {
    "any": mpi_pb2.REVIEW_ASSIGNMENT_FILTER_ANY,
    "me": mpi_pb2.REVIEW_ASSIGNMENT_FILTER_MINE,
    "nobody": mpi_pb2.REVIEW_ASSIGNMENT_FILTER_UNASSIGNED,
}


def fields_json(fields: list[mpi_pb2.FieldAgreement]) -> dict[str, dict[str, Any]]:
    return {f.field: {"level": f.level, "weight": round(f.weight, 3)} for f in fields}


def scored_json(result: mpi_pb2.ScoredPatient) -> dict[str, Any]:
    return {
        "patient": patient_json(result.patient),
        "weight": round(result.weight, 3),
        "probability": result.probability,
        "grade": result.grade,
        "fields": fields_json(list(result.fields)),
    }


def _utc(stamp: Timestamp) -> str:
    """ISO 8601 in UTC with a bare `Z` (this API's form since it was published; the shared
    isoformat writes `+00:00`)."""
    return isoformat(stamp).removesuffix("+00:00") + "Z"


def task_json(task: mpi_pb2.ReviewTask) -> dict[str, Any]:
    return {
        "id": task.id,
        "status": task.status,
        "hold": task.hold,
        "weight": round(task.weight, 3),
        "created": _utc(task.created),
        "patient": patient_json(task.patient),
        "candidate": patient_json(task.candidate),
        "fields": fields_json(list(task.fields)),
        "assignee": (
            {
                "organization_id": task.assignee_organization_id,
                "practitioner_id": task.assignee,
                "assigned": _utc(task.assigned),
                # The claim is a lease: once it lapses another steward may take the task.
                "expires": _utc(task.assignment_expires),
                "expired": task.assignment_expired,
            }
            if task.assignee
            else None
        ),
    }


class PatientRefIn(BaseModel):
    domain: str = Field(min_length=1, max_length=64)
    local_id: str = Field(min_length=1, max_length=64)


class DecisionIn(BaseModel):
    decision: Literal["same", "different"]


class AssignIn(BaseModel):
    assignee: str = Field(default="", max_length=64, description="practitioner id; empty: the caller (claim)")
    reassign: bool = False


class LinkIn(BaseModel):
    target: PatientRefIn


class MergeIn(BaseModel):
    survivor_local_id: str = Field(min_length=1, max_length=64)
    subsumed_local_id: str = Field(min_length=1, max_length=64)


_NAME_MATCH = {
    "prefix": mpi_pb2.NAME_MATCH_PREFIX,
    "exact": mpi_pb2.NAME_MATCH_EXACT,
    "contains": mpi_pb2.NAME_MATCH_CONTAINS,
}


_SEARCH_PARAMETERS = frozenset(
    ("family", "given", "name", "birth_date", "gender", "national_id", "phone", "name_match", "limit", "page_token")
)


@router.get("/patients/search")
async def search_patients(
    ctx: Context,
    request: Request,
    family: str = Query(default="", max_length=64),
    given: str = Query(default="", max_length=64),
    name: str = Query(default="", max_length=64),
    birth_date: str = Query(default="", max_length=10),
    gender: Literal["", "male", "female", "other", "unknown"] = "",
    national_id: str = Query(default="", max_length=20),
    phone: str = Query(default="", max_length=24),
    name_match: Literal["prefix", "exact", "contains"] = "prefix",
    limit: int = Query(default=20, ge=1, le=100),
    page_token: str = Query(default="", max_length=2048),
) -> dict[str, Any]:
    """PDQ: records across the region ranked by match weight against the given demographics,
    `name_match` how family, given and name compare (FHIR string search: `prefix`, the default,
    case- and accent-insensitive on characters or pinyin; `exact`; `contains`),
    `limit` per page; `next_page_token` (sealed, carrying the search) fetches the following page
    with no other parameter needed; `total` when the search is narrow enough to count."""
    ctx.require_scope("Patient", "r")
    # A misspelt criterion (`birthdate`, `idcard`) must not be dropped silently: the search would
    # run without it and answer something else than was asked.
    unknown = sorted(set(request.query_params) - _SEARCH_PARAMETERS)
    if unknown:
        raise ApiError(
            400,
            "search-param-unknown",
            f"unknown search parameter {unknown[0][:64]!r}: one of {', '.join(sorted(_SEARCH_PARAMETERS))}",
        )
    search = mpi_pb2.SearchPatientsRequest(
        family=family,
        given=given,
        name=name,
        birth_date=birth_date,
        gender=_GENDERS.get(gender, mpi_pb2.GENDER_UNSPECIFIED),
        phone=phone,
        limit=limit,
        page_token=page_token,
        # Only on the names given: a page request (page_token alone) must not differ from the
        # search its token carries.
        family_match=_NAME_MATCH[name_match] if family else mpi_pb2.NAME_MATCH_PREFIX,
        given_match=_NAME_MATCH[name_match] if given else mpi_pb2.NAME_MATCH_PREFIX,
        name_match=_NAME_MATCH[name_match] if name else mpi_pb2.NAME_MATCH_PREFIX,
    )
    if national_id:
        search.identifier.CopyFrom(common_pb2.Identifier(type="NNCHN", value=national_id))
    result = await rpc(request.app.state.stubs.mpi.SearchPatients(search, metadata=ctx.metadata))
    page: dict[str, Any] = {
        "results": [scored_json(r) for r in result.results],
        "next_page_token": result.next_page_token,
    }
    if result.HasField("total"):
        page["total"] = result.total
    return page


@router.get("/mpi/review-tasks")
async def list_review_tasks(
    ctx: Context,
    request: Request,
    page_size: int = Query(default=50, ge=1, le=200),
    page_token: str = Query(default="", max_length=200),
    assigned: Literal["any", "me", "nobody"] = "any",
) -> dict[str, Any]:
    """Data stewards: open review tasks, oldest first, both records side by side; `assigned=me`
    the caller's own tasks, `assigned=nobody` the unclaimed ones."""
    ctx.require_scope("Patient", "r")
    result = await rpc(
        request.app.state.stubs.mpi.ListReviewTasks(
            mpi_pb2.ListReviewTasksRequest(
                page_size=page_size, page_token=page_token, assignment=_ASSIGNMENT_FILTERS[assigned]
            ),
            metadata=ctx.metadata,
        )
    )
    return {"tasks": [task_json(t) for t in result.tasks], "next_page_token": result.next_page_token}


@router.post("/mpi/review-tasks/{task_id}/decision")
async def decide_review(
    task_id: str, body: DecisionIn, ctx: Context, request: Request, key: IdempotencyKey
) -> dict[str, Any]:
    """Data stewards: the two records are the same person, or different people (remembered)."""
    ctx.require_scope("Patient", "u")
    decision = mpi_pb2.REVIEW_DECISION_SAME if body.decision == "same" else mpi_pb2.REVIEW_DECISION_DIFFERENT
    result = await rpc(
        request.app.state.stubs.mpi.DecideReview(
            mpi_pb2.DecideReviewRequest(task_id=task_id[:64], decision=decision, idempotency_key=key),
            metadata=ctx.metadata,
        )
    )
    return task_json(result.task)


@router.post("/mpi/review-tasks/{task_id}/assignment")
async def assign_review_task(
    task_id: str, ctx: Context, request: Request, key: IdempotencyKey, body: AssignIn | None = None
) -> dict[str, Any]:
    """Data stewards: claim the task (no body, or no assignee) or give it to another steward of
    the caller's organisation; a task another steward holds needs `reassign` (else 422)."""
    ctx.require_scope("Patient", "u")
    body = body or AssignIn()
    result = await rpc(
        request.app.state.stubs.mpi.AssignReviewTask(
            mpi_pb2.AssignReviewTaskRequest(
                task_id=task_id[:64], assignee=body.assignee, reassign=body.reassign, idempotency_key=key
            ),
            metadata=ctx.metadata,
        )
    )
    return task_json(result.task)


@router.delete("/mpi/review-tasks/{task_id}/assignment")
async def release_review_task(task_id: str, ctx: Context, request: Request, key: IdempotencyKey) -> dict[str, Any]:
    """Data stewards: give a task the caller holds back to the queue."""
    ctx.require_scope("Patient", "u")
    result = await rpc(
        request.app.state.stubs.mpi.ReleaseReviewTask(
            mpi_pb2.ReleaseReviewTaskRequest(task_id=task_id[:64], idempotency_key=key), metadata=ctx.metadata
        )
    )
    return task_json(result.task)


def _ref(ctx: Context, local_id: str, domain: str) -> common_pb2.PatientRef:
    return common_pb2.PatientRef(domain=domain or ctx.caller.organization_id, local_id=local_id)


@router.post("/patients/{local_id}/link")
async def link_patient(
    local_id: str,
    body: LinkIn,
    ctx: Context,
    request: Request,
    key: IdempotencyKey,
    domain: str = Query(default="", max_length=64),
) -> dict[str, Any]:
    """Data stewards: link this record to the person of the target record."""
    ctx.require_scope("Patient", "u")
    result = await rpc(
        request.app.state.stubs.mpi.LinkPatients(
            mpi_pb2.LinkPatientsRequest(
                ref=_ref(ctx, local_id, domain),
                target=common_pb2.PatientRef(domain=body.target.domain, local_id=body.target.local_id),
                idempotency_key=key,
            ),
            metadata=ctx.metadata,
        )
    )
    return patient_json(result.patient)


@router.post("/patients/{local_id}/unlink")
async def unlink_patient(
    local_id: str,
    ctx: Context,
    request: Request,
    key: IdempotencyKey,
    domain: str = Query(default="", max_length=64),
) -> dict[str, Any]:
    """Data stewards: take this record out of its person (a new enterprise id)."""
    ctx.require_scope("Patient", "u")
    result = await rpc(
        request.app.state.stubs.mpi.UnlinkPatient(
            mpi_pb2.UnlinkPatientRequest(ref=_ref(ctx, local_id, domain), idempotency_key=key), metadata=ctx.metadata
        )
    )
    return patient_json(result.patient)


@router.post("/patients/merge")
async def merge_patients(body: MergeIn, ctx: Context, request: Request, key: IdempotencyKey) -> dict[str, Any]:
    """The hospital merges two of its own records: the subsumed one is retired into the survivor."""
    ctx.require_scope("Patient", "u")
    result = await rpc(
        request.app.state.stubs.mpi.MergePatients(
            mpi_pb2.MergePatientsRequest(
                survivor_local_id=body.survivor_local_id,
                subsumed_local_id=body.subsumed_local_id,
                idempotency_key=key,
            ),
            metadata=ctx.metadata,
        )
    )
    return patient_json(result.survivor)


@router.post("/patients/{local_id}/unmerge")
async def unmerge_patient(local_id: str, ctx: Context, request: Request, key: IdempotencyKey) -> dict[str, Any]:
    """Undo the hospital's last merge of this (retired) record."""
    ctx.require_scope("Patient", "u")
    result = await rpc(
        request.app.state.stubs.mpi.UnmergePatient(
            mpi_pb2.UnmergePatientRequest(subsumed_local_id=local_id, idempotency_key=key), metadata=ctx.metadata
        )
    )
    return patient_json(result.patient)


@router.get("/patients/{local_id}/link-history")
async def link_history(
    local_id: str, ctx: Context, request: Request, domain: str = Query(default="", max_length=64)
) -> dict[str, Any]:
    """Every link change of this record and of the other records of its person."""
    ctx.require_scope("Patient", "r")
    result = await rpc(
        request.app.state.stubs.mpi.GetLinkHistory(
            mpi_pb2.GetLinkHistoryRequest(ref=_ref(ctx, local_id, domain)), metadata=ctx.metadata
        )
    )
    return {
        "enterprise_id": result.enterprise_id,
        "changes": [
            {
                "domain": c.ref.domain,
                "local_id": c.ref.local_id,
                "enterprise_id": c.enterprise_id,
                "previous_enterprise_id": c.previous_enterprise_id,
                "method": _LINK_METHODS.get(c.method, "unknown"),
                "reason": c.reason,
                "weight": round(c.weight, 3),
                "decided_by": c.decided_by,
                "at": _utc(c.at),
            }
            for c in result.changes
        ],
    }
