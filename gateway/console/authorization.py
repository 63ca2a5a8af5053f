"""OAuth2 authorization code grant with PKCE (RFC 6749 §4.1, RFC 7636) and refresh tokens
(RFC 6749 §6) for people, on authlib's authorization server.

The console is a registered public client (`hie-console`, redirect URI under the gateway's own
public URL). Tokens issued to a person are the same access tokens a hospital system gets from
`POST /oauth2/token` (gateway/smart.py: same issuer, audience, signing key, lifetime, scopes per
organisation type, organisation and client id of the person's organisation), with two changes:
`client_jkt` names the exchange's console assertion key (gateway/console/assertions.py), so the
person's signed user assertion verifies in every service exactly like a hospital's; and
`azp` / `hie_user` name the client and the person.

authlib's server calls its storage hooks synchronously; the database is async. So each request
loads what the hooks will need first (the code, the refresh token, the person, the
organisation), runs authlib on a server built for that request, and writes what the hooks
recorded afterwards, in the same transaction as the audit event. Single use of a code or refresh
token is enforced by that write: it consumes the row only if it is still unconsumed.
"""

from __future__ import annotations

import datetime
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from authlib.oauth2 import AuthorizationServer as AuthlibServer
from authlib.oauth2 import OAuth2Request
from authlib.oauth2.rfc6749 import AuthorizationCodeMixin, ClientMixin, TokenMixin, grants
from authlib.oauth2.rfc6749.errors import InvalidRequestError, OAuth2Error
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload
from authlib.oauth2.rfc7636 import CodeChallenge
from sqlalchemy import delete, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway import store as gateway_store
from gateway.console import store
from gateway.console.assertions import AssertionSigner
from gateway.smart import ALLOWED_SCOPES, AuthorizationServer, grant_scopes
from services.shared.audit_trail import Action, AuditTrail, Outcome
from services.shared.auth import Caller
from services.shared.db import utcnow

CONSOLE_CLIENT_ID = "hie-console"
CONSOLE_CALLBACK_PATH = "/console/callback"
AUTHORIZE_PATH = "/oauth2/authorize"
USER_GRANT_TYPES = frozenset({"authorization_code", "refresh_token"})
CODE_LIFETIME = datetime.timedelta(minutes=2)
REFRESH_LIFETIME = datetime.timedelta(hours=8)
# Every scope any kind of organisation may hold; the token gets those of the person's kind.
ALL_SCOPES = " ".join(sorted({s for scopes in ALLOWED_SCOPES.values() for s in scopes}))


@dataclass(frozen=True)
class ConsoleClient(ClientMixin):
    """The console, a public client: it authenticates with PKCE, not a secret."""

    redirect_uri: str

    def get_client_id(self) -> str:
        return CONSOLE_CLIENT_ID

    def get_default_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_allowed_scope(self, scope: str) -> str:
        return " ".join(s for s in (scope or "").split() if s in ALL_SCOPES.split())

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        # RFC 9700 §4.1.3: exact string matching of redirect URIs.
        return redirect_uri == self.redirect_uri

    def check_client_secret(self, client_secret: str) -> bool:
        return False

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == "none"

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in USER_GRANT_TYPES


@dataclass
class Person:
    """The person authlib hands around as `user`, with the organisation they act for."""

    user: store.ConsoleUser
    org: gateway_store.Organization

    def get_user_id(self) -> str:
        return self.user.id


@dataclass
class _StoredCode(AuthorizationCodeMixin):
    row: store.AuthorizationCode

    def get_redirect_uri(self) -> str:
        return self.row.redirect_uri

    def get_scope(self) -> str:
        return self.row.scope

    def get_nonce(self) -> None:
        return None

    def get_auth_time(self) -> None:
        return None


@dataclass
class _StoredRefresh(TokenMixin):
    row: store.RefreshToken

    def check_client(self, client: ClientMixin) -> bool:
        return self.row.client_id == client.get_client_id()

    def get_scope(self) -> str:
        return self.row.scope

    def get_expires_in(self) -> int:
        return int((self.row.expires_at - utcnow()).total_seconds())

    def is_expired(self) -> bool:
        return self.row.expires_at <= utcnow()

    def is_revoked(self) -> bool:
        return self.row.revoked


@dataclass
class _Work:
    """What one request's hooks read (loaded before) and wrote (stored after)."""

    person: Person | None = None
    code: store.AuthorizationCode | None = None
    refresh: store.RefreshToken | None = None
    new_codes: list[store.AuthorizationCode] = field(default_factory=list)
    new_refresh: list[store.RefreshToken] = field(default_factory=list)
    consumed_code: bool = False
    revoked_refresh: bool = False
    granted_scope: str = ""


class _Request(OAuth2Request):
    """A Starlette request's method, URL and parameters as authlib reads them."""

    def __init__(self, method: str, uri: str, params: Mapping[str, str], headers: Mapping[str, str]) -> None:
        super().__init__(method=method, uri=uri, headers=dict(headers))
        self.payload = BasicOAuth2Payload(dict(params))
        self._params = dict(params)

    @property
    def args(self) -> dict[str, str]:
        return self._params if self.method == "GET" else {}

    @property
    def form(self) -> dict[str, str]:
        return self._params if self.method == "POST" else {}


class _RequiredS256(CodeChallenge):
    """OAuth 2.1 / RFC 9700 §2.1.1: PKCE is required, and only S256."""

    SUPPORTED_CODE_CHALLENGE_METHOD = ("S256",)

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if not data.get("code_challenge") or data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("code_challenge with code_challenge_method S256 is required")
        super().validate_code_challenge(grant, redirect_uri)

    def get_authorization_code_challenge(self, authorization_code: _StoredCode) -> str:
        return authorization_code.row.code_challenge

    def get_authorization_code_challenge_method(self, authorization_code: _StoredCode) -> str:
        return authorization_code.row.code_challenge_method


class _CodeGrant(grants.AuthorizationCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["none"]  # noqa: RUF012 - authlib's class attribute

    @property
    def work(self) -> _Work:
        return self.server.work

    def save_authorization_code(self, code: str, request: _Request) -> None:
        person = self.work.person
        assert person is not None
        self.work.new_codes.append(
            store.AuthorizationCode(
                code_hash=store.digest(code),
                client_id=CONSOLE_CLIENT_ID,
                redirect_uri=request.payload.redirect_uri or "",
                scope=request.payload.scope or "",
                user_id=person.user.id,
                code_challenge=request.payload.data.get("code_challenge", ""),
                code_challenge_method=request.payload.data.get("code_challenge_method", "S256"),
                expires_at=utcnow() + CODE_LIFETIME,
            )
        )

    def query_authorization_code(self, code: str, client: ClientMixin) -> _StoredCode | None:
        row = self.work.code
        if row is None or row.code_hash != store.digest(code) or row.client_id != client.get_client_id():
            return None
        return _StoredCode(row) if row.expires_at > utcnow() else None

    def delete_authorization_code(self, authorization_code: _StoredCode) -> None:
        self.work.consumed_code = True

    def authenticate_user(self, authorization_code: _StoredCode) -> Person | None:
        return self.work.person


class _RefreshGrant(grants.RefreshTokenGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["none"]  # noqa: RUF012 - authlib's class attribute
    # Rotation (RFC 9700 §4.14.2): a public client's refresh token is replaced on every use.
    INCLUDE_NEW_REFRESH_TOKEN = True

    @property
    def work(self) -> _Work:
        return self.server.work

    def authenticate_refresh_token(self, refresh_token: str) -> _StoredRefresh | None:
        row = self.work.refresh
        if row is None or row.token_hash != store.digest(refresh_token) or row.revoked or row.expires_at <= utcnow():
            return None
        return _StoredRefresh(row)

    def authenticate_user(self, refresh_token: _StoredRefresh) -> Person | None:
        return self.work.person

    def revoke_old_credential(self, refresh_token: _StoredRefresh) -> None:
        self.work.revoked_refresh = True


class _RequestServer(AuthlibServer):
    """authlib's server for one request: its hooks read and write `work`."""

    def __init__(self, owner: UserAuthorization, work: _Work) -> None:
        super().__init__()
        self.owner = owner
        self.work = work
        self.register_grant(_CodeGrant, [_RequiredS256(required=True)])
        self.register_grant(_RefreshGrant)
        self.register_token_generator("default", self._generate)

    def query_client(self, client_id: str) -> ConsoleClient | None:
        return self.owner.client if client_id == CONSOLE_CLIENT_ID else None

    def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None:
        """Access tokens are self-contained JWTs; refresh tokens are stored by `_generate`."""

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        """No signal subscribers."""

    def create_oauth2_request(self, request: _Request) -> _Request:
        return request

    def handle_response(self, status: int, body: Any, headers: Any) -> tuple[int, Any, dict[str, str]]:
        return status, body, dict(headers)

    def _generate(
        self,
        *,
        grant_type: str,
        client: ClientMixin,
        user: Person,
        scope: str | None,
        expires_in: int | None = None,
        include_refresh_token: bool = True,
    ) -> dict[str, Any]:
        scopes = grant_scopes(scope or "", user.org.type)
        self.work.granted_scope = " ".join(scopes)
        issued = self.owner.smart.access_token_for_person(
            user.org,
            scopes,
            assertion_key_thumbprint=self.owner.signer.thumbprint,
            person_claims={"azp": CONSOLE_CLIENT_ID, "hie_user": user.user.id},
        )
        token = issued.response()
        if include_refresh_token:
            refresh = secrets.token_urlsafe(32)
            self.work.new_refresh.append(
                store.RefreshToken(
                    token_hash=store.digest(refresh),
                    client_id=client.get_client_id(),
                    user_id=user.user.id,
                    scope=scope or "",
                    expires_at=utcnow() + REFRESH_LIFETIME,
                    revoked=False,
                )
            )
            token["refresh_token"] = refresh
        return token


@dataclass(frozen=True)
class AuthorizeOutcome:
    """The authorization endpoint's answer: a redirect (`location`) or an error to show."""

    location: str = ""
    error: str = ""


def person_caller(person: Person, *, client_address: str, purpose: str = "", scopes: str = "") -> Caller:
    """How the gateway's own audit events name a person acting through the console."""
    return Caller(
        organization_id=person.org.id,
        organization_type=person.org.type,
        client_id=person.org.client_id,
        scopes=frozenset(scopes.split()),
        practitioner_id=person.user.username,
        practitioner_name=person.user.display_name,
        role=person.user.role,
        department=person.user.department,
        purpose_of_use=purpose,
        client_address=client_address,
    )


class UserAuthorization:
    """The gateway's authorization server for people (the console's sign-in)."""

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        smart: AuthorizationServer,
        signer: AssertionSigner,
        audit: AuditTrail,
        public_url: str,
    ) -> None:
        self.sessions = sessions
        self.smart = smart
        self.signer = signer
        self.audit = audit
        self.public_url = public_url
        self.client = ConsoleClient(redirect_uri=f"{public_url}{CONSOLE_CALLBACK_PATH}")

    def authorize_url(self, *, state: str, code_challenge: str) -> str:
        """Where the console sends the browser to sign in."""
        query = {
            "response_type": "code",
            "client_id": CONSOLE_CLIENT_ID,
            "redirect_uri": self.client.redirect_uri,
            "scope": ALL_SCOPES,
            "state": state,
            "code_challenge": code_challenge,
            "code_challenge_method": "S256",
        }
        return f"{AUTHORIZE_PATH}?{urlencode(query)}"

    def check_authorization_request(self, params: Mapping[str, str]) -> str:
        """'' if the request may be shown a sign-in form; otherwise an error to show (never a
        redirect to an unchecked redirect URI)."""
        server = _RequestServer(self, _Work())
        request = _Request("GET", f"{self.public_url}{AUTHORIZE_PATH}", params, {})
        try:
            server.get_consent_grant(request)
        except OAuth2Error as exc:
            return exc.description or exc.error
        return ""

    async def authorize(self, session: AsyncSession, params: Mapping[str, str], person: Person) -> AuthorizeOutcome:
        """Issue a code for a person already authenticated in `session`'s transaction."""
        work = _Work(person=person)
        server = _RequestServer(self, work)
        request = _Request("POST", f"{self.public_url}{AUTHORIZE_PATH}", params, {})
        try:
            grant = server.get_consent_grant(request)
        except OAuth2Error as exc:
            return AuthorizeOutcome(error=exc.description or exc.error)
        status, _, headers = server.create_authorization_response(request, grant_user=person, grant=grant)
        if status != 302:
            return AuthorizeOutcome(error="authorization refused")
        await store.purge_expired(session)
        session.add_all(work.new_codes)
        return AuthorizeOutcome(location=headers["Location"])

    async def token(self, params: Mapping[str, str], *, client_address: str) -> tuple[int, dict[str, Any]]:
        """The token endpoint for `authorization_code` and `refresh_token` grants."""
        work = _Work()
        async with self.sessions() as session, session.begin():
            user_id = ""
            if params.get("grant_type") == "authorization_code":
                work.code = await session.get(store.AuthorizationCode, store.digest(params.get("code", "")))
                user_id = work.code.user_id if work.code else ""
            elif params.get("grant_type") == "refresh_token":
                work.refresh = await session.get(store.RefreshToken, store.digest(params.get("refresh_token", "")))
                user_id = work.refresh.user_id if work.refresh else ""
            work.person = await self._active_person(session, user_id)
            server = _RequestServer(self, work)
            request = _Request("POST", f"{self.public_url}/oauth2/token", params, {})
            status, body, _ = server.create_token_response(request)
            body = json.loads(body) if isinstance(body, str) else dict(body)
            if status == 200 and not await self._consume(session, work):
                status, body = 400, {"error": "invalid_grant", "error_description": "the grant was already used"}
            if status == 200:
                session.add_all(work.new_refresh)
            if work.person is not None:
                await self.audit.record(
                    session,
                    caller=person_caller(work.person, client_address=client_address, scopes=work.granted_scope),
                    type="token.issue" if status == 200 else "token.refused",
                    action=Action.ACTION_EXECUTE,
                    outcome=Outcome.OUTCOME_SUCCESS if status == 200 else Outcome.OUTCOME_MINOR_FAILURE,
                    entities=[("Client", CONSOLE_CLIENT_ID)],
                )
        return status, body

    async def _active_person(self, session: AsyncSession, user_id: str) -> Person | None:
        user = await session.get(store.ConsoleUser, user_id) if user_id else None
        if user is None or user.status != "active":
            return None
        org = await gateway_store.organization(session, user.org_id)
        if org is None or org.status != "active":
            return None
        return Person(user=user, org=org)

    async def _consume(self, session: AsyncSession, work: _Work) -> bool:
        """Consume the code or refresh token once: a concurrent replay finds it gone."""
        if work.consumed_code and work.code is not None:
            result = await session.execute(
                delete(store.AuthorizationCode).where(store.AuthorizationCode.code_hash == work.code.code_hash)
            )
            return result.rowcount == 1  # type: ignore[attr-defined]
        if work.revoked_refresh and work.refresh is not None:
            result = await session.execute(
                update(store.RefreshToken)
                .where(store.RefreshToken.token_hash == work.refresh.token_hash, store.RefreshToken.revoked.is_(False))
                .values(revoked=True)
            )
            return result.rowcount == 1  # type: ignore[attr-defined]
        return False
