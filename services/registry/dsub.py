"""Subscription and notification rules (IHE DSUB semantics; pure: no I/O).

A notification is a JSON document POSTed to the subscriber's endpoint. Its body names the
event and the document or resource, never clinical content: the subscriber retrieves the
document through the consent-checked, audited path. Documents carrying sensitivity labels or a
restricted / very restricted confidentiality are not announced at all, since no consent decision
can be made for the subscriber when the document is registered.
"""

from __future__ import annotations

import datetime
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from services.shared.errors import InvalidArgument

TOPIC_PATIENT_DOCUMENT, TOPIC_DOCUMENT_TYPE, TOPIC_WORKFLOW_STATE = 1, 2, 3
TOPIC_NAMES = {
    TOPIC_PATIENT_DOCUMENT: "patient-document",
    TOPIC_DOCUMENT_TYPE: "document-type",
    TOPIC_WORKFLOW_STATE: "workflow-state",
}
MAX_LIFETIME = datetime.timedelta(days=366)
_ANNOUNCED_CONFIDENTIALITY = frozenset({"U", "L", "N"})
_EVENT_TYPE = re.compile(r"^[a-z][a-z0-9\-]*(\.[a-z][a-z0-9\-]*){1,3}$")
# The JWS "typ" of a notification signature.
SIGNATURE_TYPE = "hie-notification+jws"


def check_endpoint(url: str, *, production: bool) -> str:
    """An absolute http(s) URL without credentials; https only in production."""
    parts = urlsplit(url.strip())
    if (
        len(url) > 512
        or parts.scheme not in ({"https"} if production else {"https", "http"})
        or not parts.hostname
        or parts.username
        or parts.password
        or any(ch.isspace() or ord(ch) < 0x20 for ch in url)
    ):
        raise InvalidArgument("endpoint must be an https URL (http allowed in development)", reason="endpoint-invalid")
    return url.strip()


def check_expiry(expires: datetime.datetime | None, now: datetime.datetime) -> datetime.datetime:
    if expires is None:
        raise InvalidArgument("a subscription needs an expiry", reason="expiry-missing")
    if expires <= now or expires - now > MAX_LIFETIME:
        raise InvalidArgument("expiry must be in the future and within a year", reason="expiry-invalid")
    return expires


def check_event_type(value: str) -> str:
    if not _EVENT_TYPE.fullmatch(value) or len(value) > 64:
        raise InvalidArgument("event type must look like referral.accepted", reason="event-type-invalid")
    return value


def announced(*, confidentiality: str, security_labels: list[str], status: int) -> bool:
    """Whether a new document may be announced to subscribers at all (see the module docstring)."""
    return status == 1 and confidentiality in _ANNOUNCED_CONFIDENTIALITY and not security_labels


@dataclass(frozen=True)
class Notification:
    """One notification for one subscription; `event_id` stays the same across retries."""

    event_id: str
    subscription_id: str
    organization_id: str
    endpoint_url: str
    event_type: str
    body: bytes
    trace_id: str
    span_id: str

    def payload(self) -> bytes:
        """The outbox payload: everything the relay needs to deliver it later (after a restart too)."""
        return json.dumps(
            {
                "event_id": self.event_id,
                "subscription_id": self.subscription_id,
                "organization_id": self.organization_id,
                "endpoint_url": self.endpoint_url,
                "event_type": self.event_type,
                "body": self.body.decode(),
                "trace_id": self.trace_id,
                "span_id": self.span_id,
            }
        ).encode()

    @classmethod
    def from_payload(cls, payload: bytes) -> Notification:
        data = json.loads(payload)
        return cls(**{**data, "body": data["body"].encode()})


def notification(
    *,
    subscription_id: str,
    organization_id: str,
    endpoint_url: str,
    topic: int,
    event_type: str,
    occurred: datetime.datetime,
    subject: dict[str, Any],
    trace_id: str,
    span_id: str,
) -> Notification:
    """A notification with a fresh event id; the body is canonical JSON (UTF-8, sorted keys)."""
    event_id = str(uuid.uuid4())
    body = {
        "event_id": event_id,
        "event_type": event_type,
        "occurred": occurred.astimezone(datetime.UTC).isoformat(),
        "subscription_id": subscription_id,
        "topic": TOPIC_NAMES[topic],
        **subject,
    }
    return Notification(
        event_id=event_id,
        subscription_id=subscription_id,
        organization_id=organization_id,
        endpoint_url=endpoint_url,
        event_type=event_type,
        body=json.dumps(body, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode(),
        trace_id=trace_id,
        span_id=span_id,
    )
