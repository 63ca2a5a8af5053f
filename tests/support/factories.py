"""Synthetic test data: patients with valid national ids, document submissions."""

from __future__ import annotations

import base64
import datetime
import hashlib
import secrets
import time
from pathlib import Path
from typing import Any

import jwt

from gateway.client import HospitalClient, Practitioner, user_assertion
from services.shared import gb11643
from services.shared.config import TOKEN_AUDIENCE
from services.shared.keys import generate_ec_key, load_private_key, public_jwk


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


def grpc_metadata(client: HospitalClient, token: str, purpose: str = "treatment") -> tuple[tuple[str, str], ...]:
    """gRPC metadata of a member hospital's call made as the gateway makes it: its access token and
    a fresh user assertion of its practitioner for `purpose`."""
    assertion = user_assertion(
        key=client.key, client_id=client.client_id, practitioner=client.practitioner, purpose=purpose
    )
    return (("authorization", f"Bearer {token}"), ("x-hie-user-assertion", assertion))


def direct_metadata(
    gateway_key_file: Path,
    *,
    org: str,
    scope: str = "system/Patient.crs",
    purpose: str = "treatment",
    practitioner: Practitioner | None = None,
    org_type: str | None = None,
) -> tuple[tuple[str, str], ...]:
    """gRPC metadata as the gateway forwards it: an access token signed with the gateway's key
    for a member with a fresh registered key, and that member's signed user assertion. The member
    is a hospital, unless the practitioner is a data steward: stewards are the platform
    operator's staff (services/shared/user_assertion.py)."""
    if org_type is None:
        org_type = "platform-admin" if practitioner is not None and practitioner.role == "data-steward" else "hospital"
    hospital_key = generate_ec_key()
    client_id = f"client-{org}"
    gateway_key = load_private_key(gateway_key_file)
    now = int(time.time())
    claims = {
        "iss": "gateway",
        "sub": client_id,
        "client_id": client_id,
        "aud": TOKEN_AUDIENCE,
        "iat": now,
        "exp": now + 120,
        "org": org,
        "org_type": org_type,
        "scope": scope,
        "client_jkt": [public_jwk(hospital_key)["kid"]],
    }
    token = jwt.encode(claims, gateway_key, algorithm="ES384", headers={"kid": public_jwk(gateway_key)["kid"]})
    assertion = user_assertion(
        key=hospital_key, client_id=client_id, practitioner=practitioner or Practitioner(), purpose=purpose
    )
    return (("authorization", f"Bearer {token}"), ("x-hie-user-assertion", assertion))
