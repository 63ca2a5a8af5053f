"""The gateway's per-request check of a hospital's user assertion (`check_user_assertion`): one
decoding gives the acting user and the jti and expiry the replay check needs; the signature is
checked every time."""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt
import pytest

from services.shared.config import TOKEN_AUDIENCE
from services.shared.errors import Unauthenticated
from services.shared.keys import generate_ec_key, public_jwk, thumbprint
from services.shared.user_assertion import check_user_assertion

HOSPITAL_KEY = generate_ec_key()
OTHER_KEY = generate_ec_key()
TOKEN_CLAIMS = {
    "client_id": "client-xicheng",
    "org_type": "hospital",
    "client_jkt": [thumbprint(public_jwk(HOSPITAL_KEY))],
}


def _assertion(key: Any = HOSPITAL_KEY, **overrides: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": "client-xicheng",
        "sub": "D0042",
        "aud": TOKEN_AUDIENCE,
        "iat": now,
        "exp": now + 120,
        "jti": str(uuid.uuid4()),
        "name": "欧阳娜娜",
        "role": "doctor",
        "department": "心血管内科",
        "purpose_of_use": "treatment",
        **overrides,
    }
    jwk = {k: v for k, v in public_jwk(key).items() if k in {"kty", "crv", "x", "y"}}
    return jwt.encode(claims, key, algorithm="ES384", headers={"jwk": jwk})


def test_the_check_gives_the_user_and_the_jti_and_expiry_of_the_same_decoding() -> None:
    exp = int(time.time()) + 90
    checked = check_user_assertion(_assertion(jti="jti-1", exp=exp), TOKEN_CLAIMS)
    assert (checked.jti, checked.expires) == ("jti-1", float(exp))
    assert (checked.user.practitioner_id, checked.user.role, checked.user.purpose_of_use) == (
        "D0042",
        "doctor",
        "treatment",
    )


def test_the_signature_is_checked_every_time() -> None:
    good = _assertion()
    check_user_assertion(good, TOKEN_CLAIMS)
    header, payload, signature = good.split(".")
    forged = f"{header}.{payload}.{signature[:-4]}AAAA"
    with pytest.raises(Unauthenticated):
        check_user_assertion(forged, TOKEN_CLAIMS)
    # Signed by a key the token does not list.
    with pytest.raises(Unauthenticated):
        check_user_assertion(_assertion(OTHER_KEY), TOKEN_CLAIMS)
