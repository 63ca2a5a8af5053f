"""Unit tests for the caller context and bearer token verification (services.shared.auth)."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from services.shared.auth import (
    CLIENT_ADDRESS_KEY,
    PURPOSES_OF_USE,
    USER_ASSERTION_KEY,
    Caller,
    TokenVerifier,
    caller_from_claims,
)
from services.shared.config import TOKEN_AUDIENCE
from services.shared.errors import PermissionDenied, Unauthenticated
from services.shared.keys import generate_ec_key, jwks, public_jwk


def make_caller(*scopes: str, purpose: str = "") -> Caller:
    return Caller(
        organization_id="org-bj-xicheng-hospital",
        organization_type="hospital",
        client_id="client-1",
        scopes=frozenset(scopes),
        purpose_of_use=purpose,
    )


# --- require_scope ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scopes", "resource", "interaction"),
    [
        (("system/Patient.rs",), "Patient", "r"),
        (("system/Patient.rs",), "Patient", "s"),
        (("system/Patient.crus",), "Patient", "c"),
        (("system/Binary.r", "system/Patient.c"), "Patient", "c"),
        (("system/*.cruds",), "Patient", "d"),
        (("system/*.r",), "AuditEvent", "r"),
        (("system/*.r",), "DocumentReference", "r"),
    ],
)
def test_require_scope_grants(scopes: tuple[str, ...], resource: str, interaction: str) -> None:
    make_caller(*scopes).require_scope(resource, interaction)


@pytest.mark.parametrize(
    ("scopes", "resource", "interaction"),
    [
        ((), "Patient", "r"),
        (("system/Patient.rs",), "Patient", "c"),
        (("system/Patient.rs",), "DocumentReference", "r"),
        (("system/PatientX.r",), "Patient", "r"),
        (("system/Patien.r",), "Patient", "r"),
        (("user/Patient.r",), "Patient", "r"),
        (("patient/Patient.r",), "Patient", "r"),
        (("user/*.cruds", "patient/*.cruds"), "Patient", "r"),
        (("system/*.r",), "Patient", "c"),
        (("system/Patient",), "Patient", "r"),
        (("Patient.r",), "Patient", "r"),
    ],
)
def test_require_scope_denies(scopes: tuple[str, ...], resource: str, interaction: str) -> None:
    with pytest.raises(PermissionDenied) as info:
        make_caller(*scopes).require_scope(resource, interaction)
    assert info.value.reason == "scope"
    assert f"system/{resource}.{interaction}" in info.value.message


# --- require_purpose -------------------------------------------------------------------------


@pytest.mark.parametrize("purpose", sorted(PURPOSES_OF_USE))
def test_require_purpose_returns_a_known_purpose(purpose: str) -> None:
    assert make_caller(purpose=purpose).require_purpose() == purpose


@pytest.mark.parametrize("purpose", ["", "marketing", "Treatment", " treatment", "治疗"])
def test_require_purpose_rejects_missing_or_unknown(purpose: str) -> None:
    with pytest.raises(PermissionDenied) as info:
        make_caller(purpose=purpose).require_purpose()
    assert info.value.reason == "purpose"


# --- caller_from_claims ----------------------------------------------------------------------

HOSPITAL_KEY = generate_ec_key()
CLAIMS = {
    "iss": "https://hie.example",
    "sub": "client-xicheng",
    "org": "org-bj-xicheng-hospital",
    "org_type": "hospital",
    "client_id": "client-xicheng",
    "scope": "system/Patient.rs system/DocumentReference.crus",
    "client_jkt": [public_jwk(HOSPITAL_KEY)["kid"]],
}


def user_assertion(key: Any = HOSPITAL_KEY, *, drop: tuple[str, ...] = (), **overrides: Any) -> str:
    """A hospital's signed user assertion, in the form services/shared/user_assertion.py documents."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": "client-xicheng",
        "sub": "D0042",
        "aud": TOKEN_AUDIENCE,
        "iat": now,
        "exp": now + 300,
        "jti": "4b7e0c1a-assertion",
        "name": "欧阳娜娜",
        "role": "doctor",
        "department": "心血管内科",
        "purpose_of_use": "treatment",
    }
    claims.update(overrides)
    for name in drop:
        claims.pop(name)
    jwk = public_jwk(key)
    public = {k: jwk[k] for k in ("kty", "crv", "x", "y")}
    return jwt.encode(claims, key, algorithm="ES384", headers={"kid": jwk["kid"], "jwk": public})


def test_caller_from_claims_takes_the_person_from_the_user_assertion() -> None:
    metadata = {USER_ASSERTION_KEY: user_assertion(), CLIENT_ADDRESS_KEY: "10.0.3.17"}
    who = caller_from_claims(CLAIMS, metadata)
    assert who.organization_id == "org-bj-xicheng-hospital"
    assert who.organization_type == "hospital"
    assert who.client_id == "client-xicheng"
    assert who.scopes == frozenset({"system/Patient.rs", "system/DocumentReference.crus"})
    assert who.practitioner_id == "D0042"
    assert who.practitioner_name == "欧阳娜娜"
    assert who.department == "心血管内科"
    assert who.role == "doctor"
    assert who.purpose_of_use == "treatment"
    assert who.client_address == "10.0.3.17"
    assert not who.is_platform
    assert who.require_purpose() == "treatment"
    who.require_scope("DocumentReference", "c")


def test_caller_from_claims_without_an_assertion_acts_as_the_system_alone() -> None:
    who = caller_from_claims({"sub": "service:mpi", "org_type": "platform"}, {})
    assert who.client_id == "service:mpi"  # falls back to sub
    assert who.organization_id == ""
    assert who.scopes == frozenset()
    assert (who.practitioner_id, who.practitioner_name, who.department, who.role) == ("", "", "", "")
    assert who.is_platform
    with pytest.raises(PermissionDenied) as info:
        who.require_purpose()
    assert info.value.reason == "purpose"


def test_binary_metadata_values_are_ignored() -> None:
    who = caller_from_claims(CLAIMS, {USER_ASSERTION_KEY: user_assertion().encode(), CLIENT_ADDRESS_KEY: b"x"})
    assert who.practitioner_name == ""
    assert who.client_address == ""


def test_client_address_is_bounded() -> None:
    assert len(caller_from_claims(CLAIMS, {CLIENT_ADDRESS_KEY: "1" * 500}).client_address) == 64


BAD_ASSERTIONS = {
    "garbage": lambda: "not-a-jwt",
    "key-of-another-client": lambda: user_assertion(generate_ec_key()),
    "issued-by-another-client": lambda: user_assertion(iss="client-chaoyang"),
    "wrong-audience": lambda: user_assertion(aud="urn:other"),
    "expired": lambda: user_assertion(iat=int(time.time()) - 900, exp=int(time.time()) - 600),
    "lifetime-over-an-hour": lambda: user_assertion(exp=int(time.time()) + 7200),
    "no-jti": lambda: user_assertion(drop=("jti",)),
    "unknown-role": lambda: user_assertion(role="superuser"),
    "unknown-purpose": lambda: user_assertion(purpose_of_use="marketing"),
    "control-character-in-name": lambda: user_assertion(name="张\n伟"),
    "name-too-long": lambda: user_assertion(name="张" * 65),
}


@pytest.mark.parametrize("make", BAD_ASSERTIONS.values(), ids=BAD_ASSERTIONS.keys())
def test_bad_user_assertions_are_unauthenticated(make: Any) -> None:
    with pytest.raises(Unauthenticated) as info:
        caller_from_claims(CLAIMS, {USER_ASSERTION_KEY: make()})
    assert info.value.reason == "user-assertion"


# --- TokenVerifier ---------------------------------------------------------------------------


def write_jwks(path: Path, *keys: Any) -> None:
    path.write_text(json.dumps(jwks(*keys)))


def sign(key: Any, *, drop: tuple[str, ...] = (), headers: dict[str, Any] | None = None, **claims: Any) -> str:
    now = int(time.time())
    body: dict[str, Any] = {
        "iss": "https://hie.example",
        "sub": "client-xicheng",
        "aud": TOKEN_AUDIENCE,
        "iat": now,
        "exp": now + 300,
        "scope": "system/Patient.rs",
    }
    body.update(claims)
    for name in drop:
        body.pop(name)
    header = {"kid": public_jwk(key)["kid"], **(headers or {})}
    return jwt.encode(body, key, algorithm="ES384", headers=header)


def with_header(token: str, **changes: Any) -> str:
    """The same token (payload and signature) under a different header; None removes a member."""
    header = {**jwt.get_unverified_header(token), **changes}
    header = {name: value for name, value in header.items() if value is not None}
    encoded = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()
    return ".".join([encoded, *token.split(".")[1:]])


@pytest.fixture(scope="module")
def key() -> Any:
    return generate_ec_key()


@pytest.fixture
def jwks_file(tmp_path: Path, key: Any) -> Path:
    path = tmp_path / "trusted.jwks.json"
    write_jwks(path, key)
    return path


@pytest.fixture
def verifier(jwks_file: Path) -> TokenVerifier:
    return TokenVerifier(jwks_file)


def test_good_token_is_accepted(verifier: TokenVerifier, key: Any) -> None:
    claims = verifier.verify(sign(key, org="org-1"))
    assert claims["sub"] == "client-xicheng"
    assert claims["aud"] == TOKEN_AUDIENCE
    assert claims["org"] == "org-1"


def test_key_among_several_is_found(tmp_path: Path, key: Any) -> None:
    path = tmp_path / "several.jwks.json"
    write_jwks(path, generate_ec_key(), key)
    assert TokenVerifier(path).verify(sign(key))["sub"] == "client-xicheng"


def _hs256(key: Any) -> str:
    now = int(time.time())
    claims = {"iss": "x", "sub": "y", "aud": TOKEN_AUDIENCE, "iat": now, "exp": now + 300}
    return jwt.encode(
        claims, "a-shared-secret-of-32-bytes-long!", algorithm="HS256", headers={"kid": public_jwk(key)["kid"]}
    )


def _none(key: Any) -> str:
    now = int(time.time())
    claims = {"iss": "x", "sub": "y", "aud": TOKEN_AUDIENCE, "iat": now, "exp": now + 300}
    return jwt.encode(claims, None, algorithm="none", headers={"kid": public_jwk(key)["kid"]})


def _tampered(key: Any) -> str:
    header, _, signature = sign(key).split(".")
    other_payload = sign(key, sub="someone-else").split(".")[1]
    return f"{header}.{other_payload}.{signature}"


BAD_TOKENS = {
    "expired": lambda k: sign(k, iat=int(time.time()) - 600, exp=int(time.time()) - 60),
    "wrong-aud": lambda k: sign(k, aud="urn:some:other-exchange"),
    "no-exp": lambda k: sign(k, drop=("exp",)),
    "no-iat": lambda k: sign(k, drop=("iat",)),
    "no-iss": lambda k: sign(k, drop=("iss",)),
    "no-sub": lambda k: sign(k, drop=("sub",)),
    "no-aud": lambda k: sign(k, drop=("aud",)),
    "not-yet-valid": lambda k: sign(k, nbf=int(time.time()) + 600),
    "unknown-kid": lambda k: sign(k, headers={"kid": "no-such-kid"}),
    "no-kid": lambda k: with_header(sign(k), kid=None),
    "other-key-same-kid": lambda k: sign(generate_ec_key(), headers={"kid": public_jwk(k)["kid"]}),
    "tampered-payload": lambda k: _tampered(k),
    "alg-none": _none,
    "alg-none-signed-header": lambda k: with_header(sign(k), alg="none"),
    "hs256": _hs256,
    "es256-header": lambda k: with_header(sign(k), alg="ES256"),
    "garbage": lambda k: "not.a.jwt",
    "empty": lambda k: "",
}


@pytest.mark.parametrize("make", BAD_TOKENS.values(), ids=BAD_TOKENS.keys())
def test_bad_tokens_are_unauthenticated(verifier: TokenVerifier, key: Any, make: Any) -> None:
    with pytest.raises(Unauthenticated) as info:
        verifier.verify(make(key))
    assert info.value.reason == "token"


@pytest.mark.parametrize("alg", ["RS384", "RS256"])
def test_algorithm_confusion_with_rsa_header_is_unauthenticated(verifier: TokenVerifier, key: Any, alg: str) -> None:
    with pytest.raises(Unauthenticated):
        verifier.verify(with_header(sign(key), alg=alg))


def test_wrong_audience_is_accepted_by_a_verifier_for_that_audience(jwks_file: Path, key: Any) -> None:
    token = sign(key, aud="urn:hie:other")
    assert TokenVerifier(jwks_file, audience="urn:hie:other").verify(token)["aud"] == "urn:hie:other"


def test_key_rotation_is_picked_up(jwks_file: Path, key: Any) -> None:
    verifier = TokenVerifier(jwks_file)
    old_token = sign(key)
    assert verifier.verify(old_token)
    new_key = generate_ec_key()
    new_token = sign(new_key)
    with pytest.raises(Unauthenticated):
        verifier.verify(new_token)

    write_jwks(jwks_file, new_key)
    stat = jwks_file.stat()
    os.utime(jwks_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))

    assert verifier.verify(new_token)["sub"] == "client-xicheng"
    with pytest.raises(Unauthenticated):
        verifier.verify(old_token)  # the retired key is no longer trusted


def test_unchanged_file_is_not_reread(jwks_file: Path, key: Any) -> None:
    verifier = TokenVerifier(jwks_file)
    token = sign(key)
    assert verifier.verify(token)
    stat = jwks_file.stat()
    # Overwrite the content but keep the mtime: the cached keys stay in use.
    write_jwks(jwks_file, generate_ec_key())
    os.utime(jwks_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert verifier.verify(token)


def test_caller_from_metadata(verifier: TokenVerifier, key: Any) -> None:
    token = sign(key, org="org-bj", org_type="hospital", client_id="client-xicheng", client_jkt=CLAIMS["client_jkt"])
    assertion = user_assertion(name="张伟", purpose_of_use="referral")
    who = verifier.caller_from_metadata({"authorization": f"Bearer {token}", USER_ASSERTION_KEY: assertion})
    assert who.organization_id == "org-bj"
    assert who.practitioner_name == "张伟"
    assert who.require_purpose() == "referral"
    who.require_scope("Patient", "r")


@pytest.mark.parametrize("auth", [None, "", "Basic abc", "bearer x", b"Bearer x"])
def test_caller_from_metadata_needs_a_bearer_token(verifier: TokenVerifier, auth: Any) -> None:
    metadata = {} if auth is None else {"authorization": auth}
    with pytest.raises(Unauthenticated) as info:
        verifier.caller_from_metadata(metadata)
    assert info.value.reason == "token"


def test_nul_characters_are_found_at_any_depth() -> None:
    from hie.common.v1 import common_pb2
    from hie.mpi.v1 import mpi_pb2
    from services.shared.server import _has_nul

    clean = mpi_pb2.Patient(
        ref=common_pb2.PatientRef(local_id="A-1"), phones=["138"], name=mpi_pb2.HumanName(text="张三")
    )
    assert not _has_nul(clean)
    assert _has_nul(mpi_pb2.Patient(ref=common_pb2.PatientRef(local_id="A\x00")))
    assert _has_nul(mpi_pb2.Patient(phones=["1", "2\x00"]))
    assert _has_nul(mpi_pb2.Patient(identifiers=[common_pb2.Identifier(system="s", value="\x00")]))


def test_a_retired_gateway_key_stops_verifying_after_its_retention_without_a_rewrite(tmp_path: Path) -> None:
    import json as _json
    import time as _time

    import jwt as _jwt

    from services.shared.auth import TokenVerifier as _Verifier
    from services.shared.config import TOKEN_AUDIENCE as _AUD
    from services.shared.keys import RETIRED_MEMBER, generate_ec_key, public_jwk

    old = generate_ec_key()
    now = int(_time.time())
    claims = {"iss": "gw", "sub": "c", "aud": _AUD, "iat": now, "exp": now + 60, "org": "h", "org_type": "hospital"}
    token = _jwt.encode(claims, old, algorithm="ES384", headers={"kid": public_jwk(old)["kid"]})
    jwks_file = tmp_path / "trusted.json"
    entry = {**public_jwk(old), "hie_issuer": "gateway", RETIRED_MEMBER: now - 60}
    jwks_file.write_text(_json.dumps({"keys": [entry]}))
    assert _Verifier(jwks_file).verify(token)["org"] == "h"  # retired a minute ago: still trusted
    entry[RETIRED_MEMBER] = now - 3600
    jwks_file.write_text(_json.dumps({"keys": [entry]}))
    with pytest.raises(Unauthenticated):
        _Verifier(jwks_file).verify(token)
