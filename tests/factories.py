"""Synthetic test data: patients with valid national ids, document submissions."""

from __future__ import annotations

import base64
import datetime
import hashlib
import secrets
from typing import Any

from services.shared import gb11643


def fresh_national_id() -> str:
    """A synthetic resident id with a valid GB 11643 check digit, unique per call in practice."""
    born = datetime.date(1950, 1, 1) + datetime.timedelta(days=secrets.randbelow(365 * 50))
    body = f"110105{born:%Y%m%d}{secrets.randbelow(1000):03d}"
    return body + gb11643.check_digit(body)


def person(name: str = "赵六", national_id: str | None = None, **extra: Any) -> dict[str, Any]:
    """Demographics whose birth date and gender agree with the national id."""
    nid = national_id or fresh_national_id()
    return {
        "name": name,
        "national_id": nid,
        "birth_date": gb11643.birth_date(nid).isoformat(),
        "gender": gb11643.gender(nid),
        **extra,
    }


def document(local_id: str, content: bytes, **overrides: object) -> dict[str, object]:
    """A discharge summary submission for a patient of the submitting hospital."""
    return {
        "source_document_id": f"DS-{secrets.token_hex(4)}",
        "patient_local_id": local_id,
        "type": {"system": "http://loinc.org", "code": "18842-5", "display": "出院小结"},
        "title": "出院小结",
        "mime_type": "text/xml",
        "sha256": hashlib.sha256(content).hexdigest(),
        "size": len(content),
        "content_base64": base64.b64encode(content).decode(),
        **overrides,
    }
