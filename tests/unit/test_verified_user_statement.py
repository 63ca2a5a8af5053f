"""The gateway's signed statement of a verified user assertion (services/shared/user_assertion.py,
`user_statement_claims`): what services accept in place of the hospital's assertion, and what
they refuse."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from gateway.smart import AuthorizationServer
from services.shared.auth import USER_ASSERTION_KEY, VERIFIED_USER_KEY, Caller, TokenVerifier
from services.shared.config import TOKEN_AUDIENCE
from services.shared.errors import Unauthenticated
from services.shared.keys import ISSUER_MEMBER, generate_ec_key, private_pem, public_jwk
from services.shared.user_assertion import ActingUser, user_statement_claims

GATEWAY_KEY = generate_ec_key()
PLATFORM_KEY = generate_ec_key()
HOSPITAL_KEY = generate_ec_key()
USER = ActingUser(
    practitioner_id="D0042", name="欧阳娜娜", role="doctor", department="心血管内科", purpose_of_use="treatment"
)


def _sign(key: Any, claims: dict[str, Any], typ: str = "hie-user+jwt") -> str:
    return jwt.encode(claims, key, algorithm="ES384", headers={"kid": public_jwk(key)["kid"], "typ": typ})


def access_token(*, client_id: str = "client-xicheng", org_type: str = "hospital", jti: str = "t1") -> str:
    now = int(time.time())
    claims = {
        "iss": "https://hie.example",
        "sub": client_id,
        "aud": TOKEN_AUDIENCE,
        "iat": now,
        "exp": now + 300,
        "jti": jti,
        "scope": "system/DocumentReference.rs",
        "client_id": client_id,
        "org": "org-bj",
        "org_type": org_type,
        "client_jkt": [public_jwk(HOSPITAL_KEY)["kid"]],
    }
    return _sign(GATEWAY_KEY, claims, typ="at+jwt")


def statement(token: str, *, key: Any = GATEWAY_KEY, user: ActingUser = USER, **overrides: Any) -> str:
    claims = user_statement_claims(
        user,
        issuer="https://hie.example",
        token=token,
        token_claims=jwt.decode(token, options={"verify_signature": False}),
        now=int(time.time()),
    )
    return _sign(key, {**claims, **overrides})


@pytest.fixture
def verifier(tmp_path: Path) -> TokenVerifier:
    path = tmp_path / "trusted.jwks.json"
    keys = [
        {**public_jwk(GATEWAY_KEY), ISSUER_MEMBER: "gateway"},
        {**public_jwk(PLATFORM_KEY), ISSUER_MEMBER: "platform"},
    ]
    path.write_text(json.dumps({"keys": keys}))
    return TokenVerifier(path)


def caller_of(verifier: TokenVerifier, token: str, stmt: str) -> Caller:
    return verifier.caller_from_metadata({"authorization": f"Bearer {token}", VERIFIED_USER_KEY: stmt})


def test_a_gateway_statement_gives_the_person_and_purpose(verifier: TokenVerifier) -> None:
    token = access_token()
    who = caller_of(verifier, token, statement(token))
    assert (who.practitioner_id, who.practitioner_name, who.role, who.department, who.purpose_of_use) == (
        "D0042",
        "欧阳娜娜",
        "doctor",
        "心血管内科",
        "treatment",
    )
    assert who.organization_id == "org-bj"
    # Verified once: the same statement again is a cache hit and gives the same person.
    assert caller_of(verifier, token, statement(token)).practitioner_id == "D0042"


def test_an_invalid_statement_is_refused_whatever_comes_with_it(verifier: TokenVerifier) -> None:
    token = access_token()
    metadata = {"authorization": f"Bearer {token}", VERIFIED_USER_KEY: "garbage", USER_ASSERTION_KEY: "garbage"}
    with pytest.raises(Unauthenticated) as info:
        verifier.caller_from_metadata(metadata)
    assert info.value.reason == "user-assertion"


BAD_STATEMENTS = {
    # Bound to another access token of the same client (the token's hash differs).
    "for-another-token": lambda token: statement(access_token(jti="t2")),
    "for-another-client": lambda token: statement(token, client_id="client-chaoyang"),
    "signed-by-a-platform-key": lambda token: statement(token, key=PLATFORM_KEY),
    "signed-by-the-hospital": lambda token: statement(token, key=HOSPITAL_KEY),
    "an-access-token-instead": lambda token: token,
    "expired": lambda token: statement(token, iat=int(time.time()) - 900, exp=int(time.time()) - 600),
    "unknown-role": lambda token: statement(token, role="superuser"),
    "unknown-purpose": lambda token: statement(token, purpose_of_use="marketing"),
    "control-character-in-name": lambda token: statement(token, name="张\n伟"),
    "garbage": lambda token: "not-a-jwt",
}


@pytest.mark.parametrize("make", BAD_STATEMENTS.values(), ids=BAD_STATEMENTS.keys())
def test_bad_statements_are_unauthenticated(verifier: TokenVerifier, make: Any) -> None:
    token = access_token()
    with pytest.raises(Unauthenticated) as info:
        caller_of(verifier, token, make(token))
    assert info.value.reason == "user-assertion"


def test_a_statement_is_not_an_access_token(verifier: TokenVerifier) -> None:
    token = access_token()
    with pytest.raises(Unauthenticated):
        verifier.verify(statement(token))


def test_the_role_is_held_to_the_organisation_type(verifier: TokenVerifier) -> None:
    token = access_token(org_type="authority")
    with pytest.raises(Unauthenticated) as info:
        caller_of(verifier, token, statement(token))
    assert info.value.reason == "role-not-allowed"


def test_the_gateway_signs_one_statement_per_token_and_user(tmp_path: Path, verifier: TokenVerifier) -> None:
    key_file = tmp_path / "gateway.pem"
    key_file.write_bytes(private_pem(GATEWAY_KEY))
    server = AuthorizationServer(sessions=None, signing_key_file=key_file, issuer="https://hie.example")  # type: ignore[arg-type]
    token = access_token()
    claims = jwt.decode(token, options={"verify_signature": False})
    who = Caller(
        organization_id="org-bj",
        organization_type="hospital",
        client_id="client-xicheng",
        practitioner_id="D0042",
        practitioner_name="欧阳娜娜",
        role="doctor",
        department="心血管内科",
        purpose_of_use="treatment",
    )
    first = server.verified_user_statement(token=token, token_claims=claims, caller=who)
    assert server.verified_user_statement(token=token, token_claims=claims, caller=who) == first
    other = Caller(**{**who.__dict__, "purpose_of_use": "referral"})
    second = server.verified_user_statement(token=token, token_claims=claims, caller=other)
    assert second != first
    assert caller_of(verifier, token, first).purpose_of_use == "treatment"
    assert caller_of(verifier, token, second).purpose_of_use == "referral"
    # Never longer than the access token lives.
    assert jwt.decode(first, options={"verify_signature": False})["exp"] <= claims["exp"]
