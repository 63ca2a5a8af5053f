"""How the gateway is served: uvicorn settings shared by `python -m gateway` and the tests."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

import uvicorn

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
        "http": "h11",
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
