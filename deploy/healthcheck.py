#!/usr/bin/env python3
"""Container health check for docker compose (Kubernetes uses its own grpc/httpGet probes).

    hie-healthcheck grpc 127.0.0.1:7101     # grpc.health.v1 Check on the overall server ("")
    hie-healthcheck http http://127.0.0.1:8400/readyz
    hie-healthcheck tcp 127.0.0.1:2575      # a listening TCP port (the MLLP ingress)

Exit 0 when healthy, 1 otherwise.
"""

from __future__ import annotations

import socket
import sys
import urllib.request

TIMEOUT_S = 3.0


def check_grpc(target: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def check_http(url: str) -> bool:
    if not url.startswith(("http://", "https://")):
        raise ValueError("url must be http(s)")
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:  # noqa: S310 - scheme checked
        return 200 <= response.status < 300


def check_tcp(address: str) -> bool:
    """A connection accepted (and closed at once: MLLP sees an empty connection and ends it)."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S):
        return True


def main(argv: list[str]) -> int:
    checks = {"grpc": check_grpc, "http": check_http, "tcp": check_tcp}
    if len(argv) != 3 or argv[1] not in checks:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        ok = checks[argv[1]](argv[2])
    except Exception as exc:  # any failure is "unhealthy"
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    print("healthy" if ok else "unhealthy: not serving")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
