"""SMART Backend Services authorization (OAuth2 client credentials with RFC 7523 JWT
client assertions) and the access tokens the exchange issues."""

from __future__ import annotations

import datetime
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway import store
from services.referral.directory import DIRECTORY_AUDIENCE, STATEMENT_LIFETIME_SECONDS
from services.shared.audit_trail import Action, AuditTrail, Outcome
from services.shared.auth import Caller
from services.shared.config import TOKEN_AUDIENCE
from services.shared.keys import algorithm_for, load_private_key, public_jwk, thumbprint
from services.shared.metrics import TOKENS
from services.shared.user_assertion import ActingUser, user_statement_claims

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# SMART Backend Services: clients SHALL support RS384 or ES384; RS256 / ES256 are accepted too.
ASSERTION_ALGORITHMS = ["RS384", "ES384", "RS256", "ES256"]
# SMART: "exp ... SHALL be no more than five minutes in the future".
MAX_ASSERTION_LIFETIME = 300
ACCESS_TOKEN_LIFETIME = 300
_LEEWAY = 5
# A verified-user statement is reused while it has this long left (a request's hops check it as
# they reach each service), and re-signed after.
_STATEMENT_MARGIN_SECONDS = 60
_STATEMENT_CACHE_SIZE = 10_000

# What each kind of member may be granted (SMART v2 scopes).
ALLOWED_SCOPES: dict[str, tuple[str, ...]] = {
    "hospital": (
        "system/Patient.crus",
        "system/DocumentReference.crus",
        "system/Binary.r",
        "system/Consent.cruds",
        "system/ServiceRequest.crus",
        "system/Task.crus",
        "system/AuditEvent.rs",
    ),
    "authority": ("system/AuditEvent.rs", "system/Patient.rs", "system/DocumentReference.rs"),
    # The platform operator's data stewards work the mpi review queue (link, unlink, decide).
    "platform-admin": ("system/Patient.rus", "system/AuditEvent.rs"),
}


class OAuthError(Exception):
    """RFC 6749 §5.2 error response: its code and HTTP status travel with it."""

    def __init__(self, error: str, description: str, *, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status


@dataclass(frozen=True)
class IssuedToken:
    access_token: str
    expires_in: int
    scope: str

    def response(self) -> dict[str, Any]:
        return {
            "access_token": self.access_token,
            "token_type": "bearer",
            "expires_in": self.expires_in,
            "scope": self.scope,
        }


def _parse_scope(scope: str) -> tuple[str, str, str]:
    context, _, rest = scope.partition("/")
    resource, _, perms = rest.partition(".")
    return context, resource, perms


def grant_scopes(requested: str, org_type: str) -> list[str]:
    """Each requested scope is granted if an allowed scope of the same resource covers its
    permissions; anything else is dropped (RFC 6749 §3.3 lets the server narrow scope)."""
    allowed = [_parse_scope(s) for s in ALLOWED_SCOPES.get(org_type, ())]
    granted = []
    for scope in dict.fromkeys(requested.split()):
        context, resource, perms = _parse_scope(scope)
        if context != "system" or not perms or not set(perms) <= set("cruds"):
            continue
        if any(res == resource and set(perms) <= set(p) for _, res, p in allowed):
            granted.append(scope)
    return granted


class AuthorizationServer:
    """Verifies client assertions against registered keys and issues access tokens."""

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        signing_key_file: Path,
        issuer: str,
        audit: AuditTrail | None = None,
        audit_notify: Callable[[], None] = lambda: None,
    ) -> None:
        self._sessions = sessions
        self._audit = audit
        self._audit_notify = audit_notify
        self._key_file = signing_key_file
        self._key_mtime = -1.0
        self._load_signing_key()
        self.issuer = issuer
        self.token_endpoint = f"{issuer}/oauth2/token"
        self._statements: dict[tuple[str, ActingUser], tuple[str, float]] = {}

    async def issue(self, form: dict[str, str], *, client_address: str = "") -> IssuedToken:
        """Issue an access token, auditing the issue or the refusal (token.issue / token.refused)."""
        try:
            return await self._issue(form, client_address)
        except OAuthError as exc:
            if self._audit is not None:
                await self._record_refusal(form, exc, client_address)
            raise

    async def _record_refusal(self, form: dict[str, str], error: OAuthError, client_address: str) -> None:
        try:
            claimed = jwt.decode(form.get("client_assertion", ""), options={"verify_signature": False}).get("iss")
        except jwt.PyJWTError:
            claimed = None
        client_id = claimed[:64] if isinstance(claimed, str) else ""
        async with self._sessions() as session, session.begin():
            org = await store.organization_by_client(session, client_id) if client_id else None
            # Per organisation, "unknown" for an unregistered client id (its value is the caller's choice).
            TOKENS.add(1, {"organization": org.id if org else "unknown", "outcome": "refused", "reason": error.error})
            who = Caller(
                organization_id=org.id if org else "",
                organization_type=org.type if org else "",
                client_id=client_id,
                client_address=client_address,
            )
            assert self._audit is not None
            await self._audit.record(
                session,
                caller=who,
                type="token.refused",
                action=Action.ACTION_EXECUTE,
                outcome=Outcome.OUTCOME_MINOR_FAILURE,
                entities=[("Client", client_id)] if client_id else [],
            )
        self._audit_notify()

    async def _issue(self, form: dict[str, str], client_address: str) -> IssuedToken:
        if form.get("grant_type") != "client_credentials":
            raise OAuthError("unsupported_grant_type", "grant_type must be client_credentials")
        if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
            raise OAuthError("invalid_request", "client_assertion_type must be jwt-bearer")
        assertion = form.get("client_assertion", "")
        if not assertion:
            raise OAuthError("invalid_request", "client_assertion is required")
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise OAuthError("invalid_client", "client assertion is not a valid JWT", status=401) from None
        if header.get("alg") not in ASSERTION_ALGORITHMS:
            raise OAuthError("invalid_client", "client assertion algorithm not accepted", status=401)
        client_id = unverified.get("iss")
        if not isinstance(client_id, str) or not client_id:
            raise OAuthError("invalid_client", "client assertion has no issuer", status=401)
        async with self._sessions() as session, session.begin():
            org = await store.organization_by_client(session, client_id)
            if org is None or org.status != "active":
                raise OAuthError("invalid_client", "unknown or inactive client", status=401)
            claims = self._verify_assertion(assertion, header, org)
            expires_at = datetime.datetime.fromtimestamp(claims["exp"], tz=datetime.UTC)
            if not await store.remember_assertion(
                session, jti=str(claims["jti"])[:256], client_id=client_id, expires_at=expires_at
            ):
                raise OAuthError("invalid_client", "client assertion was already used", status=401)
            scopes = grant_scopes(form.get("scope", ""), org.type)
            if not scopes:
                raise OAuthError("invalid_scope", "none of the requested scopes can be granted")
            if self._audit is not None:
                await self._audit.record(
                    session,
                    caller=Caller(
                        organization_id=org.id,
                        organization_type=org.type,
                        client_id=org.client_id,
                        scopes=frozenset(scopes),
                        client_address=client_address,
                    ),
                    type="token.issue",
                    action=Action.ACTION_EXECUTE,
                    entities=[("Client", org.client_id)],
                )
            issued = self._access_token(org, scopes)
        self._audit_notify()
        TOKENS.add(1, {"organization": org.id, "outcome": "issued", "reason": ""})
        return issued

    def _verify_assertion(self, assertion: str, header: dict[str, Any], org: store.Organization) -> dict[str, Any]:
        kid = header.get("kid")
        candidates = [k for k in org.keys if not kid or k.get("kid") == kid]
        if not candidates:
            raise OAuthError("invalid_client", "no registered key matches the assertion's kid", status=401)
        for jwk in candidates:
            try:
                key = jwt.PyJWK(jwk).key
                claims = jwt.decode(
                    assertion,
                    key=key,
                    algorithms=[header["alg"]],
                    audience=self.token_endpoint,
                    issuer=org.client_id,
                    options={"require": ["iss", "sub", "aud", "exp", "jti"]},
                    leeway=_LEEWAY,
                )
            except (jwt.PyJWTError, ValueError, KeyError, TypeError):
                continue
            if claims["sub"] != org.client_id:
                raise OAuthError("invalid_client", "assertion sub must equal iss (the client id)", status=401)
            if claims["exp"] > time.time() + MAX_ASSERTION_LIFETIME + _LEEWAY:
                raise OAuthError("invalid_client", "assertion exp is more than five minutes ahead", status=401)
            return claims
        raise OAuthError("invalid_client", "client assertion failed verification", status=401)

    def _load_signing_key(self) -> None:
        """Pick up a rotated gateway key (`hie keys rotate`) without a restart."""
        mtime = self._key_file.stat().st_mtime
        if mtime != self._key_mtime:
            key = load_private_key(self._key_file)
            self._key, self._kid, self._alg = key, public_jwk(key)["kid"], algorithm_for(key)
            self._key_mtime = mtime

    def access_token_for_person(
        self,
        org: store.Organization,
        scopes: list[str],
        *,
        assertion_key_thumbprint: str,
        person_claims: dict[str, str],
    ) -> IssuedToken:
        """The same access token for a person signed in through the console
        (gateway/console/authorization.py): user assertions are signed by the console key."""
        return self._access_token(org, scopes, client_jkt=[assertion_key_thumbprint], extra=person_claims)

    def _access_token(
        self,
        org: store.Organization,
        scopes: list[str],
        *,
        client_jkt: list[str] | None = None,
        extra: dict[str, str] | None = None,
    ) -> IssuedToken:
        self._load_signing_key()
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": org.client_id,
            "aud": TOKEN_AUDIENCE,
            "iat": now,
            "nbf": now,
            "exp": now + ACCESS_TOKEN_LIFETIME,
            "jti": str(uuid.uuid4()),
            "scope": " ".join(scopes),
            "client_id": org.client_id,
            "org": org.id,
            "org_type": org.type,
            # Thumbprints of the client's registered keys: services check user assertions against them.
            "client_jkt": client_jkt if client_jkt is not None else sorted(thumbprint(k) for k in org.keys),
            **(extra or {}),
        }
        token = jwt.encode(claims, self._key, algorithm=self._alg, headers={"kid": self._kid, "typ": "at+jwt"})
        return IssuedToken(access_token=token, expires_in=ACCESS_TOKEN_LIFETIME, scope=" ".join(scopes))

    def directory_statement(self, *, client_id: str, tiers: dict[str, str]) -> str:
        """The organisations' tiers from the exchange's directory, signed for one client's request
        (services/referral/directory.py explains why and how the referral service checks it)."""
        self._load_signing_key()
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": client_id,
            "aud": DIRECTORY_AUDIENCE,
            "iat": now,
            "exp": now + STATEMENT_LIFETIME_SECONDS,
            "jti": str(uuid.uuid4()),
            "tiers": tiers,
        }
        return jwt.encode(
            claims, self._key, algorithm=self._alg, headers={"kid": self._kid, "typ": "hie-directory+jwt"}
        )

    def verified_user_statement(self, *, token: str, token_claims: Mapping[str, Any], caller: Caller) -> str:
        """The gateway's signed statement of the user assertion it verified for this request
        (services/shared/user_assertion.py, `user_statement_claims`): one per access token and
        user, reused while it has a minute left, so the services downstream verify a signature
        once per token and user instead of the hospital's once per request and hop."""
        user = ActingUser(
            practitioner_id=caller.practitioner_id,
            name=caller.practitioner_name,
            role=caller.role,
            department=caller.department,
            purpose_of_use=caller.purpose_of_use,
        )
        now = time.time()
        token_expires = float(token_claims.get("exp", 0))
        cached = self._statements.get((token, user))
        if (
            cached is not None
            and now < cached[1]
            and (cached[1] > now + _STATEMENT_MARGIN_SECONDS or cached[1] >= token_expires)
        ):
            return cached[0]
        self._load_signing_key()
        claims = user_statement_claims(user, issuer=self.issuer, token=token, token_claims=token_claims, now=int(now))
        statement = jwt.encode(
            claims, self._key, algorithm=self._alg, headers={"kid": self._kid, "typ": "hie-user+jwt"}
        )
        if len(self._statements) >= _STATEMENT_CACHE_SIZE:
            self._statements.clear()
        self._statements[(token, user)] = (statement, float(claims["exp"]))
        return statement

    def smart_configuration(self) -> dict[str, Any]:
        """GET /.well-known/smart-configuration (SMART App Launch 2.x, backend services subset)."""
        return {
            "issuer": self.issuer,
            "jwks_uri": f"{self.issuer}/.well-known/jwks.json",
            "token_endpoint": self.token_endpoint,
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ASSERTION_ALGORITHMS,
            "scopes_supported": sorted({s for scopes in ALLOWED_SCOPES.values() for s in scopes}),
            # SMART App Launch 2.x: "permission-v2" says the server speaks the v2 scope syntax
            # (system/Patient.rs) the tokens carry.
            "capabilities": ["client-confidential-asymmetric", "permission-v2"],
        }
