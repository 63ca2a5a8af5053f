"""Which gRPC calls the OpenTelemetry interceptors trace: every call but the health checks
(services/shared/tracing.py, `_not_health_check`, the same answer as OpenTelemetry's
`filters.negate(filters.health_check())`)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from opentelemetry.instrumentation.grpc import filters

from services.shared.tracing import _not_health_check


class _ServerDetails:
    """What the aio server hands interceptors: a C-level object with `.method`."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def _client(method: str | bytes) -> grpc.aio.ClientCallDetails:
    return grpc.aio.ClientCallDetails(method, None, None, None, None)  # type: ignore[arg-type]


METHODS = [
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/hie.registry.v1.DocumentRegistry/FindDocuments",
    "/hie.consent.v1.ConsentDecisionPoint/Decide",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("make", [_ServerDetails, _client, lambda m: _client(m.encode())])
def test_same_answer_as_opentelemetrys_filter(method: str, make: Any) -> None:
    details = make(method)
    reference = filters.negate(filters.health_check())
    assert _not_health_check(details) == reference(details)
    assert _not_health_check(details) == (not method.startswith("/grpc.health.v1.Health/"))
