"""The gateway application: OAuth2 endpoints, the REST API, middleware and error handling."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute, iter_route_contexts
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.trace import Span
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from gateway import console, store
from gateway.deps import call_context
from gateway.errors import RETRY_AFTER_SECONDS, ApiError, error_response
from gateway.limits import BodySizeLimit, TokenBuckets
from gateway.metrics import RequestMetrics
from gateway.routes import (
    audit,
    consent,
    documents,
    oauth,
    patient_index,
    patients,
    referrals,
    subscriptions,
    teleconsult,
    workflow_contract,
    workflows,
)
from gateway.routes.fhir import capability as fhir_capability
from gateway.routes.fhir.negotiation import FhirFormat
from gateway.smart import ALLOWED_SCOPES, AuthorizationServer
from gateway.standing import OrganizationStanding
from hie.audit.v1 import audit_pb2_grpc
from hie.consent.v1 import consent_pb2_grpc
from hie.mpi.v1 import mpi_pb2_grpc
from hie.referral.v1 import referral_pb2_grpc
from hie.registry.v1 import registry_pb2_grpc
from hie.teleconsult.v1 import teleconsult_pb2_grpc
from services.shared import migrations
from services.shared.audit_trail import AUDIT_TOPIC, AuditTrail, audit_sender
from services.shared.auth import PlatformCredentials, TokenVerifier
from services.shared.clients import open_channel
from services.shared.components import SERVICES
from services.shared.config import Settings
from services.shared.db import engine_for, session_factory
from services.shared.metrics import watch_gateway
from services.shared.outbox import Outbox
from services.shared.storage_faults import storage_unavailable
from services.shared.tracing import current_trace_ids

_log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_NOT_JSON = "the request body is not valid JSON (UTF-8)"


# Span attributes that would carry the request's path or query: local patient ids travel there.
_URL_ATTRIBUTES = ("http.target", "http.url", "url.path", "url.query", "url.full")


def _scrub_url(span: Span, scope: dict[str, Any]) -> None:
    """Keep patient identifiers out of traces: the route template (`http.route`) names the
    operation; the concrete path and query string are not recorded."""
    if span.is_recording():
        for attribute in _URL_ATTRIBUTES:
            span.set_attribute(attribute, "[redacted]")


def _openapi_with_security(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document, declaring the SMART Backend Services flow and the user assertion."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schema.setdefault("components", {})["securitySchemes"] = {
        "smartBackendServices": {
            "type": "oauth2",
            "description": "Client credentials with a private_key_jwt client assertion (RFC 7523).",
            "flows": {
                "clientCredentials": {
                    "tokenUrl": "/oauth2/token",
                    "scopes": {scope: scope for scopes in ALLOWED_SCOPES.values() for scope in scopes},
                }
            },
        },
        "userAssertion": {
            "type": "apiKey",
            "in": "header",
            "name": "X-HIE-User-Assertion",
            "description": "The hospital's signed JWT naming the acting practitioner, role and purpose of use.",
        },
    }
    schema["components"].setdefault("schemas", {}).update(_ERROR_SCHEMAS)
    authenticated = _authenticated_operations(app)
    for path, operations in schema.get("paths", {}).items():
        # FHIR resources are application/fhir+json; SMART discovery under /fhir/R4 is plain JSON.
        fhir = path.startswith("/fhir/") and "/.well-known/" not in path
        for method, operation in operations.items():
            if (method.upper(), path) in authenticated:
                operation["security"] = [{"smartBackendServices": [], "userAssertion": []}]
            _declare_errors(operation, fhir=fhir, oauth=path.startswith("/oauth2/"), write=method in _WRITES)
            _declare_request_rules(operation, _rules_of(method.upper(), path, operation))
    app.openapi_schema = schema
    return schema


def _authenticated_operations(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path) of the routes that take the caller's token and user assertion (the
    `Context` dependency); public ones (a JWKS) declare no security."""

    def needs_caller(dependant: Any) -> bool:
        return any(d.call is call_context or needs_caller(d) for d in dependant.dependencies)

    return {
        (method, path)
        for path, methods, route in _api_routes(app)
        if needs_caller(route.dependant)
        for method in methods
    }


def _api_routes(app: FastAPI, *, in_schema: bool = False) -> list[tuple[str, set[str], APIRoute]]:
    """(full path, methods, route) of every API route, through the included routers (FastAPI
    keeps them nested: `app.routes` holds the routers, not their routes)."""
    return [
        (context.path, set(context.methods or ()), context.original_route)
        for context in iter_route_contexts(app.routes)
        if isinstance(context.original_route, APIRoute)
        and context.path
        and (context.include_in_schema or not in_schema)
    ]


# Rules a request must also follow that JSON Schema cannot state (a rule across fields, a check
# digit, a FHIR resource's structure, the state or configuration of the exchange): per operation,
# the 400 reasons they give and what each means. Declared in the OpenAPI document as the
# extension `x-hie-request-rules` and in the 400 description, so a client (and the contract test)
# knows a schema-valid request may still be refused for exactly these reasons.
_FHIR_SEARCH_SYNTAX = "a search value in FHIR R4 search syntax (token system|code, date prefixes, _count a number)"
_FHIR_SEARCH = {
    reason: _FHIR_SEARCH_SYNTAX
    for reason in (
        "search-value-invalid",
        "date-invalid",
        "status-invalid",
        "search-parameter-unknown",
        "count-invalid",
    )
}
_TEXT = "text without control, format, surrogate or private-use characters"
# The mpi's checks of demographic values (services/mpi/domain.py).
_DEMOGRAPHICS = {
    "phone-invalid": "6 to 15 digits (+86 allowed)",
    "birth-date-invalid": "a real calendar date from 1880 to today",
    **{f"{field}-invalid": _TEXT for field in ("name", "family", "given")},
    **{
        f"national-id-{problem}": "the national id's check digit and birth date (GB 11643)"
        for problem in ("format", "region", "birth_date", "check_digit")
    },
}
# A document's content agrees with its metadata (hash, size, media type) and its codes come from
# the registry's value sets (services/registry/README.md).
_DOCUMENT = {
    reason: "content, SHA-256 and size agree; codes, media type, relation and study as the registry's README says"
    for reason in (
        "content-invalid",
        "content-empty",
        "content-corrupt",
        "content-not-allowed",
        "hash-invalid",
        "hash-mismatch",
        "size-mismatch",
        "mime-type-invalid",
        "confidentiality",
        "service-period-invalid",
        "relation-invalid",
        "study-uid-invalid",
        "wado-url-invalid",
        "source-document-id-invalid",
        "type-code-unknown",
        "created-invalid",
        "stream-header-missing",
        "stream-content-in-header",
        "stream-header-repeated",
    )
} | {f"{field}-invalid": _TEXT for field in ("title", "type", "class", "department")}
REQUEST_RULES: dict[tuple[str, str], dict[str, str]] = {
    ("POST", "/api/v1/documents"): _DOCUMENT,
    ("POST", "/api/v1/patients"): {
        "name-missing": "a name, or a family or given name, with a letter in it",
        "name-too-long": "the name (or family and given name together) at most 64 characters",
        **_DEMOGRAPHICS,
        "national-id-conflict": "the national id and an NNCHN identifier name the same number",
        "local-id-invalid": "printable characters without spaces",
        "identifier-invalid": "an identifier needs a system and a value",
        **{f"{field}-invalid": _TEXT for field in ("name", "family", "given", "province", "city", "district")},
        **{f"{field}-invalid": _TEXT for field in ("address", "postcode")},
    },
    ("GET", "/api/v1/patients/search"): {
        "search-too-broad": "give a name, birth date, national id or phone (at least one criterion)",
        "search-param-unknown": "only the parameters listed for this route",
        **_DEMOGRAPHICS,
    },
    ("GET", "/fhir/R4/Patient"): {
        "search-too-broad": "give a name, birthdate, identifier or telecom (at least one criterion)",
        **_FHIR_SEARCH,
        **_DEMOGRAPHICS,
    },
    ("POST", "/fhir/R4/Patient/_search"): {
        "search-too-broad": "give a name, birthdate, identifier or telecom (at least one criterion)",
        **_FHIR_SEARCH,
        **_DEMOGRAPHICS,
    },
    ("GET", "/fhir/R4/Consent"): {"patient-required": "give one of patient or patient.identifier", **_FHIR_SEARCH},
    ("GET", "/fhir/R4/DocumentReference"): {
        "patient-required": "give one of patient or patient.identifier",
        **_FHIR_SEARCH,
    },
    ("GET", "/fhir/R4/List"): {
        "patient-required": "give one of patient or patient.identifier",
        **_FHIR_SEARCH,
    },
    ("GET", "/fhir/R4/AuditEvent"): {
        **_FHIR_SEARCH,
        "search-param-unknown": _FHIR_SEARCH_SYNTAX,
        "outcome-invalid": "outcome: 0, 4, 8 or 12",
        "purpose-invalid": "purpose: a v3 PurposeOfUse code the exchange uses",
    },
    ("POST", "/api/v1/consent/directives"): {
        "provision-invalid": "at least one permit or deny provision; codes from the consent vocabularies",
        "obligation-unknown": "obligations among deidentify, no-redisclosure",
    },
    ("PUT", "/api/v1/consent/directives/{directive_id}"): {
        "provision-invalid": "at least one permit or deny provision; codes from the consent vocabularies",
        "obligation-unknown": "obligations among deidentify, no-redisclosure",
    },
    ("POST", "/api/v1/subscriptions"): {
        "endpoint-invalid": "an https URL (http in development) whose host resolves to an allowed address",
    },
    ("PUT", "/api/v1/documents/source/{source_document_id}"): {
        "metadata-invalid": "X-HIE-Document-Metadata is base64url of the document metadata JSON",
        **_DOCUMENT,
    },
    ("POST", "/fhir/R4/"): {"bundle-invalid": "an IHE MHD ITI-65 transaction Bundle (FHIR R4)"},
    ("POST", "/fhir/R4/Consent"): {"consent-invalid": "a FHIR R4 Consent resource"},
    ("POST", "/fhir/R4/Patient/$match"): {"parameters-invalid": "a FHIR R4 Parameters resource with a Patient"},
    ("PUT", "/fhir/R4/Patient"): {
        "conditional-update-invalid": "identifier urn:hie:patient-id:<your organisation>|<local id>",
        "patient-invalid": "a FHIR R4 Patient resource",
    },
    ("GET", "/fhir/R4/Patient/$ihe-pix"): {
        "source-identifier-invalid": "sourceIdentifier urn:hie:patient-id:<domain>|<local id>",
    },
    # Referrals and consultations (REST and FHIR).
    **workflow_contract.REQUEST_RULES,
}


# Every request: the services refuse NUL in any text (services/shared/server.py).
_EVERY_REQUEST = {"nul-character": "no text field contains NUL (U+0000)"}
# A page token is the one the previous page handed out (sealed, carrying the search).
_PAGE_TOKEN = {
    reason: "a page token / page the previous answer handed out"
    for reason in ("page-token", "page-token-invalid", "page-invalid")
}


def _rules_of(method: str, path: str, operation: dict[str, Any]) -> dict[str, str]:
    rules = {**_EVERY_REQUEST, **REQUEST_RULES.get((method, path), {})}
    if any(p.get("name") in {"page_token", "page"} for p in operation.get("parameters", [])):
        rules.update(_PAGE_TOKEN)
    return rules


def _declare_request_rules(operation: dict[str, Any], rules: dict[str, str]) -> None:
    if not rules:
        return
    operation["x-hie-request-rules"] = dict(rules)
    bad = operation["responses"]["400"]
    bad["description"] += "; also refused, with these reasons: " + "; ".join(f"{k}: {v}" for k, v in rules.items())


# How long /readyz waits for each dependency's health answer.
READINESS_TIMEOUT_SECONDS = 1.0


async def _serving(channel: grpc.aio.Channel) -> bool:
    """Whether the service behind the channel answers its health check SERVING now."""
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=READINESS_TIMEOUT_SECONDS
        )
    except grpc.aio.AioRpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


# The error bodies every route may answer with (gateway/errors.py): JSON `{"error": …}` on the
# REST API, a FHIR OperationOutcome on /fhir/.
_ERROR_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["status", "reason", "message"],
                "properties": {
                    "status": {"type": "integer"},
                    "reason": {"type": "string"},
                    "message": {"type": "string"},
                    "trace_id": {"type": "string"},
                },
            }
        },
    },
    # RFC 6749 §5.2: the token endpoint answers errors in OAuth's own form.
    "OAuthError": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}, "error_description": {"type": "string"}},
    },
    "OperationOutcome": {
        "type": "object",
        "required": ["resourceType", "issue"],
        "properties": {"resourceType": {"const": "OperationOutcome"}, "issue": {"type": "array"}},
    },
}
_ERROR_STATUSES = {
    "400": "invalid request (reason names the problem)",
    "401": "no valid access token or user assertion",
    "403": "scope, role or consent does not permit this",
    "404": "no such resource (or not visible to the caller)",
    "422": "the request cannot be processed in the resource's current state",
    "429": "too many requests from this client (Retry-After says when to try again)",
    "405": "the method is not supported here (Allow names those that are)",
}


# A write may meet a conflict: its Idempotency-Key used for another request, a resource that
# exists already or changed meanwhile (409, the reason names which).
_WRITES = {"post", "put", "patch", "delete"}
_CONFLICT = "conflict: the Idempotency-Key was used for another request, or the resource exists or changed"


def _declare_errors(operation: dict[str, Any], *, fhir: bool, oauth: bool = False, write: bool = False) -> None:
    """Declare the error responses the route gives, with their real body (FastAPI's default 422
    `HTTPValidationError` is not what the gateway answers: validation errors are 400), and
    application/fhir+json on FHIR routes."""
    name = "OperationOutcome" if fhir else "OAuthError" if oauth else "Error"
    body = {"$ref": f"#/components/schemas/{name}"}
    media = "application/fhir+json" if fhir else "application/json"
    responses = operation.setdefault("responses", {})
    statuses = {**_ERROR_STATUSES, "409": _CONFLICT} if write and not oauth else _ERROR_STATUSES
    for status, description in statuses.items():
        responses[status] = {"description": description, "content": {media: {"schema": body}}}
    if fhir:
        for status, response in responses.items():
            content = response.get("content")
            if status.startswith("2") and content and "application/json" in content:
                content["application/fhir+json"] = content.pop("application/json")


def _allowed_methods(request: Request) -> list[str]:
    """The methods the routes of the request's path serve."""
    matching = [
        (path, served)
        for path, served, _ in _api_routes(request.app, in_schema=True)
        if compile_path(path)[0].match(request.url.path)
    ]
    # The most specific path names the resource, as the OpenAPI document lists them: a literal
    # `/Patient/$match` is not an id of `/Patient/{patient_id}`, nor `/consultations/{id}/report`
    # a move of `/consultations/{id}/{move}`.
    fewest = min((path.count("{") for path, _ in matching), default=0)
    return sorted({method for path, served in matching if path.count("{") == fewest for method in served})


@dataclass
class ServiceStubs:
    """The gateway's stub for each service of the component list (one field per component)."""

    mpi: mpi_pb2_grpc.PatientIndexStub
    registry: registry_pb2_grpc.DocumentRegistryStub
    consent: consent_pb2_grpc.ConsentDecisionPointStub
    referral: referral_pb2_grpc.ReferralsStub
    teleconsult: teleconsult_pb2_grpc.TeleconsultationsStub
    audit: audit_pb2_grpc.AuditLogStub


class TraceAndSecurityHeaders:
    """The trace id and the security headers on every response, and 504 `timeout` for a request
    the exchange did not start answering within HIE_REQUEST_TIMEOUT_SECONDS.

    Plain ASGI: it was a `@app.middleware("http")` function, whose BaseHTTPMiddleware runs the
    rest of the application in a task of its own with memory streams between them; measured
    with `hie bench load --only document_query` (issue 21) that plumbing was about 8 % of the
    gateway's CPU per request. The deadline covers the time until the response starts, as
    `call_next` did (a streamed body may take longer)."""

    def __init__(self, app: Any, *, settings: Settings) -> None:
        self.app = app
        self._timeout = settings.request_timeout_seconds
        self._hsts = settings.public_url.startswith("https://")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_with_headers(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not deadline.expired():
                    deadline.reschedule(None)
                self._add_headers(MutableHeaders(scope=message))
            await send(message)

        try:
            async with asyncio.timeout(self._timeout) as deadline:
                await self.app(scope, receive, send_with_headers)
        except TimeoutError:
            if started:
                raise
            response = error_response(Request(scope), ApiError(504, "timeout", "the exchange did not answer in time"))
            await response(scope, receive, send_with_headers)

    def _add_headers(self, headers: MutableHeaders) -> None:
        trace_id, span_id = current_trace_ids()
        if trace_id:
            headers["X-Trace-Id"] = trace_id
            # W3C Trace Context Level 2 response header.
            headers["traceresponse"] = f"00-{trace_id}-{span_id}-01"
        headers["X-Content-Type-Options"] = "nosniff"
        headers["Cache-Control"] = headers.get("Cache-Control", "no-store")
        headers["Referrer-Policy"] = "no-referrer"
        headers["X-Frame-Options"] = "DENY"
        # A page sets its own (the console's allows its own script and style files).
        headers.setdefault("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")
        if self._hsts:
            headers["Strict-Transport-Security"] = "max-age=31536000; includeSubDomains"


def create_app(settings: Settings) -> FastAPI:
    """The gateway for the services named in `settings.targets`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = engine_for(settings, "gateway")
        await migrations.upgrade(
            engine, schema=settings.schema_for("gateway"), versions=MIGRATIONS, metadata=store.metadata
        )
        sessions = session_factory(engine)
        channels = {name: open_channel(target, tls=settings.grpc_tls) for name, target in settings.targets.items()}
        app.state.settings = settings
        app.state.sessions = sessions
        app.state.assertion_ledger = store.UserAssertionLedger(
            sessions, url=settings.database_url_for("gateway"), schema=settings.schema_for("gateway")
        )
        app.state.verifier = TokenVerifier(settings.trusted_jwks_file)
        app.state.standing = OrganizationStanding(sessions, ttl_seconds=settings.revocation_check_seconds)
        app.state.buckets = TokenBuckets(rate=settings.rate_limit_per_second, burst=settings.rate_limit_burst)
        outbox = Outbox(store.metadata.tables["outbox"], sessions)
        outbox.lease = timedelta(seconds=settings.outbox_lease_seconds)
        outbox.register(
            AUDIT_TOPIC,
            audit_sender(
                audit_pb2_grpc.AuditLogStub(channels["audit"]),
                PlatformCredentials.from_file(
                    settings.service_signing_key_file, service="gateway", issuer="urn:hie:service:gateway"
                ),
            ),
        )
        app.state.outbox = outbox
        app.state.authorization = AuthorizationServer(
            sessions=sessions,
            signing_key_file=settings.gateway_signing_key_file,
            issuer=settings.public_url,
            audit=AuditTrail(outbox, service="gateway"),
            audit_notify=outbox.notify,
        )
        # One stub per service of the component list (services/shared/components.py).
        app.state.stubs = ServiceStubs(**{c.name: c.stub()(channels[c.name]) for c in SERVICES})
        app.state.channels = channels
        outbox.start()
        samplers = watch_gateway(outbox, settings)
        try:
            yield
        finally:
            for sampler in samplers:
                sampler.cancel()
            await outbox.stop()
            for channel in channels.values():
                await channel.close()
            await app.state.assertion_ledger.close()
            await engine.dispose()

    app = FastAPI(
        title="Regional Health Information Exchange",
        version="1",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.include_router(oauth.router)
    app.include_router(patients.router)
    app.include_router(documents.router)
    app.include_router(workflows.router)
    app.include_router(teleconsult.router)
    app.include_router(referrals.router)
    app.include_router(audit.router)
    app.include_router(consent.router)
    app.include_router(subscriptions.router)
    app.include_router(patient_index.router)
    # The FHIR facade (all under /fhir/R4): the CapabilityStatement and every resource module.
    for fhir_router in fhir_capability.routers():
        app.include_router(fhir_router)
    console.mount(app)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> JSONResponse:
        # Asked now, of every dependency at once: a channel's cached state lags a restart (it
        # said "down" after a service was back and "ready" ten seconds into an outage).
        channels: dict[str, grpc.aio.Channel] = request.app.state.channels
        names = sorted(channels)
        answers = await asyncio.gather(*(_serving(channels[name]) for name in names))
        down = [name for name, serving in zip(names, answers, strict=True) if not serving]
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if down else None
        return JSONResponse(
            {"status": "degraded" if down else "ready", "down": down},
            status_code=503 if down else 200,
            headers=headers,
        )

    # The innermost of the gateway's own middleware (added before the ones below, as it was).
    app.add_middleware(TraceAndSecurityHeaders, settings=settings)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Pydantic's own messages echo the input (possibly patient data): name the fields only.
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(request, ApiError(400, "invalid-request", _NOT_JSON))
        fields = sorted({".".join(str(p) for p in e.get("loc", ()) if p != "body") for e in errors})
        if fields == [""]:
            # The body as a whole is of the wrong kind (an array, a string, a number).
            return error_response(request, ApiError(400, "invalid-request", "the request body must be a JSON object"))
        return error_response(request, ApiError(400, "invalid-request", "invalid fields: " + ", ".join(fields)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = {404: "no-route", 405: "method-not-allowed"}.get(exc.status_code, "http")
        if exc.status_code == 400:
            # FastAPI's "error parsing the body": a JSON body that is not UTF-8 (GB18030, Latin-1).
            return error_response(request, ApiError(400, "invalid-request", _NOT_JSON))
        # RFC 9110 §15.5.6: a 405 names the methods the resource supports. Starlette's `Allow`
        # names those of the first route matching the path only: the path's GET and POST are
        # separate routes here, so every route of the path is asked.
        headers = {k: v for k, v in (exc.headers or {}).items() if k.lower() == "allow"}
        if exc.status_code == 405:
            headers = {"Allow": ", ".join(_allowed_methods(request))}
        return error_response(request, ApiError(exc.status_code, reason, "request not served", headers=headers))

    @app.exception_handler(RecursionError)
    async def too_deep(request: Request, exc: RecursionError) -> JSONResponse:
        return error_response(request, ApiError(400, "invalid-request", "request body nested too deeply"))

    @app.exception_handler(Exception)
    async def unhandled(request: Request, exc: Exception) -> JSONResponse:
        # The route template, not the path: paths can carry patient local ids.
        route = getattr(request.scope.get("route"), "path", "[unmatched route]")
        fault = storage_unavailable(exc, component="gateway", where=f"{request.method} {route}")
        if fault is not None:
            # The gateway's own database (tokens, its audit outbox) is full or down.
            headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
            return error_response(request, ApiError(503, fault.reason, fault.message, headers=headers))
        _log.error("unhandled %s on %s %s", type(exc).__name__, request.method, route)
        return error_response(request, ApiError(500, "internal", "the exchange could not complete this"))

    app.openapi = lambda: _openapi_with_security(app)  # type: ignore[method-assign]
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-HIE-User-Assertion", "Idempotency-Key", "traceparent"],
            expose_headers=["X-Trace-Id", "traceresponse", "Repr-Digest", "Retry-After"],
        )
    app.add_middleware(BodySizeLimit)
    app.add_middleware(FhirFormat)
    app.add_middleware(RequestMetrics)
    # No spans of their own for the ASGI send and receive events: two more spans per request
    # (`http send` for the response start and its body) that told nothing the request's server
    # span does not, each started and ended on the hot path (issue 21).
    FastAPIInstrumentor.instrument_app(
        app, excluded_urls="healthz,readyz", server_request_hook=_scrub_url, exclude_spans=["receive", "send"]
    )
    return app
