"""How the gateway is served: uvicorn settings shared by `python -m gateway` and the tests."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from services.shared.config import Settings

# Mozilla "intermediate" TLS 1.2 suites (TLS 1.3 suites are always on): forward secrecy, AEAD only.
_TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)


def _modern_tls(config: uvicorn.Config, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    context = default()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


_INVALID_HTTP = (
    b'{"error": {"status": 400, "reason": "invalid-http", "message": "the request is not valid HTTP/1.1:'
    b" percent-encode characters outside ASCII in the URL (e.g. Chinese names in a query:"
    b' curl -G --data-urlencode family=...)"}}'
)


class _H11WithJsonErrors(H11Protocol):
    """uvicorn's h11 protocol, whose refusal of a request h11 cannot parse (a URL with raw UTF-8
    such as `?family=张`, which curl sends unencoded) is the exchange's JSON error, not a bare
    text/plain "Invalid HTTP request received."."""

    def send_400_response(self, msg: str) -> None:
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=_INVALID_HTTP),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def uvicorn_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """Uvicorn for the gateway: no access log (query strings can hold patient ids), no trust in
    proxy headers, HTTPS when a certificate is configured (TLS 1.2 or newer, AEAD suites only)."""
    options: dict[str, Any] = {
        "log_level": settings.log_level.lower(),
        "access_log": False,
        "proxy_headers": False,
        "timeout_graceful_shutdown": 10,
        # Each request starts from an empty context: asyncio can carry one request's context vars
        # (its trace) into the connection's later requests (cpython#140947), e.g. after a
        # streamed response.
        "reset_contextvars": True,
        # h11, not httptools: under the contract run, httptools answered a plain keep-alive GET
        # with uvicorn's bare "400 Invalid HTTP request received" (text/plain, no reason) after
        # the generated requests before it; h11 did not. uvloop stays.
        "http": _H11WithJsonErrors,
    }
    if settings.https_cert_file and settings.https_key_file:
        options |= {
            "ssl_certfile": str(settings.https_cert_file),
            "ssl_keyfile": str(settings.https_key_file),
            "ssl_ciphers": _TLS12_CIPHERS,
            "ssl_context_factory": _modern_tls,
        }
    return uvicorn.Config(app, **(options | overrides))


def scheme(settings: Settings) -> str:
    """The URL scheme the gateway answers on."""
    return "https" if settings.https_cert_file else "http"
