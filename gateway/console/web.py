"""Sign-in and sessions: the authorization endpoint's sign-in form, the console's code + PKCE
round trip, the HttpOnly session cookie, CSRF checks, and page rendering with a strict
Content-Security-Policy (no inline script or style)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlsplit

import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.ext.asyncio import AsyncSession

from gateway import store as gateway_store
from gateway.console import store, upstream, users
from gateway.console.api import ConsoleApi, SignInRequired, exchange_code
from gateway.console.authorization import AUTHORIZE_PATH, Person, person_caller
from gateway.console.i18n import LANGUAGES, language_of
from gateway.console.state import console_state
from services.shared.audit_trail import Action, Outcome
from services.shared.db import utcnow
from services.shared.errors import Unauthenticated

SESSION_COOKIE = "hie_console"
SIGNIN_CSRF_COOKIE = "hie_signin_csrf"
SESSION_LIFETIME = datetime.timedelta(hours=8)
PENDING_LIFETIME = datetime.timedelta(minutes=10)
_SEEN_GRANULARITY = datetime.timedelta(seconds=60)
# No inline script or style anywhere in the console: everything comes from /console/static.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
_OAUTH_PARAMS = (
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "code_challenge",
    "code_challenge_method",
)

router = APIRouter(include_in_schema=False)


@dataclass
class ConsoleContext:
    """The signed-in person of a console request."""

    request: Request
    session: store.ConsoleSession
    user: store.ConsoleUser
    org: gateway_store.Organization
    api: ConsoleApi

    @property
    def lang(self) -> str:
        return self.session.language

    @property
    def person(self) -> Person:
        return Person(user=self.user, org=self.org)


def render(request: Request, template: str, *, status: int = 200, **context: Any) -> Response:
    """A page with the console's security headers."""
    templates = console_state(request.app).templates
    response = templates.TemplateResponse(request, template, context, status_code=status)
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return response


def page(ctx: ConsoleContext, template: str, *, status: int = 200, **context: Any) -> Response:
    return render(
        ctx.request,
        template,
        status=status,
        lang=ctx.lang,
        me=ctx.user,
        org=ctx.org,
        csrf=ctx.session.csrf_token,
        purpose=ctx.session.purpose_of_use,
        purposes=users.allowed_purposes(ctx.user.role),
        **context,
    )


def _cookie(response: Response, request: Request, name: str, value: str, *, path: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=path,
        httponly=True,
        samesite="strict",
        secure=console_state(request.app).secure_cookies,
    )


async def console_context(request: Request) -> ConsoleContext:
    """The live session of the cookie, its person and organisation; SignInRequired otherwise."""
    sid = request.cookies.get(SESSION_COOKIE, "")
    if not sid:
        raise SignInRequired
    now, idle = utcnow(), console_state(request.app).idle_timeout
    user = org = None
    async with request.app.state.sessions() as db, db.begin():
        row = await db.get(store.ConsoleSession, store.digest(sid))
        if row is None or row.expires_at <= now:
            raise SignInRequired
        idle_ended = row.last_seen_at + idle <= now
        if idle_ended:
            # Idle too long: the session ends here (and its refresh token with it), not just
            # this request; committed before the sign-in redirect.
            await _end_session(db, row)
        else:
            # One write a minute at most, not one per request.
            if now - row.last_seen_at >= _SEEN_GRANULARITY:
                row.last_seen_at = now
            user = await db.get(store.ConsoleUser, row.user_id)
            org = await gateway_store.organization(db, user.org_id) if user else None
    if idle_ended or user is None or org is None or user.status != "active" or org.status != "active":
        raise SignInRequired
    return ConsoleContext(request, row, user, org, ConsoleApi(request, row, user, org_client_id=org.client_id))


Console = Annotated[ConsoleContext, Depends(console_context)]


async def checked_form(request: Request, ctx: ConsoleContext) -> dict[str, str]:
    """The form of a state-changing request, after the CSRF checks (synchronizer token bound
    to the session, and the Origin when the browser sends one)."""
    _check_origin(request)
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    if not secrets.compare_digest(form.get("csrf", ""), ctx.session.csrf_token):
        raise CsrfRefused
    return form


class CsrfRefused(Exception):
    """A change without the session's CSRF token, or from another origin."""


def _check_origin(request: Request) -> None:
    origin = request.headers.get("origin")
    # The gateway sends Referrer-Policy: no-referrer, so browsers send "Origin: null" on the
    # console's own form posts; the synchronizer token (and SameSite=Strict) decide those.
    if origin is not None and origin != "null":
        public = urlsplit(request.app.state.settings.public_url)
        if origin != f"{public.scheme}://{public.netloc}":
            raise CsrfRefused


def home_of(user: store.ConsoleUser) -> str:
    return {
        "auditor": "/console/audit",
        "data-steward": "/console/steward",
        "admin": "/console/users",
    }.get(user.role, "/console/clinician")


# -- the authorization endpoint: sign-in form ------------------------------------------------


def _signin_page(
    request: Request, params: dict[str, str], *, lang: str, error: str = "", status: int = 200, org_id: str = ""
) -> Response:
    token = secrets.token_urlsafe(32)
    response = render(
        request,
        "signin.html",
        status=status,
        lang=lang,
        oauth={k: params[k] for k in _OAUTH_PARAMS if k in params},
        csrf=token,
        error=error,
        org_id=org_id,
    )
    _cookie(response, request, SIGNIN_CSRF_COOKIE, token, path=AUTHORIZE_PATH, max_age=900)
    return response


@router.get(AUTHORIZE_PATH)
async def authorize_form(request: Request) -> Response:
    """RFC 6749 §4.1.1: the person authenticates here (the gateway's sign-in page)."""
    params = {k: v for k, v in request.query_params.items() if k in _OAUTH_PARAMS}
    lang = request.query_params.get("lang") or language_of(request.headers.get("accept-language", ""))
    lang = lang if lang in LANGUAGES else "zh"
    problem = console_state(request.app).authorization.check_authorization_request(params)
    if problem:
        return render(request, "message.html", status=400, lang=lang, title_key="signin.bad_request", detail=problem)
    return _signin_page(request, params, lang=lang)


@router.post(AUTHORIZE_PATH)
async def authorize_submit(request: Request) -> Response:
    """Check the password (lockout after repeated failures) and answer with a code."""
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    lang = form.get("lang", "zh") if form.get("lang") in LANGUAGES else "zh"
    params = {k: form[k] for k in _OAUTH_PARAMS if k in form}
    state = console_state(request.app)
    try:
        _check_origin(request)
    except CsrfRefused:
        return render(request, "message.html", status=403, lang=lang, title_key="signin.bad_request", detail="")
    if not secrets.compare_digest(form.get("csrf", ""), request.cookies.get(SIGNIN_CSRF_COOKIE, "-")):
        return _signin_page(request, params, lang=lang, error="signin.expired", status=400)
    problem = state.authorization.check_authorization_request(params)
    if problem:
        return render(request, "message.html", status=400, lang=lang, title_key="signin.bad_request", detail=problem)
    org_id, username = form.get("org", "")[:64].strip(), form.get("username", "")[:64].strip()
    address = request.client.host if request.client else ""
    # Each password check costs tens of milliseconds of argon2: the token endpoint's per-address
    # bucket bounds how fast one address can make the gateway spend it.
    if request.app.state.buckets.take(f"signin:{address}"):
        return _signin_page(request, params, lang=lang, error="signin.slow_down", status=429, org_id=org_id)
    if form.get("method") == "oidc":
        return await _start_upstream(request, params, org_id=org_id, lang=lang)
    async with request.app.state.sessions() as db, db.begin():
        result = await users.authenticate(db, org_id=org_id, username=username, password=form.get("password", ""))
        org = await gateway_store.organization(db, org_id)
        person = Person(user=result.user, org=org) if result.user is not None and org is not None else None
        if person is not None and org is not None and org.status != "active":
            result = users.SignInResult(result.user, "disabled")
        await _audit_sign_in(request, db, person, result.reason, address)
        if result.reason:
            outcome = None
        else:
            assert person is not None
            outcome = await state.authorization.authorize(db, params, person)
    if outcome is None:
        return _signin_page(request, params, lang=lang, error=f"signin.{result.reason}", status=401, org_id=org_id)
    if outcome.error:
        return render(
            request, "message.html", status=400, lang=lang, title_key="signin.bad_request", detail=outcome.error
        )
    response = RedirectResponse(outcome.location, status_code=303)
    response.delete_cookie(SIGNIN_CSRF_COOKIE, path=AUTHORIZE_PATH)
    return response


async def _audit_sign_in(request: Request, db: AsyncSession, person: Person | None, reason: str, address: str) -> None:
    state = console_state(request.app)
    if person is not None:
        caller = person_caller(person, client_address=address)
    else:
        from services.shared.auth import Caller

        caller = Caller(organization_id="", organization_type="", client_id="", client_address=address)
    await state.audit.record(
        db,
        caller=caller,
        type="user.sign-in" if not reason else ("user.locked" if reason == "locked" else "user.sign-in-refused"),
        action=Action.ACTION_EXECUTE,
        outcome=Outcome.OUTCOME_SUCCESS if not reason else Outcome.OUTCOME_MINOR_FAILURE,
    )
    request.app.state.outbox.notify()


# -- the console as an OAuth2 client -----------------------------------------------------------


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


@router.get("/console/login")
async def start_sign_in(request: Request) -> Response:
    """Send the browser to the gateway's authorization endpoint (code + PKCE S256)."""
    state_value = secrets.token_urlsafe(32)
    verifier, challenge = _pkce()
    lang = request.query_params.get("lang", "")
    async with request.app.state.sessions() as db, db.begin():
        await store.purge_expired(db)
        db.add(
            store.PendingSignIn(
                state_hash=store.digest(state_value),
                code_verifier=verifier,
                resume=lang if lang in LANGUAGES else "",
                expires_at=utcnow() + PENDING_LIFETIME,
            )
        )
    location = console_state(request.app).authorization.authorize_url(state=state_value, code_challenge=challenge)
    if lang in LANGUAGES:
        location += f"&lang={lang}"
    return RedirectResponse(location, status_code=303)


@router.get("/console/callback")
async def sign_in_callback(request: Request) -> Response:
    """RFC 6749 §4.1.2: the code comes back; the console exchanges it at the token endpoint and
    keeps the tokens server-side, giving the browser only an HttpOnly session cookie."""
    code, state_value = request.query_params.get("code", ""), request.query_params.get("state", "")
    lang = language_of(request.headers.get("accept-language", ""))
    async with request.app.state.sessions() as db, db.begin():
        pending = await db.get(store.PendingSignIn, store.digest(state_value)) if state_value else None
        if pending is not None:
            await db.delete(pending)
    if pending is None or pending.expires_at <= utcnow() or not code:
        return render(request, "message.html", status=400, lang=lang, title_key="signin.expired", detail="")
    lang = pending.resume or lang
    result = await exchange_code(request, code=code, verifier=pending.code_verifier)
    if result.status != 200:
        return render(request, "message.html", status=400, lang=lang, title_key="signin.expired", detail="")
    try:
        claims = request.app.state.verifier.verify(result.body["access_token"])
    except Unauthenticated:
        return render(request, "message.html", status=400, lang=lang, title_key="signin.expired", detail="")
    sid, now = secrets.token_urlsafe(32), utcnow()
    async with request.app.state.sessions() as db, db.begin():
        user = await db.get(store.ConsoleUser, str(claims.get("hie_user", "")))
        if user is None:
            return render(request, "message.html", status=400, lang=lang, title_key="signin.expired", detail="")
        db.add(
            store.ConsoleSession(
                id_hash=store.digest(sid),
                user_id=user.id,
                csrf_token=secrets.token_urlsafe(32),
                access_token=result.body["access_token"],
                access_expires_at=now + datetime.timedelta(seconds=int(result.body["expires_in"])),
                refresh_token=result.body.get("refresh_token", ""),
                purpose_of_use=users.default_purpose(user.role),
                language=lang,
                expires_at=now + SESSION_LIFETIME,
                last_seen_at=now,
            )
        )
    response = RedirectResponse(home_of(user), status_code=303)
    _cookie(response, request, SESSION_COOKIE, sid, path="/console", max_age=int(SESSION_LIFETIME.total_seconds()))
    return response


async def _end_session(db: AsyncSession, row: store.ConsoleSession) -> None:
    """Delete the session and revoke its refresh token."""
    refresh = await db.get(store.RefreshToken, store.digest(row.refresh_token))
    if refresh is not None:
        refresh.revoked = True
    await db.delete(row)


@router.post("/console/logout")
async def sign_out(request: Request, ctx: Console) -> Response:
    await checked_form(request, ctx)
    async with request.app.state.sessions() as db, db.begin():
        row = await db.get(store.ConsoleSession, ctx.session.id_hash)
        if row is not None:
            await _end_session(db, row)
    response = RedirectResponse("/console/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/console")
    return response


@router.post("/console/preferences")
async def set_preferences(request: Request, ctx: Console) -> Response:
    """The interface language, and the purpose of use the person acts for (within their role)."""
    form = await checked_form(request, ctx)
    async with request.app.state.sessions() as db, db.begin():
        row = await db.get(store.ConsoleSession, ctx.session.id_hash)
        if row is not None:
            if form.get("language") in LANGUAGES:
                row.language = form["language"]
            if form.get("purpose") in users.allowed_purposes(ctx.user.role):
                row.purpose_of_use = form["purpose"]
    back = form.get("back", "")
    return RedirectResponse(back if back.startswith("/console/") else home_of(ctx.user), status_code=303)


# -- an organisation's upstream OpenID Connect provider ----------------------------------------


def _upstream_redirect_uri(request: Request) -> str:
    return f"{request.app.state.settings.public_url}{upstream.UPSTREAM_CALLBACK_PATH}"


async def _start_upstream(request: Request, params: dict[str, str], *, org_id: str, lang: str) -> Response:
    """Send the browser to the organisation's provider, remembering the console's request."""
    async with request.app.state.sessions() as db:
        provider = await db.get(store.OidcProvider, org_id) if org_id else None
    if provider is None:
        return _signin_page(request, params, lang=lang, error="signin.no_upstream", status=400, org_id=org_id)
    try:
        started = await upstream.start(provider, redirect_uri=_upstream_redirect_uri(request))
    except (upstream.UpstreamRefused, httpx.HTTPError):
        return _signin_page(request, params, lang=lang, error="signin.upstream_failed", status=502, org_id=org_id)
    async with request.app.state.sessions() as db, db.begin():
        await store.purge_expired(db)
        db.add(
            store.PendingSignIn(
                state_hash=store.digest(started.state),
                code_verifier=started.verifier,
                nonce=started.nonce,
                org_id=org_id,
                resume=json.dumps({**params, "lang": lang}),
                expires_at=utcnow() + PENDING_LIFETIME,
            )
        )
    return RedirectResponse(started.location, status_code=303)


@router.get(upstream.UPSTREAM_CALLBACK_PATH)
async def upstream_callback(request: Request) -> Response:
    """The provider's answer: verify the ID token, find the organisation's person, and continue
    the console's own authorization request with a code of the exchange."""
    state_value, code = request.query_params.get("state", ""), request.query_params.get("code", "")
    lang = language_of(request.headers.get("accept-language", ""))
    async with request.app.state.sessions() as db, db.begin():
        pending = await db.get(store.PendingSignIn, store.digest(state_value)) if state_value else None
        if pending is not None:
            await db.delete(pending)
    if pending is None or pending.expires_at <= utcnow() or not pending.org_id or not code:
        return render(request, "message.html", status=400, lang=lang, title_key="signin.expired", detail="")
    params = json.loads(pending.resume)
    lang = params.pop("lang", lang)
    address = request.client.host if request.client else ""
    async with request.app.state.sessions() as db:
        provider = await db.get(store.OidcProvider, pending.org_id)
    if provider is None:
        return render(request, "message.html", status=400, lang=lang, title_key="signin.no_upstream", detail="")
    try:
        claims = await upstream.finish(
            provider,
            client_secret=store.client_secret_of(console_state(request.app).protection.fields, provider),
            code=code,
            verifier=pending.code_verifier,
            nonce=pending.nonce,
            redirect_uri=_upstream_redirect_uri(request),
        )
    except (upstream.UpstreamRefused, httpx.HTTPError):
        return render(request, "message.html", status=401, lang=lang, title_key="signin.upstream_failed", detail="")
    state = console_state(request.app)
    async with request.app.state.sessions() as db, db.begin():
        org = await gateway_store.organization(db, pending.org_id)
        user = await store.user_by_name(db, pending.org_id, str(claims.get(provider.username_claim, ""))[:64])
        reason = ""
        if user is None or org is None:
            reason = "invalid"
        elif user.status != "active" or org.status != "active":
            reason = "disabled"
        elif user.locked_until is not None and user.locked_until > utcnow():
            reason = "locked"
        elif user.oidc_subject not in (None, claims["sub"]):
            reason = "invalid"
        person = Person(user=user, org=org) if user is not None and org is not None else None
        await _audit_sign_in(request, db, person, reason, address)
        if reason:
            outcome = None
        else:
            assert user is not None
            assert person is not None
            user.oidc_subject = str(claims["sub"])[:255]
            outcome = await state.authorization.authorize(db, params, person)
    if outcome is None or outcome.error:
        return render(
            request, "message.html", status=401, lang=lang, title_key=f"signin.{reason or 'bad_request'}", detail=""
        )
    return RedirectResponse(outcome.location, status_code=303)
