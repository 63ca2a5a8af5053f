"""What the referral and consultation routes accept, stated once for their request models and the
OpenAPI document: the value types JSON Schema states (date-times, FHIR ids and references, the
workflows' state names), and, per operation, the refusals it cannot state (a rule across fields,
the state of the item, the exchange's directory) as `x-hie-request-rules` (gateway/app.py); and the
parts of their JSON both workflows share (timestamps, deadline clocks, state history)."""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Literal

from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import BaseModel, BeforeValidator, ConfigDict

from services.shared.timestamps import isoformat

# Unknown fields are refused (400 invalid-request naming them), as the schema says.
STRICT_BODY = ConfigDict(extra="forbid", strict=False)

_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def _date_time_text(value: object) -> object:
    """A date-time is written as one (RFC 3339): pydantic would also take a number of seconds or a
    bare date, which the schema's `format: date-time` does not allow."""
    if isinstance(value, datetime.datetime) or (isinstance(value, str) and _DATE_TIME.match(value)):
        return value
    raise ValueError("an RFC 3339 date-time, e.g. 2026-01-31T08:00:00+08:00")


DateTime = Annotated[datetime.datetime, BeforeValidator(_date_time_text)]


def iso(ts: Timestamp) -> str | None:
    """A service's timestamp as the API writes it (None where it is unset)."""
    if not ts.seconds and not ts.nanos:
        return None
    return isoformat(ts)


class PeriodIn(BaseModel):
    """A period (a slot, a shift): it ends after it starts (the service's rule)."""

    model_config = STRICT_BODY

    start: DateTime
    end: DateTime


def clocks_json(clocks: Iterable[Any]) -> list[dict[str, Any]]:
    """An item's deadline clocks (services/shared/workflow/clocks.py)."""
    return [
        {"name": c.name, "due": iso(c.due), "paused": c.paused, "fired": c.fired, "stopped": c.stopped} for c in clocks
    ]


def history_json(history: Iterable[Any], state_name: Callable[[int], str]) -> list[dict[str, Any]]:
    """An item's state history, oldest first: each move, who made it and why."""
    return [
        {
            "move": h.move,
            "from": state_name(h.from_state),
            "to": state_name(h.to_state),
            "organization_id": h.organization_id,
            "practitioner_id": h.practitioner_id,
            "role": h.role,
            "reason": h.reason,
            "changed": iso(h.changed),
        }
        for h in history
    ]


def _whole_number(value: object) -> object:
    """A JSON integer (3 or 3.0, as JSON Schema counts them): pydantic would also take `true` or
    the string "3", which the schema's `type: integer` does not allow."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError("a whole number")


WholeNumber = Annotated[int, BeforeValidator(_whole_number)]

# The id in a `<type>/<id>` reference (uuids, organisation ids; a Schedule's
# `<organisation>.<practitioner>`): no slash. (Not `\S`: JSON Schema's ECMAScript `\s` and the
# gateway's own differ, e.g. on U+0085.)
_REFERENCE_ID = r"[^/]{1,128}"
# Text with a visible character in it: what a service's `.strip()` leaves non-empty, written out
# because ECMAScript's `\s` (the schema's) and Python's / Rust's (the gateway's) differ.
VISIBLE = "[^\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"


def reference(resource_type: str, *, optional: bool = False) -> str:
    """The pattern of a `<resource_type>/<id>` search value."""
    pattern = f"{resource_type}/{_REFERENCE_ID}"
    return f"^({pattern})?$" if optional else f"^{pattern}$"


ReferralState = Literal[
    "requested",
    "received",
    "on_hold",
    "accepted",
    "rejected",
    "scheduled",
    "cancel_requested",
    "arrived",
    "in_progress",
    "no_show",
    "completed",
    "closed",
    "cancelled",
]
ConsultationState = Literal[
    "requested",
    "assigned",
    "declined",
    "scheduled",
    "in_session",
    "in_review",
    "information_requested",
    "report_preliminary",
    "report_final",
    "closed",
    "cancelled",
]


def _enum_items(names: Any) -> dict[str, Any]:
    """The JSON Schema of a list query parameter whose items are one of a Literal's values (the
    route refuses another value itself, with its own reason)."""
    return {"items": {"type": "string", "enum": list(names.__args__)}}


REFERRAL_STATE_ITEMS = _enum_items(ReferralState)
CONSULTATION_STATE_ITEMS = _enum_items(ConsultationState)


# A FHIR status search value over referrals: a referral state, written with - or _ (FHIR's
# Task.status codes in-progress / on-hold are referral states too).
_REFERRAL_STATES = ReferralState.__args__
FHIR_REFERRAL_STATUS = "^(" + "|".join(s.replace("_", "[-_]") for s in _REFERRAL_STATES) + ")?$"

TEXT = "text without control, format, surrogate or private-use characters"
_REFERRAL_TEXT = {"referral-invalid": "free text without control characters, within its length (a rule of the service)"}
_ITEM_STATE = "the move is one the item's current state and the caller's side allow (allowed_moves says which)"
# Refusals of a referral move that depend on the move named in the path and the referral's state.
_REFERRAL_MOVE = {
    **_REFERRAL_TEXT,
    "referral-rejection-code": "reject names a rejection_code: duplicate, inappropriate, incomplete, no-capacity, "
    "patient-choice",
    "referral-bed": "scheduling an admission names a bed_department with a free bed",
    "referral-slot": "scheduling names a published free slot of the target (slot_id)",
    "referral-outcome": "outcome_document_id is this patient's document registered by the target",
    "referral-note": "a note has text",
    "if-match": 'If-Match names a referral version, e.g. W/"3"',
}
_CONSULTATION_MOVE = {
    "consultation-invalid": "the imaging studies: dot-separated digits, https WADO-RS endpoint",
    "consultation-decline-code": "decline names a decline_code the workflow knows",
    "consultation-slot-invalid": "schedule books one published slot of each assigned specialist",
    "consultation-consent-invalid": "informed consent names its evidence document; a guardian names themself and "
    "the relationship",
    "consultation-message-invalid": "a message has text or documents",
    "consultation-report-invalid": "a report has findings or a conclusion; sign and amend send the DiagnosticReport "
    "of report-draft",
    "consultation-signature-invalid": "the detached JWS verifies with the organisation's registered key",
    "consultation-documents": "the documents are this patient's, registered by the requester",
}
_SEARCH_BY = "one of the parameters the search names (Task: owner or requester; Slot: schedule or organization)"
_FHIR_RESOURCE = "a FHIR R4 {0} resource with the elements the CapabilityStatement lists for it"

REQUEST_RULES: dict[tuple[str, str], dict[str, str]] = {
    ("POST", "/api/v1/referrals"): {
        **_REFERRAL_TEXT,
        "referral-invalid": "one target_organization_id or 2 to 5 candidate_organization_ids (not both), "
        "none the caller's own; free text without control characters",
        "self-referral": "the target is another organisation than the caller",
        "referral-direction": "a direction where an organisation's tier is not registered",
        "referral-diagnosis": "diagnosis.code is an ICD-10 code",
        "referral-care-plan": "a care plan belongs to a down-referral; its follow-ups are due in the future",
        "referral-documents": "the documents are this patient's, registered by the caller, within the size limits",
        "referral-parent": "parent_referral_id is an up-referral the caller received, for the same person",
        "referral-slot": "book_slot_id is a free slot of the target",
    },
    ("POST", "/api/v1/referrals/{referral_id}/{transition}"): _REFERRAL_MOVE,
    ("POST", "/api/v1/referrals/{referral_id}/follow-ups/{follow_up_id}/complete"): _REFERRAL_TEXT,
    ("POST", "/api/v1/referral-slots"): {"referral-slot": "each slot ends after it starts"},
    ("POST", "/api/v1/consultations"): {
        "consultation-invalid": "a multidisciplinary consultation is interactive; imaging studies as in the schema",
        "self-consultation": "the consultant organisation is another organisation than the caller",
        "consultation-documents": "the documents are this patient's, registered by the caller",
    },
    ("POST", "/api/v1/consultations/{consultation_id}/{move}"): _CONSULTATION_MOVE,
    ("POST", "/api/v1/consultations/{consultation_id}/report-draft"): {
        "consultation-report-invalid": "a report has findings or a conclusion",
    },
    ("POST", "/api/v1/roster-shifts"): {"consultation-roster-invalid": "a shift ends after it starts"},
    ("POST", "/api/v1/consultation-slots"): {"consultation-slot-invalid": "each slot ends after it starts"},
    ("PUT", "/api/v1/specialists/{practitioner_id}"): {"consultation-specialist-invalid": "a name with a letter in it"},
    ("GET", "/fhir/R4/Task"): {"search-invalid": _SEARCH_BY},
    ("GET", "/fhir/R4/Slot"): {"search-invalid": _SEARCH_BY},
    ("POST", "/fhir/R4/ServiceRequest"): {
        "referral-invalid": _FHIR_RESOURCE.format("ServiceRequest"),
        "referral-diagnosis": "reasonCode carries an ICD-10 coding (http://hl7.org/fhir/sid/icd-10)",
        "search-value-invalid": "subject.identifier value: a local patient id of at most 64 characters",
        "self-referral": "the performer is another organisation than the caller",
        "referral-direction": "a direction where an organisation's tier is not registered",
        "referral-documents": "the documents are this patient's, registered by the caller, within the size limits",
    },
    ("PUT", "/fhir/R4/Task/{task_id}"): {
        "referral-invalid": _FHIR_RESOURCE.format("Task"),
        "referral-move": "the update changes Task.businessStatus or Task.status to one the workflow knows",
        **{k: v for k, v in _REFERRAL_MOVE.items() if k != "if-match"},
    },
}


def fhir_body(resource_type: str) -> dict[str, Any]:
    """The OpenAPI request body of a FHIR create / update (`openapi_extra`)."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/fhir+json": {
                    "schema": {
                        "type": "object",
                        "required": ["resourceType"],
                        "properties": {"resourceType": {"const": resource_type}},
                    }
                }
            },
        }
    }
