"""Content negotiation on the FHIR facade: the FHIR JSON media type and the middleware that takes
`_format` off the query and answers an XML-only request 406 with an OperationOutcome."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import ApiError, error_response

FHIR_JSON = "application/fhir+json"

# FHIR R4 http.html#mime-type: `_format` values and Accept media types meaning JSON (the only
# format served; XML is answered 406 Not Acceptable, as FHIR allows a server that does not serve it).
_JSON_FORMATS = frozenset({"json", "application/json", "application/fhir+json"})
_JSON_ACCEPT = frozenset({"application/fhir+json", "application/json", "application/*", "*/*", "application/json+fhir"})


def _accepts_json(accept: str) -> bool:
    """Whether an Accept header admits JSON (q=0 excludes a type; no header admits anything)."""
    if not accept.strip():
        return True
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if media.lower() in _JSON_ACCEPT and not any(p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00") for p in params):
            return True
    return False


class FhirFormat:
    """Content negotiation on the FHIR facade: `_format=json` is taken off the query (routes are
    strict about parameters) and an XML-only request, by `_format` or Accept, is 406 with an
    OperationOutcome. Binary reads negotiate their own content type (the document's)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith("/fhir/"):
            await self.app(scope, receive, send)
            return
        query = scope.get("query_string", b"").decode("utf-8", "replace")
        items = parse_qsl(query, keep_blank_values=True)
        formats = [v for k, v in items if k == "_format"]
        acceptable = all(f.split(";")[0].strip().lower() in _JSON_FORMATS for f in formats)
        if not formats and not path.startswith("/fhir/R4/Binary/"):
            accept = dict(scope.get("headers", ())).get(b"accept", b"").decode("latin-1")
            acceptable = _accepts_json(accept)
        if not acceptable:
            error = ApiError(
                406, "format-not-acceptable", "only JSON (application/fhir+json) is served; XML is not supported"
            )
            await error_response(Request(scope), error)(scope, receive, send)
            return
        if formats:
            kept = urlencode([(k, v) for k, v in items if k != "_format"])
            scope = {**scope, "query_string": kept.encode("ascii")}
        await self.app(scope, receive, send)
